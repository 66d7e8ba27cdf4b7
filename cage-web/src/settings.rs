//! Settings: the segment's addresses, the admin hosts, automatic isolation, the names
//! the page answers to, and the password. The agent validates them with the same
//! validator and messages as the configuration file and writes them all or nothing.

use std::fmt::Write as _;
use std::time::Instant;

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use crate::auth::{Authed, PageForm};
use crate::backend::Settings;
use crate::html::{self, esc};
use crate::session;
use crate::{AppState, WebError};

/// A one-line field longer than this is refused before it reaches the validator.
const MAX_FIELD: usize = 200;
/// A list field (one entry a line) longer than this, or with more entries, likewise.
const MAX_LIST: usize = 4000;
const MAX_ENTRIES: usize = 64;

fn render(s: &Settings, csrf: &str, message: Option<(&str, &str)>) -> String {
    let mut o = String::from("<h1>Settings</h1>");
    if let Some((class, text)) = message {
        let _ = write!(o, "<p class={class} id=settings-message>{}</p>", esc(text));
    }
    let _ = write!(
        o,
        "<form method=post action=\"/settings\" id=settings-form class=settings>{}\
         <fieldset><legend>AI segment</legend>\
         <label for=address>Router address on the segment, with prefix</label>\
         <input id=address name=address value=\"{}\" maxlength={MAX_FIELD} placeholder=\"192.168.10.1/24\">\
         <label class=check><input type=checkbox id=ipv6 name=ipv6 value=1{}> IPv6 on the segment</label>\
         <label for=address6>Router IPv6 address on the segment (when IPv6 is on)</label>\
         <input id=address6 name=address6 value=\"{}\" maxlength={MAX_FIELD} placeholder=\"fd00:cafe:10::1/64\">\
         </fieldset><fieldset><legend>Admin hosts</legend>\
         <label for=admin_hosts>LAN hosts that may open connections into the segment, one a line</label>\
         <textarea id=admin_hosts name=admin_hosts rows=3>{}</textarea></fieldset>\
         <fieldset><legend>Automatic isolation (0: off)</legend>\
         <label for=auto_blocked>Blocked attempts of one host within the window</label>\
         <input id=auto_blocked name=auto_blocked value=\"{}\" inputmode=numeric maxlength={MAX_FIELD}>\
         <label for=auto_upload_bytes>Bytes one host sends to the internet within the window</label>\
         <input id=auto_upload_bytes name=auto_upload_bytes value=\"{}\" inputmode=numeric maxlength={MAX_FIELD}>\
         <label for=auto_window>Window, seconds</label>\
         <input id=auto_window name=auto_window value=\"{}\" inputmode=numeric maxlength={MAX_FIELD}></fieldset>\
         <fieldset><legend>This page</legend>\
         <label for=web_hostnames>Names this page answers to besides its address, one a line</label>\
         <textarea id=web_hostnames name=web_hostnames rows=2>{}</textarea></fieldset>\
         <button id=settings-save type=submit>Save and apply</button></form>",
        html::csrf_field(csrf),
        esc(&s.address),
        if s.ipv6 { " checked" } else { "" },
        esc(&s.address6),
        esc(&s.admin_hosts.join("\n")),
        esc(&s.auto_blocked),
        esc(&s.auto_upload_bytes),
        esc(&s.auto_window),
        esc(&s.web_hostnames.join("\n")),
    );
    let _ = write!(
        o,
        "<form method=post action=\"/settings/password\" id=password-form class=settings>{}\
         <fieldset><legend>Password</legend>\
         <label for=current>Current password</label>\
         <input id=current name=current type=password autocomplete=current-password required>\
         <label for=new-password>New password (at least {} characters)</label>\
         <input id=new-password name=password type=password autocomplete=new-password required>\
         <label for=new-confirm>New password again</label>\
         <input id=new-confirm name=confirm type=password autocomplete=new-password required>\
         <button id=password-save type=submit>Change password</button></fieldset></form>",
        html::csrf_field(csrf),
        session::MIN_PASSWORD
    );
    o
}

pub async fn page(
    State(state): State<AppState>,
    authed: Authed,
    RawQuery(raw): RawQuery,
) -> Result<Html<String>, WebError> {
    let settings = state.backend.settings().await?;
    let message = match raw.as_deref() {
        Some("saved=settings") => Some(("ok", "Saved and applied.")),
        Some("saved=password") => Some(("ok", "Password changed; other sessions were logged out.")),
        _ => None,
    };
    let body = render(&settings, &authed.session.csrf, message);
    Ok(html::page(
        "Settings",
        "settings",
        &authed.session.csrf,
        &body,
    ))
}

#[derive(Deserialize)]
pub struct SettingsForm {
    #[serde(default)]
    address: String,
    #[serde(default)]
    ipv6: String,
    #[serde(default)]
    address6: String,
    #[serde(default)]
    admin_hosts: String,
    #[serde(default)]
    auto_blocked: String,
    #[serde(default)]
    auto_upload_bytes: String,
    #[serde(default)]
    auto_window: String,
    #[serde(default)]
    web_hostnames: String,
}

fn field(name: &str, v: &str) -> Result<String, WebError> {
    let v = v.trim();
    if v.chars().count() > MAX_FIELD {
        return Err(WebError::bad(format!(
            "{name}: at most {MAX_FIELD} characters"
        )));
    }
    if v.chars().any(char::is_control) {
        return Err(WebError::bad(format!(
            "{name}: no control characters, please"
        )));
    }
    Ok(v.to_owned())
}

fn list(name: &str, v: &str) -> Result<Vec<String>, WebError> {
    if v.chars().count() > MAX_LIST {
        return Err(WebError::bad(format!(
            "{name}: at most {MAX_LIST} characters"
        )));
    }
    let entries: Vec<String> = v
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect();
    if entries.len() > MAX_ENTRIES {
        return Err(WebError::bad(format!(
            "{name}: at most {MAX_ENTRIES} entries"
        )));
    }
    if let Some(e) = entries.iter().find(|e| e.chars().any(char::is_control)) {
        return Err(WebError::bad(format!(
            "{name}: '{}' has a control character",
            e.escape_default()
        )));
    }
    Ok(entries)
}

impl SettingsForm {
    fn to_settings(&self) -> Result<Settings, WebError> {
        Ok(Settings {
            address: field("address", &self.address)?,
            ipv6: match self.ipv6.as_str() {
                "" => false,
                "1" | "on" => true,
                other => {
                    return Err(WebError::bad(format!(
                        "ipv6: '{}' is not a checkbox value; give 1 or leave it out",
                        other.chars().take(20).collect::<String>()
                    )))
                }
            },
            address6: field("address6", &self.address6)?,
            admin_hosts: list("admin_hosts", &self.admin_hosts)?,
            auto_blocked: field("auto_blocked", &self.auto_blocked)?,
            auto_upload_bytes: field("auto_upload_bytes", &self.auto_upload_bytes)?,
            auto_window: field("auto_window", &self.auto_window)?,
            web_hostnames: list("web_hostnames", &self.web_hostnames)?,
        })
    }
}

pub async fn apply(
    State(state): State<AppState>,
    PageForm(authed, form): PageForm<SettingsForm>,
) -> Result<Response, WebError> {
    let settings = form.to_settings()?;
    match state.backend.apply_settings(settings.clone()).await {
        Ok(()) => Ok(Redirect::to("/settings?saved=settings").into_response()),
        Err(e) => {
            // The form again, as it was sent, with the validator's message.
            let status = WebError::from(e.clone()).status;
            let body = render(
                &settings,
                &authed.session.csrf,
                Some(("error", &format!("Nothing was changed: {e}"))),
            );
            Ok((
                status,
                html::page("Settings", "settings", &authed.session.csrf, &body),
            )
                .into_response())
        }
    }
}

/// The settings page again with an error about the password.
async fn again(state: &AppState, authed: &Authed, status: StatusCode, text: &str) -> Response {
    let settings = state.backend.settings().await.unwrap_or_default();
    let body = render(&settings, &authed.session.csrf, Some(("error", text)));
    (
        status,
        html::page("Settings", "settings", &authed.session.csrf, &body),
    )
        .into_response()
}

#[derive(Deserialize)]
pub struct PasswordForm {
    current: String,
    password: String,
    confirm: String,
}

pub async fn password(
    State(state): State<AppState>,
    PageForm(authed, form): PageForm<PasswordForm>,
) -> Result<Response, WebError> {
    let allowed = state.limiter().check(authed.ip, Instant::now());
    if let Err(wait) = allowed {
        return Ok(again(
            &state,
            &authed,
            StatusCode::TOO_MANY_REQUESTS,
            &format!(
                "Too many wrong passwords; try again in {} s.",
                wait.as_secs() + 1
            ),
        )
        .await);
    }
    if let Some(problem) = session::password_problem(&form.password, &form.confirm) {
        return Ok(again(
            &state,
            &authed,
            StatusCode::BAD_REQUEST,
            &format!("Not changed: {problem}."),
        )
        .await);
    }
    let current_ok = match state.backend.password_hash().await {
        Some(hash) if form.current.len() <= session::MAX_PASSWORD => {
            let current = form.current.clone();
            state
                .argon2(move || session::verify_password(&current, &hash))
                .await
                .unwrap_or(false)
        }
        _ => false,
    };
    if !current_ok {
        state.limiter().failure(authed.ip, Instant::now());
        return Ok(again(
            &state,
            &authed,
            StatusCode::FORBIDDEN,
            "Not changed: the current password is wrong.",
        )
        .await);
    }
    let password = form.password.clone();
    let phc = state
        .argon2(move || session::hash_password(&password))
        .await
        .unwrap_or_else(|| Err("cannot hash the password now; try again".into()))
        .map_err(|e| WebError::new(StatusCode::SERVICE_UNAVAILABLE, e))?;
    state.backend.set_password_hash(phc).await?;
    state.sessions().retain_only(&authed.session.token);
    state.backend.event(&format!(
        "web page: the password was changed from {}; other sessions ended",
        authed.ip
    ));
    Ok(Redirect::to("/settings?saved=password").into_response())
}
