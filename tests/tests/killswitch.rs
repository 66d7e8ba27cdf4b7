//! The kill switch in the lab: one press stops everything to and from the segment,
//! established flows included, holds with the daemon down, across restarts, SIGKILL and a
//! "reboot" (the kernel's tables gone), answers the hardware button through the hotplug
//! script, and `cage release` restores the whole contract.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cage_agent::probe::{probe_in, NetNs, Probe, Record, Servers, Service, Witness, WitnessLimits};
use cage_tests::contract::{self, run_matrix, Host};
use cage_tests::lab::{
    self, Lab, Node, AI2_4, LAN_HOST4, PUBLIC4, PUBLIC6, ROUTER_WAN4, ROUTER_WAN6,
};

const BUTTON_CONFIG: &str = "\nconfig killswitch 'killswitch'\n\toption button 'BTN_0'\n";

fn cage_ok(lab: &Lab, args: &[&str]) -> String {
    let out = lab.cage(args);
    cage_tests::assert_success(&out, format_args!("cage {args:?}"))
        + &String::from_utf8_lossy(&out.stderr)
}

/// Remove Cage's nftables tables behind its back, as a reboot (or someone with a shell)
/// would.
fn forget_cages_tables(lab: &Lab) {
    for family in ["inet", "bridge"] {
        lab.nft(Node::Router, &format!("delete table {family} cage"));
    }
}

/// `cage apply` in the lab, with a UDP echo server on the internet host for
/// [`internet_answers`]; the segment ready and ai1's neighbours pinned.
fn apply_with_internet(lab: &Lab) -> Servers {
    let servers = Servers::start(
        &lab.netns(Node::Inet),
        &[Service::udp(53)],
        Duration::from_secs(120),
    )
    .expect("servers");
    cage_ok(lab, &["apply"]);
    lab.wait_segment_ready().expect("segment");
    lab.pin_router_neighbours(Node::Ai1).expect("neighbours");
    servers
}

/// Does a caged host reach the internet host now (UDP echo and ping)?
fn internet_answers(lab: &Lab) -> (bool, bool) {
    let ai1 = lab.netns(Node::Ai1);
    let t = Duration::from_millis(500);
    let udp = probe_in(&ai1, &Probe::udp(PUBLIC4, 53).timeout(t)).expect("probe");
    let icmp = probe_in(&ai1, &Probe::icmp(PUBLIC6).timeout(t)).expect("probe");
    (udp.outcome.answered(), icmp.outcome.answered())
}

fn assert_isolated(lab: &Lab, when: &str) {
    assert_eq!(
        internet_answers(lab),
        (false, false),
        "{when}: a caged host still reaches the internet"
    );
    let status = lab.cage(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    assert_eq!(v["isolation"]["isolated"], true, "{when}: {v:#}");
    assert_eq!(v["kernel_isolated"], true, "{when}: {v:#}");
    // The fast path too: the eBPF program's flag.
    assert_eq!(v["ebpf"]["isolated_flag"], true, "{when}: {v:#}");
}

fn assert_open(lab: &Lab, when: &str) {
    assert_eq!(
        internet_answers(lab),
        (true, true),
        "{when}: a caged host does not reach the internet"
    );
}

/// Packets from the caged segment (or from the router's WAN address, which the segment
/// is masqueraded to) among what a witness saw.
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

/// A TCP sink in `ns`: accepts connections and reads until told to stop.
fn tcp_sink(ns: &NetNs, port: u16, stop: Arc<AtomicBool>) -> cage_agent::probe::NsThread<u64> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = ns
        .spawn("tcp sink", move || {
            let l = std::net::TcpListener::bind(("0.0.0.0", port)).expect("bind sink");
            l.set_nonblocking(true).unwrap();
            // Listening: the transfer may connect.
            let _ = ready_tx.send(());
            let mut total = 0u64;
            let mut conns: Vec<TcpStream> = Vec::new();
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(60) {
                if let Ok((c, _)) = l.accept() {
                    c.set_nonblocking(true).unwrap();
                    conns.push(c);
                }
                let mut buf = [0u8; 65536];
                for c in conns.iter_mut() {
                    use std::io::Read;
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        total += n as u64;
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(total)
        })
        .expect("sink thread");
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the TCP sink did not start listening");
    thread
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn isolate_stops_a_running_transfer_and_a_ping_flood_at_once() {
    let lab = Lab::for_contract("");
    let run = lab.cage_run_ready();

    let limits = WitnessLimits {
        max_duration: Duration::from_secs(120),
        max_records: 500_000,
    };
    let inet = lab.netns(Node::Inet);
    let w_inet = Witness::start(&inet, limits).expect("witness inet");
    let w_lan = Witness::start(&lab.netns(Node::Lan), limits).expect("witness lan");
    let w_ai2 = Witness::start(&lab.netns(Node::Ai2), limits).expect("witness ai2");
    let stop = Arc::new(AtomicBool::new(false));
    let sink = tcp_sink(&inet, 5201, stop.clone());

    // The traffic: a TCP transfer to the internet host, a ping flood to it, and probes
    // towards the LAN host and the other caged host (denied all along).
    let ai1 = lab.netns(Node::Ai1);
    let sent = Arc::new(AtomicU64::new(0));
    let transfer = {
        let (stop, sent) = (stop.clone(), sent.clone());
        ai1.spawn("transfer", move || {
            let addr = SocketAddr::new(PUBLIC4, 5201);
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
            s.set_write_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let chunk = [0x5a_u8; 1024];
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(60) {
                if s.write_all(&chunk).is_ok() {
                    sent.fetch_add(1024, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_micros(500));
            }
            Ok(())
        })
        .expect("transfer thread")
    };
    let flood = {
        let stop = stop.clone();
        let ai1 = ai1.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed)
                && start.elapsed() < Duration::from_secs(60)
                && n < 20_000
            {
                for p in [
                    Probe::icmp(PUBLIC4).timeout(Duration::from_millis(20)),
                    Probe::udp(LAN_HOST4, 53).timeout(Duration::from_millis(20)),
                    Probe::udp(AI2_4, 53).timeout(Duration::from_millis(20)),
                ] {
                    let _ = probe_in(&ai1, &p);
                    n += 1;
                }
            }
            n
        })
    };

    // Let it flow, and check that it does.
    let before = cage_tests::wait::until(
        "the caged host's traffic to reach the internet",
        Duration::from_secs(10),
        || {
            w_inet
                .wait_drained(Instant::now(), Duration::from_secs(2))
                .unwrap();
            Some(from_segment(&w_inet.records())).filter(|&n| n > 100)
        },
    );
    assert!(
        before > 100,
        "only {before} packets reached the internet before isolating"
    );

    let t0 = Instant::now();
    cage_ok(&lab, &["isolate", "--reason", "lab test"]);
    let returned = Instant::now();
    // Everything the kernel queued to the witnesses before the command returned is
    // counted now; anything counted later arrived after the isolation.
    for w in [&w_inet, &w_lan, &w_ai2] {
        w.wait_drained(returned, Duration::from_secs(2)).unwrap();
    }
    let at_return = from_segment(&w_inet.records());
    std::thread::sleep(Duration::from_millis(1500));
    let sent_during = sent.load(Ordering::Relaxed);
    for w in [&w_inet, &w_lan, &w_ai2] {
        w.wait_drained(Instant::now(), Duration::from_secs(2))
            .unwrap();
    }
    let after = from_segment(&w_inet.records());
    stop.store(true, Ordering::Relaxed);
    transfer.join().expect("transfer");
    let probes = flood.join().expect("flood");
    let sunk = sink.join().expect("sink");

    println!(
        "isolate took {:?}; internet host got {before} packets before, {at_return} by the \
         time the command returned, {after} after 1.5 s more; {probes} probes, {sunk} TCP \
         bytes received of {sent_during} written",
        returned - t0
    );
    assert_eq!(
        after, at_return,
        "packets from the segment reached the internet host after `cage isolate` returned"
    );
    assert_eq!(
        from_segment(&w_lan.records()),
        0,
        "the LAN host saw the segment"
    );
    assert_eq!(
        from_segment(&w_ai2.records()),
        0,
        "the other caged host saw ai1"
    );
    assert_isolated(&lab, "after isolate with the daemon up");
    for w in [w_inet, w_lan, w_ai2] {
        w.stop().expect("witness");
    }
    drop(run);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn isolation_holds_without_the_daemon_across_restarts_and_reboot_until_release() {
    let lab = Lab::for_contract("");
    let servers = apply_with_internet(&lab);
    assert_open(&lab, "before isolating");

    // No daemon: the CLI works on the kernel directly.
    cage_ok(&lab, &["isolate", "--reason", "no daemon"]);
    assert_isolated(&lab, "isolated with no daemon");

    // Starting the daemon keeps it.
    let mut run = lab.cage_run();
    assert_isolated(&lab, "after cage run started");

    // SIGKILL and restart keep it.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(run.pid() as i32, libc::SIGKILL) };
    let _ = run.stop();
    assert_isolated(&lab, "with the daemon killed");
    run = lab.cage_run();
    assert_isolated(&lab, "after the restart");
    drop(run);

    // A reboot: the kernel forgets everything; the state on disk does not.
    forget_cages_tables(&lab);
    let run = lab.cage_run();
    assert_isolated(&lab, "after a reboot");

    // While isolated, every check of the contract that involves the segment is denied,
    // the admin host's included; the LAN's own traffic is untouched.
    let isolated_checks: Vec<_> = contract::checks()
        .into_iter()
        .map(|c| {
            let touches_segment = matches!(c.from, Host::Ai1 | Host::Ai2 | Host::Ai1Spoofed)
                || matches!(c.to, Node::Ai1 | Node::Ai2);
            if touches_segment {
                c.expecting(contract::Expect::Deny)
            } else {
                c
            }
        })
        .collect();
    let report = run_matrix(&lab, &isolated_checks);
    assert!(report.failures().is_empty(), "while isolated:\n{report}");
    println!("while isolated:\n{report}");

    // `disable` may not end an isolation.
    let out = lab.cage(&["disable"]);
    assert!(!out.status.success(), "disable must refuse while isolated");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cage release"));

    // Release restores the whole contract.
    cage_ok(&lab, &["release", "--reason", "checked, all clear"]);
    assert_open(&lab, "after release");
    drop(servers);
    let report = run_matrix(&lab, &contract::checks());
    assert!(report.failures().is_empty(), "after release:\n{report}");

    // Every press is in the audit log, with its source and reason.
    let status = lab.cage(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let audit = v["audit"].as_array().expect("audit entries");
    let actions: Vec<(&str, &str, &str)> = audit
        .iter()
        .map(|a| {
            (
                a["action"].as_str().unwrap(),
                a["source"].as_str().unwrap(),
                a["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        vec![
            ("isolate", "cli", "no daemon"),
            ("release", "cli", "checked, all clear")
        ]
    );
    drop(run);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn the_hardware_button_isolates_through_the_hotplug_script() {
    let lab = Lab::for_contract(BUTTON_CONFIG);
    let _servers = apply_with_internet(&lab);
    assert_open(&lab, "before the button");

    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../openwrt/files/etc/hotplug.d/button/50-cage");
    let hotplug = |button: &str, action: &str| {
        // As procd runs it: sh, with BUTTON and ACTION in the environment.
        let out = lab
            .in_router_netns()
            .arg("sh")
            .arg(&script)
            .env("BUTTON", button)
            .env("ACTION", action)
            .env("CAGE", lab::cage_bin().unwrap())
            .env("CAGE_CONFIG", lab.config_path())
            .output()
            .unwrap();
        assert!(out.status.success(), "hotplug script: {out:?}");
    };

    // Another button means nothing to Cage.
    hotplug("reset", "pressed");
    assert_open(&lab, "after the reset button");

    hotplug("BTN_0", "pressed");
    assert_isolated(&lab, "after BTN_0 pressed");

    // The switch moved back: with button_release off (the default), still isolated.
    hotplug("BTN_0", "released");
    assert_isolated(&lab, "after BTN_0 released");

    let status = lab.cage(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["isolation"]["source"], "button", "{v:#}");
    assert_eq!(v["audit"].as_array().map(Vec::len), Some(1), "{v:#}");
}

/// A port scan of the LAN host from ai1: `ports` TCP connects, each rejected at once.
fn scan_lan(lab: &Lab, ports: std::ops::Range<u16>) {
    let ai1 = lab.netns(Node::Ai1);
    for port in ports {
        let a = probe_in(
            &ai1,
            &Probe::tcp(LAN_HOST4, port).timeout(Duration::from_millis(200)),
        )
        .expect("probe");
        assert!(!a.outcome.answered(), "the LAN host answered port {port}");
    }
}

fn status(lab: &Lab) -> serde_json::Value {
    let out = lab.cage(&["status", "--json"]);
    serde_json::from_slice(&out.stdout).expect("status json")
}

fn wait_isolated(lab: &Lab, within: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if status(lab)["isolation"]["isolated"] == true {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

const AUTO_CONFIG: &str =
    "\nconfig killswitch 'killswitch'\n\toption auto_blocked '20'\n\toption auto_window '10'\n";

#[test]
#[ignore = "needs root: cargo xtask test"]
fn auto_isolation_fires_on_a_port_scan_of_the_lan() {
    let lab = Lab::for_contract(AUTO_CONFIG);
    let run = lab.cage_run_ai1_ready();

    // Below the limit: nothing happens.
    scan_lan(&lab, 1..11);
    assert!(
        !wait_isolated(&lab, Duration::from_secs(3)),
        "isolated after 10 blocked attempts with a limit of 20"
    );
    // Over it: isolated, with the evidence.
    scan_lan(&lab, 11..41);
    assert!(
        wait_isolated(&lab, Duration::from_secs(5)),
        "not isolated after 40 blocked attempts with a limit of 20:\n{}",
        run.log()
    );
    let v = status(&lab);
    assert_eq!(v["isolation"]["source"], "auto", "{v:#}");
    let reason = v["isolation"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("192.168.10.11") && reason.contains("blocked attempts"),
        "reason without evidence: {reason}"
    );
    assert!(run.log().contains("isolating the segment"), "{}", run.log());
    assert_isolated(&lab, "after automatic isolation");
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn auto_isolation_fires_on_a_flow_flood_over_the_hosts_share() {
    // ai1 only talks to the internet, which it may: the attempts that count are its new
    // flows over `limits.new_flows_per_second` (200 a second, bursts of 1000).
    let lab = Lab::for_contract(
        "\nconfig killswitch 'killswitch'\n\toption auto_blocked '500'\n\toption auto_window '10'\n",
    );
    let run = lab.cage_run_ai1_ready();
    assert!(
        !wait_isolated(&lab, Duration::from_secs(2)),
        "isolated before the flood"
    );
    lab.netns(Node::Ai1)
        .run("3000 new flows at once", || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
            for port in 20_000..23_000u16 {
                s.send_to(b"x", (PUBLIC4, port)).expect("send");
            }
            Ok(())
        })
        .expect("the flood");
    assert!(
        wait_isolated(&lab, Duration::from_secs(8)),
        "not isolated after a flood of new flows with auto_blocked 500:\n{}",
        run.log()
    );
    let v = status(&lab);
    assert_eq!(v["isolation"]["source"], "auto", "{v:#}");
    let reason = v["isolation"]["reason"].as_str().unwrap_or_default();
    // What counted were ai1's new flows over its rate: blocked records of that rule.
    // (written within a flush interval)
    let over_records = || {
        let ai1 = lab::AI1_4.to_string();
        let flows = lab.cage(&["flows", "--json", "-n", "0", "--host", &ai1]);
        String::from_utf8_lossy(&flows.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| r["rule"] == "deny:flow-rate")
            .count()
    };
    let start = Instant::now();
    let mut over = over_records();
    while over == 0 && start.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(500));
        over = over_records();
    }
    println!("3000 new flows at once: {reason}; {over} blocked records of deny:flow-rate");
    assert!(over > 0, "no blocked record of deny:flow-rate");
    assert!(
        reason.contains(&lab::AI1_4.to_string()) && reason.contains("blocked attempts"),
        "reason without evidence: {reason}"
    );
    assert_isolated(&lab, "after automatic isolation on a flow flood");
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn auto_isolation_stays_off_unless_configured() {
    let lab = Lab::for_contract("");
    let _run = lab.cage_run_ai1_ready();
    scan_lan(&lab, 1..61);
    assert!(
        !wait_isolated(&lab, Duration::from_secs(3)),
        "isolated without automatic isolation configured"
    );
    let denied = status(&lab)["denied"]["deny:lan"]["packets"]
        .as_u64()
        .unwrap_or(0);
    assert!(denied >= 60, "the scan was not even denied ({denied})");
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn auto_isolation_fires_on_an_upload_burst() {
    let lab = Lab::for_contract(
        "\nconfig killswitch 'killswitch'\n\toption auto_upload_bytes '200000'\n\toption auto_window '10'\n",
    );
    let _servers = Servers::start(
        &lab.netns(Node::Inet),
        &[Service::udp(53)],
        Duration::from_secs(60),
    )
    .expect("servers");
    let run = lab.cage_run_ai1_ready();
    assert_open(&lab, "before the upload");
    assert!(
        !wait_isolated(&lab, Duration::from_secs(2)),
        "isolated by a few probes"
    );

    // 300 KB in 1 KB datagrams, over a limit of 200 KB.
    lab.netns(Node::Ai1)
        .run("upload", || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("socket");
            let chunk = [0xab_u8; 1000];
            for _ in 0..300 {
                s.send_to(&chunk, (PUBLIC4, 9)).expect("send");
                std::thread::sleep(Duration::from_micros(200));
            }
            Ok(())
        })
        .expect("upload");
    assert!(
        wait_isolated(&lab, Duration::from_secs(5)),
        "not isolated after a 300 KB upload with a limit of 200 KB:\n{}",
        run.log()
    );
    let reason = status(&lab)["isolation"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(reason.contains("bytes sent to the internet"), "{reason}");
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn the_ebpf_flag_alone_isolates_and_nftables_alone_isolates() {
    let lab = Lab::for_contract("");
    let _servers = apply_with_internet(&lab);
    assert_open(&lab, "before");
    cage_ok(&lab, &["isolate", "--reason", "layers"]);

    // Without Cage's nftables tables, the eBPF program's flag still cuts the segment off.
    forget_cages_tables(&lab);
    assert_eq!(
        internet_answers(&lab),
        (false, false),
        "the eBPF flag alone did not isolate"
    );

    // And with the flag cleared by hand but the policy back, nftables alone does.
    cage_ok(&lab, &["apply"]);
    let pins = lab::bpf_dir(lab.prefix()).join("br-cage");
    let mut maps = cage_agent::ebpf::Maps::open(&pins).expect("maps");
    maps.set_isolated(false).expect("flag");
    assert_eq!(
        internet_answers(&lab),
        (false, false),
        "nftables alone did not isolate"
    );

    cage_ok(&lab, &["release"]);
    assert_open(&lab, "after release");
}
