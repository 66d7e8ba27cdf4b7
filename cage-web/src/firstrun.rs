//! The first-run page, where the first-run setup leads once the password is set: where
//! the agent's machine plugs in (and a form to choose another port), the AI Wi-Fi's
//! name and key with a QR code to join it, what the cage enforces, and a button that
//! runs the self-test now. Later visits find it at the link on the dashboard's
//! "Where the agent plugs in".
//!
//! The key is a secret: it is on this page only, which needs a session like every page
//! (and, like every answer but the assets, is `Cache-Control: no-store`); the JSON API
//! never carries it. `GET /first-run`, `POST /first-run/port`, `POST /first-run/selftest`.

use std::fmt::Write as _;

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};

use crate::auth::{Authed, PageForm};
use crate::backend::{AiPort, AiWifi, BackendError, Status};
use crate::html::{self, esc};
use crate::login::NoFields;
use crate::port::{self, ChoiceForm};
use crate::{qr, AppState, WebError};

/// Everything the page shows, read from the agent.
struct View {
    status: Status,
    port: Result<AiPort, BackendError>,
    wifi: Result<Vec<AiWifi>, BackendError>,
    /// The DNS egress mode (`off`, `open`, `allowlist`) and the number of allowed names.
    egress: Option<(String, usize)>,
}

async fn view(state: &AppState) -> View {
    let status = state.backend.status().await;
    let port = state.backend.ai_port().await;
    let wifi = state.backend.ai_wifi().await;
    let egress = state
        .backend
        .review()
        .await
        .ok()
        .map(|r| (r.egress, r.allowed.len()));
    View {
        status,
        port,
        wifi,
        egress,
    }
}

/// A message at the top of the page: (class, id suffix, text).
type Message<'a> = (&'a str, &'a str, String);

fn enforces(v: &View) -> String {
    let mut o = String::from(
        "<section class=box id=enforces><h2>What the cage enforces</h2><p id=enforces-line>\
         A machine on the AI port or the AI Wi-Fi reaches the internet and nothing else: \
         not your LAN, not this router beyond DHCP and DNS, not the network the router is \
         plugged into, not another caged machine. Every flow it makes is logged, and \
         ISOLATE on the dashboard cuts it off at once, open connections included.</p>",
    );
    if let Some((mode, allowed)) = &v.egress {
        if mode == "allowlist" {
            let _ = write!(
                o,
                "<p id=enforces-allowlist>Its internet is narrowed to the addresses of the \
                 {allowed} name{} allowed on the DNS page; everything else is blocked and \
                 logged.</p>",
                if *allowed == 1 { "" } else { "s" }
            );
        }
    }
    if !v.status.enforcing {
        o.push_str(
            "<p class=error id=enforces-off>Cage's tables are not in the kernel right now: \
             the segment is NOT caged.</p>",
        );
    } else if v.status.isolated {
        o.push_str(
            "<p class=error id=enforces-isolated>The kill switch is on: the segment is cut \
             off from everything until it is released.</p>",
        );
    }
    o.push_str("</section>");
    o
}

fn wifi_section(wifi: &Result<Vec<AiWifi>, BackendError>) -> String {
    let mut o = String::from("<section class=box id=ai-wifi><h2>The AI Wi-Fi</h2>");
    match wifi {
        Err(e) => {
            let _ = write!(
                o,
                "<p class=error id=ai-wifi-error>Cannot read the AI Wi-Fi: {}</p>",
                esc(&e.to_string())
            );
        }
        Ok(list) if list.is_empty() => o.push_str(
            "<p id=ai-wifi-none>This router has no AI Wi-Fi that Cage knows of: plug the \
             agent's machine into the AI port.</p>",
        ),
        Ok(list) => {
            for (i, w) in list.iter().enumerate() {
                let _ = write!(
                    o,
                    "<div class=wifi id=wifi-{i}><p>Name: <b class=wifi-ssid>{}</b>{}</p>",
                    esc(&w.ssid),
                    if w.hidden { " (hidden)" } else { "" }
                );
                if w.key.is_empty() {
                    o.push_str("<p>No key: an open network.</p>");
                } else {
                    let _ = write!(o, "<p>Key: <code class=wifi-key>{}</code></p>", esc(&w.key));
                }
                if !w.enabled {
                    o.push_str(
                        "<p class=error>Switched off (the access point or its radio is \
                         disabled): nothing can join it until it is on.</p></div>",
                    );
                    continue;
                }
                let label = format!("QR code to join the Wi-Fi {}", w.ssid);
                match qr::payload(w).and_then(|p| qr::svg(&p, &format!("wifi-qr-{i}"), &label)) {
                    Ok(svg) => {
                        let _ = write!(
                            o,
                            "<figure class=qr-box>{svg}<figcaption>Point a phone's or \
                             tablet's camera at it to join.</figcaption></figure>"
                        );
                    }
                    Err(e) => {
                        let _ = write!(o, "<p class=muted>No QR code: {}.</p>", esc(&e));
                    }
                }
                o.push_str("</div>");
            }
        }
    }
    o.push_str("</section>");
    o
}

fn selftest_section(s: &Status, csrf: &str) -> String {
    let mut o = String::from("<section class=box id=fr-selftest><h2>Prove it now</h2>");
    match &s.selftest {
        Some(t) => {
            let _ = write!(
                o,
                "<p id=fr-selftest-result class=\"{}\" data-ok=\"{}\" data-finished=\"{}\">\
                 Self-test {} at {}: {}</p>",
                if t.ok { "ok" } else { "error" },
                t.ok,
                t.finished_at,
                if t.ok { "passed" } else { "FAILED" },
                esc(&html::time(t.finished_at)),
                esc(&t.verdict)
            );
        }
        None => o.push_str("<p id=fr-selftest-result>No self-test has run yet.</p>"),
    }
    let _ = write!(
        o,
        "<form method=post action=\"/first-run/selftest\" id=selftest-form>{}\
         <p class=muted>Two throwaway probe hosts join the segment for the time of the test \
         and try every row of the contract with real packets; it takes up to half a \
         minute.</p><button id=selftest-run type=submit>Run the self-test now</button></form>",
        html::csrf_field(csrf)
    );
    o.push_str("</section>");
    o
}

fn render(v: &View, csrf: &str, message: Option<Message<'_>>) -> String {
    let mut o = String::from("<h1>Cage is set up</h1>");
    if let Some((class, id, text)) = message {
        let _ = write!(o, "<p class={class} id=fr-{id}>{}</p>", esc(&text));
    }
    o.push_str(&enforces(v));
    match &v.port {
        Ok(p) => {
            o.push_str(&port::summary_with(p, false));
            o.push_str(&port::choice_form(p, csrf, "/first-run/port"));
        }
        Err(e) => {
            let _ = write!(
                o,
                "<p class=error id=ai-port-error>Cannot tell the AI port: {}</p>",
                esc(&e.to_string())
            );
        }
    }
    o.push_str(&wifi_section(&v.wifi));
    o.push_str(&selftest_section(&v.status, csrf));
    o.push_str("<p><a href=\"/\" id=to-dashboard>On to the dashboard</a></p>");
    o
}

async fn answer(
    state: &AppState,
    authed: &Authed,
    status: StatusCode,
    message: Option<Message<'_>>,
) -> Response {
    let v = view(state).await;
    let body = render(&v, &authed.session.csrf, message);
    (
        status,
        html::page("First run", "", &authed.session.csrf, &body),
    )
        .into_response()
}

pub async fn page(
    State(state): State<AppState>,
    authed: Authed,
    RawQuery(raw): RawQuery,
) -> Response {
    let message = match raw.as_deref() {
        Some("port=saved") => Some((
            "ok",
            "message",
            "Saved: the network reloads with the new AI port.".to_owned(),
        )),
        Some("selftest=ran") => Some(("ok", "message", "The self-test ran.".to_owned())),
        _ => None,
    };
    answer(&state, &authed, StatusCode::OK, message).await
}

/// The page again with why nothing was changed.
async fn refused(state: &AppState, authed: &Authed, e: WebError, what: &str) -> Response {
    let text = format!("{what}: {}", e.message);
    answer(state, authed, e.status, Some(("error", "error", text))).await
}

pub async fn set_port(
    State(state): State<AppState>,
    PageForm(authed, form): PageForm<ChoiceForm>,
) -> Response {
    let choice = match port::checked_choice(&form.choice) {
        Ok(c) => c,
        Err(e) => return refused(&state, &authed, e, "The AI port was not changed").await,
    };
    match state.backend.set_ai_port(choice, authed.who()).await {
        Ok(_) => Redirect::to("/first-run?port=saved").into_response(),
        Err(e) => {
            refused(
                &state,
                &authed,
                WebError::from(e),
                "The AI port was not changed",
            )
            .await
        }
    }
}

pub async fn selftest(
    State(state): State<AppState>,
    PageForm(authed, NoFields {}): PageForm<NoFields>,
) -> Response {
    match state.backend.run_selftest(authed.who()).await {
        Ok(_) => Redirect::to("/first-run?selftest=ran").into_response(),
        Err(e) => {
            refused(
                &state,
                &authed,
                WebError::from(e),
                "The self-test did not run",
            )
            .await
        }
    }
}
