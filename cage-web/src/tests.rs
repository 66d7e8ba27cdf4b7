//! The HTTP layer, request by request through `tower::ServiceExt::oneshot`, over an
//! in-memory backend (the real one is `cage_agent::web`, tested there and in the lab).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use futures::future::BoxFuture;
use futures::FutureExt;
use tower::ServiceExt;

use crate::backend::*;
use crate::machines::Machines;
use crate::{router, AppState};

const HOST: &str = "192.168.8.1:8080";
const PASSWORD: &str = "correct horse";

/// A cheap argon2 hash (64 KiB, one pass), so that tests do not spend seconds hashing.
fn cheap_hash(password: &str) -> String {
    use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
    argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(64, 1, 1, None).unwrap(),
    )
    .hash_password(password.as_bytes(), &SaltString::generate(&mut OsRng))
    .unwrap()
    .to_string()
}

#[derive(Default)]
struct Inner {
    isolated: bool,
    reason: String,
    who: String,
    hash: Option<String>,
    settings: Settings,
    audit: Vec<AuditEntry>,
    allowed: Vec<String>,
    /// The router's wired ports: `ai_port` is one of them or none.
    ai_port: Option<String>,
    /// The last self-test, and how many were run from the page.
    selftest: Option<SelfTest>,
    selftest_runs: u32,
    /// The logins the page reported for the audit log: who, and whether it succeeded.
    logins: Vec<(String, bool)>,
    /// Who may read `/metrics`; off when `None`.
    metrics: Option<MetricsAccess>,
}

/// The agent, in memory.
#[derive(Default)]
struct TestBackend(Mutex<Inner>);

impl TestBackend {
    fn with_password() -> Arc<TestBackend> {
        let b = TestBackend::default();
        b.0.lock().unwrap().hash = Some(cheap_hash(PASSWORD));
        Arc::new(b)
    }
    fn isolated(&self) -> bool {
        self.0.lock().unwrap().isolated
    }
    fn flows() -> Vec<FlowRecord> {
        (0..30u16)
            .map(|i| FlowRecord {
                start: format!("2026-11-25T10:{:02}:00.000Z", i),
                end: format!("2026-11-25T10:{:02}:01.000Z", i),
                verdict: if i % 3 == 0 { "blocked" } else { "allowed" }.into(),
                rule: (i % 3 == 0).then(|| "deny:lan".into()),
                proto: "tcp".into(),
                host: IpAddr::from([192, 168, 10, 10 + (i % 2) as u8]),
                host_port: Some(40000 + i),
                mac: Some("02:00:00:00:00:0a".into()),
                bridge_port: None,
                peer: IpAddr::from([203, 0, 113, 10]),
                peer_port: Some(443),
                direction: "out".into(),
                packets_out: 3,
                bytes_out: 100 * u64::from(i),
                packets_in: 2,
                bytes_in: 50,
                tag: None,
                tcp_flags: None,
                hostname: Some("=evil,\"name\"".into()),
                name: (i % 3 != 0).then(|| format!("<b>api{i}</b>.example.com")),
            })
            .collect()
    }
}

impl Backend for TestBackend {
    fn access(&self) -> Access {
        let host: std::net::SocketAddr = HOST.parse().unwrap();
        Access {
            addresses: vec![host.ip()],
            port: host.port(),
            hostnames: vec!["cage.lan".into()],
        }
    }
    fn status(&self) -> BoxFuture<'_, Status> {
        let i = self.0.lock().unwrap();
        let s = Status {
            state: if i.isolated {
                CageState::Isolated
            } else {
                CageState::Open
            },
            isolated: i.isolated,
            reason: i.reason.clone(),
            since: 1_764_066_660,
            source: Some("web".into()),
            who: i.who.clone(),
            enforcing: true,
            flows: 30,
            blocked: 10,
            lost: 0,
            selftest: i.selftest.clone(),
            problems: vec![],
        };
        async move { s }.boxed()
    }
    fn isolate(&self, reason: String, who: String) -> BoxFuture<'_, Result<(), BackendError>> {
        let mut i = self.0.lock().unwrap();
        i.isolated = true;
        i.audit.push(AuditEntry {
            time: 1,
            action: "isolate".into(),
            source: Source::Web,
            reason: reason.clone(),
            who: who.clone(),
            result: "ok".into(),
            seq: None,
            prev: None,
        });
        i.reason = reason;
        i.who = who;
        async { Ok(()) }.boxed()
    }
    fn release(&self, reason: String, who: String) -> BoxFuture<'_, Result<(), BackendError>> {
        let mut i = self.0.lock().unwrap();
        i.isolated = false;
        i.reason = reason;
        i.who = who;
        async { Ok(()) }.boxed()
    }
    fn flows(
        &self,
        filter: FlowFilter,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<FlowRecord>, BackendError>> {
        let mut v: Vec<FlowRecord> = TestBackend::flows()
            .into_iter()
            .filter(|f| filter.matches(f))
            .collect();
        if limit > 0 && v.len() > limit {
            v.drain(..v.len() - limit);
        }
        async move { Ok(v) }.boxed()
    }
    fn segment(&self) -> BoxFuture<'_, Segment> {
        async {
            Segment {
                router: vec![IpAddr::from([192, 168, 10, 1])],
                subnets: vec![(IpAddr::from([192, 168, 10, 0]), 24)],
                bindings: vec![],
                leases: vec![],
            }
        }
        .boxed()
    }
    fn audit(&self, _n: usize) -> BoxFuture<'_, Vec<AuditEntry>> {
        let a = self.0.lock().unwrap().audit.clone();
        async move { a }.boxed()
    }
    fn audit_login(&self, who: String, ok: bool) -> BoxFuture<'_, ()> {
        self.0.lock().unwrap().logins.push((who, ok));
        async {}.boxed()
    }
    fn alerts(&self) -> BoxFuture<'_, Vec<Alert>> {
        async {
            vec![Alert {
                time: None,
                kind: "lost-records".into(),
                text: "3 <b>records</b> rotated away".into(),
            }]
        }
        .boxed()
    }
    fn settings(&self) -> BoxFuture<'_, Result<Settings, BackendError>> {
        let s = self.0.lock().unwrap().settings.clone();
        async move { Ok(s) }.boxed()
    }
    fn apply_settings(&self, settings: Settings) -> BoxFuture<'_, Result<(), BackendError>> {
        // Stands in for the validator: the real one is tested in cage-agent.
        let r = if settings.address.is_empty() || settings.address.contains('/') {
            self.0.lock().unwrap().settings = settings;
            Ok(())
        } else {
            Err(BackendError::Refused(format!(
                "cage.ai.address (line 7): '{}' is not an IPv4 address with prefix, e.g. 192.168.10.1/24",
                settings.address
            )))
        };
        async move { r }.boxed()
    }
    fn password_hash(&self) -> BoxFuture<'_, Option<String>> {
        let h = self.0.lock().unwrap().hash.clone();
        async move { h }.boxed()
    }
    fn set_password_hash(&self, phc: String) -> BoxFuture<'_, Result<(), BackendError>> {
        self.0.lock().unwrap().hash = Some(phc);
        async { Ok(()) }.boxed()
    }

    fn review(&self) -> BoxFuture<'_, Result<Review, BackendError>> {
        let allowed = self.0.lock().unwrap().allowed.clone();
        let refused = ["<i>exfil</i>.example.net", "pypi.org"]
            .into_iter()
            .filter(|n| !allowed.iter().any(|a| a == n))
            .map(|n| RefusedName {
                name: n.into(),
                count: 3,
                first: "2026-11-25T10:00:00Z".into(),
                last: "2026-11-25T10:05:00Z".into(),
                hosts: vec![IpAddr::from([192, 168, 10, 11])],
            })
            .collect();
        async move {
            Ok(Review {
                egress: "allowlist".into(),
                allowed,
                refused,
            })
        }
        .boxed()
    }

    fn allow_name(
        &self,
        name: String,
        _who: String,
    ) -> BoxFuture<'_, Result<String, BackendError>> {
        // The agent validates names with the configuration's rules; a stand-in here.
        let ok = name.contains('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-.*".contains(c));
        if ok {
            self.0.lock().unwrap().allowed.push(name.to_lowercase());
        }
        async move {
            if ok {
                Ok(name.to_lowercase())
            } else {
                Err(BackendError::Refused(format!(
                    "'{name}' is not a domain name; e.g. api.anthropic.com"
                )))
            }
        }
        .boxed()
    }
    fn ai_port(&self) -> BoxFuture<'_, Result<AiPort, BackendError>> {
        let port = self.0.lock().unwrap().ai_port.clone();
        async move { Ok(test_port(port)) }.boxed()
    }
    fn set_ai_port(
        &self,
        choice: String,
        _who: String,
    ) -> BoxFuture<'_, Result<AiPort, BackendError>> {
        // A two-port router, lan1 and lan2, without Wi-Fi: the agent owns at most one.
        let result = match choice.as_str() {
            "lan1" => Err(BackendError::Refused(
                "lan1 would leave you no way in: lan2 is already the AI port".into(),
            )),
            "lan2" => Ok(Some("lan2".to_owned())),
            "none" => Ok(None),
            other => Err(BackendError::Refused(format!(
                "'{other}' is not a wired port of this router"
            ))),
        };
        if let Ok(p) = &result {
            self.0.lock().unwrap().ai_port.clone_from(p);
        }
        async move { result.map(test_port) }.boxed()
    }
    fn ai_wifi(&self) -> BoxFuture<'_, Result<Vec<AiWifi>, BackendError>> {
        async move { Ok(test_wifi()) }.boxed()
    }
    fn run_selftest(&self, _who: String) -> BoxFuture<'_, Result<SelfTest, BackendError>> {
        let mut i = self.0.lock().unwrap();
        // The second run finds the first one's lock, as the agent's would while it runs.
        let result = if i.selftest_runs >= 1 {
            Err(BackendError::Refused(
                "another cage selftest is running".into(),
            ))
        } else {
            let t = SelfTest {
                finished_at: 1_764_066_700,
                ok: true,
                verdict: "all 42 checks hold".into(),
            };
            i.selftest = Some(t.clone());
            Ok(t)
        };
        i.selftest_runs += 1;
        async move { result }.boxed()
    }
    fn metrics_access(&self) -> Option<MetricsAccess> {
        self.0.lock().unwrap().metrics.clone()
    }
    fn metrics(&self) -> BoxFuture<'_, Result<Metrics, BackendError>> {
        let isolated = self.isolated();
        async move {
            Ok(Metrics {
                state: if isolated {
                    CageState::Isolated
                } else {
                    CageState::Open
                },
                isolated,
                isolation_source: None,
                isolation_since: 0,
                enforcing: true,
                flows: 7,
                blocked: vec![("deny:lan".into(), 3, 180)],
                lost: vec![],
                dns: None,
                hosts: vec![crate::metrics::HostBytes {
                    host: "02:ca:9e:00:00:11".into(),
                    up: 10,
                    down: 20,
                }],
                hosts_other: (0, 0),
                daemon: None,
                selftest: None,
                ebpf_map: None,
            })
        }
        .boxed()
    }
}

/// Two access points on the segment: one with every character the QR format escapes
/// and HTML's too, one switched off.
fn test_wifi() -> Vec<AiWifi> {
    vec![
        AiWifi {
            ssid: "Cage-AI <b>;".into(),
            key: r#"k3y;with,"all":\&<i>"#.into(),
            encryption: "psk2".into(),
            hidden: false,
            enabled: true,
        },
        AiWifi {
            ssid: "Cage-AI-5G".into(),
            key: "offlinekey".into(),
            encryption: "sae".into(),
            hidden: false,
            enabled: false,
        },
    ]
}

fn test_port(ai: Option<String>) -> AiPort {
    AiPort {
        layout: "multi".into(),
        ai_ports: ai.iter().map(|p| (p.clone(), "LAN <2>".into())).collect(),
        lan_ports: ["lan1", "lan2"]
            .into_iter()
            .filter(|p| ai.as_deref() != Some(*p))
            .map(String::from)
            .collect(),
        wifi_lan: vec![],
        wifi_ai: vec!["Cage-AI".into()],
        notes: vec!["the last LAN port is the AI port".into()],
    }
}

fn app(backend: Arc<TestBackend>) -> Router {
    router(AppState::new(backend))
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

impl Answer {
    fn location(&self) -> &str {
        self.headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    /// The pre-session cookie (`cage_pre=…`) a form page sets, and its value: the token
    /// the form sends as `csrf`.
    fn pre_session(&self) -> (String, String) {
        let pre = self.cookie("cage_pre").unwrap();
        let token = pre.split_once('=').unwrap().1.to_owned();
        (pre, token)
    }
    /// The page holds each of `parts` (an element's id or name, as its HTML has it).
    fn assert_holds(&self, parts: &[&str]) {
        for part in parts {
            assert!(self.body.contains(part), "{part}");
        }
    }
    /// `name=value` of a Set-Cookie for `name`.
    fn cookie(&self, name: &str) -> Option<String> {
        self.headers
            .get_all(header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with(&format!("{name}=")))
            .map(|v| v.split(';').next().unwrap_or("").to_owned())
    }
}

async fn send(app: &Router, req: Request<Body>) -> Answer {
    let r = app.clone().oneshot(req).await.unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    let bytes = axum::body::to_bytes(r.into_body(), 1 << 24).await.unwrap();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

fn get(uri: &str) -> axum::http::request::Builder {
    Request::get(uri).header(header::HOST, HOST)
}

fn post(uri: &str) -> axum::http::request::Builder {
    Request::post(uri).header(header::HOST, HOST)
}

fn form(b: axum::http::request::Builder, body: &str) -> Request<Body> {
    b.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

fn json(b: axum::http::request::Builder, body: &str) -> Request<Body> {
    b.header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

/// A GET of `uri` without a session.
fn get_plain(uri: &str) -> Request<Body> {
    get(uri).body(Body::empty()).unwrap()
}

/// A GET of `uri` with the session `cookie`.
fn get_with(uri: &str, cookie: &str) -> Request<Body> {
    get(uri)
        .header(header::COOKIE, cookie)
        .body(Body::empty())
        .unwrap()
}

/// A form POSTed to `uri` with the session `cookie`.
fn form_with(uri: &str, cookie: &str, body: &str) -> Request<Body> {
    form(post(uri).header(header::COOKIE, cookie), body)
}

/// JSON POSTed to the API at `uri` with the session `cookie` and its CSRF token.
fn api_with(uri: &str, cookie: &str, csrf: &str, body: &str) -> Request<Body> {
    json(
        post(uri)
            .header(header::COOKIE, cookie)
            .header("x-csrf-token", csrf),
        body,
    )
}

/// `POST /api/login` with the right password.
fn login_request() -> Request<Body> {
    json(
        post("/api/login"),
        &format!("{{\"password\": \"{PASSWORD}\"}}"),
    )
}

/// Log in through the API: the session cookie (`cage_session=…`) and the CSRF token.
async fn login(app: &Router) -> (String, String) {
    let a = send(app, login_request()).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    (
        a.cookie("cage_session").expect("session cookie"),
        v["csrf"].as_str().unwrap().to_owned(),
    )
}

const PAGES: [&str; 12] = [
    "/",
    "/first-run",
    "/hosts/02:00:00:00:00:0a",
    "/port",
    "/dns",
    "/hosts",
    "/flows",
    "/flows.jsonl",
    "/flows.csv",
    "/alerts",
    "/settings",
    "/flows?host=192.168.10.10",
];
const API_GETS: [&str; 8] = [
    "/api/dns",
    "/api/hosts/02:00:00:00:00:0a",
    "/api/port",
    "/api/state",
    "/api/flows",
    "/api/hosts",
    "/api/audit",
    "/api/alerts",
];
const PAGE_POSTS: [&str; 9] = [
    "/dns/allow",
    "/first-run/port",
    "/first-run/selftest",
    "/port",
    "/isolate",
    "/release",
    "/settings",
    "/settings/password",
    "/logout",
];
const API_POSTS: [&str; 4] = [
    "/api/isolate",
    "/api/release",
    "/api/logout",
    "/api/dns/allow",
];

#[tokio::test]
async fn every_page_and_api_route_needs_a_session() {
    let backend = TestBackend::with_password();
    let app = app(backend.clone());
    for page in PAGES {
        let a = send(&app, get_plain(page)).await;
        assert_eq!(a.status, StatusCode::SEE_OTHER, "GET {page}");
        assert_eq!(a.location(), "/login", "GET {page}");
    }
    for page in PAGE_POSTS {
        let a = send(&app, form(post(page), "csrf=x&reason=r&confirm=yes")).await;
        assert_eq!(a.status, StatusCode::SEE_OTHER, "POST {page}");
        assert_eq!(a.location(), "/login", "POST {page}");
    }
    for api in API_GETS {
        let a = send(&app, get_plain(api)).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "GET {api}");
        assert!(a.body.contains("\"error\""), "GET {api}: {}", a.body);
    }
    for api in API_POSTS {
        let a = send(
            &app,
            json(post(api).header("x-csrf-token", "x"), "{\"reason\": \"r\"}"),
        )
        .await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "POST {api}");
    }
    // A cookie that is no session is no session.
    let a = send(&app, get_with("/api/state", "cage_session=00ff")).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(!backend.isolated(), "nothing was pressed");

    // Without a password, the pages lead to the first-run setup.
    let app = self::app(Arc::new(TestBackend::default()));
    let a = send(&app, get_plain("/")).await;
    assert_eq!((a.status, a.location()), (StatusCode::SEE_OTHER, "/setup"));
}

#[tokio::test]
async fn login_setup_and_assets_need_no_session() {
    let app = app(TestBackend::with_password());
    let a = send(&app, get_plain("/login")).await;
    assert_eq!(a.status, StatusCode::OK);
    a.assert_holds(&[
        "id=login-form",
        "id=password",
        "name=password",
        "id=login-submit",
    ]);
    assert!(a.cookie("cage_pre").is_some());
    let mut total = 0;
    for (asset, kind) in [
        ("/assets/cage.css", "text/css"),
        ("/assets/cage.js", "text/javascript"),
    ] {
        let a = send(&app, get_plain(asset)).await;
        assert_eq!(a.status, StatusCode::OK, "{asset}");
        assert!(a.headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with(kind));
        total += a.body.len();
    }
    assert!(total < 200 * 1024, "assets are {total} bytes");
    // With a password set, setup is gone.
    let a = send(&app, get_plain("/setup")).await;
    assert_eq!((a.status, a.location()), (StatusCode::SEE_OTHER, "/login"));
}

#[tokio::test]
async fn first_run_setup_sets_the_password_once() {
    let backend = Arc::new(TestBackend::default());
    let app = app(backend.clone());
    let page = send(&app, get_plain("/setup")).await;
    assert_eq!(page.status, StatusCode::OK);
    page.assert_holds(&[
        "id=setup-form",
        "id=password",
        "id=confirm",
        "name=confirm",
        "id=setup-submit",
    ]);
    let (pre, token) = page.pre_session();
    // Without the form's token: refused.
    let a = send(
        &app,
        form_with("/setup", &pre, "password=longenough&confirm=longenough"),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    // The form with its token.
    let setup = |fields: &str| form_with("/setup", &pre, &format!("csrf={token}&{fields}"));
    // Too short, and differing: refused with a message.
    let a = send(&app, setup("password=short&confirm=short")).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.body.contains("too short"), "{}", a.body);
    let a = send(&app, setup("password=longenough&confirm=longenougH")).await;
    assert!(a.body.contains("differ"), "{}", a.body);
    assert!(backend.0.lock().unwrap().hash.is_none());
    let a = send(
        &app,
        setup(&format!("password={PASSWORD}&confirm={PASSWORD}")),
    )
    .await;
    // On to the first-run page.
    assert_eq!(
        (a.status, a.location()),
        (StatusCode::SEE_OTHER, "/first-run")
    );
    let session = a.cookie("cage_session").expect("logged in after setup");
    let hash = backend.0.lock().unwrap().hash.clone().unwrap();
    assert!(crate::verify_password(PASSWORD, &hash));
    let a = send(&app, get_with("/", &session)).await;
    assert!(a.body.contains("data-state=\"open\""), "{}", a.body);
    // Once set, a second setup is refused.
    let a = send(&app, setup("password=another1&confirm=another1")).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(
        backend.0.lock().unwrap().hash.as_deref(),
        Some(hash.as_str())
    );
}

#[tokio::test]
async fn every_post_without_a_valid_csrf_token_is_refused() {
    let backend = TestBackend::with_password();
    let app = app(backend.clone());
    let (cookie, csrf) = login(&app).await;
    // The token with its last digit changed (a fixed digit would be the token itself one
    // time in sixteen).
    let last = if csrf.ends_with('0') { '1' } else { '0' };
    let near_miss = format!("{}{last}", &csrf[..63]);
    assert_ne!(near_miss, csrf);
    for page in PAGE_POSTS {
        for body in [
            "reason=r&confirm=yes".to_owned(),
            "csrf=&reason=r&confirm=yes".to_owned(),
            format!("csrf={near_miss}&reason=r&confirm=yes"),
        ] {
            let a = send(&app, form_with(page, &cookie, &body)).await;
            assert_eq!(a.status, StatusCode::FORBIDDEN, "POST {page} {body}");
        }
    }
    for api in API_POSTS {
        for token in [None, Some("wrong")] {
            let mut b = post(api).header(header::COOKIE, &cookie);
            if let Some(t) = token {
                b = b.header("x-csrf-token", t);
            }
            let a = send(&app, json(b, "{}")).await;
            assert_eq!(a.status, StatusCode::FORBIDDEN, "POST {api} {token:?}");
            assert!(a.body.contains("CSRF"), "{}", a.body);
        }
    }
    // The login form without its pre-session token, too.
    let a = send(&app, form(post("/login"), &format!("password={PASSWORD}"))).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(!backend.isolated(), "nothing was pressed");
    // With the token, the same requests work.
    let a = send(
        &app,
        form_with("/isolate", &cookie, &format!("csrf={csrf}&reason=test")),
    )
    .await;
    assert_eq!((a.status, a.location()), (StatusCode::SEE_OTHER, "/"));
    assert!(backend.isolated());
}

#[tokio::test]
async fn a_foreign_host_is_refused() {
    let backend = TestBackend::with_password();
    let app = app(backend.clone());
    let (cookie, csrf) = login(&app).await;
    for host in [
        "evil.example",
        "192.168.8.1:80",
        "evil.example:8080",
        "127.0.0.1:8080",
    ] {
        for req in [
            Request::get("/login")
                .header(header::HOST, host)
                .body(Body::empty())
                .unwrap(),
            Request::get("/api/state")
                .header(header::HOST, host)
                .header(header::COOKIE, &cookie)
                .body(Body::empty())
                .unwrap(),
            Request::post("/api/isolate")
                .header(header::HOST, host)
                .header(header::COOKIE, &cookie)
                .header("x-csrf-token", &csrf)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from("{}"))
                .unwrap(),
        ] {
            let a = send(&app, req).await;
            assert_eq!(a.status, StatusCode::MISDIRECTED_REQUEST, "{host}");
            assert!(a.body.contains("not served under the name"), "{}", a.body);
        }
    }
    let a = send(&app, Request::get("/login").body(Body::empty()).unwrap()).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "no Host");
    for host in ["cage.lan", "cage.lan:8080", "192.168.8.1"] {
        let a = send(
            &app,
            Request::get("/login")
                .header(header::HOST, host)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{host}");
    }
    assert!(!backend.isolated());
}

#[tokio::test]
async fn changes_from_another_site_are_refused() {
    let backend = TestBackend::with_password();
    let app = app(backend.clone());
    let (cookie, csrf) = login(&app).await;
    for (name, value) in [
        ("origin", "http://evil.example"),
        ("origin", "null"),
        ("referer", "http://evil.example/page"),
        ("sec-fetch-site", "cross-site"),
    ] {
        let a = send(
            &app,
            form(
                post("/isolate")
                    .header(header::COOKIE, &cookie)
                    .header(name, value),
                &format!("csrf={csrf}"),
            ),
        )
        .await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{name}: {value}");
    }
    assert!(!backend.isolated());
    // A form of a page under Referrer-Policy no-referrer, vouched for by the browser.
    let a = send(
        &app,
        form(
            post("/isolate")
                .header(header::COOKIE, &cookie)
                .header("origin", "null")
                .header("sec-fetch-site", "same-origin"),
            &format!("csrf={csrf}"),
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert!(backend.isolated());
}

#[tokio::test]
async fn bad_input_gets_a_4xx_with_a_message() {
    let app = app(TestBackend::with_password());
    let (cookie, csrf) = login(&app).await;
    let api = |uri: &str| {
        post(uri)
            .header(header::COOKIE, cookie.clone())
            .header("x-csrf-token", csrf.clone())
    };
    let long = "x".repeat(500);
    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (
            json(api("/api/isolate"), "{"),
            StatusCode::BAD_REQUEST,
            "JSON",
        ),
        (
            json(api("/api/isolate"), "[1]"),
            StatusCode::BAD_REQUEST,
            "JSON",
        ),
        (
            json(api("/api/isolate"), "{\"reason\": 5}"),
            StatusCode::BAD_REQUEST,
            "JSON",
        ),
        (
            json(api("/api/isolate"), "{\"why\": \"x\"}"),
            StatusCode::BAD_REQUEST,
            "unknown field",
        ),
        (
            json(api("/api/isolate"), &format!("{{\"reason\": \"{long}\"}}")),
            StatusCode::BAD_REQUEST,
            "at most 200",
        ),
        (
            json(api("/api/release"), "{\"reason\": \"a\\nb\"}"),
            StatusCode::BAD_REQUEST,
            "control",
        ),
        (
            api("/api/isolate")
                .header(header::CONTENT_TYPE, "text/plain")
                .body(Body::from("reason"))
                .unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "application/json",
        ),
        (
            form(api("/isolate"), &format!("csrf={csrf}&reason={long}")),
            StatusCode::BAD_REQUEST,
            "at most 200",
        ),
        (
            form(api("/settings"), &format!("csrf={csrf}&address=nonsense")),
            StatusCode::UNPROCESSABLE_ENTITY,
            "is not an IPv4 address with prefix",
        ),
        (
            form(api("/settings"), &format!("csrf={csrf}&ipv6=maybe")),
            StatusCode::BAD_REQUEST,
            "checkbox",
        ),
        (
            form(api("/settings"), &format!("csrf={csrf}&auto_window={long}")),
            StatusCode::BAD_REQUEST,
            "at most 200",
        ),
        (
            form(api("/settings/password"), &format!("csrf={csrf}&current=x")),
            StatusCode::BAD_REQUEST,
            "form is not as expected",
        ),
        (
            form(
                api("/settings/password"),
                &format!("csrf={csrf}&current={PASSWORD}&password=short&confirm=short"),
            ),
            StatusCode::BAD_REQUEST,
            "too short",
        ),
        (
            form(
                api("/isolate"),
                &format!("csrf={csrf}&{}", "a=b&".repeat(5000)),
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
            "",
        ),
        (
            json(post("/api/login"), "{\"pass\": 1}"),
            StatusCode::BAD_REQUEST,
            "JSON",
        ),
    ];
    for (req, status, message) in cases {
        let what = format!("{} {}", req.method(), req.uri());
        let a = send(&app, req).await;
        assert_eq!(a.status, status, "{what}: {}", a.body);
        assert!(a.body.contains(message), "{what}: {}", a.body);
    }
    for q in ["host=x", "port=99999", "verdict=maybe", "limit=x", "nope=1"] {
        for path in ["/api/flows", "/flows", "/flows.csv"] {
            let a = send(&app, get_with(&format!("{path}?{q}"), &cookie)).await;
            assert_eq!(a.status, StatusCode::BAD_REQUEST, "{path}?{q}: {}", a.body);
            assert!(a.body.len() > 20, "{path}?{q}: {}", a.body);
        }
    }
    let a = send(&app, get_with("/api/nothing", &cookie)).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn failed_logins_back_off() {
    let backend = TestBackend::with_password();
    let app = app(backend.clone());
    let wrong = || json(post("/api/login"), "{\"password\": \"not it\"}");
    for _ in 0..4 {
        assert_eq!(send(&app, wrong()).await.status, StatusCode::UNAUTHORIZED);
    }
    // Now even the right password waits.
    let a = send(&app, login_request()).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.body);
    assert!(a.headers.contains_key(header::RETRY_AFTER));
    assert!(a.body.contains("try again in"), "{}", a.body);
    // The form says so too.
    let page = send(&app, get_plain("/login")).await;
    let (pre, token) = page.pre_session();
    let a = send(
        &app,
        form_with("/login", &pre, &format!("csrf={token}&password={PASSWORD}")),
    )
    .await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    login(&app).await;
    // The audit log has each failed login that was tried and the one that worked; the
    // attempts the backoff turned away never reached the password (nor the log).
    let logins = backend.0.lock().unwrap().logins.clone();
    let failed = logins.iter().filter(|l| !l.1).count();
    assert_eq!((failed, logins.len()), (4, 5), "{logins:?}");
    assert_eq!(logins.last().map(|l| l.1), Some(true), "{logins:?}");
    assert!(logins.iter().all(|l| l.0.starts_with("web:")), "{logins:?}");
}

#[tokio::test]
async fn the_dashboard_isolates_and_releases_with_a_confirmation() {
    let backend = TestBackend::with_password();
    let app = app(backend.clone());
    let (cookie, csrf) = login(&app).await;
    let a = send(&app, get_with("/", &cookie)).await;
    a.assert_holds(&[
        "id=cage-state data-state=\"open\"",
        "action=\"/isolate\"",
        "id=isolate-reason",
        "id=isolate ",
        "id=nav-dashboard",
        "id=nav-hosts",
        "id=nav-flows",
        "id=nav-alerts",
        "id=nav-settings",
        "id=logout",
    ]);
    // The dashboard's forms, with the session's token.
    let press = |uri: &str, fields: &str| form_with(uri, &cookie, &format!("csrf={csrf}&{fields}"));
    let a = send(&app, press("/isolate", "reason=looks+odd")).await;
    assert_eq!((a.status, a.location()), (StatusCode::SEE_OTHER, "/"));
    assert!(backend.isolated());
    assert_eq!(backend.0.lock().unwrap().reason, "looks odd");
    assert!(backend.0.lock().unwrap().who.starts_with("web:"));
    let a = send(&app, get_with("/", &cookie)).await;
    assert!(a.body.contains("data-state=\"isolated\""));
    assert!(a.body.contains("action=\"/release\""));
    assert!(a.body.contains("id=release "));
    // The release button leads to a confirmation, and nothing is released yet.
    let a = send(&app, press("/release", "reason=ok")).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.body.contains("id=release-confirm"), "{}", a.body);
    assert!(
        a.body.contains("data-state=\"isolated\""),
        "the confirmation step shows the state as it is: {}",
        a.body
    );
    assert!(backend.isolated());
    let a = send(&app, press("/release", "reason=ok&confirm=yes")).await;
    assert_eq!((a.status, a.location()), (StatusCode::SEE_OTHER, "/"));
    assert!(!backend.isolated());
    // The API does the same in one step each.
    let api = |uri: &str| api_with(uri, &cookie, &csrf, "{\"reason\": \"script\"}");
    let a = send(&app, api("/api/isolate")).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.body.contains("\"state\":\"isolated\""), "{}", a.body);
    let a = send(&app, api("/api/release")).await;
    assert!(a.body.contains("\"state\":\"open\""), "{}", a.body);
}

#[tokio::test]
async fn pages_api_and_downloads_answer_with_a_session() {
    let app = app(TestBackend::with_password());
    let (cookie, _) = login(&app).await;
    let read = |uri: &str| get_with(uri, &cookie);
    for page in PAGES {
        let a = send(&app, read(page)).await;
        assert_eq!(a.status, StatusCode::OK, "{page}: {}", a.body);
    }
    // What comes from the log is escaped.
    let a = send(&app, read("/alerts")).await;
    assert!(
        a.body.contains("3 &lt;b&gt;records&lt;/b&gt;"),
        "{}",
        a.body
    );
    let a = send(&app, read("/flows?verdict=blocked&limit=3")).await;
    assert_eq!(a.body.matches("<tr class=blocked>").count(), 3);
    // The name the caged host resolved is shown with the address, escaped.
    let a = send(&app, read("/flows?verdict=allowed&limit=3")).await;
    assert!(
        a.body
            .contains("&lt;b&gt;api29&lt;/b&gt;.example.com <span class=dim>203.0.113.10:443"),
        "{}",
        a.body
    );
    assert!(
        !a.body.contains("<b>api"),
        "a name reached the page unescaped"
    );
    let a = send(&app, read("/api/flows?verdict=blocked&port=443&limit=2")).await;
    let v: Vec<FlowRecord> = serde_json::from_str(&a.body).unwrap();
    assert_eq!(v.len(), 2);
    assert!(v.iter().all(|f| f.verdict == "blocked"));
    // One MAC, two addresses: one machine.
    let a = send(&app, read("/api/hosts")).await;
    let hosts: Machines = serde_json::from_str(&a.body).unwrap();
    assert_eq!(hosts.machines.len(), 1, "{hosts:?}");
    assert_eq!(hosts.machines[0].addresses.len(), 2);
    assert_eq!(hosts.machines[0].flows, 30);
    let a = send(&app, read("/api/hosts/02-00-00-00-00-0A")).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let d: crate::hosts::MachineDetail = serde_json::from_str(&a.body).unwrap();
    assert_eq!(d.machine.mac, "02:00:00:00:00:0a");
    assert_eq!(d.blocked_by_rule, vec![("deny:lan".to_owned(), 10 * 5)]);
    assert_eq!(d.flows.len(), 30);
    let a = send(&app, read("/hosts/02:00:00:00:00:0a")).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.body.contains("id=\"machine-top\""), "{}", a.body);
    let a = send(&app, read("/api/hosts/02:00:00:00:00:0b")).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.body);
    let a = send(&app, read("/api/hosts/not-a-mac")).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    let a = send(&app, read("/flows.csv")).await;
    assert!(a.headers[header::CONTENT_DISPOSITION]
        .to_str()
        .unwrap()
        .contains("cage-flows.csv"));
    assert_eq!(a.body.lines().count(), 31);
    assert!(
        a.body.contains("\"'=evil,\"\"name\"\"\""),
        "formula defused: {}",
        a.body.lines().nth(1).unwrap()
    );
    let a = send(&app, read("/flows.jsonl?host=192.168.10.10")).await;
    assert_eq!(a.body.lines().count(), 15);
    for line in a.body.lines() {
        serde_json::from_str::<FlowRecord>(line).unwrap();
    }
}

#[tokio::test]
async fn security_headers_are_on_every_response() {
    let app = app(TestBackend::with_password());
    let (cookie, _) = login(&app).await;
    for (req, store) in [
        (get_plain("/login"), true),
        (get_with("/", &cookie), true),
        (get_plain("/api/state"), true),
        (get_plain("/nothing"), true),
        (
            Request::get("/")
                .header(header::HOST, "evil.example")
                .body(Body::empty())
                .unwrap(),
            true,
        ),
        (get_plain("/assets/cage.js"), false),
    ] {
        let what = req.uri().to_string();
        let a = send(&app, req).await;
        let h = |n: header::HeaderName| a.headers.get(n).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            h(header::CONTENT_SECURITY_POLICY).as_deref(),
            Some(crate::security::CSP),
            "{what}"
        );
        assert!(crate::security::CSP.contains("frame-ancestors 'none'"));
        assert_eq!(
            h(header::X_CONTENT_TYPE_OPTIONS).as_deref(),
            Some("nosniff"),
            "{what}"
        );
        assert_eq!(
            h(header::REFERRER_POLICY).as_deref(),
            Some(crate::security::REFERRER_POLICY),
            "{what}"
        );
        assert_eq!(
            h(header::X_FRAME_OPTIONS).as_deref(),
            Some("DENY"),
            "{what}"
        );
        assert_eq!(
            h(header::CACHE_CONTROL).as_deref() == Some("no-store"),
            store,
            "{what}"
        );
    }
    // The session cookie's attributes.
    let a = send(&app, login_request()).await;
    let set = a.headers[header::SET_COOKIE].to_str().unwrap().to_owned();
    for attr in [
        "Secure",
        "HttpOnly",
        "SameSite=Strict",
        "Path=/",
        "Max-Age=",
    ] {
        assert!(set.contains(attr), "{set}");
    }
    let token = set.split(';').next().unwrap().split_once('=').unwrap().1;
    assert_eq!(token.len(), 64, "256 bits as hex");
    // No inline script or style anywhere.
    let a = send(&app, get_with("/", &cookie)).await;
    assert!(
        !a.body.contains("<script>") && !a.body.contains("style=") && !a.body.contains("<style")
    );
}

#[tokio::test]
async fn logout_and_a_password_change_end_sessions() {
    let backend = TestBackend::with_password();
    let app = app(backend.clone());
    let (one, csrf_one) = login(&app).await;
    let (two, _) = login(&app).await;
    let state = |c: &str| get_with("/api/state", c);
    // The password form of session one, with its token.
    let change = |current: &str| {
        let fields =
            format!("csrf={csrf_one}&current={current}&password=newpassword&confirm=newpassword");
        form_with("/settings/password", &one, &fields)
    };
    // A wrong current password changes nothing.
    let a = send(&app, change("wrong")).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(a.body.contains("current password is wrong"));
    let a = send(&app, change(PASSWORD)).await;
    assert_eq!(
        (a.status, a.location()),
        (StatusCode::SEE_OTHER, "/settings?saved=password")
    );
    assert!(crate::verify_password(
        "newpassword",
        backend.0.lock().unwrap().hash.as_ref().unwrap()
    ));
    assert_eq!(
        send(&app, state(&two)).await.status,
        StatusCode::UNAUTHORIZED,
        "the other session ended"
    );
    assert_eq!(send(&app, state(&one)).await.status, StatusCode::OK);
    let a = send(
        &app,
        form_with("/logout", &one, &format!("csrf={csrf_one}")),
    )
    .await;
    assert_eq!((a.status, a.location()), (StatusCode::SEE_OTHER, "/login"));
    assert_eq!(
        send(&app, state(&one)).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn settings_are_shown_and_applied() {
    let backend = TestBackend::with_password();
    let app = app(backend.clone());
    let (cookie, csrf) = login(&app).await;
    let a = send(
        &app,
        form_with(
            "/settings",
            &cookie,
            &format!(
                "csrf={csrf}&address=192.168.10.1%2F24&ipv6=1&address6=fd00%3A%3A1%2F64\
                 &admin_hosts=192.168.8.10%0D%0A192.168.8.11&auto_blocked=20&auto_upload_bytes=\
                 &auto_window=10&web_hostnames=cage.lan"
            ),
        ),
    )
    .await;
    assert_eq!(
        (a.status, a.location()),
        (StatusCode::SEE_OTHER, "/settings?saved=settings")
    );
    let s = backend.0.lock().unwrap().settings.clone();
    assert_eq!(s.admin_hosts, vec!["192.168.8.10", "192.168.8.11"]);
    assert!(s.ipv6);
    assert_eq!(s.auto_upload_bytes, "");
    let a = send(&app, get_with("/settings?saved=settings", &cookie)).await;
    assert!(a.body.contains("Saved and applied"));
    assert!(a.body.contains("192.168.8.11"));
    // Refused: the message, the form as sent, nothing changed.
    let a = send(
        &app,
        form_with(
            "/settings",
            &cookie,
            &format!("csrf={csrf}&address=10.0.0.300"),
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(a.body.contains("Nothing was changed") && a.body.contains("10.0.0.300"));
    assert_eq!(backend.0.lock().unwrap().settings, s);
}

#[tokio::test]
async fn connections_are_bounded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = AppState::new(TestBackend::with_password());
    tokio::spawn(crate::serve(vec![listener], state, std::future::pending()));
    let request = format!("GET /login HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
    // Every slot taken by a connection that says nothing.
    let mut idle = Vec::new();
    for _ in 0..crate::listener::MAX_CONNECTIONS {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut waiting = tokio::net::TcpStream::connect(addr).await.unwrap();
    waiting.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64];
    let early = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        waiting.read(&mut buf),
    )
    .await;
    assert!(early.is_err(), "a connection beyond the limit was served");
    // One slot frees up: the waiting connection is served.
    drop(idle.pop());
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), waiting.read(&mut buf))
        .await
        .expect("served once a slot was free")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

mod fuzz {
    //! Whatever comes in a form or a JSON body, on every POST route, with or without a
    //! valid session and token: no panic, and never a 5xx.

    use super::*;
    use proptest::prelude::*;

    const ROUTES: [&str; 13] = [
        "/dns/allow",
        "/api/dns/allow",
        "/isolate",
        "/release",
        "/settings",
        "/settings/password",
        "/logout",
        "/login",
        "/setup",
        "/api/login",
        "/api/isolate",
        "/api/release",
        "/api/logout",
    ];
    const FIELDS: [&str; 17] = [
        "name",
        "csrf",
        "reason",
        "confirm",
        "password",
        "confirm",
        "current",
        "address",
        "ipv6",
        "address6",
        "admin_hosts",
        "auto_blocked",
        "auto_upload_bytes",
        "auto_window",
        "web_hostnames",
        "limit",
        "x",
    ];

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,40}",
            "[0-9./:a-f]{0,30}",
            Just("yes".to_owned()),
            Just("1".to_owned()),
            Just("\u{0}\n\r%ff".to_owned()),
            "x{190,260}",
        ]
    }

    fn form_body() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::collection::vec((prop::sample::select(FIELDS.to_vec()), value()), 0..8)
                .prop_map(|pairs| serde_urlencoded::to_string(pairs).unwrap_or_default()),
            // Raw bytes that may not even be a form.
            ".{0,200}",
            "[%&=a-z0-9+]{0,200}",
        ]
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|n| serde_json::json!(n)),
            value().prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                prop::collection::btree_map(
                    prop::sample::select(vec!["reason", "password", "csrf", "x"])
                        .prop_map(str::to_owned),
                    inner,
                    0..4
                )
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn body() -> impl Strategy<Value = (bool, String)> {
        prop_oneof![
            form_body().prop_map(|b| (false, b)),
            json_value().prop_map(|v| (true, v.to_string())),
            ".{0,100}".prop_map(|b| (true, b)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn post_routes_never_fail_with_a_5xx(
            route in prop::sample::select(ROUTES.to_vec()),
            (is_json, raw) in body(),
            session in any::<bool>(),
            token in prop_oneof![Just(0u8), Just(1), Just(2)],
            with_header in any::<bool>(),
            content_type in prop_oneof![
                Just("application/json"),
                Just("application/x-www-form-urlencoded"),
                Just("text/plain"),
                Just(""),
            ],
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let status = rt.block_on(async {
                let app = app(TestBackend::with_password());
                let (cookie, csrf) = login(&app).await;
                let token = match token { 0 => String::new(), 1 => csrf.clone(), _ => "00".repeat(32) };
                let mut body = raw.clone();
                if !is_json && !token.is_empty() && !with_header {
                    body = format!("csrf={token}&{body}");
                }
                let mut b = post(route);
                if session {
                    b = b.header(header::COOKIE, format!("{cookie}; cage_pre={token}"));
                }
                if with_header {
                    b = b.header("x-csrf-token", token.clone());
                }
                if !content_type.is_empty() {
                    b = b.header(header::CONTENT_TYPE, content_type);
                }
                send(&app, b.body(Body::from(body)).unwrap()).await.status
            });
            prop_assert!(status.as_u16() < 500, "{route}: {status} for {raw:?}");
        }

        #[test]
        fn a_machines_path_never_fails_with_a_5xx(
            api in any::<bool>(),
            mac in "[%:a-fA-F0-9<>./ -]{0,40}",
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let status = rt.block_on(async {
                let app = app(TestBackend::with_password());
                let (cookie, _) = login(&app).await;
                let uri = format!("{}/hosts/{mac}", if api { "/api" } else { "" });
                match Request::get(uri.as_str()).header(header::HOST, HOST).header(header::COOKIE, cookie).body(Body::empty()) {
                    Ok(req) => send(&app, req).await.status,
                    Err(_) => StatusCode::BAD_REQUEST,
                }
            });
            prop_assert!(status.as_u16() < 500, "/hosts/{mac}: {status}");
        }

        #[test]
        fn get_routes_never_fail_with_a_5xx(
            route in prop::sample::select(vec![
                "/", "/flows", "/flows.csv", "/flows.jsonl", "/api/flows", "/hosts",
                "/settings", "/alerts", "/api/state", "/login", "/setup", "/nothing",
            ]),
            query in prop_oneof![
                prop::collection::vec(
                    (prop::sample::select(vec!["host", "port", "verdict", "limit", "saved", "x"]), value()),
                    0..5,
                )
                .prop_map(|pairs| serde_urlencoded::to_string(pairs).unwrap_or_default()),
                "[%&=a-z0-9+:.\\[\\]]{0,100}",
            ],
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let status = rt.block_on(async {
                let app = app(TestBackend::with_password());
                let (cookie, _) = login(&app).await;
                let uri = format!("{route}?{query}");
                match Request::get(uri.as_str()).header(header::HOST, HOST).header(header::COOKIE, cookie).body(Body::empty()) {
                    Ok(req) => send(&app, req).await.status,
                    // Not a URI at all: hyper would have refused it before the router.
                    Err(_) => StatusCode::BAD_REQUEST,
                }
            });
            prop_assert!(status.as_u16() < 500, "{route}?{query}: {status}");
        }
    }
}

#[tokio::test]
async fn refused_names_are_listed_escaped_and_allowed_with_one_action() {
    let app = app(TestBackend::with_password());
    let (cookie, csrf) = login(&app).await;
    let read = |uri: &str| get_with(uri, &cookie);
    let a = send(&app, read("/dns")).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(
        a.body.contains("&lt;i&gt;exfil&lt;/i&gt;.example.net"),
        "{}",
        a.body
    );
    assert!(
        !a.body.contains("<i>exfil"),
        "a refused name reached the page unescaped"
    );
    assert!(a.body.contains("pypi.org"));
    // One action: the row's form.
    let a = send(
        &app,
        form_with("/dns/allow", &cookie, &format!("csrf={csrf}&name=pypi.org")),
    )
    .await;
    assert_eq!(a.status, StatusCode::SEE_OTHER, "{}", a.body);
    assert_eq!(a.location(), "/dns");
    let a = send(&app, read("/api/dns")).await;
    let review: Review = serde_json::from_str(&a.body).unwrap();
    assert_eq!(review.allowed, vec!["pypi.org".to_owned()]);
    assert!(review.refused.iter().all(|r| r.name != "pypi.org"));
    // A name the agent refuses: 422 with its message; an empty one: 400; a good one
    // through the API too.
    for (name, status, says) in [
        (
            "not a name",
            StatusCode::UNPROCESSABLE_ENTITY,
            "is not a domain name",
        ),
        ("  ", StatusCode::BAD_REQUEST, ""),
        ("api.github.com", StatusCode::OK, "api.github.com"),
    ] {
        let body = format!("{{\"name\": \"{name}\"}}");
        let a = send(&app, api_with("/api/dns/allow", &cookie, &csrf, &body)).await;
        assert_eq!(a.status, status, "{}", a.body);
        assert!(a.body.contains(says), "{}", a.body);
    }
}

/// The page listens on every address it was given (the LAN's IPv4 and IPv6 addresses),
/// each answering, and stops on all of them when told to.
#[tokio::test]
async fn every_listen_address_answers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let first = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let second = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addrs = [first.local_addr().unwrap(), second.local_addr().unwrap()];
    let state = AppState::new(TestBackend::with_password());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::serve(vec![first, second], state, async {
        let _ = stopped.await;
    }));
    let request = format!("GET /login HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
    for addr in addrs {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{addr}: {answer}");
    }
    stop.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .expect("the page stops when told to")
        .unwrap()
        .unwrap();
    for addr in addrs {
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "{addr} still accepts after the page stopped"
        );
    }
}

/// The dashboard says where the agent plugs in and the owner's way in, escaped; the
/// port page changes it, and a refusal changes nothing and says why.
#[tokio::test]
async fn the_ai_port_is_shown_and_changed() {
    let backend = TestBackend::with_password();
    backend.0.lock().unwrap().ai_port = Some("lan2".into());
    let app = app(backend.clone());
    let (cookie, csrf) = login(&app).await;
    let page = |uri: &str| get_with(uri, &cookie);
    let a = send(&app, page("/")).await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.body.contains("id=ai-port"), "{}", a.body);
    assert!(
        a.body.contains("LAN &lt;2&gt;") && a.body.contains("lan2"),
        "{}",
        a.body
    );
    assert!(a.body.contains("the LAN port(s) <b>lan1</b>"), "{}", a.body);
    assert!(a.body.contains("Cage-AI"));
    let a = send(&app, page("/port")).await;
    assert!(
        a.body.contains("<option value=\"lan2\" selected>"),
        "{}",
        a.body
    );

    let choose =
        |choice: &str| form_with("/port", &cookie, &format!("csrf={csrf}&choice={choice}"));
    let a = send(&app, choose("lan1")).await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(a.body.contains("no way in"), "{}", a.body);
    assert_eq!(backend.0.lock().unwrap().ai_port.as_deref(), Some("lan2"));
    for bad in ["", "eth1%3B%20reboot", "a%20b", &"x".repeat(40)] {
        let a = send(&app, choose(bad)).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{bad}: {}", a.body);
    }
    assert_eq!(backend.0.lock().unwrap().ai_port.as_deref(), Some("lan2"));
    let a = send(&app, choose("none")).await;
    assert_eq!(
        (a.status, a.location()),
        (StatusCode::SEE_OTHER, "/port?saved=1")
    );
    assert_eq!(backend.0.lock().unwrap().ai_port, None);
    let a = send(&app, page("/port?saved=1")).await;
    assert!(a.body.contains("id=ai-port-none"), "{}", a.body);
    let a = send(&app, page("/api/port")).await;
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(v["ai_ports"], serde_json::json!([]));
    assert_eq!(v["lan_ports"], serde_json::json!(["lan1", "lan2"]));
}

/// The first-run page, where setup leads: the AI port with its form, the AI Wi-Fi's
/// name and key escaped for HTML, a QR code for the one that is on and none for the one
/// that is off, the line on what the cage enforces, and the self-test button; no-store.
/// Its port form changes the port or shows the refusal on the page, changing nothing;
/// the self-test button runs it once and shows the result, and a second run's refusal.
#[tokio::test]
async fn the_first_run_page_shows_port_wifi_and_runs_the_selftest() {
    let backend = TestBackend::with_password();
    backend.0.lock().unwrap().ai_port = Some("lan2".into());
    let app = app(backend.clone());
    let (cookie, csrf) = login(&app).await;
    let a = send(&app, get_with("/first-run", &cookie)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(
        a.headers[header::CACHE_CONTROL].to_str().unwrap(),
        "no-store",
        "the page with the key must not be cached"
    );
    a.assert_holds(&[
        "id=enforces-line",
        "reaches the internet and nothing else",
        "<code class=ai-port-device>lan2</code>",
        "<form method=post action=\"/first-run/port\"",
        "<option value=\"lan2\" selected>",
        "<b class=wifi-ssid>Cage-AI &lt;b&gt;;</b>",
        "<code class=wifi-key>k3y;with,&quot;all&quot;:\\&amp;&lt;i&gt;</code>",
        "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"wifi-qr-0\"",
        "<b class=wifi-ssid>Cage-AI-5G</b>",
        "<code class=wifi-key>offlinekey</code>",
        "id=selftest-run",
        "No self-test has run yet.",
    ]);
    assert!(
        !a.body.contains("wifi-qr-1"),
        "a QR code for a Wi-Fi that is off"
    );
    // The form and the key are here: no links away to them.
    assert!(!a.body.contains("id=ai-port-change") && !a.body.contains("class=wifi-join"));
    assert!(
        !a.body.contains("<i>"),
        "the key reached the page unescaped"
    );
    // The key is on the page only: not in the JSON API.
    let api = send(&app, get_with("/api/port", &cookie)).await;
    assert!(!api.body.contains("k3y") && !api.body.contains("offlinekey"));
    // The way back to it, later.
    let a = send(&app, get_with("/port", &cookie)).await;
    assert!(
        a.body.contains("href=\"/first-run\" id=first-run-link"),
        "{}",
        a.body
    );

    // A refused port: the page again, with the reason, and nothing changed.
    let choose = |choice: &str| {
        form_with(
            "/first-run/port",
            &cookie,
            &format!("csrf={csrf}&choice={choice}"),
        )
    };
    let a = send(&app, choose("lan1")).await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    a.assert_holds(&[
        "id=fr-error",
        "The AI port was not changed: lan1 would leave you no way in",
        "id=\"wifi-qr-0\"",
    ]);
    assert_eq!(backend.0.lock().unwrap().ai_port.as_deref(), Some("lan2"));
    let a = send(&app, choose("eth1%3B%20reboot")).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.body.contains("id=fr-error"), "{}", a.body);
    assert_eq!(backend.0.lock().unwrap().ai_port.as_deref(), Some("lan2"));
    // An accepted one.
    let a = send(&app, choose("none")).await;
    assert_eq!(
        (a.status, a.location()),
        (StatusCode::SEE_OTHER, "/first-run?port=saved")
    );
    assert_eq!(backend.0.lock().unwrap().ai_port, None);
    let a = send(&app, get_with("/first-run?port=saved", &cookie)).await;
    a.assert_holds(&["id=fr-message", "id=ai-port-none"]);

    // The self-test, from the button.
    let run = || form_with("/first-run/selftest", &cookie, &format!("csrf={csrf}"));
    let a = send(&app, run()).await;
    assert_eq!(
        (a.status, a.location()),
        (StatusCode::SEE_OTHER, "/first-run?selftest=ran")
    );
    let a = send(&app, get_with("/first-run?selftest=ran", &cookie)).await;
    a.assert_holds(&[
        "data-ok=\"true\"",
        "Self-test passed at 2025-11-25 10:31:40 UTC: all 42 checks hold",
    ]);
    let a = send(&app, run()).await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        a.body
            .contains("The self-test did not run: another cage selftest is running"),
        "{}",
        a.body
    );
}

#[tokio::test]
async fn metrics_need_the_token_or_an_allowed_address_never_a_session() {
    const TOKEN: &str = "0123456789abcdef-token";
    let backend = TestBackend::with_password();
    let app = app(backend.clone());
    // Off: not there, whatever the request sends.
    let a = send(
        &app,
        get("/metrics")
            .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.body);

    backend.0.lock().unwrap().metrics = Some(MetricsAccess {
        token: Some(TOKEN.into()),
        allow: vec![("10.0.0.0".parse().unwrap(), 8)],
    });
    let with = |auth: Option<&str>, peer: Option<&str>| {
        let mut b = get("/metrics");
        if let Some(auth) = auth {
            b = b.header(header::AUTHORIZATION, auth);
        }
        let mut req = b.body(Body::empty()).unwrap();
        if let Some(peer) = peer {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(crate::listener::Peer(
                    peer.parse().unwrap(),
                    Default::default(),
                )));
        }
        req
    };
    let a = send(&app, with(None, None)).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        a.headers.get(header::WWW_AUTHENTICATE).unwrap(),
        "Bearer realm=\"cage metrics\""
    );
    assert!(!a.body.contains("cage_flows_total"));
    // A session is not a way in: a scraper has none, and the page's cookie must not
    // become one.
    let (cookie, _) = login(&app).await;
    let a = send(&app, get_with("/metrics", &cookie)).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.body);
    for wrong in [
        format!("Basic {TOKEN}"),
        format!("Bearer {TOKEN}x"),
        "Bearer 0123456789abcdef-toke".to_owned(),
    ] {
        let a = send(&app, with(Some(&wrong), Some("192.168.8.50:40000"))).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{wrong}");
    }
    let bearer = format!("Bearer {TOKEN}");
    let a = send(&app, with(Some(&bearer), Some("192.168.8.50:40000"))).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(
        a.headers.get(header::CONTENT_TYPE).unwrap(),
        crate::metrics::CONTENT_TYPE
    );
    assert!(a.body.contains("cage_flows_total 7\n"), "{}", a.body);
    assert!(a
        .body
        .contains("cage_blocked_packets_total{rule=\"deny:lan\"} 3\n"));
    // The security headers are there too.
    assert!(a.headers.contains_key(header::CONTENT_SECURITY_POLICY));
    // From an allowed network, no token is needed (IPv4-mapped as well).
    for peer in ["10.9.8.7:5000", "[::ffff:10.1.1.1]:5000"] {
        let a = send(&app, with(None, Some(peer))).await;
        assert_eq!(a.status, StatusCode::OK, "{peer}");
    }
    // Wrong tokens from one address: after the free ones, it waits (429), the right
    // token included; another address is not held up by it.
    for _ in 0..4 {
        let a = send(
            &app,
            with(Some("Bearer nope-nope-nope-nope"), Some("192.168.8.66:1")),
        )
        .await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    }
    let a = send(&app, with(Some(&bearer), Some("192.168.8.66:1"))).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.body);
    assert!(a.headers.contains_key(header::RETRY_AFTER));
    let a = send(&app, with(Some(&bearer), Some("192.168.8.67:1"))).await;
    assert_eq!(a.status, StatusCode::OK);
    // The Host check holds for scrapers too.
    let req = Request::get("/metrics")
        .header(header::HOST, "evil.example")
        .header(header::AUTHORIZATION, &bearer)
        .body(Body::empty())
        .unwrap();
    let a = send(&app, req).await;
    assert_eq!(a.status, StatusCode::MISDIRECTED_REQUEST);
    assert!(!a.body.contains("cage_flows_total"));
}
