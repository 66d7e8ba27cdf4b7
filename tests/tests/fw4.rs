//! The real fw4 beside Cage (issue 11, item 6): in the lab's router, OpenWrt's own ubusd,
//! netifd and fw4 (23.05's and firewall4's newest) run from a GL-MT6000's first-boot
//! configuration plus what the package's 90-cage declares; fw4 renders its ruleset from
//! /etc/config/firewall and the interface state netifd gives it over ubus, and reloads on
//! netifd's hotplug events. With Cage's policy beside it:
//! - the ruleset in the kernel is fw4's own (the cage zone's chains and rules, the
//!   board's lan and wan zones), and no stand-in table is there;
//! - fw4's own lookups find the zone, and `fw4 check` passes;
//! - the whole contract matrix passes, and again after `fw4 reload` and `fw4 restart`;
//! - while `fw4 reload` and `fw4 restart` run (ten of each), every deny of the
//!   contract is probed continuously and none gets through; Cage's tables are the same
//!   before and after;
//! - and with Cage's tables removed, fw4 alone lets several denies through (the hotel's
//!   network, private ranges, spoofed sources, the LAN into the segment): the probes
//!   can see a hole in this lab, and Cage is what closes it.

use std::time::{Duration, Instant};

use cage_tests::contract::{self, run_matrix, Expect, Report};
use cage_tests::lab::{self, Node};
use cage_tests::openwrt::Board;
use cage_tests::owlab::{probe_while, Fw4, OwLab};

fn assert_passes(ow: &OwLab, report: &Report, when: &str) {
    assert!(
        report.failures().is_empty(),
        "{} with {}, {when}: {} checks of the contract failed:\n{report}\n{}",
        ow.board().label(),
        ow.fw4(),
        report.failures().len(),
        ow.diagnostics()
    );
}

/// `nft -s list table FAMILY NAME` in the router: the table without counter values and
/// without the set elements the kernel learns from traffic (the layer-2 bindings).
fn stateless(ow: &OwLab, table: &str) -> String {
    let mut cmd = ow.lab().in_router_netns();
    cmd.args(["nft", "-s", "list", "table"])
        .args(table.split(' '));
    let out = cmd.output().expect("nft");
    assert!(out.status.success(), "nft -s list table {table}: {out:?}");
    cage_agent::nft::without_learned_elements(&String::from_utf8_lossy(&out.stdout))
}

/// The handle nft gives a table (a new one when the table is made again).
fn table_handle(ow: &OwLab, table: &str) -> String {
    let mut cmd = ow.lab().in_router_netns();
    cmd.args(["nft", "-a", "list", "table"])
        .args(table.split(' '));
    let out = String::from_utf8_lossy(&cmd.output().expect("nft").stdout).into_owned();
    out.lines()
        .next()
        .and_then(|l| l.split("# handle ").nth(1))
        .unwrap_or_else(|| panic!("no handle for table {table}:\n{out}"))
        .trim()
        .to_owned()
}

fn fw4_beside_cage(fw4: Fw4) {
    lab::require_cage();
    let t = Instant::now();
    let ow = OwLab::up(Board::Mt6000, fw4);
    println!("{} with {}:\n{}", ow.board().label(), fw4, ow.layout());
    let run = ow.boot_with_cage(contract::CONFIG_EXTRA);
    println!(
        "router booted (Cage, fw4, netifd) in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // The ruleset is fw4's own: the board's zones and the zone 90-cage added, with its
    // rules, from the interface state netifd gave fw4 (the devices).
    let tables = ow.nft_list("tables");
    let mut names: Vec<&str> = tables.lines().map(str::trim).collect();
    names.sort();
    assert_eq!(
        names,
        ["table bridge cage", "table inet cage", "table inet fw4"],
        "Cage's tables and fw4's, nothing else"
    );
    let ruleset = ow.nft_list("table inet fw4");
    let bridge = &ow.layout().bridge;
    let wan = &ow.layout().wan;
    for want in [
        format!("iifname \"{bridge}\" jump input_cage"),
        format!("iifname \"{bridge}\" jump forward_cage"),
        format!("oifname \"{wan}\" jump srcnat_wan"),
        "chain input_cage {".to_owned(),
        "jump accept_to_wan comment \"!fw4: Accept cage to wan forwarding\"".to_owned(),
        "jump accept_to_cage comment \"!fw4: Accept lan to cage forwarding\"".to_owned(),
        "comment \"!fw4: Cage-DHCP\"".to_owned(),
        "comment \"!fw4: Cage-DNS\"".to_owned(),
        "comment \"!fw4: Cage-DHCPv6\"".to_owned(),
        "comment \"!fw4: Cage-ICMPv6-ND\"".to_owned(),
        "comment \"!fw4: Cage-DNS-forwarder\"".to_owned(),
        "masquerade comment \"!fw4: Masquerade IPv4 wan traffic\"".to_owned(),
    ] {
        assert!(
            ruleset.contains(&want),
            "fw4's ruleset has no `{want}`:\n{ruleset}"
        );
    }
    // fw4's own view of the zone, and its check of the whole rendered ruleset.
    assert_eq!(ow.sh_ok("fw4 -q network cage").trim(), "cage");
    assert_eq!(ow.sh_ok(&format!("fw4 -q device {bridge}")).trim(), "cage");
    let check = ow.sh_ok("fw4 check");
    assert!(
        check.contains("Ruleset passes nftables check."),
        "fw4 check: {check}"
    );
    println!("fw4 check: {}", check.trim());

    let report = run_matrix(ow.lab(), &contract::checks());
    assert_passes(&ow, &report, "after boot");

    // fw4 reload and restart, ten times each, while every deny is probed the whole time.
    let cage_before = (stateless(&ow, "inet cage"), stateless(&ow, "bridge cage"));
    let fw4_handle = table_handle(&ow, "inet fw4");
    let cage_handles = (
        table_handle(&ow, "inet cage"),
        table_handle(&ow, "bridge cage"),
    );
    let denies: Vec<_> = contract::checks()
        .into_iter()
        .filter(|c| c.expect == Expect::Deny)
        .collect();
    let (timings, probing) = probe_while(ow.lab(), &denies, || {
        // Let the probes get going first.
        std::thread::sleep(Duration::from_millis(300));
        let mut timings = vec![];
        for _ in 0..10 {
            for cmd in ["fw4 reload", "fw4 restart"] {
                let t = Instant::now();
                let out = ow.sh(cmd);
                timings.push((cmd, t.elapsed(), out));
            }
        }
        timings
    });
    for (cmd, took, out) in &timings {
        cage_tests::assert_success(out, format_args!("`{cmd}`"));
        println!("{cmd}: {} ms", took.as_millis());
    }
    println!("while fw4 reloaded and restarted: {probing}");
    assert!(
        probing.failures.is_empty() && probing.rounds >= 1,
        "{} with {}: probes got through while fw4 reloaded and restarted: {probing}\n{}",
        ow.board().label(),
        fw4,
        ow.diagnostics()
    );
    assert_ne!(
        table_handle(&ow, "inet fw4"),
        fw4_handle,
        "fw4 restart made its table again"
    );
    assert_eq!(
        (stateless(&ow, "inet cage"), stateless(&ow, "bridge cage")),
        cage_before,
        "fw4 left Cage's tables as they were"
    );
    // Not made again either (which would also have dropped the learned bindings).
    assert_eq!(
        (
            table_handle(&ow, "inet cage"),
            table_handle(&ow, "bridge cage")
        ),
        cage_handles,
        "Cage's tables were made again during fw4's reloads and restarts"
    );

    let report = run_matrix(ow.lab(), &contract::checks());
    assert_passes(&ow, &report, "after fw4 reload and restart");

    // One more plain reload, and the matrix again: the contract holds after it.
    ow.sh_ok("fw4 reload");
    let report = run_matrix(ow.lab(), &contract::checks());
    assert_passes(&ow, &report, "after fw4 reload");
    assert!(
        ow.lab()
            .nft_ruleset(Node::Router)
            .contains("chain input_cage"),
        "fw4's table is there after the reload"
    );
    drop(run);

    // What fw4 alone leaves open: Cage's tables removed, the same denies probed. The
    // rows below get through with fw4's zone alone (it forwards the segment to the WAN
    // and lets the LAN in), so the probes above could have seen a hole, and Cage is
    // what closes them.
    let out = ow.lab().cage(&["disable"]);
    assert!(out.status.success(), "cage disable: {out:?}");
    let report = run_matrix(ow.lab(), &denies);
    let open: std::collections::BTreeSet<&str> =
        report.failures().iter().map(|r| r.check.row).collect();
    println!("with fw4 alone, these denies of the contract get through: {open:?}");
    for row in [
        "caged -> upstream local",
        "caged -> private range",
        "spoofed -> internet",
        "LAN -> caged",
    ] {
        assert!(
            open.contains(row),
            "with Cage's tables removed, `{row}` should get through fw4 alone (or the \
             probes prove nothing for it): {open:?}\n{report}"
        );
    }
    println!("{} in {:.1} s", fw4, t.elapsed().as_secs_f64());
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn fw4_23_05_renders_the_zone_and_cage_holds_through_reload_and_restart() {
    fw4_beside_cage(Fw4::Release2305);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn fw4_main_renders_the_zone_and_cage_holds_through_reload_and_restart() {
    fw4_beside_cage(Fw4::Main);
}
