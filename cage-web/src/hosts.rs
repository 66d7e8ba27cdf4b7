//! The caged machines: one card a machine (its MAC, port and DHCP name, every address
//! it used, bytes each way, flows, blocked attempts, spoofing attempts, last seen), and
//! one page a machine (`/hosts/{mac}`: its traffic, top destinations by name, blocked
//! attempts by rule, its newest flows). `GET /api/hosts`, `GET /api/hosts/{mac}`.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::response::Html;
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::auth::Authed;
use crate::backend::{FlowFilter, FlowRecord, Segment};
use crate::charts;
use crate::html::{self, esc};
use crate::machines::{self, Attribution, Destination, Machine, Machines};
use crate::{AppState, WebError};

/// Addresses a card lists (the API has all).
pub const MAX_ADDRESSES: usize = 16;
/// Flows a machine's page and its API answer list, newest.
pub const MACHINE_FLOWS: usize = 100;
/// Destinations in a top list.
pub const TOP: usize = 8;
pub const HOUR_MS: u64 = 3_600_000;
pub const DAY_MS: u64 = 24 * HOUR_MS;

/// Now, in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Every flow of the log and the segment as the agent knows it now.
pub async fn gather(state: &AppState) -> Result<(Vec<FlowRecord>, Segment), WebError> {
    let flows = state.backend.flows(FlowFilter::default(), 0).await?;
    let seg = state.backend.segment().await;
    Ok((flows, seg))
}

/// A machine as a person names it: its DHCP name, else its MAC.
pub fn label(m: &Machine) -> &str {
    m.hostname.as_deref().unwrap_or(&m.mac)
}

/// `02:ca:9e:00:00:11` → `02-ca-9e-00-00-11`, for element ids.
pub fn mac_id(mac: &str) -> String {
    mac.replace(':', "-")
}

fn card(o: &mut String, m: &Machine) {
    let _ = write!(
        o,
        "<article class=machine id=\"machine-{id}\" data-mac=\"{mac}\"><h2><a href=\"/hosts/{mac}\">{}</a></h2>\
         <p class=dim>{}{}</p><p class=addresses>",
        esc(label(m)),
        // The MAC once: as the title when there is no DHCP name.
        if m.hostname.is_some() {
            format!("<span class=mac>{}</span>", esc(&m.mac))
        } else {
            "a machine without a DHCP name,".to_owned()
        },
        m.port
            .as_deref()
            .map(|p| format!(" on port <b class=port>{}</b>", esc(p)))
            .unwrap_or_default(),
        id = esc(&mac_id(&m.mac)),
        mac = esc(&m.mac),
    );
    if m.addresses.is_empty() {
        o.push_str("<span class=dim>no address of its own seen</span>");
    }
    for a in m.addresses.iter().take(MAX_ADDRESSES) {
        let _ = write!(
            o,
            "<a class=address href=\"/flows?host={a}\">{a}</a> ",
            a = esc(&a.to_string())
        );
    }
    if m.addresses.len() > MAX_ADDRESSES {
        let _ = write!(
            o,
            "<span class=dim>and {} more</span>",
            m.addresses.len() - MAX_ADDRESSES
        );
    }
    let _ = write!(
        o,
        "</p><dl class=figures><div><dt>up</dt><dd class=up>{}</dd></div>\
         <div><dt>down</dt><dd class=down>{}</dd></div><div><dt>flows</dt><dd class=flows>{}</dd></div>\
         <div><dt>blocked</dt><dd class=blocked>{}</dd></div><div><dt>last seen</dt><dd class=last-seen>{}</dd></div></dl>",
        esc(&html::bytes(m.bytes_up)),
        esc(&html::bytes(m.bytes_down)),
        m.flows,
        m.blocked,
        esc(&html::rfc3339_short(&m.last_seen)),
    );
    spoofs(o, m);
    o.push_str("</article>");
}

fn spoofs(o: &mut String, m: &Machine) {
    if m.spoofed.is_empty() {
        return;
    }
    let _ = write!(
        o,
        "<div class=spoofing><p class=error><b>Spoofing attempts</b>: {} sources (address or MAC) it claimed \
         that are not its own</p><ul>",
        m.spoofed.len() as u64 + m.spoofed_more
    );
    for s in &m.spoofed {
        let _ = write!(
            o,
            "<li class=spoofed data-address=\"{a}\" data-attempts=\"{}\">{}{a}: {} refused \
             (<code>{}</code>), last {}</li>",
            s.attempts,
            s.mac
                .as_deref()
                .map(|m| format!("MAC {} with ", esc(m)))
                .unwrap_or_default(),
            s.attempts,
            esc(&s.rule),
            esc(&html::rfc3339_short(&s.last)),
            a = esc(&s.address.to_string()),
        );
    }
    if m.spoofed_more > 0 {
        let _ = write!(
            o,
            "<li id=spoofed-more>and {} more claimed sources (see <a href=\"/flows?verdict=blocked\">the blocked flows</a>)</li>",
            m.spoofed_more
        );
    }
    o.push_str("</ul></div>");
}

pub async fn page(State(state): State<AppState>, authed: Authed) -> Result<Html<String>, WebError> {
    let (flows, seg) = gather(&state).await?;
    let g = machines::group(&flows, &seg);
    let mut o = format!(
        "<h1>Caged machines</h1><p class=dim>One card a machine, known by its MAC: every \
         address it used, and the ones it only claimed as spoofing attempts. {} machines.</p>\
         <div id=machines class=machines>",
        g.machines.len()
    );
    for m in &g.machines {
        card(&mut o, m);
    }
    o.push_str("</div>");
    if g.machines.is_empty() {
        o.push_str("<p class=muted>No caged machine in the log or the bindings yet.</p>");
    }
    if g.unattributed > 0 {
        let _ = write!(
            o,
            "<p class=dim id=unattributed>{} blocked attempts towards segment addresses no \
             machine has.</p>",
            g.unattributed
        );
    }
    Ok(html::page("Hosts", "hosts", &authed.session.csrf, &o))
}

pub async fn api_hosts(
    State(state): State<AppState>,
    _: Authed,
) -> Result<Json<Machines>, WebError> {
    let (flows, seg) = gather(&state).await.map_err(WebError::for_api)?;
    Ok(Json(machines::group(&flows, &seg)))
}

/// `GET /api/hosts/{mac}`: one machine and what its page shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineDetail {
    pub machine: Machine,
    /// Its allowed flows' destinations by name, most bytes first.
    pub top_destinations: Vec<Destination>,
    /// Its blocked attempts by rule: (rule, packets), most first.
    pub blocked_by_rule: Vec<(String, u64)>,
    /// Its newest flows, oldest first.
    pub flows: Vec<FlowRecord>,
}

/// A MAC from the path, or why not.
fn parse_mac(raw: &str) -> Result<String, WebError> {
    let ok = raw.len() == 17
        && raw.bytes().enumerate().all(|(i, b)| {
            if i % 3 == 2 {
                b == b':' || b == b'-'
            } else {
                b.is_ascii_hexdigit()
            }
        });
    if !ok {
        return Err(WebError::bad(format!(
            "'{}' is not a MAC address, e.g. 02:ca:9e:00:00:11",
            raw.chars().take(40).collect::<String>()
        )));
    }
    Ok(raw.replace('-', ":").to_ascii_lowercase())
}

/// The machine `mac` and its own flows.
fn detail(flows: &[FlowRecord], seg: &Segment, mac: &str) -> Option<MachineDetail> {
    let g = machines::group(flows, seg);
    let machine = g.find(mac)?.clone();
    let who = Attribution::new(flows, seg);
    let mine: Vec<&FlowRecord> = flows
        .iter()
        .filter(|r| who.machine_of(r).as_deref() == Some(mac))
        .collect();
    Some(MachineDetail {
        top_destinations: machines::top_destinations(mine.iter().copied(), TOP),
        blocked_by_rule: machines::blocked_by_rule(mine.iter().copied()),
        flows: mine[mine.len().saturating_sub(MACHINE_FLOWS)..]
            .iter()
            .map(|r| (*r).clone())
            .collect(),
        machine,
    })
}

type Found = (MachineDetail, Vec<FlowRecord>, Segment);

async fn find(state: &AppState, raw: &str) -> Result<Found, WebError> {
    let mac = parse_mac(raw)?;
    let (flows, seg) = gather(state).await?;
    let d = detail(&flows, &seg, &mac).ok_or_else(|| {
        WebError::new(
            axum::http::StatusCode::NOT_FOUND,
            format!("no caged machine {mac} in the log or the bindings"),
        )
    })?;
    Ok((d, flows, seg))
}

pub async fn machine_page(
    State(state): State<AppState>,
    authed: Authed,
    Path(raw): Path<String>,
) -> Result<Html<String>, WebError> {
    let (d, flows, seg) = find(&state, &raw).await?;
    let m = &d.machine;
    let mut o = format!(
        "<p><a href=\"/hosts\">← all machines</a></p><h1 id=machine-name>{}</h1>",
        esc(label(m))
    );
    let _ = write!(
        o,
        "<p>First seen <b id=first-seen>{}</b>, last seen <b>{}</b>.</p>",
        esc(&if m.first_seen.is_empty() {
            "not in the log".to_owned()
        } else {
            html::rfc3339_short(&m.first_seen)
        }),
        esc(&html::rfc3339_short(&m.last_seen))
    );
    o.push_str("<div id=machines>");
    card(&mut o, m);
    o.push_str("</div>");
    // Its pictures: the flows of this machine only.
    let who = Attribution::new(&flows, &seg);
    let mine: Vec<&FlowRecord> = flows
        .iter()
        .filter(|r| who.machine_of(r).as_deref() == Some(m.mac.as_str()))
        .collect();
    let now = now_ms();
    let hour = charts::traffic(mine.iter().copied(), now, HOUR_MS, 60);
    let day = charts::traffic(mine.iter().copied(), now, DAY_MS, 48);
    let blocked = charts::blocked(mine.iter().copied(), now, DAY_MS, 48);
    let top: Vec<(String, u64, u64)> = d
        .top_destinations
        .iter()
        .map(|t| (t.name.clone(), t.bytes_up, t.bytes_down))
        .collect();
    let _ = write!(
        o,
        "<h2>Traffic</h2><div class=charts><figure>{}<figcaption>Last hour</figcaption></figure>\
         <figure>{}<figcaption>Last 24 hours</figcaption></figure></div>\
         <h2>Top destinations</h2><div class=charts><figure>{}</figure></div>\
         <h2>Blocked attempts</h2><div class=charts><figure>{}<figcaption>Last 24 hours</figcaption></figure></div>",
        charts::traffic_svg("machine-hour", "Bytes up and down, last hour", &hour, false),
        charts::traffic_svg("machine-day", "Bytes up and down, last 24 hours", &day, false),
        charts::top_svg("machine-top", "Top destinations by name", &top),
        charts::blocked_svg("machine-blocked", "Blocked attempts, last 24 hours", &blocked),
    );
    o.push_str(
        "<div class=scroll><table id=blocked-by-rule><thead><tr><th>rule</th><th>attempts</th></tr></thead><tbody>",
    );
    for (rule, n) in &d.blocked_by_rule {
        let _ = write!(
            o,
            "<tr><td><code>{}</code></td><td class=num>{n}</td></tr>",
            esc(rule)
        );
    }
    let _ = write!(
        o,
        "</tbody></table></div><h2>Its newest flows</h2><div class=scroll><table id=machine-flows>\
         <thead><tr><th>last seen</th><th>verdict</th><th>proto</th><th>caged host</th><th>peer</th>\
         <th>rule / name</th><th>up</th><th>down</th></tr></thead><tbody>{}</tbody></table></div>",
        crate::flows::rows(&d.flows)
    );
    Ok(html::page(label(m), "hosts", &authed.session.csrf, &o))
}

pub async fn api_machine(
    State(state): State<AppState>,
    _: Authed,
    Path(raw): Path<String>,
) -> Result<Json<MachineDetail>, WebError> {
    find(&state, &raw)
        .await
        .map(|(d, _, _)| Json(d))
        .map_err(WebError::for_api)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_in_the_path_are_checked() {
        assert_eq!(parse_mac("02-CA-9E-00-00-11").unwrap(), "02:ca:9e:00:00:11");
        assert_eq!(parse_mac("02:ca:9e:00:00:11").unwrap(), "02:ca:9e:00:00:11");
        for bad in [
            "",
            "02:ca:9e:00:00",
            "02:ca:9e:00:00:1g",
            "<script>",
            "02:ca:9e:00:00:111",
        ] {
            assert_eq!(
                parse_mac(bad).unwrap_err().status,
                axum::http::StatusCode::BAD_REQUEST
            );
        }
    }
}
