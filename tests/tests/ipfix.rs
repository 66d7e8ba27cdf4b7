//! The IPFIX export against a real collector: Debian's nfcapd (nfdump 1.7) on the lab's
//! LAN host stores what `cage run` exports, `nfdump` reads it back, and every record of
//! Cage's flow log is there with the same bytes, packets, times and MAC, the blocked
//! ones too. nfdump skips enterprise elements, so Cage's own (verdict, rule) are read
//! from the very datagrams nfcapd received, which it repeats to the test (`-R`), by a
//! decoder written here from RFC 7011 alone. The caged host cannot reach the collector
//! (its forged export is blocked and logged), and a collector that is gone costs
//! counted losses and nothing else; one that comes back gets the templates again, and a
//! reload (SIGHUP) moves the export to a new observation domain.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cage_agent::probe::{probe_in, NetNs, Probe, Servers, Service, NETNS_RUN_DIR};
use cage_tests::lab::{
    Lab, Node, AI1_4, AI1_6, AI1_MAC, HOTEL4, LAN_HOST4, PUBLIC4, PUBLIC6, ROUTER_LAN4,
};
use serde_json::Value;

const COLLECTOR_PORT: u16 = 4739;
/// Where nfcapd repeats every datagram it receives, on the LAN host's loopback.
const REPEAT_PORT: u16 = 4740;

/// nfcapd in the LAN host's namespace, in the foreground, storing into `dir` and
/// repeating to the test; SIGTERM'd (which closes its file) when stopped or dropped.
struct Nfcapd {
    child: Option<Child>,
    dir: PathBuf,
    log: PathBuf,
}

impl Nfcapd {
    fn start(lab: &Lab, name: &str) -> Nfcapd {
        let dir = lab.dir().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let log = lab.dir().join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net={NETNS_RUN_DIR}/{}", lab.ns(Node::Lan)))
            .arg("nfcapd")
            .arg("-w")
            .arg(&dir)
            .args(["-b", &LAN_HOST4.to_string()])
            .args(["-p", &COLLECTOR_PORT.to_string()])
            .args(["-t", "3600"])
            .args(["-R", &format!("127.0.0.1/{REPEAT_PORT}")])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("nfcapd (Debian's nfdump package; cargo xtask setup installs it)");
        let n = Nfcapd {
            child: Some(child),
            dir,
            log,
        };
        n.wait_log("Startup nfcapd");
        n
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_log(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log().contains(what) {
            assert!(
                Instant::now() < deadline,
                "nfcapd did not say {what:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then wait for it to have written its file.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// What `nfdump` reads from every file nfcapd wrote, as JSON records.
    fn read(&self) -> Vec<Value> {
        let out = Command::new("nfdump")
            .env("TZ", "UTC")
            .arg("-R")
            .arg(&self.dir)
            .args(["-o", "json"])
            .output()
            .expect("nfdump");
        assert!(out.status.success(), "nfdump: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        if text.trim().is_empty() {
            return vec![];
        }
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("nfdump's JSON: {e}\n{text}"))
    }
}

impl Drop for Nfcapd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The datagrams nfcapd repeats, received on the LAN host's loopback until stopped.
struct Repeated {
    stop: Arc<AtomicBool>,
    thread: cage_agent::probe::NsThread<Vec<Vec<u8>>>,
}

impl Repeated {
    fn start(ns: &NetNs) -> Repeated {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = ns
            .spawn("repeated", move || {
                let s = UdpSocket::bind(("127.0.0.1", REPEAT_PORT)).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                tx.send(()).unwrap();
                let mut got = Vec::new();
                let mut buf = vec![0u8; 65536];
                let deadline = Instant::now() + Duration::from_secs(300);
                while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if let Ok(n) = s.recv(&mut buf) {
                        got.push(buf[..n].to_vec());
                    }
                }
                Ok(got)
            })
            .expect("repeat receiver");
        rx.recv_timeout(Duration::from_secs(5)).expect("bound");
        Repeated { stop, thread }
    }

    fn finish(self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("repeat receiver")
    }
}

/// A data record as this decoder reads it: each field by (enterprise, element).
type Fields = HashMap<(u32, u16), Vec<u8>>;

/// Every data record in `messages`, decoded with the templates they carry (RFC 7011:
/// header, sets, template records, fixed and variable-length fields).
fn decode(messages: &[Vec<u8>]) -> Vec<Fields> {
    let be16 = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let mut templates: HashMap<u16, Vec<(u32, u16, u16)>> = HashMap::new();
    let mut records = Vec::new();
    for m in messages {
        assert_eq!(be16(&m[0..]), 10, "version");
        assert_eq!(be16(&m[2..]) as usize, m.len(), "message length");
        let mut at = 16;
        while at + 4 <= m.len() {
            let (id, len) = (be16(&m[at..]), be16(&m[at + 2..]) as usize);
            assert!(len >= 4 && at + len <= m.len(), "set length {len} at {at}");
            let set = &m[at + 4..at + len];
            if id == 2 {
                let mut p = 0;
                while p + 4 <= set.len() {
                    let (tid, count) = (be16(&set[p..]), be16(&set[p + 2..]));
                    p += 4;
                    let mut fields = Vec::new();
                    for _ in 0..count {
                        let (raw, flen) = (be16(&set[p..]), be16(&set[p + 2..]));
                        p += 4;
                        let pen = if raw & 0x8000 != 0 {
                            p += 4;
                            be32(&set[p - 4..])
                        } else {
                            0
                        };
                        fields.push((pen, raw & 0x7fff, flen));
                    }
                    templates.insert(tid, fields);
                }
            } else if id >= 256 {
                let fields = templates.get(&id).expect("a template before its data");
                let mut p = 0;
                // Records until what is left is padding, shorter than any record.
                while set.len() - p >= 4 && set[p..].iter().any(|b| *b != 0) {
                    let mut rec = Fields::new();
                    for &(pen, ie, flen) in fields {
                        let n = if flen == 0xffff {
                            let short = set[p] as usize;
                            p += 1;
                            if short == 255 {
                                p += 2;
                                be16(&set[p - 2..]) as usize
                            } else {
                                short
                            }
                        } else {
                            flen as usize
                        };
                        rec.insert((pen, ie), set[p..p + n].to_vec());
                        p += n;
                    }
                    records.push(rec);
                }
            }
            at += len;
        }
        assert_eq!(at, m.len(), "sets fill the message");
    }
    records
}

fn addr(b: &[u8]) -> IpAddr {
    match b.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(b).unwrap()),
        _ => IpAddr::from(<[u8; 16]>::try_from(b).unwrap()),
    }
}

fn uint(b: &[u8]) -> u64 {
    b.iter().fold(0, |v, x| (v << 8) | u64::from(*x))
}

fn ipfix_status(lab: &Lab) -> Value {
    let out = lab.cage(&["status", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    v["ipfix"].clone()
}

/// Poll the flow log (every 500 ms, at most `limit`) until `done` holds for it.
fn wait_log(lab: &Lab, limit: Duration, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + limit;
    loop {
        let recs = lab.flow_records();
        if done(&recs) {
            return recs;
        }
        assert!(
            Instant::now() < deadline,
            "flow log never had {what}: {recs:#?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `count` datagrams of `size` bytes from `from` to the UDP echo server at `to`:7000,
/// each echoed: the local port.
fn udp_echoes(ns: &NetNs, from: IpAddr, to: IpAddr, count: u8, size: usize) -> u16 {
    ns.run("udp", move || {
        let s = UdpSocket::bind((from, 0)).unwrap();
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

/// The key both sides agree on: addresses, ports (ICMP: type), protocol, first and last
/// packet in milliseconds as nfdump prints them.
type Key = (String, String, u64, u64, u64, String, String);

fn cage_key(r: &Value) -> Key {
    let icmp = r["proto"] == "icmp" || r["proto"] == "icmpv6";
    let proto = match r["proto"].as_str().unwrap() {
        "tcp" => 6,
        "udp" => 17,
        "icmp" => 1,
        "icmpv6" => 58,
        n => n.parse().unwrap(),
    };
    let port = |k: &str| r[k].as_u64().unwrap_or(0);
    (
        r["host"].as_str().unwrap().to_owned(),
        r["peer"].as_str().unwrap().to_owned(),
        if icmp { 0 } else { port("host_port") },
        // ICMP: the type as the export says it (see `ipfix::encode::icmp_type_code`).
        match (icmp, r["peer_port"].as_u64()) {
            (true, Some(v)) if v > 255 => v >> 8,
            (true, Some(t)) => t,
            (true, None) if proto == 58 => 128,
            (true, None) => 8,
            (false, _) => port("peer_port"),
        },
        proto,
        r["start"]
            .as_str()
            .unwrap()
            .trim_end_matches('Z')
            .to_owned(),
        r["end"].as_str().unwrap().trim_end_matches('Z').to_owned(),
    )
}

fn nfdump_key(r: &Value) -> Key {
    let a = |k4: &str, k6: &str| r[k4].as_str().or(r[k6].as_str()).unwrap().to_owned();
    let icmp = r.get("icmp_type").is_some();
    (
        a("src4_addr", "src6_addr"),
        a("dst4_addr", "dst6_addr"),
        r["src_port"].as_u64().unwrap_or(0),
        if icmp {
            r["icmp_type"].as_u64().unwrap()
        } else {
            r["dst_port"].as_u64().unwrap_or(0)
        },
        r["proto"].as_u64().unwrap(),
        r["first"].as_str().unwrap().to_owned(),
        r["last"].as_str().unwrap().to_owned(),
    )
}

fn counts(r: &Value, keys: [&str; 4]) -> [u64; 4] {
    keys.map(|k| r[k].as_u64().unwrap_or(0))
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn nfdump_reads_every_flow_record_as_the_flow_log_counts_it() {
    let sections = |domain: u32| {
        format!(
            "{}\nconfig flowlog 'flowlog'\n\toption idle_timeout '2'\n\
             \nconfig export 'export'\n\toption ipfix '{LAN_HOST4}:{COLLECTOR_PORT}'\n\
             \toption ipfix_domain '{domain}'\n",
            cage_tests::contract::CONFIG_EXTRA
        )
    };
    let lab = Lab::for_test();
    lab.write_config(&sections(42));
    let lan = lab.netns(Node::Lan);
    let repeated = Repeated::start(&lan);
    let mut nfcapd = Nfcapd::start(&lab, "nfcapd");
    let run = lab.cage_run_ai1_ready();
    let _servers = Servers::start(
        &lab.netns(Node::Inet),
        &[Service::udp(7000), Service::tcp(7001)],
        Duration::from_secs(120),
    )
    .expect("servers");

    let ai1 = lab.netns(Node::Ai1);
    // Allowed: UDP over IPv4 and IPv6, TCP, ICMP and ICMPv6 to the internet host.
    let udp_port = udp_echoes(&ai1, AI1_4, PUBLIC4, 5, 100);
    let udp6_port = udp_echoes(&ai1, AI1_6, PUBLIC6, 3, 1000);
    let tcp_port = ai1
        .run("tcp", || {
            let mut s = std::net::TcpStream::connect((PUBLIC4, 7001)).unwrap();
            s.write_all(&[7u8; 500]).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut back = Vec::new();
            let _ = s.read_to_end(&mut back);
            Ok(s.local_addr().unwrap().port())
        })
        .expect("tcp");
    for dst in [PUBLIC4, PUBLIC6] {
        let a = probe_in(&ai1, &Probe::icmp(dst)).expect("ping");
        assert!(a.outcome.answered(), "ping {dst}: {a:?}");
    }
    // Blocked: the LAN's SSH and the hotel's SNMP.
    for probe in [Probe::tcp(LAN_HOST4, 22), Probe::udp(HOTEL4, 161)] {
        let a =
            probe_in(&ai1, &probe.from(AI1_4).timeout(Duration::from_millis(300))).expect("probe");
        assert!(!a.outcome.answered(), "{a:?}");
    }
    // The caged host forges an export of its own to the collector: a valid IPFIX
    // message (templates, then a flow that never was) that must never get there.
    let mut forged = cage_agent::ipfix::encode::Stream::new(42);
    let fake: cage_agent::flows::FlowRecord = serde_json::from_value(serde_json::json!({
        "start": "2026-01-01T00:00:00.000Z", "end": "2026-01-01T00:00:01.000Z",
        "verdict": "allowed", "proto": "tcp", "host": "198.51.100.66", "host_port": 6666,
        "peer": "203.0.113.66", "peer_port": 6666, "direction": "out",
        "packets_out": 1, "bytes_out": 66, "packets_in": 1, "bytes_in": 66
    }))
    .unwrap();
    let mut forgery = forged.templates(0).bytes;
    forgery.extend_from_slice(&forged.data(&[fake], 0)[0].bytes[16..]);
    let len = forgery.len() as u16;
    forgery[2..4].copy_from_slice(&len.to_be_bytes());
    ai1.run("forge", move || {
        let s = UdpSocket::bind((AI1_4, 0)).unwrap();
        for _ in 0..3 {
            s.send_to(&forgery, (LAN_HOST4, COLLECTOR_PORT)).unwrap();
        }
        Ok(())
    })
    .expect("forge");

    // Everything in the flow log (idle after 2 s, written at the next 5 s flush).
    let expect_allowed = [(udp_port, "udp"), (udp6_port, "udp"), (tcp_port, "tcp")];
    let records = wait_log(&lab, Duration::from_secs(30), "every flow", |recs| {
        let has = |f: &dyn Fn(&Value) -> bool| recs.iter().any(f);
        expect_allowed
            .iter()
            .all(|&(p, proto)| has(&|r| r["host_port"] == p && r["proto"] == proto))
            && has(&|r| r["proto"] == "icmp" && r["peer"] == PUBLIC4.to_string())
            && has(&|r| r["proto"] == "icmpv6" && r["peer"] == PUBLIC6.to_string())
            && has(&|r| r["peer"] == LAN_HOST4.to_string() && r["peer_port"] == 22)
            && has(&|r| r["peer"] == HOTEL4.to_string() && r["peer_port"] == 161)
            && has(&|r| r["peer"] == LAN_HOST4.to_string() && r["peer_port"] == COLLECTOR_PORT)
    });
    // Exported as written, to the last flush, which a SIGTERM'd `cage run` makes: with
    // the daemon stopped, the log, the status and what nfcapd got can be compared
    // without a flush (the lab's IPv6 chatter is traffic too) racing the reads.
    let log_before = records.len();
    let stopped = run.stop();
    let records = lab.flow_records();
    assert!(records.len() >= log_before, "{stopped:?}");
    let status = ipfix_status(&lab);
    assert_eq!(
        status["records"].as_u64(),
        Some(records.len() as u64),
        "{status}"
    );
    assert_eq!(status["lost"], 0, "{status}");
    assert_eq!(status["collector"], format!("{LAN_HOST4}:{COLLECTOR_PORT}"));
    std::thread::sleep(Duration::from_millis(500));
    nfcapd.stop();
    let repeats = repeated.finish();
    let stored = nfcapd.read();

    // The forgery was blocked and logged, and the collector never heard from ai1.
    let forged_rec = records
        .iter()
        .find(|r| r["peer"] == LAN_HOST4.to_string() && r["peer_port"] == COLLECTOR_PORT)
        .unwrap();
    assert_eq!(forged_rec["verdict"], "blocked");
    assert_eq!(forged_rec["rule"], "deny:lan");
    assert_eq!(forged_rec["packets_out"], 3);
    let log = nfcapd.log();
    assert!(
        !log.contains(&AI1_4.to_string()),
        "nfcapd heard from the caged host:\n{log}"
    );
    assert!(
        log.contains(&format!("Observation domain 42 from: {ROUTER_LAN4}")),
        "{log}"
    );
    // nfcapd checks each message's sequence number against the records before it.
    assert!(log.contains("Sequence Errors: 0,"), "{log}");
    assert!(
        stored.iter().all(
            |r| r["ip4_router"] == ROUTER_LAN4.to_string() && r["src4_addr"] != "198.51.100.66"
        ),
        "a record not from the router: {stored:#?}"
    );

    // Every record of the flow log, once, with its counts, as nfdump reads it.
    assert_eq!(
        stored.len(),
        records.len(),
        "nfdump {stored:#?}\nCage {records:#?}"
    );
    let by_key: HashMap<Key, &Value> = stored.iter().map(|r| (nfdump_key(r), r)).collect();
    for r in &records {
        let k = cage_key(r);
        let n = by_key
            .get(&k)
            .unwrap_or_else(|| panic!("nfdump has no {k:?} for {r}: {stored:#?}"));
        assert_eq!(
            counts(n, ["in_packets", "in_bytes", "out_packets", "out_bytes"]),
            counts(r, ["packets_out", "bytes_out", "packets_in", "bytes_in"]),
            "nfdump {n}\nCage {r}"
        );
        if let Some(mac) = r["mac"].as_str() {
            assert_eq!(n["in_src_mac"], mac, "{n}");
        }
    }
    let udp = records.iter().find(|r| r["host_port"] == udp_port).unwrap();
    assert_eq!(
        counts(udp, ["packets_out", "bytes_out", "packets_in", "bytes_in"]),
        [5, 5 * 128, 5, 5 * 128],
        "the flow log itself counted right: {udp}"
    );
    assert_eq!(udp["mac"], AI1_MAC);

    // Cage's own elements, in the datagrams nfcapd received: the verdict and the rule.
    let decoded = decode(&repeats);
    assert_eq!(
        decoded.len(),
        records.len(),
        "repeated {} datagrams",
        repeats.len()
    );
    for r in &records {
        let k = cage_key(r);
        // The peer's port, or for ICMP the type, in the high octet of icmpTypeCode.
        let port = |d: &Fields| {
            if k.4 == 1 || k.4 == 58 {
                uint(d.get(&(0, 32)).or(d.get(&(0, 139))).unwrap()) >> 8
            } else {
                uint(&d[&(0, 11)])
            }
        };
        let d = decoded
            .iter()
            .find(|d| {
                let src = d.get(&(0, 8)).or(d.get(&(0, 27))).unwrap();
                let dst = d.get(&(0, 12)).or(d.get(&(0, 28))).unwrap();
                addr(src).to_string() == k.0
                    && addr(dst).to_string() == k.1
                    && uint(&d[&(0, 4)]) == k.4
                    && port(d) == k.3
                    && uint(&d[&(0, 7)]) == k.2
            })
            .unwrap_or_else(|| panic!("no datagram record for {k:?}"));
        let verdict = uint(&d[&(32473, 1)]);
        let rule = String::from_utf8(d[&(32473, 2)].clone()).unwrap();
        match r["verdict"].as_str() {
            Some("blocked") => {
                assert_eq!(verdict, 2, "{r}");
                assert_eq!(rule, r["rule"].as_str().unwrap(), "{r}");
            }
            _ => {
                assert_eq!(verdict, 1, "{r}");
                assert_eq!(rule, "", "{r}");
            }
        }
        assert_eq!(
            uint(&d[&(29305, 1)]),
            r["bytes_in"].as_u64().unwrap(),
            "{r}"
        );
    }
    println!(
        "{} records: nfdump and the datagrams agree with the flow log; status {status}",
        records.len()
    );

    // A new `cage run`: the export starts afresh (its counts are the process's own).
    let mut run = lab.cage_run_ai1_ready();
    // The collector is gone: its host answers port unreachable. Cage goes on, and
    // counts what it lost.
    let gone_port = udp_echoes(&ai1, AI1_4, PUBLIC4, 2, 50);
    std::thread::sleep(Duration::from_secs(6));
    let late_port = udp_echoes(&ai1, AI1_4, PUBLIC4, 2, 50);
    wait_log(
        &lab,
        Duration::from_secs(30),
        "the flows while the collector is gone",
        |recs| {
            [gone_port, late_port]
                .iter()
                .all(|p| recs.iter().any(|r| r["host_port"] == *p))
        },
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let gone = loop {
        let s = ipfix_status(&lab);
        if s["lost"].as_u64().unwrap_or(0) >= 1 || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        gone["lost"].as_u64().unwrap_or(0) >= 1 && gone["records"].as_u64() > Some(0),
        "{gone}"
    );
    assert!(
        gone["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("refused"),
        "{gone}"
    );
    assert!(run.is_running(), "cage run died:\n{}", run.log());
    assert!(
        probe_in(&ai1, &Probe::icmp(PUBLIC4))
            .unwrap()
            .outcome
            .answered(),
        "the cage stopped passing traffic"
    );
    assert!(
        run.log()
            .contains("ipfix: the collector's host answers that nothing listens"),
        "{}",
        run.log()
    );
    println!("collector gone: {gone}");

    // It comes back: the templates go out again before the next data, so a flow made
    // now is stored and read.
    let mut back = Nfcapd::start(&lab, "nfcapd-back");
    let again_port = udp_echoes(&ai1, AI1_4, PUBLIC4, 4, 60);
    wait_log(
        &lab,
        Duration::from_secs(30),
        "the flow after the collector came back",
        |recs| recs.iter().any(|r| r["host_port"] == again_port),
    );
    // A reload (SIGHUP) that changes the observation domain: a new stream, templates
    // first, at the next flush.
    lab.write_config(&sections(43));
    // SAFETY: kill(2) on the pid of the `cage run` this test started.
    unsafe { libc::kill(run.pid() as i32, libc::SIGHUP) };
    run.wait_until(Duration::from_secs(20), "the reload's new stream", || {
        run.log().contains("(observation domain 43)")
    });
    let reload_port = udp_echoes(&ai1, AI1_4, PUBLIC4, 1, 60);
    wait_log(
        &lab,
        Duration::from_secs(30),
        "the flow after the reload",
        |recs| recs.iter().any(|r| r["host_port"] == reload_port),
    );
    std::thread::sleep(Duration::from_secs(1));
    back.stop();
    assert!(
        back.log()
            .contains(&format!("Observation domain 43 from: {ROUTER_LAN4}")),
        "{}",
        back.log()
    );
    let stored = back.read();
    assert!(
        stored.iter().any(|r| r["src_port"] == reload_port),
        "the flow after the reload: {stored:#?}"
    );
    let again = stored
        .iter()
        .find(|r| r["src_port"] == again_port)
        .unwrap_or_else(|| {
            panic!(
                "the flow after the collector came back: {stored:#?}\n{}",
                back.log()
            )
        });
    assert_eq!(
        counts(
            again,
            ["in_packets", "in_bytes", "out_packets", "out_bytes"]
        ),
        [4, 4 * 88, 4, 4 * 88]
    );
}
