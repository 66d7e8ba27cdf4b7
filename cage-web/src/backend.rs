//! What the web page needs from the agent, as one trait and plain serde types.
//!
//! `cage-web` knows HTTP and nothing of the kernel; `cage-agent` implements [`Backend`]
//! with the real kill switch, flow log and configuration (`cage_agent::web`). The types
//! here are what the JSON API returns, so they are part of its contract.

use std::net::IpAddr;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub use crate::metrics::{Metrics, MetricsAccess};
pub use cage_common::records::{AuditEntry, FlowFilter, FlowRecord, RefusedName, Source};

/// Where the page may be reached: the addresses it listens on (the configured one, or
/// the LAN's as the router has them now), its port, and the names in
/// `list web_hostname`. A request whose Host header names anything else is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub addresses: Vec<IpAddr>,
    pub port: u16,
    pub hostnames: Vec<String>,
}

impl Access {
    /// The page's address as a person types it: the first listen address (IPv4 first)
    /// and the port, e.g. `192.168.8.1:2243` or `[fd00::1]:2243`.
    pub fn url_host(&self) -> String {
        match self.addresses.first() {
            Some(IpAddr::V4(a)) => format!("{a}:{}", self.port),
            Some(IpAddr::V6(a)) => format!("[{a}]:{}", self.port),
            None => format!("<the router's LAN address>:{}", self.port),
        }
    }
}

/// The kill switch as the page shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CageState {
    /// The contract applies: the segment reaches the internet and nothing else.
    Open,
    /// The kill switch is on: everything to and from the segment is dropped.
    Isolated,
    /// `cage run` found no usable configuration and no policy: the segment's bridge is
    /// locked down until a valid configuration is applied.
    Lockdown,
}

impl CageState {
    pub fn as_str(self) -> &'static str {
        match self {
            CageState::Open => "open",
            CageState::Isolated => "isolated",
            CageState::Lockdown => "lockdown",
        }
    }
}

/// The last `cage selftest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfTest {
    pub finished_at: u64,
    pub ok: bool,
    pub verdict: String,
}

/// `GET /api/state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub state: CageState,
    /// Whether the kill switch is on (also during a lockdown).
    pub isolated: bool,
    /// Why the kill switch was last pressed or released, when, from where and by whom.
    pub reason: String,
    pub since: u64,
    pub source: Option<String>,
    pub who: String,
    /// Whether Cage's tables are in the kernel.
    pub enforcing: bool,
    /// Flow records written since the log was created.
    pub flows: u64,
    /// Packets the policy denied (blocked attempts).
    pub blocked: u64,
    /// Records lost: rotated away unread, not handed over by the kernel, over the log's
    /// rate limit, evicted from the eBPF map, over the flash budget.
    pub lost: u64,
    pub selftest: Option<SelfTest>,
    /// What `cage status` calls problems.
    pub problems: Vec<String>,
}

/// What the agent knows of the segment besides the flow log, for telling machines apart:
/// the router's own addresses (never a caged host), the segment's networks, the layer-2
/// bindings as they are now and the DHCP leases. Grouping the flows by machine with it
/// is `cage-web`'s ([`crate::machines::group`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// The router's addresses on the segment (its configured ones and what the bridge
    /// has, link-local included).
    pub router: Vec<IpAddr>,
    /// The segment's networks as (network, prefix length): a caged host's own address is
    /// in one of them (or IPv6 link-local); any other source is spoofed.
    pub subnets: Vec<(IpAddr, u8)>,
    /// The layer-2 bindings now: each MAC, its bridge port, the addresses bound to it.
    pub bindings: Vec<Binding>,
    /// The DHCP server's leases: (MAC, address, host name).
    pub leases: Vec<(String, IpAddr, String)>,
}

/// One MAC as the layer-2 bindings know it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    pub mac: String,
    /// `None` when only an address names the MAC (its port binding ended first).
    pub port: Option<String>,
    pub addresses: Vec<IpAddr>,
}

/// Something the owner should look at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// Unix time, when known.
    pub time: Option<u64>,
    /// `auto-isolation`, `selftest`, `lost-records`, `dns-limits`, `neighbour` or `problem`.
    pub kind: String,
    pub text: String,
}

/// What the settings page edits, as text: the agent validates it with the same
/// validator and messages as the configuration file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// `cage.ai.address`, e.g. 192.168.10.1/24.
    pub address: String,
    /// `cage.ai.ipv6`.
    pub ipv6: bool,
    /// `cage.ai.address6`; empty: unset.
    pub address6: String,
    /// `cage.lan.admin_host`.
    pub admin_hosts: Vec<String>,
    /// `cage.killswitch.auto_blocked`, `auto_upload_bytes`, `auto_window`.
    pub auto_blocked: String,
    pub auto_upload_bytes: String,
    pub auto_window: String,
    /// `cage.main.web_hostname`.
    pub web_hostnames: Vec<String>,
}

/// Why the agent did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The request was refused as invalid (a setting the validator rejects): 422.
    #[error("{0}")]
    Refused(String),
    /// The agent could not do it (the kernel or the disk failed): 503.
    #[error("{0}")]
    Failed(String),
}

/// Where the agent's machine plugs in (`cage port`): the wired AI ports, the ports and
/// Wi-Fi that stay the owner's, and why the board got what it got.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AiPort {
    /// `single`, `multi`, `swconfig` (OpenWrt) or `standalone` (the configuration's
    /// ports, not changeable here).
    pub layout: String,
    /// (device, how a person finds it), e.g. ("eth1", "the LAN port").
    pub ai_ports: Vec<(String, String)>,
    pub lan_ports: Vec<String>,
    pub wifi_lan: Vec<String>,
    pub wifi_ai: Vec<String>,
    pub notes: Vec<String>,
}

impl AiPort {
    /// Whether the page may change it (OpenWrt only).
    pub fn changeable(&self) -> bool {
        self.layout != "standalone" && !self.layout.is_empty()
    }
}

/// An access point on the segment (the AI Wi-Fi), with its key: only the logged-in
/// owner's first-run page shows it, never the JSON API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AiWifi {
    pub ssid: String,
    /// The WPA passphrase; empty when the network has none.
    pub key: String,
    /// OpenWrt's `encryption` (`psk2`, `sae-mixed`, `none`, …).
    pub encryption: String,
    /// The SSID is not broadcast.
    pub hidden: bool,
    /// Its radio and the access point itself are switched on.
    pub enabled: bool,
}

/// The DNS review (Cage's forwarder): the egress mode, the allowed names, and the names
/// refused in allow-list mode, most recent first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Review {
    /// `off` (DNS does not go through Cage), `open` or `allowlist`.
    pub egress: String,
    pub allowed: Vec<String>,
    pub refused: Vec<RefusedName>,
}

/// The agent, as the web page sees it. Implementations must not panic: a panic in the
/// `cage` binary (built with `panic = "abort"`) would end the daemon.
pub trait Backend: Send + Sync + 'static {
    /// Where the page may be reached; called on every request, so it must be cheap.
    fn access(&self) -> Access;
    fn status(&self) -> BoxFuture<'_, Status>;
    fn isolate(&self, reason: String, who: String) -> BoxFuture<'_, Result<(), BackendError>>;
    fn release(&self, reason: String, who: String) -> BoxFuture<'_, Result<(), BackendError>>;
    /// The newest `limit` flows matching `filter`, oldest first (`limit` 0: all).
    fn flows(
        &self,
        filter: FlowFilter,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<FlowRecord>, BackendError>>;
    /// The segment as the agent knows it now, for grouping the flows by machine.
    fn segment(&self) -> BoxFuture<'_, Segment>;
    /// The last `n` audit entries, oldest first.
    fn audit(&self, n: usize) -> BoxFuture<'_, Vec<AuditEntry>>;
    fn alerts(&self) -> BoxFuture<'_, Vec<Alert>>;
    fn settings(&self) -> BoxFuture<'_, Result<Settings, BackendError>>;
    /// Validate and write all of `settings` at once, or nothing; then have the daemon
    /// apply them.
    fn apply_settings(&self, settings: Settings) -> BoxFuture<'_, Result<(), BackendError>>;
    /// The argon2 PHC string of the password, if one is set.
    fn password_hash(&self) -> BoxFuture<'_, Option<String>>;
    fn set_password_hash(&self, phc: String) -> BoxFuture<'_, Result<(), BackendError>>;
    /// The DNS review: names refused in allow-list mode.
    fn review(&self) -> BoxFuture<'_, Result<Review, BackendError>>;
    /// Allow a name (`list allow_domain`), validated like the file; the daemon reloads.
    /// The name as written.
    fn allow_name(&self, name: String, who: String) -> BoxFuture<'_, Result<String, BackendError>>;
    /// Where the agent's machine plugs in.
    fn ai_port(&self) -> BoxFuture<'_, Result<AiPort, BackendError>>;
    /// Make `choice` (a wired port's device name, or `none`) the AI port; refused
    /// (changing nothing) when the router has no such port or the change would leave the
    /// owner no way in.
    fn set_ai_port(
        &self,
        choice: String,
        who: String,
    ) -> BoxFuture<'_, Result<AiPort, BackendError>>;
    /// The access points on the segment, with their keys (none where Cage does not
    /// know of one, e.g. without OpenWrt's wireless configuration).
    fn ai_wifi(&self) -> BoxFuture<'_, Result<Vec<AiWifi>, BackendError>>;
    /// Run the self-test now (`cage selftest`) and store its result, as `cage run` does
    /// on its schedule; refused while another one runs. `who` is for the log.
    fn run_selftest(&self, who: String) -> BoxFuture<'_, Result<SelfTest, BackendError>>;
    /// Who may read `/metrics`; `None` while it is off (404). Called on every scrape,
    /// so it must be cheap.
    fn metrics_access(&self) -> Option<MetricsAccess> {
        None
    }
    /// What `/metrics` shows now.
    fn metrics(&self) -> BoxFuture<'_, Result<Metrics, BackendError>> {
        Box::pin(async { Err(BackendError::Failed("this agent has no metrics".into())) })
    }
    /// A security event for the agent's log (logins, failed logins, password changes).
    /// Events a client can cause at will are only reported while the login backoff lets
    /// it try, so this cannot flood the log.
    fn event(&self, message: &str) {
        let _ = message;
    }
    /// A login to the page from `who` (`web:<client address>`), or a failed one
    /// (`ok` false), for the audit log; bounded like [`Backend::event`].
    fn audit_login(&self, who: String, ok: bool) -> BoxFuture<'_, ()> {
        let _ = (who, ok);
        Box::pin(async {})
    }
}
