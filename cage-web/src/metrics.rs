//! `GET /metrics`: Cage's state in Prometheus' text exposition format (version 0.0.4),
//! for an owner who scrapes many routers.
//!
//! Off (404) unless the configuration's `export` section names a token or scraper
//! networks ([`MetricsAccess`]). A scraper reads it with `Authorization: Bearer <token>`
//! or from an address in the allow-list, never with a session: Prometheus has none. A
//! wrong token counts as a failed login does ([`Gate`]), so the token cannot be guessed
//! at the speed of the network. The page's listener is on the LAN only, so neither the
//! page nor this is reachable from the segment.
//!
//! The values come from the agent as plain data ([`Metrics`]); rendering them is this
//! module's. Every label value is escaped, and the per-host series are bounded
//! ([`MAX_HOSTS`], the rest summed in `host="other"`), so a caged host that makes up
//! thousands of MACs or addresses cannot make a scrape grow without end.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::backend::{CageState, SelfTest};
use crate::session::Limiter;
use crate::{AppState, WebError};

/// The content type of the text format, version 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Hosts with series of their own at most; the bytes of any further host are summed
/// in `host="other"`.
pub const MAX_HOSTS: usize = 64;

/// Rules with series of their own at most (the policy has a few dozen).
const MAX_RULES: usize = 256;

/// Who may read `/metrics` (`config export`'s `metrics_token`, `metrics_allow`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsAccess {
    /// A scraper that sends `Authorization: Bearer <token>` may read.
    pub token: Option<String>,
    /// Scrapers from these networks (address, prefix length) may read without it.
    pub allow: Vec<(IpAddr, u8)>,
}

impl MetricsAccess {
    /// Whether `ip` is in one of the allowed networks. An IPv4-mapped IPv6 address is
    /// taken as the IPv4 address it is.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.allow
            .iter()
            .any(|&(net, len)| in_network(ip, net, len))
    }
}

fn in_network(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) if len <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) if len <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// Bytes the flow log recorded for one caged host since `cage run` started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostBytes {
    /// The host's MAC, or its address when the records had no MAC.
    pub host: String,
    /// From the host (`bytes_out` of its records) and to it (`bytes_in`).
    pub up: u64,
    pub down: u64,
}

/// The daemon as `cage status` sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DaemonHealth {
    /// A live `cage run` wrote the state file.
    pub running: bool,
    /// Unix seconds.
    pub started: u64,
    pub last_apply: Option<u64>,
    /// The last apply (or re-apply) was refused or failed.
    pub last_apply_failed: bool,
    pub applies: u64,
    /// How it notices changes: `listen` (the kernel's announcements), `partial` (one of
    /// them could not be opened, so it also reads every 2 s) or `poll`.
    pub monitors: Option<String>,
}

/// What the DNS forwarder counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsCounts {
    pub queries: u64,
    pub forwarded: u64,
    /// (reason, count): `not_allowed`, `rate`, `long`, `doh`, `malformed`.
    pub refused: Vec<(String, u64)>,
    /// (cause, count): `upstream`, `allow_set`.
    pub failures: Vec<(String, u64)>,
}

/// Everything `/metrics` shows, as the agent knows it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metrics {
    pub state: CageState,
    pub isolated: bool,
    /// Who pressed the kill switch last (`cli`, `web`, `button`, `auto`), if anyone.
    pub isolation_source: Option<String>,
    /// Unix seconds of the last press or release (0: never).
    pub isolation_since: u64,
    /// Cage's tables are in the kernel.
    pub enforcing: bool,
    /// Flow records written since the log was created.
    pub flows: u64,
    /// (rule, packets, bytes) the policy denied.
    pub blocked: Vec<(String, u64, u64)>,
    /// (cause, records or packets) lost.
    pub lost: Vec<(String, u64)>,
    pub dns: Option<DnsCounts>,
    /// The hosts with series of their own, and the sum of the others.
    pub hosts: Vec<HostBytes>,
    pub hosts_other: (u64, u64),
    pub daemon: Option<DaemonHealth>,
    pub selftest: Option<SelfTest>,
    /// (flows in the eBPF map, its capacity), when the program is pinned.
    pub ebpf_map: Option<(u64, u64)>,
}

/// A label value as the text format wants it: backslash, double quote and line feed
/// escaped.
pub fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The text format, one family after the other.
struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape_label(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: u64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

/// The per-host bytes with at most [`MAX_HOSTS`] hosts of their own (in host order),
/// the rest added to `other`.
fn bounded_hosts(m: &Metrics) -> (Vec<&HostBytes>, (u64, u64)) {
    let mut hosts: Vec<&HostBytes> = m.hosts.iter().collect();
    hosts.sort_by(|a, b| a.host.cmp(&b.host));
    let mut other = m.hosts_other;
    for h in hosts.iter().skip(MAX_HOSTS) {
        other.0 = other.0.saturating_add(h.up);
        other.1 = other.1.saturating_add(h.down);
    }
    hosts.truncate(MAX_HOSTS);
    (hosts, other)
}

/// `m` in the text exposition format.
pub fn render(m: &Metrics) -> String {
    let mut t = Text(String::with_capacity(8192));
    let b = u64::from;

    t.one(
        "cage_enforcing",
        "gauge",
        "Whether Cage's nftables tables are in the kernel (1) or not (0).",
        b(m.enforcing),
    );
    t.family(
        "cage_isolated",
        "gauge",
        "Whether the kill switch is on (1) or not (0); source is who pressed or released it last.",
    );
    let source = match m.isolation_source.as_deref() {
        None => "none",
        Some(s @ ("cli" | "web" | "button" | "auto")) => s,
        Some(_) => "other",
    };
    t.sample("cage_isolated", &[("source", source)], b(m.isolated));
    t.family(
        "cage_state",
        "gauge",
        "The cage's state: 1 for the one it is in (open, isolated or lockdown), 0 for the others.",
    );
    for s in [CageState::Open, CageState::Isolated, CageState::Lockdown] {
        t.sample("cage_state", &[("state", s.as_str())], b(m.state == s));
    }
    t.one(
        "cage_isolation_changed_timestamp_seconds",
        "gauge",
        "When the kill switch was last pressed or released (Unix seconds; 0: never).",
        m.isolation_since,
    );
    t.one(
        "cage_flows_total",
        "counter",
        "Flow records written since the flow log was created.",
        m.flows,
    );

    let mut blocked: Vec<&(String, u64, u64)> = m.blocked.iter().collect();
    blocked.sort();
    blocked.truncate(MAX_RULES);
    t.family(
        "cage_blocked_packets_total",
        "counter",
        "Packets the policy denied, by rule (the blocked attempts).",
    );
    for (rule, packets, _) in &blocked {
        t.sample("cage_blocked_packets_total", &[("rule", rule)], *packets);
    }
    t.family(
        "cage_blocked_bytes_total",
        "counter",
        "Bytes of the packets the policy denied, by rule.",
    );
    for (rule, _, bytes) in &blocked {
        t.sample("cage_blocked_bytes_total", &[("rule", rule)], *bytes);
    }

    t.family(
        "cage_lost_total",
        "counter",
        "Flow records or denied packets lost, by cause.",
    );
    for (cause, n) in &m.lost {
        t.sample("cage_lost_total", &[("cause", cause)], *n);
    }

    if let Some(dns) = &m.dns {
        t.one(
            "cage_dns_queries_total",
            "counter",
            "DNS queries from the segment to Cage's forwarder.",
            dns.queries,
        );
        t.one(
            "cage_dns_forwarded_total",
            "counter",
            "DNS queries forwarded upstream.",
            dns.forwarded,
        );
        t.family(
            "cage_dns_refused_total",
            "counter",
            "DNS queries refused or answered NXDOMAIN, by reason.",
        );
        for (reason, n) in &dns.refused {
            t.sample("cage_dns_refused_total", &[("reason", reason)], *n);
        }
        t.family(
            "cage_dns_failures_total",
            "counter",
            "DNS queries answered SERVFAIL, by cause.",
        );
        for (cause, n) in &dns.failures {
            t.sample("cage_dns_failures_total", &[("cause", cause)], *n);
        }
    }

    let (hosts, other) = bounded_hosts(m);
    t.family(
        "cage_host_bytes_total",
        "counter",
        "Bytes the flow log recorded for each caged host (MAC, or address without one) since cage run started, up (from the host) and down; hosts beyond the first 64 are summed in host=\"other\".",
    );
    for h in &hosts {
        t.sample(
            "cage_host_bytes_total",
            &[("host", &h.host), ("direction", "up")],
            h.up,
        );
        t.sample(
            "cage_host_bytes_total",
            &[("host", &h.host), ("direction", "down")],
            h.down,
        );
    }
    t.sample(
        "cage_host_bytes_total",
        &[("host", "other"), ("direction", "up")],
        other.0,
    );
    t.sample(
        "cage_host_bytes_total",
        &[("host", "other"), ("direction", "down")],
        other.1,
    );

    if let Some((in_map, capacity)) = m.ebpf_map {
        t.one(
            "cage_ebpf_flows",
            "gauge",
            "Flows in the eBPF program's map now.",
            in_map,
        );
        t.one(
            "cage_ebpf_flow_capacity",
            "gauge",
            "How many flows the eBPF program's map holds.",
            capacity,
        );
    }

    let d = m.daemon.clone().unwrap_or_default();
    t.one(
        "cage_daemon_up",
        "gauge",
        "Whether a live cage run wrote the daemon's state (1) or not (0).",
        b(d.running),
    );
    if m.daemon.is_some() {
        t.one(
            "cage_daemon_start_time_seconds",
            "gauge",
            "When cage run started (Unix seconds).",
            d.started,
        );
        t.one(
            "cage_applies_total",
            "counter",
            "Policies applied by this cage run (the first and every re-apply).",
            d.applies,
        );
        if let Some(at) = d.last_apply {
            t.one(
                "cage_last_apply_timestamp_seconds",
                "gauge",
                "When cage run last applied a policy (Unix seconds).",
                at,
            );
        }
        t.one(
            "cage_last_apply_ok",
            "gauge",
            "Whether the last apply of cage run succeeded (1) or was refused or failed (0).",
            b(!d.last_apply_failed),
        );
    }
    t.family(
        "cage_monitors",
        "gauge",
        "How cage run notices changes of the kernel's state: 1 for its mode (listen, partial or poll).",
    );
    let mode = d.monitors.as_deref().unwrap_or("unknown");
    for known in ["listen", "partial", "poll"] {
        t.sample("cage_monitors", &[("mode", known)], b(mode == known));
    }

    if let Some(st) = &m.selftest {
        t.one(
            "cage_selftest_timestamp_seconds",
            "gauge",
            "When the last self-test finished (Unix seconds).",
            st.finished_at,
        );
        t.one(
            "cage_selftest_passed",
            "gauge",
            "Whether the last self-test found the contract holding (1) or not (0).",
            b(st.ok),
        );
    }
    t.0
}

/// The bearer token of `Authorization: Bearer <token>`, if the request sent one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Whether `sent` is `token`, in a time that depends on the length of `token` only.
fn token_matches(sent: &str, token: &str) -> bool {
    let (sent, token) = (sent.as_bytes(), token.as_bytes());
    let mut diff = usize::from(sent.len() != token.len());
    for (i, t) in token.iter().enumerate() {
        diff |= usize::from(sent.get(i).copied().unwrap_or(0) ^ t);
    }
    diff == 0
}

/// How long an address that showed the right token is trusted to have it.
const TRUST: Duration = Duration::from_secs(15 * 60);
/// Addresses trusted at most (a LAN has a scraper or two).
const MAX_TRUSTED: usize = 64;

/// The backoff for wrong tokens: the login's ([`Limiter`]: per address, and for all
/// addresses together), of its own, so a misconfigured scraper does not slow the
/// owner's logins. An address that showed the right token within [`TRUST`] is not
/// slowed: it has the token, so it is not guessing it, and a second job on the same
/// Prometheus with a stale token must not take the working one down with it.
#[derive(Debug, Default)]
pub struct Gate {
    limiter: Limiter,
    trusted: HashMap<IpAddr, Instant>,
}

impl Gate {
    fn trusted(&mut self, ip: IpAddr, now: Instant) -> bool {
        self.trusted
            .retain(|_, at| now.saturating_duration_since(*at) < TRUST);
        self.trusted.contains_key(&ip)
    }

    /// `Err(wait)` while a token from `ip` must not be tried.
    pub fn check(&mut self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.trusted(ip, now) {
            return Ok(());
        }
        self.limiter.check(ip, now)
    }

    pub fn success(&mut self, ip: IpAddr, now: Instant) {
        self.limiter.success(ip);
        if self.trusted.len() >= MAX_TRUSTED && !self.trusted.contains_key(&ip) {
            if let Some(oldest) = self
                .trusted
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(k, _)| *k)
            {
                self.trusted.remove(&oldest);
            }
        }
        self.trusted.insert(ip, now);
    }

    pub fn failure(&mut self, ip: IpAddr, now: Instant) {
        if !self.trusted(ip, now) {
            self.limiter.failure(ip, now);
        }
    }
}

fn unauthorized(message: &str) -> Response {
    let mut r = WebError::new(StatusCode::UNAUTHORIZED, message.to_owned()).into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"cage metrics\""),
    );
    r
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<AppState>, req: Request) -> Response {
    let Some(access) = state.backend.metrics_access() else {
        return crate::security::not_found(req).await.into_response();
    };
    let (parts, _) = req.into_parts();
    let ip = crate::auth::client_ip(&parts).to_canonical();
    if !access.allows(ip) {
        let Some(sent) = bearer(&parts.headers) else {
            return unauthorized(
                "the metrics need Authorization: Bearer <cage.export.metrics_token>, or a \
                 scraper address in cage.export.metrics_allow",
            );
        };
        let now = Instant::now();
        let allowed = state.metrics_gate().check(ip, now);
        if let Err(wait) = allowed {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            let mut e = WebError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("too many wrong metrics tokens; try again in {secs} s"),
            );
            e.retry_after = Some(secs);
            return e.into_response();
        }
        let right = access
            .token
            .as_deref()
            .is_some_and(|t| token_matches(sent, t));
        if !right {
            state.metrics_gate().failure(ip, now);
            state
                .backend
                .event(&format!("metrics: wrong token from {ip}"));
            return unauthorized("wrong metrics token");
        }
        state.metrics_gate().success(ip, now);
    }
    match state.backend.metrics().await {
        Ok(m) => (
            [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))],
            render(&m),
        )
            .into_response(),
        Err(e) => WebError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        Metrics {
            state: CageState::Isolated,
            isolated: true,
            isolation_source: Some("cli".into()),
            isolation_since: 1_700_000_000,
            enforcing: true,
            flows: 42,
            blocked: vec![("deny:lan".into(), 3, 180), ("deny:router".into(), 1, 60)],
            lost: vec![("rotated_away".into(), 0), ("unlogged".into(), 2)],
            dns: Some(DnsCounts {
                queries: 10,
                forwarded: 8,
                refused: vec![("not_allowed".into(), 2)],
                failures: vec![("upstream".into(), 0)],
            }),
            hosts: vec![HostBytes {
                host: "02:ca:9e:00:00:11".into(),
                up: 100,
                down: 200,
            }],
            hosts_other: (0, 0),
            daemon: Some(DaemonHealth {
                running: true,
                started: 1_700_000_000,
                last_apply: Some(1_700_000_001),
                last_apply_failed: false,
                applies: 1,
                monitors: Some("listen".into()),
            }),
            selftest: Some(SelfTest {
                finished_at: 1_700_000_002,
                ok: true,
                verdict: "all hold".into(),
            }),
            ebpf_map: Some((5, 16384)),
        }
    }

    /// Every line is a comment of the two kinds, or `name{labels} value` with the
    /// labels well formed; every sample's family was declared once, before it.
    fn well_formed(text: &str) {
        let mut declared = std::collections::BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("name and type");
                assert!(["gauge", "counter"].contains(&kind), "{line}");
                assert!(declared.insert(name.to_owned()), "{name} declared twice");
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let name_end = line.find(['{', ' ']).expect("a name");
            let name = &line[..name_end];
            assert!(
                name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                "{line}"
            );
            assert!(declared.contains(name), "{name} sampled before its TYPE");
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<u64>().is_ok(), "{line}");
            if line[name_end..].starts_with('{') {
                let labels = &line[name_end + 1..line.rfind('}').unwrap()];
                // Walk the labels: k="v" with only \\, \" and \n escapes inside.
                let mut rest = labels;
                while !rest.is_empty() {
                    let (k, after) = rest.split_once("=\"").expect("k=\"");
                    assert!(k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
                    let mut chars = after.char_indices();
                    let end = loop {
                        match chars.next().expect("a closing quote") {
                            (_, '\\') => {
                                let (_, e) = chars.next().expect("an escape");
                                assert!(['\\', '"', 'n'].contains(&e), "{line}");
                            }
                            (i, '"') => break i,
                            (_, c) => assert_ne!(c, '\n'),
                        }
                    };
                    rest = after[end + 1..]
                        .strip_prefix(',')
                        .unwrap_or(&after[end + 1..]);
                }
            }
        }
    }

    #[test]
    fn the_text_format() {
        let text = render(&metrics());
        well_formed(&text);
        for line in [
            "# TYPE cage_isolated gauge",
            "cage_isolated{source=\"cli\"} 1",
            "cage_state{state=\"isolated\"} 1",
            "cage_state{state=\"open\"} 0",
            "# TYPE cage_flows_total counter",
            "cage_flows_total 42",
            "cage_blocked_packets_total{rule=\"deny:lan\"} 3",
            "cage_blocked_bytes_total{rule=\"deny:router\"} 60",
            "cage_lost_total{cause=\"unlogged\"} 2",
            "cage_dns_refused_total{reason=\"not_allowed\"} 2",
            "cage_host_bytes_total{host=\"02:ca:9e:00:00:11\",direction=\"up\"} 100",
            "cage_host_bytes_total{host=\"other\",direction=\"down\"} 0",
            "cage_daemon_up 1",
            "cage_monitors{mode=\"listen\"} 1",
            "cage_selftest_passed 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label(r#"a\b"c"#), r#"a\\b\"c"#);
        assert_eq!(escape_label("a\nb"), "a\\nb");
        let mut m = metrics();
        m.hosts[0].host = "evil\"} 1\ncage_isolated 0\n\\".into();
        m.blocked[0].0 = "deny:\"x\"\n".into();
        // An unknown source is not passed on as a label value at all.
        m.isolation_source = Some("made up\nsource".into());
        let text = render(&m);
        well_formed(&text);
        assert!(!text.lines().any(|l| l == "cage_isolated 0"), "{text}");
        assert!(
            text.contains(r#"host="evil\"} 1\ncage_isolated 0\n\\""#),
            "{text}"
        );
        assert!(text.contains("cage_isolated{source=\"other\"} 1"), "{text}");
    }

    #[test]
    fn at_most_64_hosts_and_the_rest_summed() {
        let mut m = metrics();
        m.hosts = (0..5000u64)
            .map(|i| HostBytes {
                host: format!("02:00:00:00:{:02x}:{:02x}", i >> 8, i & 0xff),
                up: 1,
                down: 2,
            })
            .collect();
        m.hosts_other = (10, 20);
        let text = render(&m);
        well_formed(&text);
        let series = text
            .lines()
            .filter(|l| l.starts_with("cage_host_bytes_total{"))
            .count();
        assert_eq!(series, 2 * (MAX_HOSTS + 1));
        assert!(text.contains(&format!(
            "cage_host_bytes_total{{host=\"other\",direction=\"up\"}} {}",
            10 + 5000 - MAX_HOSTS as u64
        )));
        assert!(text.contains(&format!(
            "cage_host_bytes_total{{host=\"other\",direction=\"down\"}} {}",
            20 + 2 * (5000 - MAX_HOSTS as u64)
        )));
        assert!(text.len() < 16 * 1024, "{} bytes", text.len());
    }

    #[test]
    fn networks_and_tokens() {
        let a = MetricsAccess {
            token: None,
            allow: vec![
                ("192.168.8.0".parse().unwrap(), 24),
                ("fd00:8::".parse().unwrap(), 64),
                ("10.0.0.5".parse().unwrap(), 32),
            ],
        };
        for ok in [
            "192.168.8.77",
            "::ffff:192.168.8.9",
            "fd00:8::1234",
            "10.0.0.5",
        ] {
            assert!(a.allows(ok.parse().unwrap()), "{ok}");
        }
        for no in ["192.168.9.1", "10.0.0.6", "fd00:9::1", "0.0.0.0", "::"] {
            assert!(!a.allows(no.parse().unwrap()), "{no}");
        }
        let all = MetricsAccess {
            token: None,
            allow: vec![("0.0.0.0".parse().unwrap(), 0)],
        };
        assert!(all.allows("203.0.113.1".parse().unwrap()));
        assert!(!all.allows("2001:db8::1".parse().unwrap()));
        assert!(token_matches("abcdefghijklmnop", "abcdefghijklmnop"));
        for no in [
            "abcdefghijklmnoq",
            "abcdefghijklmno",
            "abcdefghijklmnopq",
            "",
        ] {
            assert!(!token_matches(no, "abcdefghijklmnop"), "{no}");
        }
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer  tok ".parse().unwrap());
        assert_eq!(bearer(&h), Some("tok"));
        h.insert(header::AUTHORIZATION, "Basic dG9rOg==".parse().unwrap());
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn the_gate_slows_guessing_but_not_a_scraper_that_has_the_token() {
        let mut g = Gate::default();
        let now = Instant::now();
        let (guesser, scraper): (IpAddr, IpAddr) = (
            "192.168.8.66".parse().unwrap(),
            "192.168.8.10".parse().unwrap(),
        );
        g.success(scraper, now);
        for _ in 0..3 {
            assert!(g.check(guesser, now).is_ok());
            g.failure(guesser, now);
        }
        g.failure(guesser, now);
        assert!(g.check(guesser, now).is_err(), "the fourth failure waits");
        // Many failures make everyone wait (the global backoff), but the scraper that
        // showed the token, even when a stale job of it fails too.
        for i in 0..40u8 {
            let ip = IpAddr::from([192, 168, 8, 100 + (i % 100)]);
            g.failure(ip, now);
            g.failure(scraper, now);
        }
        assert!(g.check("192.168.8.250".parse().unwrap(), now).is_err());
        assert!(g.check(scraper, now).is_ok());
        // Trust ends: then its wrong tokens count as anyone's.
        let later = now + TRUST + Duration::from_secs(1);
        for _ in 0..4 {
            assert!(g.check(scraper, later).is_ok());
            g.failure(scraper, later);
        }
        assert!(g.check(scraper, later).is_err());
    }
}
