//! The board fixtures: OpenWrt's own `board_detect` and `config_generate`, run unchanged
//! in a root made for each target router, give the first-boot network OpenWrt 23.05.4
//! gives that board (the ports named in its `board.d/02_network`).

use cage_tests::openwrt::{Board, Root};
use cage_tests::require_root;

#[test]
#[ignore = "needs root: cargo xtask test"]
fn each_board_gets_openwrts_own_first_boot_network() {
    require_root();
    for board in Board::ALL {
        let root = Root::new(board).unwrap_or_else(|e| panic!("{}: {e}", board.label()));
        let lan_ports = root.sh_ok(
            "for s in $(uci -q show network | sed -n 's/^network\\.\\([^.]*\\)=device$/\\1/p'); do \
               [ \"$(uci -q get network.$s.name)\" = br-lan ] && uci -q get network.$s.ports; \
             done; true",
        );
        let lan_ports = lan_ports.trim();
        let wan = root.uci_get("network.wan.device").unwrap_or_default();
        let lan_ip = root.uci_get("network.lan.ipaddr").unwrap_or_default();
        println!(
            "{:<24} br-lan ports: {:<28} wan: {:<8} lan: {lan_ip}",
            board.label(),
            lan_ports,
            wan
        );
        let (want_lan, want_wan) = match board {
            Board::Mt3000 => ("eth1", "eth0"),
            Board::Mt6000 => ("lan1 lan2 lan3 lan4 lan5", "eth1"),
            Board::Mt300nV2 => ("eth0.1", "eth0.2"),
            Board::Ar300m => ("eth0", "eth1"),
            Board::X86_64 => ("eth0", "eth1"),
        };
        assert_eq!(lan_ports, want_lan, "{}", board.label());
        assert_eq!(wan, want_wan, "{}", board.label());
        assert_eq!(lan_ip, "192.168.1.1", "{}", board.label());
        // The board's definition, as board_detect wrote it.
        let board_json = root.read("etc/board.json");
        assert!(
            board_json.contains(board.board_name()),
            "{}: {board_json}",
            board.label()
        );
        // The shipped defaults of fw4 and dnsmasq are there for the install to edit.
        assert_eq!(
            root.uci_get("firewall.@zone[0].name").as_deref(),
            Some("lan")
        );
        assert_eq!(root.uci_get("dhcp.lan.interface").as_deref(), Some("lan"));
        if board == Board::Mt300nV2 {
            assert_eq!(
                root.uci_get("network.@switch_vlan[0].ports").as_deref(),
                Some("1 6t")
            );
        }
    }
}
