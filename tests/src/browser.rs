//! A real headless Chromium inside one of the lab's namespaces, driven over WebDriver
//! (Debian's `chromium` and `chromium-driver`, which `cargo xtask setup` installs).
//!
//! ChromeDriver runs in the namespace (`ip netns exec`), so the browser's packets leave
//! from that host — the LAN host, as a phone on the router's LAN would. The WebDriver
//! client talks to ChromeDriver on the namespace's own loopback, from a thread that has
//! entered the namespace and runs a tokio runtime of its own: every socket that thread
//! makes belongs to the namespace.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cage_agent::probe::NetNs;
use fantoccini::{elements::Element, Client, ClientBuilder, Locator};
use serde_json::json;

/// Where ChromeDriver listens, on the namespace's loopback.
const DRIVER_PORT: u16 = 9515;

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Panic loudly, naming the fix, when Chromium or ChromeDriver is missing: the browser
/// test cannot run and must not pass quietly.
pub fn require_chromium() {
    for p in [CHROMIUM, CHROMEDRIVER] {
        assert!(
            Path::new(p).exists(),
            "{p} is missing: the browser test needs Debian's chromium and chromium-driver \
             (`cargo xtask setup` installs them)"
        );
    }
}

/// ChromeDriver in a namespace; killed when dropped.
pub struct Driver {
    child: Child,
    log: PathBuf,
}

impl Driver {
    /// Start ChromeDriver in `ns` (an `ip netns` name), its log in `dir`.
    pub fn start(ns: &str, dir: &Path) -> Driver {
        require_chromium();
        let log = dir.join("chromedriver.log");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, CHROMEDRIVER])
            .arg(format!("--port={DRIVER_PORT}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting chromedriver in {ns}: {e}"));
        Driver { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A browser session, for use on a thread that has entered the driver's namespace.
pub struct Browser {
    pub rt: tokio::runtime::Runtime,
    pub client: Client,
    profile: PathBuf,
}

impl Browser {
    /// Connect to the driver (waiting up to 20 s for it to listen) and open a headless
    /// Chromium with a phone-sized window. Call on a thread inside the driver's namespace.
    /// It trusts no self-signed certificate: the page needs [`Browser::open_trusting`].
    pub fn open(width: u32, height: u32) -> Browser {
        Browser::open_with(width, height, None)
    }

    /// As [`Browser::open`], trusting the certificate whose public key's SHA-256 (base64,
    /// `cage status --json`'s `web_cert.spki_sha256`) is `spki`: Chromium pins it
    /// (`--ignore-certificate-errors-spki-list`) and checks every other certificate as
    /// always.
    pub fn open_trusting(width: u32, height: u32, spki: &str) -> Browser {
        Browser::open_with(width, height, Some(spki))
    }

    fn open_with(width: u32, height: u32, spki: Option<&str>) -> Browser {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, DRIVER_PORT));
        let until = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < until,
                "chromedriver did not listen on {addr} within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = std::env::temp_dir().join(format!(
            "cage-chromium-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let mut args = vec![json!(format!("--window-size={width},{height}"))];
        if let Some(spki) = spki {
            args.push(json!(format!(
                "--ignore-certificate-errors-spki-list={spki}"
            )));
        }
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new",
                    // As root in a namespace: Chromium's sandbox needs user namespaces
                    // that a root test process does not get.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        if let Some(list) = caps["goog:chromeOptions"]["args"].as_array_mut() {
            list.extend(args);
        }
        let client = rt
            .block_on(
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(caps)
                    .connect(&format!("http://{addr}")),
            )
            .unwrap_or_else(|e| panic!("opening a Chromium session: {e}"));
        Browser {
            rt,
            client,
            profile,
        }
    }

    pub fn goto(&self, url: &str) {
        self.rt
            .block_on(self.client.goto(url))
            .unwrap_or_else(|e| panic!("loading {url}: {e}"));
    }

    pub fn url(&self) -> String {
        self.rt
            .block_on(self.client.current_url())
            .map(|u| u.to_string())
            .unwrap_or_else(|e| panic!("current url: {e}"))
    }

    /// The element matching `css`, waiting up to 10 s for it to appear.
    pub fn find(&self, css: &str) -> Element {
        self.rt
            .block_on(
                self.client
                    .wait()
                    .at_most(Duration::from_secs(10))
                    .for_element(Locator::Css(css)),
            )
            .unwrap_or_else(|e| {
                let page = self.rt.block_on(self.client.source()).unwrap_or_default();
                panic!(
                    "no element {css} at {}: {e}\npage:\n{}",
                    self.url(),
                    &page[..page.len().min(3000)]
                )
            })
    }

    /// Is there an element matching `css` right now?
    pub fn has(&self, css: &str) -> bool {
        self.rt
            .block_on(self.client.find_all(Locator::Css(css)))
            .map(|v| !v.is_empty())
            .unwrap_or(false)
    }

    pub fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css);
        self.rt
            .block_on(el.send_keys(text))
            .unwrap_or_else(|e| panic!("typing into {css}: {e}"));
    }

    /// Click and wait for the page the click leads to (a form submit).
    pub fn click(&self, css: &str) {
        let el = self.find(css);
        self.rt
            .block_on(el.click())
            .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
    }

    pub fn attr(&self, css: &str, name: &str) -> Option<String> {
        let el = self.find(css);
        self.rt
            .block_on(el.attr(name))
            .unwrap_or_else(|e| panic!("attribute {name} of {css}: {e}"))
    }

    pub fn text(&self, css: &str) -> String {
        let el = self.find(css);
        self.rt
            .block_on(el.text())
            .unwrap_or_else(|e| panic!("text of {css}: {e}"))
    }

    /// Wait up to `limit` for attribute `name` of `css` to read `want`; the last value.
    pub fn wait_attr(&self, css: &str, name: &str, want: &str, limit: Duration) -> String {
        let until = Instant::now() + limit;
        loop {
            // Right after a click that submits a form, the old page is still there: the
            // element can be found on it and then go stale when the new page replaces
            // it. That is "not yet", not a failure; only the deadline is.
            let got = self.rt.block_on(async {
                let el = self.client.find(Locator::Css(css)).await?;
                el.attr(name).await
            });
            match got {
                Ok(v) if v.as_deref() == Some(want) || Instant::now() > until => {
                    return v.unwrap_or_default()
                }
                Err(e) if Instant::now() > until => {
                    panic!("attribute {name} of {css} at {}: {e}", self.url())
                }
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The browser's cookie `name` for the page it shows: (value, whether it is Secure).
    pub fn cookie(&self, name: &str) -> Option<(String, bool)> {
        let c = self.rt.block_on(self.client.get_named_cookie(name)).ok()?;
        Some((c.value().to_owned(), c.secure().unwrap_or(false)))
    }

    /// A PNG of the page as it is shown.
    pub fn screenshot(&self, path: &Path) {
        let png = self
            .rt
            .block_on(self.client.screenshot())
            .unwrap_or_else(|e| panic!("screenshot: {e}"));
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::write(path, png).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }

    pub fn close(self) {
        let _ = self.rt.block_on(self.client.close());
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Run `f` on a thread inside `ns`, where a [`Browser`] can reach the [`Driver`]. The
/// thread is scoped: `f` may borrow (the lab, paths) from the caller.
pub fn in_namespace<T: Send>(ns: &NetNs, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            ns.enter_this_thread()
                .unwrap_or_else(|e| panic!("entering {}: {e}", ns.name()));
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}
