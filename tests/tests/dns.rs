//! DNS through the router, names on flows and the egress allow-list by domain, in the
//! lab with real packets: the internet namespace runs an authoritative server for a test
//! zone (and a second, "outside" server that caged hosts must not be able to use), TCP
//! listeners note which destinations were really reached.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use cage_agent::nft::AllowElement;
use cage_tests::browser::{self, Browser, Driver};
use cage_tests::contract;
use cage_tests::dns::{connects, resolve, Answer, AuthServer, Listeners, Resolved};
use cage_tests::lab::{
    self, CageRun, Lab, Node, AI1_4, PUBLIC4, PUBLIC6, ROUTER_SEG4, ROUTER_SEG6,
};
use cage_tests::require_root;
use simple_dns::RCODE;

const ALLOWED4: &str = "203.0.113.20";
const ALLOWED6: &str = "2001:db8:203::20";
const OTHER4: &str = "203.0.113.21";
const OTHER6: &str = "2001:db8:203::21";
const EDGE4: &str = "203.0.113.23";
/// A DNS server outside that a caged host tries to use instead of the router.
const OUTSIDE_DNS4: &str = "203.0.113.53";
const OUTSIDE_DNS6: &str = "2001:db8:203::53";
const T: Duration = Duration::from_secs(2);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(a: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip(a), port)
}

/// The lab with the test zone's addresses on the internet host, its authoritative server
/// on PUBLIC4/PUBLIC6, an outside server answering everything with a wrong address, and
/// listeners on 443 and 853.
struct DnsLab {
    lab: Lab,
    auth: AuthServer,
    outside: AuthServer,
    listeners: Listeners,
}

fn zone() -> HashMap<String, Answer> {
    let mut z = HashMap::new();
    z.insert(
        "allowed.test".into(),
        Answer::Addrs(vec![ip(ALLOWED4), ip(ALLOWED6)]),
    );
    z.insert(
        "other.test".into(),
        Answer::Addrs(vec![ip(OTHER4), ip(OTHER6)]),
    );
    z.insert(
        "alias.allowed.test".into(),
        Answer::Cname("edge.cdn.test".into()),
    );
    z.insert("edge.cdn.test".into(), Answer::Addrs(vec![ip(EDGE4)]));
    z.insert("dns.google".into(), Answer::Addrs(vec![ip("203.0.113.88")]));
    z
}

fn dns_lab(dns_section: &str) -> DnsLab {
    let lab = Lab::for_test();
    for a in [ALLOWED4, OTHER4, EDGE4, OUTSIDE_DNS4, "203.0.113.88"] {
        lab.ip(
            Node::Inet,
            &["addr", "add", &format!("{a}/32"), "dev", "lo"],
        )
        .unwrap();
    }
    for a in [ALLOWED6, OTHER6, OUTSIDE_DNS6] {
        lab.ip(
            Node::Inet,
            &["addr", "add", &format!("{a}/128"), "dev", "lo", "nodad"],
        )
        .unwrap();
    }
    let inet = lab.netns(Node::Inet);
    let auth = AuthServer::start(
        &inet,
        &[SocketAddr::new(PUBLIC4, 53), SocketAddr::new(PUBLIC6, 53)],
        zone(),
        300,
    )
    .expect("auth server");
    let mut wrong = HashMap::new();
    for name in ["allowed.test", "other.test"] {
        wrong.insert(name.to_owned(), Answer::Addrs(vec![ip("203.0.113.99")]));
    }
    let outside = AuthServer::start(
        &inet,
        &[sa(OUTSIDE_DNS4, 53), sa(OUTSIDE_DNS6, 53)],
        wrong,
        300,
    )
    .expect("outside server");
    let listeners = Listeners::start(&inet, &[443, 853]).expect("listeners");
    lab.write_config(&format!(
        "\nconfig flowlog 'flowlog'\n\toption idle_timeout '1'\n\n{dns_section}"
    ));
    DnsLab {
        lab,
        auth,
        outside,
        listeners,
    }
}

/// [`dns_lab`] with `cage run` on it, its policy applied and the segment ready.
fn running_dns_lab(dns_section: &str) -> (DnsLab, CageRun) {
    let l = dns_lab(dns_section);
    let run = l.lab.cage_run_ready();
    (l, run)
}

fn ask(l: &DnsLab, node: Node, server: SocketAddr, name: &str, v6: bool, tcp: bool) -> Resolved {
    resolve(&l.lab.netns(node), server, name, v6, tcp, T)
        .unwrap_or_else(|e| panic!("resolving {name} at {server} (tcp {tcp}): {e}"))
}

fn router_dns4() -> SocketAddr {
    SocketAddr::new(ROUTER_SEG4, 53)
}
fn router_dns6() -> SocketAddr {
    SocketAddr::new(ROUTER_SEG6, 53)
}

/// Wait (at most 15 s) for a flow record matching `pred`.
fn wait_flow(
    lab: &Lab,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let all = lab.flow_records();
        if let Some(r) = all.iter().find(|r| pred(r)) {
            return r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no flow record {what}; records:\n{}",
            all.iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

const ALLOWLIST: &str = "config dns 'dns'\n\
     \toption egress 'allowlist'\n\
     \tlist allow_domain 'allowed.test'\n\
     \tlist allow_domain '*.allowed.test'\n\
     \tlist upstream '203.0.113.10'\n\
     \toption max_qps '20'\n\
     \toption burst '40'\n\
     \toption max_name_length '100'\n";

#[test]
#[ignore = "needs root: cargo xtask test"]
fn allowlist_allows_only_answers_to_allowed_names_over_ipv4_and_ipv6() {
    let (l, run) = running_dns_lab(ALLOWLIST);
    let ai1 = l.lab.netns(Node::Ai1);

    // An allowed name resolves through the router, over UDP and TCP, IPv4 and IPv6…
    let r = ask(&l, Node::Ai1, router_dns4(), "allowed.test", false, false);
    assert_eq!(r.rcode, RCODE::NoError);
    assert_eq!(r.addrs, vec![ip(ALLOWED4)]);
    let r = ask(&l, Node::Ai1, router_dns6(), "allowed.test", true, true);
    assert_eq!(r.addrs, vec![ip(ALLOWED6)]);
    // …and its addresses are reachable at once, both families.
    for dst in [sa(ALLOWED4, 443), sa(ALLOWED6, 443)] {
        assert!(
            connects(&ai1, dst, T),
            "{dst} not reachable after resolving allowed.test"
        );
        assert!(
            l.listeners.reached(dst),
            "{dst}: connected, but not to the listener"
        );
    }
    // The name asked for counts, not the CNAME's target.
    let r = ask(
        &l,
        Node::Ai1,
        router_dns4(),
        "alias.allowed.test",
        false,
        false,
    );
    assert_eq!(r.addrs, vec![ip(EDGE4)]);
    assert!(
        connects(&ai1, sa(EDGE4, 443), T),
        "CNAME target not reachable"
    );

    // A name that is not allowed is refused, and its addresses stay unreachable.
    let r = ask(&l, Node::Ai1, router_dns4(), "other.test", false, false);
    assert_eq!(r.rcode, RCODE::Refused);
    assert!(r.addrs.is_empty());
    for dst in [sa(OTHER4, 443), sa(OTHER6, 443)] {
        assert!(
            !connects(&ai1, dst, T),
            "{dst} reachable though other.test is not allowed"
        );
        assert!(!l.listeners.reached(dst));
    }
    // No internet address is reachable by IP alone.
    for dst in [SocketAddr::new(PUBLIC4, 443), SocketAddr::new(PUBLIC6, 443)] {
        assert!(!connects(&ai1, dst, T), "{dst} reachable directly by IP");
        assert!(!l.listeners.reached(dst));
    }

    // Another DNS server cannot be used: UDP and TCP port 53 to it are answered by Cage
    // (the real answer, from the configured upstream), never by that server.
    for (server, v6) in [(sa(OUTSIDE_DNS4, 53), false), (sa(OUTSIDE_DNS6, 53), true)] {
        for tcp in [false, true] {
            let r = ask(&l, Node::Ai1, server, "allowed.test", v6, tcp);
            let want = if v6 { ALLOWED6 } else { ALLOWED4 };
            assert_eq!(r.addrs, vec![ip(want)], "{server} tcp {tcp}");
            let r = ask(&l, Node::Ai1, server, "other.test", v6, tcp);
            assert_eq!(r.rcode, RCODE::Refused, "{server} tcp {tcp}");
        }
    }
    assert_eq!(l.outside.queries(), 0, "the outside DNS server got queries");
    // DNS over TLS is refused, whoever the server.
    for dst in [
        sa(OUTSIDE_DNS4, 853),
        sa(OUTSIDE_DNS6, 853),
        sa(ALLOWED4, 853),
    ] {
        assert!(!connects(&ai1, dst, T), "DNS over TLS to {dst} got through");
        assert!(!l.listeners.reached(dst));
    }
    assert!(l.auth.queries() > 0);

    // Flow records carry the names that were resolved; the blocked attempts are
    // recorded as not allow-listed.
    let rec = wait_flow(&l.lab, "to allowed.test", |r| {
        r["peer"] == ALLOWED4 && r["verdict"] == "allowed"
    });
    assert_eq!(rec["name"], "allowed.test", "{rec}");
    let rec = wait_flow(&l.lab, "to allowed.test over IPv6", |r| {
        r["peer"] == ALLOWED6 && r["verdict"] == "allowed"
    });
    assert_eq!(rec["name"], "allowed.test", "{rec}");
    let rec = wait_flow(&l.lab, "to the CNAME's address", |r| r["peer"] == EDGE4);
    assert_eq!(rec["name"], "alias.allowed.test", "{rec}");
    let rec = wait_flow(&l.lab, "blocked to other.test's address", |r| {
        r["peer"] == OTHER4 && r["verdict"] == "blocked"
    });
    assert_eq!(rec["rule"], "deny:not-allowlisted", "{rec}");
    // A blocked flow to a resolved name's address carries the name too (DoT to
    // allowed.test), and says which rule blocked it.
    let rec = wait_flow(&l.lab, "blocked DoT to allowed.test", |r| {
        r["peer"] == ALLOWED4 && r["peer_port"] == 853
    });
    assert_eq!(rec["verdict"], "blocked", "{rec}");
    assert_eq!(rec["rule"], "deny:dot", "{rec}");
    assert_eq!(rec["name"], "allowed.test", "{rec}");
    let table = String::from_utf8_lossy(&l.lab.cage(&["flows", "-n", "0"]).stdout).into_owned();
    assert!(
        table.contains("(allowed.test)"),
        "cage flows table:\n{table}"
    );

    drop(run);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn a_refused_name_is_reviewed_and_allowed_without_restarting() {
    let (l, mut run) = running_dns_lab(ALLOWLIST);
    let ai1 = l.lab.netns(Node::Ai1);
    // Learned before the reload: must stay reachable across it.
    ask(&l, Node::Ai1, router_dns4(), "allowed.test", false, false);

    for _ in 0..3 {
        let r = ask(&l, Node::Ai1, router_dns4(), "other.test", false, false);
        assert_eq!(r.rcode, RCODE::Refused);
    }
    // Written within a second or two.
    let deadline = Instant::now() + Duration::from_secs(5);
    let refused = loop {
        let out = l.lab.cage(&["dns", "refused", "--json"]);
        assert!(out.status.success(), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if v.as_array().is_some_and(|a| !a.is_empty()) || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let entry = refused
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "other.test")
        .unwrap_or_else(|| panic!("other.test not in the refused list: {refused}"));
    assert_eq!(entry["count"], 3);
    assert_eq!(entry["hosts"][0], AI1_4.to_string());

    let pid = run.pid();
    let out = l.lab.cage(&["dns", "allow", "other.test"]);
    assert!(out.status.success(), "cage dns allow: {out:?}");
    // The running daemon reloads: the name resolves and its address is reachable.
    other_test_allowed(&l, &run, "cage dns allow");
    let text = std::fs::read_to_string(l.lab.config_path()).unwrap();
    // The address learned before the reload is still allowed (put back after it).
    assert!(
        connects(&ai1, sa(ALLOWED4, 443), T),
        "allowed.test lost in the reload"
    );
    assert!(
        run.is_running() && run.pid() == pid,
        "cage run was restarted"
    );
    // Allowed names are no longer for review.
    let out = l.lab.cage(&["dns", "refused", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .all(|r| r["name"] != "other.test"),
        "{v}"
    );
    // A bad name is refused with a clear error and the file stays as it was.
    let out = l.lab.cage(&["dns", "allow", "bad name..test"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a domain name"),
        "{out:?}"
    );
    assert_eq!(std::fs::read_to_string(l.lab.config_path()).unwrap(), text);

    // A bad configuration on reload is refused and the running policy and forwarder
    // stay: both names still resolve and are reachable.
    let bad = text.replace("option egress 'allowlist'", "option egress 'closed'");
    assert_ne!(bad, text);
    std::fs::write(l.lab.config_path(), &bad).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    run.wait_until(Duration::from_secs(10), "reload not refused", || {
        run.log().contains("new configuration refused")
    });
    for (name, addr) in [("other.test", OTHER4), ("allowed.test", ALLOWED4)] {
        let r = ask(&l, Node::Ai1, router_dns4(), name, false, false);
        assert_eq!(r.addrs, vec![ip(addr)], "{name} after a refused reload");
        assert!(
            connects(&ai1, sa(addr, 443), T),
            "{addr} after a refused reload"
        );
    }
    let r = ask(&l, Node::Ai2, router_dns4(), "unlisted.test", false, false);
    assert_eq!(
        r.rcode,
        RCODE::Refused,
        "allow-list mode lost in a refused reload"
    );
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn query_floods_and_long_names_are_refused_counted_and_logged() {
    let (l, run) = running_dns_lab(ALLOWLIST);
    let ai2 = l.lab.netns(Node::Ai2);
    // 200 queries as fast as they go: beyond the burst (40) and the rate (20/s), REFUSED.
    let refused = ai2
        .run("flood", || {
            let mut refused = 0;
            for _ in 0..200 {
                if let Ok(r) =
                    cage_tests::dns::resolve_here(router_dns4(), "allowed.test", false, false, T)
                {
                    if r.rcode == RCODE::Refused {
                        refused += 1;
                    }
                }
            }
            Ok(refused)
        })
        .unwrap();
    assert!(
        refused >= 100,
        "only {refused} of 200 flood queries refused"
    );
    // ai1 has a bucket of its own.
    let r = ask(&l, Node::Ai1, router_dns4(), "allowed.test", false, false);
    assert_eq!(r.rcode, RCODE::NoError);

    // An over-long name (exfiltration-style labels): REFUSED before any upstream sees it.
    let before = l.auth.queries();
    let long = format!("{}.{}.allowed.test", "a".repeat(60), "b".repeat(50));
    let r = ask(&l, Node::Ai1, router_dns4(), &long, false, false);
    assert_eq!(r.rcode, RCODE::Refused);
    assert_eq!(l.auth.queries(), before, "the long name was forwarded");

    // Counted in cage status (the forwarder writes its counters every SAVE_EVERY), and
    // logged (at a bounded rate).
    let status = || -> serde_json::Value {
        let out = l.lab.cage(&["status", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let s = cage_tests::wait::until(
        "the long name's refusal in cage status",
        Duration::from_secs(15),
        || Some(status()).filter(|s| s["dns"]["refused_long"] == 1),
    );
    let dns = &s["dns"];
    assert!(dns["refused_rate"].as_u64().unwrap() >= 100, "{dns}");
    assert_eq!(dns["refused_long"], 1, "{dns}");
    assert!(
        dns["violations"][lab::AI2_4.to_string()].as_u64().unwrap() >= 100,
        "{dns}"
    );
    assert_eq!(dns["violations"][AI1_4.to_string()], 1, "{dns}");
    let text = String::from_utf8_lossy(&l.lab.cage(&["status"]).stdout).into_owned();
    assert!(text.contains("limit violations"), "{text}");
    let log = run.log();
    assert!(log.contains("queries a second: REFUSED"), "{log}");
    assert!(log.contains("characters (limit 100): REFUSED"), "{log}");
    let lines = log
        .lines()
        .filter(|l| l.contains("queries a second"))
        .count();
    assert!(lines <= 3, "the flood was logged {lines} times:\n{log}");
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn dns_violations_can_isolate_the_segment() {
    let (l, run) = running_dns_lab(&format!("{ALLOWLIST}\toption auto_violations '30'\n"));
    let ai2 = l.lab.netns(Node::Ai2);
    ai2.run("flood", || {
        for _ in 0..150 {
            let _ = cage_tests::dns::resolve_here(router_dns4(), "allowed.test", false, false, T);
        }
        Ok(())
    })
    .unwrap();
    run.wait_until(Duration::from_secs(10), "not isolated", || {
        let out = l.lab.cage(&["status", "--json"]);
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let isolated = s["isolation"]["isolated"] == true;
        if isolated {
            assert!(
                s["isolation"]["reason"]
                    .as_str()
                    .unwrap()
                    .contains("DNS limit violations"),
                "{s}"
            );
        }
        isolated
    });
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn open_mode_sends_all_dns_through_cage_and_names_flows() {
    let (l, run) = running_dns_lab(
        "config dns 'dns'\n\tlist upstream '203.0.113.10'\n\tlist doh_block_ip '203.0.113.88'\n",
    );
    let ai1 = l.lab.netns(Node::Ai1);
    for (server, v6) in [
        (router_dns4(), false),
        (router_dns6(), true),
        (sa(OUTSIDE_DNS4, 53), false),
        (sa(OUTSIDE_DNS6, 53), true),
    ] {
        for tcp in [false, true] {
            let r = ask(&l, Node::Ai1, server, "other.test", v6, tcp);
            let want = if v6 { OTHER6 } else { OTHER4 };
            assert_eq!(r.addrs, vec![ip(want)], "{server} tcp {tcp}");
        }
    }
    assert_eq!(l.outside.queries(), 0, "the outside DNS server got queries");
    // Open: any address, resolved or not.
    assert!(connects(&ai1, sa(OTHER4, 443), T));
    assert!(connects(&ai1, SocketAddr::new(PUBLIC4, 443), T));
    // DoT refused, DoH names answered NXDOMAIN.
    assert!(!connects(&ai1, sa(OUTSIDE_DNS4, 853), T));
    assert!(!l.listeners.reached(sa(OUTSIDE_DNS4, 853)));
    let r = ask(&l, Node::Ai1, router_dns4(), "dns.google", false, false);
    assert_eq!(r.rcode, RCODE::NameError);
    // A DoH endpoint listed by address is blocked even in open mode.
    assert!(!connects(&ai1, sa("203.0.113.88", 443), T));
    assert!(!l.listeners.reached(sa("203.0.113.88", 443)));
    let rec = wait_flow(&l.lab, "blocked to the DoH address", |r| {
        r["peer"] == "203.0.113.88" && r["verdict"] == "blocked"
    });
    assert_eq!(rec["rule"], "deny:doh", "{rec}");
    let rec = wait_flow(&l.lab, "to other.test", |r| {
        r["peer"] == OTHER4 && r["peer_port"] == 443
    });
    assert_eq!(rec["name"], "other.test", "{rec}");
    let rec = wait_flow(&l.lab, "to the public host", |r| {
        r["peer"] == PUBLIC4.to_string() && r["peer_port"] == 443
    });
    assert!(
        rec.get("name").is_none(),
        "a name on a flow nobody resolved: {rec}"
    );
    drop(run);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn without_cage_run_dns_fails_closed() {
    let l = dns_lab(ALLOWLIST);
    let out = l.lab.cage(&["apply"]);
    assert!(out.status.success(), "{out:?}");
    l.lab.wait_segment_ready().expect("segment");
    for server in [router_dns4(), sa(OUTSIDE_DNS4, 53)] {
        assert!(
            resolve(
                &l.lab.netns(Node::Ai1),
                server,
                "allowed.test",
                false,
                false,
                T
            )
            .is_err(),
            "{server} answered with no forwarder running"
        );
    }
    assert_eq!(l.outside.queries(), 0);
}

/// The whole connectivity contract still holds with DNS through Cage (open mode): the
/// redirect loosens nothing. The checks that probe port 53 where the contract allows it
/// (the router's DNS, UDP 53 on the internet host) are left out: a probe there is now
/// answered by Cage's forwarder, not by the probed host, which the tests above prove
/// with real DNS queries.
#[test]
#[ignore = "needs root: cargo xtask test"]
fn the_contract_holds_with_dns_through_cage() {
    let lab = Lab::for_contract("\nconfig dns 'dns'\n\tlist upstream '203.0.113.10'\n");
    let run = lab.cage_run();
    let checks: Vec<_> = contract::checks()
        .into_iter()
        .filter(|c| {
            !(c.port == 53
                && c.expect == contract::Expect::Allow
                && c.from != contract::Host::Lan
                && c.from != contract::Host::LanAdmin)
        })
        .collect();
    let left_out = contract::checks().len() - checks.len();
    assert_eq!(
        left_out, 6,
        "router DNS (2 addresses x UDP, TCP) and internet UDP 53 (2)"
    );
    let report = contract::run_matrix(&lab, &checks);
    assert!(
        report.failures().is_empty(),
        "the contract does not hold with DNS through Cage:\n{report}"
    );
    drop(run);
}

/// `cage selftest` on a router with DNS through Cage: every check holds (the router's
/// DNS is probed at the forwarder's port, where the redirect takes it).
#[test]
#[ignore = "needs root: cargo xtask test"]
fn selftest_holds_with_dns_through_cage() {
    let (l, run) = running_dns_lab(ALLOWLIST);
    let router = l.lab.netns(Node::Router);
    for addr in [lab::LAN_HOST4, lab::LAN_HOST6] {
        let _ = cage_agent::probe::probe_in(&router, &cage_agent::probe::Probe::icmp(addr));
    }
    let out = l.lab.cage(&["selftest", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no report ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    let failed: Vec<String> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| c.to_string())
        .collect();
    assert!(
        out.status.success() && failed.is_empty(),
        "{}\n{}",
        report["verdict"],
        failed.join("\n")
    );
    assert!(report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["name"] == "caged -> router DNS" && c["ok"] == true));
    drop(run);
}

/// `cage dns allow` refuses what it cannot do, with a clear error, and leaves the file
/// as it was: a bad name, or DNS through Cage off.
#[test]
fn dns_allow_refuses_bad_input_and_leaves_the_file() {
    let bin = lab::cage_bin().unwrap_or_else(|e| panic!("{e}"));
    let dir = std::env::temp_dir().join(format!("cage-dns-allow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("cage.conf");
    let cage = |args: &[&str]| {
        std::process::Command::new(&bin)
            .arg("--config")
            .arg(&path)
            .args(args)
            .output()
            .unwrap()
    };
    let no_dns = format!("config cage 'main'\n\toption log_dir '{}'\n", dir.display());
    std::fs::write(&path, &no_dns).unwrap();
    let out = cage(&["dns", "allow", "api.example.com"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DNS through Cage is off"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), no_dns);

    let with_dns =
        format!("{no_dns}\n# my comment\nconfig dns 'dns'\n\toption egress 'allowlist'\n");
    std::fs::write(&path, &with_dns).unwrap();
    for bad in ["bad name.com", "*.com", "a..b"] {
        let out = cage(&["dns", "allow", bad]);
        assert!(!out.status.success(), "{bad} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("is not a domain name or wildcard"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), with_dns);
    }
    // A good one is added, comments kept; again, nothing changes.
    let out = cage(&["dns", "allow", "API.Example.com"]);
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("# my comment"), "{text}");
    assert!(
        text.contains("list allow_domain 'api.example.com'"),
        "{text}"
    );
    let out = cage(&["dns", "allow", "api.example.com"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("already allowed"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The allow sets are filled over nfnetlink directly (the fast path, no `nft` process):
/// every address lands in its set with its timeout, a second add renews the timeout, and
/// a kernel refusal (no such set) is an error, not a silent success.
#[test]
#[ignore = "needs root: cargo xtask test"]
fn allow_set_elements_are_added_over_netlink_with_their_timeouts() {
    require_root();
    let ns = format!("cgt-setelem-{}", std::process::id());
    let _netns =
        cage_agent::probe::NetNsGuard::named(ns.as_str()).unwrap_or_else(|e| panic!("{e}"));
    let nft = |script: &str| {
        use std::io::Write;
        let mut c = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(c.wait().unwrap().success(), "nft {script}");
    };
    let list = |set: &str| {
        let out = std::process::Command::new("ip")
            .args([
                "netns", "exec", &ns, "nft", "-j", "list", "set", "inet", "cage", set,
            ])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut elems = Vec::new();
        for o in v["nftables"].as_array().unwrap() {
            for e in o["set"]["elem"].as_array().into_iter().flatten() {
                elems.push((
                    e["elem"]["val"].as_str().unwrap().to_owned(),
                    e["elem"]["timeout"].as_u64().unwrap(),
                ));
            }
        }
        elems.sort();
        elems
    };
    let netns = cage_agent::probe::NetNs::named(ns.clone());
    let add = move |entries: Vec<(IpAddr, u32, bool)>| {
        let entries: Vec<AllowElement> = entries
            .into_iter()
            .map(|(addr, timeout, renew)| AllowElement {
                addr,
                timeout,
                renew,
            })
            .collect();
        netns
            .run("setelem", move || {
                Ok(cage_agent::nft::add_allowed_netlink(&entries).map_err(|e| e.to_string()))
            })
            .unwrap()
    };
    // No table yet: the kernel refuses, and the error says so.
    let e = add(vec![(ip(ALLOWED4), 60, false)]).expect_err("added to a set that does not exist");
    assert!(
        e.contains("No such file") || e.contains("os error 2"),
        "{e}"
    );
    nft(
        "table inet cage {\n set allow4 {\n type ipv4_addr\n flags timeout\n }\n \
         set allow6 {\n type ipv6_addr\n flags timeout\n }\n}\n",
    );
    add(vec![
        (ip(ALLOWED4), 90, false),
        (ip(ALLOWED6), 90, false),
        (ip(OTHER4), 600, false),
    ])
    .unwrap();
    assert_eq!(
        list("allow4"),
        vec![(ALLOWED4.to_owned(), 90), (OTHER4.to_owned(), 600)]
    );
    assert_eq!(list("allow6"), vec![(ALLOWED6.to_owned(), 90)]);
    // A plain add of an element that is there is accepted (whether it renews the timeout
    // depends on the kernel: 6.18 does, older ones keep the old one); a renewal always
    // sets the new timeout.
    add(vec![(ip(ALLOWED4), 30, false)]).unwrap();
    let t = list("allow4")[0].1;
    assert!(t == 90 || t == 30, "timeout {t}");
    add(vec![(ip(ALLOWED4), 300, true), (ip(ALLOWED6), 120, true)]).unwrap();
    assert_eq!(
        list("allow4"),
        vec![(ALLOWED4.to_owned(), 300), (OTHER4.to_owned(), 600)]
    );
    assert_eq!(list("allow6"), vec![(ALLOWED6.to_owned(), 120)]);
}

/// The review on the web page: a refused name is listed on the DNS tab, one press of its
/// Allow button (a real Chromium on the LAN host) writes it to the configuration, the
/// running daemon reloads, and the caged host resolves and reaches it.
#[test]
#[ignore = "needs root: cargo xtask test"]
fn a_refused_name_is_allowed_from_the_web_page() {
    browser::require_chromium();
    let (l, run) = running_dns_lab(ALLOWLIST);
    let pid = run.pid();
    let ai1 = l.lab.netns(Node::Ai1);
    let mut passwd = l
        .lab
        .cage_command(&["passwd"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("cage passwd");
    use std::io::Write as _;
    passwd
        .stdin
        .take()
        .unwrap()
        .write_all(b"correct horse battery\n")
        .unwrap();
    assert!(passwd.wait().unwrap().success(), "cage passwd failed");

    for _ in 0..2 {
        let r = ask(&l, Node::Ai1, router_dns4(), "other.test", false, false);
        assert_eq!(r.rcode, RCODE::Refused);
    }
    assert!(
        !connects(&ai1, sa(OTHER4, 443), T),
        "refused, yet reachable"
    );

    let (_, spki) = cage_tests::http::web_cert(&l.lab, &run);
    let driver = Driver::start(&l.lab.ns(Node::Lan), l.lab.dir());
    let base = format!("https://{}:{}", lab::ROUTER_LAN4, lab::WEB_PORT);
    let button = "button.allow[data-name=\"other.test\"]";
    browser::in_namespace(&l.lab.netns(Node::Lan), || {
        let b = Browser::open_trusting(1100, 900, &spki);
        b.goto(&format!("{base}/login"));
        b.type_into("#password", "correct horse battery");
        b.click("#login-submit");
        b.find("#cage-state");
        b.click("#nav-dns");
        assert_eq!(
            b.attr("#dns-mode", "data-mode").as_deref(),
            Some("allowlist")
        );
        // The refused list is written within a second or two.
        let until = Instant::now() + Duration::from_secs(10);
        while !b.has(button) {
            assert!(
                Instant::now() < until,
                "other.test is not listed for review"
            );
            std::thread::sleep(Duration::from_millis(500));
            b.goto(&format!("{base}/dns"));
        }
        b.click(button);
        let until = Instant::now() + Duration::from_secs(10);
        while b.has(button) {
            assert!(
                Instant::now() < until,
                "other.test still listed after Allow"
            );
            std::thread::sleep(Duration::from_millis(200));
            b.goto(&format!("{base}/dns"));
        }
        assert!(b.text("#allowed").contains("other.test"));
        b.close();
    });
    drop(driver);

    other_test_allowed(&l, &run, "Allow on the web page");
    assert_eq!(run.pid(), pid, "cage run was restarted");
    assert!(
        run.log().contains("allowed the name other.test"),
        "{}",
        run.log()
    );
}

/// After other.test was allowed (by `how`): it is in the configuration file, and the
/// running daemon has reloaded it: the name resolves and its address is reachable.
fn other_test_allowed(l: &DnsLab, run: &CageRun, how: &str) {
    let text = std::fs::read_to_string(l.lab.config_path()).unwrap();
    assert!(
        text.contains("list allow_domain 'other.test'"),
        "{how}: config:\n{text}"
    );
    let refused = format!("other.test still refused after {how}");
    run.wait_until(Duration::from_secs(10), &refused, || {
        let r = ask(l, Node::Ai1, router_dns4(), "other.test", false, false);
        let answered = r.rcode == RCODE::NoError;
        if answered {
            assert_eq!(r.addrs, vec![ip(OTHER4)]);
        }
        answered
    });
    assert!(
        connects(&l.lab.netns(Node::Ai1), sa(OTHER4, 443), T),
        "other.test not reachable after {how}"
    );
    assert!(l.listeners.reached(sa(OTHER4, 443)));
}
