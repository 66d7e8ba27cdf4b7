//! The web page's real backend (`cage_agent::web`): settings go through `config::edit`
//! with the validator's messages and leave the file byte for byte as it was when refused;
//! the password is set and read back; flows and hosts come from a real flow log; and the
//! page is served over TCP by the same loop `cage run` uses. The kill switch through the
//! page is proven with packets in the lab (`tests/tests/web.rs`).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cage_agent::config;
use cage_agent::flows::{FlowLog, FlowRecord};
use cage_agent::web::AgentBackend;
use cage_web::client;
use cage_web::{Backend, BackendError, FlowFilter, Settings};

/// A fresh directory under the system's temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("cage-web-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write_config(dir: &Path, listen: &str) -> PathBuf {
    let path = dir.join("cage");
    std::fs::write(
        &path,
        format!(
            "# Cage, for the web page's tests\n\
             config cage 'main'\n\
             \toption state_dir '{d}/state'\n\
             \toption log_dir '{d}/log'\n\
             \toption web_listen '{listen}'\n\
             \n\
             config segment 'ai'\n\
             \t# the segment\n\
             \toption address '192.168.10.1/24'\n\
             \n\
             config lan 'lan'\n\
             \tlist admin_host '192.168.8.10'\n\
             \n\
             config killswitch 'killswitch'\n\
             \toption auto_window '10'\n",
            d = dir.display()
        ),
    )
    .unwrap();
    path
}

fn backend(path: &Path) -> AgentBackend {
    AgentBackend::new(path, config::load(path).unwrap_or_else(|e| panic!("{e}")))
}

#[tokio::test]
async fn a_bad_setting_changes_nothing_and_says_why() {
    let dir = TempDir::new("settings");
    let path = write_config(&dir.0, "127.0.0.1:18080");
    let before = std::fs::read(&path).unwrap();
    let b = backend(&path);
    let good = b.settings().await.unwrap();
    assert_eq!(good.address, "192.168.10.1/24");
    assert_eq!(good.admin_hosts, vec!["192.168.8.10"]);

    let mut bad = good.clone();
    bad.address = "192.168.10.300/24".into();
    bad.auto_window = "7".into();
    let err = b.apply_settings(bad).await.unwrap_err();
    let BackendError::Refused(message) = &err else {
        panic!("refused expected, got {err:?}")
    };
    // The validator's own words: section, option, line, what is accepted.
    assert!(
        message.contains("cage.ai.address (line 9)")
            && message.contains(
                "'192.168.10.300/24' is not an IPv4 address with prefix, e.g. 192.168.10.1/24"
            ),
        "{message}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the file was touched"
    );

    for (field, value, words) in [
        ("auto_window", "0", "cage.killswitch.auto_window"),
        ("admin_hosts", "not-an-address", "cage.lan.admin_host"),
        ("web_hostnames", "evil.example:80", "cage.main.web_hostname"),
        ("address6", "fd00::1", "cage.ai.address6"),
    ] {
        let mut s = good.clone();
        match field {
            "auto_window" => s.auto_window = value.into(),
            "admin_hosts" => s.admin_hosts = vec![value.into()],
            "web_hostnames" => s.web_hostnames = vec![value.into()],
            _ => {
                s.ipv6 = true;
                s.address6 = value.into();
            }
        }
        match b.apply_settings(s).await {
            Err(BackendError::Refused(m)) => assert!(m.contains(words), "{field}: {m}"),
            other => panic!("{field}: {other:?}"),
        }
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "{field}: the file was touched"
        );
    }

    // A good change is written, the comments stay, and the page reads it back.
    let changed = Settings {
        admin_hosts: vec!["192.168.8.10".into(), "192.168.8.11".into()],
        auto_blocked: "20".into(),
        web_hostnames: vec!["cage.lan".into()],
        ..good.clone()
    };
    b.apply_settings(changed).await.unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.contains("# the segment") && text.contains("list admin_host '192.168.8.11'"),
        "{text}"
    );
    let cfg = config::load(&path).unwrap();
    assert_eq!(cfg.killswitch.auto_blocked, 20);
    assert_eq!(cfg.main.web_hostnames, vec!["cage.lan"]);
    assert_eq!(b.access().hostnames, vec!["cage.lan"]);

    // IPv6 off with an address6 kept in the file: the page shows it and keeps it.
    let off = Settings {
        ipv6: false,
        address6: "fd00:cafe:10::1/64".into(),
        ..b.settings().await.unwrap()
    };
    b.apply_settings(off).await.unwrap();
    let s = b.settings().await.unwrap();
    assert!(!s.ipv6);
    assert_eq!(s.address6, "fd00:cafe:10::1/64");
    b.apply_settings(s).await.unwrap();
    assert!(std::fs::read_to_string(&path)
        .unwrap()
        .contains("option address6 'fd00:cafe:10::1/64'"));
}

#[tokio::test]
async fn the_password_hash_is_stored_checked_and_read_back() {
    let dir = TempDir::new("password");
    let path = write_config(&dir.0, "127.0.0.1:18081");
    let b = backend(&path);
    assert_eq!(b.password_hash().await, None);
    assert!(matches!(
        b.set_password_hash("not a hash".into()).await,
        Err(BackendError::Refused(m)) if m.contains("cage.main.password_hash")
    ));
    cage_agent::web::set_password(&path, "short", "short").unwrap_err();
    cage_agent::web::set_password(&path, "long enough", "long enougH").unwrap_err();
    cage_agent::web::set_password(&path, "long enough", "long enough").unwrap();
    let hash = b
        .password_hash()
        .await
        .expect("read back after the file changed");
    assert!(hash.starts_with("$argon2id$"));
    assert!(cage_web::verify_password("long enough", &hash));
    // Never printed with the configuration.
    let json = serde_json::to_string(&config::load(&path).unwrap()).unwrap();
    assert!(!json.contains("argon2"), "{json}");
}

fn record(i: u32, host: [u8; 4], verdict: &str) -> FlowRecord {
    FlowRecord {
        start: format!("2026-11-25T10:{:02}:{:02}.000Z", i / 60 % 60, i % 60),
        end: format!("2026-11-25T10:{:02}:{:02}.500Z", i / 60 % 60, i % 60),
        verdict: verdict.into(),
        rule: (verdict == "blocked").then(|| "deny:lan".into()),
        proto: "tcp".into(),
        host: host.into(),
        host_port: Some(40000 + (i % 20000) as u16),
        mac: Some(format!("02:00:00:00:00:{:02x}", host[3])),
        bridge_port: None,
        peer: [203, 0, 113, 10].into(),
        peer_port: Some(if verdict == "blocked" { 22 } else { 443 }),
        direction: "out".into(),
        packets_out: 10,
        bytes_out: 1000,
        packets_in: 8,
        bytes_in: 4000,
        tag: None,
        tcp_flags: Some("SAF/SAF".into()),
        hostname: Some(format!("agent{}", host[3])),
        name: (verdict == "allowed").then(|| "api.example.com".into()),
    }
}

/// Fill the flow log of the configuration at `path` with `n` records.
pub fn fill_log(path: &Path, n: u32) {
    let cfg = config::load(path).unwrap();
    let mut log = FlowLog::open(&cfg).unwrap();
    let records: Vec<FlowRecord> = (0..n)
        .map(|i| {
            let host = [192, 168, 10, 10 + (i % 3) as u8];
            record(i, host, if i % 10 == 0 { "blocked" } else { "allowed" })
        })
        .collect();
    log.write(&records).unwrap();
}

#[tokio::test]
async fn flows_and_hosts_come_from_the_flow_log() {
    let dir = TempDir::new("flows");
    let path = write_config(&dir.0, "127.0.0.1:18082");
    fill_log(&path, 300);
    let b = backend(&path);
    let all = b.flows(FlowFilter::default(), 0).await.unwrap();
    assert_eq!(all.len(), 300);
    let newest = b.flows(FlowFilter::default(), 50).await.unwrap();
    assert_eq!(newest.as_slice(), &all[250..]);
    let blocked = b
        .flows(
            FlowFilter {
                verdict: Some("blocked".into()),
                port: Some(22),
                ..FlowFilter::default()
            },
            0,
        )
        .await
        .unwrap();
    assert_eq!(blocked.len(), 30);
    // Grouped by machine with what the agent knows of the segment: the router's
    // configured address is the router's, never a host's.
    let seg = b.segment().await;
    assert!(
        seg.router.contains(&"192.168.10.1".parse().unwrap()),
        "{seg:?}"
    );
    assert!(seg.subnets.contains(&("192.168.10.0".parse().unwrap(), 24)));
    let hosts = cage_web::machines::group(&all, &seg);
    assert_eq!(hosts.machines.len(), 3);
    let h10 = hosts.find("02:00:00:00:00:0a").unwrap();
    assert_eq!(
        h10.addresses,
        vec!["192.168.10.10".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(h10.flows, 100);
    assert_eq!(h10.bytes_up, 100 * 1000);
    assert_eq!(h10.bytes_down, 100 * 4000);
    assert_eq!(h10.blocked, 10 * (10 + 8), "packets of its blocked flows");
    assert_eq!(h10.hostname.as_deref(), Some("agent10"));
    assert!(h10.spoofed.is_empty());
}

/// One HTTP/1.1 request over a fresh connection.
fn http(addr: SocketAddr, request: &str) -> client::Answer {
    client::exchange(
        addr,
        request,
        Duration::from_secs(2),
        Duration::from_secs(10),
    )
    .unwrap()
}

#[test]
fn the_page_is_served_on_web_listen_by_the_daemons_loop() {
    let dir = TempDir::new("serve");
    // A free port on loopback, for the configuration.
    let listen = client::free_loopback();
    let path = write_config(&dir.0, &listen.to_string());
    cage_agent::web::set_password(&path, "long enough", "long enough").unwrap();
    fill_log(&path, 20);
    // Someone else holds the port at first: the page waits and binds once it is free.
    let squatter = TcpListener::bind(listen).unwrap();
    let b = Arc::new(backend(&path));
    std::thread::spawn(move || {
        cage_agent::web::runtime()
            .unwrap()
            .block_on(cage_agent::web::serve_forever(b))
    });
    std::thread::sleep(Duration::from_millis(500));
    drop(squatter);
    let until = Instant::now() + Duration::from_secs(15);
    let host = format!("Host: {listen}\r\nConnection: close\r\n");
    loop {
        let status = match TcpStream::connect_timeout(&listen, Duration::from_secs(1)) {
            Ok(_) => http(listen, &format!("GET /login HTTP/1.1\r\n{host}\r\n")).status,
            Err(_) => 0,
        };
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < until,
            "the page never answered on {listen}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let login = http(listen, &client::login_request(listen, "long enough"));
    assert_eq!(login.status, 200, "{}{}", login.head, login.body);
    let cookie = login.session_cookie().unwrap();
    let flows = http(
        listen,
        &format!("GET /api/flows?limit=5 HTTP/1.1\r\n{host}Cookie: {cookie}\r\n\r\n"),
    );
    assert_eq!(flows.status, 200);
    let flows: Vec<cage_web::FlowRecord> = serde_json::from_str(&flows.body).unwrap();
    assert_eq!(flows.len(), 5);
    // A name the page does not know is refused (DNS rebinding).
    let refused = http(
        listen,
        "GET /login HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(refused.status, 421);

    // Over HTTPS with Cage's own certificate, made at first start in the state
    // directory; the answers came with it.
    let made = std::fs::read(dir.0.join("state/web-cert.pem")).expect("the certificate");
    let chain = cage_web::tls::parse_chain(&made).unwrap();
    assert_eq!(
        login.cert.as_deref(),
        Some(cage_web::tls::fingerprint(&chain[0]).as_str())
    );
    // Plain HTTP on the same port: a redirect to HTTPS, and nothing else.
    let plain = client::exchange_plain(
        listen,
        &client::login_request(listen, "long enough"),
        Duration::from_secs(2),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(plain.status, 308, "{}", plain.head);
    assert!(
        plain
            .head
            .contains(&format!("location: https://{listen}/api/login")),
        "{}",
        plain.head
    );
    assert_eq!(plain.session_cookie(), None, "{}", plain.head);
}
