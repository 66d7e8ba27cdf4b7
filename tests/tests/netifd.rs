//! The real netifd (issue 11, item 7): in the lab's router, OpenWrt's own netifd (with
//! ubusd, and fw4 beside it) brings the LAN and the segment up from a GL-MT3000's
//! generated /etc/config/network plus what 90-cage declared, with the board's own device
//! names: WAN eth0, and its one LAN port eth1, which 90-cage makes the AI port (the owner
//! comes in over the router's Wi-Fi, which stays on the LAN); the Cage-AI access point
//! feeds the segment too. Wi-Fi access points are veths that netifd's own wireless code
//! bridges (see `cage_tests::owlab`). `cage run` in OpenWrt mode, started first as at boot,
//! adopts the bridge netifd makes (it creates nothing) and isolates its ports, and:
//! - the whole contract matrix passes;
//! - the web page (`web_listen 'lan:2243'`) comes up on the addresses netifd gave
//!   br-lan, follows them when the owner changes the LAN with uci and
//!   `ubus call network reload`, and a caged host reaches it on none of them;
//! - when netifd remakes the segment's bridge — a change to it and `ubus call network
//!   reload`; netifd stopped and started again, as `/etc/init.d/network restart` does;
//!   netifd killed and started again — every deny of the contract is probed the whole
//!   time, none gets through, and afterwards the matrix passes again.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use cage_tests::contract::{self, run_matrix, Check, Expect, Report};
use cage_tests::http::{get_login, wait_page};
use cage_tests::lab::{self, Node, ROUTER_LAN4, ROUTER_LAN6, ROUTER_SEG4, ROUTER_SEG6};
use cage_tests::openwrt::Board;
use cage_tests::owlab::{probe_while, Fw4, OwLab, WEB_PORT};

fn assert_passes(ow: &OwLab, report: &Report, when: &str) {
    assert!(
        report.failures().is_empty(),
        "{}, {when}: {} checks of the contract failed:\n{report}\n{}",
        ow.board().label(),
        report.failures().len(),
        ow.diagnostics()
    );
}

/// The segment bridge's interface index and MAC address.
fn bridge_identity(ow: &OwLab) -> (String, String) {
    try_bridge_identity(ow).unwrap_or_else(|e| panic!("{e}"))
}

/// The same, or why not (the bridge does not exist while netifd remakes it).
fn try_bridge_identity(ow: &OwLab) -> Result<(String, String), String> {
    let out = ow
        .lab()
        .ip(Node::Router, &["-o", "link", "show", &ow.layout().bridge])
        .map_err(|e| e.to_string())?;
    let index = out.split(':').next().unwrap_or_default().trim().to_owned();
    let mac = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    Ok((index, mac))
}

/// Run `change` while every deny is probed; then wait until netifd has everything up
/// again and Cage has isolated the new bridge's ports (still probing); then the matrix.
fn remade_under_probes(ow: &OwLab, denies: &[Check], what: &str, change: impl FnOnce(&OwLab)) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let before = bridge_identity(ow);
    let t = Instant::now();
    // A remade bridge may take another port's MAC (netifd gives it its first port's,
    // and the ports come back in any order). ai1 pins the router's MAC for the matrix's
    // spoofed probes; a hostile host follows the router's MAC, so ai1's entries follow
    // it here too (polled every 20 ms), or its probes would stop at layer 2 and prove
    // nothing.
    let stop = AtomicBool::new(false);
    let repinned = AtomicUsize::new(0);
    let probing = std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut pinned = before.1.clone();
            let until = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::SeqCst) && Instant::now() < until {
                let now = try_bridge_identity(ow).map(|b| b.1).unwrap_or_default();
                if !now.is_empty()
                    && now != pinned
                    && ow.lab().pin_router_neighbours(Node::Ai1).is_ok()
                {
                    pinned = now;
                    repinned.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let ((), probing) = probe_while(ow.lab(), denies, || {
            change(ow);
            ow.wait_network_up();
            ow.wait_for(
                "Cage to isolate the ports of the remade bridge",
                Duration::from_secs(30),
                |ow| ow.segment_ports_isolated(),
            );
        });
        stop.store(true, Ordering::SeqCst);
        probing
    });
    let after = bridge_identity(ow);
    println!(
        "{what}: bridge {} (index {}, {}) -> index {} ({}; ai1 followed it {} times), all \
         back in {:.1} s; {probing}",
        ow.layout().bridge,
        before.0,
        before.1,
        after.0,
        after.1,
        repinned.load(Ordering::Relaxed),
        t.elapsed().as_secs_f64()
    );
    assert_ne!(
        before.0, after.0,
        "{what}: netifd did not make the bridge again (same interface index)"
    );
    assert!(
        probing.failures.is_empty() && probing.rounds >= 1,
        "{what}: probes got through while netifd remade the bridge: {probing}\n{}",
        ow.diagnostics()
    );
    let report = run_matrix(ow.lab(), &contract::checks());
    assert_passes(ow, &report, &format!("after {what}"));
}

/// `ubus -S call network.interface.IFACE status` in the router.
fn iface_status(ow: &OwLab, iface: &str) -> serde_json::Value {
    let out = ow.sh_ok(&format!("ubus -S call network.interface.{iface} status"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{iface} status: {e}: {out}"))
}

/// The interfaces of a bridge, sorted.
fn bridge_ports(ow: &OwLab, bridge: &str) -> Vec<String> {
    let out = ow
        .lab()
        .ip(Node::Router, &["-o", "link", "show", "master", bridge])
        .unwrap_or_else(|e| panic!("{e}"));
    let mut ports: Vec<String> = out
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
        .collect();
    ports.sort();
    ports
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn netifd_makes_the_segment_cage_adopts_it_and_no_probe_gets_through_when_netifd_remakes_it() {
    lab::require_cage();
    let t = Instant::now();
    let ow = OwLab::up(Board::Mt3000, Fw4::Release2305);
    println!("{}:\n{}", ow.board().label(), ow.layout());
    let run = ow.boot_with_cage(contract::CONFIG_EXTRA);
    println!("booted in {:.1} s", t.elapsed().as_secs_f64());

    // Cage started before the bridge existed, adopted what netifd made, made nothing.
    let log = run.log();
    assert!(log.contains("does not exist yet"), "{log}");
    for made in ["created bridge", "added address", "added port"] {
        assert!(
            !log.contains(made),
            "Cage did netifd's work ({made}):\n{log}"
        );
    }
    // netifd's segment, as /etc/config/network declares it.
    let bridge = ow.layout().bridge.clone();
    let cage = iface_status(&ow, "cage");
    assert_eq!(cage["up"], true, "{cage:#}");
    assert_eq!(cage["l3_device"], bridge.as_str(), "{cage:#}");
    assert_eq!(
        cage["ipv4-address"][0]["address"], "192.168.10.1",
        "{cage:#}"
    );
    assert_eq!(cage["ipv4-address"][0]["mask"], 24, "{cage:#}");
    assert_eq!(
        cage["ipv6-address"][0]["address"], "fd00:cafe:10::1",
        "{cage:#}"
    );
    let mut want: Vec<String> = ow
        .layout()
        .segment
        .iter()
        .map(|a| a.ifname().to_owned())
        .collect();
    want.sort();
    assert_eq!(bridge_ports(&ow, &bridge), want, "the segment's ports");
    let lan = iface_status(&ow, "lan");
    assert_eq!(lan["ipv4-address"][0]["address"], "192.168.8.1", "{lan:#}");
    assert!(
        bridge_ports(&ow, "br-lan").contains(&ow.layout().lan_host.ifname().to_owned()),
        "the LAN host's port is in br-lan"
    );

    let report = run_matrix(ow.lab(), &contract::checks());
    assert_passes(&ow, &report, "after boot");

    // The page, on the addresses netifd gave br-lan; never from the segment.
    let lan_ns = ow.lab().netns(Node::Lan);
    let ai1 = ow.lab().netns(Node::Ai1);
    wait_page(&lan_ns, SocketAddr::new(ROUTER_LAN4, WEB_PORT), &run);
    wait_page(&lan_ns, SocketAddr::new(ROUTER_LAN6, WEB_PORT), &run);
    for ip in [ROUTER_LAN4, ROUTER_LAN6, ROUTER_SEG4, ROUTER_SEG6] {
        let got = get_login(&ai1, SocketAddr::new(ip, WEB_PORT));
        assert!(
            got.is_err(),
            "a caged host reached the page at {ip}: {got:?}"
        );
    }

    let denies: Vec<Check> = contract::checks()
        .into_iter()
        .filter(|c| c.expect == Expect::Deny)
        .collect();
    remade_under_probes(
        &ow,
        &denies,
        "a change to the bridge and `ubus call network reload`",
        |ow| {
            ow.sh_ok(
                "uci set network.cage_dev.priority='32000' && uci commit network && \
                 ubus call network reload",
            );
        },
    );
    remade_under_probes(
        &ow,
        &denies,
        "netifd stopped and started (/etc/init.d/network restart)",
        |ow| {
            ow.stop_netifd(libc::SIGTERM);
            ow.start_netifd();
        },
    );
    remade_under_probes(&ow, &denies, "netifd killed and started", |ow| {
        ow.stop_netifd(libc::SIGKILL);
        ow.start_netifd();
    });

    // The owner moves the LAN with uci: netifd moves br-lan's address, the page follows,
    // and the segment still reaches it nowhere.
    ow.sh_ok(
        "uci set network.lan.ipaddr='192.168.9.1' && uci commit network && \
         ubus call network reload",
    );
    ow.lab()
        .ip(
            Node::Lan,
            &["addr", "add", "192.168.9.10/24", "dev", "eth0"],
        )
        .unwrap();
    let moved: IpAddr = "192.168.9.1".parse().unwrap();
    let took = wait_page(&lan_ns, SocketAddr::new(moved, WEB_PORT), &run);
    println!(
        "the page followed the LAN address netifd moved in {:.1} s",
        took.as_secs_f64()
    );
    assert!(
        get_login(&lan_ns, SocketAddr::new(ROUTER_LAN4, WEB_PORT)).is_err(),
        "the old LAN address still answers"
    );
    let got = get_login(&ai1, SocketAddr::new(moved, WEB_PORT));
    assert!(got.is_err(), "a caged host reached the moved page: {got:?}");
    drop(run);
    println!("in {:.1} s", t.elapsed().as_secs_f64());
}
