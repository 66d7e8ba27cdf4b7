//! Blocked flows in the flow log: what Cage's policy denies reaches `cage flows` as
//! records that name the caged host, its MAC, the destination, and the rule that denied
//! it; nothing is lost without being counted, and a SIGTERM'd daemon writes what it had.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use cage_agent::probe::{probe_in, NetNs, Probe};
use cage_tests::lab::{self, Lab, Node, AI1_4, AI1_MAC, HOTEL4, LAN_HOST4, ROUTER_SEG4};
use cage_tests::wait;

fn flows(lab: &Lab) -> Vec<serde_json::Value> {
    let out = lab.cage(&["flows", "--json", "-n", "0", "--verdict", "blocked"]);
    assert!(out.status.success(), "cage flows: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record"))
        .collect()
}

fn find<'a>(
    records: &'a [serde_json::Value],
    peer: IpAddr,
    port: u16,
    proto: &str,
) -> Option<&'a serde_json::Value> {
    records
        .iter()
        .find(|r| r["peer"] == peer.to_string() && r["peer_port"] == port && r["proto"] == proto)
}

/// Send `probe` from `ns`, waiting 300 ms for an answer that must not come: the policy
/// denies it.
fn assert_denied(ns: &NetNs, probe: Probe) {
    let probe = probe.timeout(Duration::from_millis(300));
    let a = probe_in(ns, &probe).expect("probe");
    assert!(
        !a.outcome.answered(),
        "{:?} {}:{} answered",
        probe.proto,
        probe.dst,
        probe.port
    );
}

/// `count` datagrams of `size` bytes from `from` in `ns` to the UDP echo server at
/// `to`:7000, each echoed in full: the local port they were sent from.
fn udp_echoes(ns: &NetNs, from: IpAddr, to: IpAddr, count: u8, size: usize) -> u16 {
    ns.run("udp", move || {
        let s = std::net::UdpSocket::bind((from, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        for i in 0..count {
            s.send_to(&vec![i; size], (to, 7000)).unwrap();
            let mut b = vec![0u8; 2 * size];
            let (n, _) = s.recv_from(&mut b).unwrap();
            assert_eq!(n, size);
        }
        Ok(s.local_addr().unwrap().port())
    })
    .expect("udp")
}

/// The lab with the contract's configuration and these options of the flow log.
fn lab_with_flowlog(options: &str) -> Lab {
    Lab::for_contract(&format!("\nconfig flowlog 'flowlog'\n{options}"))
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn denied_attempts_appear_as_blocked_records_with_their_rule() {
    let lab = Lab::for_contract("");
    let run = lab.cage_run_ai1_ready();

    let ai1 = lab.netns(Node::Ai1);
    let attempts = [
        (LAN_HOST4, 22, "deny:lan"),
        (ROUTER_SEG4, 22, "deny:router"),
        (ROUTER_SEG4, 80, "deny:router"),
        (HOTEL4, 80, "deny:upstream"),
    ];
    for (dst, port, _) in attempts {
        for _ in 0..3 {
            assert_denied(&ai1, Probe::tcp(dst, port).from(AI1_4));
        }
    }
    // And one from the LAN into the segment.
    assert_denied(&lab.netns(Node::Lan), Probe::tcp(AI1_4, 22).from(LAN_HOST4));

    // Written within one flush interval (5 s).
    let deadline = Instant::now() + Duration::from_secs(12);
    let records = loop {
        let r = flows(&lab);
        let all_there = attempts
            .iter()
            .all(|&(dst, port, _)| find(&r, dst, port, "tcp").is_some());
        if all_there || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    for (dst, port, rule) in attempts {
        let r = find(&records, dst, port, "tcp")
            .unwrap_or_else(|| panic!("no blocked record for {dst}:{port} in {records:#?}"));
        assert_eq!(r["rule"], rule, "{r}");
        assert_eq!(r["host"], AI1_4.to_string(), "{r}");
        assert_eq!(r["mac"], AI1_MAC, "{r}");
        assert_eq!(r["direction"], "out", "{r}");
        // Three attempts, each a SYN of 60 bytes (IPv4 + TCP with options) or so.
        assert!(
            r["packets_out"].as_u64().unwrap_or(0) >= 3,
            "three attempts, {r}"
        );
        assert!(r["bytes_out"].as_u64().unwrap_or(0) >= 3 * 40, "{r}");
    }
    let inbound = records
        .iter()
        .find(|r| r["rule"] == "deny:into-segment" && r["host"] == AI1_4.to_string())
        .unwrap_or_else(|| panic!("no inbound record in {records:#?}"));
    assert_eq!(inbound["direction"], "in");
    assert_eq!(inbound["host_port"], 22);
    assert_eq!(inbound["peer"], LAN_HOST4.to_string());

    // Nothing was lost, and the status says so.
    let status = lab.cage(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["flow_log"]["nflog_dropped"], 0, "{v:#}");
    assert_eq!(v["flow_log"]["nflog_overruns"], 0, "{v:#}");
    assert!(v["flow_log"]["written"].as_u64().unwrap_or(0) >= 5, "{v:#}");
    println!(
        "{} blocked records; status: {}",
        records.len(),
        v["flow_log"]
    );

    // `cage flows --follow` prints new records as they are written.
    let mut follower = lab
        .cage_command(&["flows", "--follow", "--json", "--port", "5555"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("cage flows --follow");
    let out = follower.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Attempts until the follower reports one (it may start after the first is written,
    // when the machine is busy): at most 12, a second apart.
    let mut followed = Err(std::sync::mpsc::RecvTimeoutError::Timeout);
    for _ in 0..12 {
        assert_denied(&ai1, Probe::udp(LAN_HOST4, 5555).from(AI1_4));
        followed = rx.recv_timeout(Duration::from_secs(1));
        if followed.is_ok() {
            break;
        }
    }
    if followed.is_err() {
        followed = rx.recv_timeout(Duration::from_secs(6));
    }
    let _ = follower.kill();
    let _ = follower.wait();
    let line = followed.expect("cage flows --follow printed nothing for a new blocked attempt");
    let r: serde_json::Value = serde_json::from_str(&line).expect("a JSON record");
    assert_eq!(r["peer_port"], 5555, "{r}");
    assert_eq!(r["rule"], "deny:lan", "{r}");

    // A SIGTERM'd daemon writes what it holds before it goes.
    assert_denied(&ai1, Probe::udp(LAN_HOST4, 4444).from(AI1_4));
    std::thread::sleep(Duration::from_millis(500));
    let log = run.log();
    let status = run.stop();
    let records = flows(&lab);
    assert!(
        find(&records, LAN_HOST4, 4444, "udp").is_some(),
        "the last blocked attempt was lost at shutdown ({status:?}):\n{log}\n{records:#?}"
    );
}

/// Frames on one interface of a namespace, captured with a packet socket: for each
/// packet of the flow between `a` and `b` (either way), (from a?, IP length).
struct Capture {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: cage_agent::probe::NsThread<Vec<(bool, u32, u8)>>,
}

impl Capture {
    fn start(ns: &cage_agent::probe::NetNs, ifname: &'static str, a: IpAddr, b: IpAddr) -> Capture {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = ns
            .spawn("capture", move || {
                // SAFETY: plain socket calls on descriptors this thread owns.
                let fd = unsafe {
                    libc::socket(
                        libc::AF_PACKET,
                        libc::SOCK_DGRAM,
                        (libc::ETH_P_ALL as u16).to_be() as i32,
                    )
                };
                assert!(fd >= 0, "packet socket");
                let name = std::ffi::CString::new(ifname).unwrap();
                let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
                let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
                sll.sll_ifindex = index as i32;
                let rc = unsafe {
                    libc::bind(
                        fd,
                        &sll as *const _ as *const libc::sockaddr,
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    )
                };
                assert_eq!(rc, 0, "bind packet socket");
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 50_000,
                };
                unsafe {
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_RCVTIMEO,
                        &tv as *const _ as *const libc::c_void,
                        std::mem::size_of::<libc::timeval>() as u32,
                    )
                };
                ready_tx.send(()).unwrap();
                let mut seen = Vec::new();
                let mut buf = [0u8; 65536];
                let start = Instant::now();
                while !flag.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(60) {
                    let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut _, buf.len(), 0) };
                    if n <= 0 {
                        continue;
                    }
                    let p = &buf[..n as usize];
                    let (src, dst, len, proto): (IpAddr, IpAddr, u32, u8) = match p[0] >> 4 {
                        4 if p.len() >= 20 => (
                            std::net::Ipv4Addr::new(p[12], p[13], p[14], p[15]).into(),
                            std::net::Ipv4Addr::new(p[16], p[17], p[18], p[19]).into(),
                            u32::from(u16::from_be_bytes([p[2], p[3]])),
                            p[9],
                        ),
                        6 if p.len() >= 40 => (
                            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&p[8..24]).unwrap())
                                .into(),
                            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&p[24..40]).unwrap())
                                .into(),
                            40 + u32::from(u16::from_be_bytes([p[4], p[5]])),
                            p[6],
                        ),
                        _ => continue,
                    };
                    if (src, dst) == (a, b) || (src, dst) == (b, a) {
                        seen.push((src == a, len, proto));
                    }
                }
                unsafe { libc::close(fd) };
                Ok(seen)
            })
            .expect("capture thread");
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("capture ready");
        Capture { stop, thread }
    }

    fn finish(self) -> Vec<(bool, u32, u8)> {
        std::thread::sleep(Duration::from_millis(200));
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("capture")
    }
}

fn totals(frames: &[(bool, u32, u8)], proto: u8) -> (u64, u64, u64, u64) {
    let mut t = (0, 0, 0, 0);
    for &(out, len, p) in frames.iter().filter(|f| f.2 == proto) {
        let _ = p;
        if out {
            t.0 += 1;
            t.1 += u64::from(len);
        } else {
            t.2 += 1;
            t.3 += u64::from(len);
        }
    }
    t
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn allowed_flows_are_counted_exactly() {
    use cage_agent::probe::{Servers, Service};
    use cage_tests::lab::{AI1_6, PUBLIC4, PUBLIC6};
    use std::io::{Read, Write};

    let lab = lab_with_flowlog("\toption idle_timeout '2'\n");
    let run = lab.cage_run();
    assert!(
        run.log().contains("attached the flow counter"),
        "{}",
        run.log()
    );
    lab.wait_segment_ready().expect("segment");
    lab.pin_router_neighbours(Node::Ai1).expect("neighbours");
    let _servers = Servers::start(
        &lab.netns(Node::Inet),
        &[Service::udp(7000), Service::tcp(7001)],
        Duration::from_secs(60),
    )
    .expect("servers");

    let ai1 = lab.netns(Node::Ai1);
    // UDP over IPv4: 5 datagrams of 100 bytes, each echoed: 128 L3 bytes each way each.
    let udp_port = udp_echoes(&ai1, AI1_4, PUBLIC4, 5, 100);
    // UDP over IPv6: 3 datagrams of 1000 bytes: 40 + 8 + 1000 each way each.
    let udp6_port = udp_echoes(&ai1, AI1_6, PUBLIC6, 3, 1000);
    // TCP over IPv4: what goes over the wire is measured by a capture on ai1's eth0.
    let cap = Capture::start(&ai1, "eth0", AI1_4, PUBLIC4);
    let tcp_port = ai1
        .run("tcp", || {
            let sock =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            sock.bind(&std::net::SocketAddr::new(AI1_4, 0).into())
                .unwrap();
            sock.connect(&std::net::SocketAddr::new(PUBLIC4, 7001).into())
                .unwrap();
            let mut s: std::net::TcpStream = sock.into();
            // One small write (the echo server answers the first and closes), so that
            // every packet on the wire is one the capture sees as such: a large write
            // leaves as one GSO packet that is split later.
            s.write_all(&[7u8; 500]).unwrap();
            let mut back = Vec::new();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let _ = s.read_to_end(&mut back);
            Ok(s.local_addr().unwrap().port())
        })
        .expect("tcp");
    let tcp_frames = cap.finish();
    let tcp_expected = totals(&tcp_frames, 6);
    assert!(tcp_expected.0 >= 3, "capture saw {tcp_frames:?}");

    // Idle after 2 s, written at the next flush (5 s).
    let deadline = Instant::now() + Duration::from_secs(15);
    let allowed = loop {
        let out = lab.cage(&["flows", "--json", "-n", "0", "--verdict", "allowed"]);
        let recs: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let have = |port: u16| recs.iter().any(|r| r["host_port"] == port);
        if (have(udp_port) && have(udp6_port) && have(tcp_port)) || Instant::now() > deadline {
            break recs;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let one = |port: u16, proto: &str| -> &serde_json::Value {
        let m: Vec<_> = allowed
            .iter()
            .filter(|r| r["host_port"] == port && r["proto"] == proto)
            .collect();
        assert_eq!(m.len(), 1, "records for {proto} port {port}: {allowed:#?}");
        m[0]
    };
    let counts = |r: &serde_json::Value| {
        (
            r["packets_out"].as_u64().unwrap(),
            r["bytes_out"].as_u64().unwrap(),
            r["packets_in"].as_u64().unwrap(),
            r["bytes_in"].as_u64().unwrap(),
        )
    };
    let u = one(udp_port, "udp");
    assert_eq!(u["host"], AI1_4.to_string());
    assert_eq!(u["peer"], PUBLIC4.to_string());
    assert_eq!(u["peer_port"], 7000);
    assert_eq!(u["mac"], AI1_MAC);
    assert_eq!(counts(u), (5, 5 * 128, 5, 5 * 128), "{u}");
    let u6 = one(udp6_port, "udp");
    assert_eq!(u6["peer"], PUBLIC6.to_string());
    assert_eq!(counts(u6), (3, 3 * 1048, 3, 3 * 1048), "{u6}");
    let t = one(tcp_port, "tcp");
    assert_eq!(t["peer_port"], 7001);
    assert_eq!(counts(t), tcp_expected, "{t} vs the capture {tcp_frames:?}");
    println!(
        "allowed records: udp {:?}, udp6 {:?}, tcp {:?} (capture {:?})",
        counts(u),
        counts(u6),
        counts(t),
        tcp_expected
    );
    let status = lab.cage(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["flow_log"]["ebpf_evicted"], 0, "{v:#}");
    assert_eq!(v["flow_log"]["ebpf_update_failed"], 0, "{v:#}");
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn restarts_in_the_middle_of_traffic_neither_duplicate_nor_lose_records() {
    use cage_agent::probe::{Servers, Service};
    use cage_tests::lab::PUBLIC4;

    let lab = lab_with_flowlog("\toption idle_timeout '2'\n\toption active_timeout '10'\n");
    let mut run = lab.cage_run_ai1_ready();
    let _servers = Servers::start(
        &lab.netns(Node::Inet),
        &[Service::udp(7000)],
        Duration::from_secs(120),
    )
    .expect("servers");

    // One long flow (a datagram every 50 ms for 16 s: longer than the active timeout)
    // and short flows now and then, each from a port of its own.
    let ai1 = lab.netns(Node::Ai1);
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let long = ai1
        .spawn("long flow", move || {
            let s = std::net::UdpSocket::bind((AI1_4, 0)).unwrap();
            let _ = port_tx.send(s.local_addr().unwrap().port());
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let (mut sent, mut echoed) = (0u64, 0u64);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(16) {
                s.send_to(&[1u8; 100], (PUBLIC4, 7000)).unwrap();
                sent += 1;
                let mut b = [0u8; 200];
                if s.recv_from(&mut b).is_ok() {
                    echoed += 1;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok((s.local_addr().unwrap().port(), sent, echoed))
        })
        .expect("long flow");
    let short_flow = |n: u8| {
        ai1.run("short flow", move || {
            let s = std::net::UdpSocket::bind((AI1_4, 0)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut echoed = 0u64;
            for _ in 0..n {
                s.send_to(&[2u8; 100], (PUBLIC4, 7000)).unwrap();
                let mut b = [0u8; 200];
                if s.recv_from(&mut b).is_ok() {
                    echoed += 1;
                }
            }
            Ok((s.local_addr().unwrap().port(), u64::from(n), echoed))
        })
        .expect("short flow")
    };

    let want = |port: u16| -> Vec<serde_json::Value> {
        let out = lab.cage(&["flows", "--json", "-n", "0", "--verdict", "allowed"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["host_port"] == port && r["proto"] == "udp")
            .collect()
    };
    let written = |what: &str, port: u16| {
        wait::until(what, Duration::from_secs(20), || {
            (!want(port).is_empty()).then_some(())
        })
    };
    let long_port = port_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the long flow's port");

    // The restarts find both kinds of flow: some already written, some still only in
    // the eBPF map. First: one short flow written (idle 2 s, then a flush), another still
    // in the map, then a clean restart.
    let mut shorts = vec![short_flow(3)];
    written("the first short flow's record", shorts[0].0);
    shorts.push(short_flow(4));
    let _ = run.stop();
    run = lab.cage_run();
    shorts.push(short_flow(5));
    // The active timeout (10 s) writes the long flow's first part while it goes on;
    // then a crash, with the rest of it and a short flow only in the map.
    written("the long flow's active-timeout record", long_port);
    shorts.push(short_flow(6));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(run.pid() as i32, libc::SIGKILL) };
    let _ = run.stop();
    run = lab.cage_run();
    let (long_port_seen, long_sent, long_echoed) = long.join().expect("long flow");
    assert_eq!(long_port_seen, long_port);
    shorts.push(short_flow(2));

    // Everything idle after 2 s, written at the next flush (5 s).
    let sum = |recs: &[serde_json::Value], field: &str| -> u64 {
        recs.iter().map(|r| r[field].as_u64().unwrap_or(0)).sum()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let done = sum(&want(long_port), "packets_out") >= long_sent
            && shorts.iter().all(|&(p, _, _)| !want(p).is_empty());
        if done || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(run);

    let long_recs = want(long_port);
    assert!(
        long_recs.len() >= 2,
        "the long flow should have an active-timeout record and a final one: {long_recs:#?}"
    );
    assert_eq!(
        (sum(&long_recs, "packets_out"), sum(&long_recs, "bytes_out")),
        (long_sent, long_sent * 128),
        "long flow out, over {} records: {long_recs:#?}",
        long_recs.len()
    );
    assert_eq!(
        (sum(&long_recs, "packets_in"), sum(&long_recs, "bytes_in")),
        (long_echoed, long_echoed * 128),
        "long flow in: {long_recs:#?}"
    );
    for (port, sent, echoed) in &shorts {
        let recs = want(*port);
        assert_eq!(recs.len(), 1, "short flow from port {port}: {recs:#?}");
        assert_eq!(
            (sum(&recs, "packets_out"), sum(&recs, "packets_in")),
            (*sent, *echoed),
            "short flow from port {port}: {recs:#?}"
        );
    }
    println!(
        "long flow: {long_sent} out / {long_echoed} in over {} records; {} short flows once each",
        long_recs.len(),
        shorts.len()
    );
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn twenty_thousand_short_flows_are_each_logged_or_counted_lost() {
    use cage_tests::lab::PUBLIC4;

    // A small map, so that a burst of 20 000 flows overflows it: the loss path is
    // exercised, not only the happy one. The whole map for the one host (no share) and
    // no flow-rate or conntrack limit: what is measured here is eviction from a full
    // map; the hostile host's limits are the neighbour tests' business. (With them, the
    // attempts over the rate are denied and written as blocked records, and their eBPF
    // records, evicted unwritten, are counted lost as well: both, for one attempt.)
    let lab = lab_with_flowlog(
        "\toption idle_timeout '1'\n\toption max_flows '4096'\n\n\
         config limits 'limits'\n\toption flow_share '100'\n\
         \toption new_flows_per_second '100000'\n\toption new_flows_burst '1000000'\n\
         \toption conntrack_per_host '1000000'\n",
    );
    let run = lab.cage_run_ai1_ready();
    // The internet host drops the datagrams quietly (no ICMP errors: flows of their own).
    lab.nft(
        Node::Inet,
        "table inet quiet {\n chain input {\n type filter hook input priority 0;\n \
         udp dport 10000-29999 drop\n }\n}\n",
    );

    let pins = lab::bpf_dir(lab.prefix()).join("br-cage");
    let created = || {
        cage_agent::ebpf::Maps::open(&pins)
            .and_then(|m| m.stats())
            .expect("eBPF stats")
            .flows_created
    };
    let stats = |lab: &Lab| -> serde_json::Value {
        let out = lab.cage(&["status", "--json"]);
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["flow_log"].clone()
    };
    // Let the collector settle (the lab's warm-up flows idle and written: no new flow,
    // record or loss for a flush interval and more), then take the starting point.
    let (created0, _, evicted0) = wait::steady(
        "the flow collector to settle",
        Duration::from_secs(30),
        cage_agent::daemon::FLUSH_INTERVAL + Duration::from_secs(1),
        || {
            let s = stats(&lab);
            (
                created(),
                s["written"].as_u64().unwrap_or(0),
                s["ebpf_evicted"].as_u64().unwrap_or(0),
            )
        },
        |_| true,
    );

    const FLOWS: u16 = 20_000;
    lab.netns(Node::Ai1)
        .run("20 000 flows", || {
            let s = std::net::UdpSocket::bind((AI1_4, 0)).unwrap();
            for i in 0..FLOWS {
                s.send_to(b"x", (PUBLIC4, 10_000 + i)).unwrap();
            }
            Ok(())
        })
        .expect("flows");

    // Idle after 1 s; written within a flush or two.
    let logged = |lab: &Lab| -> u64 {
        let out = lab.cage(&["flows", "--json", "-n", "0", "--host", "203.0.113.10"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| {
                r["proto"] == "udp"
                    && r["peer_port"]
                        .as_u64()
                        .is_some_and(|p| (10_000..30_000).contains(&p))
            })
            .count() as u64
    };
    // Until the figures settle: unchanged for a flush interval and more, and every flow
    // accounted for (or 45 s have passed: the assertions below say what is missing).
    let figures = || {
        let lost = stats(&lab)["ebpf_evicted"]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(evicted0);
        (logged(&lab), lost)
    };
    let start = Instant::now();
    let (mut now, mut since) = (figures(), Instant::now());
    while start.elapsed() < Duration::from_secs(45) {
        std::thread::sleep(Duration::from_secs(1));
        let next = figures();
        if next != now {
            (now, since) = (next, Instant::now());
        } else if since.elapsed() > cage_agent::daemon::FLUSH_INTERVAL
            && now.0 + now.1 >= u64::from(FLOWS)
        {
            break;
        }
    }
    let (logged_n, lost) = now;
    // Flows of anything else that ran meanwhile (neighbour discovery, say) may be among
    // the lost; there are only a few, and the bound says how many.
    let other = created().saturating_sub(created0 + u64::from(FLOWS));
    println!(
        "{FLOWS} flows: {logged_n} logged, {lost} counted lost (evicted from a 4096-flow \
         map), {other} other flows meanwhile"
    );
    assert!(
        lost > 0,
        "a 20 000-flow burst into a 4096-flow map lost nothing?"
    );
    assert!(logged_n > 0, "nothing was logged");
    assert!(
        logged_n + lost >= u64::from(FLOWS) && logged_n + lost <= u64::from(FLOWS) + other,
        "logged {logged_n} + lost {lost} should be {FLOWS} (+ up to {other} other flows)"
    );
    assert!(
        run.log().contains("evicted"),
        "the loss was not logged:\n{}",
        run.log()
    );
}
