//! `RawConfig` → `Config`: types, ranges, cross-checks, and errors that say where and what.
//!
//! Validation never stops at the first problem: every section and option is looked at,
//! and every error found is returned, sorted by line, so that one `cage check` shows all
//! that is wrong with a file.
//!
//! Places are written the way `uci show` writes them: `cage.ai.address` for a named
//! section, `cage.@segment[0].address` for an anonymous one (the index counts every
//! section of that type, named or not, as uci does).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::uci::{printable, RawConfig, RawOption};
use super::{
    Attach, Config, Dns, Egress, Export, FlowLog, IpfixExport, KillSwitch, Lan, Limits, LogLevel,
    Main, MetricsExport, Mode, Segment, SelfTest, SyslogExport, SyslogTransport, Wan, WanDevices,
    WebListen, WebTls,
};

/// One problem in a configuration, with its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Section name (or `@type[index]` for an anonymous one), if the error is in a section.
    pub section: Option<String>,
    /// Option name, if the error is about one option.
    pub option: Option<String>,
    /// 1-based line number in the file.
    pub line: usize,
    /// What is wrong and what would be accepted.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.section, &self.option) {
            (Some(s), Some(o)) => write!(f, "cage.{s}.{o} (line {}): {}", self.line, self.message),
            (Some(s), None) => write!(f, "cage.{s} (line {}): {}", self.line, self.message),
            _ => write!(f, "line {}: {}", self.line, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in a configuration (validation does not stop at the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "{n} error{} in configuration",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

// ---------------------------------------------------------------------------------------
// The schema: which section types exist and which options each takes.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arity {
    /// `option NAME VALUE`, at most once.
    One,
    /// `list NAME VALUE`, any number of times (a lone `option` counts as a one-element
    /// list, as in uci).
    Many,
}

struct SectionType {
    kind: &'static str,
    /// What the section is called in the example configuration; only used to name a
    /// section that is missing from the file.
    usual_name: &'static str,
    options: &'static [(&'static str, Arity)],
}

const CAGE: SectionType = SectionType {
    kind: "cage",
    usual_name: "main",
    options: &[
        ("state_dir", Arity::One),
        ("log_dir", Arity::One),
        ("web_listen", Arity::One),
        ("bpf_dir", Arity::One),
        ("mode", Arity::One),
        ("password_hash", Arity::One),
        ("web_hostname", Arity::Many),
        ("web_cert", Arity::One),
        ("web_key", Arity::One),
        ("log_level", Arity::One),
    ],
};
const SEGMENT: SectionType = SectionType {
    kind: "segment",
    usual_name: "ai",
    options: &[
        ("bridge", Arity::One),
        ("address", Arity::One),
        ("ipv6", Arity::One),
        ("address6", Arity::One),
        ("port", Arity::Many),
        ("vlan", Arity::One),
    ],
};
const LAN: SectionType = SectionType {
    kind: "lan",
    usual_name: "lan",
    options: &[("device", Arity::Many), ("admin_host", Arity::Many)],
};
const WAN: SectionType = SectionType {
    kind: "wan",
    usual_name: "wan",
    options: &[
        ("device", Arity::Many),
        ("masquerade", Arity::One),
        ("upstream_subnet", Arity::Many),
    ],
};
const KILLSWITCH: SectionType = SectionType {
    kind: "killswitch",
    usual_name: "killswitch",
    options: &[
        ("button", Arity::One),
        ("button_release", Arity::One),
        ("auto_blocked", Arity::One),
        ("auto_upload_bytes", Arity::One),
        ("auto_window", Arity::One),
    ],
};
const FLOWLOG: SectionType = SectionType {
    kind: "flowlog",
    usual_name: "flowlog",
    options: &[
        ("max_flows", Arity::One),
        ("idle_timeout", Arity::One),
        ("active_timeout", Arity::One),
        ("log_max_bytes", Arity::One),
        ("log_files", Arity::One),
        ("attach", Arity::One),
        ("persist_dir", Arity::One),
        ("persist_interval", Arity::One),
        ("persist_budget", Arity::One),
    ],
};
const SELFTEST: SectionType = SectionType {
    kind: "selftest",
    usual_name: "selftest",
    options: &[
        ("interval", Arity::One),
        ("after_change", Arity::One),
        ("target", Arity::Many),
    ],
};
const DNS: SectionType = SectionType {
    kind: "dns",
    usual_name: "dns",
    options: &[
        ("enabled", Arity::One),
        ("egress", Arity::One),
        ("allow_domain", Arity::Many),
        ("upstream", Arity::Many),
        ("listen_port", Arity::One),
        ("ttl_floor", Arity::One),
        ("ttl_max", Arity::One),
        ("max_qps", Arity::One),
        ("burst", Arity::One),
        ("max_name_length", Arity::One),
        ("doh_block", Arity::Many),
        ("doh_block_ip", Arity::Many),
        ("auto_violations", Arity::One),
    ],
};
const LIMITS: SectionType = SectionType {
    kind: "limits",
    usual_name: "limits",
    options: &[
        ("bind_timeout", Arity::One),
        ("macs_per_port", Arity::One),
        ("new_macs_per_minute", Arity::One),
        ("conntrack_per_host", Arity::One),
        ("new_flows_per_second", Arity::One),
        ("new_flows_burst", Arity::One),
        ("dns_tcp_per_host", Arity::One),
        ("flow_share", Arity::One),
    ],
};
const EXPORT: SectionType = SectionType {
    kind: "export",
    usual_name: "export",
    options: &[
        ("syslog", Arity::One),
        ("syslog_ca", Arity::One),
        ("syslog_name", Arity::One),
        ("syslog_flows", Arity::One),
        ("syslog_queue", Arity::One),
        ("ipfix", Arity::One),
        ("ipfix_template_interval", Arity::One),
        ("ipfix_domain", Arity::One),
        ("metrics_token", Arity::One),
        ("metrics_allow", Arity::Many),
    ],
};
const TYPES: [&SectionType; 10] = [
    &CAGE,
    &SEGMENT,
    &LAN,
    &WAN,
    &KILLSWITCH,
    &FLOWLOG,
    &SELFTEST,
    &DNS,
    &LIMITS,
    &EXPORT,
];

pub const DEFAULT_STATE_DIR: &str = "/etc/cage";
const DEFAULT_LOG_DIR: &str = "/tmp/cage";
const DEFAULT_BPF_DIR: &str = "/sys/fs/bpf/cage";
const DEFAULT_WEB_LISTEN: WebListen = WebListen::Lan {
    port: super::DEFAULT_WEB_PORT,
};
const DEFAULT_BRIDGE: &str = "br-cage";
const DEFAULT_LAN_DEVICE: &str = "br-lan";

fn default_address() -> Ipv4Net {
    // A constant /24 always builds; the fallback only keeps this free of unwrap().
    Ipv4Net::new(Ipv4Addr::new(192, 168, 10, 1), 24).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Validation.

pub fn validate(raw: &RawConfig) -> Result<Config, ConfigErrors> {
    validate_reading(raw).0
}

/// [`validate`], and every option the validator asked for, by section type: the schema
/// test holds it to asking for every option the schema lists.
fn validate_reading(raw: &RawConfig) -> (Result<Config, ConfigErrors>, Reads) {
    let mut v = Validator::default();
    let [cage, segment, lan, wan, killswitch, flowlog, selftest, dns, limits, export] =
        v.sections(raw);

    // Section by section: every option parsed into its type on its own.
    let main = main_section(&mut v, &cage);
    let seg = segment_section(&mut v, &segment);
    let lan_options = lan_section(&mut v, &lan);
    let wan_options = wan_section(&mut v, &wan);
    let killswitch = killswitch_section(&mut v, &killswitch);
    let flowlog = flowlog_section(&mut v, &flowlog);
    let selftest = selftest_section(&mut v, &selftest);
    let dns = dns_section(&mut v, &dns);
    let limits = limits_section(&mut v, &limits);
    let export_at = export;
    let export = export_section(&mut v, &export_at);

    // Then between options that are each valid on their own.
    let placed = Placed {
        cage: &cage,
        segment: &segment,
        lan: &lan,
        wan: &wan,
    };
    cross_checks(&mut v, &placed, &main, &seg, &lan_options, &wan_options);
    ipfix_off_the_segment(&mut v, &export_at, &export, &seg.nets());

    let reads = std::mem::take(&mut v.reads);
    if !v.errors.is_empty() {
        let mut errors = v.errors;
        errors.sort_by_key(|e| e.line);
        return (Err(ConfigErrors(errors)), reads);
    }
    let config = Config {
        main: main.config(),
        segment: seg.config(),
        lan: lan_options.config(),
        wan: wan_options.config(),
        killswitch,
        flowlog,
        selftest,
        dns,
        limits,
        export,
    };
    (Ok(config), reads)
}

/// `config cage 'main'`, with what the cross-checks need of it.
struct MainOptions {
    state_dir: Scalar<PathBuf>,
    log_dir: Scalar<PathBuf>,
    web_listen: Scalar<WebListen>,
    bpf_dir: Scalar<PathBuf>,
    mode: Scalar<Mode>,
    password_hash: Scalar<Option<String>>,
    web_hostnames: Vec<Given<String>>,
    web_cert: Scalar<Option<PathBuf>>,
    web_key: Scalar<Option<PathBuf>>,
    log_level: Scalar<LogLevel>,
}

impl MainOptions {
    fn config(self) -> Main {
        Main {
            state_dir: self.state_dir.value,
            log_dir: self.log_dir.value,
            web_listen: self.web_listen.value,
            bpf_dir: self.bpf_dir.value,
            mode: self.mode.value,
            password_hash: self.password_hash.value,
            web_hostnames: values(self.web_hostnames),
            web_tls: match (self.web_cert.value, self.web_key.value) {
                (Some(cert), Some(key)) => WebTls::Files { cert, key },
                _ => WebTls::Own,
            },
            log_level: self.log_level.value,
        }
    }
}

fn main_section(v: &mut Validator, cage: &Section) -> MainOptions {
    MainOptions {
        state_dir: v.one(cage, "state_dir", PathBuf::from(DEFAULT_STATE_DIR), |s| {
            absolute_path(s, DEFAULT_STATE_DIR)
        }),
        log_dir: v.one(cage, "log_dir", PathBuf::from(DEFAULT_LOG_DIR), |s| {
            absolute_path(s, DEFAULT_LOG_DIR)
        }),
        web_listen: v.one(cage, "web_listen", DEFAULT_WEB_LISTEN, web_listen),
        bpf_dir: v.one(cage, "bpf_dir", PathBuf::from(DEFAULT_BPF_DIR), |s| {
            absolute_path(s, DEFAULT_BPF_DIR)
        }),
        mode: v.one(cage, "mode", Mode::Auto, |s| match s {
            "auto" => Ok(Mode::Auto),
            "standalone" => Ok(Mode::Standalone),
            "openwrt" => Ok(Mode::OpenWrt),
            _ => Err(format!(
                "'{}' is not a mode; give auto (the default: openwrt when \
                 /etc/openwrt_release exists), standalone or openwrt",
                printable(s)
            )),
        }),
        password_hash: v.one(cage, "password_hash", None, |s| {
            super::phc::check(s)
                .map(|()| Some(s.to_owned()))
                .map_err(|e| format!("the value {e}"))
        }),
        web_hostnames: v.many(cage, "web_hostname", web_hostname),
        web_cert: v.one(cage, "web_cert", None, |s| {
            absolute_path(s, "/etc/uhttpd.crt").map(Some)
        }),
        web_key: v.one(cage, "web_key", None, |s| {
            absolute_path(s, "/etc/uhttpd.key").map(Some)
        }),
        log_level: v.one(cage, "log_level", LogLevel::Info, str::parse),
    }
}

/// `config segment 'ai'`, with what the cross-checks need of it.
struct SegmentOptions {
    bridge: Scalar<String>,
    address: Scalar<Ipv4Net>,
    ipv6: Scalar<bool>,
    address6: Scalar<Option<Ipv6Net>>,
    ports: Vec<Given<String>>,
    vlan: Scalar<Option<u16>>,
}

impl SegmentOptions {
    /// The segment's subnets that the cross-checks hold the other options away from: the
    /// IPv4 one when its address is valid, the IPv6 one when IPv6 is on.
    fn nets(&self) -> Vec<IpNet> {
        let seg4 = self
            .address
            .valid
            .then(|| IpNet::V4(self.address.value.trunc()));
        let seg6 = match (self.ipv6.value, self.address6.value) {
            (true, Some(a)) => Some(IpNet::V6(a.trunc())),
            _ => None,
        };
        seg4.into_iter().chain(seg6).collect()
    }

    fn config(self) -> Segment {
        Segment {
            bridge: self.bridge.value,
            address: self.address.value,
            ipv6: self.ipv6.value,
            // address6 is checked even when IPv6 is off, but only used when it is on.
            address6: if self.ipv6.value {
                self.address6.value
            } else {
                None
            },
            ports: values(self.ports),
            vlan: self.vlan.value,
        }
    }
}

fn segment_section(v: &mut Validator, segment: &Section) -> SegmentOptions {
    let options = SegmentOptions {
        bridge: v.one(segment, "bridge", DEFAULT_BRIDGE.to_owned(), |s| {
            interface(s, "br-cage")
        }),
        address: v.one(segment, "address", default_address(), address4),
        ipv6: v.one(segment, "ipv6", false, boolean),
        address6: v.one(segment, "address6", None, |s| address6(s).map(Some)),
        ports: v.many(segment, "port", |s| interface(s, "lan3")),
        vlan: v.one(segment, "vlan", None, |s| vlan_id(s).map(Some)),
    };
    let (ipv6, address6) = (&options.ipv6, &options.address6);
    if ipv6.value && address6.value.is_none() && address6.valid {
        // ipv6 is off by default, so it is on only when it was written down.
        v.error(
            segment,
            "ipv6",
            ipv6.line.unwrap_or(segment.line),
            "IPv6 is on but address6 is not set; add the router's IPv6 address on the \
             segment, e.g. option address6 'fd00:cafe:10::1/64', or set ipv6 '0'"
                .into(),
        );
    }
    options
}

/// `config lan 'lan'`, with what the cross-checks need of it.
struct LanOptions {
    devices: Vec<Given<String>>,
    admin_hosts: Vec<Given<IpAddr>>,
}

impl LanOptions {
    fn config(self) -> Lan {
        Lan {
            devices: values(self.devices),
            admin_hosts: values(self.admin_hosts),
        }
    }
}

fn lan_section(v: &mut Validator, lan: &Section) -> LanOptions {
    let devices = if v.has(lan, "device") {
        v.many(lan, "device", |s| interface(s, "br-lan"))
    } else {
        vec![Given {
            value: DEFAULT_LAN_DEVICE.to_owned(),
            line: None,
        }]
    };
    LanOptions {
        devices,
        admin_hosts: v.many(lan, "admin_host", admin_host),
    }
}

/// `config wan 'wan'`, with what the cross-checks need of it.
struct WanOptions {
    /// `None` for detection from the default routes.
    devices: Option<Vec<Given<String>>>,
    masquerade: Scalar<bool>,
    upstream_subnets: Vec<Given<IpNet>>,
}

impl WanOptions {
    fn config(self) -> Wan {
        Wan {
            devices: match self.devices {
                None => WanDevices::Auto,
                Some(devices) => WanDevices::List(values(devices)),
            },
            masquerade: self.masquerade.value,
            upstream_subnets: values(self.upstream_subnets),
        }
    }
}

fn wan_section(v: &mut Validator, wan: &Section) -> WanOptions {
    WanOptions {
        devices: v.wan_devices(wan),
        masquerade: v.one(wan, "masquerade", true, boolean),
        upstream_subnets: v.many(wan, "upstream_subnet", network),
    }
}

fn killswitch_section(v: &mut Validator, killswitch: &Section) -> KillSwitch {
    let button = v.one(killswitch, "button", None, |s| button_name(s).map(Some));
    let button_release = v.one(killswitch, "button_release", false, boolean);
    let auto_blocked = v.one(killswitch, "auto_blocked", 0, |s| {
        count(s, 1_000_000, "20 (0 switches it off)")
    });
    let auto_upload_bytes = v.one(killswitch, "auto_upload_bytes", 0, |s| {
        count(s, u64::MAX / 2, "1000000000 (0 switches it off)")
    });
    let auto_window = v.one(killswitch, "auto_window", 10, |s| {
        count(s, 3600, "10").and_then(|n| {
            if n == 0 {
                Err("'0' is not a window; give seconds from 1 to 3600, e.g. 10".into())
            } else {
                Ok(n as u32)
            }
        })
    });
    KillSwitch {
        button: button.value,
        button_release: button_release.value,
        auto_blocked: auto_blocked.value as u32,
        auto_upload_bytes: auto_upload_bytes.value,
        auto_window: auto_window.value,
    }
}

fn flowlog_section(v: &mut Validator, flowlog: &Section) -> FlowLog {
    let d = FlowLog::default();
    let max_flows = v.one(
        flowlog,
        "max_flows",
        u64::from(d.max_flows),
        in_range(256, 1 << 20, 16384),
    );
    let idle_timeout = v.one(
        flowlog,
        "idle_timeout",
        u64::from(d.idle_timeout),
        in_range(1, 3600, 15),
    );
    let active_timeout = v.one(
        flowlog,
        "active_timeout",
        u64::from(d.active_timeout),
        in_range(10, 86400, 300),
    );
    let log_max_bytes = v.one(
        flowlog,
        "log_max_bytes",
        d.log_max_bytes,
        in_range(65536, 1 << 30, 4 << 20),
    );
    let log_files = v.one(
        flowlog,
        "log_files",
        u64::from(d.log_files),
        in_range(1, 100, 4),
    );
    let attach = v.one(flowlog, "attach", Attach::Auto, |s| match s {
        "auto" => Ok(Attach::Auto),
        "tcx" => Ok(Attach::Tcx),
        "netlink" => Ok(Attach::Netlink),
        _ => Err(format!(
            "'{}' is not an attach mode; give auto (the default), tcx or netlink",
            printable(s)
        )),
    });
    let persist_dir = v.one(flowlog, "persist_dir", None, |s| {
        absolute_path(s, "/etc/cage/flows").map(Some)
    });
    let persist_interval = v.one(
        flowlog,
        "persist_interval",
        u64::from(d.persist_interval),
        in_range(1, 1440, 15),
    );
    let persist_budget = v.one(
        flowlog,
        "persist_budget",
        d.persist_budget,
        in_range(4096, 1 << 40, 8 << 20),
    );
    FlowLog {
        max_flows: max_flows.value as u32,
        idle_timeout: idle_timeout.value as u32,
        active_timeout: active_timeout.value as u32,
        log_max_bytes: log_max_bytes.value,
        log_files: log_files.value as u32,
        attach: attach.value,
        persist_dir: persist_dir.value,
        persist_interval: persist_interval.value as u32,
        persist_budget: persist_budget.value,
    }
}

/// A whole number from `min` to `max`, or the message that says so with an example.
fn in_range(min: u64, max: u64, example: u64) -> impl Fn(&str) -> Result<u64, String> {
    move |s: &str| match count(s, max, &example.to_string()) {
        Ok(n) if n >= min => Ok(n),
        Ok(_) | Err(_) => Err(format!(
            "'{}' is not a whole number from {min} to {max}; e.g. {example}",
            printable(s)
        )),
    }
}

fn limits_section(v: &mut Validator, limits: &Section) -> Limits {
    let d = Limits::default();
    let mut one = |name: &'static str, default: u32, min: u64, max: u64, example: u64| {
        v.one(
            limits,
            name,
            u64::from(default),
            in_range(min, max, example),
        )
        .value as u32
    };
    Limits {
        bind_timeout: one("bind_timeout", d.bind_timeout, 60, 86400, 3600),
        macs_per_port: one("macs_per_port", d.macs_per_port, 1, 64, 4),
        new_macs_per_minute: one("new_macs_per_minute", d.new_macs_per_minute, 1, 600, 4),
        conntrack_per_host: one("conntrack_per_host", d.conntrack_per_host, 0, 1 << 22, 4096),
        new_flows_per_second: one(
            "new_flows_per_second",
            d.new_flows_per_second,
            1,
            100_000,
            200,
        ),
        new_flows_burst: one("new_flows_burst", d.new_flows_burst, 1, 1_000_000, 1000),
        dns_tcp_per_host: one("dns_tcp_per_host", d.dns_tcp_per_host, 1, 1024, 16),
        flow_share: one("flow_share", d.flow_share, 1, 100, 25),
    }
}

fn export_section(v: &mut Validator, export: &Section) -> Export {
    let syslog = v.one(export, "syslog", None, |s| syslog_url(s).map(Some));
    let ca_file = v.one(export, "syslog_ca", None, |s| {
        absolute_path(s, "/etc/cage/collector-ca.pem").map(Some)
    });
    let server_name = v.one(export, "syslog_name", None, |s| web_hostname(s).map(Some));
    let flows = v.one(export, "syslog_flows", false, boolean);
    let queue = v.one(export, "syslog_queue", 1024, |s| {
        in_range(16, 65536, 1024)(s)
    });
    let ipfix = v.one(export, "ipfix", None, |s| {
        socket_address(s, 4739, "192.0.2.10:4739").map(Some)
    });
    let template_interval = v.one(export, "ipfix_template_interval", 60, |s| {
        in_range(5, 3600, 60)(s)
    });
    let domain = v.one(export, "ipfix_domain", 1, |s| {
        in_range(0, u64::from(u32::MAX), 1)(s)
    });
    let token = v.one(export, "metrics_token", None, |s| {
        metrics_token(s).map(Some)
    });
    let allow = v.many(export, "metrics_allow", network);

    // TLS needs the collector's CA; the TLS options mean nothing without TLS.
    let tls = matches!(&syslog.value, Some((SyslogTransport::Tls, _)));
    if syslog.valid && ca_file.valid && tls && ca_file.value.is_none() {
        v.error(
            export,
            "syslog",
            syslog.line.unwrap_or(export.line),
            "a tls:// collector needs syslog_ca, the certificate (PEM) that signed the \
             collector's, e.g. /etc/cage/collector-ca.pem"
                .to_owned(),
        );
    }
    for (name, given, line) in [
        ("syslog_ca", ca_file.value.is_some(), ca_file.line),
        ("syslog_name", server_name.value.is_some(), server_name.line),
    ] {
        if given && syslog.valid && !tls {
            v.error(
                export,
                name,
                line.unwrap_or(export.line),
                format!(
                    "{name} is for a tls:// collector; syslog is {}",
                    match &syslog.value {
                        Some(_) => "not tls://",
                        None => "not set",
                    }
                ),
            );
        }
    }
    for (name, given, line) in [
        ("syslog_flows", flows.line.is_some(), flows.line),
        ("syslog_queue", queue.line.is_some(), queue.line),
    ] {
        if given && syslog.valid && syslog.value.is_none() {
            v.error(
                export,
                name,
                line.unwrap_or(export.line),
                format!("{name} means nothing without syslog, the collector's address"),
            );
        }
    }
    for (name, given, line) in [
        (
            "ipfix_template_interval",
            template_interval.line.is_some(),
            template_interval.line,
        ),
        ("ipfix_domain", domain.line.is_some(), domain.line),
    ] {
        if given && ipfix.valid && ipfix.value.is_none() {
            v.error(
                export,
                name,
                line.unwrap_or(export.line),
                format!("{name} means nothing without ipfix, the collector's address"),
            );
        }
    }

    Export {
        syslog: syslog.value.map(|(transport, server)| SyslogExport {
            transport,
            server,
            ca_file: ca_file.value,
            server_name: server_name.value,
            flows: flows.value,
            queue: queue.value as u32,
        }),
        ipfix: ipfix.value.map(|collector| IpfixExport {
            collector,
            template_interval: template_interval.value as u32,
            domain: domain.value as u32,
        }),
        metrics: MetricsExport {
            token: token.value,
            allow: values(allow),
        },
    }
}

/// `udp://ADDR[:PORT]`, `tcp://…` or `tls://…`: a syslog collector.
fn syslog_url(s: &str) -> Result<(SyslogTransport, SocketAddr), String> {
    let example = "udp://192.0.2.10:514, tcp://192.0.2.10:514 or tls://192.0.2.10:6514";
    let (transport, rest) = if let Some(rest) = s.strip_prefix("udp://") {
        (SyslogTransport::Udp, rest)
    } else if let Some(rest) = s.strip_prefix("tcp://") {
        (SyslogTransport::Tcp, rest)
    } else if let Some(rest) = s.strip_prefix("tls://") {
        (SyslogTransport::Tls, rest)
    } else {
        return Err(format!(
            "'{}' does not say how to reach the collector; give {example}",
            printable(s)
        ));
    };
    socket_address(rest, transport.default_port(), example).map(|a| (transport, a))
}

/// An address with an optional port (`192.0.2.10`, `192.0.2.10:514`, `[2001:db8::1]:514`,
/// `2001:db8::1`); no names: the router resolves nothing for its own exports.
fn socket_address(s: &str, default_port: u16, example: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        if a.port() == 0 {
            return Err(format!(
                "'{}': port 0 is not a port; e.g. {example}",
                printable(s)
            ));
        }
        return Ok(a);
    }
    let bare = s
        .strip_prefix('[')
        .and_then(|b| b.strip_suffix(']'))
        .unwrap_or(s);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, default_port));
    }
    Err(format!(
        "'{}' is not an address with an optional port (names are not resolved); e.g. \
         {example}",
        printable(s)
    ))
}

/// A bearer token: 16 to 256 printable characters without spaces.
fn metrics_token(s: &str) -> Result<String, String> {
    if s.len() < 16 || s.len() > 256 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "a metrics token is 16 to 256 printable characters without spaces (e.g. the \
             output of `head -c 24 /dev/urandom | base64`)"
                .to_owned(),
        );
    }
    Ok(s.to_owned())
}

fn selftest_section(v: &mut Validator, selftest: &Section) -> SelfTest {
    let interval = v.one(selftest, "interval", 0, |s| {
        count(s, 10080, "60 (0: never)")
    });
    let after_change = v.one(selftest, "after_change", false, boolean);
    let targets = v.many(selftest, "target", |s| {
        if s.parse::<SocketAddr>().is_ok() || s.parse::<IpAddr>().is_ok() {
            Ok(s.to_owned())
        } else {
            Err(format!(
                "'{}' is not an address to ping or an address:port to connect to; \
                 e.g. 203.0.113.10 or 203.0.113.10:443",
                printable(s)
            ))
        }
    });
    SelfTest {
        interval_minutes: interval.value as u32,
        after_change: after_change.value,
        targets: values(targets),
    }
}

/// The values of a list option, in the file's order.
fn values<T>(given: Vec<Given<T>>) -> Vec<T> {
    given.into_iter().map(|g| g.value).collect()
}

// ---------------------------------------------------------------------------------------
// Cross-checks: between options of different sections, each valid on its own.

/// The sections the cross-checks put their errors in.
struct Placed<'s, 'a> {
    cage: &'s Section<'a>,
    segment: &'s Section<'a>,
    lan: &'s Section<'a>,
    wan: &'s Section<'a>,
}

fn cross_checks(
    v: &mut Validator,
    at: &Placed,
    main: &MainOptions,
    seg: &SegmentOptions,
    lan: &LanOptions,
    wan: &WanOptions,
) {
    let segment_nets = seg.nets();
    one_role_per_device(v, at, seg, lan, wan);
    admin_hosts_outside_the_segment(v, at.lan, lan, &segment_nets);
    web_listen_off_the_segment(v, at.cage, &main.web_listen, &segment_nets);
    web_cert_with_its_key(v, at.cage, main);
    upstreams_outside_the_segment(v, at.wan, wan, &segment_nets);
}

/// Each device has one role: the segment's bridge, a segment port, a LAN device or a WAN
/// device. Anything else would put the cage and the networks it is kept from on the same
/// wire.
fn one_role_per_device(
    v: &mut Validator,
    at: &Placed,
    seg: &SegmentOptions,
    lan: &LanOptions,
    wan: &WanOptions,
) {
    let mut claims: Vec<Claim> = Vec::new();
    if seg.bridge.valid {
        claims.push(Claim::new(
            at.segment,
            "bridge",
            Role::Bridge,
            &seg.bridge.as_given(),
        ));
    }
    claims.extend(
        seg.ports
            .iter()
            .map(|p| Claim::new(at.segment, "port", Role::Port, p)),
    );
    claims.extend(
        lan.devices
            .iter()
            .map(|d| Claim::new(at.lan, "device", Role::Lan, d)),
    );
    if let Some(devices) = &wan.devices {
        claims.extend(
            devices
                .iter()
                .map(|d| Claim::new(at.wan, "device", Role::Wan, d)),
        );
    }
    v.distinct_devices(&claims);
}

fn admin_hosts_outside_the_segment(
    v: &mut Validator,
    section: &Section,
    lan: &LanOptions,
    segment_nets: &[IpNet],
) {
    for host in &lan.admin_hosts {
        for net in segment_nets {
            if net.contains(&host.value) {
                v.error(
                    section,
                    "admin_host",
                    host.line.unwrap_or(section.line),
                    format!(
                        "'{}' is inside the segment {net}; an admin host is a LAN host \
                         outside the cage, e.g. 192.168.8.10",
                        host.value
                    ),
                );
            }
        }
    }
}

/// The IPFIX collector is never a caged host: it would be handed every flow record,
/// the other caged hosts' included.
fn ipfix_off_the_segment(v: &mut Validator, section: &Section, export: &Export, nets: &[IpNet]) {
    let Some(ipfix) = &export.ipfix else { return };
    let line = section
        .options
        .get("ipfix")
        .and_then(|o| o.first())
        .map_or(section.line, |o| o.line);
    for net in nets.iter().filter(|n| n.contains(&ipfix.collector.ip())) {
        v.error(
            section,
            "ipfix",
            line,
            format!(
                "'{}' is inside the segment {net}; the flow records must never go to a \
                 caged host: give a collector on the LAN, e.g. 192.168.8.10:4739",
                ipfix.collector
            ),
        );
    }
}

/// `lan:PORT` never listens on the segment either: addresses inside it are left out at
/// run time (`cage_agent::listen::listen_addresses`).
fn web_listen_off_the_segment(
    v: &mut Validator,
    cage: &Section,
    web_listen: &Scalar<WebListen>,
    segment_nets: &[IpNet],
) {
    let (true, WebListen::Address(listen)) = (web_listen.valid, web_listen.value) else {
        return;
    };
    for net in segment_nets {
        if !net.contains(&listen.ip()) {
            continue;
        }
        // An address is only ever what the file says (the default is `lan:PORT`).
        v.error(
            cage,
            "web_listen",
            web_listen.line.unwrap_or(cage.line),
            format!(
                "'{listen}' is inside the segment {net}; the web UI must never be served \
                 on the segment: give a LAN address of the router, e.g. 192.168.8.1:8080"
            ),
        );
    }
}

/// `web_cert` and `web_key` come together: a certificate without its key (or a key
/// without its certificate) cannot be served, and Cage's own would silently be used.
fn web_cert_with_its_key(v: &mut Validator, cage: &Section, main: &MainOptions) {
    let (cert, key) = (&main.web_cert, &main.web_key);
    if !cert.valid || !key.valid {
        return;
    }
    let (given, line, message) = match (&cert.value, &key.value) {
        (Some(_), None) => (
            "web_cert",
            cert.line,
            "a certificate without its key: set web_key too (e.g. /etc/uhttpd.key), or \
             neither for Cage's own self-signed certificate",
        ),
        (None, Some(_)) => (
            "web_key",
            key.line,
            "a key without its certificate: set web_cert too (e.g. /etc/uhttpd.crt), or \
             neither for Cage's own self-signed certificate",
        ),
        _ => return,
    };
    v.error(cage, given, line.unwrap_or(cage.line), message.to_owned());
}

fn upstreams_outside_the_segment(
    v: &mut Validator,
    section: &Section,
    wan: &WanOptions,
    segment_nets: &[IpNet],
) {
    for upstream in &wan.upstream_subnets {
        for net in segment_nets {
            if net.contains(&upstream.value) || upstream.value.contains(net) {
                v.error(
                    section,
                    "upstream_subnet",
                    upstream.line.unwrap_or(section.line),
                    format!(
                        "'{}' overlaps the segment {net}; upstream networks are denied to \
                         the segment, so they must lie outside it: change this network or \
                         the segment's address",
                        upstream.value
                    ),
                );
            }
        }
    }
}

/// `config dns 'dns'`: on when the section is in the file, unless `enabled '0'`.
fn dns_section(v: &mut Validator, dns: &Section) -> Dns {
    let d = Dns::default();
    let enabled = v.one(dns, "enabled", dns.line > 0, boolean);
    let egress = v.one(dns, "egress", d.egress, |s| match s {
        "open" => Ok(Egress::Open),
        "allowlist" => Ok(Egress::Allowlist),
        _ => Err(format!(
            "'{}' is not an egress mode; give open (the default: the internet is reachable, \
             DNS goes through Cage) or allowlist (only names in allow_domain)",
            printable(s)
        )),
    });
    let allow = v.many(dns, "allow_domain", |s| {
        crate::dns::name::pattern(s).map_err(|why| {
            format!(
                "'{}' is not a domain name or wildcard ({why}); e.g. api.anthropic.com or \
                 *.githubusercontent.com",
                printable(s)
            )
        })
    });
    let upstreams = v.many(dns, "upstream", upstream);
    let listen_port = v.one(
        dns,
        "listen_port",
        u64::from(d.listen_port),
        |s| match count(s, 65535, "5354") {
            Ok(n) if n >= 1024 => Ok(n),
            _ => Err(format!(
                "'{}' is not a port from 1024 to 65535 (53 is the router's own resolver); \
                 e.g. 5354",
                printable(s)
            )),
        },
    );
    let ttl_floor = v.one(dns, "ttl_floor", u64::from(d.ttl_floor), |s| {
        count(s, 86400, "60")
    });
    let ttl_max = v.one(dns, "ttl_max", u64::from(d.ttl_max), |s| {
        match count(s, 604800, "3600") {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(format!(
                "'{}' is not a whole number of seconds from 1 to 604800; e.g. 3600",
                printable(s)
            )),
        }
    });
    if ttl_floor.valid && ttl_max.valid && ttl_floor.value > ttl_max.value {
        v.error(
            dns,
            "ttl_floor",
            ttl_floor.line.or(ttl_max.line).unwrap_or(dns.line),
            format!(
                "ttl_floor {} is above ttl_max {}; the floor must not exceed the cap",
                ttl_floor.value, ttl_max.value
            ),
        );
    }
    let positive = |max: u64, example: &'static str| {
        move |s: &str| match count(s, max, example) {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(format!(
                "'{}' is not a whole number from 1 to {max}; e.g. {example}",
                printable(s)
            )),
        }
    };
    let max_qps = v.one(
        dns,
        "max_qps",
        u64::from(d.max_qps),
        positive(100_000, "20"),
    );
    let burst = v.one(dns, "burst", u64::from(d.burst), positive(1_000_000, "40"));
    let max_name_length = v.one(
        dns,
        "max_name_length",
        d.max_name_length as u64,
        |s| match count(s, 253, "100") {
            Ok(n) if n >= 16 => Ok(n),
            _ => Err(format!(
                "'{}' is not a length from 16 to 253 (the longest DNS name); e.g. 100",
                printable(s)
            )),
        },
    );
    let doh = v.many(dns, "doh_block", |s| {
        crate::dns::name::pattern(s).map_err(|why| {
            format!(
                "'{}' is not a domain name or wildcard ({why}); e.g. dns.google",
                printable(s)
            )
        })
    });
    let doh_ips = v.many(dns, "doh_block_ip", |s| {
        s.parse::<IpAddr>().map_err(|_| {
            format!(
                "'{}' is not an IPv4 or IPv6 address; e.g. 8.8.8.8 or 2001:4860:4860::8888",
                printable(s)
            )
        })
    });
    let auto_violations = v.one(dns, "auto_violations", 0, |s| {
        count(s, 1_000_000, "50 (0 switches it off)")
    });
    Dns {
        enabled: enabled.value,
        egress: egress.value,
        allow_domains: allow.into_iter().map(|a| a.value).collect(),
        upstreams: upstreams.into_iter().map(|u| u.value).collect(),
        listen_port: listen_port.value as u16,
        ttl_floor: ttl_floor.value as u32,
        ttl_max: ttl_max.value as u32,
        max_qps: max_qps.value as u32,
        burst: burst.value as u32,
        max_name_length: max_name_length.value as usize,
        // A `doh_block` list replaces the default list; none keeps it.
        doh_block: if dns.has("doh_block") {
            doh.into_iter().map(|d| d.value).collect()
        } else {
            d.doh_block
        },
        doh_block_ips: doh_ips.into_iter().map(|d| d.value).collect(),
        auto_violations: auto_violations.value as u32,
    }
}

/// `dns.upstream`: `IP` (port 53) or `IP:PORT` (`[IPv6]:PORT`).
fn upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    s.parse::<SocketAddr>().map_err(|_| {
        format!(
            "'{}' is not a resolver address; give IP or IP:PORT, e.g. 127.0.0.1:53, \
             9.9.9.9 or [2001:db8::53]:53",
            printable(s)
        )
    })
}

/// A value and the line it was written on; `None` for a default.
#[derive(Debug, Clone)]
struct Given<T> {
    value: T,
    line: Option<usize>,
}

/// A scalar option: its value (the default when absent or invalid), its line, and
/// whether it may take part in cross-checks (false when it was invalid).
#[derive(Debug, Clone)]
struct Scalar<T> {
    value: T,
    line: Option<usize>,
    valid: bool,
}

impl<T: Clone> Scalar<T> {
    fn as_given(&self) -> Given<T> {
        Given {
            value: self.value.clone(),
            line: self.line,
        }
    }
}

/// One section of each known type as the validator sees it, the options grouped by name.
/// A section missing from the file is an empty `Section`: all its options default.
struct Section<'a> {
    /// The section's type (`segment`), for the record of what was read.
    kind: &'static str,
    label: String,
    line: usize,
    options: HashMap<&'static str, Vec<&'a RawOption>>,
}

impl Section<'_> {
    fn has(&self, name: &str) -> bool {
        self.options.get(name).is_some_and(|o| !o.is_empty())
    }
}

/// The options the validator asked for, as (section type, option).
type Reads = BTreeSet<(&'static str, String)>;

#[derive(Default)]
struct Validator {
    errors: Vec<ConfigError>,
    reads: Reads,
}

impl Validator {
    /// Whether the section has the option (which counts as reading it).
    fn has(&mut self, section: &Section, name: &str) -> bool {
        self.reads.insert((section.kind, name.to_owned()));
        section.has(name)
    }

    fn error(&mut self, section: &Section, option: &str, line: usize, message: String) {
        self.errors.push(ConfigError {
            section: Some(section.label.clone()),
            option: Some(option.to_owned()),
            line,
            message,
        });
    }

    fn section_error(&mut self, label: &str, line: usize, message: String) {
        self.errors.push(ConfigError {
            section: Some(label.to_owned()),
            option: None,
            line,
            message,
        });
    }

    /// Sort the sections by type, one of each, and the options of each by name, with
    /// every structural problem reported: unknown types, a type given twice, names used
    /// twice, unknown options, `list` for a single-valued option, an option set twice.
    fn sections<'a>(&mut self, raw: &'a RawConfig) -> [Section<'a>; 10] {
        let mut found: [Option<Section<'a>>; 10] = Default::default();
        let mut count_by_kind: HashMap<&str, usize> = HashMap::new();
        let mut names: HashMap<&str, (&str, usize)> = HashMap::new();

        for section in &raw.sections {
            let index = count_by_kind.entry(section.kind.as_str()).or_default();
            let label = match &section.name {
                Some(name) => name.clone(),
                None => format!("@{}[{index}]", section.kind),
            };
            *index += 1;

            if let Some(name) = &section.name {
                if let Some((kind, line)) = names.insert(name, (&section.kind, section.line)) {
                    self.section_error(
                        &label,
                        section.line,
                        format!(
                            "the name '{name}' is already used by the {kind} section on line \
                             {line}; every section needs a name of its own (or none)"
                        ),
                    );
                    continue;
                }
            }

            let Some(slot) = TYPES.iter().position(|t| t.kind == section.kind) else {
                let kinds: Vec<&str> = TYPES.iter().map(|t| t.kind).collect();
                let message = match nearest(&section.kind, kinds.iter().copied()) {
                    Some(near) => format!(
                        "unknown section type '{}'; did you mean '{near}'?",
                        section.kind
                    ),
                    None => format!(
                        "unknown section type '{}'; Cage's sections are {}",
                        section.kind,
                        kinds.join(", ")
                    ),
                };
                self.section_error(&label, section.line, message);
                continue;
            };
            let ty = TYPES[slot];

            if let Some(first) = &found[slot] {
                self.section_error(
                    &label,
                    section.line,
                    format!(
                        "a second {} section (the first is cage.{} on line {}); Cage reads \
                         one, so merge the two",
                        ty.kind, first.label, first.line
                    ),
                );
                continue;
            }

            let mut options: HashMap<&'static str, Vec<&'a RawOption>> = HashMap::new();
            let this = Section {
                kind: ty.kind,
                label,
                line: section.line,
                options: HashMap::new(),
            };
            for option in &section.options {
                let Some(&(name, arity)) = ty.options.iter().find(|(n, _)| *n == option.name)
                else {
                    self.error(
                        &this,
                        &option.name,
                        option.line,
                        unknown_option(&option.name, ty),
                    );
                    continue;
                };
                let entries = options.entry(name).or_default();
                match arity {
                    Arity::One if option.is_list => {
                        self.error(
                            &this,
                            name,
                            option.line,
                            format!(
                                "'{name}' takes a single value, not a list; write \
                                 option {name} 'VALUE'"
                            ),
                        );
                        // Still check the value, unless the option was already set.
                        if entries.is_empty() {
                            entries.push(option);
                        }
                    }
                    Arity::One => {
                        if let Some(first) = entries.first() {
                            self.error(
                                &this,
                                name,
                                option.line,
                                format!(
                                    "'{name}' is set twice (first on line {}); uci would \
                                     keep only the last, so keep one line",
                                    first.line
                                ),
                            );
                        } else {
                            entries.push(option);
                        }
                    }
                    Arity::Many => entries.push(option),
                }
            }
            // A lone `option` is a one-element list, as in uci; but an `option` among
            // other lines of the same name replaces or merges them depending on the
            // order, so ask for `list` lines only.
            for &(name, arity) in ty.options {
                if arity != Arity::Many {
                    continue;
                }
                let Some(entries) = options.get_mut(name) else {
                    continue;
                };
                if entries.len() > 1 {
                    for option in entries.iter().filter(|o| !o.is_list) {
                        self.error(
                            &this,
                            name,
                            option.line,
                            format!(
                                "'option {name}' among other '{name}' lines; uci would \
                                 replace or merge them depending on the order: write every \
                                 value as list {name} 'VALUE'"
                            ),
                        );
                    }
                    entries.retain(|o| o.is_list);
                }
            }
            found[slot] = Some(Section { options, ..this });
        }

        let mut slots = found.into_iter();
        TYPES.map(|ty| {
            slots.next().flatten().unwrap_or_else(|| Section {
                kind: ty.kind,
                label: ty.usual_name.to_owned(),
                line: 0,
                options: HashMap::new(),
            })
        })
    }

    /// A single-valued option: parsed, or its default.
    fn one<T>(
        &mut self,
        section: &Section,
        name: &str,
        default: T,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Scalar<T> {
        self.reads.insert((section.kind, name.to_owned()));
        let Some(option) = section.options.get(name).and_then(|o| o.first()) else {
            return Scalar {
                value: default,
                line: None,
                valid: true,
            };
        };
        match parse(&option.value) {
            Ok(value) => Scalar {
                value,
                line: Some(option.line),
                valid: true,
            },
            Err(message) => {
                self.error(section, name, option.line, message);
                Scalar {
                    value: default,
                    line: Some(option.line),
                    valid: false,
                }
            }
        }
    }

    /// A list option: the values that parse (the others are reported).
    fn many<T>(
        &mut self,
        section: &Section,
        name: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Vec<Given<T>> {
        self.reads.insert((section.kind, name.to_owned()));
        let mut values = Vec::new();
        for option in section.options.get(name).into_iter().flatten() {
            match parse(&option.value) {
                Ok(value) => values.push(Given {
                    value,
                    line: Some(option.line),
                }),
                Err(message) => self.error(section, name, option.line, message),
            }
        }
        values
    }

    /// The WAN devices: `None` for auto-detection (no device, or `device 'auto'` alone).
    fn wan_devices(&mut self, wan: &Section) -> Option<Vec<Given<String>>> {
        self.reads.insert((wan.kind, "device".to_owned()));
        let entries = wan
            .options
            .get("device")
            .map(Vec::as_slice)
            .unwrap_or_default();
        match entries {
            [] => return None,
            [only] if only.value == "auto" => return None,
            _ => {}
        }
        for auto in entries.iter().filter(|o| o.value == "auto") {
            self.error(
                wan,
                "device",
                auto.line,
                "'auto' stands for the devices of the default routes and can't be mixed \
                 with named devices; list device 'auto' alone, or name every WAN device"
                    .into(),
            );
        }
        let named = Section {
            kind: wan.kind,
            label: wan.label.clone(),
            line: wan.line,
            options: HashMap::from([(
                "device",
                entries
                    .iter()
                    .copied()
                    .filter(|o| o.value != "auto")
                    .collect(),
            )]),
        };
        Some(self.many(&named, "device", |s| interface(s, "eth0")))
    }

    /// No device may have two roles, nor one role twice.
    fn distinct_devices(&mut self, claims: &[Claim]) {
        for (i, claim) in claims.iter().enumerate() {
            let Some(other) = claims[..i].iter().find(|c| c.device == claim.device) else {
                continue;
            };
            // Report on the claim that was written down; when both were, on the one
            // further down the file.
            let (at, other) = match (claim.line, other.line) {
                (Some(a), Some(b)) if a < b => (other, claim),
                (Some(_), _) => (claim, other),
                (None, Some(_)) => (other, claim),
                (None, None) => continue,
            };
            let Some(line) = at.line else { continue };
            let message = if at.role == other.role {
                format!(
                    "'{}' is listed twice ({}); list each device once",
                    at.device,
                    other.place()
                )
            } else {
                format!(
                    "'{}' is also {} ({}); the segment's bridge, its ports, the LAN devices \
                     and the WAN devices must all be different devices",
                    at.device,
                    other.role.describe(),
                    other.place()
                )
            };
            self.errors.push(ConfigError {
                section: Some(at.section.clone()),
                option: Some(at.option.to_owned()),
                line,
                message,
            });
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Bridge,
    Port,
    Lan,
    Wan,
}

impl Role {
    fn describe(self) -> &'static str {
        match self {
            Role::Bridge => "the segment's bridge",
            Role::Port => "a segment port",
            Role::Lan => "a LAN device",
            Role::Wan => "a WAN device",
        }
    }
}

/// A device named in one role, and where.
struct Claim {
    device: String,
    role: Role,
    section: String,
    option: &'static str,
    line: Option<usize>,
}

impl Claim {
    fn new(section: &Section, option: &'static str, role: Role, given: &Given<String>) -> Self {
        Claim {
            device: given.value.clone(),
            role,
            section: section.label.clone(),
            option,
            line: given.line,
        }
    }

    fn place(&self) -> String {
        match self.line {
            Some(line) => format!("cage.{}.{}, line {line}", self.section, self.option),
            None => format!("the default {}", self.option),
        }
    }
}

/// "unknown option 'adress'; did you mean 'address'?", or the list of what is known.
fn unknown_option(name: &str, ty: &SectionType) -> String {
    let here: Vec<&str> = ty.options.iter().map(|(n, _)| *n).collect();
    if let Some(near) = nearest(name, here.iter().copied()) {
        return format!("unknown option '{name}'; did you mean '{near}'?");
    }
    let elsewhere: Vec<&str> = TYPES
        .iter()
        .filter(|t| t.kind != ty.kind && t.options.iter().any(|(n, _)| *n == name))
        .map(|t| t.kind)
        .collect();
    if elsewhere.is_empty() {
        format!(
            "unknown option '{name}'; a {} section takes {}",
            ty.kind,
            here.join(", ")
        )
    } else {
        format!(
            "unknown option '{name}' in a {} section ('{name}' belongs in the {} section); \
             a {} section takes {}",
            ty.kind,
            elsewhere.join(" or "),
            ty.kind,
            here.join(", ")
        )
    }
}

/// The known name closest to a misspelt one, if any is close enough to be a likely typo.
fn nearest<'a>(word: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let word = word.to_ascii_lowercase();
    known
        .filter_map(|k| {
            let distance = strsim::damerau_levenshtein(&word, k);
            let close = distance <= (k.len() / 3).max(1)
                || (word.len() >= 4 && (k.starts_with(&word) || word.starts_with(k)));
            close.then_some((distance, k))
        })
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, k)| k)
}

// ---------------------------------------------------------------------------------------
// Value types. Each returns a message that says what is wrong and what would be accepted.

fn boolean(s: &str) -> Result<bool, String> {
    // The words OpenWrt's `config_get_bool` knows, case and all.
    match s {
        "1" | "yes" | "on" | "true" | "enabled" => Ok(true),
        "0" | "no" | "off" | "false" | "disabled" => Ok(false),
        _ => Err(format!(
            "'{}' is not a boolean; use '1' or '0' (or yes/no, on/off, true/false, \
             enabled/disabled)",
            printable(s)
        )),
    }
}

/// A Linux interface name, as the kernel's `dev_valid_name()` accepts it.
fn interface(s: &str, example: &str) -> Result<String, String> {
    let why = if s.is_empty() {
        Some("it is empty")
    } else if s.len() > 15 {
        Some("it is longer than 15 bytes")
    } else if s == "." || s == ".." {
        Some("'.' and '..' are not names")
    } else if s.contains('/') {
        Some("it contains '/'")
    } else if s.contains(':') {
        Some("it contains ':'")
    } else if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("it contains a blank or a control character")
    } else {
        None
    };
    match why {
        None => Ok(s.to_owned()),
        Some(why) => Err(format!(
            "'{}' is not a valid interface name ({why}); Linux interface names are 1 to 15 \
             bytes with no '/', ':' or blanks, e.g. {example}",
            printable(s)
        )),
    }
}

fn absolute_path(s: &str, example: &str) -> Result<PathBuf, String> {
    if s.starts_with('/') && !s.chars().any(char::is_control) {
        Ok(PathBuf::from(s))
    } else {
        Err(format!(
            "'{}' is not an absolute path; give one that starts with '/', e.g. {example}",
            printable(s)
        ))
    }
}

/// A DNS name the web page answers to: letters, digits, '-' and dots, as a browser puts
/// it in the Host header (no port, no address: the listen address always counts).
fn web_hostname(s: &str) -> Result<String, String> {
    let name = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!(
            "'{}' is not a host name; give a DNS name such as cage.lan or router.home.arpa \
             (no port, no scheme)",
            printable(s)
        ));
    }
    if name.parse::<IpAddr>().is_ok() || name.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(format!(
            "'{}' is an address, not a name; the listen address (web_listen) is always \
             accepted, give names only",
            printable(s)
        ));
    }
    Ok(name)
}

pub(super) fn web_listen(s: &str) -> Result<WebListen, String> {
    if let Some(port) = s.strip_prefix("lan:") {
        return match port.parse::<u16>() {
            Ok(p) if p > 0 => Ok(WebListen::Lan { port: p }),
            _ => Err(format!(
                "'{}' does not end in a port from 1 to 65535; 'lan:PORT' listens on every \
                 LAN address of the router, e.g. lan:{}",
                printable(s),
                super::DEFAULT_WEB_PORT
            )),
        };
    }
    let addr: SocketAddr = s.parse().map_err(|_| {
        format!(
            "'{}' is not an IP address with a port, e.g. 192.168.8.1:8080 or [fd00::1]:8080, \
             nor lan:PORT (every LAN address of the router, e.g. lan:{})",
            printable(s),
            super::DEFAULT_WEB_PORT
        )
    })?;
    let ip = addr.ip();
    if ip.is_unspecified() {
        return Err(format!(
            "'{s}' listens on every address, the segment's included; give the router's LAN \
             address, e.g. 192.168.8.1:8080"
        ));
    }
    if ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        return Err(format!(
            "'{s}' is not an address to listen on; give the router's LAN address, \
             e.g. 192.168.8.1:8080"
        ));
    }
    if addr.port() == 0 {
        return Err(format!(
            "'{s}' has port 0; give a port from 1 to 65535, e.g. 192.168.8.1:8080"
        ));
    }
    Ok(WebListen::Address(addr))
}

/// The router's IPv4 address on the segment, with the segment's prefix.
fn address4(s: &str) -> Result<Ipv4Net, String> {
    let net: Ipv4Net = s.parse().map_err(|_| {
        format!(
            "'{}' is not an IPv4 address with prefix, e.g. 192.168.10.1/24",
            printable(s)
        )
    })?;
    let prefix = net.prefix_len();
    if !(8..=30).contains(&prefix) {
        return Err(format!(
            "'{s}' has prefix /{prefix}; the segment's prefix must be /8 to /30, \
             e.g. 192.168.10.1/24"
        ));
    }
    let addr = net.addr();
    let [first, ..] = addr.octets();
    if first == 0 || first >= 224 || addr.is_loopback() || addr.is_link_local() {
        return Err(format!(
            "'{s}' is not a unicast address a router can use on a segment (it is \
             loopback, link-local, multicast or reserved); use a private range, \
             e.g. 192.168.10.1/24"
        ));
    }
    let network = net.network();
    let broadcast = net.broadcast();
    // Prefixes are /30 at most, so network + 1 and broadcast - 1 are hosts of the subnet.
    if addr == network {
        let host = Ipv4Addr::from(u32::from(network) + 1);
        return Err(format!(
            "'{s}' is the network address of {}, not a host; give the router's own \
             address in it, e.g. {host}/{prefix}",
            net.trunc()
        ));
    }
    if addr == broadcast {
        let host = Ipv4Addr::from(u32::from(broadcast) - 1);
        return Err(format!(
            "'{s}' is the broadcast address of {}, not a host; give the router's own \
             address in it, e.g. {host}/{prefix}",
            net.trunc()
        ));
    }
    Ok(net)
}

/// The router's IPv6 address on the segment, with the segment's prefix.
fn address6(s: &str) -> Result<Ipv6Net, String> {
    let net: Ipv6Net = s.parse().map_err(|_| {
        format!(
            "'{}' is not an IPv6 address with prefix, e.g. fd00:cafe:10::1/64",
            printable(s)
        )
    })?;
    let prefix = net.prefix_len();
    if !(48..=64).contains(&prefix) {
        return Err(format!(
            "'{s}' has prefix /{prefix}; the segment's IPv6 prefix must be /48 to /64, \
             e.g. fd00:cafe:10::1/64"
        ));
    }
    let addr = net.addr();
    let first = addr.segments()[0];
    if first & 0xffc0 == 0xfe80 {
        return Err(format!(
            "'{s}' is link-local (fe80::/10), which every interface has anyway; give a \
             ULA or global address, e.g. fd00:cafe:10::1/64"
        ));
    }
    if addr.is_multicast() {
        return Err(format!(
            "'{s}' is a multicast address; give a ULA or global unicast address, \
             e.g. fd00:cafe:10::1/64"
        ));
    }
    if first == 0 {
        // ::/16 holds the unspecified, loopback and IPv4-mapped addresses.
        return Err(format!(
            "'{s}' is not a unicast address a router can use on a segment; give a ULA or \
             global address, e.g. fd00:cafe:10::1/64"
        ));
    }
    if addr == net.network() {
        let host = Ipv6Addr::from(u128::from(addr) + 1);
        return Err(format!(
            "'{s}' is the subnet-router anycast address of {}, not a host; give the \
             router's own address in it, e.g. {host}/{prefix}",
            net.trunc()
        ));
    }
    Ok(net)
}

/// A button as OpenWrt's button hotplug names it (`$BUTTON`): BTN_0, reset, wps, …
fn button_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 32
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "'{}' is not a button name; give the name OpenWrt's button hotplug reports, \
             e.g. BTN_0 (GL.iNet's side switch) or reset",
            printable(s)
        ))
    }
}

/// A whole number from 0 to `max`.
fn count(s: &str, max: u64, example: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(format!(
            "'{}' is not a whole number from 0 to {max}; e.g. {example}",
            printable(s)
        )),
    }
}

fn vlan_id(s: &str) -> Result<u16, String> {
    let id = if !s.is_empty() && s.len() <= 4 && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse::<u16>().ok()
    } else {
        None
    };
    match id {
        Some(id @ 1..=4094) => Ok(id),
        _ => Err(format!(
            "'{}' is not a VLAN id; give a number from 1 to 4094, e.g. 10",
            printable(s)
        )),
    }
}

fn admin_host(s: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = s.parse().map_err(|_| {
        format!(
            "'{}' is not an IP address, e.g. 192.168.8.10 or fd00::10",
            printable(s)
        )
    })?;
    if ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || ip == IpAddr::V4(Ipv4Addr::BROADCAST)
    {
        return Err(format!(
            "'{s}' is not the address of a host; give the LAN address of the admin's \
             machine, e.g. 192.168.8.10"
        ));
    }
    Ok(ip)
}

fn network(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        if net != net.trunc() {
            return Err(format!(
                "'{s}' has bits set after the prefix; write the network, {}",
                net.trunc()
            ));
        }
        return Ok(net);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!(
        "'{}' is not a network, e.g. 10.0.0.0/8 or 2001:db8::/32 (a single address, \
         e.g. 10.0.0.5, is also accepted)",
        printable(s)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booleans_as_uci_has_them() {
        for t in ["1", "yes", "on", "true", "enabled"] {
            assert_eq!(boolean(t), Ok(true));
        }
        for f in ["0", "no", "off", "false", "disabled"] {
            assert_eq!(boolean(f), Ok(false));
        }
        assert!(boolean("2").is_err());
        assert!(boolean("").is_err());
    }

    #[test]
    fn interface_names() {
        assert!(interface("br-cage", "x").is_ok());
        assert!(interface("eth0.10", "x").is_ok());
        assert!(interface("abcdefghijklmno", "x").is_ok());
        for bad in [
            "",
            ".",
            "..",
            "abcdefghijklmnop",
            "a/b",
            "a:1",
            "a b",
            "a\tb",
        ] {
            assert!(interface(bad, "x").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn segment_addresses() {
        assert!(address4("192.168.10.1/24").is_ok());
        assert!(address4("10.0.0.2/30").is_ok());
        assert!(address4("10.0.0.1/8").is_ok());
        let e = address4("192.168.10.0/24").unwrap_err();
        assert!(
            e.contains("network address") && e.contains("192.168.10.1/24"),
            "{e}"
        );
        let e = address4("192.168.10.255/24").unwrap_err();
        assert!(
            e.contains("broadcast") && e.contains("192.168.10.254/24"),
            "{e}"
        );
        for bad in [
            "192.168.10.1",
            "192.168.10.1/31",
            "10.0.0.1/7",
            "127.0.0.1/8",
            "224.0.0.1/8",
            "169.254.0.1/16",
            "0.1.2.3/8",
        ] {
            assert!(address4(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn segment_addresses6() {
        assert!(address6("fd00:cafe:10::1/64").is_ok());
        assert!(address6("2001:db8::1/48").is_ok());
        for bad in [
            "fd00::1",
            "fd00::1/80",
            "fd00::1/32",
            "fe80::1/64",
            "ff02::1/64",
            "::1/64",
            "fd00:cafe:10::/64",
        ] {
            assert!(address6(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn networks() {
        assert_eq!(network("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(network("10.0.0.5").unwrap().to_string(), "10.0.0.5/32");
        assert_eq!(
            network("2001:db8::/32").unwrap().to_string(),
            "2001:db8::/32"
        );
        let e = network("10.0.0.1/8").unwrap_err();
        assert!(e.ends_with("write the network, 10.0.0.0/8"), "{e}");
        assert!(network("10.0.0.0/33").is_err());
    }

    #[test]
    fn vlans() {
        assert_eq!(vlan_id("10"), Ok(10));
        assert_eq!(vlan_id("4094"), Ok(4094));
        for bad in ["0", "4095", "+10", "-1", "", "ten", "99999"] {
            assert!(vlan_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn listen_addresses() {
        assert!(web_listen("192.168.8.1:8080").is_ok());
        assert!(web_listen("[fd00::1]:8080").is_ok());
        assert_eq!(web_listen("lan:2243"), Ok(WebListen::Lan { port: 2243 }));
        for bad in [
            "lan:0",
            "lan:",
            "lan:65536",
            "lan:x",
            "lan",
            "192.168.8.1",
            "0.0.0.0:8080",
            "[::]:80",
            "192.168.8.1:0",
            "x:1",
        ] {
            assert!(web_listen(bad).is_err(), "{bad}");
        }
    }

    /// An option in the schema that the validator never asks for would be accepted in
    /// a file and silently ignored; an option asked for but not in the schema could
    /// never be given. Both with every section missing and with every section present.
    #[test]
    fn every_option_in_the_schema_is_read_and_nothing_else() {
        let all_sections: String = TYPES
            .iter()
            .map(|t| format!("config {} '{}'\n", t.kind, t.usual_name))
            .collect();
        for text in ["", all_sections.as_str()] {
            let raw = super::super::uci::parse(text).unwrap();
            let (result, reads) = validate_reading(&raw);
            assert!(result.is_ok(), "{text:?}: {result:?}");
            for ty in TYPES {
                for (name, _) in ty.options {
                    assert!(
                        reads.contains(&(ty.kind, name.to_string())),
                        "cage.{}.{name} is in the schema but the validator never reads it: a \
                         file could set it and be silently ignored",
                        ty.usual_name
                    );
                }
            }
            for (kind, name) in &reads {
                assert!(
                    TYPES
                        .iter()
                        .any(|t| t.kind == *kind && t.options.iter().any(|(n, _)| n == name)),
                    "the validator reads {kind}.{name}, which the schema does not list"
                );
            }
        }
    }

    #[test]
    fn log_levels() {
        let cfg = crate::config::parse("config cage 'main'\n\toption log_level 'debug'\n").unwrap();
        assert_eq!(cfg.main.log_level, LogLevel::Debug);
        assert_eq!(
            crate::config::parse("").unwrap().main.log_level,
            LogLevel::Info
        );
        let e = crate::config::parse("config cage 'main'\n\toption log_level 'loud'\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cage.main.log_level (line 2): 'loud' is not a log level; give error, warning, info (the default)"),
            "{e}"
        );
    }

    #[test]
    fn suggestions() {
        let names = ["bridge", "address", "address6", "port", "vlan", "ipv6"];
        assert_eq!(nearest("adress", names.into_iter()), Some("address"));
        assert_eq!(nearest("ports", names.into_iter()), Some("port"));
        assert_eq!(nearest("Bridge", names.into_iter()), Some("bridge"));
        assert_eq!(nearest("ip6", names.into_iter()), Some("ipv6"));
        assert_eq!(nearest("masquerade", names.into_iter()), None);
    }
}
