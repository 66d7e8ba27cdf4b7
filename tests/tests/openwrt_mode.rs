//! OpenWrt mode: netifd makes the segment (bridge, addresses, ports); Cage adopts it.
//! `cage run` starts before the bridge exists (as at boot, where Cage starts before the
//! network), holds the policy by the bridge's name, then isolates every port of the
//! bridge once it appears, and the whole contract holds.

use std::time::Duration;

use cage_tests::contract::{self, run_matrix};
use cage_tests::lab::{Lab, Node};

#[test]
#[ignore = "needs root: cargo xtask test"]
fn cage_adopts_the_bridge_netifd_makes_and_the_contract_holds() {
    let lab = Lab::for_contract("");
    let path = lab.config_path();
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "config cage 'main'\n",
        "config cage 'main'\n\toption mode 'openwrt'\n",
    );
    std::fs::write(&path, text).unwrap();

    let run = lab.spawn_cage_run();
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        run.wait_until(
            Duration::from_secs(15),
            &format!("timed out waiting for {what}"),
            cond,
        )
    };
    wait("the policy", &|| run.log().contains("policy applied"));
    assert!(run.log().contains("does not exist yet"), "{}", run.log());
    let status = lab.cage(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        v["enforcing"], true,
        "the policy must hold before the bridge exists"
    );

    // netifd makes the bridge, with its addresses and ports, none isolated.
    lab.plain_segment().expect("the bridge, as netifd makes it");
    let isolated = |port: &str| {
        lab.ip(Node::Router, &["-d", "-j", "link", "show", port])
            .map(|out| out.contains("\"isolated\":true"))
            .unwrap_or(false)
    };
    wait("both ports isolated", &|| {
        isolated("cage1") && isolated("cage2")
    });
    wait("the eBPF counter", &|| {
        run.log().contains("attached the flow counter")
    });
    let log = run.log();
    assert!(
        !log.contains("created bridge"),
        "Cage made the bridge itself:\n{log}"
    );
    assert!(
        !log.contains("added address"),
        "Cage added addresses itself:\n{log}"
    );

    let report = run_matrix(&lab, &contract::checks());
    assert!(report.failures().is_empty(), "{report}");
}
