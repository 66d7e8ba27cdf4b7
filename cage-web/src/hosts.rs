//! The caged hosts: MAC, address, name, bytes each way, last seen, blocked attempts;
//! `GET /api/hosts`.

use std::fmt::Write as _;

use axum::extract::State;
use axum::response::Html;
use axum::Json;

use crate::auth::Authed;
use crate::backend::Host;
use crate::html::{self, esc};
use crate::{AppState, WebError};

pub async fn page(State(state): State<AppState>, authed: Authed) -> Result<Html<String>, WebError> {
    let hosts = state.backend.hosts().await?;
    let mut o = String::from(
        "<h1>Caged hosts</h1><div class=scroll><table id=hosts-table><thead><tr><th>address</th>\
         <th>MAC</th><th>name</th><th>up</th><th>down</th><th>last seen</th><th>flows</th>\
         <th>blocked</th></tr></thead><tbody>",
    );
    for h in &hosts {
        let _ = write!(
            o,
            "<tr{}><td><a href=\"/flows?host={ip}\">{ip}</a></td><td>{}</td><td>{}</td><td class=num>{}</td>\
             <td class=num>{}</td><td>{}</td><td class=num>{}</td><td class=num>{}</td></tr>",
            if h.blocked > 0 { " class=blocked" } else { "" },
            esc(h.mac.as_deref().unwrap_or("")),
            esc(h.hostname.as_deref().unwrap_or("")),
            esc(&html::bytes(h.bytes_up)),
            esc(&html::bytes(h.bytes_down)),
            esc(&html::rfc3339_short(&h.last_seen)),
            h.flows,
            h.blocked,
            ip = h.ip,
        );
    }
    o.push_str("</tbody></table></div>");
    if hosts.is_empty() {
        o.push_str("<p class=muted>No flows from a caged host in the log yet.</p>");
    }
    Ok(html::page("Hosts", "hosts", &authed.session.csrf, &o))
}

pub async fn api_hosts(
    State(state): State<AppState>,
    _: Authed,
) -> Result<Json<Vec<Host>>, WebError> {
    state
        .backend
        .hosts()
        .await
        .map(Json)
        .map_err(WebError::for_api)
}
