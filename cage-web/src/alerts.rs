//! Alerts (automatic isolations, failed self-tests, lost records, problems) and the
//! kill switch's audit log; `GET /api/alerts`, `GET /api/audit`.

use std::fmt::Write as _;

use axum::extract::State;
use axum::response::Html;
use axum::Json;

use crate::auth::Authed;
use crate::backend::{Alert, AuditEntry};
use crate::html::{self, esc};
use crate::AppState;

/// Audit entries shown and returned.
pub const AUDIT_TAIL: usize = 200;

pub async fn page(State(state): State<AppState>, authed: Authed) -> Html<String> {
    let alerts = state.backend.alerts().await;
    let audit = state.backend.audit(AUDIT_TAIL).await;
    let mut o = String::from("<h1>Alerts</h1>");
    if alerts.is_empty() {
        o.push_str("<p id=no-alerts class=muted>Nothing to report.</p>");
    } else {
        o.push_str("<ul id=alerts class=alerts>");
        for a in &alerts {
            let _ = write!(
                o,
                "<li class=\"{}\"><span class=muted>{}</span> <b>{}</b> {}</li>",
                esc(&a.kind),
                esc(&a.time.map(html::time).unwrap_or_default()),
                esc(&a.kind),
                esc(&a.text)
            );
        }
        o.push_str("</ul>");
    }
    o.push_str(
        "<h2>Kill switch audit log</h2><div class=scroll><table id=audit-table><thead><tr>\
         <th>time</th><th>action</th><th>source</th><th>who</th><th>reason</th><th>result</th>\
         </tr></thead><tbody>",
    );
    for e in audit.iter().rev() {
        let _ = write!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&html::time(e.time)),
            esc(&e.action),
            esc(&e.source.to_string()),
            esc(&e.who),
            esc(&e.reason),
            esc(&e.result)
        );
    }
    o.push_str("</tbody></table></div>");
    html::page("Alerts", "alerts", &authed.session.csrf, &o)
}

pub async fn api_audit(State(state): State<AppState>, _: Authed) -> Json<Vec<AuditEntry>> {
    Json(state.backend.audit(AUDIT_TAIL).await)
}

pub async fn api_alerts(State(state): State<AppState>, _: Authed) -> Json<Vec<Alert>> {
    Json(state.backend.alerts().await)
}
