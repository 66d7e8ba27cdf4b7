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

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use cage_agent::probe::NetNs;
use cage_tests::lab::{self, Lab, Node, AI1_MAC, AI2_4, AI2_MAC, ROUTER_SEG4};

const INTERNET4: &str = "203.0.113.10";

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

/// Send `frames` out of `ifname` in `ns` as they are (AF_PACKET, SOCK_RAW).
fn send_frames(ns: &NetNs, ifname: &str, frames: Vec<Vec<u8>>) {
    let ifname = ifname.to_owned();
    ns.run("sending raw frames", move || {
        // SAFETY: plain socket calls on a socket this closure owns and closes.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let name = std::ffi::CString::new(ifname.clone()).unwrap();
            let index = libc::if_nametoindex(name.as_ptr());
            assert!(index > 0, "no interface {ifname}");
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = index as i32;
            addr.sll_halen = 6;
            for f in &frames {
                addr.sll_addr[..6].copy_from_slice(&f[..6]);
                let n = libc::sendto(
                    fd,
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(
                    n,
                    f.len() as isize,
                    "sendto: {}",
                    std::io::Error::last_os_error()
                );
            }
            libc::close(fd);
        }
        Ok(())
    })
    .expect("in the namespace");
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

/// ai1 steals ai2's IPv4 address: takes it, announces it to the router (a gratuitous
/// request and a reply to the router, again and again), sends from it, while ai2 pings
/// the internet. What ai1 captured of the traffic meant for ai2, and how many of ai2's
/// pings were answered (of 20).
fn steal_ipv4(lab: &Lab) -> (usize, usize) {
    let victim = v4(AI2_4);
    let router = v4(ROUTER_SEG4);
    let rmac = router_mac(lab);
    let me = mac(AI1_MAC);
    // The address on ai1 too, so that its stack takes what it receives for it.
    lab.ip(
        Node::Ai1,
        &["addr", "add", &format!("{victim}/32"), "dev", "eth0"],
    )
    .expect("ai2's address on ai1");
    let capture = {
        let ns = lab.ns(Node::Ai1);
        std::thread::spawn(move || {
            lab::run_command(
                Command::new("ip").args([
                    "netns",
                    "exec",
                    &ns,
                    "timeout",
                    "8",
                    "tcpdump",
                    "-i",
                    "eth0",
                    "-n",
                    "-l",
                    "-p",
                    &format!("ip dst host {victim} and not arp"),
                ]),
                None,
                Duration::from_secs(15),
            )
        })
    };
    std::thread::sleep(Duration::from_millis(800));
    let victim_ping = {
        let ns = lab.ns(Node::Ai2);
        std::thread::spawn(move || {
            lab::run_command(
                Command::new("ip").args([
                    "netns", "exec", &ns, "ping", "-n", "-c", "20", "-i", "0.2", "-W", "1",
                    INTERNET4,
                ]),
                None,
                Duration::from_secs(15),
            )
        })
    };
    let ai1 = lab.netns(Node::Ai1);
    for _ in 0..10 {
        send_frames(
            &ai1,
            "eth0",
            vec![
                arp(1, [0xff; 6], me, victim, [0; 6], victim),
                arp(2, rmac, me, victim, rmac, router),
            ],
        );
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
                INTERNET4,
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
        let out = in_ns(
            lab,
            node,
            &["ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", INTERNET4],
            Duration::from_secs(10),
        );
        assert!(
            out.status.success(),
            "{node:?} cannot reach the internet: {out:?}"
        );
    }
}

fn denied(lab: &Lab, rule: &str) -> u64 {
    let out = lab.cage(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    v["denied"][rule]["packets"].as_u64().unwrap_or(0)
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn ipv4_address_theft_fails_and_the_victim_keeps_working() {
    // First without Cage's bridge table: the attack must work in this lab, or its
    // failure below would prove nothing.
    let lab = Lab::for_contract("");
    cage_tests::assert_success(&lab.cage(&["apply"]), "cage apply");
    lab.wait_segment_ready().expect("segment");
    lab.nft(Node::Router, "delete table bridge cage");
    hosts_talk_first(&lab);
    let (seen, _) = steal_ipv4(&lab);
    let entry = router_neighbour(&lab, &AI2_4.to_string());
    println!("without Cage's bridge table: ai1 captured {seen} packets meant for ai2; the router's entry: {entry}");
    assert!(
        seen > 0 && entry.contains(AI1_MAC),
        "the attack did not work without Cage's bridge table (captured {seen}, entry {entry}): \
         this test would prove nothing"
    );
    drop(lab);

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
    let (seen, answered) = steal_ipv4(&lab);
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
