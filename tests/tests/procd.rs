//! The package's init script under the real procd (issue 11, item 8): the lab's router
//! reboots into procd as PID 1 of a PID and mount namespace of its own (in procd's
//! container mode), which starts ubusd and runs rcS: the package's `cage` (S18), fw4
//! (S19) and netifd (S20) come up as procd services, from the GL-MT6000 root of
//! `cage_tests::owlab`. Then:
//! - `cage run` runs as procd's instance of the `cage` service and the contract holds;
//! - killed with SIGKILL, procd starts it again (respawn), and no deny gets through
//!   meanwhile;
//! - `uci commit cage` + `reload_config` reloads it: a new admin host is in the kernel;
//!   a refused configuration is refused by the init script's reload and leaves the
//!   running policy and the daemon as they were;
//! - `/etc/init.d/cage stop` ends the daemon and leaves the policy: every deny still
//!   holds.

use std::time::{Duration, Instant};

use cage_tests::contract::{self, run_matrix, Check, Expect};
use cage_tests::lab;
use cage_tests::openwrt::Board;
use cage_tests::owlab::{probe_while, Fw4, OwLab};

#[test]
#[ignore = "needs root: cargo xtask test"]
fn the_init_script_under_procd_respawns_reloads_and_stop_leaves_the_policy() {
    cage_tests::require_root();
    lab::cage_bin().unwrap_or_else(|e| panic!("{e}"));
    let t = Instant::now();
    let mut ow = OwLab::up(Board::Mt6000, Fw4::Release2305);
    ow.install_cage_config(contract::CONFIG_EXTRA);
    ow.boot_procd(&["cage", "firewall", "network"]);
    assert_eq!(
        ow.sh_ok("cat /proc/1/comm").trim(),
        "procd",
        "procd is PID 1"
    );
    ow.wait_for("procd to run cage", Duration::from_secs(20), |ow| {
        !ow.service_pids("cage").is_empty()
    });
    ow.wait_network_up();
    ow.wait_for(
        "Cage to isolate the segment's ports",
        Duration::from_secs(30),
        |ow| ow.segment_ports_isolated(),
    );
    println!("booted under procd in {:.1} s", t.elapsed().as_secs_f64());
    let report = run_matrix(ow.lab(), &contract::checks());
    assert!(
        report.failures().is_empty(),
        "{report}\n{}\n{}",
        ow.syslog(),
        ow.diagnostics()
    );
    let denies: Vec<Check> = contract::checks()
        .into_iter()
        .filter(|c| c.expect == Expect::Deny)
        .collect();

    // Respawn: SIGKILL the instance; procd starts it again (respawn 3600 5 0: after 5 s).
    let pid = ow.service_pids("cage")[0];
    let killed = Instant::now();
    let ((new_pid, took), probing) = probe_while(ow.lab(), &denies, || {
        ow.sh_ok(&format!("kill -9 {pid}"));
        ow.wait_for("procd to respawn cage", Duration::from_secs(30), |ow| {
            ow.service_pids("cage").first().is_some_and(|&p| p != pid)
        });
        (ow.service_pids("cage")[0], killed.elapsed())
    });
    println!(
        "cage run (pid {pid}) killed; procd started it again (pid {new_pid}) after {:.1} s; \
         probing from then until a round after: {probing}",
        took.as_secs_f64()
    );
    assert!(
        probing.failures.is_empty() && probing.rounds >= 1,
        "probes got through while cage run was dead: {probing}"
    );
    ow.wait_for(
        "the respawned cage run to apply",
        Duration::from_secs(20),
        |ow| {
            ow.syslog()
                .matches(&format!("cage[{new_pid}]: info: policy applied"))
                .count()
                > 0
        },
    );

    // Reload: a new admin host, `uci commit cage` and `reload_config`; the daemon (same
    // pid) re-reads its configuration on procd's signal.
    let admin4 = || ow.nft_list("set inet cage admin4");
    assert!(!admin4().contains("192.168.8.30"), "{}", admin4());
    ow.sh_ok("uci add_list cage.lan.admin_host='192.168.8.30' && uci commit cage && reload_config");
    ow.wait_for(
        "reload_config to reload cage (the new admin host in the kernel)",
        Duration::from_secs(20),
        |_| admin4().contains("192.168.8.30"),
    );
    assert_eq!(
        ow.service_pids("cage"),
        [new_pid],
        "reloaded, not restarted"
    );
    println!("uci commit cage + reload_config: the new admin host is in the policy");

    // A refused configuration: the init script's reload (what procd's trigger runs)
    // says so and signals nothing; the policy and the daemon stay as they were.
    let before = ow.nft_list("table inet cage");
    ow.sh_ok("uci set cage.ai.address='192.168.10.300/24' && uci commit cage");
    let out = ow.sh("/etc/init.d/cage reload");
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success()
            && said.contains("/etc/config/cage refused, the running policy stays"),
        "/etc/init.d/cage reload with a bad configuration: {out:?}"
    );
    ow.wait_for(
        "cage run to see the bad configuration and keep the last good one",
        Duration::from_secs(20),
        |ow| {
            ow.syslog()
                .contains("the configuration changed but is not valid, the last good one stays")
        },
    );
    let strip = |t: &str| {
        t.lines()
            .map(|l| l.split(" counter packets").next().unwrap_or(l).to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        strip(&ow.nft_list("table inet cage")),
        strip(&before),
        "a refused configuration changed the policy"
    );
    assert_eq!(ow.service_pids("cage"), [new_pid], "the daemon went on");
    ow.sh_ok("uci set cage.ai.address='192.168.10.1/24' && uci commit cage");
    println!("a refused configuration: refused by the init script, the policy unchanged");

    // Stop: the daemon ends, the policy stays, every deny holds.
    ow.sh_ok("/etc/init.d/cage stop");
    ow.wait_for("procd to stop cage", Duration::from_secs(20), |ow| {
        ow.service_pids("cage").is_empty()
    });
    assert!(
        ow.nft_list("tables").contains("table inet cage"),
        "stopping the service removed the policy"
    );
    let report = run_matrix(ow.lab(), &denies);
    assert!(
        report.failures().is_empty(),
        "after /etc/init.d/cage stop: {report}"
    );
    println!("/etc/init.d/cage stop: no daemon, every deny of the contract still holds");

    // What does not run here, loudly.
    cage_tests::warn(
        "procd test: a caged host's DHCP lease from dnsmasq configured by OpenWrt's own \
         dnsmasq init script is NOT CHECKED: the script (and /lib/functions/network.sh, \
         rc.common's validation) need OpenWrt's jsonfilter, /lib/config/uci.sh and \
         validate_data, which ../shared/openwrt does not have",
    );
    println!("in {:.1} s", t.elapsed().as_secs_f64());
}
