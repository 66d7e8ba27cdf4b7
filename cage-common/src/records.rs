//! The records Cage writes to its logs and serves on its page, defined once: a flow of
//! the flow log, an entry of the kill switch's audit log, a name the DNS forwarder
//! refused. The agent writes them (JSON Lines, JSON) and the web crate serves them (JSON,
//! CSV) with these very types, so a field added here is in the file, the API and the
//! downloads alike (`cage-web` has a test that the CSV carries every field).
//!
//! User space only: with the `serde` feature (which needs `alloc`); the eBPF program
//! never sees these.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::net::IpAddr;

use serde::{Deserialize, Serialize};

/// One flow, as written to the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// First and last packet, RFC 3339 UTC with milliseconds.
    pub start: String,
    pub end: String,
    /// `allowed` or `blocked`.
    pub verdict: String,
    /// The rule that blocked it (`deny:lan`, …); none for an allowed flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// `tcp`, `udp`, `icmp`, `icmpv6`, or the protocol number.
    pub proto: String,
    /// The caged host.
    pub host: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The segment bridge's port the caged host's MAC was bound to when the record was
    /// written (`eth1`, `wlan1`): with `mac`, which machine it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge_port: Option<String>,
    /// The other end.
    pub peer: IpAddr,
    /// The peer's port (for ICMP, the type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_port: Option<u16>,
    /// `out` when the caged host spoke first, `in` when the peer did.
    pub direction: String,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    /// `selftest` for the probe traffic of `cage selftest` (known by its MAC prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// TCP flags seen, from the caged host / to it (`SAF/SAF`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_flags: Option<String>,
    /// The caged host's name from its DHCP lease, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The DNS name the caged host resolved to reach the peer (the name it asked for,
    /// whatever CNAMEs led there), when Cage's forwarder saw the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Which flows: the filters of `cage flows`, of `GET /api/flows` and of the flows page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowFilter {
    pub host: Option<IpAddr>,
    pub port: Option<u16>,
    /// `allowed` or `blocked`.
    pub verdict: Option<String>,
}

impl FlowFilter {
    pub fn matches(&self, r: &FlowRecord) -> bool {
        self.host.is_none_or(|h| r.host == h || r.peer == h)
            && self
                .port
                .is_none_or(|p| r.peer_port == Some(p) || r.host_port == Some(p))
            && self.verdict.as_ref().is_none_or(|v| &r.verdict == v)
    }
}

/// Who pressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Cli,
    Web,
    Button,
    Auto,
    /// `cage run` itself (the configuration it applied or refused).
    Daemon,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Cli => "cli",
            Source::Web => "web",
            Source::Button => "button",
            Source::Auto => "auto",
            Source::Daemon => "daemon",
        })
    }
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Unix time, seconds.
    pub time: u64,
    /// `isolate` or `release` (the kill switch); `config-applied` or `config-refused`
    /// (`cage run` at its start and on SIGHUP); `login` or `login-failed` (the web page).
    pub action: String,
    pub source: Source,
    pub reason: String,
    pub who: String,
    /// `ok`, or what went wrong (the state was still written); for `config-refused`
    /// the error, for `login-failed` why.
    pub result: String,
    /// The hash chain (`cage_agent::audit`): this line's place in the log, counted from
    /// 1 at the first chained line. None in lines of a Cage before the chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// SHA-256 of the line before this one in the file (its exact bytes, without the
    /// newline), lowercase hex; 64 zeros for the first line of a fresh log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<String>,
}

/// One refused name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedName {
    pub name: String,
    /// How often it was asked for and refused.
    pub count: u64,
    /// First and last refusal, RFC 3339.
    pub first: String,
    pub last: String,
    /// The caged hosts that asked (at most `cage_agent::dns::refused::MAX_HOSTS`).
    pub hosts: Vec<IpAddr>,
}
