//! The AI port: which wired port of the router the agent's machine plugs into, the
//! ports and Wi-Fi that stay the owner's way in, and a form to choose another port.
//! The dashboard shows the same box on every visit, the first one included.
//! `GET /port`, `POST /port`, `GET /api/port`.

use std::fmt::Write as _;

use axum::extract::{Query, State};
use axum::response::{Html, Redirect};
use axum::Json;
use serde::Deserialize;

use crate::auth::{short_text, Authed, PageForm};
use crate::backend::AiPort;
use crate::html::{self, esc};
use crate::{AppState, WebError};

/// The box "where the agent plugs in", for the dashboard and this page.
pub fn summary(p: &AiPort) -> String {
    summary_with(p, true)
}

/// The box, with or without the links to the pages that have more (the first-run page,
/// which has the form and the Wi-Fi's key itself, leaves them out).
pub(crate) fn summary_with(p: &AiPort, links: bool) -> String {
    let mut o = String::from("<section id=ai-port class=box><h2>Where the agent plugs in</h2>");
    if p.ai_ports.is_empty() {
        o.push_str(
            "<p class=error id=ai-port-none>No wired AI port: a machine plugged into a LAN \
             port of this router is NOT caged.</p>",
        );
    }
    for (device, label) in &p.ai_ports {
        let _ = write!(
            o,
            "<p class=ai-port-line>Plug the agent's machine into <b class=ai-port-label>{}</b> \
             (<code class=ai-port-device>{}</code>).</p>",
            esc(label),
            esc(device)
        );
    }
    for ssid in &p.wifi_ai {
        let _ = write!(
            o,
            "<p>Or join it to the AI Wi-Fi <b class=wifi-ai>{}</b>{}.</p>",
            esc(ssid),
            if links {
                " (<a href=\"/first-run#ai-wifi\" class=wifi-join>its key and QR code</a>)"
            } else {
                ""
            }
        );
    }
    let mut ways: Vec<String> = Vec::new();
    if !p.lan_ports.is_empty() {
        ways.push(format!(
            "the LAN port(s) <b>{}</b>",
            esc(&p.lan_ports.join(", "))
        ));
    }
    for ssid in &p.wifi_lan {
        ways.push(format!("the Wi-Fi <b>{}</b>", esc(ssid)));
    }
    let _ = write!(
        o,
        "<p id=owner-way-in>You reach this page over {}.</p>",
        if ways.is_empty() {
            "none of the router's ports or Wi-Fi that Cage knows of".to_owned()
        } else {
            ways.join(" or ")
        }
    );
    for n in &p.notes {
        let _ = write!(o, "<p class=note>{}</p>", esc(n));
    }
    if p.changeable() && links {
        o.push_str("<p><a href=\"/port\" id=ai-port-change>Choose another port</a></p>");
    }
    o.push_str("</section>");
    o
}

#[derive(Deserialize)]
pub struct Saved {
    #[serde(default)]
    saved: String,
}

pub async fn page(
    State(state): State<AppState>,
    authed: Authed,
    Query(q): Query<Saved>,
) -> Result<Html<String>, WebError> {
    let p = state.backend.ai_port().await?;
    Ok(render(
        &p,
        &authed.session.csrf,
        (q.saved == "1").then_some("Saved: the network reloads with the new port."),
    ))
}

fn render(p: &AiPort, csrf: &str, message: Option<&str>) -> Html<String> {
    let mut o = String::from("<h1>AI port</h1>");
    if let Some(m) = message {
        let _ = write!(o, "<p class=ok id=port-message>{}</p>", esc(m));
    }
    o.push_str(&summary(p));
    o.push_str(&choice_form(p, csrf, "/port"));
    o.push_str(
        "<p><a href=\"/first-run\" id=first-run-link>The first-run page</a>: the AI \
         Wi-Fi's key and QR code, and the self-test.</p>",
    );
    html::page("AI port", "port", csrf, &o)
}

/// The form that chooses the AI port, posting to `action` (`/port`, `/first-run/port`);
/// where the page cannot change it, a line that says where it is set instead.
pub(crate) fn choice_form(p: &AiPort, csrf: &str, action: &str) -> String {
    let mut o = String::new();
    if p.changeable() {
        let _ = write!(
            o,
            "<form method=post action=\"{}\" class=stack id=port-form>{}\
             <label for=port-choice>AI port</label><select id=port-choice name=choice>",
            esc(action),
            html::csrf_field(csrf)
        );
        let mut choices: Vec<&String> = p.ai_ports.iter().map(|(d, _)| d).collect();
        choices.extend(p.lan_ports.iter());
        for d in choices {
            let selected = p.ai_ports.iter().any(|(a, _)| a == d);
            let _ = write!(
                o,
                "<option value=\"{}\"{}>{}</option>",
                esc(d),
                if selected { " selected" } else { "" },
                esc(d)
            );
        }
        let _ = write!(
            o,
            "<option value=none{}>none: every port stays LAN</option></select>\
             <p class=muted>Moving the port you are plugged into cuts you off: come back over \
             the Wi-Fi or another LAN port. Cage refuses a change that would leave you no \
             way in.</p><button id=port-submit>Save</button></form>",
            if p.ai_ports.is_empty() {
                " selected"
            } else {
                ""
            }
        );
    } else {
        o.push_str(
            "<p class=muted>Here the segment's ports are <code>cage.ai.port</code> in the \
             configuration.</p>",
        );
    }
    o
}

/// A choice as the form sends it, checked before the agent sees it: a device name or
/// `none`.
pub(crate) fn checked_choice(raw: &str) -> Result<String, WebError> {
    let choice = short_text("choice", raw, 32)?;
    let ok = !choice.is_empty()
        && choice
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@'));
    if !ok {
        return Err(WebError::bad(
            "choice: a port's device name (e.g. eth1, lan5) or none",
        ));
    }
    Ok(choice)
}

#[derive(Deserialize)]
pub struct ChoiceForm {
    #[serde(default)]
    pub(crate) choice: String,
}

pub async fn set(
    State(state): State<AppState>,
    PageForm(authed, form): PageForm<ChoiceForm>,
) -> Result<Redirect, WebError> {
    let choice = checked_choice(&form.choice)?;
    state.backend.set_ai_port(choice, authed.who()).await?;
    Ok(Redirect::to("/port?saved=1"))
}

pub async fn api_port(State(state): State<AppState>, _: Authed) -> Result<Json<AiPort>, WebError> {
    Ok(Json(
        state.backend.ai_port().await.map_err(WebError::for_api)?,
    ))
}
