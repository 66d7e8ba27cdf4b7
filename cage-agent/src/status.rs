//! `cage status`: is the cage enforced, is the daemon up, what has it denied.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::config;
use crate::flows;
use crate::isolation;
use crate::netlink::{self, PortState};
use crate::nft::{self, Count};
use crate::running::{self, cage_running, DaemonState};

#[derive(Debug, Serialize)]
pub struct Status {
    /// Whether Cage's tables are in the kernel: the cage holds whether or not the daemon runs.
    pub enforcing: bool,
    /// Whether the kernel holds the lockdown policy (`policy::lockdown`): no usable
    /// configuration at start, everything of the segment dropped.
    pub lockdown: bool,
    pub config: String,
    /// The configuration's validation error, if it has one.
    pub config_error: Option<String>,
    pub daemon: Option<DaemonState>,
    pub daemon_running: bool,
    /// Denied packets by rule (`deny:lan`, `deny:router`, …).
    pub denied: BTreeMap<String, Count>,
    pub denied_total: u64,
    pub ports: Vec<PortState>,
    /// The kill switch as stored (the kernel follows it while Cage's tables are in).
    pub isolation: Option<isolation::State>,
    /// Whether the kernel's policy has the segment in its `isolated` set right now.
    pub kernel_isolated: bool,
    /// The last kill-switch events, oldest first.
    pub audit: Vec<isolation::AuditEntry>,
    /// The last `cage selftest` (`<log_dir>/selftest.json`), if one ran.
    pub selftest: Option<crate::selftest::Last>,
    /// The flow log's totals and losses.
    pub flow_log: Option<flows::LogStats>,
    /// What the DNS forwarder counted (queries, refusals, limit violations), when DNS goes
    /// through Cage.
    pub dns: Option<crate::dns::DnsStats>,
    /// The IPFIX export's counts (records, messages, losses), when `export.ipfix` is set.
    pub ipfix: Option<crate::ipfix::Stats>,
    /// The eBPF program: its counters and the kill switch's flag, when it is pinned.
    pub ebpf: Option<EbpfStatus>,
    /// Denied packets not logged because they were over the kernel's log rate limit.
    pub unlogged: u64,
    /// Where the agent's machine plugs in and the owner's way in (`cage port`).
    pub ai_port: Option<crate::aiport::Report>,
    /// Where the web page is served now (`web_listen`, the LAN's addresses resolved).
    pub web: Vec<String>,
    /// The certificate the web page presents: its file and SHA-256 fingerprint, to
    /// compare with what the browser shows. None before `cage run` first made Cage's own
    /// or when it cannot be read (then a problem says why).
    pub web_cert: Option<WebCert>,
    /// The caged machines as the layer-2 bindings know them: each MAC, its port and
    /// the addresses bound to it.
    pub machines: Vec<Machine>,
    pub problems: Vec<String>,
    /// The syslog exporter's counters (`export.syslog`), as `cage run` last wrote them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub syslog: Option<crate::syslog::Stats>,
}

/// The web page's certificate, as `cage status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WebCert {
    pub path: String,
    /// SHA-256 of the certificate, `AB:CD:…`.
    pub fingerprint: String,
    /// SHA-256 of its public key, base64 (`curl --pinnedpubkey sha256//…`).
    pub spki_sha256: String,
}

/// The web page's certificate, or the problem with it. Cage's own not made yet is no
/// problem: `cage run` makes it when it starts the page.
fn web_cert(cfg: &config::Config, problems: &mut Vec<String>) -> Option<WebCert> {
    let (cert, key, own) = crate::cert::paths(cfg);
    if own && !cert.exists() && !key.exists() {
        return None;
    }
    match crate::cert::load(cfg) {
        Ok(id) => Some(WebCert {
            path: cert.display().to_string(),
            fingerprint: id.fingerprint,
            spki_sha256: id.spki_sha256,
        }),
        Err(e) => {
            problems.push(format!(
                "{e}; cage run keeps serving the certificate it had, if it had one, and the \
                 page is off otherwise"
            ));
            None
        }
    }
}

/// One caged machine: a MAC bound to a port, and the addresses bound to that MAC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Machine {
    pub mac: String,
    /// `None` when only an address names the MAC (its port binding ended first).
    pub port: Option<String>,
    /// (address, seconds its binding has left unused).
    pub addresses: Vec<(std::net::IpAddr, u32)>,
    /// Seconds the MAC's binding to its port has left unused.
    pub left: Option<u32>,
}

/// The bindings grouped by machine (MAC), in MAC order.
pub fn machines(b: &crate::policy::Bindings) -> Vec<Machine> {
    let mut by_mac: BTreeMap<String, Machine> = BTreeMap::new();
    let entry = |by_mac: &mut BTreeMap<String, Machine>, mac: &str| {
        by_mac
            .entry(mac.to_ascii_lowercase())
            .or_insert_with(|| Machine {
                mac: mac.to_ascii_lowercase(),
                port: None,
                addresses: vec![],
                left: None,
            })
            .clone()
    };
    for (mac, port, left) in &b.macs {
        let mut m = entry(&mut by_mac, mac);
        m.port = Some(port.clone());
        m.left = Some(*left);
        by_mac.insert(m.mac.clone(), m);
    }
    for (addr, mac, left) in &b.addrs {
        let mut m = entry(&mut by_mac, mac);
        m.addresses.push((*addr, *left));
        m.addresses.sort();
        by_mac.insert(m.mac.clone(), m);
    }
    by_mac.into_values().collect()
}

#[derive(Debug, Serialize)]
pub struct EbpfStatus {
    pub pin_dir: String,
    pub isolated_flag: bool,
    pub flows_in_map: usize,
    pub flow_capacity: u32,
    pub stats: crate::ebpf::Stats,
}

fn ebpf_status(cfg: &config::Config) -> Result<Option<EbpfStatus>, crate::ebpf::EbpfError> {
    let dir = cfg.pin_dir();
    if !crate::ebpf::is_pinned(&dir) {
        return Ok(None);
    }
    let maps = crate::ebpf::Maps::open(&dir)?;
    Ok(Some(EbpfStatus {
        pin_dir: dir.display().to_string(),
        isolated_flag: maps.isolated()?,
        flows_in_map: maps.flows()?.len(),
        flow_capacity: maps.flow_capacity()?,
        stats: maps.stats()?,
    }))
}

pub async fn gather(config_path: &Path) -> Status {
    let mut problems = Vec::new();
    let cfg = config::load(config_path);
    let config_error = cfg.as_ref().err().map(|e| e.to_string());
    let counters = match nft::counters() {
        Ok(c) => c,
        Err(e) => {
            problems.push(format!("cannot read Cage's tables: {e}"));
            None
        }
    };
    let enforcing = counters.is_some();
    let lockdown = counters
        .as_ref()
        .is_some_and(|c| c.contains_key(crate::policy::LOCKDOWN));
    if lockdown {
        problems.push(
            "LOCKED DOWN: cage run could not use the configuration at start and no policy \
             was in the kernel, so all traffic of the segment is dropped; fix the \
             configuration (cage check) and restart cage run"
                .into(),
        );
    }
    if !enforcing {
        problems.push("Cage's tables are not in the kernel: the segment is NOT caged".into());
    }
    let denied: BTreeMap<String, Count> = counters
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k.starts_with("deny:"))
        .collect();
    let denied_total = denied.values().map(|c| c.packets).sum();

    let (daemon, ports) = match &cfg {
        Ok(cfg) => {
            let state = running::load(&cfg.main.log_dir);
            let ports = match netlink::port_states(cfg).await {
                Ok(p) => p,
                Err(e) => {
                    problems.push(format!("cannot read the segment's ports: {e}"));
                    vec![]
                }
            };
            for p in &ports {
                if p.exists && !p.isolated {
                    problems.push(format!("port {} is not isolated", p.name));
                }
                if p.exists && !p.in_bridge {
                    problems.push(format!("port {} is not in {}", p.name, cfg.segment.bridge));
                }
            }
            (state, ports)
        }
        Err(_) => (None, vec![]),
    };
    let daemon_running = daemon.as_ref().is_some_and(|d| cage_running(d.pid));
    let kernel_isolated = nft::isolated_now().unwrap_or(false);
    let (isolation, audit) = match &cfg {
        Ok(cfg) => (Some(isolation::load(cfg)), isolation::audit_tail(cfg, 10)),
        Err(_) => (None, vec![]),
    };
    let flow_log = cfg.as_ref().ok().and_then(flows::read_stats);
    let syslog = cfg.as_ref().ok().and_then(crate::syslog::read_stats);
    let dns = cfg
        .as_ref()
        .ok()
        .filter(|c| c.dns.enabled)
        .and_then(crate::dns::read_stats);
    let ipfix = cfg.as_ref().ok().and_then(crate::ipfix::read_stats);
    let ebpf = match &cfg {
        Ok(c) => ebpf_status(c).unwrap_or_else(|e| {
            problems.push(format!("cannot read the eBPF maps: {e}"));
            None
        }),
        Err(_) => None,
    };
    match (&ebpf, &cfg) {
        (None, Ok(c)) if enforcing => problems.push(format!(
            "no eBPF program on {}: no flow counting, and the kill switch acts in nftables only",
            c.segment.bridge
        )),
        (Some(e), Ok(c)) if e.isolated_flag != isolation::load(c).isolated => {
            problems.push("the eBPF kill-switch flag differs from the kill switch's state".into())
        }
        _ => {}
    }
    let unlogged = nft::named_counter(crate::policy::UNLOGGED_COUNTER)
        .ok()
        .flatten()
        .map(|c| c.packets)
        .unwrap_or(0);
    if let Some(state) = &isolation {
        if state.isolated && enforcing && !kernel_isolated {
            problems.push(
                "the kill switch is on but the kernel's policy does not isolate the segment; \
                 run `cage isolate` again"
                    .into(),
            );
        }
    }
    let selftest = cfg
        .as_ref()
        .ok()
        .and_then(|c| crate::selftest::last(&c.main.log_dir));
    if let Some(last) = selftest.as_ref().filter(|l| !l.ok) {
        problems.push(format!("the last self-test failed: {}", last.verdict));
    }
    if let Some(e) = daemon.as_ref().and_then(|d| d.last_error.clone()) {
        if daemon_running {
            problems.push(format!("the daemon's last apply failed: {e}"));
        }
    }
    let ai_port = match &cfg {
        Ok(c) => match crate::aiport::show(c) {
            Ok(r) => {
                if !r.has_wired_ai_port() && r.layout != "standalone" {
                    problems.push(
                        "no wired AI port: a machine plugged into a LAN port is NOT caged \
                         (`cage port` says why and how to choose one)"
                            .into(),
                    );
                }
                Some(r)
            }
            Err(e) => {
                problems.push(format!("cannot tell the AI port: {e}"));
                None
            }
        },
        Err(_) => None,
    };
    let machines = nft::bindings().map(|b| machines(&b)).unwrap_or_else(|e| {
        problems.push(format!("cannot read the layer-2 bindings: {e}"));
        vec![]
    });
    let web = match &cfg {
        Ok(c) => match crate::listen::listen_addresses(c).await {
            Ok(addrs) => addrs.iter().map(crate::listen::url).collect(),
            Err(e) => {
                problems.push(format!(
                    "cannot read the LAN's addresses for the web page: {e}"
                ));
                vec![]
            }
        },
        Err(_) => vec![],
    };
    let web_cert = cfg.as_ref().ok().and_then(|c| web_cert(c, &mut problems));
    problems.extend(crate::offload::problems(Path::new(
        crate::offload::FIREWALL_CONFIG,
    )));
    Status {
        enforcing,
        lockdown,
        config: config_path.display().to_string(),
        config_error,
        daemon,
        daemon_running,
        denied,
        denied_total,
        ports,
        isolation,
        kernel_isolated,
        audit,
        selftest,
        flow_log,
        syslog,
        dns,
        ipfix,
        ebpf,
        unlogged,
        ai_port,
        web,
        web_cert,
        machines,
        problems,
    }
}

pub fn render_text(s: &Status) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "cage:    {}",
        if s.enforcing {
            "ENFORCING (the kernel holds the policy)"
        } else {
            "NOT ENFORCING"
        }
    );
    match &s.isolation {
        Some(st) if st.isolated => {
            let _ = writeln!(
                o,
                "switch:  ISOLATED (kill switch on{}{}) — `cage release` ends it",
                st.source.map(|s| format!(", by {s}")).unwrap_or_default(),
                if st.reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", st.reason)
                }
            );
        }
        _ => {
            let _ = writeln!(o, "switch:  off (the segment has its usual access)");
        }
    }
    let _ = writeln!(
        o,
        "config:  {}{}",
        s.config,
        if s.config_error.is_some() {
            " (INVALID, see below)"
        } else {
            " (valid)"
        }
    );
    match (&s.daemon, s.daemon_running) {
        (Some(d), true) => {
            let _ = writeln!(
                o,
                "daemon:  running, pid {}, {} apply(s), WAN {}",
                d.pid,
                d.applies,
                if d.wan_devices.is_empty() {
                    "none".into()
                } else {
                    d.wan_devices.join(", ")
                }
            );
        }
        _ if s.enforcing => {
            let _ = writeln!(
                o,
                "daemon:  not running (the policy in the kernel still holds)"
            );
        }
        _ => {
            let _ = writeln!(o, "daemon:  not running");
        }
    }
    if let Some(last) = &s.selftest {
        let _ = writeln!(o, "selftest: {}", last.line());
    }
    if let Some(r) = &s.ai_port {
        if r.layout != "standalone" {
            for line in r.lines() {
                let _ = writeln!(o, "{line}");
            }
        }
    }
    let _ = writeln!(
        o,
        "web:     {}",
        if s.web.is_empty() {
            "no LAN address yet".to_owned()
        } else {
            s.web.join(" ")
        }
    );
    match &s.web_cert {
        Some(c) => {
            let _ = writeln!(o, "web cert: SHA-256 {} ({})", c.fingerprint, c.path);
        }
        None => {
            let _ = writeln!(o, "web cert: none yet");
        }
    }
    for p in &s.ports {
        let _ = writeln!(
            o,
            "port:    {:<12} {}{}{}",
            p.name,
            if p.exists { "present" } else { "absent" },
            if p.in_bridge { ", in bridge" } else { "" },
            if p.isolated { ", isolated" } else { "" },
        );
    }
    for m in &s.machines {
        let addrs: Vec<String> = m.addresses.iter().map(|(a, _)| a.to_string()).collect();
        let _ = writeln!(
            o,
            "machine: {} on {}: {}",
            m.mac,
            m.port.as_deref().unwrap_or("(port binding ended)"),
            if addrs.is_empty() {
                "no address yet".to_owned()
            } else {
                addrs.join(", ")
            }
        );
    }
    let _ = writeln!(o, "denied:  {} packets", s.denied_total);
    for (k, c) in &s.denied {
        if c.packets > 0 {
            let _ = writeln!(o, "         {:<26} {:>10} packets", k, c.packets);
        }
    }
    match &s.flow_log {
        Some(f) => {
            let _ = writeln!(
                o,
                "flows:   {} records written; lost: {} rotated away unread, {} denied \
                 packets not handed over (NFLOG overruns {}), {} over the log rate limit, \
                 {} flows evicted from the eBPF map, {} new flows of hosts over their share \
                 of it, {} records over the flash budget",
                f.written,
                f.rotated_away,
                f.nflog_dropped,
                f.nflog_overruns,
                s.unlogged,
                f.ebpf_evicted,
                f.ebpf_over_share,
                f.persist_over_budget
            );
        }
        None => {
            let _ = writeln!(o, "flows:   no flow log yet (cage run writes it)");
        }
    }
    if let Some(x) = &s.syslog {
        let _ = writeln!(
            o,
            "syslog:  {} ({}): {} sent, {} dropped, {} errors, {} queued{}",
            x.collector,
            if x.connected {
                "connected"
            } else {
                "not connected"
            },
            x.sent,
            x.dropped,
            x.errors,
            x.queued,
            x.last_error
                .as_ref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        );
    }
    if let Some(d) = &s.dns {
        let _ = writeln!(
            o,
            "dns:     {} queries, {} forwarded; refused: {} not allow-listed, {} over the \
             rate limit, {} names too long; {} DoH names blocked; {} upstream failures; \
             {} limit violations",
            d.queries,
            d.forwarded,
            d.refused_not_allowed,
            d.refused_rate,
            d.refused_long,
            d.doh_blocked,
            d.upstream_failures,
            d.violations_total()
        );
        let mut hosts: Vec<_> = d.violations.iter().collect();
        hosts.sort_by(|a, b| b.1.cmp(a.1));
        for (h, n) in hosts.into_iter().take(5) {
            let _ = writeln!(o, "         {h:<26} {n:>10} violations");
        }
    }
    if let Some(x) = &s.ipfix {
        let _ = writeln!(
            o,
            "ipfix:   to {}: {} records in {} messages ({} template); lost: {} records in {} messages{}",
            x.collector,
            x.records,
            x.messages,
            x.templates,
            x.lost,
            x.lost_messages,
            x.last_error.as_deref().map(|e| format!(" (last error: {e})")).unwrap_or_default()
        );
    }
    if let Some(e) = &s.ebpf {
        let _ = writeln!(
            o,
            "ebpf:    {} flows in the map (of {}), {} created, {} not recorded (map full), \
             kill-switch flag {}",
            e.flows_in_map,
            e.flow_capacity,
            e.stats.flows_created,
            e.stats.flow_update_failed,
            if e.isolated_flag { "ON" } else { "off" }
        );
    }
    if !s.audit.is_empty() {
        let _ = writeln!(o, "audit:   (last {} kill-switch events)", s.audit.len());
        for a in &s.audit {
            let _ = writeln!(
                o,
                "         {} {:<8} {:<7} {:<16} {}{}",
                a.time,
                a.action,
                a.source,
                a.who,
                a.reason,
                if a.result == "ok" {
                    String::new()
                } else {
                    format!(" [{}]", a.result)
                }
            );
        }
    }
    if let Some(e) = &s.config_error {
        let _ = writeln!(o, "\n{e}");
    }
    for p in &s.problems {
        let _ = writeln!(o, "PROBLEM: {p}");
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_are_grouped_by_machine() {
        let b = crate::policy::Bindings {
            macs: vec![("02:CA:9E:00:00:11".into(), "cage1".into(), 3000)],
            addrs: vec![
                (
                    "fd00:cafe:10::11".parse().unwrap(),
                    "02:ca:9e:00:00:11".into(),
                    3500,
                ),
                (
                    "192.168.10.11".parse().unwrap(),
                    "02:ca:9e:00:00:11".into(),
                    3600,
                ),
                // An address whose MAC's port binding ended before it.
                (
                    "192.168.10.12".parse().unwrap(),
                    "02:ca:9e:00:00:12".into(),
                    100,
                ),
            ],
        };
        let m = machines(&b);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mac, "02:ca:9e:00:00:11");
        assert_eq!(m[0].port.as_deref(), Some("cage1"));
        assert_eq!(
            m[0].addresses,
            vec![
                ("192.168.10.11".parse().unwrap(), 3600),
                ("fd00:cafe:10::11".parse().unwrap(), 3500)
            ]
        );
        assert_eq!(m[1].port, None);
        assert_eq!(m[1].addresses.len(), 1);
    }
}
