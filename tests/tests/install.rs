//! Cage's package installed on each target router the way its owner does it, with
//! OpenWrt's own software: the board's first-boot configuration from OpenWrt's
//! `board_detect` and `config_generate` (cage_tests::openwrt), then the x86_64 `.ipk`
//! (`cargo xtask package --target x86_64`) installed with the real `opkg` on the running
//! router (ubusd and procd up): the postinst runs `/etc/uci-defaults/90-cage` with the
//! real `uci`, which asks `/usr/libexec/cage-port` for the AI port, and procd starts
//! `cage run`, which applies Cage's tables in the router's network namespace.
//!
//! The LAN radio: OpenWrt writes /etc/config/wireless from the radios it detects (`wifi
//! config`, which needs the hardware), so [`Root::add_radio`] stands in for it, with the
//! radio enabled (GL.iNet's firmware) or disabled (OpenWrt's own default).

use cage_tests::openwrt::{Board, Ipk, Root, Router};
use cage_tests::require_root;

/// The LAN's Wi-Fi as the router has it before Cage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Radio {
    /// A radio with its default access point on the LAN, disabled: OpenWrt's default.
    Off,
    /// The same, enabled: GL.iNet's firmware, or an owner who switched it on.
    On,
}

/// What `cage-port show` printed, by key.
#[derive(Debug, Default)]
struct Show {
    layout: String,
    ai_port: Vec<String>,
    ai_label: Vec<String>,
    lan_port: Vec<String>,
    wifi_lan: Vec<String>,
    wifi_ai: Vec<String>,
    note: Vec<String>,
}

fn show(router: &Router) -> Show {
    let text = router.sh_ok("/usr/libexec/cage-port show");
    let mut s = Show::default();
    for line in text.lines() {
        let (key, value) = line.split_once(' ').unwrap_or((line, ""));
        let value = value.to_owned();
        match key {
            "layout" => s.layout = value,
            "ai_port" => s.ai_port.push(value),
            "ai_label" => s.ai_label.push(value),
            "lan_port" => s.lan_port.push(value),
            "wifi_lan" => s.wifi_lan.push(value),
            "wifi_ai" => s.wifi_ai.push(value),
            "note" => s.note.push(value),
            _ => panic!("cage-port show printed an unknown key: {line:?}\n{text}"),
        }
    }
    s
}

/// The device sections' `ports` of the LAN bridge.
fn lan_bridge_ports(router: &Router) -> String {
    router
        .sh_ok(
            "for s in $(uci -q -X show network | sed -n 's/^network\\.\\([^.]*\\)=device$/\\1/p'); do \
               [ \"$(uci -q get network.$s.name)\" = br-lan ] && uci -q get network.$s.ports; \
             done; true",
        )
        .trim()
        .to_owned()
}

/// The page's address as the owner types it: the LAN address from network.lan, the port
/// from cage.main.web_listen ('lan:PORT': every address of the LAN device, read at run
/// time).
/// Each `(KEY, VALUE)`: `uci get KEY` in the router says VALUE.
fn assert_uci(router: &Router, expected: &[(&str, &str)]) {
    for (key, value) in expected {
        assert_eq!(router.uci_get(key).as_deref(), Some(*value), "{key}");
    }
}

fn page(router: &Router) -> String {
    let listen = router.uci_get("cage.main.web_listen").unwrap_or_default();
    let lan = router.uci_get("network.lan.ipaddr").unwrap_or_default();
    match listen.strip_prefix("lan:") {
        Some(port) => format!("https://{}:{port}/", lan.split('/').next().unwrap()),
        None => format!("https://{listen}/ (web_listen is not 'lan:PORT')"),
    }
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn acceptance_table_every_board_after_the_real_install() {
    require_root();
    let ipk = Ipk::x86_64();
    let rows = [
        (Board::Mt3000, Radio::Off),
        (Board::Mt3000, Radio::On),
        (Board::Mt6000, Radio::Off),
        (Board::Mt300nV2, Radio::Off),
        (Board::Mt300nV2, Radio::On),
        (Board::Ar300m, Radio::Off),
        (Board::Ar300m, Radio::On),
        (Board::X86_64, Radio::Off),
        (Board::X86_64, Radio::On),
    ];
    let started = std::time::Instant::now();
    // Each row is a router of its own (root, namespaces): they run side by side.
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = rows
            .iter()
            .map(|&(board, radio)| {
                let ipk = ipk.clone();
                scope.spawn(move || row(board, radio, &ipk))
            })
            .collect();
        handles.into_iter().map(|h| h.join()).collect()
    });
    println!(
        "\n{:<22} {:<9} {:<40} {:<26} the page",
        "board", "LAN radio", "AI port (untagged)", "owner's way in"
    );
    let mut failed = Vec::new();
    for (r, &(board, radio)) in results.into_iter().zip(&rows) {
        match r {
            Ok(line) => println!("{line}"),
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                println!(
                    "{:<22} {:<9} FAILED: {msg}",
                    board.label(),
                    format!("{radio:?}")
                );
                failed.push(format!("{} {radio:?}", board.label()));
            }
        }
    }
    println!(
        "({} routers installed in {:.1} s)",
        rows.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(failed.is_empty(), "rows failed: {failed:?}");
}

/// One row: install, read back, assert, and the line to print.
fn row(board: Board, radio: Radio, ipk: &Ipk) -> String {
    let root = Root::new(board).unwrap_or_else(|e| panic!("{}: {e}", board.label()));
    root.add_radio(radio == Radio::On);
    let router = root.boot();
    // The LAN bridge with the router's LAN address, as netifd brings it up from
    // network.lan (netifd itself runs in the lab's tests, not here).
    let lan_ip = router.uci_get("network.lan.ipaddr").unwrap();
    router.sh_ok(&format!(
        "ip link add br-lan type bridge && ip addr add {lan_ip}/24 dev br-lan && \
         ip link set br-lan up && ip link set lo up"
    ));
    let (ok, out) = router.opkg_install(ipk);
    assert!(ok, "{}: opkg install failed:\n{out}", board.label());
    let s = show(&router);
    let lan_ports = lan_bridge_ports(&router);
    let cage_ports = router.uci_get("network.cage_dev.ports").unwrap_or_default();
    let configured = router.uci_get("cage.ai.port").unwrap_or_default();
    let syslog = router.syslog();
    let page = page(&router);
    let ctx = format!(
        "{} {radio:?}: cage-port show: {s:?}\nbr-lan ports: {lan_ports}\nbr-cage ports: {cage_ports}\n\
         opkg:\n{out}\nsyslog:\n{syslog}",
        board.label()
    );

    // What each board gets (README, "Which port is the AI port").
    let wifi = radio == Radio::On;
    let (ai, label, lan): (&[&str], &[&str], &[&str]) = match (board, wifi) {
        (Board::Mt3000, true) => (&["eth1"], &["the LAN port"], &[]),
        (Board::Mt3000, false) => (&[], &[], &["eth1"]),
        (Board::Mt6000, _) => (&["lan5"], &["LAN 5"], &["lan1", "lan2", "lan3", "lan4"]),
        (Board::Mt300nV2, true) => (&["eth0.10"], &["the LAN port, switch port 1"], &[]),
        (Board::Mt300nV2, false) => (&[], &[], &["eth0.1"]),
        (Board::Ar300m | Board::X86_64, true) => (&["eth0"], &["the LAN port"], &[]),
        (Board::Ar300m | Board::X86_64, false) => (&[], &[], &["eth0"]),
    };
    let layout = match board {
        Board::Mt6000 => "multi",
        Board::Mt300nV2 => "swconfig",
        _ => "single",
    };
    assert_eq!(s.layout, layout, "{ctx}");
    assert_eq!(s.ai_port, ai, "{ctx}");
    assert_eq!(s.ai_label, label, "{ctx}");
    assert_eq!(s.lan_port, lan, "{ctx}");
    assert_eq!(
        s.wifi_lan,
        if wifi { vec!["OpenWrt"] } else { vec![] },
        "{ctx}"
    );
    // The AI Wi-Fi is made on the first radio either way; on a disabled radio it is off
    // and a note says how to switch it on.
    assert_eq!(
        s.wifi_ai,
        if wifi { vec!["Cage-AI"] } else { vec![] },
        "{ctx}"
    );
    assert_eq!(
        router.uci_get("wireless.cage.isolate").as_deref(),
        Some("1"),
        "{ctx}"
    );
    if !wifi {
        assert!(
            s.note
                .iter()
                .any(|n| n.contains("Cage-AI is on radio0, which is disabled")),
            "{ctx}"
        );
    }
    // cage.ai.port says what the network has.
    assert_eq!(configured, ai.join(" "), "{ctx}");

    // The network behind the answer: the AI port an untagged member of the segment's
    // bridge and out of the LAN's; on swconfig a switch VLAN of its own.
    match (board, wifi) {
        (Board::Mt300nV2, true) => {
            assert_eq!(cage_ports, "eth0.10", "{ctx}");
            assert_eq!(
                router.uci_get("network.cage_swvlan.vid").as_deref(),
                Some("10"),
                "{ctx}"
            );
            assert_eq!(
                router.uci_get("network.cage_swvlan.ports").as_deref(),
                Some("1 6t"),
                "{ctx}"
            );
            assert_eq!(
                router.uci_get("network.@switch_vlan[0].ports").as_deref(),
                Some("6t"),
                "{ctx}"
            );
            assert_eq!(lan_ports, "eth0.1", "{ctx}");
        }
        (Board::Mt300nV2, false) => {
            assert_eq!(cage_ports, "", "{ctx}");
            assert_eq!(router.uci_get("network.cage_swvlan"), None, "{ctx}");
            assert_eq!(
                router.uci_get("network.@switch_vlan[0].ports").as_deref(),
                Some("1 6t"),
                "{ctx}"
            );
        }
        _ => {
            assert_eq!(cage_ports, ai.join(" "), "{ctx}");
            assert_eq!(lan_ports, lan.join(" "), "{ctx}");
        }
    }
    // No VLAN trunk unless asked for.
    assert!(
        !router.sh_ok("cat /etc/config/network").contains("8021q"),
        "{ctx}"
    );

    // The owner's way in, and what the install said about it.
    let way_in = {
        let mut w = Vec::new();
        if !lan.is_empty() {
            w.push(format!("LAN {}", lan.join(" ")));
        }
        if wifi {
            w.push("Wi-Fi 'OpenWrt'".to_owned());
        }
        w.join(", ")
    };
    assert!(!way_in.is_empty(), "{ctx}");
    if ai.is_empty() {
        let dev = lan[0];
        assert!(
            s.note.iter().any(|n| n.contains("is NOT caged")
                && n.contains("Enable the LAN Wi-Fi")
                && n.contains(&format!("cage port set {dev}"))),
            "{ctx}"
        );
        assert!(
            syslog
                .contains("cage: no wired AI port: a machine plugged into a LAN port is NOT caged")
                && syslog.contains(&format!("cage port set {dev}")),
            "{ctx}"
        );
    } else {
        assert!(
            syslog.contains(&format!("cage: AI port: {} ({})", ai[0], label[0])),
            "{ctx}"
        );
    }

    // The page: the LAN's own address (OpenWrt's 192.168.1.1) and Cage's port.
    assert_eq!(page, "https://192.168.1.1:2243/", "{ctx}");
    assert!(
        syslog.contains(&format!("cage: Cage's page: {page}")),
        "{ctx}"
    );

    // And Cage itself runs: procd started `cage run`, whose tables are in the kernel.
    assert!(
        eventually(10, || cage_tables(&router).contains("inet cage")),
        "{ctx}\nno Cage table 10 s after the install"
    );
    // The page answers there, asked in the router's network namespace by this
    // machine's curl (busybox's wget, built static against glibc, cannot resolve even
    // an address in the chroot; the LAN has no host here).
    // Over HTTPS, trusting the page's self-signed certificate by its key, as `cage
    // status` shows it in the router (what the owner checks the browser against).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let body = loop {
        let status = router.sh("cage status --json");
        let spki = serde_json::from_slice::<serde_json::Value>(&status.stdout)
            .ok()
            .and_then(|v| v["web_cert"]["spki_sha256"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let got = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                router.netns(),
                "curl",
                "-s",
                "-L",
                "-m",
                "2",
                "--insecure",
                "--pinnedpubkey",
                &format!("sha256//{spki}"),
                &page,
            ])
            .output()
            .unwrap();
        let body = String::from_utf8_lossy(&got.stdout).into_owned();
        if got.status.success() && body.contains("<html") {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{ctx}\nthe page did not answer at {page} within 10 s: {body}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(body.contains("Cage"), "{ctx}\n{body}");

    let ai_text = if ai.is_empty() {
        format!("none: {} stays LAN (NOT caged)", lan[0])
    } else {
        format!("{} ({})", ai.join(" "), label.join(", "))
    };
    format!(
        "{:<22} {:<9} {:<40} {:<26} {}",
        board.label(),
        if wifi { "on" } else { "off" },
        ai_text,
        way_in,
        page
    )
}

/// A board with Cage installed by `opkg install`, its router running.
fn with_cage(board: Board, radio: Radio, ipk: &Ipk, test: impl FnOnce(&Router)) {
    let root = Root::new(board).unwrap_or_else(|e| panic!("{}: {e}", board.label()));
    root.add_radio(radio == Radio::On);
    let router = root.boot();
    let (ok, out) = router.opkg_install(ipk);
    assert!(ok, "{}: opkg install failed:\n{out}", board.label());
    // procd starts `cage run`, which applies the policy a moment later.
    assert!(
        eventually(10, || cage_tables(&router).contains("inet cage")),
        "{}: no Cage table 10 s after the install:\n{out}\n{}",
        board.label(),
        router.syslog()
    );
    test(&router);
}

/// `cage-port ARGS`: exit status, standard output, standard error.
fn cage_port(router: &Router, args: &str) -> (i32, String, String) {
    let out = router.sh(&format!("/usr/libexec/cage-port {args}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The configuration files a refused change must leave byte for byte as they were.
fn files(router: &Router) -> String {
    let root = router.root();
    ["network", "cage", "wireless"]
        .iter()
        .map(|f| root.read(&format!("etc/config/{f}")))
        .collect::<Vec<_>>()
        .join("\n----\n")
}

/// A refusal: exit 2, a message on stderr, nothing changed.
fn refused(router: &Router, args: &str, says: &str) {
    let before = files(router);
    let (rc, _, err) = cage_port(router, args);
    assert_eq!(rc, 2, "cage-port {args}: {err}");
    assert!(
        err.starts_with("cage-port: ") && err.contains(says),
        "cage-port {args}: {err}"
    );
    assert_eq!(files(router), before, "cage-port {args} changed something");
    assert_eq!(
        router.sh_ok("uci changes network; uci changes cage"),
        "",
        "cage-port {args} left changes staged"
    );
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn cage_port_moves_the_ai_port_between_lan_ports() {
    require_root();
    with_cage(Board::Mt6000, Radio::Off, &Ipk::x86_64(), |router| {
        let shipped_comment = "# The wired AI port: plug the agent's machine in there.";
        assert_eq!(show(router).ai_port, ["lan5"]);
        let (rc, out, err) = cage_port(router, "set lan2");
        assert_eq!((rc, out.as_str()), (0, ""), "{err}");
        let s = show(router);
        assert_eq!(
            (s.ai_port, s.ai_label),
            (vec!["lan2".to_owned()], vec!["LAN 2".to_owned()])
        );
        // The previous one back on the LAN, in the board's order.
        assert_eq!(lan_bridge_ports(router), "lan1 lan3 lan4 lan5");
        assert_eq!(
            router.uci_get("network.cage_dev.ports").as_deref(),
            Some("lan2")
        );
        // cage.ai.port follows, and the file keeps its comments.
        let cage = router.root().read("etc/config/cage");
        assert!(
            cage.contains("\tlist port 'lan2'\n") && cage.contains(shipped_comment),
            "{cage}"
        );
        assert_eq!(router.uci_get("cage.ai.port").as_deref(), Some("lan2"));
        // Nothing reloaded, nothing left staged.
        assert_eq!(router.sh_ok("uci changes"), "");

        // The board's default again, and again: the second time changes nothing.
        assert_eq!(cage_port(router, "auto").0, 0);
        assert_eq!(show(router).ai_port, ["lan5"]);
        assert_eq!(lan_bridge_ports(router), "lan1 lan2 lan3 lan4");
        let once = files(router);
        assert_eq!(cage_port(router, "auto").0, 0);
        assert_eq!(files(router), once, "auto twice is not auto once");

        // None: every port on the LAN, said in a note.
        assert_eq!(cage_port(router, "none").0, 0);
        let s = show(router);
        assert!(s.ai_port.is_empty());
        assert_eq!(s.lan_port, ["lan1", "lan2", "lan3", "lan4", "lan5"]);
        assert!(
            s.note
                .iter()
                .any(|n| n.contains("NOT caged") && n.contains("LAN 5")),
            "{s:?}"
        );
        assert_eq!(router.uci_get("cage.ai.port"), None);
        assert!(router
            .root()
            .read("etc/config/cage")
            .contains(shipped_comment));
        assert_eq!(cage_port(router, "set lan5").0, 0);

        // Refusals change nothing.
        refused(
            router,
            "set lan9",
            "lan9 is not a wired LAN or AI port of this router",
        );
        refused(router, "set eth1", "not a wired LAN or AI port"); // the WAN
        refused(router, "set br-cage", "not a wired LAN or AI port");
        refused(router, "set", "usage");
        refused(router, "set lan1 lan2", "one port at a time");
        refused(router, "sideways", "usage");
        router.sh_ok("uci set network.lan.ipaddr=10.9.9.1");
        let (rc, _, err) = cage_port(router, "set lan3");
        assert_eq!(rc, 2);
        assert!(err.contains("uncommitted changes"), "{err}");
        router.sh_ok("uci revert network");
        assert_eq!(show(router).ai_port, ["lan5"]);

        // The VLAN trunk, opt-in: the segment tagged on the ports left on the LAN.
        router.sh_ok("sed -i \"s/^\\t#option vlan '10'/\\toption vlan '10'/\" /etc/config/cage");
        assert_eq!(router.uci_get("cage.ai.vlan").as_deref(), Some("10"));
        assert_eq!(cage_port(router, "auto").0, 0);
        assert_uci(
            router,
            &[
                (
                    "network.cage_dev.ports",
                    "lan5 lan1.10 lan2.10 lan3.10 lan4.10",
                ),
                ("network.cage_vlan_lan1.type", "8021q"),
                ("network.cage_vlan_lan1.ifname", "lan1"),
                ("network.cage_vlan_lan1.vid", "10"),
            ],
        );
        let s = show(router);
        assert_eq!(s.ai_port, ["lan5"], "the trunk is not an untagged AI port");
        assert!(
            s.note.iter().any(|n| n.contains("VLAN trunk")
                && n.contains("VLAN 10")
                && n.contains("lan1, lan2, lan3, lan4")),
            "{s:?}"
        );
        // Moving the port moves the trunk with the LAN ports.
        assert_eq!(cage_port(router, "set lan1").0, 0);
        assert_eq!(
            router.uci_get("network.cage_dev.ports").as_deref(),
            Some("lan1 lan2.10 lan3.10 lan4.10 lan5.10")
        );
        assert_eq!(router.uci_get("network.cage_vlan_lan1"), None);
        // Off again: the trunk's devices go.
        router.sh_ok("sed -i \"s/^\\toption vlan '10'/\\t#option vlan '10'/\" /etc/config/cage");
        assert_eq!(cage_port(router, "auto").0, 0);
        assert_eq!(
            router.uci_get("network.cage_dev.ports").as_deref(),
            Some("lan5")
        );
        assert!(!router.root().read("etc/config/network").contains("8021q"));
    });
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn cage_port_on_a_one_port_router_keeps_the_owner_a_way_in() {
    require_root();
    with_cage(Board::Mt3000, Radio::Off, &Ipk::x86_64(), |router| {
        assert!(show(router).ai_port.is_empty());
        // No LAN Wi-Fi: taking the only LAN port would lock the owner out.
        refused(router, "set eth1", "would leave no way in from the LAN");
        // Unless they say they come in another way.
        let (rc, _, err) = cage_port(router, "set eth1 --force");
        assert_eq!(rc, 0, "{err}");
        let s = show(router);
        assert_eq!(s.ai_port, ["eth1"]);
        assert!(
            s.note.iter().any(|n| n.contains("no way in from the LAN")),
            "{s:?}"
        );
        assert_eq!(lan_bridge_ports(router), "");
        // The LAN keeps its address without a port.
        assert_eq!(
            router.uci_get("network.@device[0].bridge_empty").as_deref(),
            Some("1")
        );
        assert_eq!(cage_port(router, "none").0, 0);
        assert_eq!(lan_bridge_ports(router), "eth1");
        // The board's default without Wi-Fi: the port stays LAN, and auto says why.
        assert_eq!(cage_port(router, "auto").0, 0);
        assert!(show(router).ai_port.is_empty());
        // With the LAN Wi-Fi on, the default is the port.
        router.sh_ok("uci set wireless.radio0.disabled=0 && uci commit wireless");
        assert_eq!(cage_port(router, "auto").0, 0);
        let s = show(router);
        assert_eq!(s.ai_port, ["eth1"]);
        assert_eq!(s.wifi_lan, ["OpenWrt"]);
        assert_eq!(s.wifi_ai, ["Cage-AI"]);
        assert!(s.note.is_empty(), "{s:?}");
        // A disabled access point is not a way in.
        router.sh_ok("uci set wireless.default_radio0.disabled=1 && uci commit wireless");
        assert_eq!(cage_port(router, "none").0, 0);
        refused(
            router,
            "set eth1",
            "no enabled Wi-Fi access point on the LAN",
        );
    });
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn cage_port_on_swconfig_is_a_switch_vlan_of_its_own() {
    require_root();
    with_cage(Board::Mt300nV2, Radio::On, &Ipk::x86_64(), |router| {
        let get = |k: &str| router.uci_get(k).unwrap_or_default();
        assert_eq!(show(router).ai_port, ["eth0.10"]);
        assert_eq!(get("network.cage_swvlan.device"), "switch0");
        assert_eq!(get("network.cage_swvlan.vlan"), "3");
        // Back to the LAN: the switch VLAN goes, the port is in the LAN's again.
        assert_eq!(cage_port(router, "none").0, 0);
        assert_eq!(router.uci_get("network.cage_swvlan"), None);
        assert_eq!(get("network.@switch_vlan[0].ports"), "1 6t");
        assert_eq!(get("network.cage_dev.ports"), "");
        let s = show(router);
        assert_eq!(s.lan_port, ["eth0.1"]);
        assert!(
            s.note.iter().any(|n| n.contains("cage port set eth0.1")),
            "{s:?}"
        );
        // The LAN's switch VLAN device names the port behind it.
        assert_eq!(cage_port(router, "set eth0.1").0, 0);
        assert_eq!(get("network.cage_swvlan.ports"), "1 6t");
        assert_eq!(get("network.cage_dev.ports"), "eth0.10");
        assert_eq!(cage_port(router, "set eth0.10").0, 0, "the AI port itself");
        assert_eq!(get("network.cage_swvlan.ports"), "1 6t");
        // The owner's VLAN id, and a taken one refused.
        router.sh_ok("sed -i \"s/^\\t#option vlan '10'/\\toption vlan '20'/\" /etc/config/cage");
        assert_eq!(cage_port(router, "auto").0, 0);
        assert_eq!(get("network.cage_swvlan.vid"), "20");
        assert_eq!(get("network.cage_dev.ports"), "eth0.20");
        assert_eq!(show(router).ai_port, ["eth0.20"]);
        router.sh_ok("sed -i \"s/^\\toption vlan '20'/\\toption vlan '2'/\" /etc/config/cage");
        refused(
            router,
            "auto",
            "VLAN 2 (cage.ai.vlan) is already a VLAN of switch0",
        );
        assert!(
            !router
                .root()
                .read("etc/config/network")
                .contains("eth0.1.10"),
            "a VLAN on a VLAN"
        );
    });
}

/// Poll `cond` every 50 ms for up to `secs` seconds.
fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Cage's tables in the router's kernel, as nft prints them.
fn cage_tables(router: &Router) -> String {
    router.sh_ok("nft list tables | grep ' cage$' || true")
}

/// The daemon procd runs for the service, if it runs.
fn cage_running(router: &Router) -> bool {
    router
        .sh_ok("ubus call service list '{\"name\":\"cage\"}'")
        .contains("\"running\": true")
}

/// A directory of the test's own, removed when dropped (also when the test fails).
struct Temp(std::path::PathBuf);

impl Temp {
    fn new(tag: &str) -> Temp {
        let dir = std::env::temp_dir().join(format!("cage-install-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Temp(dir)
    }
}

impl std::ops::Deref for Temp {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn init_script_under_procd_runs_cage_and_reloads_only_a_valid_config() {
    require_root();
    with_cage(Board::Mt6000, Radio::Off, &Ipk::x86_64(), |router| {
        // procd's view of the service the postinst enabled and started.
        let list = router.sh_ok("ubus call service list '{\"name\":\"cage\",\"verbose\":true}'");
        for want in [
            "\"running\": true",
            "\"/usr/bin/cage\"",
            "\"--config\"",
            "\"/etc/config/cage\"",
            "\"run\"",
            "\"threshold\": 3600",
            "\"timeout\": 5",
            "\"retry\": 0",
            "\"config.change\"",
            "\"/etc/init.d/cage\",",
            "\"reload\"",
        ] {
            assert!(list.contains(want), "procd has no {want}:\n{list}");
        }
        assert!(
            router.root().join("etc/rc.d/S18cage").exists(),
            "not enabled at boot"
        );
        // Its standard output and error reach syslog (procd_set_param stdout/stderr).
        assert!(
            eventually(10, || router.syslog().lines().any(
                |l| l.contains(" cage[") && l.contains("policy applied from /etc/config/cage")
            )),
            "{}",
            router.syslog()
        );
        let tables = router.settled_policy();
        let sighups = |r: &Router| {
            r.syslog()
                .matches("SIGHUP: reloading configuration")
                .count()
        };

        // A bad edit: the reload refuses it, the daemon is not told, the policy stays.
        router.sh_ok("sed -i \"s/option address '192.168.10.1\\/24'/option address '192.168.10.300\\/24'/\" /etc/config/cage");
        let out = router.sh("/etc/init.d/cage reload");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "reload accepted a bad configuration");
        assert!(
            err.contains("cage.ai.address") && err.contains("refused, the running policy stays"),
            "{err}"
        );
        assert_eq!(sighups(router), 0);
        // The same through OpenWrt's own path (an edit, then reload_config): procd runs
        // the reload trigger, which refuses, and says so in syslog.
        router.sh_ok("reload_config");
        assert!(
            eventually(10, || {
                router
                .syslog()
                .matches("/etc/config/cage refused, the running policy stays: cage: /etc/config/cage: 1 error")
                .count()
                == 2
            }),
            "procd's trigger did not run the reload:\n{}",
            router.syslog()
        );
        assert_eq!(sighups(router), 0);
        // A good edit, through reload_config: procd's trigger reloads, cage run gets
        // SIGHUP and takes it.
        router.sh_ok("sed -i \"s/option address '192.168.10.300\\/24'/option address '192.168.10.1\\/24'/; s/option auto_window '10'/option auto_window '20'/\" /etc/config/cage");
        router.sh_ok("reload_config");
        assert!(
            eventually(10, || sighups(router) == 1),
            "no SIGHUP after reload_config:\n{}",
            router.syslog()
        );
        assert!(cage_running(router));
        // The bad edit's reload_config did not signal: one SIGHUP, the good one's.
        assert_eq!(sighups(router), 1, "{}", router.syslog());
        assert_eq!(router.policy(), tables, "the policy changed");
        // Stopping the service ends the daemon only: the policy stays in the kernel.
        router.sh_ok("/etc/init.d/cage stop");
        assert!(eventually(10, || !cage_running(router)));
        assert_eq!(
            router.sh("pidof cage").status.code(),
            Some(1),
            "cage run still runs"
        );
        assert_eq!(router.policy(), tables, "stop took the policy down");
    });
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn upgrade_keeps_the_owners_config_and_adds_no_section_twice() {
    require_root();
    let dir = Temp::new("upgrade");
    let new = Ipk::x86_64();
    let old = new.repack(&dir, "0.0.9-r1", |_| {});
    let root = Root::new(Board::Mt6000).unwrap();
    root.add_radio(true);
    let router = root.boot();
    let (ok, out) = router.opkg_install(&old);
    assert!(ok, "{out}");
    // The owner's edits: another AI port, an admin host, a password-ish change.
    assert_eq!(cage_port(&router, "set lan3").0, 0);
    router.sh_ok("sed -i \"s/#list admin_host '192.168.8.10'/list admin_host '192.168.1.10'/\" /etc/config/cage");
    router.sh_ok("cage check >/dev/null");
    let before: Vec<_> = ["cage", "network", "firewall", "dhcp", "wireless"]
        .iter()
        .map(|f| (f.to_string(), root.read(&format!("etc/config/{f}"))))
        .collect();
    let tables = cage_tables(&router);
    assert!(tables.contains("inet cage"), "{tables}");

    let (ok, out) = router.opkg_install(&new);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "Upgrading cage on root from 0.0.9-r1 to {}",
            new.version
        )),
        "{out}"
    );
    for (file, text) in &before {
        assert_eq!(
            &root.read(&format!("etc/config/{file}")),
            text,
            "the upgrade changed /etc/config/{file}\n{out}"
        );
    }
    assert!(root
        .read("etc/config/cage")
        .contains("list admin_host '192.168.1.10'"));
    // An upgrade does not take the policy down (prerm's `cage disable` is for removal).
    assert_eq!(cage_tables(&router), tables);
    assert!(
        eventually(10, || cage_running(&router)),
        "cage run is not running after the upgrade"
    );
    assert!(
        !root.join("etc/uci-defaults/90-cage").exists(),
        "90-cage did not run"
    );
    assert_eq!(
        router.sh_ok("opkg list-installed cage").trim(),
        format!("cage - {}", new.version)
    );
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn remove_leaves_no_cage_table_and_the_segment_switched_off() {
    require_root();
    for (board, radio) in [(Board::Mt6000, Radio::On), (Board::Mt300nV2, Radio::On)] {
        with_cage(board, radio, &Ipk::x86_64(), |router| {
            let root = router.root();
            let ai = show(router).ai_port;
            assert_eq!(ai.len(), 1);
            assert!(cage_tables(router).contains("inet cage"));
            let network = root.read("etc/config/network");
            let wireless = root.read("etc/config/wireless");
            let lan = lan_bridge_ports(router);
            // The segment's bridge, as netifd makes it (with `ip` here): cage run adopts
            // it and attaches its eBPF flow counter, pinned in the router's bpffs. Made
            // after cage run's first look found none: a bridge that is there before that
            // first look gets no eBPF program (cage-agent's daemon.rs, repair_segment).
            assert!(eventually(15, || router.syslog().contains(
                "cannot set up the segment: br-cage does not exist yet"
            )));
            router.sh_ok("ip link add br-cage type bridge && ip link set br-cage up");
            let pins = || router.sh_ok("ls /sys/fs/bpf/cage/br-cage 2>/dev/null; true");
            assert!(
                eventually(15, || !pins().trim().is_empty()),
                "cage run did not attach to br-cage:\n{}",
                router.syslog()
            );

            let out = router.sh_ok("opkg remove cage 2>&1");
            // ... and `cage disable` took the eBPF program away too.
            assert_eq!(pins().trim(), "", "eBPF pins left:\n{out}");
            // Nothing left on the bridge either (this machine's tc and bpftool, in the
            // router's network namespace: busybox has neither).
            let on_bridge = std::process::Command::new("ip")
                .args(["netns", "exec", router.netns(), "sh", "-c"])
                .arg(
                    "tc filter show dev br-cage ingress; tc filter show dev br-cage egress; \
                     command -v bpftool >/dev/null && bpftool net show dev br-cage; true",
                )
                .output()
                .unwrap();
            let on_bridge = String::from_utf8_lossy(&on_bridge.stdout).into_owned();
            assert!(
                !on_bridge.contains("cage"),
                "a hook is left on br-cage:\n{on_bridge}"
            );
            // prerm's `cage disable` ran: no Cage table left, no daemon (procd neither
            // restarted it nor kept the service).
            assert_eq!(cage_tables(router), "", "{out}");
            assert!(!cage_running(router));
            assert_eq!(
                router.sh("pidof cage").status.code(),
                Some(1),
                "a cage process is left"
            );
            assert!(
                !root.join("usr/bin/cage").exists()
                    && !root.join("usr/libexec/cage-port").exists()
                    && !root.join("usr/libexec/cage-remove").exists()
            );
            assert!(!root.join("etc/rc.d/S18cage").exists());
            // The segment: switched off, its sections named, the AI port on no network
            // (not given back to the LAN: the machine on it is the one that was caged).
            assert_uci(
                router,
                &[
                    ("network.cage.disabled", "1"),
                    ("network.cage.cage_removed", "1"),
                    ("wireless.cage.disabled", "1"),
                ],
            );
            assert_eq!(
                lan_bridge_ports(router),
                lan,
                "the AI port went back to the LAN"
            );
            assert!(router.uci_get("firewall.cage_zone").is_some());
            assert!(router.uci_get("dhcp.cage").is_some());
            for says in ["Cage is removed", "switched off", &ai[0], "cage port none"] {
                assert!(out.contains(says), "removal did not say {says:?}:\n{out}");
                assert!(router.syslog().contains(says), "{}", router.syslog());
            }
            // The owner's configuration stays (it holds their choices and password).
            assert!(root.join("etc/config/cage").exists());

            // Installed again: switched back on, and nothing twice.
            let (ok, out) = router.opkg_install(&Ipk::x86_64());
            assert!(ok, "{out}");
            assert_eq!(root.read("etc/config/network"), network, "{out}");
            assert_eq!(root.read("etc/config/wireless"), wireless, "{out}");
            assert!(out.contains("switched back on"), "{out}");
            assert!(eventually(10, || cage_tables(router).contains("inet cage")));
        });
    }
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn remove_with_the_kill_switch_on_keeps_the_isolation() {
    require_root();
    with_cage(Board::Mt3000, Radio::On, &Ipk::x86_64(), |router| {
        router.sh_ok("cage isolate --reason 'before removal'");
        let out = router.sh_ok("opkg remove cage 2>&1");
        assert!(
            out.contains("tables stay in the kernel until the next reboot"),
            "{out}"
        );
        assert!(cage_tables(router).contains("inet cage"), "{out}");
        assert_eq!(
            router.uci_get("network.cage.disabled").as_deref(),
            Some("1")
        );
    });
}

/// /etc/config/cage with the segment's address broken.
fn break_config(data: &std::path::Path) {
    let path = data.join("etc/config/cage");
    let text = std::fs::read_to_string(&path).unwrap();
    let bad = text.replace(
        "option address '192.168.10.1/24'",
        "option address '192.168.10.300/24'",
    );
    assert_ne!(bad, text);
    std::fs::write(&path, bad).unwrap();
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn a_bad_config_in_a_fresh_install_declares_nothing() {
    require_root();
    let dir = Temp::new("bad-fresh");
    let bad = Ipk::x86_64().repack(&dir, "0.1.0-r9", break_config);
    let root = Root::new(Board::Mt6000).unwrap();
    root.add_radio(true);
    let router = root.boot();
    let before: Vec<_> = ["network", "firewall", "dhcp", "wireless"]
        .iter()
        .map(|f| (f.to_string(), root.read(&format!("etc/config/{f}"))))
        .collect();
    let (_, out) = router.opkg_install(&bad);
    for (file, text) in &before {
        assert_eq!(
            &root.read(&format!("etc/config/{file}")),
            text,
            "/etc/config/{file} changed:\n{out}"
        );
    }
    assert!(
        out.contains("is refused, so Cage's segment is NOT declared"),
        "{out}"
    );
    assert!(out.contains("cage.ai.address"), "{out}");
    assert!(router.syslog().contains("NOT declared"));
    // Kept for the next boot, as OpenWrt does with a uci-defaults script that failed.
    assert!(root.join("etc/uci-defaults/90-cage").exists());
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn a_bad_config_from_an_upgrade_or_the_owner_never_half_applies() {
    require_root();
    let dir = Temp::new("bad-upgrade");
    let good = Ipk::x86_64();
    let bad = good.repack(&dir, "0.1.0-r9", break_config);
    // A one-port router without LAN Wi-Fi: the install writes nothing into
    // /etc/config/cage, so opkg replaces it on upgrade (an unmodified conffile).
    with_cage(Board::Mt3000, Radio::Off, &good, |router| {
        let root = router.root();
        let snapshot = || {
            ["network", "firewall", "dhcp", "wireless"]
                .iter()
                .map(|f| root.read(&format!("etc/config/{f}")))
                .collect::<Vec<_>>()
        };
        let before = snapshot();
        let policy = router.settled_policy();
        let (ok, out) = router.opkg_install(&bad);
        assert!(ok, "{out}");
        assert!(
            root.read("etc/config/cage").contains("192.168.10.300"),
            "the shipped file did not land"
        );
        assert_eq!(snapshot(), before, "{out}");
        assert_eq!(router.policy(), policy, "the policy changed:\n{out}");
        assert!(out.contains("cage.ai.address"), "{out}");
        // The new `cage run` refuses the file and stops; the kernel keeps the last good
        // policy (procd tries again every 5 s, with the same result).
        assert!(
            eventually(10, || !cage_running(router)),
            "cage run took a bad file"
        );
        assert!(
            router.syslog().contains("cage.ai.address (line"),
            "{}",
            router.syslog()
        );
        assert_eq!(router.policy(), policy);
        let check = router.sh("cage check");
        assert!(!check.status.success());

        // The owner repairs it by hand; the next upgrade's 90-cage goes through.
        router.sh_ok("sed -i \"s/192.168.10.300/192.168.10.1/\" /etc/config/cage && sh /etc/uci-defaults/90-cage");
        assert_eq!(
            snapshot(),
            before,
            "a repaired config on an installed router changes nothing"
        );
        // The owner breaks it: reloads and the next run of 90-cage refuse it.
        router.sh_ok("sed -i \"s/option address '192.168.10.1\\/24'/option address '10.0.0.1\\/33'/\" /etc/config/cage");
        let out = router.sh("sh /etc/uci-defaults/90-cage");
        assert_eq!(out.status.code(), Some(1));
        router.sh_ok("reload_config");
        assert_eq!(snapshot(), before);
        assert_eq!(router.policy(), policy);
    });
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn image_build_installs_offline_and_first_boot_declares_the_segment() {
    require_root();
    let root = Root::new(Board::Mt6000).unwrap();
    root.add_radio(true);
    let network = root.read("etc/config/network");
    let out = root.install_offline(&Ipk::x86_64().path);
    // The image holds the package, enabled, its uci-defaults waiting for first boot.
    assert!(
        root.join("usr/bin/cage").exists() && root.join("usr/libexec/cage-port").exists(),
        "{out}"
    );
    assert!(
        root.join("etc/rc.d/S18cage").exists() && root.join("etc/rc.d/K89cage").exists(),
        "{out}"
    );
    assert!(root.join("etc/uci-defaults/90-cage").exists());
    assert_eq!(
        root.read("etc/config/network"),
        network,
        "the image build ran 90-cage"
    );
    let router = root.boot();
    let said = router.first_boot();
    assert!(!root.join("etc/uci-defaults/90-cage").exists(), "{said}");
    assert!(said.contains("cage: AI port: lan5 (LAN 5)"), "{said}");
    assert_eq!(show(&router).ai_port, ["lan5"]);
    assert_eq!(
        router.uci_get("network.cage.ipaddr").as_deref(),
        Some("192.168.10.1")
    );
    let get = |k: &str| router.uci_get(k).unwrap_or_default();
    assert_eq!(get("firewall.cage_zone.input"), "REJECT");
    assert_eq!(get("firewall.cage_zone.forward"), "REJECT");
    assert_eq!(get("firewall.cage_wan.dest"), "wan");
    assert_eq!(get("firewall.cage_lan.src"), "lan");
    assert_eq!(get("firewall.cage_dnsfwd.dest_port"), "5354");
    assert_eq!(get("dhcp.cage.interface"), "cage");
    assert_eq!(get("wireless.cage.encryption"), "psk2");
    let key = get("wireless.cage.key");
    // Not the md5 of nothing: /dev/urandom was there.
    assert!(
        key.len() >= 16 && key != "d41d8cd98f00b204e980",
        "weak AI Wi-Fi key {key:?}"
    );
    // procd starts enabled services after boot: the same service, by its rc.d link.
    router.sh_ok("/etc/rc.d/S18cage start");
    assert!(eventually(10, || cage_tables(&router).contains("inet cage")));
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn cage_port_honours_uci_config_dir() {
    require_root();
    with_cage(Board::Mt6000, Radio::Off, &Ipk::x86_64(), |router| {
        let root = router.root();
        let dir = Temp::new("uci-config-dir");
        for f in ["network", "wireless", "cage"] {
            std::fs::copy(root.join(&format!("etc/config/{f}")), dir.join(f)).unwrap();
        }
        let network = root.read("etc/config/network");
        // The package's script, run on this machine with OpenWrt's uci on PATH.
        let run = |args: &[&str]| {
            let out = std::process::Command::new("sh")
                .arg(root.join("usr/libexec/cage-port"))
                .args(args)
                .env("UCI_CONFIG_DIR", &*dir)
                .env(
                    "PATH",
                    format!(
                        "{}:/usr/sbin:/usr/bin:/sbin:/bin",
                        root.tools().prefix().join("bin").display()
                    ),
                )
                .output()
                .unwrap();
            cage_tests::assert_success(&out, format_args!("cage-port {args:?}"))
        };
        assert!(run(&["show"]).contains("ai_port lan5\n"));
        run(&["set", "lan2"]);
        assert!(run(&["show"]).contains("ai_port lan2\n"));
        let copy = std::fs::read_to_string(dir.join("network")).unwrap();
        assert!(copy.contains("list ports 'lan2'"), "{copy}");
        assert!(std::fs::read_to_string(dir.join("cage"))
            .unwrap()
            .contains("list port 'lan2'"));
        // The router's own files are untouched, and nothing was staged anywhere else.
        assert_eq!(root.read("etc/config/network"), network);
        assert!(
            !dir.join(".uci/network").exists()
                || std::fs::read_to_string(dir.join(".uci/network"))
                    .unwrap()
                    .is_empty()
        );
    });
}
