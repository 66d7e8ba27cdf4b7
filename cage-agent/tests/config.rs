//! The configuration, end to end: the shipped example, a corpus of bad files with the
//! error each must produce, and mutated files that must never make the parser panic.

use std::fs;
use std::path::{Path, PathBuf};

use cage_agent::config::{self, Config, KillSwitch, Lan, Main, Segment, Wan, WanDevices};

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../openwrt/files/etc/config/cage")
}

fn example_text() -> String {
    fs::read_to_string(example_path()).expect("the example configuration is readable")
}

/// The configuration every option left out gives, spelled out field by field.
fn all_defaults() -> Config {
    Config {
        main: Main {
            state_dir: "/etc/cage".into(),
            log_dir: "/tmp/cage".into(),
            web_listen: "lan:2243".parse().unwrap(),
            bpf_dir: "/sys/fs/bpf/cage".into(),
            mode: cage_agent::config::Mode::Auto,
            password_hash: None,
            web_hostnames: vec![],
            web_tls: cage_agent::config::WebTls::Own,
            log_level: cage_agent::config::LogLevel::Info,
        },
        segment: Segment {
            bridge: "br-cage".into(),
            address: "192.168.10.1/24".parse().unwrap(),
            ipv6: false,
            address6: None,
            ports: vec![],
            vlan: None,
        },
        lan: Lan {
            devices: vec!["br-lan".into()],
            admin_hosts: vec![],
        },
        wan: Wan {
            devices: WanDevices::Auto,
            masquerade: true,
            upstream_subnets: vec![],
        },
        killswitch: KillSwitch::default(),
        flowlog: Default::default(),
        selftest: Default::default(),
        dns: Default::default(),
        limits: Default::default(),
        export: Default::default(),
    }
}

#[test]
fn example_config_parses_to_the_expected_config() {
    let config = config::load(&example_path()).unwrap_or_else(|e| panic!("{e}"));
    // The example differs from the defaults in these options only.
    let mut expected = all_defaults();
    expected.segment.ipv6 = true;
    expected.segment.address6 = Some("fd00:cafe:10::1/64".parse().unwrap());
    expected.killswitch.button = Some("BTN_0".into());
    expected.dns.enabled = true;
    assert_eq!(config, expected);
}

#[test]
fn empty_config_is_all_defaults() {
    let config = config::parse("# nothing here\n").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config, all_defaults());
}

#[test]
fn anonymous_sections_lists_and_uci_spellings() {
    let text = r#"
package cage
config cage
	option web_listen "[fd00:8::1]:80"
config segment
	option address 10.20.0.1/16
	option ipv6 yes
	option address6 '2001:db8:20::1/56'
	option port 'lan3'   # a lone option is a one-element list
config lan
	list device br-lan
	list device 'wlan0'
	list admin_host 192.168.8.10
	list admin_host fd00:8::10
config wan
	list device eth0
	list device 'wwan0'
	option masquerade off
	list upstream_subnet 10.0.0.0/16
	list upstream_subnet 100.64.0.1
"#;
    let config = config::parse(text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.main.web_listen, "[fd00:8::1]:80".parse().unwrap());
    assert_eq!(config.segment.subnet4().to_string(), "10.20.0.0/16");
    assert_eq!(
        config.segment.subnet6().map(|n| n.to_string()).as_deref(),
        Some("2001:db8:20::/56")
    );
    assert_eq!(config.segment.ports, ["lan3"]);
    assert_eq!(config.lan.devices, ["br-lan", "wlan0"]);
    assert_eq!(config.lan.admin_hosts.len(), 2);
    assert_eq!(
        config.wan.devices,
        WanDevices::List(vec!["eth0".into(), "wwan0".into()])
    );
    assert!(!config.wan.masquerade);
    let upstream: Vec<String> = config
        .wan
        .upstream_subnets
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(upstream, ["10.0.0.0/16", "100.64.0.1/32"]);
}

#[test]
fn address6_is_ignored_while_ipv6_is_off() {
    let config = config::parse(
        "config segment 'ai'\n\toption ipv6 '0'\n\toption address6 'fd00:cafe:10::1/64'\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(!config.segment.ipv6);
    assert_eq!(config.segment.address6, None);
}

#[test]
fn all_errors_are_reported_sorted_by_line() {
    let text = "config cage 'main'\n\toption state_dir 'etc'\n\
                config segment 'ai'\n\toption adress '10.0.0.1/24'\n\toption vlan '0'\n\
                config lan\n\tlist admin_host 'nope'\n";
    let errors = config::parse(text).unwrap_err();
    let lines: Vec<usize> = errors.0.iter().map(|e| e.line).collect();
    assert_eq!(lines, [2, 4, 5, 7], "{errors}");
    let shown = errors.to_string();
    assert!(shown.starts_with("4 errors in configuration\n  cage.main.state_dir (line 2): "));
    assert!(shown.contains("\n  cage.@lan[0].admin_host (line 7): 'nope' is not an IP address"));
}

/// Every file in `tests/bad-configs` starts with `# expect: <text>`, and the errors of
/// the file must contain that text.
#[test]
fn bad_configs_fail_with_the_expected_error() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad-configs");
    let mut paths: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "conf"))
        .collect();
    paths.sort();
    // The corpus must not silently vanish (a renamed directory, a bad glob).
    assert!(
        paths.len() >= 20,
        "only {} cases in {}",
        paths.len(),
        dir.display()
    );

    let mut failures = Vec::new();
    for path in &paths {
        let name = path.file_name().unwrap().to_string_lossy();
        let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let Some(expect) = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .map(str::trim_end)
        else {
            failures.push(format!("{name}: first line is not '# expect: <text>'"));
            continue;
        };
        if !expect.contains("line ") {
            failures.push(format!("{name}: the expectation must name the line"));
        }
        match config::parse(&text) {
            Ok(_) => failures.push(format!("{name}: accepted, expected {expect:?}")),
            Err(errors) => {
                let shown = errors.to_string();
                if !shown.contains(expect) {
                    failures.push(format!("{name}: expected {expect:?}, got:\n{shown}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad configs did not fail as expected:\n{}",
        failures.len(),
        paths.len(),
        failures.join("\n")
    );
}

/// A tiny xorshift generator: deterministic, and no new dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn mutated_configs_never_panic() {
    let example = example_text().into_bytes();
    // Bytes that matter to the parser and the validator, besides random ones.
    const INTERESTING: &[u8] = b"'\"\\#; \t\n\r/:.-_0123456789abcfxAZ@[]";
    let mut rng = XorShift(0x5eed_cafe_f00d_0001);
    let (mut accepted, mut rejected) = (0, 0);
    for _ in 0..10_000 {
        let mut bytes = example.clone();
        for _ in 0..1 + rng.below(8) {
            if bytes.is_empty() {
                break;
            }
            let at = rng.below(bytes.len());
            let byte = if rng.below(2) == 0 {
                INTERESTING[rng.below(INTERESTING.len())]
            } else {
                rng.next() as u8
            };
            match rng.below(4) {
                0 => bytes[at] = byte,
                1 => bytes.insert(at, byte),
                2 => {
                    bytes.remove(at);
                }
                _ => {
                    // Duplicate a slice of the file somewhere else (sections, options).
                    let len = rng.below(64).min(bytes.len() - at);
                    let piece = bytes[at..at + len].to_vec();
                    let to = rng.below(bytes.len());
                    bytes.splice(to..to, piece);
                }
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        match config::parse(&text) {
            Ok(_) => accepted += 1,
            Err(errors) => {
                assert!(!errors.0.is_empty(), "an Err without errors for:\n{text}");
                // Formatting must not panic either.
                let _ = errors.to_string();
                rejected += 1;
            }
        }
    }
    // Both outcomes happen, or the mutations are not exercising anything.
    assert!(
        accepted > 0 && rejected > 0,
        "{accepted} accepted, {rejected} rejected"
    );
}

#[test]
fn dns_section_options_and_defaults() {
    // No section: DNS is left to the router.
    let config = config::parse("config cage 'main'\n").unwrap_or_else(|e| panic!("{e}"));
    assert!(!config.dns.enabled);
    // An empty section: on, open, the defaults.
    let config = config::parse("config dns 'dns'\n").unwrap_or_else(|e| panic!("{e}"));
    assert!(config.dns.enabled);
    assert_eq!(config.dns.egress, config::Egress::Open);
    assert_eq!(config.dns.listen_port, 5354);
    assert!(config.dns.doh_block.iter().any(|d| d == "dns.google"));
    let text = "config dns 'dns'\n\
                \toption egress 'allowlist'\n\
                \tlist allow_domain 'API.Anthropic.com.'\n\
                \tlist allow_domain '*.githubusercontent.com'\n\
                \tlist upstream '127.0.0.1'\n\
                \tlist upstream '[2001:db8::53]:5353'\n\
                \toption ttl_floor '30'\n\
                \toption ttl_max '600'\n\
                \toption max_qps '5'\n\
                \toption burst '10'\n\
                \toption max_name_length '80'\n\
                \tlist doh_block 'doh.example.net'\n\
                \tlist doh_block_ip '9.9.9.9'\n\
                \toption auto_violations '50'\n";
    let d = config::parse(text).unwrap_or_else(|e| panic!("{e}")).dns;
    assert_eq!(d.egress, config::Egress::Allowlist);
    assert_eq!(
        d.allow_domains,
        ["api.anthropic.com", "*.githubusercontent.com"]
    );
    assert_eq!(
        d.upstreams,
        [
            "127.0.0.1:53".parse().unwrap(),
            "[2001:db8::53]:5353".parse().unwrap()
        ]
    );
    assert_eq!(
        (d.ttl_floor, d.ttl_max, d.max_qps, d.burst),
        (30, 600, 5, 10)
    );
    assert_eq!(d.max_name_length, 80);
    // A doh_block list replaces the built-in one.
    assert_eq!(d.doh_block, ["doh.example.net"]);
    assert_eq!(
        d.doh_block_ips,
        ["9.9.9.9".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(d.auto_violations, 50);
    let off = config::parse("config dns 'dns'\n\toption enabled '0'\n").unwrap();
    assert!(!off.dns.enabled);
}

#[test]
fn bad_dns_options_are_refused_with_place_and_example() {
    let text = "config dns 'dns'\n\
                \toption egress 'closed'\n\
                \tlist allow_domain 'bad name.com'\n\
                \tlist allow_domain '*.com'\n\
                \tlist upstream 'resolver.local'\n\
                \toption listen_port '53'\n\
                \toption ttl_floor '7200'\n\
                \toption ttl_max '3600'\n\
                \toption max_qps '0'\n\
                \toption max_name_length '500'\n\
                \tlist doh_block_ip 'dns.google'\n\
                \toption allow_domains 'x.com'\n";
    let errors = config::parse(text).expect_err("bad dns options accepted").0;
    let text_of = |option: &str| {
        errors
            .iter()
            .filter(|e| e.option.as_deref() == Some(option))
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(text_of("egress")
        .contains("cage.dns.egress (line 2): 'closed' is not an egress mode; give open"));
    let allow = text_of("allow_domain");
    assert!(
        allow.contains("(line 3): 'bad name.com' is not a domain name"),
        "{allow}"
    );
    assert!(allow.contains("(line 4): '*.com' is not a domain name or wildcard (a wildcard needs at least two labels"), "{allow}");
    assert!(text_of("upstream").contains("give IP or IP:PORT, e.g. 127.0.0.1:53"));
    assert!(text_of("listen_port").contains("from 1024 to 65535"));
    assert!(text_of("ttl_floor").contains("ttl_floor 7200 is above ttl_max 3600"));
    assert!(text_of("max_qps").contains("'0' is not a whole number from 1 to"));
    assert!(text_of("max_name_length").contains("from 16 to 253"));
    assert!(text_of("doh_block_ip").contains("is not an IPv4 or IPv6 address"));
    assert!(
        text_of("allow_domains").contains("did you mean 'allow_domain'"),
        "{}",
        text_of("allow_domains")
    );
    assert_eq!(errors.len(), 10, "{errors:?}");
}

#[test]
fn export_section_gives_each_collector_with_its_defaults() {
    let text = "config export 'export'\n\
                \toption syslog 'tls://[2001:db8::5]'\n\
                \toption syslog_ca '/etc/cage/collector-ca.pem'\n\
                \toption syslog_name 'Logs.Example.'\n\
                \toption syslog_flows '1'\n\
                \toption ipfix '192.0.2.7'\n\
                \toption metrics_token 'abcdefghijklmnop'\n\
                \tlist metrics_allow '192.168.8.0/24'\n";
    let cfg = config::parse(text).unwrap_or_else(|e| panic!("{e}"));
    let syslog = cfg.export.syslog.expect("syslog set");
    assert_eq!(syslog.transport, config::SyslogTransport::Tls);
    assert_eq!(syslog.server, "[2001:db8::5]:6514".parse().unwrap());
    assert_eq!(syslog.server_name.as_deref(), Some("logs.example"));
    assert!(syslog.flows);
    assert_eq!(syslog.queue, 1024);
    let ipfix = cfg.export.ipfix.expect("ipfix set");
    assert_eq!(ipfix.collector, "192.0.2.7:4739".parse().unwrap());
    assert_eq!((ipfix.template_interval, ipfix.domain), (60, 1));
    assert!(cfg.export.metrics.enabled());
    assert_eq!(
        cfg.export.metrics.allow,
        vec!["192.168.8.0/24".parse().unwrap()]
    );

    let none = config::parse("config export 'export'\n").unwrap();
    assert_eq!(none.export, config::Export::default());
    assert!(!none.export.metrics.enabled());
}
