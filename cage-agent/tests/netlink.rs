//! Kernel tests of `cage_agent::netlink`, each in a network namespace of its own.
//!
//! Needs root (it creates network namespaces); run as anyone else it fails, loudly. Every
//! test makes a uniquely named namespace with `ip netns add`, runs the code under test on
//! a thread moved into it with `setns` (network namespaces are per thread, so the test
//! drives a current-thread tokio runtime on that very thread), and checks the result from
//! outside with `ip -n NS … -j` rather than with the code under test. A guard deletes the
//! namespace when the test ends, failed or not.

use std::future::Future;
use std::process::Command;

use cage_agent::config::Config;
use cage_agent::netlink::{self, NetlinkError, PortState};
use cage_agent::probe::NetNsGuard;
use serde_json::{json, Value};

/// A throwaway network namespace (`cage_agent::probe::NetNsGuard`, deleted on drop) and
/// the checks from outside that these tests make in it.
struct NetNs {
    guard: NetNsGuard,
}

impl NetNs {
    fn new(tag: &str) -> Self {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "the netlink tests create network namespaces and must run as root (euid is {euid}); \
             they do not skip"
        );
        let name = format!("cage-nl-{tag}-{}", std::process::id());
        let guard = NetNsGuard::named(name).unwrap_or_else(|e| panic!("{e}"));
        NetNs { guard }
    }

    /// `ip -n NS ARGS…`, which must succeed; returns stdout.
    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.guard.name()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    fn ip_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["-j"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ip(&all)).expect("ip -j prints JSON")
    }

    fn sysctl(&self, path: &str) -> String {
        run("ip", &["netns", "exec", self.guard.name(), "cat", path])
            .trim()
            .to_string()
    }

    fn set_sysctl(&self, path: &str, value: &str) {
        run(
            "ip",
            &[
                "netns",
                "exec",
                self.guard.name(),
                "sh",
                "-c",
                &format!("echo {value} > {path}"),
            ],
        );
    }

    /// Run `f` on a thread inside the namespace, on a current-thread runtime, and return
    /// its result; a panic in `f` fails the test (after the guard has cleaned up).
    fn run<T, F, Fut>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
    {
        let ns = self.guard.netns().clone();
        let thread = std::thread::spawn(move || {
            ns.enter_this_thread().unwrap_or_else(|e| panic!("{e}"));
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(f())
        });
        match thread.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// Run a command that must succeed; returns stdout.
fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

const IPV4_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const IPV6_FORWARD: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// The segment on `ports`, the WAN on `wan` (none: detected), with `upstream` subnets,
/// parsed from UCI text as `cage` reads it.
fn config(ports: &[&str], wan: &[&str], upstream: &[&str]) -> Config {
    let list = |option: &str, values: &[&str]| -> String {
        values
            .iter()
            .map(|v| format!("\tlist {option} '{v}'\n"))
            .collect()
    };
    let text = format!(
        "config cage 'main'\n\toption web_listen '192.168.8.1:8080'\n\
         config segment 'ai'\n\toption address '192.168.10.1/24'\n\toption ipv6 '1'\n\
         \toption address6 'fd00:cafe:10::1/64'\n{}\toption vlan '10'\n\
         config wan 'wan'\n{}{}",
        list("port", ports),
        list("device", wan),
        list("upstream_subnet", upstream),
    );
    cage_agent::config::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

impl NetNs {
    /// A namespace with a veth pair for each `(name, peer)`, the peer up (so the port
    /// gets a carrier once up).
    fn with_veths(tag: &str, veths: &[(&str, &str)]) -> Self {
        let ns = NetNs::new(tag);
        for (name, peer) in veths {
            ns.ip(&["link", "add", name, "type", "veth", "peer", "name", peer]);
            ns.ip(&["link", "set", peer, "up"]);
        }
        ns
    }
}

/// Setup of `cfg` in `ns`, which must be refused and change nothing: why it was refused.
fn refused_setup(ns: &NetNs, cfg: Config) -> NetlinkError {
    let before = snapshot(ns);
    let err = ns.run(move || async move { netlink::setup_segment(&cfg).await.unwrap_err() });
    assert_eq!(snapshot(ns), before, "a refused setup changed something");
    err
}

/// Everything setup could change, read with iproute2: links (index, master, admin state,
/// kind, isolation), global addresses, forwarding switches. Leaves out what the kernel
/// changes by itself over time (carrier, operstate, link-local addresses, DAD state).
fn snapshot(ns: &NetNs) -> Value {
    let links: Vec<Value> = ns
        .ip_json(&["-d", "link", "show"])
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            json!({
                "ifindex": l["ifindex"],
                "ifname": l["ifname"],
                "master": l["master"],
                "up": flags(l).contains(&"UP".to_string()),
                "kind": l["linkinfo"]["info_kind"],
                "isolated": l["linkinfo"]["info_slave_data"]["isolated"],
            })
        })
        .collect();
    let addrs: Vec<Value> = ns
        .ip_json(&["addr", "show"])
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let global: Vec<Value> = l["addr_info"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| a["scope"] != "link")
                .map(|a| json!([a["local"], a["prefixlen"]]))
                .collect();
            json!({ "ifname": l["ifname"], "addrs": global })
        })
        .collect();
    json!({
        "links": links,
        "addrs": addrs,
        "ip_forward": ns.sysctl(IPV4_FORWARD),
        "ipv6_forwarding": ns.sysctl(IPV6_FORWARD),
    })
}

fn flags(link: &Value) -> Vec<String> {
    link["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_string())
        .collect()
}

fn link(ns: &NetNs, name: &str) -> Value {
    ns.ip_json(&["-d", "link", "show", "dev", name])[0].clone()
}

fn assert_isolated_port(ns: &NetNs, name: &str) {
    let l = link(ns, name);
    assert_eq!(l["master"], "br-cage", "{name}: {l:#}");
    assert!(flags(&l).contains(&"UP".into()), "{name} is not up: {l:#}");
    assert_eq!(l["linkinfo"]["info_slave_kind"], "bridge", "{name}: {l:#}");
    assert_eq!(
        l["linkinfo"]["info_slave_data"]["isolated"], true,
        "{name} is not isolated: {l:#}"
    );
}

fn global_addrs(ns: &NetNs, dev: &str) -> Vec<(String, u64, Value)> {
    ns.ip_json(&["addr", "show", "dev", dev])[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["scope"] != "link")
        .map(|a| {
            (
                a["local"].as_str().unwrap().to_string(),
                a["prefixlen"].as_u64().unwrap(),
                a["nodad"].clone(),
            )
        })
        .collect()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn setup_builds_the_segment_and_a_second_run_changes_nothing() {
    let ns = NetNs::with_veths(
        "setup",
        // other0: a device the configuration does not name; setup must leave it alone.
        &[
            ("cage1", "peer1"),
            ("cage2", "peer2"),
            ("other0", "otherpeer"),
        ],
    );
    ns.set_sysctl(IPV4_FORWARD, "0");
    ns.set_sysctl(IPV6_FORWARD, "0");
    let untouched = link(&ns, "other0");

    let cfg = config(&["cage1", "cage2"], &[], &[]);
    let c = cfg.clone();
    let report = ns.run(move || async move { netlink::setup_segment(&c).await.unwrap() });
    assert_eq!(
        report.actions,
        strings(&[
            "created bridge br-cage",
            "added address 192.168.10.1/24 to br-cage",
            "added address fd00:cafe:10::1/64 to br-cage",
            "added port cage1 to br-cage",
            "set cage1 up",
            "isolated port cage1",
            "added port cage2 to br-cage",
            "set cage2 up",
            "isolated port cage2",
            "enabled IPv4 forwarding",
            "enabled IPv6 forwarding",
        ])
    );

    // Checked from outside, with iproute2.
    let br = link(&ns, "br-cage");
    assert_eq!(br["linkinfo"]["info_kind"], "bridge", "{br:#}");
    assert!(flags(&br).contains(&"UP".into()), "{br:#}");
    let addrs = global_addrs(&ns, "br-cage");
    assert!(
        addrs.contains(&("192.168.10.1".into(), 24, Value::Null)),
        "{addrs:?}"
    );
    assert!(
        addrs.contains(&("fd00:cafe:10::1".into(), 64, Value::Bool(true))),
        "IPv6 router address missing or without nodad: {addrs:?}"
    );
    assert_isolated_port(&ns, "cage1");
    assert_isolated_port(&ns, "cage2");
    assert_eq!(ns.sysctl(IPV4_FORWARD), "1");
    assert_eq!(ns.sysctl(IPV6_FORWARD), "1");
    assert_eq!(link(&ns, "other0"), untouched);

    // The second run: nothing to do, nothing done.
    let before = snapshot(&ns);
    let c = cfg.clone();
    let report = ns.run(move || async move { netlink::setup_segment(&c).await.unwrap() });
    assert!(
        report.is_empty(),
        "second run reported {:?}",
        report.actions
    );
    assert_eq!(snapshot(&ns), before);

    let c = cfg.clone();
    let states = ns.run(move || async move { netlink::port_states(&c).await.unwrap() });
    for s in &states {
        assert!(
            s.exists && s.in_bridge && s.isolated && s.up && s.carrier,
            "{s:?}"
        );
    }
    assert_eq!(states.len(), 2);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn setup_completes_a_half_built_segment() {
    let ns = NetNs::with_veths("adopt", &[("cage1", "peer1"), ("cage2", "peer2")]);
    ns.ip(&["link", "add", "br-cage", "type", "bridge"]);
    ns.ip(&["addr", "add", "192.168.10.1/24", "dev", "br-cage"]);
    ns.ip(&["link", "set", "cage1", "master", "br-cage"]);
    ns.ip(&["link", "set", "cage1", "up"]);
    ns.set_sysctl(IPV4_FORWARD, "1");
    ns.set_sysctl(IPV6_FORWARD, "1");
    let bridge_index = link(&ns, "br-cage")["ifindex"].clone();

    let cfg = config(&["cage1", "cage2"], &[], &[]);
    let report = ns.run(move || async move { netlink::setup_segment(&cfg).await.unwrap() });
    assert_eq!(
        report.actions,
        strings(&[
            "set br-cage up",
            "added address fd00:cafe:10::1/64 to br-cage",
            "isolated port cage1",
            "added port cage2 to br-cage",
            "set cage2 up",
            "isolated port cage2",
        ])
    );
    assert_eq!(
        link(&ns, "br-cage")["ifindex"],
        bridge_index,
        "bridge recreated"
    );
    assert_isolated_port(&ns, "cage1");
    assert_isolated_port(&ns, "cage2");
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn setup_refuses_missing_ports_and_changes_nothing() {
    let ns = NetNs::with_veths("missing", &[("cage1", "peer1")]);
    let err = refused_setup(&ns, config(&["cage1", "nosuch0"], &[], &[]));
    assert!(
        matches!(&err, NetlinkError::MissingPorts { ifnames } if ifnames == &["nosuch0"]),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("nosuch0") && msg.contains("does not exist"),
        "{msg}"
    );
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn setup_refuses_a_non_bridge_with_the_bridge_name() {
    // The development kernel has no dummy devices; a veth is just as much not a bridge.
    let ns = NetNs::with_veths("notbr", &[("cage1", "peer1"), ("br-cage", "brpeer")]);
    let err = refused_setup(&ns, config(&["cage1"], &[], &[]));
    assert!(
        matches!(&err, NetlinkError::NotABridge { ifname, .. } if ifname == "br-cage"),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("br-cage") && msg.contains("veth"), "{msg}");
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn port_states_of_an_unbuilt_segment() {
    let ns = NetNs::with_veths("states", &[("cage1", "peer1")]);

    let cfg = config(&["cage1", "nosuch0"], &[], &[]);
    let states = ns.run(move || async move { netlink::port_states(&cfg).await.unwrap() });
    assert_eq!(
        states,
        vec![
            PortState {
                name: "cage1".into(),
                exists: true,
                in_bridge: false,
                isolated: false,
                up: false,
                carrier: false,
            },
            PortState {
                name: "nosuch0".into(),
                exists: false,
                in_bridge: false,
                isolated: false,
                up: false,
                carrier: false,
            },
        ]
    );
}

/// A WAN veth with IPv4 and IPv6 addresses (global and link-local) and both default
/// routes, plus a LAN-ish device with addresses that must not count as upstream.
fn wan_namespace(tag: &str) -> NetNs {
    let ns = NetNs::with_veths(tag, &[("wan0", "wanpeer"), ("lan0", "lanpeer")]);
    ns.ip(&["link", "set", "wan0", "up"]);
    ns.ip(&["addr", "add", "198.51.100.2/24", "dev", "wan0"]);
    ns.ip(&["addr", "add", "10.99.3.5/16", "dev", "wan0"]);
    ns.ip(&["addr", "add", "2001:db8:1::2/64", "dev", "wan0", "nodad"]);
    ns.ip(&["addr", "add", "fe80::2/64", "dev", "wan0", "nodad"]);
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "198.51.100.1",
        "dev",
        "wan0",
    ]);
    ns.ip(&[
        "-6",
        "route",
        "add",
        "default",
        "via",
        "2001:db8:1::1",
        "dev",
        "wan0",
    ]);
    ns.ip(&["link", "set", "lan0", "up"]);
    ns.ip(&["addr", "add", "192.168.8.1/24", "dev", "lan0"]);
    ns.ip(&["addr", "add", "fd00:8::1/64", "dev", "lan0", "nodad"]);
    // A default route in another table is not the main table's.
    ns.ip(&["route", "add", "default", "dev", "lan0", "table", "100"]);
    ns
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn detect_facts_finds_the_default_route_device_and_its_subnets() {
    let ns = wan_namespace("facts");
    let cfg = config(&[], &[], &["10.0.0.0/8", "fd00:99::/48"]);
    let facts = ns.run(move || async move { netlink::detect_facts(&cfg).await.unwrap() });

    assert_eq!(facts.wan_devices, strings(&["wan0"]));
    let v4: Vec<String> = facts.upstream4.iter().map(|n| n.to_string()).collect();
    assert_eq!(
        v4,
        strings(&["10.0.0.0/8", "10.99.0.0/16", "198.51.100.0/24"])
    );
    let v6: Vec<String> = facts.upstream6.iter().map(|n| n.to_string()).collect();
    assert_eq!(v6, strings(&["2001:db8:1::/64", "fd00:99::/48"]));
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn detect_facts_with_a_configured_list() {
    let ns = wan_namespace("factslist");
    // lan0 configured as a WAN (odd, but the configuration decides), plus a device that
    // does not exist (yet): listed, no addresses.
    let cfg = config(&[], &["lan0", "wwan0"], &["192.168.8.0/24"]);
    let facts = ns.run(move || async move { netlink::detect_facts(&cfg).await.unwrap() });

    assert_eq!(facts.wan_devices, strings(&["lan0", "wwan0"]));
    let v4: Vec<String> = facts.upstream4.iter().map(|n| n.to_string()).collect();
    assert_eq!(v4, strings(&["192.168.8.0/24"]));
    let v6: Vec<String> = facts.upstream6.iter().map(|n| n.to_string()).collect();
    assert_eq!(v6, strings(&["fd00:8::/64"]));
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn detect_facts_without_default_route_finds_no_wan() {
    let ns = NetNs::with_veths("noroute", &[("wan0", "wanpeer")]);
    ns.ip(&["link", "set", "wan0", "up"]);
    ns.ip(&["addr", "add", "198.51.100.2/24", "dev", "wan0"]);

    let cfg = config(&[], &[], &["10.0.0.0/8"]);
    let facts = ns.run(move || async move { netlink::detect_facts(&cfg).await.unwrap() });
    assert!(facts.wan_devices.is_empty(), "{facts:?}");
    let v4: Vec<String> = facts.upstream4.iter().map(|n| n.to_string()).collect();
    assert_eq!(v4, strings(&["10.0.0.0/8"]));
    assert!(facts.upstream6.is_empty(), "{facts:?}");
}
