//! `/metrics` against a real Prometheus (Debian's), in the lab: `cage run` with a
//! metrics token, Prometheus on the LAN host scraping the page's HTTPS listener and
//! trusting Cage's own certificate, real traffic and blocked attempts from a caged host,
//! the kill switch pressed with `cage isolate`; then Prometheus' HTTP API must give the
//! values `cage status --json` gives (the isolation, the blocked packets by rule, the
//! flow records), `up` 1 for the right token and 0 for a wrong one. Besides: no token
//! is a 401 that asks for a bearer token, wrong tokens are slowed down like failed
//! logins, an allowed scraper address needs no token, the caged host reaches /metrics on
//! none of the router's addresses even with the right token, a caged host that forges
//! thousands of MACs gets at most 64 host series (the rest summed in `other`, every
//! byte of the flow log counted once), and with the export off /metrics is a 404.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cage_agent::probe::{probe_in, NetNs, Probe, Servers, Service};
use cage_tests::http::{request, wait_page, web_cert};
use cage_tests::lab::{
    self, Lab, Node, AI1_4, AI1_6, AI1_MAC, LAN_ADMIN4, LAN_HOST4, PUBLIC4, PUBLIC6, ROUTER_LAN4,
    ROUTER_LAN6, ROUTER_SEG4, ROUTER_SEG6,
};
use serde_json::Value;

const TOKEN: &str = "lab-metrics-token-0123456789abcdef";
const WRONG: &str = "lab-metrics-token-0123456789abcdeX";
const ECHO: u16 = 7000;
/// MACs the hostile host makes up.
const FORGED: u32 = 600;

fn export(allow: &str) -> String {
    format!(
        "\nconfig flowlog 'flowlog'\n\toption idle_timeout '1'\n\
         \nconfig export 'export'\n\toption metrics_token '{TOKEN}'\n\
         \tlist metrics_allow '{allow}'\n"
    )
}

/// `GET /metrics` from `ns` with `token` (if any): the answer, or why none came.
fn scrape(
    ns: &NetNs,
    ui: SocketAddr,
    token: Option<&str>,
) -> Result<cage_web::client::Answer, String> {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    request(
        ns,
        ui,
        format!("GET /metrics HTTP/1.1\r\nHost: {ui}\r\n{auth}Connection: close\r\n\r\n"),
    )
}

/// The samples of a scrape: `name{labels}` → value.
fn samples(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("a sample");
            (series.to_owned(), value.parse().expect("an integer value"))
        })
        .collect()
}

/// A series of an instant vector: its labels and value.
type Sample = (BTreeMap<String, String>, f64);

/// Prometheus, run from its Debian package's binary in the LAN host's namespace, killed
/// (and its data removed) when dropped.
struct Prometheus {
    child: Child,
    ns: NetNs,
    api: SocketAddr,
    dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(self.dir.join("tsdb"));
    }
}

impl Prometheus {
    fn start(lab: &Lab, ca: &Path, target: SocketAddr) -> Prometheus {
        let dir = lab.dir().join("prometheus");
        std::fs::create_dir_all(&dir).unwrap();
        let job = |name: &str, token: &str| {
            format!(
                "  - job_name: {name}\n    scheme: https\n    tls_config:\n      ca_file: {ca}\n    \
                 authorization:\n      credentials: {token}\n    static_configs:\n      \
                 - targets: ['{target}']\n",
                ca = ca.display()
            )
        };
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n{}{}",
            job("cage", TOKEN),
            job("cage_wrong_token", WRONG)
        );
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        let api = SocketAddr::from(([127, 0, 0, 1], 19090));
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.ns(Node::Lan), "prometheus"])
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={api}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian's package; cargo xtask setup installs it)");
        Prometheus {
            child,
            ns: lab.netns(Node::Lan),
            api,
            dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// GET `path` of Prometheus' HTTP API: its JSON.
    fn get(&self, path: &str) -> Result<Value, String> {
        let (api, path) = (self.api, path.to_owned());
        cage_tests::browser::in_namespace(&self.ns, move || {
            // HTTP/1.0: the answer comes whole, not in chunks (Go chunks larger ones).
            let req = format!("GET {path} HTTP/1.0\r\nHost: {api}\r\n\r\n");
            let a = cage_web::client::exchange_plain(
                api,
                &req,
                Duration::from_secs(1),
                Duration::from_secs(10),
            )
            .map_err(|e| e.to_string())?;
            serde_json::from_str(&a.body).map_err(|e| format!("{e}: {}", a.body))
        })
    }

    /// The instant vector of `query`: each series' labels and value.
    fn query(&self, query: &str) -> Result<Vec<Sample>, String> {
        let encoded: String = query
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b == b'_' {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let v = self.get(&format!("/api/v1/query?query={encoded}"))?;
        v["data"]["result"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| {
                        let labels = s["metric"]
                            .as_object()
                            .unwrap()
                            .iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                            .collect();
                        let value = s["value"][1].as_str().unwrap().parse().unwrap();
                        (labels, value)
                    })
                    .collect()
            })
            .ok_or_else(|| format!("query {query}: {v}"))
    }

    /// The one value of `query`, if it has exactly one.
    fn value(&self, query: &str) -> Option<f64> {
        match self.query(query).ok()?.as_slice() {
            [(_, v)] => Some(*v),
            _ => None,
        }
    }

    /// Wait (up to `within`) until `check` holds; panic with `what` and the log.
    fn until(&self, within: Duration, what: &str, mut check: impl FnMut() -> Result<(), String>) {
        let end = Instant::now() + within;
        loop {
            match check() {
                Ok(()) => return,
                Err(e) if Instant::now() > end => {
                    panic!("{what}: {e}\nprometheus:\n{}", self.log())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(300)),
            }
        }
    }
}

fn status_json(lab: &Lab) -> Value {
    let out = lab.cage(&["status", "--json"]);
    serde_json::from_slice(&out.stdout).expect("cage status --json")
}

fn mac_bytes(text: &str) -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, part) in text.split(':').enumerate() {
        m[i] = u8::from_str_radix(part, 16).expect("a MAC");
    }
    m
}

/// An Ethernet frame with an IPv4 UDP datagram, as the hostile host forges it.
fn udp_frame(dst_mac: [u8; 6], src_mac: [u8; 6], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let payload = [0x42u8; 32];
    let total = 20 + 8 + payload.len();
    let mut ip = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        1,
        0x40,
        0,
        64,
        17,
        0,
        0,
    ];
    ip.extend(src.octets());
    ip.extend(dst.octets());
    let sum = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut f = dst_mac.to_vec();
    f.extend(src_mac);
    f.extend(0x0800u16.to_be_bytes());
    f.extend(ip);
    f.extend(40000u16.to_be_bytes());
    f.extend(ECHO.to_be_bytes());
    f.extend(((8 + payload.len()) as u16).to_be_bytes());
    f.extend([0, 0]);
    f.extend(payload);
    f
}

/// `count` datagrams from `from` to the echo server at `to`, each echoed.
fn udp_echoes(ns: &NetNs, from: IpAddr, to: IpAddr, count: u32) {
    ns.run("udp", move || {
        let s = std::net::UdpSocket::bind((from, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        for i in 0..count {
            s.send_to(&[i as u8; 500], (to, ECHO)).unwrap();
            let mut b = [0u8; 1000];
            s.recv_from(&mut b).unwrap();
        }
        Ok(())
    })
    .expect("udp echoes");
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn prometheus_scrapes_what_cage_status_says_and_only_the_lan_with_the_token() {
    let lab = Lab::for_contract(&export(&format!("{LAN_ADMIN4}/32")));
    let _servers = Servers::start(
        &lab.netns(Node::Inet),
        &[Service::udp(ECHO)],
        Duration::from_secs(300),
    )
    .expect("echo server on the internet host");
    let run = lab.cage_run_ai1_ready();
    let lan = lab.netns(Node::Lan);
    let ai1 = lab.netns(Node::Ai1);
    let ui = SocketAddr::new(ROUTER_LAN4, lab::WEB_PORT);
    wait_page(&lan, ui, &run);
    web_cert(&lab, &run);

    // No token: 401, asking for a bearer token.
    let none = scrape(&lan, ui, None).expect("an answer");
    assert_eq!(none.status, 401, "{}", none.head);
    assert!(
        none.head
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{}",
        none.head
    );
    assert!(!none.body.contains("cage_isolated"), "{}", none.body);
    // Wrong tokens: 401, and after the free ones the address waits, as after failed
    // logins (429 with Retry-After) — the right token included, while it waits.
    for i in 0..4 {
        let a = scrape(&lan, ui, Some(WRONG)).expect("an answer");
        assert_eq!(a.status, 401, "wrong token {i}: {}", a.head);
        assert!(!a.body.contains("cage_"), "{}", a.body);
    }
    let slowed = scrape(&lan, ui, Some(TOKEN)).expect("an answer");
    assert_eq!(slowed.status, 429, "{}", slowed.head);
    assert!(
        slowed.head.to_ascii_lowercase().contains("retry-after:"),
        "{}",
        slowed.head
    );
    assert!(
        run.log()
            .contains(&format!("metrics: wrong token from {LAN_HOST4}")),
        "{}",
        run.log()
    );
    // From the allowed address (the LAN host's second one), no token is needed: curl,
    // trusting Cage's certificate.
    let cert = lab.dir().join("state").join("web-cert.pem");
    let curl = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns(Node::Lan),
            "curl",
            "-sS",
            "--max-time",
            "10",
        ])
        .args(["--interface", &LAN_ADMIN4.to_string(), "--cacert"])
        .arg(&cert)
        .arg(format!("https://{ui}/metrics"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&curl.stdout);
    assert!(curl.status.success(), "curl: {curl:?}");
    assert!(text.contains("# TYPE cage_isolated gauge"), "{text}");
    // The right token, once the wait is over: the text format.
    std::thread::sleep(Duration::from_millis(1500));
    let good = scrape(&lan, ui, Some(TOKEN)).expect("an answer");
    assert_eq!(good.status, 200, "{}\n{}", good.head, good.body);
    assert!(
        good.head
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        good.head
    );
    let s = samples(&good.body);
    assert_eq!(s.get("cage_enforcing"), Some(&1), "{}", good.body);
    assert_eq!(s.get("cage_daemon_up"), Some(&1), "{}", good.body);
    assert_eq!(
        s.get("cage_monitors{mode=\"listen\"}"),
        Some(&1),
        "{}",
        good.body
    );

    // The caged host reaches /metrics on none of the router's addresses, the right
    // token in hand, neither does a connection open.
    for ip in [ROUTER_SEG4, ROUTER_SEG6, ROUTER_LAN4, ROUTER_LAN6] {
        let addr = SocketAddr::new(ip, lab::WEB_PORT);
        let got = scrape(&ai1, addr, Some(TOKEN));
        assert!(got.is_err(), "the caged host read {addr}/metrics: {got:?}");
        let connected = cage_tests::browser::in_namespace(&ai1, move || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(800)).is_ok()
        });
        assert!(!connected, "the caged host connected to {addr}");
    }

    // First the caged host forges MACs, more than there are places for hosts.
    let router_mac: Value = serde_json::from_str(
        &lab.ip(Node::Router, &["-j", "link", "show", "br-cage"])
            .expect("the bridge's MAC"),
    )
    .unwrap();
    let router_mac = mac_bytes(router_mac[0]["address"].as_str().unwrap());
    let frames = (0..FORGED)
        .map(|i| {
            let mac = [0x02, 0x66, 0, 0, (i >> 8) as u8, i as u8];
            let src = Ipv4Addr::new(192, 168, 10, 30 + (i % 200) as u8);
            let IpAddr::V4(dst) = PUBLIC4 else {
                unreachable!()
            };
            udp_frame(router_mac, mac, src, dst)
        })
        .collect();
    let before = samples(&scrape(&lan, ui, Some(TOKEN)).expect("a scrape").body);
    cage_tests::frames::send(&ai1, "eth0", frames);
    // Their records are written (blocked as a MAC flood, or counted in eBPF).
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let forged: BTreeSet<String> = lab
            .flow_records()
            .iter()
            .filter_map(|r| r["mac"].as_str())
            .filter(|m| m.starts_with("02:66:"))
            .map(str::to_owned)
            .collect();
        if forged.len() > 64 {
            break;
        }
        assert!(
            Instant::now() < until,
            "the flow log has {} forged MACs\ncage run:\n{}",
            forged.len(),
            run.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let ai1_series = format!("cage_host_bytes_total{{host=\"{AI1_MAC}\",direction=\"up\"}}");
    eprintln!(
        "metrics: before the flood ai1 had {} series of its own",
        if before.contains_key(&ai1_series) {
            "a"
        } else {
            "no"
        }
    );
    // Then real traffic and blocked attempts from ai1, whose MAC is bound to its port:
    // it takes a place of its own from a forged one.
    udp_echoes(&ai1, AI1_4, PUBLIC4, 20);
    udp_echoes(&ai1, AI1_6, PUBLIC6, 10);
    for port in [22, 80, 443] {
        let a = probe_in(
            &ai1,
            &Probe::tcp(LAN_HOST4, port).timeout(Duration::from_millis(300)),
        )
        .expect("probe");
        assert!(!a.outcome.answered(), "ai1 reached the LAN at port {port}");
    }

    // The flow log has more than 64 machines now; the scrape has at most 64 of them,
    // the rest in `other`, and every byte of the log once.
    let mut last = String::new();
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let log = lab.flow_records();
        let macs: BTreeSet<&str> = log
            .iter()
            .filter(|r| r["tag"].as_str() != Some("selftest"))
            .filter_map(|r| r["mac"].as_str())
            .collect();
        let log_up: u64 = log
            .iter()
            .filter(|r| r["tag"].as_str() != Some("selftest"))
            .map(|r| r["bytes_out"].as_u64().unwrap())
            .sum();
        let log_down: u64 = log
            .iter()
            .filter(|r| r["tag"].as_str() != Some("selftest"))
            .map(|r| r["bytes_in"].as_u64().unwrap())
            .sum();
        let a = scrape(&lan, ui, Some(TOKEN)).expect("a scrape");
        let s = samples(&a.body);
        let hosts: Vec<(&String, &u64)> = s
            .iter()
            .filter(|(k, _)| k.starts_with("cage_host_bytes_total{"))
            .collect();
        let sum = |dir: &str| -> u64 {
            hosts
                .iter()
                .filter(|(k, _)| k.contains(&format!("direction=\"{dir}\"")))
                .map(|(_, v)| **v)
                .sum()
        };
        let other_up = s
            .get("cage_host_bytes_total{host=\"other\",direction=\"up\"}")
            .copied()
            .unwrap_or(0);
        let ai1_up = s.get(&ai1_series).copied().unwrap_or(0);
        let ai1_bound = log.iter().any(|r| {
            r["mac"].as_str() == Some(AI1_MAC) && r["bridge_port"].as_str() == Some("cage1")
        });
        let state = format!(
            "{} machines in the log, {} host series, up {} / {log_up}, down {} / \
             {log_down}, other up {other_up}, ai1 up {ai1_up}, {} bytes",
            macs.len(),
            hosts.len(),
            sum("up"),
            sum("down"),
            a.body.len()
        );
        assert!(hosts.len() <= 2 * 65, "{state}\n{}", a.body);
        assert!(a.body.len() < 32 * 1024, "{state}");
        if macs.len() > 64
            && hosts.len() == 2 * 65
            && other_up > 0
            && ai1_up >= 30 * 500
            && ai1_bound
            && sum("up") == log_up
            && sum("down") == log_down
        {
            break;
        }
        assert!(
            Instant::now() < until,
            "the per-host bytes never matched the flow log: {state} (last: {last})\n{}\ncage run:\n{}",
            a.body,
            run.log()
        );
        last = state;
        std::thread::sleep(Duration::from_millis(500));
    }

    // The kill switch, from the command line.
    let isolate = lab.cage(&["isolate", "--reason", "metrics test"]);
    assert!(isolate.status.success(), "cage isolate: {isolate:?}");

    // Prometheus on the LAN host, trusting Cage's certificate, with the right token and
    // a wrong one.
    let prom = Prometheus::start(&lab, &cert, ui);
    prom.until(
        Duration::from_secs(30),
        "up for the right token",
        || match (
            prom.value("up{job=\"cage\"}"),
            prom.value("up{job=\"cage_wrong_token\"}"),
        ) {
            (Some(1.0), Some(0.0)) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    // The wrong token's target is down because of a 401.
    let targets = prom.get("/api/v1/targets").expect("targets");
    let wrong = targets["data"]["activeTargets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["labels"]["job"] == "cage_wrong_token")
        .expect("the wrong token's target")
        .clone();
    assert!(
        wrong["lastError"].as_str().unwrap_or("").contains("401"),
        "{wrong:#}"
    );

    // What Prometheus has is what cage status says: the kill switch, the flow records,
    // the blocked packets by rule (read together, until a scrape and a status agree).
    prom.until(
        Duration::from_secs(30),
        "Prometheus and cage status --json agree",
        || {
            let st = status_json(&lab);
            let mut diffs = Vec::new();
            let isolated = st["isolation"]["isolated"].as_bool().unwrap();
            if !isolated {
                return Err("cage status is not isolated".into());
            }
            let want = [
                ("cage_isolated".to_owned(), 1.0),
                ("cage_state{state=\"isolated\"}".to_owned(), 1.0),
                ("cage_isolated{source=\"cli\"}".to_owned(), 1.0),
                (
                    "cage_flows_total".to_owned(),
                    st["flow_log"]["written"].as_f64().unwrap(),
                ),
            ];
            let mut want: Vec<(String, f64)> = want.into_iter().collect();
            let denied = st["denied"].as_object().unwrap();
            for (rule, c) in denied {
                want.push((
                    format!("cage_blocked_packets_total{{job=\"cage\",rule=\"{rule}\"}}"),
                    c["packets"].as_f64().unwrap(),
                ));
            }
            if denied
                .get("deny:lan")
                .is_none_or(|c| c["packets"].as_u64() == Some(0))
            {
                return Err(format!("no deny:lan packets in cage status: {denied:?}"));
            }
            for (q, v) in &want {
                let got = prom.value(q);
                if got != Some(*v) {
                    diffs.push(format!("{q}: prometheus {got:?}, cage status {v}"));
                }
            }
            // Prometheus has no rule cage status lacks.
            let rules = prom.query("cage_blocked_packets_total{job=\"cage\"}")?;
            if rules.len() != denied.len() {
                diffs.push(format!(
                    "{} rules in prometheus, {} in cage status",
                    rules.len(),
                    denied.len()
                ));
            }
            if diffs.is_empty() {
                Ok(())
            } else {
                Err(diffs.join("; "))
            }
        },
    );
    // The host series Prometheus keeps are bounded too.
    let series = prom
        .query("cage_host_bytes_total{job=\"cage\"}")
        .expect("the host series");
    assert!(
        series.len() <= 2 * 65 && series.len() > 2,
        "{} host series",
        series.len()
    );
    // For the record: what a scrape costs.
    eprintln!(
        "metrics: a scrape takes {:?} s and has {:?} samples",
        prom.value("scrape_duration_seconds{job=\"cage\"}"),
        prom.value("scrape_samples_scraped{job=\"cage\"}")
    );
    drop(prom);

    // With the export off, /metrics is not there, the token notwithstanding.
    lab.write_config(&format!(
        "{}\nconfig flowlog 'flowlog'\n\toption idle_timeout '1'\n",
        cage_tests::contract::CONFIG_EXTRA
    ));
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let a = scrape(&lan, ui, Some(TOKEN)).expect("an answer");
        if a.status == 404 {
            assert!(!a.body.contains("cage_"), "{}", a.body);
            break;
        }
        assert!(
            Instant::now() < until,
            "metrics off, still {}: {}",
            a.status,
            a.head
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(run);
}

/// With DNS through Cage in allow-list mode: the queries and the refusals by reason on
/// /metrics are what `cage status --json` counts, after real queries from a caged host.
#[test]
#[ignore = "needs root: cargo xtask test"]
fn dns_queries_and_refusals_on_metrics_are_cage_status() {
    use cage_tests::dns::{resolve, Answer, AuthServer};
    use simple_dns::RCODE;
    let lab = Lab::for_test();
    let mut zone = std::collections::HashMap::new();
    zone.insert("allowed.test".to_owned(), Answer::Addrs(vec![PUBLIC4]));
    zone.insert("other.test".to_owned(), Answer::Addrs(vec![PUBLIC4]));
    let _auth = AuthServer::start(
        &lab.netns(Node::Inet),
        &[SocketAddr::new(PUBLIC4, 53)],
        zone,
        300,
    )
    .expect("the upstream DNS server");
    lab.write_config(&format!(
        "\nconfig dns 'dns'\n\toption egress 'allowlist'\n\tlist allow_domain 'allowed.test'\n\
         \tlist upstream '{PUBLIC4}'\n\nconfig export 'export'\n\toption metrics_token '{TOKEN}'\n"
    ));
    let run = lab.cage_run_ready();
    let lan = lab.netns(Node::Lan);
    let ai1 = lab.netns(Node::Ai1);
    let ui = SocketAddr::new(ROUTER_LAN4, lab::WEB_PORT);
    wait_page(&lan, ui, &run);
    let server = SocketAddr::new(ROUTER_SEG4, 53);
    for (name, n, rcode) in [
        ("allowed.test", 3, RCODE::NoError),
        ("other.test", 2, RCODE::Refused),
    ] {
        for _ in 0..n {
            let r = resolve(&ai1, server, name, false, false, Duration::from_secs(3))
                .unwrap_or_else(|e| panic!("{name}: {e}\ncage run:\n{}", run.log()));
            assert_eq!(r.rcode, rcode, "{name}");
        }
    }
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let st = status_json(&lab);
        let d = &st["dns"];
        let a = scrape(&lan, ui, Some(TOKEN)).expect("a scrape");
        assert_eq!(a.status, 200, "{}", a.head);
        let s = samples(&a.body);
        let pairs = [
            ("cage_dns_queries_total", &d["queries"]),
            ("cage_dns_forwarded_total", &d["forwarded"]),
            (
                "cage_dns_refused_total{reason=\"not_allowed\"}",
                &d["refused_not_allowed"],
            ),
            (
                "cage_dns_refused_total{reason=\"rate\"}",
                &d["refused_rate"],
            ),
            ("cage_dns_refused_total{reason=\"doh\"}", &d["doh_blocked"]),
            (
                "cage_dns_failures_total{cause=\"upstream\"}",
                &d["upstream_failures"],
            ),
        ];
        let same = pairs
            .iter()
            .all(|(k, v)| v.as_u64().is_some() && s.get(*k).copied() == v.as_u64());
        if same && d["queries"].as_u64() >= Some(5) && d["refused_not_allowed"].as_u64() >= Some(2)
        {
            break;
        }
        assert!(
            Instant::now() < until,
            "/metrics and cage status differ on DNS: {d:#}\n{}",
            a.body
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(run);
}
