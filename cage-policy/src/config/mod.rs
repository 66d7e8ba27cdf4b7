//! Cage's configuration: UCI text in, a validated [`Config`] out.
//!
//! `uci` parses the text into a [`uci::RawConfig`] (sections and options with their line
//! numbers, nothing interpreted); `validate` turns that into a [`Config`] whose fields are
//! typed and checked, or into a list of [`ConfigError`]s that each name the section, the
//! option and the line, and say what would be accepted; `edit` changes the text line by
//! line. Nothing else in Cage reads the configuration text. Reading and writing the file
//! is `cage_agent::config`'s part.

pub mod edit;
pub mod phc;
pub mod uci;
pub mod validate;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Serialize;

pub use validate::{validate, ConfigError, ConfigErrors};

/// Where `cage` looks for its configuration when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/config/cage";

/// A validated configuration. Every field has been checked; code that holds a `Config`
/// never has to re-validate it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    pub main: Main,
    pub segment: Segment,
    pub lan: Lan,
    pub wan: Wan,
    pub killswitch: KillSwitch,
    pub flowlog: FlowLog,
    pub selftest: SelfTest,
    pub dns: Dns,
    pub limits: Limits,
    pub export: Export,
}

/// `config export 'export'`: what Cage sends to the owner's collectors. Every exporter
/// is off until its option is given; none of them can slow or stop the daemon (what
/// cannot be sent is counted and dropped).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Export {
    /// `syslog`: Cage's events as RFC 5424 messages to this collector.
    pub syslog: Option<SyslogExport>,
    /// `ipfix`: every flow record as IPFIX (RFC 7011) over UDP to this collector.
    pub ipfix: Option<IpfixExport>,
    /// `metrics_token`, `metrics_allow`: `/metrics` (Prometheus' text format) on the
    /// LAN listener; off while neither is given.
    pub metrics: MetricsExport,
}

/// How syslog messages travel (`udp://`, `tcp://`, `tls://` in `export.syslog`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyslogTransport {
    /// RFC 5426: one message a datagram.
    Udp,
    /// RFC 6587: octet-counted framing over TCP.
    Tcp,
    /// RFC 5425: octet-counted framing over TLS.
    Tls,
}

impl SyslogTransport {
    /// The port a collector listens on when the address gives none.
    pub fn default_port(self) -> u16 {
        match self {
            SyslogTransport::Udp | SyslogTransport::Tcp => 514,
            SyslogTransport::Tls => 6514,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyslogExport {
    pub transport: SyslogTransport,
    /// The collector's address and port.
    pub server: SocketAddr,
    /// `syslog_ca`: the certificate (PEM) that signed the collector's; TLS only, and
    /// required for it.
    pub ca_file: Option<PathBuf>,
    /// `syslog_name`: the name the collector's certificate must carry; TLS only. The
    /// collector's address when not given.
    pub server_name: Option<String>,
    /// `syslog_flows`: every flow record as a message too. Off by default.
    pub flows: bool,
    /// `syslog_queue`: messages kept while the collector cannot take them; the oldest
    /// are dropped (and counted) beyond it. Default 1024.
    pub queue: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IpfixExport {
    /// The collector's address and UDP port (4739 when the address gives none).
    pub collector: SocketAddr,
    /// `ipfix_template_interval`: seconds between template re-sends (RFC 7011 §8.4 for
    /// UDP). Default 60.
    pub template_interval: u32,
    /// `ipfix_domain`: the observation domain ID in every message header. Default 1.
    pub domain: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MetricsExport {
    /// `metrics_token`: a scraper that sends `Authorization: Bearer <token>` may read.
    #[serde(skip_serializing)]
    pub token: Option<String>,
    /// `metrics_allow`: scrapers from these networks may read without the token.
    pub allow: Vec<IpNet>,
}

impl MetricsExport {
    /// `/metrics` is served at all.
    pub fn enabled(&self) -> bool {
        self.token.is_some() || !self.allow.is_empty()
    }
}

/// `config limits 'limits'`: what one caged host may take of what the segment shares, and
/// how long the addresses it used stay its own. On with these defaults when the section
/// is absent: a hostile host on the segment is the threat model, not an option.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// Seconds a binding (a MAC to its port, an address to its MAC) lasts unused; while
    /// it lasts, frames from another port or MAC claiming it are dropped. Default 3600.
    pub bind_timeout: u32,
    /// New MACs a port may bring at once (burst), and then a minute. Frames from more
    /// are dropped before the bridge learns them. Defaults 4 and 4.
    pub macs_per_port: u32,
    pub new_macs_per_minute: u32,
    /// Connections (conntrack entries) one host may have at once; 0: a quarter of the
    /// router's conntrack table (`nf_conntrack_max`), at least 256. Default 0.
    pub conntrack_per_host: u32,
    /// New connections one host may open a second (burst as given). Defaults 200 and 1000.
    pub new_flows_per_second: u32,
    pub new_flows_burst: u32,
    /// DNS-over-TCP connections one host may hold open to Cage's forwarder. Default 16.
    pub dns_tcp_per_host: u32,
    /// Percent of the flow map (`flowlog.max_flows`) one host's flows may take; its
    /// flows beyond that are counted as lost, the others stay visible. Default 25.
    pub flow_share: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            bind_timeout: 3600,
            macs_per_port: 4,
            new_macs_per_minute: 4,
            conntrack_per_host: 0,
            new_flows_per_second: 200,
            new_flows_burst: 1000,
            dns_tcp_per_host: 16,
            flow_share: 25,
        }
    }
}

impl Limits {
    /// The per-host conntrack limit in force: the configured one, or a quarter of the
    /// router's table.
    pub fn conntrack_per_host(&self, conntrack_max: u32) -> u32 {
        match self.conntrack_per_host {
            0 => (conntrack_max / 4).max(256),
            n => n,
        }
    }
}

/// `config dns 'dns'`: DNS through the router (Cage's forwarder in `cage run`), names on
/// flows, the egress allow-list by domain and the DNS exfiltration limits. On when the
/// configuration has a `dns` section (and `enabled` is not '0').
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dns {
    pub enabled: bool,
    /// `open` (default): the internet is reachable as before, DNS only goes through Cage.
    /// `allowlist`: only addresses from answers to allowed names are reachable.
    pub egress: Egress,
    /// Allowed names, lower case; `*.example.com` is any name below example.com.
    pub allow_domains: Vec<String>,
    /// Where the forwarder sends queries; empty: the router's own resolver (127.0.0.1:53)
    /// and then the nameservers of /etc/resolv.conf.
    pub upstreams: Vec<SocketAddr>,
    /// The port the forwarder listens on, on the router's segment addresses; all port-53
    /// traffic from the segment is redirected there. Default 5354.
    pub listen_port: u16,
    /// Learned addresses stay in the allow sets at least this long (seconds). Default 60.
    pub ttl_floor: u32,
    /// Answer TTLs are cut to this (seconds), so a host never caches an address longer
    /// than the allow set keeps it. Default 3600.
    pub ttl_max: u32,
    /// Queries a second per caged host (token bucket); beyond it, REFUSED. Default 20.
    pub max_qps: u32,
    /// The bucket's size: queries a host may make at once. Default 40.
    pub burst: u32,
    /// Longest query name accepted (characters). Default 100.
    pub max_name_length: usize,
    /// DNS-over-HTTPS endpoints whose names are answered NXDOMAIN (`*.x` allowed).
    pub doh_block: Vec<String>,
    /// DoH endpoints by address: denied like any other blocked destination.
    pub doh_block_ips: Vec<IpAddr>,
    /// Isolate when one host has more than this many DNS limit violations within
    /// `killswitch.auto_window` seconds; 0 (default) is off.
    pub auto_violations: u32,
}

/// `dns.egress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    Open,
    Allowlist,
}

/// Well-known DNS-over-HTTPS endpoints, refused unless `list doh_block` replaces them.
pub const DEFAULT_DOH_BLOCK: &[&str] = &[
    "dns.google",
    "dns.google.com",
    "cloudflare-dns.com",
    "*.cloudflare-dns.com",
    "one.one.one.one",
    "1dot1dot1dot1.cloudflare-dns.com",
    "dns.quad9.net",
    "dns9.quad9.net",
    "dns10.quad9.net",
    "dns11.quad9.net",
    "doh.opendns.com",
    "doh.familyshield.opendns.com",
    "dns.adguard.com",
    "dns.adguard-dns.com",
    "*.dns.adguard-dns.com",
    "doh.cleanbrowsing.org",
    "dns.nextdns.io",
    "*.nextdns.io",
    "doh.mullvad.net",
    "dns.mullvad.net",
    "mozilla.cloudflare-dns.com",
    "use-application-dns.net",
    "chrome.cloudflare-dns.com",
    "doh.dns.sb",
    "dns.twnic.tw",
    "ordns.he.net",
];

impl Default for Dns {
    fn default() -> Self {
        Dns {
            enabled: false,
            egress: Egress::Open,
            allow_domains: Vec::new(),
            upstreams: Vec::new(),
            listen_port: 5354,
            ttl_floor: 60,
            ttl_max: 3600,
            max_qps: 20,
            burst: 40,
            max_name_length: 100,
            doh_block: DEFAULT_DOH_BLOCK.iter().map(|s| s.to_string()).collect(),
            doh_block_ips: Vec::new(),
            auto_violations: 0,
        }
    }
}

/// `config selftest 'selftest'`: when `cage run` proves the cage by itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SelfTest {
    /// Run `cage selftest` every this many minutes; 0 (default) never.
    pub interval_minutes: u32,
    /// Run it after every change of the applied policy. Off by default.
    pub after_change: bool,
    /// Internet destinations that must be reachable (`ADDR` pinged, `ADDR:PORT`
    /// connected to), as `cage selftest --target` takes them.
    pub targets: Vec<String>,
}

/// Where the LAN web page listens (`cage.main.web_listen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebListen {
    /// `lan:PORT`: every address of the LAN devices (`cage.lan.device`) as the router has
    /// them, read at run time and followed when they change, so the page comes up on
    /// whatever LAN address the firmware gives the router (OpenWrt's 192.168.1.1,
    /// GL.iNet's 192.168.8.1, the owner's own). Never an address inside the segment.
    Lan { port: u16 },
    /// `IP:PORT`: that address only.
    Address(SocketAddr),
}

/// The page's default port: one that no target firmware uses (OpenWrt's uhttpd has 80
/// and 443; GL.iNet's nginx 80 and 443 and its LuCI 8080 and 8443). 2243 is "CAGE" on a
/// phone's keypad.
pub const DEFAULT_WEB_PORT: u16 = 2243;

impl WebListen {
    pub fn port(&self) -> u16 {
        match self {
            WebListen::Lan { port } => *port,
            WebListen::Address(addr) => addr.port(),
        }
    }
}

impl std::fmt::Display for WebListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WebListen::Lan { port } => write!(f, "lan:{port}"),
            WebListen::Address(addr) => write!(f, "{addr}"),
        }
    }
}

impl std::str::FromStr for WebListen {
    type Err = String;
    /// As `web_listen` takes it: `lan:PORT` or `IP:PORT`, with the validator's message.
    fn from_str(s: &str) -> Result<WebListen, String> {
        validate::web_listen(s)
    }
}

impl Serialize for WebListen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `config cage 'main'`: where Cage keeps its own files and listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Main {
    /// Persistent state (kill-switch state, password hash, …). Default `/etc/cage`.
    pub state_dir: PathBuf,
    /// Logs (flow log, audit log). Default `/tmp/cage` (RAM on OpenWrt).
    pub log_dir: PathBuf,
    /// Where the LAN web page listens. Default `lan:2243`: every address the LAN
    /// devices have, read at run time.
    pub web_listen: WebListen,
    /// Where the eBPF program's maps and links are pinned (a bpffs), one directory per
    /// bridge below it. Default `/sys/fs/bpf/cage`.
    pub bpf_dir: PathBuf,
    /// Who makes the segment: Cage itself (standalone Linux), or netifd (OpenWrt).
    pub mode: Mode,
    /// The web page's password as an argon2 PHC string (`cage passwd`, or the page's
    /// first-run setup); `None` until one is set. Never printed.
    #[serde(skip_serializing)]
    pub password_hash: Option<String>,
    /// Host names the web page answers to besides its address (`list web_hostname`);
    /// a request naming any other host is refused (DNS rebinding).
    pub web_hostnames: Vec<String>,
    /// The web page's certificate (`web_cert` and `web_key`, both or neither).
    pub web_tls: WebTls,
    /// How much `cage` logs (`log_level`); `CAGE_LOG` overrides it. Default `info`.
    pub log_level: LogLevel,
}

/// Which certificate the web page presents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WebTls {
    /// Cage's own, self-signed, made at first start in the state directory (neither
    /// `web_cert` nor `web_key` set).
    Own,
    /// A certificate (PEM or DER, the server's first in a chain) and its private key
    /// from files the firmware already has: uhttpd's `/etc/uhttpd.crt` and
    /// `/etc/uhttpd.key`, or GL.iNet's nginx's.
    Files { cert: PathBuf, key: PathBuf },
}

/// `cage.main.log_level`: the least severe log line written. `debug` adds each DNS query
/// and the daemon's decisions; `trace` adds the debug lines of the libraries Cage uses
/// (netlink, BPF), which `debug` leaves out as noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warning,
    Info,
    Debug,
    Trace,
}

impl std::str::FromStr for LogLevel {
    type Err = String;
    /// As `log_level` and `CAGE_LOG` take it, with the validator's message.
    fn from_str(s: &str) -> Result<LogLevel, String> {
        match s {
            "error" => Ok(LogLevel::Error),
            "warning" => Ok(LogLevel::Warning),
            "info" => Ok(LogLevel::Info),
            "debug" => Ok(LogLevel::Debug),
            "trace" => Ok(LogLevel::Trace),
            _ => Err(format!(
                "'{}' is not a log level; give error, warning, info (the default), debug \
                 (also each DNS query and the daemon's decisions) or trace (also the \
                 libraries' debug lines)",
                uci::printable(s)
            )),
        }
    }
}

/// `cage.main.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// OpenWrt when `/etc/openwrt_release` exists, standalone otherwise.
    Auto,
    /// Cage creates the bridge, its addresses and port membership through rtnetlink.
    Standalone,
    /// netifd makes the segment from UCI (`network.cage`); Cage adopts the bridge and
    /// isolates its ports.
    OpenWrt,
}

impl Mode {
    /// `Auto` made definite: OpenWrt when `openwrt` (the agent looks for
    /// `/etc/openwrt_release`), standalone otherwise.
    pub fn resolve(self, openwrt: bool) -> Mode {
        match self {
            Mode::Auto if openwrt => Mode::OpenWrt,
            Mode::Auto => Mode::Standalone,
            m => m,
        }
    }
}

impl Config {
    /// The eBPF pin directory of the segment's bridge.
    pub fn pin_dir(&self) -> PathBuf {
        self.main.bpf_dir.join(&self.segment.bridge)
    }
}

/// `config segment 'ai'`: the AI segment, the cage itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Segment {
    /// Bridge device of the segment. Default `br-cage`.
    pub bridge: String,
    /// The router's IPv4 address on the segment with the segment's prefix, e.g. 192.168.10.1/24.
    pub address: Ipv4Net,
    /// IPv6 on the segment. When false, all IPv6 from the segment is dropped.
    pub ipv6: bool,
    /// The router's IPv6 address on the segment with its prefix; `Some` exactly when `ipv6`.
    pub address6: Option<Ipv6Net>,
    /// Member ports (devices Cage puts into the bridge and isolates from each other).
    pub ports: Vec<String>,
    /// VLAN id of the segment on trunk ports (OpenWrt mode); `None` for untagged.
    pub vlan: Option<u16>,
}

/// `config lan 'lan'`: the owner's LAN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Lan {
    /// LAN devices. Default `br-lan`.
    pub devices: Vec<String>,
    /// Hosts on the LAN that may open new connections into the segment.
    pub admin_hosts: Vec<IpAddr>,
}

/// `config wan 'wan'`: the upstream the router is plugged into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Wan {
    /// WAN devices, or detection from the default routes.
    pub devices: WanDevices,
    /// Masquerade segment traffic leaving through the WAN (fw4 does it on OpenWrt;
    /// Cage does it where nothing else does). Default on.
    pub masquerade: bool,
    /// Upstream networks denied to the segment in addition to the subnets of the
    /// WAN devices' own addresses, which are detected at apply time.
    pub upstream_subnets: Vec<IpNet>,
}

/// `config killswitch 'killswitch'`: the hardware button and automatic isolation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KillSwitch {
    /// The button that isolates, as OpenWrt's button hotplug names it (`BTN_0`, `reset`);
    /// `None`: no button.
    pub button: Option<String>,
    /// Whether the button's "released" event (a toggle switch moved back) releases.
    /// Off by default: releasing is done on purpose from the LAN.
    pub button_release: bool,
    /// Isolate when one caged host has more than this many blocked attempts towards the
    /// LAN or the router within `auto_window` seconds; 0 (default) is off.
    pub auto_blocked: u32,
    /// Isolate when one caged host sends more than this many bytes to the internet within
    /// `auto_window` seconds; 0 (default) is off.
    pub auto_upload_bytes: u64,
    /// The window of both automatic rules, in seconds (1 to 3600, default 10).
    pub auto_window: u32,
}

/// `config flowlog 'flowlog'`: the flow log's sizes and timeouts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FlowLog {
    /// Flows tracked at once in the kernel (the eBPF map's size); beyond it new flows
    /// are counted as lost. Default 16384.
    pub max_flows: u32,
    /// A flow without packets for this many seconds has ended. Default 15.
    pub idle_timeout: u32,
    /// A long flow is written out (and continues as a new record) after this many
    /// seconds, as NetFlow does. Default 300.
    pub active_timeout: u32,
    /// The flow log file is rotated at this size. Default 4 MiB.
    pub log_max_bytes: u64,
    /// Rotated files kept (on RAM by default, in `<log_dir>/flows`). Default 4.
    pub log_files: u32,
    /// How the eBPF program is attached to the bridge. Default `auto`.
    pub attach: Attach,
    /// A persistent directory (flash) the flow log is copied to in batches; none by
    /// default (the log lives in `log_dir`, RAM on OpenWrt).
    pub persist_dir: Option<PathBuf>,
    /// Minutes between two batched copies. Default 15.
    pub persist_interval: u32,
    /// Bytes the copies may write a day; what does not fit is counted. Default 8 MiB.
    pub persist_budget: u64,
}

/// `flowlog.attach`: TCX where the kernel has it (6.6+), clsact through netlink
/// otherwise; either can be forced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Attach {
    Auto,
    Tcx,
    Netlink,
}

impl Default for FlowLog {
    fn default() -> Self {
        FlowLog {
            max_flows: 16384,
            idle_timeout: 15,
            active_timeout: 300,
            log_max_bytes: 4 << 20,
            log_files: 4,
            attach: Attach::Auto,
            persist_dir: None,
            persist_interval: 15,
            persist_budget: 8 << 20,
        }
    }
}

impl Default for KillSwitch {
    fn default() -> Self {
        KillSwitch {
            button: None,
            button_release: false,
            auto_blocked: 0,
            auto_upload_bytes: 0,
            auto_window: 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WanDevices {
    /// The devices of the IPv4 and IPv6 default routes, looked up at apply time.
    Auto,
    List(Vec<String>),
}

impl Segment {
    /// The segment's IPv4 subnet (the address with host bits cleared).
    pub fn subnet4(&self) -> Ipv4Net {
        self.address.trunc()
    }
    /// The segment's IPv6 subnet, when IPv6 is on.
    pub fn subnet6(&self) -> Option<Ipv6Net> {
        self.address6.map(|a| a.trunc())
    }
    pub fn router4(&self) -> Ipv4Addr {
        self.address.addr()
    }
    pub fn router6(&self) -> Option<Ipv6Addr> {
        self.address6.map(|a| a.addr())
    }
}

/// Parse and validate configuration text.
pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
    let raw = uci::parse(text).map_err(|e| ConfigErrors(vec![e]))?;
    validate(&raw)
}
