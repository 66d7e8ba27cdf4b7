//! A hostile neighbour on the segment (issue 13): ai1 attacks ai2, with real frames.
//!
//! - Address theft, IPv4: ai1 takes ai2's address and announces it by ARP, then sends
//!   from it. Without Cage's bridge table the router's neighbour entry moves to ai1 and
//!   replies meant for ai2 arrive at ai1 (the attack works in this lab: proven first);
//!   with it, the announcements and the packets are dropped, the router's entry stays
//!   ai2's, ai1 receives nothing of ai2's and ai2's traffic keeps flowing.
//!
//! Frames are made by hand and sent on an AF_PACKET socket in the attacker's namespace,
//! as a hostile host would; what arrives is seen with tcpdump on the attacker's side.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::time::Duration;

use cage_agent::probe::NetNs;
use cage_tests::lab::{
    self, Lab, Node, AI1_6, AI1_MAC, AI2_4, AI2_6, AI2_MAC, PUBLIC4, PUBLIC6, ROUTER_SEG4,
};

fn mac(text: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, part) in text.split(':').enumerate() {
        m[i] = u8::from_str_radix(part, 16).expect("a MAC");
    }
    m
}

fn v4(a: std::net::IpAddr) -> Ipv4Addr {
    match a {
        std::net::IpAddr::V4(a) => a,
        other => panic!("{other} is not IPv4"),
    }
}

/// An ARP frame (Ethernet II): `op` 1 request, 2 reply.
fn arp(op: u16, dst: [u8; 6], sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend(dst);
    f.extend(sha);
    f.extend(0x0806u16.to_be_bytes());
    f.extend([0, 1, 8, 0, 6, 4]);
    f.extend(op.to_be_bytes());
    f.extend(sha);
    f.extend(spa.octets());
    f.extend(tha);
    f.extend(tpa.octets());
    f
}

fn v6(a: std::net::IpAddr) -> Ipv6Addr {
    match a {
        std::net::IpAddr::V6(a) => a,
        other => panic!("{other} is not IPv6"),
    }
}

/// A neighbour advertisement (Ethernet II, IPv6, ICMPv6 136) from `src` (MAC and
/// address) to all nodes, saying `target` is at `src`'s MAC, override set; `solicited`
/// sets the S flag as well (a forged answer).
fn neighbour_advert(src_mac: [u8; 6], src: Ipv6Addr, target: Ipv6Addr, solicited: bool) -> Vec<u8> {
    let dst: Ipv6Addr = "ff02::1".parse().unwrap();
    let mut icmp = vec![136, 0, 0, 0, if solicited { 0x60 } else { 0x20 }, 0, 0, 0];
    icmp.extend(target.octets());
    icmp.extend([2, 1]);
    icmp.extend(src_mac);
    // The checksum over the pseudo-header (RFC 8200 8.1) and the message.
    let mut sum: u32 = 0;
    for bytes in [
        &src.octets()[..],
        &dst.octets()[..],
        &(icmp.len() as u32).to_be_bytes()[..],
        &[0, 0, 0, 58][..],
        &icmp[..],
    ] {
        for pair in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let check = !(sum as u16);
    icmp[2..4].copy_from_slice(&check.to_be_bytes());
    let mut f = vec![0x33, 0x33, 0, 0, 0, 1];
    f.extend(src_mac);
    f.extend(0x86ddu16.to_be_bytes());
    f.extend([0x60, 0, 0, 0]);
    f.extend((icmp.len() as u16).to_be_bytes());
    f.extend([58, 255]);
    f.extend(src.octets());
    f.extend(dst.octets());
    f.extend(icmp);
    f
}

/// The router's MAC on the segment.
fn router_mac(lab: &Lab) -> [u8; 6] {
    let out = lab
        .ip(Node::Router, &["-o", "link", "show", "br-cage"])
        .expect("br-cage");
    let m = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .expect("br-cage's MAC");
    mac(m)
}

/// The router's neighbour entry for `addr` on the segment, as `ip neigh` prints it.
fn router_neighbour(lab: &Lab, addr: &str) -> String {
    lab.ip(Node::Router, &["neigh", "show", addr, "dev", "br-cage"])
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Run `cmd` in `node`'s namespace (bounded), its output.
fn in_ns(lab: &Lab, node: Node, cmd: &[&str], timeout: Duration) -> std::process::Output {
    lab::run_command(
        Command::new("ip")
            .args(["netns", "exec", &lab.ns(node)])
            .args(cmd),
        None,
        timeout,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The family an attack is on.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn victim(self) -> std::net::IpAddr {
        match self {
            Family::V4 => AI2_4,
            Family::V6 => AI2_6,
        }
    }

    fn internet(self) -> std::net::IpAddr {
        match self {
            Family::V4 => PUBLIC4,
            Family::V6 => PUBLIC6,
        }
    }

    fn prefix(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    /// What ai1 announces to take the victim's address: ARP (a gratuitous request and a
    /// reply to the router) or neighbour advertisements (an unsolicited and a forged
    /// solicited one, override set).
    fn announcements(self, lab: &Lab) -> Vec<Vec<u8>> {
        let me = mac(AI1_MAC);
        match self {
            Family::V4 => {
                let (victim, router, rmac) = (v4(AI2_4), v4(ROUTER_SEG4), router_mac(lab));
                vec![
                    arp(1, [0xff; 6], me, victim, [0; 6], victim),
                    arp(2, rmac, me, victim, rmac, router),
                ]
            }
            Family::V6 => vec![
                neighbour_advert(me, v6(AI1_6), v6(AI2_6), false),
                neighbour_advert(me, v6(AI1_6), v6(AI2_6), true),
            ],
        }
    }
}

/// ai1 steals ai2's address: takes it, announces it to the router again and again, and
/// sends from it, while ai2 pings the internet. What ai1 captured of the traffic meant
/// for ai2, and how many of ai2's 20 pings were answered.
fn steal(lab: &Lab, family: Family) -> (usize, usize) {
    let victim = family.victim();
    let internet = family.internet().to_string();
    // The address on ai1 too, so that its stack takes what it receives for it.
    lab.ip(
        Node::Ai1,
        &[
            "addr",
            "add",
            &format!("{victim}/{}", family.prefix()),
            "dev",
            "eth0",
            "nodad",
        ],
    )
    .expect("ai2's address on ai1");
    let filter = match family {
        Family::V4 => format!("ip dst host {victim} and not arp"),
        Family::V6 => format!("ip6 dst host {victim} and not (icmp6 and ip6[40] >= 133)"),
    };
    let capture = {
        let ns = lab.ns(Node::Ai1);
        std::thread::spawn(move || {
            lab::run_command(
                Command::new("ip").args([
                    "netns", "exec", &ns, "timeout", "8", "tcpdump", "-i", "eth0", "-n", "-l",
                    "-p", &filter,
                ]),
                None,
                Duration::from_secs(15),
            )
        })
    };
    std::thread::sleep(Duration::from_millis(800));
    let victim_ping = {
        let ns = lab.ns(Node::Ai2);
        let internet = internet.clone();
        std::thread::spawn(move || {
            lab::run_command(
                Command::new("ip").args([
                    "netns", "exec", &ns, "ping", "-n", "-c", "20", "-i", "0.2", "-W", "1",
                    &internet,
                ]),
                None,
                Duration::from_secs(15),
            )
        })
    };
    let ai1 = lab.netns(Node::Ai1);
    for _ in 0..10 {
        cage_tests::frames::send(&ai1, "eth0", family.announcements(lab));
        // And packets from the stolen address, to the internet.
        let _ = in_ns(
            lab,
            Node::Ai1,
            &[
                "ping",
                "-n",
                "-c",
                "1",
                "-W",
                "0.2",
                "-I",
                &victim.to_string(),
                &internet,
            ],
            Duration::from_secs(5),
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let pinged = victim_ping.join().unwrap().expect("ai2's ping");
    let answered = String::from_utf8_lossy(&pinged.stdout)
        .lines()
        .filter(|l| l.contains("bytes from"))
        .count();
    let captured = capture.join().unwrap().expect("tcpdump");
    let seen = String::from_utf8_lossy(&captured.stdout)
        .lines()
        .filter(|l| l.contains(" > ") && l.contains(&victim.to_string()))
        .count();
    (seen, answered)
}

/// ai2 and ai1 each talk first, as hosts do when they come up: their addresses become
/// theirs.
fn hosts_talk_first(lab: &Lab) {
    for node in [Node::Ai2, Node::Ai1] {
        for internet in [PUBLIC4, PUBLIC6] {
            let out = in_ns(
                lab,
                node,
                &[
                    "ping",
                    "-n",
                    "-c",
                    "2",
                    "-i",
                    "0.2",
                    "-W",
                    "2",
                    &internet.to_string(),
                ],
                Duration::from_secs(10),
            );
            assert!(
                out.status.success(),
                "{node:?} cannot reach {internet}: {out:?}"
            );
        }
    }
}

/// The lab with Cage's policy applied (no daemon) and its bridge table removed: each
/// attack must work there, or its failure with Cage would prove nothing.
fn lab_without_bridge_table() -> Lab {
    let lab = Lab::for_contract("");
    cage_tests::assert_success(&lab.cage(&["apply"]), "cage apply");
    lab.wait_segment_ready().expect("segment");
    lab.nft(Node::Router, "delete table bridge cage");
    lab
}

/// The theft of ai2's address works without Cage's bridge table: ai1 captures what is
/// meant for ai2, and the router's entry names ai1.
fn theft_works_without_the_bridge_table(family: Family) {
    let lab = lab_without_bridge_table();
    hosts_talk_first(&lab);
    let (seen, _) = steal(&lab, family);
    let entry = router_neighbour(&lab, &family.victim().to_string());
    println!(
        "without Cage's bridge table ({family:?}): ai1 captured {seen} packets meant for \
         ai2; the router's entry: {entry}"
    );
    assert!(
        seen > 0 && entry.contains(AI1_MAC),
        "the attack did not work without Cage's bridge table (captured {seen}, entry {entry}): \
         this test would prove nothing"
    );
}

fn denied(lab: &Lab, rule: &str) -> u64 {
    let out = lab.cage(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    v["denied"][rule]["packets"].as_u64().unwrap_or(0)
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn ipv4_address_theft_fails_and_the_victim_keeps_working() {
    theft_works_without_the_bridge_table(Family::V4);

    // Then with Cage, as applied.
    let lab = Lab::for_contract("");
    cage_tests::assert_success(&lab.cage(&["apply"]), "cage apply");
    lab.wait_segment_ready().expect("segment");
    hosts_talk_first(&lab);
    let bound = lab.nft_ruleset(Node::Router);
    assert!(
        bound.contains(&format!("{AI2_4} . {AI2_MAC}")),
        "ai2's address is not bound to its MAC:\n{bound}"
    );
    let (seen, answered) = steal(&lab, Family::V4);
    let entry = router_neighbour(&lab, &AI2_4.to_string());
    let theft = denied(&lab, "deny:addr-theft");
    println!(
        "with Cage: ai1 captured {seen} packets meant for ai2; ai2's pings answered {answered}/20; \
         the router's entry: {entry}; deny:addr-theft {theft} packets"
    );
    assert_eq!(seen, 0, "ai1 received traffic meant for ai2");
    assert!(
        entry.contains(AI2_MAC) && !entry.contains(AI1_MAC),
        "the router's neighbour entry for ai2 moved: {entry}"
    );
    assert!(
        answered >= 19,
        "ai2's traffic suffered: {answered}/20 answered"
    );
    assert!(theft >= 20, "the theft was not counted: {theft}");
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn ipv6_address_theft_fails_and_the_victim_keeps_working() {
    theft_works_without_the_bridge_table(Family::V6);

    // With Cage, its daemon running: the advertisement's target cannot be matched in
    // the bridge family, so the router's entry may move for a moment; the bridge never
    // delivers ai2's packets to ai1, and `cage run` puts the entry back.
    let lab = Lab::for_contract("");
    let run = lab.cage_run_ready();
    hosts_talk_first(&lab);
    let (seen, answered) = steal(&lab, Family::V6);
    let entry = router_neighbour(&lab, &AI2_6.to_string());
    let misdelivered = denied(&lab, "deny:misdelivery");
    println!(
        "with Cage: ai1 captured {seen} packets meant for ai2; ai2's pings answered \
         {answered}/20; the router's entry: {entry}; deny:misdelivery {misdelivered} packets"
    );
    assert_eq!(
        seen,
        0,
        "ai1 received traffic meant for ai2\ncage run:\n{}",
        run.log()
    );
    assert!(
        entry.contains(AI2_MAC) && !entry.contains(AI1_MAC),
        "the router's neighbour entry for ai2 stayed moved: {entry}\ncage run:\n{}",
        run.log()
    );
    assert!(
        answered >= 18,
        "ai2's traffic suffered: {answered}/20 answered\ncage run:\n{}",
        run.log()
    );
}

/// ai1 opens `n` TCP connections to `server` at once (non-blocking) and keeps them: the
/// ones that were accepted within `wait`, still held.
fn hold_connections(
    lab: &Lab,
    node: Node,
    server: std::net::SocketAddr,
    n: usize,
    wait: Duration,
) -> (Vec<socket2::Socket>, usize) {
    lab.netns(node)
        .run("holding TCP connections", move || {
            use socket2::{Domain, Protocol, SockAddr, Socket, Type};
            // Room for them all: the soft limit of open files is 1024.
            // SAFETY: setrlimit with a valid struct; raising the soft limit up to the hard.
            unsafe {
                let mut lim: libc::rlimit = std::mem::zeroed();
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
                lim.rlim_cur = lim.rlim_max.min(65536);
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            }
            let mut socks = Vec::new();
            for _ in 0..n {
                let s = Socket::new(
                    Domain::for_address(server),
                    Type::STREAM,
                    Some(Protocol::TCP),
                )
                .expect("a socket");
                s.set_nonblocking(true).expect("non-blocking");
                let _ = s.connect(&SockAddr::from(server));
                socks.push(s);
            }
            std::thread::sleep(wait);
            let held = socks.iter().filter(|s| s.peer_addr().is_ok()).count();
            Ok((socks, held))
        })
        .expect("in the namespace")
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn a_dns_over_tcp_hold_flood_leaves_the_others_their_dns() {
    // Without the shares (set out of reach) the flood must starve ai2's DNS over TCP in
    // this lab; with the defaults it must not.
    let unlimited = "\nconfig limits 'limits'\n\toption dns_tcp_per_host '1024'\n\
                     \toption new_flows_burst '100000'\n\toption new_flows_per_second '100000'\n";
    let (held, tcp, _) = dns_tcp_flood(unlimited);
    println!(
        "without the shares: ai1 holds {held} DNS-over-TCP connections; ai2 over TCP: {tcp:?}"
    );
    assert!(
        tcp.is_err(),
        "ai2's DNS over TCP worked while ai1 held {held} connections without a share: this \
         test would prove nothing"
    );

    let (held, tcp, udp) = dns_tcp_flood("");
    println!("with the default shares: ai1 holds {held}; ai2 over TCP: {tcp:?}; over UDP: {udp:?}");
    assert!(
        held <= 16,
        "ai1 holds {held} connections, over its share of 16"
    );
    for (how, got) in [("TCP", tcp), ("UDP", udp)] {
        let got = got.unwrap_or_else(|e| panic!("ai2's DNS over {how} failed: {e}"));
        assert_eq!(got.addrs, vec![PUBLIC4], "ai2's DNS over {how}: {got:?}");
    }
}

type Resolution = Result<cage_tests::dns::Resolved, String>;

/// A lab with DNS through Cage and `extra` sections; ai1 tries 3000 DNS-over-TCP
/// connections to the router and holds what it gets while ai2 resolves a name over TCP
/// and over UDP: how many ai1 holds, and ai2's answers.
fn dns_tcp_flood(extra: &str) -> (usize, Resolution, Resolution) {
    use cage_tests::dns::{resolve, Answer, AuthServer};
    let lab = Lab::for_test();
    let zone = [("api.example.test".to_owned(), Answer::Addrs(vec![PUBLIC4]))]
        .into_iter()
        .collect();
    let _auth = AuthServer::start(
        &lab.netns(Node::Inet),
        &[std::net::SocketAddr::new(PUBLIC4, 53)],
        zone,
        300,
    )
    .expect("the authoritative server");
    lab.write_config(&format!(
        "\nconfig dns 'dns'\n\tlist upstream '{PUBLIC4}:53'\n{extra}"
    ));
    let run = lab.cage_run_ready();
    let dns = std::net::SocketAddr::new(ROUTER_SEG4, 53);
    let (held_socks, held) = hold_connections(&lab, Node::Ai1, dns, 3000, Duration::from_secs(3));
    let victim = lab.netns(Node::Ai2);
    let tcp = resolve(
        &victim,
        dns,
        "api.example.test",
        false,
        true,
        Duration::from_secs(3),
    );
    let udp = resolve(
        &victim,
        dns,
        "api.example.test",
        false,
        false,
        Duration::from_secs(3),
    );
    println!(
        "  deny:dns-tcp-share {} packets, deny:flow-rate {} packets",
        denied(&lab, "deny:dns-tcp-share"),
        denied(&lab, "deny:flow-rate")
    );
    drop(held_socks);
    drop(run);
    (held, tcp, udp)
}

/// From `node`, UDP datagrams to the internet host, each to a port of its own (a flow
/// each): `count` of them spread over `over`, from `first_port` on.
fn udp_flows(lab: &Lab, node: Node, first_port: u16, count: u32, over: Duration) {
    lab.netns(node)
        .run("a flow flood", move || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
            let start = std::time::Instant::now();
            for i in 0..count {
                // Evenly over the time given: the i-th no earlier than its share of it.
                let due = over.mul_f64(f64::from(i) / f64::from(count));
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
                let port = first_port.wrapping_add((i % 60000) as u16);
                let _ = s.send_to(b"flood", (PUBLIC4, port));
            }
            Ok(())
        })
        .expect("in the namespace");
}

/// ai2's allowed flows in the flow log, to the internet host on ports from `first`.
fn logged_flows(lab: &Lab, host: std::net::IpAddr, first: u16, n: u16) -> usize {
    let out = lab.cage(&["flows", "--json", "-n", "0", "--host", &host.to_string()]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| {
            r["verdict"] == "allowed"
                && r["peer_port"]
                    .as_u64()
                    .is_some_and(|p| p >= u64::from(first) && p < u64::from(first + n))
        })
        .count()
}

/// The flood: ai1 opens 30 000 UDP flows a second for 4 s while ai2 opens 5; then the
/// flow log must have ai2's 5. With `extra` sections. (ai2's flows recorded, ai1's
/// losses counted, conntrack entries on the router, what `cage run` holds in memory.)
fn flow_flood(extra: &str) -> (usize, u64, u64, u64) {
    let lab = Lab::for_contract(&format!(
        "\nconfig flowlog 'flowlog'\n\toption idle_timeout '2'\n{extra}"
    ));
    let run = lab.cage_run_ready();
    let flood = {
        let lab_ns = lab.ns(Node::Ai1);
        std::thread::spawn(move || {
            let ns = NetNs::named(lab_ns);
            ns.run("a flow flood", move || {
                let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
                let start = std::time::Instant::now();
                let (count, over) = (120_000u32, Duration::from_secs(4));
                for i in 0..count {
                    let due = over.mul_f64(f64::from(i) / f64::from(count));
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                    let _ = s.send_to(b"flood", (PUBLIC4, 1024 + (i % 60000) as u16));
                }
                Ok(())
            })
            .expect("in the namespace");
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    udp_flows(&lab, Node::Ai2, 61000, 5, Duration::from_millis(500));
    // The page answers from the LAN meanwhile.
    let page = cage_tests::http::get_login(
        &lab.netns(Node::Lan),
        std::net::SocketAddr::new(lab::ROUTER_LAN4, lab::WEB_PORT),
    );
    flood.join().unwrap();
    let conntrack: u64 = lab
        .netns(Node::Router)
        .sysctl("net.netfilter.nf_conntrack_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let rss_kb = std::fs::read_to_string(format!("/proc/{}/status", run.pid()))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    // Written once idle (2 s) and swept (every 5 s).
    let mut got = 0;
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < until {
        got = logged_flows(&lab, AI2_4, 61000, 5);
        if got == 5 {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let status: serde_json::Value =
        serde_json::from_slice(&lab.cage(&["status", "--json"]).stdout).expect("status");
    let over = status["flow_log"]["ebpf_over_share"].as_u64().unwrap_or(0);
    println!(
        "  page from the LAN during the flood: {page:?}; ai2's flows logged {got}/5; ai1's \
         flows over its share {over}; conntrack entries {conntrack}; deny:flow-rate {}; \
         cage run {rss_kb} kB resident",
        denied(&lab, "deny:flow-rate")
    );
    // 303: to the first-run set-up, no password being set; an answer all the same.
    assert!(
        matches!(page, Ok(200 | 303)),
        "the page did not answer from the LAN during the flood: {page:?}"
    );
    (got, over, conntrack, rss_kb)
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn a_flow_flood_leaves_the_others_in_the_flow_log() {
    // Without a share (the whole map for anyone) the flood must push ai2's flows out of
    // the map before they are written, in this lab.
    let (got, _, _, _) = flow_flood("\nconfig limits 'limits'\n\toption flow_share '100'\n");
    println!("without a share: ai2's flows logged {got}/5");
    assert!(
        got < 5,
        "ai2's flows were all logged without a share: this test would prove nothing"
    );

    let (got, over, conntrack, rss_kb) = flow_flood("");
    println!("with the default share: ai2's flows logged {got}/5, ai1's over its share {over}");
    assert_eq!(
        got, 5,
        "ai2's flows went missing from the flow log during ai1's flood"
    );
    assert!(over > 0, "ai1's flows over its share were not counted");
    assert!(
        conntrack < 20_000,
        "{conntrack} conntrack entries: ai1's flood took the router's table"
    );
    assert!(rss_kb < 96 * 1024, "cage run holds {rss_kb} kB");
}

/// The MACs the bridge has learned on ai1's port (dynamic entries of `bridge fdb`).
fn learned_on_ai1_port(lab: &Lab) -> usize {
    let out = in_ns(
        lab,
        Node::Router,
        &["bridge", "fdb", "show", "br", "br-cage", "brport", "cage1"],
        Duration::from_secs(10),
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains("permanent") && !l.contains(" self"))
        .count()
}

/// ai1 sends 1000 frames, each from a MAC of its own (a broadcast ARP request for the
/// router), while ai2 pings the internet: what the bridge learned on ai1's port, and
/// ai2's pings answered (of 10).
fn mac_flood(lab: &Lab) -> (usize, usize) {
    let ai2 = {
        let ns = lab.ns(Node::Ai2);
        std::thread::spawn(move || {
            lab::run_command(
                Command::new("ip").args([
                    "netns",
                    "exec",
                    &ns,
                    "ping",
                    "-n",
                    "-c",
                    "10",
                    "-i",
                    "0.2",
                    "-W",
                    "1",
                    "203.0.113.10",
                ]),
                None,
                Duration::from_secs(15),
            )
        })
    };
    let router = v4(ROUTER_SEG4);
    let frames: Vec<Vec<u8>> = (0..1000u32)
        .map(|i| {
            let b = i.to_be_bytes();
            let made_up = [0x02, 0xee, b[0], b[1], b[2], b[3]];
            arp(1, [0xff; 6], made_up, Ipv4Addr::UNSPECIFIED, [0; 6], router)
        })
        .collect();
    cage_tests::frames::send(&lab.netns(Node::Ai1), "eth0", frames);
    let learned = learned_on_ai1_port(lab);
    let pinged = ai2.join().unwrap().expect("ai2's ping");
    let answered = String::from_utf8_lossy(&pinged.stdout)
        .lines()
        .filter(|l| l.contains("bytes from"))
        .count();
    (learned, answered)
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn a_mac_flood_stays_within_its_ports_limit() {
    // Without Cage's bridge table the bridge learns every made-up MAC in this lab.
    let lab = lab_without_bridge_table();
    let (learned, _) = mac_flood(&lab);
    println!("without Cage's bridge table: the bridge learned {learned} MACs on ai1's port");
    assert!(
        learned >= 1000,
        "the bridge learned only {learned} of 1000 MACs without Cage: this test would prove \
         nothing"
    );
    drop(lab);

    let lab = Lab::for_contract("");
    cage_tests::assert_success(&lab.cage(&["apply"]), "cage apply");
    lab.wait_segment_ready().expect("segment");
    hosts_talk_first(&lab);
    let (learned, answered) = mac_flood(&lab);
    let flood = denied(&lab, "deny:mac-flood");
    println!(
        "with Cage: the bridge learned {learned} MACs on ai1's port (limit: its own and 4 \
         more); deny:mac-flood {flood} frames; ai2's pings answered {answered}/10"
    );
    assert!(
        learned <= 5,
        "the bridge learned {learned} MACs on ai1's port"
    );
    assert!(flood >= 990, "the flood was not counted: {flood}");
    assert!(answered >= 9, "ai2's traffic suffered: {answered}/10");
}
