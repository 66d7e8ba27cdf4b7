//! `cage selftest` in the lab, run in the router's namespace as on a real router: with
//! Cage's policy every check holds; with the policy broken on purpose (Cage's table
//! removed, or an accept towards the LAN slipped into Cage's own chain) it names the
//! checks that fail and exits non-zero; and whatever happens (success, failure, Ctrl-C,
//! SIGKILL), no namespace, veth, address or route it made is left on the router.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cage_agent::probe::{probe_in, Outcome, Probe};
use cage_agent::selftest::{Check, Report};
use cage_tests::contract;
use cage_tests::lab::{Lab, Node, LAN_HOST4, LAN_HOST6, PUBLIC4, PUBLIC6};

/// A lab with Cage's policy applied (`apply`, not `run`: a daemon would repair what the
/// failure tests break).
fn applied_lab() -> Lab {
    let lab = Lab::for_contract("");
    cage_tests::assert_success(&lab.cage(&["apply"]), "cage apply");
    lab.wait_segment_ready().expect("segment ready");
    // A live router's neighbour table knows the LAN hosts that are active; the lab's LAN
    // host has been quiet since the lab came up, so make the router talk to it once.
    let router = lab.netns(Node::Router);
    for addr in [LAN_HOST4, LAN_HOST6] {
        let a = probe_in(&router, &Probe::icmp(addr)).expect("router pings the LAN host");
        assert_eq!(
            a.outcome,
            Outcome::Answered,
            "the router cannot reach {addr}"
        );
    }
    lab
}

/// What the router's namespace holds that the self-test could leave behind, plus the
/// names of the network namespaces on the machine that could be the self-test's.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    links: String,
    addresses: String,
    routes4: String,
    routes6: String,
    selftest_netns: Vec<String>,
}

fn snapshot(lab: &Lab) -> Snapshot {
    let ip = |args: &[&str]| lab.ip(Node::Router, args).expect("ip");
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    Snapshot {
        links: ip(&["-j", "link", "show"]),
        addresses: ip(&["-j", "addr", "show"]),
        routes4: ip(&["-j", "-4", "route", "show", "table", "all"]),
        routes6: ip(&["-j", "-6", "route", "show", "table", "all"]),
        selftest_netns: String::from_utf8_lossy(&netns.stdout)
            .lines()
            .filter(|l| l.contains("cage-st"))
            .map(str::to_owned)
            .collect(),
    }
}

/// Wait (up to 5 s) until the router looks exactly as in `before`, or fail saying what
/// differs.
fn assert_clean(lab: &Lab, before: &Snapshot) {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let now = snapshot(lab);
        if now == *before {
            assert!(now.selftest_netns.is_empty(), "{:?}", now.selftest_netns);
            assert!(
                !now.links.contains("\"cst"),
                "a probe port is left: {}",
                now.links
            );
            return;
        }
        if Instant::now() >= until {
            panic!(
                "the self-test left something behind on the router:\nbefore: {before:#?}\nafter: {now:#?}"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn selftest(lab: &Lab) -> (Option<i32>, Report, String) {
    let p4 = PUBLIC4.to_string();
    let p6 = PUBLIC6.to_string();
    let out = lab.cage(&["selftest", "--json", "--target", &p4, "--target", &p6]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report: Report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "cage selftest --json printed no report ({e}):\n{}\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (out.status.code(), report, stderr)
}

/// `cage selftest` on an applied lab whose policy the nft command `breaking` broke: it
/// fails (exit code 1) and leaves nothing behind on the router. The lab and the report
/// (printed).
fn broken_selftest(breaking: &str) -> (Lab, Report) {
    let lab = applied_lab();
    let before = snapshot(&lab);
    lab.nft(Node::Router, breaking);
    let (code, report, stderr) = selftest(&lab);
    println!("{}", table(&report));
    assert_eq!(code, Some(1), "{stderr}");
    assert_clean(&lab, &before);
    (lab, report)
}

fn failed(report: &Report) -> Vec<&Check> {
    report
        .checks
        .iter()
        .filter(|c| c.ok == Some(false))
        .collect()
}

/// The address of a check's target (`192.168.8.10`, `192.168.8.10:53`, `[fd00:8::10]:53`).
fn address_of(target: &str) -> String {
    match target.parse::<std::net::SocketAddr>() {
        Ok(sa) => sa.ip().to_string(),
        Err(_) => target.to_owned(),
    }
}

fn table(report: &Report) -> String {
    report.render_text()
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn every_check_holds_with_cages_policy_and_nothing_is_left() {
    let lab = applied_lab();
    let before = snapshot(&lab);
    let started = Instant::now();
    let (code, report, stderr) = selftest(&lab);
    let took = started.elapsed();
    println!("{}", table(&report));
    assert_eq!(code, Some(0), "{stderr}\n{}", table(&report));
    assert!(report.ok, "{}", report.verdict);
    assert!(report.verdict.starts_with("all "), "{}", report.verdict);
    assert!(failed(&report).is_empty());
    assert!(
        took < Duration::from_secs(30),
        "the self-test took {took:?}"
    );

    // Every row of the contract that can be probed on a router was probed and held.
    let held: BTreeSet<&str> = report
        .checks
        .iter()
        .filter(|c| c.ok == Some(true))
        .map(|c| c.name.as_str())
        .collect();
    for row in [
        "policy",
        "segment port",
        "caged -> router DNS",
        "caged -> router DHCP",
        "caged -> router DHCPv6",
        "caged -> router other",
        "caged -> router multicast",
        "spoofed source -> router",
        "caged -> caged (static neigh)",
        "caged -> caged (ARP/ND)",
        "caged -> LAN",
        "caged -> upstream",
        "caged -> private 10/8",
        "caged -> ULA fc00::/7",
        "caged -> internet",
    ] {
        assert!(
            held.contains(row),
            "no check of '{row}' held:\n{}",
            table(&report)
        );
    }
    // The LAN hosts the router knows, both families, and the internet targets.
    for target in [LAN_HOST4.to_string(), LAN_HOST6.to_string()] {
        assert!(
            report
                .checks
                .iter()
                .any(|c| c.name == "caged -> LAN" && c.target == target && c.proto == "icmp"),
            "{target} not probed"
        );
    }
    let internet: Vec<&Check> = report
        .checks
        .iter()
        .filter(|c| c.name == "caged -> internet")
        .collect();
    assert_eq!(internet.len(), 2, "{internet:?}");
    // Nothing listens on the lab router: DNS is allowed by the policy, and says so.
    assert!(report
        .checks
        .iter()
        .any(|c| c.name == "caged -> router DNS"
            && c.observed == "allowed by policy, nothing listening"));

    // The result is kept for `cage status`.
    let stored = lab.dir().join("log").join("selftest.json");
    let stored: Report =
        serde_json::from_slice(&std::fs::read(&stored).expect("selftest.json")).unwrap();
    assert_eq!(stored, report);
    assert!(!lab.dir().join("log").join("selftest.running.json").exists());
    let status = lab.cage(&["status"]);
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("selftest: verified") && status.contains("checks hold"),
        "{status}"
    );

    assert_clean(&lab, &before);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn without_cages_table_the_failing_checks_are_named_and_nothing_is_left() {
    let (lab, report) = broken_selftest("delete table inet cage");
    assert!(!report.ok);
    assert!(report.verdict.contains("checks FAIL"), "{}", report.verdict);
    let names: BTreeSet<&str> = failed(&report).iter().map(|c| c.name.as_str()).collect();
    for row in [
        "policy",
        "caged -> router other",
        "spoofed source -> router",
        "caged -> router multicast",
        "caged -> LAN",
    ] {
        assert!(
            names.contains(row),
            "'{row}' did not fail:\n{}",
            table(&report)
        );
    }
    // The verdict names failing checks, and `cage status` raises it.
    assert!(report.verdict.contains("caged -> "), "{}", report.verdict);
    let status = lab.cage(&["status"]);
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("PROBLEM: the last self-test failed: "),
        "{status}"
    );
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn an_accept_towards_the_lan_fails_exactly_the_lan_checks() {
    // A rule in another table cannot override Cage's drop; one in Cage's own chain can.
    let (_lab, report) =
        broken_selftest("insert rule inet cage segment_egress oifname br-lan accept");
    let failed = failed(&report);
    assert!(
        failed.iter().all(|c| c.name == "caged -> LAN"),
        "checks other than the LAN's failed:\n{}",
        table(&report)
    );
    // The echo requests to both LAN hosts were answered, and UDP reached their stacks.
    for target in [LAN_HOST4.to_string(), LAN_HOST6.to_string()] {
        for proto in ["icmp", "udp"] {
            assert!(
                failed
                    .iter()
                    .any(|c| address_of(&c.target) == target && c.proto == proto),
                "{target} {proto} did not fail:\n{}",
                table(&report)
            );
        }
    }
    assert!(
        report.verdict.contains("caged -> LAN"),
        "{}",
        report.verdict
    );
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn ctrl_c_and_sigkill_leave_nothing() {
    let lab = applied_lab();
    let before = snapshot(&lab);
    for (signal, code) in [(libc::SIGINT, Some(130)), (libc::SIGKILL, None)] {
        let mut child = lab
            .cage_command(&["selftest"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cage selftest");
        // Wait until the probe ports exist, then interrupt.
        let until = Instant::now() + Duration::from_secs(10);
        while !lab
            .ip(Node::Router, &["-o", "link", "show"])
            .unwrap()
            .contains(": cst")
        {
            assert!(Instant::now() < until, "no probe port appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: kill(2) on our own child (`ip netns exec` execs cage in place).
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.wait().expect("wait");
        assert_eq!(status.code(), code, "after signal {signal}");
        assert_clean(&lab, &before);
    }
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn while_isolated_every_check_expects_the_segment_cut_off() {
    let lab = applied_lab();
    let out = lab.cage(&["isolate", "--reason", "selftest test"]);
    assert!(
        out.status.success(),
        "cage isolate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, report, stderr) = selftest(&lab);
    println!("{}", table(&report));
    assert_eq!(code, Some(0), "{stderr}\n{}", table(&report));
    let probes: Vec<&Check> = report
        .checks
        .iter()
        .filter(|c| c.proto != "state")
        .collect();
    assert!(probes
        .iter()
        .all(|c| c.expected == "deny" && c.ok == Some(true)));
    for row in ["caged -> router DNS", "caged -> internet"] {
        assert!(probes.iter().any(|c| c.name == row), "no '{row}' check");
    }
    assert!(report.notes.iter().any(|n| n.contains("kill switch is on")));
}

/// The self-test's denied probes must not trip automatic isolation and cut the real
/// caged hosts off: while `cage run` watches with `auto_blocked` set, the self-test's
/// probe hosts are exempt, and the segment stays open.
#[test]
#[ignore = "needs root: cargo xtask test"]
fn does_not_trip_automatic_isolation() {
    let lab = Lab::for_contract("\nconfig killswitch 'killswitch'\n\toption auto_blocked '30'\n");
    let run = lab.cage_run_ready();
    let before = snapshot(&lab);
    let (code, report, stderr) = selftest(&lab);
    assert_eq!(code, Some(0), "{stderr}\n{}", table(&report));
    // The daemon reads its meters every second; give it a few readings after the run.
    std::thread::sleep(Duration::from_millis(3500));
    let status = lab.cage(&["status"]);
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("switch:  off"), "{status}\n{}", run.log());
    assert_clean(&lab, &before);
}

/// `cage run` proves the cage by itself after every policy change when told to
/// (`selftest.after_change`), and the result reaches `cage status`.
#[test]
#[ignore = "needs root: cargo xtask test"]
fn cage_run_self_tests_after_every_policy_change() {
    let lab = Lab::for_test();
    let config = format!(
        "{}\nconfig selftest 'selftest'\n\toption after_change '1'\n\tlist target '203.0.113.10'\n",
        contract::CONFIG_EXTRA
    );
    let path = lab.write_config(&config);
    let run = lab.spawn_cage_run();
    let wait_for = |what: &str, n: usize| {
        run.wait_until(
            Duration::from_secs(40),
            &format!("no {what} self-test"),
            || {
                let passed = "self-test (after a policy change): all";
                run.log().matches(passed).count() >= n
            },
        )
    };
    wait_for("first", 1);
    let status = lab.cage(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["selftest"]["ok"], true, "{v:#}");

    // A change: the daemon re-applies on SIGHUP and proves the new policy.
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "list admin_host '192.168.8.20'",
        "list admin_host '192.168.8.21'",
    );
    std::fs::write(&path, text).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(run.pid() as i32, libc::SIGHUP) };
    wait_for("second", 2);
}
