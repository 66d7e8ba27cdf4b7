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
//! - OpenWrt's own dnsmasq init script, as a procd service, from the `dhcp` section
//!   90-cage added, serves the segment: a caged host gets a lease with the name it asked
//!   for, and that name reaches the flow log on the host's flows.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cage_tests::contract::{self, run_matrix, Check, Expect};
use cage_tests::http;
use cage_tests::lab::{self, Node};
use cage_tests::openwrt::Board;
use cage_tests::owlab::{probe_while, Fw4, OwLab, WEB_PORT};

#[test]
#[ignore = "needs root: cargo xtask test"]
fn the_init_script_under_procd_respawns_reloads_and_stop_leaves_the_policy() {
    cage_tests::require_root();
    lab::cage_bin().unwrap_or_else(|e| panic!("{e}"));
    let t = Instant::now();
    let mut ow = OwLab::up(Board::Mt6000, Fw4::Release2305);
    ow.install_cage_config(&format!(
        "{}\nconfig flowlog 'flowlog'\n\toption idle_timeout '2'\n",
        contract::CONFIG_EXTRA
    ));
    ow.install_dnsmasq(Path::new(env!("CARGO_BIN_EXE_jsonfilter")));
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
    dhcp_lease_names_the_flows(&ow);
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

    println!("in {:.1} s", t.elapsed().as_secs_f64());
}

/// ai1 asks OpenWrt's dnsmasq (configured by OpenWrt's own init script from the `dhcp`
/// section 90-cage added) for a lease, naming itself; it takes the address, talks to
/// the internet from it, and the flow log names the host.
fn dhcp_lease_names_the_flows(ow: &OwLab) {
    const NAME: &str = "agent-mini";
    // Started now, not at boot: the matrix's DNS checks answer from the lab's own echo
    // server on the router's port 53, which dnsmasq would hold.
    ow.sh_ok("/etc/init.d/dnsmasq enable && /etc/init.d/dnsmasq start");
    ow.wait_for("procd to run dnsmasq", Duration::from_secs(20), |ow| {
        !ow.service_pids("dnsmasq").is_empty()
    });
    let conf = ow.sh_ok("cat /var/etc/dnsmasq.conf.*");
    assert!(
        conf.contains("dhcp-range=set:cage,192.168.10."),
        "dnsmasq's init script gave the segment no DHCP range:\n{conf}"
    );
    // busybox's udhcpc in ai1; its script records what it was offered.
    let got = ow.lab().dir().join("udhcpc.lease");
    let script = ow.lab().dir().join("udhcpc.script");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n[ \"$1\" = bound ] && echo \"$ip $mask\" > {}\nexit 0\n",
            got.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let ai1 = ow.lab().ns(Node::Ai1);
    let udhcpc = lab::run_command(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &ai1,
                "busybox",
                "udhcpc",
                "-i",
                "eth0",
                "-n",
                "-q",
                "-f",
                "-t",
                "5",
                "-T",
                "2",
                "-x",
                &format!("hostname:{NAME}"),
                "-s",
            ])
            .arg(&script),
        None,
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let lease = std::fs::read_to_string(&got).unwrap_or_default();
    let (ip, mask) = lease.trim().split_once(' ').unwrap_or_else(|| {
        panic!(
            "no lease for ai1 from dnsmasq: {udhcpc:?}\n{}\n{}",
            ow.syslog(),
            ow.diagnostics()
        )
    });
    assert!(
        ip.starts_with("192.168.10.") && mask == "24",
        "lease {lease:?} is not in the segment"
    );
    let leases = ow.sh_ok("cat /tmp/dhcp.leases");
    assert!(
        leases
            .lines()
            .any(|l| l.split_whitespace().nth(2) == Some(ip)
                && l.split_whitespace().nth(3) == Some(NAME)),
        "dnsmasq's lease file has no {ip} {NAME}:\n{leases}"
    );
    println!("dnsmasq (OpenWrt's init script) leased {ip}/{mask} to ai1 as {NAME}");
    // The lease binds the address to ai1's MAC before ai1 has sent from it (a lease
    // wins over first come, first served): cage run reads the lease file.
    let mac = leases
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some(ip))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .to_ascii_lowercase();
    ow.wait_for(
        "cage run to bind the leased address to ai1's MAC",
        Duration::from_secs(10),
        |ow| {
            ow.nft_list("set bridge cage bind4")
                .contains(&format!("{ip} . {mac}"))
        },
    );
    println!("cage run bound {ip} to {mac} from the lease, before ai1 used it");
    // Traffic from the leased address, then its flow record with the name.
    ow.lab()
        .ip(
            Node::Ai1,
            &["addr", "add", &format!("{ip}/{mask}"), "dev", "eth0"],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let ping = lab::run_command(
        Command::new("ip").args([
            "netns",
            "exec",
            &ai1,
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "2",
            "-I",
            ip,
            "203.0.113.10",
        ]),
        None,
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        ping.status.success(),
        "ping from the leased address: {ping:?}"
    );
    let named = |ow: &OwLab| -> Option<serde_json::Value> {
        ow.sh_ok(&format!("cage flows --json -n 0 --host {ip}"))
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|r| r["peer"] == "203.0.113.10" && r["verdict"] == "allowed")
    };
    ow.wait_for(
        "the flow log to have ai1's flow from the leased address",
        Duration::from_secs(30),
        |ow| named(ow).is_some(),
    );
    let record = named(ow).unwrap();
    assert_eq!(
        record["hostname"], NAME,
        "the flow record does not carry the name of the lease: {record}"
    );
    println!("its flow to the internet is logged with hostname {NAME}: {record}");
}

/// The page, served by `cage run` under procd with the real backend, says on the first
/// page after the login where the agent plugs in (from the router's own `cage-port`),
/// and the owner moves the AI port there: netifd moves the ports and Cage isolates the
/// new one. A port that is no LAN port is refused with cage-port's message, and
/// nothing changes.
#[test]
#[ignore = "needs root: cargo xtask test"]
fn the_page_says_where_the_agent_plugs_in_and_the_owner_moves_it() {
    const PASSWORD: &str = "correct horse battery";
    cage_tests::require_root();
    lab::cage_bin().unwrap_or_else(|e| panic!("{e}"));
    let mut ow = OwLab::up(Board::Mt6000, Fw4::Release2305);
    ow.install_cage_config(contract::CONFIG_EXTRA);
    ow.boot_procd(&["cage", "firewall", "network"]);
    ow.wait_network_up();
    ow.wait_for(
        "Cage to isolate the segment's ports",
        Duration::from_secs(30),
        |ow| ow.segment_ports_isolated(),
    );
    // The owner sets the password on the router (one line on standard input).
    ow.sh_ok(&format!("echo '{PASSWORD}' | cage passwd"));
    let lan = ow.lab().netns(Node::Lan);
    let ui = SocketAddr::new(lab::ROUTER_LAN4, WEB_PORT);
    let (cookie, csrf) = http::login(&lan, ui, PASSWORD, || ow.syslog());
    let first = http::request(&lan, ui, http::get(ui, "/", &cookie)).unwrap();
    let body = first.body;
    assert_eq!(first.status, 200, "{body}");
    assert!(
        body.contains("<b class=ai-port-label>LAN 5</b>")
            && body.contains("<code class=ai-port-device>lan5</code>")
            && body.contains("the LAN port(s) <b>lan1, lan2, lan3, lan4</b>"),
        "the first page does not say where the agent plugs in:\n{body}"
    );

    // LAN 4 becomes the AI port from the page.
    let moved = http::request(
        &lan,
        ui,
        http::form_post(ui, "/port", &cookie, &format!("csrf={csrf}&choice=lan4")),
    )
    .unwrap();
    assert_eq!(moved.status, 303, "POST /port choice=lan4: {moved:?}");
    let master = |ow: &OwLab, port: &str| -> (String, bool) {
        let out = ow
            .lab()
            .ip(Node::Router, &["-d", "-j", "link", "show", port])
            .unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        (
            v[0]["master"].as_str().unwrap_or("").to_owned(),
            v[0]["linkinfo"]["info_slave_data"]["isolated"] == true,
        )
    };
    ow.wait_for(
        "netifd to put lan4 into br-cage and Cage to isolate it, and lan5 back on br-lan",
        Duration::from_secs(30),
        |ow| master(ow, "lan4") == ("br-cage".into(), true) && master(ow, "lan5").0 == "br-lan",
    );
    assert_eq!(ow.root().uci_get("cage.ai.port").as_deref(), Some("lan4"));
    assert!(
        ow.syslog()
            .contains("web page: web:192.168.8.10 made the AI port lan4"),
        "the change is not in the log:\n{}",
        ow.syslog()
    );
    let body = http::request(&lan, ui, http::get(ui, "/port", &cookie))
        .unwrap()
        .body;
    assert!(
        body.contains("<code class=ai-port-device>lan4</code>"),
        "{body}"
    );

    // The WAN port: refused with cage-port's message, no file changed.
    let files = |ow: &OwLab| ow.sh_ok("cat /etc/config/network /etc/config/cage");
    let before = files(&ow);
    let refused = http::request(
        &lan,
        ui,
        http::form_post(ui, "/port", &cookie, &format!("csrf={csrf}&choice=eth1")),
    )
    .unwrap();
    assert_eq!(
        refused.status, 422,
        "POST /port choice=eth1 (the WAN): {refused:?}"
    );
    assert!(
        refused.body.contains("not a wired LAN or AI port"),
        "{refused:?}"
    );
    assert_eq!(files(&ow), before, "a refused change changed the files");
    println!(
        "the page under procd: LAN 5 shown on the first page, LAN 4 made the AI port from \
         it (netifd moved it, Cage isolated it), the WAN port refused with nothing changed"
    );
}
