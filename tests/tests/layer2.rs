//! Caged host ↔ caged host is denied at layer 2 by two independent layers: bridge port
//! isolation and the `bridge cage` table's rule. Each is proven to hold on its own, by
//! switching the other one off and sending real frames (with static neighbour entries,
//! so the frames are really sent to the other host's MAC).
//!
//! The test kernel has br_netfilter built in and on, which also runs bridged IP traffic
//! through the inet hooks, where Cage's `deny:segment` rule would catch it as a third
//! layer. OpenWrt does not load br_netfilter by default, so these tests switch it off in
//! the router (`net.bridge.bridge-nf-call-ip{,6}tables = 0`) to test each layer alone.

use cage_tests::contract::{self, run_matrix, Check};
use cage_tests::lab::{Lab, Node};

fn caged_to_caged() -> Vec<Check> {
    let checks: Vec<Check> = contract::checks()
        .into_iter()
        .filter(|c| c.row.starts_with("caged -> caged"))
        .collect();
    assert!(
        checks.len() >= 12,
        "only {} caged -> caged checks",
        checks.len()
    );
    checks
}

fn applied_lab() -> Lab {
    let lab = Lab::for_contract("");
    let router = lab.netns(Node::Router);
    for key in [
        "net.bridge.bridge-nf-call-iptables",
        "net.bridge.bridge-nf-call-ip6tables",
    ] {
        router
            .set_sysctl(key, "0")
            .expect("switching br_netfilter off");
    }
    // `apply`, not `run`: a daemon would put back what these tests take away.
    cage_tests::assert_success(&lab.cage(&["apply"]), "cage apply");
    lab
}

/// Switch bridge port isolation off on both segment ports.
fn isolation_off(lab: &Lab) {
    for port in ["cage1", "cage2"] {
        lab.ip(
            Node::Router,
            &[
                "link",
                "set",
                "dev",
                port,
                "type",
                "bridge_slave",
                "isolated",
                "off",
            ],
        )
        .expect("isolation off");
    }
}

/// Remove Cage's bridge-family table, leaving `inet cage` in place.
fn remove_bridge_table(lab: &Lab) {
    lab.nft(Node::Router, "delete table bridge cage");
}

/// Every caged -> caged probe was denied: the matrix.
fn caged_hosts_kept_apart(lab: &Lab) -> contract::Report {
    let report = run_matrix(lab, &caged_to_caged());
    assert!(report.failures().is_empty(), "{report}");
    report
}

fn l2_denied_packets(lab: &Lab) -> u64 {
    let out = lab.cage(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    v["denied"]["deny:segment-l2"]["packets"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn the_bridge_rule_alone_keeps_caged_hosts_apart() {
    let lab = applied_lab();
    isolation_off(&lab);
    let report = caged_hosts_kept_apart(&lab);
    let dropped = l2_denied_packets(&lab);
    assert!(
        dropped > 0,
        "with isolation off the bridge rule must have dropped the frames (counted {dropped})"
    );
    println!("isolation off: bridge rule dropped {dropped} packets\n{report}");
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn port_isolation_alone_keeps_caged_hosts_apart() {
    let lab = applied_lab();
    remove_bridge_table(&lab);
    let report = caged_hosts_kept_apart(&lab);
    println!("bridge table removed, isolation on: all blocked\n{report}");
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn without_either_layer_caged_hosts_reach_each_other() {
    // Not vacuous: with both layers off, the same probes are delivered.
    let lab = applied_lab();
    isolation_off(&lab);
    remove_bridge_table(&lab);
    let checks: Vec<Check> = caged_to_caged()
        .into_iter()
        .map(|c| c.expecting(contract::Expect::Allow))
        .collect();
    let report = run_matrix(&lab, &checks);
    assert!(report.failures().is_empty(), "{report}");
}
