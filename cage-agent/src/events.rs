//! Cage's events for whoever exports them: the daemon, the flow log, the web page and the
//! self-test call [`emit`] without knowing who listens. Without a listener (no
//! `export.syslog` configured) an event costs one atomic load: callers on a hot path
//! (every blocked packet) ask [`active`] before they build one.
//!
//! It depends on nothing of Cage's but `nflog`'s `Denied` (which it turns into an event),
//! so every module can emit. The listener (the
//! syslog exporter, `crate::syslog`) installs itself with [`set_sink`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use cage_common::records::FlowRecord;

/// What happened, as a syslog MSGID (RFC 5424 §6.2.7: printable ASCII, at most 32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The kill switch was pressed (an audit-log line with `action` `isolate`).
    Isolate,
    /// The kill switch was released.
    Release,
    /// Another audit-log line.
    Audit,
    /// Packets from the segment that the policy denied (rate-bounded by the exporter).
    Blocked,
    /// Records or packets the flow log could not keep.
    Lost,
    /// A self-test's result.
    Selftest,
    /// A configuration applied (an audit-log line).
    Applied,
    /// A configuration refused (or failing to apply); the running policy stays.
    Refused,
    /// A login to the web page (an audit-log line).
    Login,
    /// A failed login to the web page (an audit-log line).
    LoginFailed,
    /// Another security event of the web page (a password set or changed).
    Web,
    /// A flow record (`syslog_flows`).
    Flow,
    /// `cage run` stops (the policy stays in the kernel).
    Stopped,
}

impl Kind {
    pub fn msgid(self) -> &'static str {
        match self {
            Kind::Isolate => "ISOLATE",
            Kind::Release => "RELEASE",
            Kind::Audit => "AUDIT",
            Kind::Blocked => "BLOCKED",
            Kind::Lost => "LOST",
            Kind::Selftest => "SELFTEST",
            Kind::Applied => "CONFIG_APPLIED",
            Kind::Refused => "CONFIG_REFUSED",
            Kind::Login => "LOGIN",
            Kind::LoginFailed => "LOGIN_FAILED",
            Kind::Web => "WEB",
            Kind::Flow => "FLOW",
            Kind::Stopped => "STOPPED",
        }
    }
}

/// Syslog severities (RFC 5424 §6.2.1) that Cage uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Alert = 1,
    Error = 3,
    Warning = 4,
    Notice = 5,
    Info = 6,
}

/// One event: its kind, a sentence for people, and named fields for machines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: Kind,
    pub severity: Severity,
    pub msg: String,
    /// Named values, in order (`host`, `mac`, `peer`, `rule`, …).
    pub params: Vec<(String, String)>,
}

impl Event {
    pub fn new(kind: Kind, severity: Severity, msg: impl Into<String>) -> Event {
        Event {
            kind,
            severity,
            msg: msg.into(),
            params: Vec::new(),
        }
    }

    /// The event with one more field.
    pub fn with(mut self, name: &str, value: impl ToString) -> Event {
        self.params.push((name.to_owned(), value.to_string()));
        self
    }

    /// The value of a field, if it has one.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// An event of the web page (`Backend::event`'s sentence) that the audit log does
    /// not have (a password set or changed), with the client's address as `client` where
    /// the sentence names one. Logins and failed logins are audit-log lines, which the
    /// exporter forwards with their hash chain: None for those.
    pub fn web(message: &str) -> Option<Event> {
        if message.contains("login from") {
            return None;
        }
        let mut e = Event::new(Kind::Web, Severity::Notice, message);
        let client = message
            .split(' ')
            .map(|w| w.trim_end_matches([';', ',']))
            .find(|w| w.parse::<std::net::IpAddr>().is_ok());
        if let Some(c) = client {
            e = e.with("client", c);
        }
        Some(e)
    }
}

/// Who takes the events: the exporter.
pub trait Sink: Send + Sync {
    fn event(&self, e: Event);
    /// Flow records as they are written to the flow log (the sink decides whether it
    /// wants them).
    fn flows(&self, records: &[FlowRecord]);
}

static ACTIVE: AtomicBool = AtomicBool::new(false);
static SINK: RwLock<Option<Arc<dyn Sink>>> = RwLock::new(None);

/// Install (or with `None` remove) the listener.
pub fn set_sink(sink: Option<Arc<dyn Sink>>) {
    let on = sink.is_some();
    *SINK.write().unwrap_or_else(|p| p.into_inner()) = sink;
    ACTIVE.store(on, Ordering::Release);
}

/// Whether anyone listens: the cheap question before building an event on a hot path.
pub fn active() -> bool {
    ACTIVE.load(Ordering::Acquire)
}

/// Hand an event to the listener, if there is one. Never blocks on the network: the
/// listener queues it.
pub fn emit(e: Event) {
    if !active() {
        return;
    }
    let sink = SINK.read().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(s) = sink {
        s.event(e);
    }
}

/// Hand the flow records just written to the listener, if there is one.
pub fn flows(records: &[FlowRecord]) {
    if !active() || records.is_empty() {
        return;
    }
    let sink = SINK.read().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(s) = sink {
        s.flows(records);
    }
}

/// Flow records or denied packets the flow log lost (`cause`: `nflog`, `ebpf_evicted`).
pub fn lost(line: &str, cause: &str, count: u64) -> Event {
    Event::new(Kind::Lost, Severity::Warning, line)
        .with("cause", cause)
        .with("count", count)
}

/// A self-test's result: passed, failed (`Severity::Alert`), or could not run.
pub fn selftest(why: &str, result: Result<(bool, &str), String>) -> Event {
    let (severity, ok, text) = match result {
        Ok((true, v)) => (Severity::Info, "1", v.to_owned()),
        Ok((false, v)) => (Severity::Alert, "0", v.to_owned()),
        Err(e) => (Severity::Alert, "0", format!("could not run: {e}")),
    };
    Event::new(
        Kind::Selftest,
        severity,
        format!("self-test ({why}): {text}"),
    )
    .with("why", why)
    .with("ok", ok)
}

/// A packet the policy denied, as an event (`host` its source, `peer` its destination).
pub fn blocked(d: &crate::nflog::Denied) -> Event {
    let proto = match d.proto {
        1 => "icmp".to_owned(),
        6 => "tcp".to_owned(),
        17 => "udp".to_owned(),
        58 => "icmpv6".to_owned(),
        p => p.to_string(),
    };
    let port = |p: Option<u16>| p.map(|p| format!(":{p}")).unwrap_or_default();
    let mut e = Event::new(
        Kind::Blocked,
        Severity::Notice,
        format!(
            "blocked {proto} {}{} -> {}{} ({})",
            d.src,
            port(d.sport),
            d.dst,
            port(d.dport),
            d.rule
        ),
    )
    .with("host", d.src)
    .with("peer", d.dst)
    .with("proto", proto)
    .with("rule", &d.rule);
    if let Some(p) = d.dport {
        e = e.with("peer_port", p);
    }
    if let Some(m) = d.mac {
        let mac: Vec<String> = m.iter().map(|b| format!("{b:02x}")).collect();
        e = e.with("mac", mac.join(":"));
    }
    e.with("bytes", d.len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_web_pages_sentences_are_events_unless_the_audit_log_has_them() {
        assert_eq!(Event::web("web page: failed login from 192.168.1.20"), None);
        assert_eq!(Event::web("web page: login from fd00::5"), None);
        let e =
            Event::web("web page: the password was changed from 10.0.0.2; other sessions ended")
                .expect("not audited");
        assert_eq!(e.kind, Kind::Web);
        assert_eq!(e.param("client"), Some("10.0.0.2"));
    }
}
