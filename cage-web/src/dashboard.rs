//! The dashboard: the cage's state, the big red button, release with a confirmation step,
//! the counts. `GET /api/state`, `POST /api/isolate`, `POST /api/release`.

use std::fmt::Write as _;

use axum::extract::State;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Json;
use serde::Deserialize;

use crate::auth::{short_text, ApiJson, Authed, PageForm};
use crate::backend::{CageState, Status};
use crate::html::{self, esc};
use crate::{AppState, WebError};

/// Reasons longer than this are refused: they go to the audit log.
pub const MAX_REASON: usize = 200;

/// The headline of each state (also given to the script as `data-open` …).
fn headline(state: CageState) -> &'static str {
    match state {
        CageState::Open => "Open: the caged hosts reach the internet and nothing else",
        CageState::Isolated => "ISOLATED: the segment is cut off from everything",
        CageState::Lockdown => {
            "LOCKED DOWN: no usable configuration, all traffic of the segment is dropped"
        }
    }
}

/// The dashboard; with `confirm` (the reason given), the release's confirmation step
/// stands where the buttons are, under the state as it is.
fn render(s: &Status, csrf: &str, confirm: Option<&str>) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "<section class=\"state {state}\" id=state-box data-open=\"{}\" data-isolated=\"{}\" \
         data-lockdown=\"{}\"><h1 id=cage-state data-state=\"{state}\">{}</h1>",
        esc(headline(CageState::Open)),
        esc(headline(CageState::Isolated)),
        esc(headline(CageState::Lockdown)),
        esc(headline(s.state)),
        state = s.state.as_str()
    );
    o.push_str("<p id=state-detail>");
    if s.since > 0 {
        let _ = write!(
            o,
            "{} since {}{}{}",
            if s.isolated { "Isolated" } else { "Released" },
            esc(&html::time(s.since)),
            s.source
                .as_deref()
                .map(|src| format!(", by {} ({})", esc(&s.who), esc(src)))
                .unwrap_or_default(),
            if s.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", esc(&s.reason))
            }
        );
    }
    o.push_str("</p>");
    if !s.enforcing {
        o.push_str(
            "<p class=error>Cage's tables are not in the kernel: the segment is NOT caged.</p>",
        );
    }
    o.push_str("</section>");
    if let Some(reason) = confirm {
        let _ = write!(
            o,
            "<form method=post action=\"/release\" class=release id=release-confirm-form>{}\
             <p><b>Release the cage?</b> The caged hosts get their usual access again: the \
             internet, and nothing else.</p>\
             <input type=hidden name=reason value=\"{}\"><input type=hidden name=confirm value=yes>\
             <button id=release-confirm type=submit>Yes, release</button> \
             <a href=\"/\" id=release-cancel>Cancel</a></form>",
            html::csrf_field(csrf),
            esc(reason)
        );
    } else {
        // Both forms are on the page; the one that does not apply is hidden, so that the
        // script can switch them when the state changes elsewhere (`cage isolate`).
        let _ = write!(
            o,
            "<form method=post action=\"/isolate\" class=isolate id=isolate-form{}>{}\
             <label for=isolate-reason>Reason (optional)</label>\
             <input id=isolate-reason name=reason maxlength={MAX_REASON}>\
             <button id=isolate class=big-red type=submit>ISOLATE</button></form>",
            if s.isolated { " hidden" } else { "" },
            html::csrf_field(csrf)
        );
        let _ = write!(
            o,
            "<form method=post action=\"/release\" class=release id=release-form{}>{}\
             <label for=release-reason>Reason (for the audit log)</label>\
             <input id=release-reason name=reason maxlength={MAX_REASON}>\
             <button id=release type=submit>Release…</button></form>",
            if s.isolated { "" } else { " hidden" },
            html::csrf_field(csrf)
        );
    }
    let _ = write!(
        o,
        "<section class=counts><div><b id=count-flows>{}</b> flows logged</div>\
         <div><b id=count-blocked>{}</b> blocked attempts</div>\
         <div><b id=count-lost>{}</b> records lost</div></section>",
        s.flows, s.blocked, s.lost
    );
    match &s.selftest {
        Some(t) => {
            let _ = write!(
                o,
                "<p id=selftest class=\"{}\">Self-test {} at {}: {}</p>",
                if t.ok { "ok" } else { "error" },
                if t.ok { "passed" } else { "FAILED" },
                esc(&html::time(t.finished_at)),
                esc(&t.verdict)
            );
        }
        None => {
            o.push_str("<p id=selftest>No self-test has run yet (<code>cage selftest</code>).</p>")
        }
    }
    if !s.problems.is_empty() {
        o.push_str("<ul id=problems class=error>");
        for p in &s.problems {
            let _ = write!(o, "<li>{}</li>", esc(p));
        }
        o.push_str("</ul>");
    }
    o
}

pub async fn page(State(state): State<AppState>, authed: Authed) -> Html<String> {
    let s = state.backend.status().await;
    let mut body = render(&s, &authed.session.csrf, None);
    // The pictures, from the flow log; a log that cannot be read says so instead.
    match crate::hosts::gather(&state).await {
        Ok((flows, seg)) => body.push_str(&crate::pictures::dashboard(
            &flows,
            &seg,
            crate::hosts::now_ms(),
        )),
        Err(e) => {
            let _ = write!(
                body,
                "<p class=error id=pictures-error>No pictures: {}</p>",
                esc(&e.message)
            );
        }
    }
    // Where the agent plugs in, on every visit (the first one above all). A router
    // whose ports cannot be read says so instead.
    match state.backend.ai_port().await {
        Ok(p) => body.push_str(&crate::port::summary(&p)),
        Err(e) => {
            let _ = write!(
                body,
                "<p class=error id=ai-port-error>Cannot tell the AI port: {}</p>",
                esc(&e.to_string())
            );
        }
    }
    html::page("Dashboard", "dashboard", &authed.session.csrf, &body)
}

#[derive(Deserialize)]
pub struct ReasonForm {
    #[serde(default)]
    reason: String,
    /// Set by the confirmation step of a release.
    #[serde(default)]
    confirm: String,
}

pub async fn isolate(
    State(state): State<AppState>,
    PageForm(authed, form): PageForm<ReasonForm>,
) -> Result<Redirect, WebError> {
    let reason = short_text("reason", &form.reason, MAX_REASON)?;
    state.backend.isolate(reason, authed.who()).await?;
    Ok(Redirect::to("/"))
}

/// The release form leads to a confirmation step; only the confirmed form releases.
pub async fn release(
    State(state): State<AppState>,
    PageForm(authed, form): PageForm<ReasonForm>,
) -> Result<Response, WebError> {
    let reason = short_text("reason", &form.reason, MAX_REASON)?;
    if form.confirm != "yes" {
        let s = state.backend.status().await;
        let body = render(&s, &authed.session.csrf, Some(&reason));
        return Ok(
            html::page("Release?", "dashboard", &authed.session.csrf, &body).into_response(),
        );
    }
    state.backend.release(reason, authed.who()).await?;
    Ok(Redirect::to("/").into_response())
}

pub async fn api_state(State(state): State<AppState>, _: Authed) -> Json<Status> {
    Json(state.backend.status().await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReasonBody {
    #[serde(default)]
    reason: String,
}

pub async fn api_isolate(
    State(state): State<AppState>,
    ApiJson(authed, body): ApiJson<ReasonBody>,
) -> Result<Json<Status>, WebError> {
    api_press(&state, &authed, &body, true).await
}

pub async fn api_release(
    State(state): State<AppState>,
    ApiJson(authed, body): ApiJson<ReasonBody>,
) -> Result<Json<Status>, WebError> {
    api_press(&state, &authed, &body, false).await
}

/// Isolate or release for the JSON API; the new state.
async fn api_press(
    state: &AppState,
    authed: &Authed,
    body: &ReasonBody,
    isolate: bool,
) -> Result<Json<Status>, WebError> {
    let reason = short_text("reason", &body.reason, MAX_REASON).map_err(WebError::for_api)?;
    let pressed = if isolate {
        state.backend.isolate(reason, authed.who()).await
    } else {
        state.backend.release(reason, authed.who()).await
    };
    pressed.map_err(WebError::for_api)?;
    Ok(Json(state.backend.status().await))
}
