//! The kill switch under traffic: a caged host keeps a TCP transfer, a UDP stream and
//! pings going to the internet host; `cage isolate` is pressed; witnesses in the
//! internet host, the LAN host and the other caged host count every packet from the
//! segment that arrives after the command returned. The figure is that count (it must be
//! 0) and the time the command took; `cage release` then lets traffic through again.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cage_agent::probe::{probe_in, NetNs, Probe, Record, Witness, WitnessLimits};

use crate::lab::{Node, AI2_4, LAN_HOST4, PUBLIC4, PUBLIC6, ROUTER_WAN4, ROUTER_WAN6};

use super::caged::Caged;
use super::row;

/// Packets from the caged segment (or masqueraded to the router's WAN address).
fn from_segment(records: &[Record]) -> usize {
    records
        .iter()
        .filter(|r| {
            r.src == ROUTER_WAN4
                || r.src == ROUTER_WAN6
                || match r.src {
                    IpAddr::V4(a) => a.octets()[..3] == [192, 168, 10],
                    IpAddr::V6(a) => a.segments()[..3] == [0xfd00, 0xcafe, 0x10],
                }
        })
        .count()
}

/// A TCP listener in `ns` that accepts and reads until told to stop.
fn sink(ns: &NetNs, port: u16, stop: Arc<AtomicBool>) -> Result<(), String> {
    let (tx, rx) = std::sync::mpsc::channel();
    ns.spawn("tcp sink", move || {
        let l = std::net::TcpListener::bind(("0.0.0.0", port)).expect("bind sink");
        l.set_nonblocking(true).expect("nonblocking");
        let _ = tx.send(());
        let mut conns: Vec<TcpStream> = Vec::new();
        let start = Instant::now();
        while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(120) {
            if let Ok((c, _)) = l.accept() {
                let _ = c.set_nonblocking(true);
                conns.push(c);
            }
            let mut buf = [0u8; 65536];
            for c in conns.iter_mut() {
                use std::io::Read;
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    rx.recv_timeout(Duration::from_secs(10))
        .map_err(|_| "the TCP sink did not start".to_owned())
}

/// Press the kill switch during traffic and count what gets through afterwards; rows for
/// the leaks and for the release.
pub fn leaks(c: &Caged, section: &str) {
    let lab = &c.lab;
    let limits = WitnessLimits {
        max_duration: Duration::from_secs(180),
        max_records: 500_000,
    };
    let start = |node: Node| Witness::start(&lab.netns(node), limits);
    let (w_inet, w_lan, w_ai2) = match (start(Node::Inet), start(Node::Lan), start(Node::Ai2)) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        _ => {
            row(
                section,
                "kill switch",
                false,
                "-",
                "cannot start the witnesses",
            );
            return;
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    if let Err(e) = sink(&lab.netns(Node::Inet), 5201, stop.clone()) {
        row(section, "kill switch", false, "-", e);
        return;
    }
    let ai1 = lab.netns(Node::Ai1);
    let transfer = {
        let stop = stop.clone();
        ai1.spawn("transfer", move || {
            let mut s =
                TcpStream::connect_timeout(&SocketAddr::new(PUBLIC4, 5201), Duration::from_secs(5))
                    .expect("connect");
            s.set_write_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            let chunk = [0x5a_u8; 1024];
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(120) {
                let _ = s.write_all(&chunk);
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(())
        })
    };
    let flood = {
        let stop = stop.clone();
        let ai1 = ai1.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed)
                && start.elapsed() < Duration::from_secs(120)
                && n < 20_000
            {
                for p in [
                    Probe::udp(PUBLIC4, 7000).timeout(Duration::from_millis(20)),
                    Probe::icmp(PUBLIC6).timeout(Duration::from_millis(20)),
                    Probe::udp(LAN_HOST4, 53).timeout(Duration::from_millis(20)),
                    Probe::udp(AI2_4, 53).timeout(Duration::from_millis(20)),
                ] {
                    let _ = probe_in(&ai1, &p);
                    n += 1;
                }
            }
        })
    };

    // Traffic flows before the press.
    let flowing = Instant::now();
    let before = loop {
        let _ = w_inet.wait_drained(Instant::now(), Duration::from_secs(2));
        let n = from_segment(&w_inet.records());
        if n > 50 || flowing.elapsed() > Duration::from_secs(30) {
            break n;
        }
        std::thread::sleep(Duration::from_millis(200));
    };

    let pressed = Instant::now();
    let out = lab.cage(&["isolate", "--reason", "vm test"]);
    let took = pressed.elapsed();
    let returned = Instant::now();
    for w in [&w_inet, &w_lan, &w_ai2] {
        let _ = w.wait_drained(returned, Duration::from_secs(5));
    }
    let at_return: Vec<usize> = [&w_inet, &w_lan, &w_ai2]
        .iter()
        .map(|w| from_segment(&w.records()))
        .collect();
    // Traffic keeps being sent for this long after the return.
    std::thread::sleep(Duration::from_secs(2));
    for w in [&w_inet, &w_lan, &w_ai2] {
        let _ = w.wait_drained(Instant::now(), Duration::from_secs(5));
    }
    let after: Vec<usize> = [&w_inet, &w_lan, &w_ai2]
        .iter()
        .map(|w| from_segment(&w.records()))
        .collect();
    let leaked: usize = after.iter().zip(&at_return).map(|(a, b)| a - b).sum();
    stop.store(true, Ordering::Relaxed);
    let _ = flood.join();
    if let Ok(t) = transfer {
        let _ = t.join();
    }
    let pressed_ok = out.status.success();
    row(
        section,
        "kill switch: packets through after it returned",
        pressed_ok && before > 50 && leaked == 0,
        format!("{leaked} packets"),
        format!(
            "`cage isolate` took {} ms; {before} packets reached the internet host before, none of the 3 witnesses saw one from the segment in the 2 s after{}",
            took.as_millis(),
            if pressed_ok {
                String::new()
            } else {
                format!("; cage isolate failed: {}", String::from_utf8_lossy(&out.stderr))
            }
        ),
    );

    // Released, the caged host reaches the internet again.
    let out = lab.cage(&["release"]);
    let answered = (0..20).any(|_| {
        probe_in(
            &ai1,
            &Probe::icmp(PUBLIC4).timeout(Duration::from_millis(500)),
        )
        .map(|a| a.outcome.answered())
        .unwrap_or(false)
    });
    row(
        section,
        "kill switch released",
        out.status.success() && answered,
        if answered {
            "reachable again"
        } else {
            "still cut off"
        },
        "`cage release`, then a ping from the caged host to the internet host",
    );
    for w in [w_inet, w_lan, w_ai2] {
        let _ = w.stop();
    }
}
