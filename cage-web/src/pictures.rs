//! The dashboard's pictures: the segment's bytes up and down over the last hour and the
//! last 24 hours, each machine's last hour, blocked attempts over the last 24 hours, and
//! the top destinations by name. Drawn by [`crate::charts`] from the flow log, with the
//! flows of the router, of multicast and of self-test probes left out as on the Hosts
//! page ([`crate::machines::Attribution`]).

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::backend::{FlowRecord, Segment};
use crate::charts::{self, Series};
use crate::hosts::{label, mac_id, DAY_MS, HOUR_MS, TOP};
use crate::html::{self, esc};
use crate::machines::{self, Attribution};

/// Steps of a machine's sparkline: one every two minutes.
const SPARK_STEPS: usize = 30;
/// Machines with a sparkline on the dashboard, the busiest; the Hosts page has all.
const SPARK_MACHINES: usize = 12;

/// The pictures' section of the dashboard at `now` (Unix milliseconds).
pub fn dashboard(flows: &[FlowRecord], seg: &Segment, now: u64) -> String {
    let who = Attribution::new(flows, seg);
    let mut hour = Series::new(now, HOUR_MS, 60);
    let mut day = Series::new(now, DAY_MS, 48);
    let mut per: HashMap<String, Series> = HashMap::new();
    let mut recent: Vec<&FlowRecord> = Vec::new();
    let mut ours: Vec<&FlowRecord> = Vec::new();
    for r in flows {
        let Some(mac) = who.machine_of(r) else {
            continue;
        };
        ours.push(r);
        // Each time read once: 10 000 flows make a dashboard.
        let (Some(s), Some(e)) = (charts::unix_ms(&r.start), charts::unix_ms(&r.end)) else {
            continue;
        };
        hour.add_span(s, e, r.bytes_out, r.bytes_in);
        day.add_span(s, e, r.bytes_out, r.bytes_in);
        per.entry(mac)
            .or_insert_with(|| Series::new(now, HOUR_MS, SPARK_STEPS))
            .add_span(s, e, r.bytes_out, r.bytes_in);
        if e + DAY_MS >= now {
            recent.push(r);
        }
    }
    let blocked = charts::blocked(ours.iter().copied(), now, DAY_MS, 48);
    let top: Vec<(String, u64, u64)> = machines::top_destinations(recent.iter().copied(), TOP)
        .into_iter()
        .map(|d| (d.name, d.bytes_up, d.bytes_down))
        .collect();
    let mut o = String::with_capacity(32 * 1024);
    let _ = write!(
        o,
        "<section id=pictures><h2>Traffic of the segment</h2><div class=charts>\
         <figure>{}<figcaption>Last hour, a bar a minute: up above the line, down below</figcaption></figure>\
         <figure>{}<figcaption>Last 24 hours, a bar a half hour</figcaption></figure>\
         <figure>{}<figcaption>Blocked attempts, last 24 hours, a bar a half hour</figcaption></figure>\
         <figure>{}<figcaption>Top destinations by name, last 24 hours</figcaption></figure></div>",
        charts::traffic_svg("chart-hour", "Bytes up and down, last hour", &hour, false),
        charts::traffic_svg("chart-day", "Bytes up and down, last 24 hours", &day, false),
        charts::blocked_svg("chart-blocked", "Blocked attempts, last 24 hours", &blocked),
        charts::top_svg("chart-top", "Top destinations by name", &top),
    );
    let g = machines::group_with(flows, seg, &who);
    if !g.machines.is_empty() {
        o.push_str("<h2>Each machine, last hour</h2><table id=machine-charts class=sparks><tbody>");
        for m in g.machines.iter().take(SPARK_MACHINES) {
            let s = per
                .remove(&m.mac)
                .unwrap_or_else(|| Series::new(now, HOUR_MS, SPARK_STEPS));
            let _ = write!(
                o,
                "<tr><td><a href=\"/hosts/{mac}\">{}</a><br><span class=dim>↑ {} ↓ {}</span></td>\
                 <td class=spark>{}</td></tr>",
                esc(label(m)),
                esc(&html::bytes(s.total_up())),
                esc(&html::bytes(s.total_down())),
                charts::traffic_svg(
                    &format!("spark-{}", mac_id(&m.mac)),
                    &format!("{}, last hour", label(m)),
                    &s,
                    true
                ),
                mac = esc(&m.mac),
            );
        }
        o.push_str("</tbody></table>");
        if g.machines.len() > SPARK_MACHINES {
            let _ = write!(
                o,
                "<p class=dim>The {SPARK_MACHINES} busiest; all {} on the <a href=\"/hosts\">Hosts</a> page.</p>",
                g.machines.len()
            );
        }
    }
    o.push_str("</section>");
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Binding;

    #[test]
    fn the_dashboard_draws_the_machines_traffic_and_not_the_routers() {
        let now = charts::unix_ms("2026-12-07T13:00:00Z").unwrap();
        let rec = |host: &str, mac: &str, up: u64| FlowRecord {
            start: "2026-12-07T12:59:10Z".into(),
            end: "2026-12-07T12:59:20Z".into(),
            verdict: "allowed".into(),
            rule: None,
            proto: "udp".into(),
            host: host.parse().unwrap(),
            host_port: None,
            mac: Some(mac.into()),
            bridge_port: None,
            peer: "203.0.113.10".parse().unwrap(),
            peer_port: Some(53),
            direction: "out".into(),
            packets_out: 1,
            bytes_out: up,
            packets_in: 1,
            bytes_in: 2 * up,
            tag: None,
            tcp_flags: None,
            hostname: None,
            name: Some("api.example.com".into()),
        };
        let seg = Segment {
            router: vec!["192.168.10.1".parse().unwrap()],
            subnets: vec![("192.168.10.0".parse().unwrap(), 24)],
            bindings: vec![Binding {
                mac: "02:00:00:00:00:11".into(),
                port: Some("eth1".into()),
                addresses: vec![],
            }],
            leases: vec![],
        };
        let flows = [
            rec("192.168.10.11", "02:00:00:00:00:11", 1000),
            rec("192.168.10.1", "02:00:00:00:00:01", 70_000),
        ];
        let o = dashboard(&flows, &seg, now);
        assert!(
            o.contains("id=\"chart-hour\" class=\"chart traffic\" viewBox=\"0 0 360 140\" role=img aria-labelledby=\"chart-hour-t\" data-up=\"1000\" data-down=\"2000\""),
            "{o}"
        );
        assert!(o.contains("id=\"chart-day\"") && o.contains("data-up=\"1000\""));
        assert!(
            o.contains("data-name=\"api.example.com\" data-up=\"1000\""),
            "{o}"
        );
        assert!(o.contains("id=\"spark-02-00-00-00-00-11\""), "{o}");
        assert!(
            !o.contains("70000"),
            "the router's traffic is not the segment's"
        );
    }
}
