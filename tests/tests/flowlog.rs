//! Blocked flows in the flow log: what Cage's policy denies reaches `cage flows` as
//! records that name the caged host, its MAC, the destination, and the rule that denied
//! it; nothing is lost without being counted, and a SIGTERM'd daemon writes what it had.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use cage_agent::probe::{probe_in, Probe};
use cage_tests::contract;
use cage_tests::lab::{self, Lab, Node, AI1_4, AI1_MAC, HOTEL4, LAN_HOST4, ROUTER_SEG4};
use cage_tests::require_root;

fn flows(lab: &Lab) -> Vec<serde_json::Value> {
    let out = lab.cage(&["flows", "--json", "-n", "0", "--verdict", "blocked"]);
    assert!(out.status.success(), "cage flows: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record"))
        .collect()
}

fn find<'a>(
    records: &'a [serde_json::Value],
    peer: IpAddr,
    port: u16,
    proto: &str,
) -> Option<&'a serde_json::Value> {
    records
        .iter()
        .find(|r| r["peer"] == peer.to_string() && r["peer_port"] == port && r["proto"] == proto)
}

#[test]
fn denied_attempts_appear_as_blocked_records_with_their_rule() {
    require_root();
    lab::cage_bin().unwrap_or_else(|e| panic!("{e}"));
    let lab = Lab::up(&lab::unique_prefix()).expect("lab up");
    lab.write_config(contract::CONFIG_EXTRA);
    let run = lab.spawn_cage_run();
    let start = Instant::now();
    while !run.log().contains("policy applied") {
        assert!(start.elapsed() < Duration::from_secs(15), "{}", run.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    lab.wait_segment_ready().expect("segment");
    lab.pin_router_neighbours(Node::Ai1).expect("neighbours");

    let ai1 = lab.netns(Node::Ai1);
    let attempts = [
        (LAN_HOST4, 22, "deny:lan"),
        (ROUTER_SEG4, 22, "deny:router"),
        (ROUTER_SEG4, 80, "deny:router"),
        (HOTEL4, 80, "deny:upstream"),
    ];
    for (dst, port, _) in attempts {
        for _ in 0..3 {
            let a = probe_in(
                &ai1,
                &Probe::tcp(dst, port)
                    .from(AI1_4)
                    .timeout(Duration::from_millis(300)),
            )
            .expect("probe");
            assert!(!a.outcome.answered(), "{dst}:{port} answered");
        }
    }
    // And one from the LAN into the segment.
    let a = probe_in(
        &lab.netns(Node::Lan),
        &Probe::tcp(AI1_4, 22)
            .from(LAN_HOST4)
            .timeout(Duration::from_millis(300)),
    )
    .expect("probe");
    assert!(!a.outcome.answered());

    // Written within one flush interval (5 s).
    let deadline = Instant::now() + Duration::from_secs(12);
    let records = loop {
        let r = flows(&lab);
        let all_there = attempts
            .iter()
            .all(|&(dst, port, _)| find(&r, dst, port, "tcp").is_some());
        if all_there || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    for (dst, port, rule) in attempts {
        let r = find(&records, dst, port, "tcp")
            .unwrap_or_else(|| panic!("no blocked record for {dst}:{port} in {records:#?}"));
        assert_eq!(r["rule"], rule, "{r}");
        assert_eq!(r["host"], AI1_4.to_string(), "{r}");
        assert_eq!(r["mac"], AI1_MAC, "{r}");
        assert_eq!(r["direction"], "out", "{r}");
        // Three attempts, each a SYN of 60 bytes (IPv4 + TCP with options) or so.
        assert!(
            r["packets_out"].as_u64().unwrap_or(0) >= 3,
            "three attempts, {r}"
        );
        assert!(r["bytes_out"].as_u64().unwrap_or(0) >= 3 * 40, "{r}");
    }
    let inbound = records
        .iter()
        .find(|r| r["rule"] == "deny:into-segment" && r["host"] == AI1_4.to_string())
        .unwrap_or_else(|| panic!("no inbound record in {records:#?}"));
    assert_eq!(inbound["direction"], "in");
    assert_eq!(inbound["host_port"], 22);
    assert_eq!(inbound["peer"], LAN_HOST4.to_string());

    // Nothing was lost, and the status says so.
    let status = lab.cage(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["flow_log"]["nflog_dropped"], 0, "{v:#}");
    assert_eq!(v["flow_log"]["nflog_overruns"], 0, "{v:#}");
    assert!(v["flow_log"]["written"].as_u64().unwrap_or(0) >= 5, "{v:#}");
    println!(
        "{} blocked records; status: {}",
        records.len(),
        v["flow_log"]
    );

    // A SIGTERM'd daemon writes what it holds before it goes.
    let a = probe_in(
        &ai1,
        &Probe::udp(LAN_HOST4, 4444)
            .from(AI1_4)
            .timeout(Duration::from_millis(300)),
    )
    .expect("probe");
    assert!(!a.outcome.answered());
    std::thread::sleep(Duration::from_millis(500));
    let log = run.log();
    let status = run.stop();
    let records = flows(&lab);
    assert!(
        find(&records, LAN_HOST4, 4444, "udp").is_some(),
        "the last blocked attempt was lost at shutdown ({status:?}):\n{log}\n{records:#?}"
    );
}
