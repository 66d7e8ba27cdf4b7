//! New-destination review: in allow-list mode, the names Cage's DNS forwarder refused,
//! with how often and by whom, each with one button that allows it (written to the
//! configuration as `list allow_domain`, and the running daemon reloads it).
//! `GET /api/dns`, `POST /api/dns/allow`.

use std::fmt::Write as _;

use axum::extract::State;
use axum::response::{Html, Redirect};
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::auth::{short_text, ApiJson, Authed, PageForm};
use crate::backend::Review;
use crate::html::{self, esc};
use crate::{AppState, WebError};

/// A domain name is at most 253 characters; a wildcard adds two.
pub const MAX_NAME: usize = 255;

pub async fn page(State(state): State<AppState>, authed: Authed) -> Result<Html<String>, WebError> {
    let review = state.backend.review().await?;
    let mut o = String::from("<h1>DNS</h1>");
    let mode = match review.egress.as_str() {
        "allowlist" => {
            "Allow-list: caged hosts reach only the names below (and what they resolve to)."
        }
        "open" => "Open: every name resolves; DNS goes through Cage and names appear on flows.",
        _ => "DNS does not go through Cage (no <code>dns</code> section, or it is off).",
    };
    let _ = write!(
        o,
        "<p id=dns-mode data-mode=\"{}\">{mode}</p>",
        esc(&review.egress)
    );
    o.push_str("<h2>Refused names</h2>");
    if review.refused.is_empty() {
        o.push_str("<p id=no-refused class=muted>No name has been refused.</p>");
    } else {
        o.push_str(
            "<div class=scroll><table id=refused-table><thead><tr><th>name</th>\
             <th class=num>refused</th><th>last</th><th>hosts</th><th></th></tr></thead><tbody>",
        );
        for r in &review.refused {
            let hosts: Vec<String> = r.hosts.iter().map(|h| h.to_string()).collect();
            let _ = write!(
                o,
                "<tr><td>{}</td><td class=num>{}</td><td>{}</td><td>{}</td><td>\
                 <form method=post action=\"/dns/allow\"><input type=hidden name=csrf value=\"{}\">\
                 <input type=hidden name=name value=\"{}\">\
                 <button class=allow data-name=\"{}\">Allow</button></form></td></tr>",
                esc(&r.name),
                r.count,
                esc(&html::rfc3339_short(&r.last)),
                esc(&hosts.join(" ")),
                esc(&authed.session.csrf),
                esc(&r.name),
                esc(&r.name),
            );
        }
        o.push_str("</tbody></table></div>");
    }
    o.push_str("<h2>Allowed names</h2>");
    if review.allowed.is_empty() {
        o.push_str("<p class=muted>None.</p>");
    } else {
        o.push_str("<ul id=allowed>");
        for a in &review.allowed {
            let _ = write!(o, "<li>{}</li>", esc(a));
        }
        o.push_str("</ul>");
    }
    let _ = write!(
        o,
        "<form method=post action=\"/dns/allow\" class=stack><input type=hidden name=csrf value=\"{}\">\
         <label for=allow-name>Allow a name (<code>*.example.com</code> for its subdomains)</label>\
         <input id=allow-name name=name maxlength={MAX_NAME} autocomplete=off>\
         <button id=allow-submit>Allow</button></form>",
        esc(&authed.session.csrf)
    );
    Ok(html::page("DNS", "dns", &authed.session.csrf, &o))
}

#[derive(Deserialize)]
pub struct NameForm {
    #[serde(default)]
    name: String,
}

fn name_of(value: &str) -> Result<String, WebError> {
    let name = short_text("name", value, MAX_NAME)?;
    if name.is_empty() {
        return Err(WebError::bad(
            "name: a domain name, please (e.g. api.anthropic.com)",
        ));
    }
    Ok(name)
}

pub async fn allow(
    State(state): State<AppState>,
    PageForm(authed, form): PageForm<NameForm>,
) -> Result<Redirect, WebError> {
    let name = name_of(&form.name)?;
    state.backend.allow_name(name, authed.who()).await?;
    Ok(Redirect::to("/dns"))
}

pub async fn api_review(
    State(state): State<AppState>,
    _: Authed,
) -> Result<Json<Review>, WebError> {
    Ok(Json(
        state.backend.review().await.map_err(WebError::for_api)?,
    ))
}

#[derive(Serialize)]
pub struct AllowedAnswer {
    /// The name as written to the configuration.
    name: String,
}

pub async fn api_allow(
    State(state): State<AppState>,
    ApiJson(authed, body): ApiJson<NameForm>,
) -> Result<Json<AllowedAnswer>, WebError> {
    let name = name_of(&body.name).map_err(WebError::for_api)?;
    let name = state
        .backend
        .allow_name(name, authed.who())
        .await
        .map_err(WebError::for_api)?;
    Ok(Json(AllowedAnswer { name }))
}
