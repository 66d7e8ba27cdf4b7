//! The LAN web page, end to end: `cage run` in the lab serves it over HTTPS on the
//! router's LAN address; a real headless Chromium on the LAN host (trusting the page's
//! certificate by its pinned public key, as `cage status` gives it) is redirected from
//! plain HTTP, sets the first password, logs in (the session cookie Secure),
//! presses the big red button, and the caged host loses the internet (packets that do
//! not come back); release with its confirmation, and they come back. The page follows a
//! `cage isolate` from the command line without a reload. From a caged host the UI port
//! does not answer; from the LAN host it does.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cage_agent::probe::{probe_in, NetNs, Probe, Servers, Service};
use cage_tests::browser::{self, Browser, Driver};
use cage_tests::lab::{self, Lab, Node, PUBLIC4, PUBLIC6, ROUTER_LAN4, ROUTER_SEG4};

const UI_PORT: u16 = lab::WEB_PORT;
const PASSWORD: &str = "correct horse battery";

/// Does ai1 reach the internet host (UDP echo and ping)? Each probe has 500 ms.
fn internet_answers(ai1: &NetNs) -> (bool, bool) {
    let t = Duration::from_millis(500);
    let udp = probe_in(ai1, &Probe::udp(PUBLIC4, 53).timeout(t)).expect("probe");
    let icmp = probe_in(ai1, &Probe::icmp(PUBLIC6).timeout(t)).expect("probe");
    (udp.outcome.answered(), icmp.outcome.answered())
}

/// Wait up to `limit` for ai1's reachability to become `want`; the last observation.
fn wait_internet(ai1: &NetNs, want: (bool, bool), limit: Duration) -> (bool, bool) {
    let until = Instant::now() + limit;
    loop {
        let got = internet_answers(ai1);
        if got == want || Instant::now() > until {
            return got;
        }
    }
}

/// A TCP connection from inside `ns` to `addr`, within 2 s.
fn tcp_connects(ns: &NetNs, addr: SocketAddr) -> Result<(), String> {
    browser::in_namespace(ns, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map(drop)
            .map_err(|e| e.to_string())
    })
}

fn screenshot_path() -> PathBuf {
    // target/web-e2e/dashboard.png; docs/dashboard.png in the repository is a copy.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("web-e2e").join("dashboard.png")
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn from_the_lan_a_browser_isolates_and_releases_the_cage() {
    browser::require_chromium();
    let lab = Lab::for_contract("");
    let _servers = Servers::start(
        &lab.netns(Node::Inet),
        &[Service::udp(53)],
        Duration::from_secs(300),
    )
    .expect("servers on the internet host");
    let run = lab.cage_run_ai1_ready();
    let ai1 = lab.netns(Node::Ai1);
    let lan = lab.netns(Node::Lan);
    let ui = SocketAddr::new(ROUTER_LAN4, UI_PORT);

    // The UI answers on the LAN (it may take the daemon a moment to bind).
    let until = Instant::now() + Duration::from_secs(15);
    while let Err(e) = tcp_connects(&lan, ui) {
        assert!(
            Instant::now() < until,
            "the web page does not answer on {ui} from the LAN host: {e}\ncage run:\n{}",
            run.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // From a caged host it does not, on any of the router's addresses.
    for addr in [ROUTER_LAN4, ROUTER_SEG4] {
        let to = SocketAddr::new(addr, UI_PORT);
        assert!(
            tcp_connects(&ai1, to).is_err(),
            "a caged host connected to the web page at {to}"
        );
    }
    assert_eq!(
        wait_internet(&ai1, (true, true), Duration::from_secs(5)),
        (true, true),
        "before anything: the caged host reaches the internet"
    );

    let (_, spki) = cage_tests::http::web_cert(&lab, &run);
    let driver = Driver::start(&lab.ns(Node::Lan), lab.dir());
    let base = format!("https://{ui}");
    let shot = screenshot_path();
    browser::in_namespace(&lan, || {
        let b = Browser::open_trusting(1100, 1000, &spki);

        // First run: no password yet, so the page asks for one; typed as plain HTTP,
        // the address leads to the page over HTTPS.
        b.goto(&format!("http://{ui}/"));
        assert!(
            b.url().starts_with(&format!("{base}/")) && b.url().ends_with("/setup"),
            "first visit to http://{ui}/ should lead to {base}/setup, got {}",
            b.url()
        );
        b.type_into("#password", PASSWORD);
        b.type_into("#confirm", PASSWORD);
        b.click("#setup-submit");
        // Setup leads to the first-run page (tests/tests/web_firstrun.rs); on to the
        // dashboard from there.
        b.find("#to-dashboard");
        b.click("#to-dashboard");
        assert_eq!(
            b.wait_attr("#cage-state", "data-state", "open", Duration::from_secs(10)),
            "open"
        );
        // The setup page is gone once a password is set.
        b.goto(&format!("{base}/setup"));
        assert!(
            !b.has("#setup-submit"),
            "/setup still offers to set a password: {}",
            b.url()
        );

        // Log out, and the dashboard is behind the login again; a wrong password fails.
        b.goto(&format!("{base}/"));
        b.click("#logout");
        b.goto(&format!("{base}/"));
        assert!(b.url().ends_with("/login"), "after logout: {}", b.url());
        b.type_into("#password", "not the password");
        b.click("#login-submit");
        assert!(
            !b.has("#cage-state"),
            "a wrong password opened the dashboard"
        );
        b.goto(&format!("{base}/login"));
        b.type_into("#password", PASSWORD);
        b.click("#login-submit");
        assert_eq!(
            b.wait_attr("#cage-state", "data-state", "open", Duration::from_secs(10)),
            "open"
        );
        let (_, secure) = b
            .cookie("cage_session")
            .expect("the browser holds a session cookie");
        assert!(secure, "the session cookie is not Secure");
        b.screenshot(&shot);

        // The big red button.
        b.type_into("#isolate-reason", "browser test");
        b.click("#isolate");
        assert_eq!(
            b.wait_attr(
                "#cage-state",
                "data-state",
                "isolated",
                Duration::from_secs(10)
            ),
            "isolated"
        );
        assert_eq!(
            internet_answers(&ai1),
            (false, false),
            "isolated from the web page, yet the caged host reaches the internet"
        );

        // Release asks for a confirmation first.
        b.click("#release");
        // The confirmation step's page (the old page's #cage-state can go stale under
        // the check while it loads).
        b.find("#release-confirm");
        assert_eq!(
            b.attr("#cage-state", "data-state").as_deref(),
            Some("isolated"),
            "release acted before it was confirmed"
        );
        assert_eq!(internet_answers(&ai1), (false, false));
        b.click("#release-confirm");
        assert_eq!(
            b.wait_attr("#cage-state", "data-state", "open", Duration::from_secs(10)),
            "open"
        );
        assert_eq!(
            wait_internet(&ai1, (true, true), Duration::from_secs(5)),
            (true, true),
            "released from the web page, but the caged host does not reach the internet"
        );

        // An isolation from elsewhere shows on the open page by itself.
        b.goto(&format!("{base}/"));
        let out = lab.cage(&["isolate", "--reason", "from the shell"]);
        assert!(out.status.success(), "cage isolate: {out:?}");
        assert_eq!(
            b.wait_attr(
                "#cage-state",
                "data-state",
                "isolated",
                Duration::from_secs(15)
            ),
            "isolated",
            "the dashboard did not follow a `cage isolate` without a reload"
        );
        b.click("#release");
        b.click("#release-confirm");
        assert_eq!(
            b.wait_attr("#cage-state", "data-state", "open", Duration::from_secs(10)),
            "open"
        );
        b.close();
    });
    drop(driver);
    assert_eq!(
        wait_internet(&ai1, (true, true), Duration::from_secs(5)),
        (true, true)
    );

    // Every press is in the audit log, with its source and who.
    let status = lab.cage(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status json");
    let audit = v["audit"].to_string();
    assert!(
        audit.contains("browser test") && audit.contains("web"),
        "the web page's isolate is not in the audit log: {audit}"
    );
    assert!(shot.exists(), "no screenshot at {}", shot.display());
    println!("dashboard screenshot: {}", shot.display());
}
