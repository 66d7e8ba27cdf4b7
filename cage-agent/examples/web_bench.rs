//! The web page's benchmark (run by `cargo xtask bench web`, release build): 10 000 flow
//! records in a fresh log, the real router over the real backend (`cage_agent::web`,
//! the loop `cage run` serves with) on loopback, over HTTPS as it serves (its own
//! certificate, made at start), a login, then at least 200 sequential requests per
//! route, each on a new connection with its own TLS handshake. Prints a Markdown table of latencies
//! and the process's memory before and after (VmRSS, VmHWM); the server and the client
//! share the process, the client's part is a few kilobytes.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cage_agent::config;
use cage_agent::flows::{FlowLog, FlowRecord};
use cage_agent::web::AgentBackend;
use cage_web::client;

const FLOWS: u32 = 10_000;
const REQUESTS: usize = 300;

fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (kb("VmRSS:"), kb("VmHWM:"))
}

fn http(addr: SocketAddr, request: &str) -> (u16, String, usize) {
    let a = client::exchange(
        addr,
        request,
        Duration::from_secs(2),
        Duration::from_secs(30),
    )
    .expect("an HTTP exchange");
    (a.status, a.head, a.body.len())
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let idx = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn main() {
    let dir: PathBuf = std::env::temp_dir().join(format!("cage-web-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let listen = client::free_loopback();
    let path = dir.join("cage");
    std::fs::write(
        &path,
        format!(
            "config cage 'main'\n\toption state_dir '{d}/state'\n\toption log_dir '{d}/log'\n\
             \toption web_listen '{listen}'\n\nconfig flowlog 'flowlog'\n\
             \toption log_max_bytes '67108864'\n",
            d = dir.display()
        ),
    )
    .unwrap();
    cage_agent::web::set_password(&path, "benchmark password", "benchmark password").unwrap();
    let cfg = config::load(&path).unwrap();

    // 10 000 records of 20 caged hosts, one in ten blocked, as the collector writes them,
    // over the last 24 hours (so the dashboard's pictures have them all to draw).
    let day_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(86_400);
    let records: Vec<FlowRecord> = (0..FLOWS)
        .map(|i| {
            let blocked = i % 10 == 0;
            let host = [192, 168, 10, 10 + (i % 20) as u8];
            let at = day_ago + std::time::Duration::from_millis(u64::from(i) * 8_600);
            FlowRecord {
                start: cage_agent::clock::rfc3339(at),
                end: cage_agent::clock::rfc3339(at + std::time::Duration::from_millis(900)),
                verdict: if blocked { "blocked" } else { "allowed" }.into(),
                rule: blocked.then(|| "deny:lan".into()),
                proto: if i % 3 == 0 { "udp" } else { "tcp" }.into(),
                host: host.into(),
                host_port: Some(32768 + (i % 28000) as u16),
                mac: Some(format!("02:00:00:00:00:{:02x}", host[3])),
                bridge_port: None,
                peer: if blocked {
                    [192, 168, 8, 10]
                } else {
                    [203, 0, 113, (i % 200) as u8]
                }
                .into(),
                peer_port: Some(if blocked { 22 } else { 443 }),
                name: (!blocked).then(|| format!("api{}.example.com", i % 50)),
                direction: "out".into(),
                packets_out: 12 + u64::from(i % 100),
                bytes_out: 1500 * u64::from(i % 1000),
                packets_in: 10 + u64::from(i % 90),
                bytes_in: 9000 * u64::from(i % 1000),
                tag: None,
                tcp_flags: (i % 3 != 0).then(|| "SAPF/SAPF".into()),
                hostname: Some(format!("agent-{}", host[3])),
            }
        })
        .collect();
    let mut log = FlowLog::open(&cfg).unwrap();
    log.write(&records).unwrap();
    drop(records);
    let log_bytes = std::fs::metadata(dir.join("log/flows/flows.jsonl"))
        .map(|m| m.len())
        .unwrap_or(0);

    let (rss_before, hwm_before) = memory();
    let backend = Arc::new(AgentBackend::new(&path, cfg));
    std::thread::spawn(move || {
        cage_agent::web::runtime()
            .unwrap()
            .block_on(cage_agent::web::serve_forever(backend))
    });
    let until = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(listen).is_err() {
        assert!(
            Instant::now() < until,
            "the page did not come up on {listen}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let host = format!("Host: {listen}\r\nConnection: close\r\n");
    let login = client::exchange(
        listen,
        &client::login_request(listen, "benchmark password"),
        Duration::from_secs(2),
        Duration::from_secs(30),
    )
    .expect("login");
    assert_eq!(login.status, 200, "login: {}", login.head);
    let cookie = login.session_cookie().expect("a session cookie");

    let routes = [
        ("GET /flows (page, newest 200)", "/flows"),
        ("GET /api/flows (newest 200)", "/api/flows"),
        (
            "GET /api/flows?verdict=blocked&port=22",
            "/api/flows?verdict=blocked&port=22",
        ),
        ("GET /api/flows?limit=0 (all 10 000)", "/api/flows?limit=0"),
        ("GET /api/hosts", "/api/hosts"),
        ("GET /hosts (machines)", "/hosts"),
        ("GET / (dashboard)", "/"),
    ];
    println!(
        "| route | requests | p50 ms | p99 ms | max ms | body bytes |\n| --- | --- | --- | --- | --- | --- |"
    );
    let mut worst_goal = 0.0f64;
    for (name, uri) in routes {
        // One warm-up request (page cache, first allocation of the buffers).
        http(
            listen,
            &format!("GET {uri} HTTP/1.1\r\n{host}Cookie: {cookie}\r\n\r\n"),
        );
        let mut ms = Vec::with_capacity(REQUESTS);
        let mut size = 0;
        for _ in 0..REQUESTS {
            let t = Instant::now();
            let (status, head, len) = http(
                listen,
                &format!("GET {uri} HTTP/1.1\r\n{host}Cookie: {cookie}\r\n\r\n"),
            );
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(status, 200, "{uri}: {head}");
            size = len;
        }
        ms.sort_by(|a, b| a.total_cmp(b));
        if uri == "/flows" || uri == "/api/flows" {
            worst_goal = worst_goal.max(pct(&ms, 99.0));
        }
        println!(
            "| {name} | {REQUESTS} | {:.1} | {:.1} | {:.1} | {size} |",
            pct(&ms, 50.0),
            pct(&ms, 99.0),
            ms[ms.len() - 1]
        );
    }
    let (rss_after, hwm_after) = memory();
    println!();
    println!(
        "Flow log: {FLOWS} records, {log_bytes} bytes. Memory of the process (server and \
         client): VmRSS {rss_before} kB before serving, {rss_after} kB after; peak (VmHWM) \
         {hwm_before} kB before, {hwm_after} kB after."
    );
    println!(
        "Goal p99 < 50 ms for the flows page and API: {} (worst p99 {worst_goal:.1} ms).",
        if worst_goal < 50.0 { "met" } else { "NOT met" }
    );
    let _ = std::fs::remove_dir_all(&dir);
}
