//! Machines, not addresses, and pictures, in a real Chromium at a phone's viewport
//! (390×844): `cage run` in the lab, ai1 sending real traffic over IPv4 and IPv6 to the
//! internet host, spoofed packets from addresses outside the segment, ARP claiming ai2's
//! address and ai2's MAC; the router pinging into the segment. Then the Hosts page must show ai1 as ONE machine with both
//! its addresses and its spoofing attempts, none of the router's addresses as a host,
//! and the dashboard's charts must carry the bytes the test sent — with the big red
//! button, the state and the charts inside the phone's width (no horizontal scrolling),
//! after a restart of `cage run` (the history is the flow log's).
//! Screenshots: `target/web-e2e/phone-*.png` (copies in `docs/`).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cage_agent::probe::{probe_in, NetNs, Probe, Servers, Service};
use cage_tests::browser::{self, Browser, Driver};
use cage_tests::lab::{
    self, Lab, Node, AI1_4, AI1_6, AI1_MAC, AI1_SPOOF4, AI1_SPOOF6, AI2_4, AI2_MAC, PUBLIC4,
    PUBLIC6, ROUTER_LAN4, ROUTER_SEG4, ROUTER_SEG6,
};
use serde_json::{json, Value};

const PASSWORD: &str = "correct horse battery";
const ECHO: u16 = 7000;
/// What ai1 sends: (source, destination, datagrams, payload bytes).
const SENT: [(IpAddr, IpAddr, u32, usize); 2] =
    [(AI1_4, PUBLIC4, 20, 1000), (AI1_6, PUBLIC6, 10, 1200)];

/// Layer-3 bytes of `n` UDP datagrams of `payload` bytes from `src`.
fn l3_bytes(src: IpAddr, n: u32, payload: usize) -> u64 {
    let header = if src.is_ipv4() { 20 + 8 } else { 40 + 8 };
    u64::from(n) * (payload + header) as u64
}

fn mac(text: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, part) in text.split(':').enumerate() {
        m[i] = u8::from_str_radix(part, 16).expect("a MAC");
    }
    m
}

/// An ARP reply (Ethernet II) from `sha`, broadcast: `spa` is at `sha`.
fn arp_claim(sha: [u8; 6], spa: IpAddr, tpa: IpAddr) -> Vec<u8> {
    let (IpAddr::V4(spa), IpAddr::V4(tpa)) = (spa, tpa) else {
        panic!("ARP is IPv4")
    };
    let mut f = vec![0xff; 6];
    f.extend(sha);
    f.extend(0x0806u16.to_be_bytes());
    f.extend([0, 1, 8, 0, 6, 4, 0, 2]);
    f.extend(sha);
    f.extend(spa.octets());
    f.extend([0; 6]);
    f.extend(tpa.octets());
    f
}

/// `count` datagrams from `from` to the echo server at `to`, each echoed in full.
fn udp_echoes(ns: &NetNs, from: IpAddr, to: IpAddr, count: u32, size: usize) {
    ns.run("udp", move || {
        let s = std::net::UdpSocket::bind((from, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        for i in 0..count {
            s.send_to(&vec![i as u8; size], (to, ECHO)).unwrap();
            let mut b = vec![0u8; 2 * size];
            let (n, _) = s.recv_from(&mut b).unwrap();
            assert_eq!(n, size);
        }
        Ok(())
    })
    .expect("udp echoes");
}

fn shot(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("web-e2e").join(name)
}

fn js(b: &Browser, script: &str) -> Value {
    b.rt.block_on(b.client.execute(script, vec![]))
        .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
}

/// Whether each element is shown and lies within the viewport's width, and whether the
/// page is wider than the viewport (horizontal scrolling).
const LAYOUT: &str = "const w = document.documentElement.clientWidth;
const out = {viewport: w, page: document.documentElement.scrollWidth, inside: {}};
for (const sel of SELECTORS) {
  const e = document.querySelector(sel);
  if (!e) { out.inside[sel] = 'missing'; continue; }
  const r = e.getBoundingClientRect();
  out.inside[sel] = (r.width > 0 && r.height > 0 && r.left >= 0 && r.right <= w + 0.5)
    ? 'ok' : `left ${r.left} right ${r.right} size ${r.width}x${r.height}`;
}
return out;";

fn assert_fits(b: &Browser, selectors: &[&str], what: &str) {
    let script = LAYOUT.replace("SELECTORS", &json!(selectors).to_string());
    let v = js(b, &script);
    assert!(
        v["page"].as_u64() <= v["viewport"].as_u64(),
        "{what}: the page scrolls sideways on a phone: {v}"
    );
    for sel in selectors {
        assert_eq!(
            v["inside"][sel], "ok",
            "{what}: {sel} not within the phone's width: {v}"
        );
    }
}

fn attr_u64(b: &Browser, css: &str, name: &str) -> u64 {
    b.attr(css, name)
        .unwrap_or_else(|| panic!("{css} has no {name}"))
        .parse()
        .unwrap_or_else(|e| panic!("{css} {name}: {e}"))
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn a_phone_sees_machines_not_addresses_and_pictures_of_real_traffic() {
    browser::require_chromium();
    // Flows are written 1 s after their last packet (and within a 5 s flush).
    let lab = Lab::for_contract("\nconfig flowlog 'flowlog'\n\toption idle_timeout '1'\n");
    let _servers = Servers::start(
        &lab.netns(Node::Inet),
        &[Service::udp(ECHO)],
        Duration::from_secs(300),
    )
    .expect("echo server on the internet host");
    let run = lab.cage_run_ai1_ready();
    let ai1 = lab.netns(Node::Ai1);

    // Real traffic over both families, spoofed attempts from outside the segment, and
    // the router's own packets into the segment.
    for (src, dst, n, size) in SENT {
        udp_echoes(&ai1, src, dst, n, size);
    }
    for src in [AI1_SPOOF4, AI1_SPOOF6] {
        let dst = if src.is_ipv4() { PUBLIC4 } else { PUBLIC6 };
        for _ in 0..3 {
            let a = probe_in(
                &ai1,
                &Probe::udp(dst, ECHO)
                    .from(src)
                    .timeout(Duration::from_millis(300)),
            )
            .expect("probe");
            assert!(
                !a.outcome.answered(),
                "a spoofed source from {src} got through"
            );
        }
    }
    // ai2 binds its IPv4 address; then ai1 claims it (address theft) and claims ai2's
    // MAC (MAC theft), three ARP replies each.
    udp_echoes(&lab.netns(Node::Ai2), AI2_4, PUBLIC4, 2, 100);
    let mut frames = Vec::new();
    for _ in 0..3 {
        frames.push(arp_claim(mac(AI1_MAC), AI2_4, ROUTER_SEG4));
        frames.push(arp_claim(mac(AI2_MAC), AI1_4, ROUTER_SEG4));
    }
    cage_tests::frames::send(&ai1, "eth0", frames);
    let router = lab.netns(Node::Router);
    for dst in [AI1_4, AI1_6] {
        let _ = probe_in(
            &router,
            &Probe::icmp(dst).timeout(Duration::from_millis(300)),
        );
    }

    // Everything is in the flow log before the page is looked at.
    let until = Instant::now() + Duration::from_secs(20);
    let records = loop {
        let r = lab.flow_records();
        let has = |host: IpAddr, verdict: &str| {
            r.iter()
                .any(|f| f["host"] == host.to_string() && f["verdict"] == verdict)
        };
        let rule = |rule: &str| r.iter().any(|f| f["rule"] == rule);
        let ready = has(AI1_4, "allowed")
            && has(AI1_6, "allowed")
            && has(AI2_4, "allowed")
            && has(AI1_SPOOF4, "blocked")
            && has(AI1_SPOOF6, "blocked")
            && rule("deny:addr-theft")
            && rule("deny:mac-theft");
        if ready {
            break r;
        }
        assert!(
            Instant::now() < until,
            "the flow log lacks ai1's flows or its spoofed attempts: {r:#?}\ncage run:\n{}",
            run.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let hosts_in_log: BTreeSet<String> = records
        .iter()
        .filter(|f| f["tag"].is_null())
        .map(|f| f["host"].as_str().unwrap_or("").to_owned())
        .collect();
    println!("addresses the flow log names as its host: {hosts_in_log:?}");
    // The records of ai1's own flows name its bridge port.
    let own = records
        .iter()
        .find(|f| f["host"] == AI1_4.to_string() && f["verdict"] == "allowed")
        .unwrap();
    assert_eq!(own["mac"], AI1_MAC, "{own}");
    assert!(own["bridge_port"].is_string(), "no bridge port: {own}");
    let sent_up: u64 = SENT.iter().map(|&(s, _, n, p)| l3_bytes(s, n, p)).sum();

    // The pictures are drawn from the flow log itself: a restarted daemon still has them.
    let status = run.stop();
    assert!(
        status.is_some_and(|s| s.success()),
        "cage run stopped badly: {status:?}"
    );
    let run = lab.cage_run_ready();

    let lan = lab.netns(Node::Lan);
    let ui = SocketAddr::new(ROUTER_LAN4, lab::WEB_PORT);
    let until = Instant::now() + Duration::from_secs(15);
    while browser::in_namespace(&lan, || {
        TcpStream::connect_timeout(&ui, Duration::from_secs(1)).is_err()
    }) {
        assert!(Instant::now() < until, "the page does not answer on {ui}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, spki) = cage_tests::http::web_cert(&lab, &run);
    let driver = Driver::start(&lab.ns(Node::Lan), lab.dir());
    let base = format!("https://{ui}");
    let ai1_id = format!("#machine-{}", AI1_MAC.replace(':', "-"));
    browser::in_namespace(&lan, || {
        let b = Browser::open_trusting(390, 844, &spki);
        b.goto(&format!("{base}/"));
        assert!(b.url().ends_with("/setup"), "first visit: {}", b.url());
        b.type_into("#password", PASSWORD);
        b.type_into("#confirm", PASSWORD);
        b.click("#setup-submit");
        // Setup leads to the first-run page; on to the dashboard from there.
        b.find("#to-dashboard");
        b.click("#to-dashboard");
        b.wait_attr("#cage-state", "data-state", "open", Duration::from_secs(10));

        // The dashboard on a phone: the button, the state and the pictures fit.
        let charts = ["#chart-hour", "#chart-day", "#chart-blocked", "#chart-top"];
        let mut must_fit = vec!["#isolate", "#cage-state"];
        must_fit.extend(charts);
        assert_fits(&b, &must_fit, "dashboard");
        // The pictures carry the traffic the test made: at least what ai1 sent (ND,
        // DHCP and the like may add a little), and the hour and day agree.
        let hour_up = attr_u64(&b, "#chart-hour", "data-up");
        let day_up = attr_u64(&b, "#chart-day", "data-up");
        assert!(
            hour_up >= sent_up,
            "last hour shows {hour_up} bytes up, ai1 sent {sent_up}"
        );
        assert_eq!(hour_up, day_up, "the hour's bytes are the day's");
        assert!(
            attr_u64(&b, "#chart-hour", "data-down") >= sent_up,
            "the echoes came back"
        );
        // Each bar says its figures in its tooltip (an SVG <title>).
        let titles = js(
            &b,
            "return [...document.querySelectorAll('#chart-hour g > title')].map(t => t.textContent);",
        );
        let titles: Vec<&str> = titles
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            !titles.is_empty()
                && titles
                    .iter()
                    .all(|t| t.contains(" up, ") && t.ends_with(" down")),
            "{titles:?}"
        );
        let blocked = attr_u64(&b, "#chart-blocked", "data-total");
        assert!(
            blocked >= 6,
            "six spoofed attempts, the chart shows {blocked}"
        );
        let v4_up = attr_u64(&b, "#chart-top g[data-name=\"203.0.113.10\"]", "data-up");
        assert!(
            v4_up >= l3_bytes(AI1_4, 20, 1000),
            "top destination 203.0.113.10: {v4_up}"
        );
        let spark = format!("#spark-{}", AI1_MAC.replace(':', "-"));
        assert!(
            attr_u64(&b, &spark, "data-up") >= sent_up,
            "ai1's own picture"
        );
        assert_fits(&b, &[spark.as_str()], "dashboard, ai1's picture");
        b.screenshot(&shot("phone-dashboard.png"));
        js(
            &b,
            "document.querySelector('#pictures').scrollIntoView(); return 0;",
        );
        b.screenshot(&shot("phone-charts.png"));
        js(
            &b,
            "document.querySelector('#machine-charts').scrollIntoView(); return 0;",
        );
        b.screenshot(&shot("phone-sparks.png"));

        // The JSON API: ai1 is one machine with both families and its spoofing attempts.
        b.goto(&format!("{base}/api/hosts"));
        let api: Value = serde_json::from_str(&b.text("body")).expect("JSON from /api/hosts");
        let machines = api["machines"].as_array().expect("machines");
        let ai1s: Vec<&Value> = machines.iter().filter(|m| m["mac"] == AI1_MAC).collect();
        assert_eq!(ai1s.len(), 1, "ai1 is one machine: {api:#}");
        let m = ai1s[0];
        let addrs: Vec<&str> = m["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for a in [AI1_4, AI1_6] {
            assert!(
                addrs.contains(&a.to_string().as_str()),
                "{a} not ai1's: {m:#}"
            );
        }
        assert!(m["port"].is_string(), "ai1's port: {m:#}");
        assert!(m["bytes_up"].as_u64().unwrap() >= sent_up, "{m:#}");
        for a in [AI1_SPOOF4, AI1_SPOOF6] {
            let s = m["spoofed"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["address"] == a.to_string())
                .unwrap_or_else(|| panic!("{a} is not among ai1's spoofing attempts: {m:#}"));
            assert!(s["attempts"].as_u64().unwrap() >= 3, "{s}");
        }
        // The address and the MAC it claimed from ai2 are ai1's attempts, and ai2's own.
        let spoofed = m["spoofed"].as_array().unwrap();
        assert!(
            spoofed.iter().any(|s| s["address"] == AI2_4.to_string()
                && s["rule"] == "deny:addr-theft"
                && s["mac"].is_null()),
            "ai1 claiming ai2's address: {m:#}"
        );
        assert!(
            spoofed
                .iter()
                .any(|s| s["mac"] == AI2_MAC && s["rule"] == "deny:mac-theft"),
            "ai1 claiming ai2's MAC, known by the port it came in on: {m:#}"
        );
        let ai2: Vec<&Value> = machines.iter().filter(|m| m["mac"] == AI2_MAC).collect();
        assert_eq!(ai2.len(), 1, "{api:#}");
        assert!(
            ai2[0]["addresses"]
                .as_array()
                .unwrap()
                .contains(&json!(AI2_4.to_string())),
            "{:#}",
            ai2[0]
        );
        assert_eq!(ai2[0]["spoofed"], json!([]), "ai1's attempts are not ai2's");
        let router_link_local: Vec<String> = lab
            .ip(
                Node::Router,
                &["-6", "-br", "addr", "show", "dev", "br-cage"],
            )
            .unwrap_or_default()
            .split_whitespace()
            .filter(|w| w.starts_with("fe80"))
            .map(|w| w.split('/').next().unwrap().to_owned())
            .collect();
        let mut never: Vec<String> = [AI1_SPOOF4, AI1_SPOOF6, ROUTER_SEG4, ROUTER_SEG6]
            .map(|a| a.to_string())
            .to_vec();
        never.extend(router_link_local);
        for m in machines {
            for a in m["addresses"].as_array().unwrap() {
                assert!(
                    !never.iter().any(|n| a == n.as_str()),
                    "{a} is shown as a caged host's address: {m:#}"
                );
            }
        }

        // The Hosts page on the phone: one card for ai1, its spoofing attempts on it.
        b.goto(&format!("{base}/hosts"));
        let cards = js(
            &b,
            &format!(
                "return document.querySelectorAll('article.machine[data-mac=\"{AI1_MAC}\"]').length;"
            ),
        );
        assert_eq!(cards, json!(1), "ai1's cards");
        let card = b.text(&ai1_id);
        for a in [AI1_4, AI1_6, AI1_SPOOF4, AI1_SPOOF6] {
            assert!(
                card.contains(&a.to_string()),
                "{a} not on ai1's card:\n{card}"
            );
        }
        for a in [AI1_SPOOF4, AI1_SPOOF6] {
            assert!(
                b.has(&format!("{ai1_id} li.spoofed[data-address=\"{a}\"]")),
                "{a} is not listed as a spoofing attempt:\n{card}"
            );
        }
        let shown = js(
            &b,
            "return [...document.querySelectorAll('article.machine .address')].map(e => e.textContent);",
        );
        let shown: Vec<&str> = shown
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(shown.contains(&AI1_4.to_string().as_str()), "{shown:?}");
        for n in &never {
            assert!(
                !shown.contains(&n.as_str()),
                "{n} is shown as a host's address: {shown:?}"
            );
        }
        assert_fits(&b, &[ai1_id.as_str()], "hosts");
        b.screenshot(&shot("phone-hosts.png"));

        // ai1's own page: its pictures, top destinations, blocked attempts by rule.
        b.click(&format!("{ai1_id} h2 a"));
        b.find("#machine-hour");
        assert!(attr_u64(&b, "#machine-hour", "data-up") >= sent_up);
        let rules = b.text("#blocked-by-rule");
        assert!(rules.contains("deny:spoofed-source"), "{rules}");
        assert!(b.has("#machine-top g[data-name=\"2001:db8:203::10\"]"));
        assert!(!b.text("#first-seen").is_empty());
        assert_fits(&b, &["#machine-hour", "#machine-top"], "machine page");
        js(
            &b,
            "document.querySelector('#machine-hour').scrollIntoView(); return 0;",
        );
        b.screenshot(&shot("phone-machine.png"));
        b.close();
    });
    drop(driver);
    println!("screenshots in {}", shot("").display());
}
