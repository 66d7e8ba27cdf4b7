//! The `cage` binary against the real kernel, each test in a throwaway network namespace:
//! bad configurations change nothing, reloads keep the running policy on error, the
//! policy outlives the daemon, and only `cage disable` removes it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use cage_agent::probe::NetNsGuard;

const CAGE: &str = env!("CARGO_BIN_EXE_cage");

/// A network namespace standing in for a router: a WAN veth with an address and a default
/// route, and two segment ports. Removed on drop, with everything in it.
struct Router {
    ns: String,
    dir: PathBuf,
    /// Removes the namespace after `Router::drop` has removed the directory.
    _netns: NetNsGuard,
}

fn sh(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(st.success(), "{args:?} failed");
}

impl Router {
    fn new(tag: &str) -> Router {
        assert!(
            unsafe { geteuid() } == 0,
            "these tests need root: they build network namespaces and nftables tables"
        );
        let ns = format!("cgt-cli-{tag}-{}", std::process::id());
        let _netns = NetNsGuard::named(ns.as_str()).unwrap_or_else(|e| panic!("{e}"));
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(&ns);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let r = Router { ns, dir, _netns };
        for (a, b) in [("wan", "wanpeer"), ("cage1", "host1"), ("cage2", "host2")] {
            sh(&[
                "ip", "-n", &r.ns, "link", "add", a, "type", "veth", "peer", "name", b,
            ]);
            sh(&["ip", "-n", &r.ns, "link", "set", b, "up"]);
        }
        sh(&["ip", "-n", &r.ns, "link", "set", "wan", "up"]);
        sh(&[
            "ip",
            "-n",
            &r.ns,
            "addr",
            "add",
            "10.99.0.2/24",
            "dev",
            "wan",
        ]);
        sh(&[
            "ip",
            "-n",
            &r.ns,
            "route",
            "add",
            "default",
            "via",
            "10.99.0.1",
        ]);
        r
    }

    fn config(&self, name: &str, extra_lan: &str) -> PathBuf {
        let text = format!(
            "config cage 'main'\n\toption state_dir '{d}/state'\n\toption log_dir '{d}/log'\n\n\
             config segment 'ai'\n\toption address '192.168.10.1/24'\n\toption ipv6 '1'\n\
             \toption address6 'fd00:cafe:10::1/64'\n\tlist port 'cage1'\n\tlist port 'cage2'\n\n\
             config lan 'lan'\n\tlist device 'br-lan'\n{extra_lan}\n\
             config wan 'wan'\n\tlist device 'auto'\n",
            d = self.dir.display()
        );
        let p = self.dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn cage(&self, config: &Path, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns, CAGE, "--config"])
            .arg(config)
            .args(args)
            .output()
            .unwrap()
    }

    /// `cage apply` of the plain configuration (`good.conf`), which must succeed: its
    /// output.
    fn apply_plain(&self) -> Output {
        let good = self.config("good.conf", "");
        let out = self.cage(&good, &["apply"]);
        assert!(out.status.success(), "apply failed: {}", stderr(&out));
        out
    }

    fn spawn_run(&self, config: &Path) -> Daemon {
        let log = std::fs::File::create(self.dir.join("run.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, CAGE, "--config"])
            .arg(config)
            .arg("run")
            .stderr(log)
            .spawn()
            .unwrap();
        Daemon(child)
    }

    /// A router whose `cage run` on the plain configuration (`cage.conf`) has applied its
    /// policy: the router, the configuration's path and the daemon.
    fn running(tag: &str) -> (Router, PathBuf, Daemon) {
        let r = Router::new(tag);
        let path = r.config("cage.conf", "");
        let d = r.spawn_run(&path);
        r.wait_for("the first apply", || r.log().contains("policy applied"));
        (r, path, d)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("run.log")).unwrap_or_default()
    }

    /// The whole ruleset of the namespace, as nft prints it, without what the kernel
    /// learns from traffic on its own: the elements of sets that expire (the layer-2
    /// bindings, the meters), which are state like counters, not policy. Every element
    /// Cage itself writes (deny lists, admin hosts, the kill switch) stays in.
    fn ruleset(&self) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft", "list", "ruleset"])
            .output()
            .unwrap();
        assert!(out.status.success());
        cage_agent::nft::without_learned_elements(&String::from_utf8(out.stdout).unwrap())
    }

    fn wait_for(&self, what: &str, cond: impl Fn() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "timed out waiting for {what}; daemon log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `cage run`, killed on drop if still running.
struct Daemon(Child);

impl Daemon {
    fn signal(&self, sig: i32) {
        // `ip netns exec` execs cage, so the child's pid is cage's.
        assert_eq!(unsafe { kill(self.0.id() as i32, sig) }, 0);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

extern "C" {
    fn geteuid() -> u32;
    fn kill(pid: i32, sig: i32) -> i32;
}
const SIGHUP: i32 = 1;
const SIGKILL: i32 = 9;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn check_prints_a_ruleset_that_nft_accepts() {
    let r = Router::new("check");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../openwrt/files/etc/config/cage");
    let out = r.cage(&example, &["check"]);
    assert!(out.status.success(), "cage check failed: {}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("table inet cage {"), "{text}");
    assert!(text.contains("table bridge cage {"), "{text}");
    // `check` changes nothing.
    assert_eq!(r.ruleset(), "");
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn every_bad_config_is_refused_and_changes_nothing() {
    let r = Router::new("bad");
    r.apply_plain();
    let before = r.ruleset();
    assert!(before.contains("table inet cage"));

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad-configs");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    cases.sort();
    assert!(cases.len() >= 20, "only {} bad configs", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let text = std::fs::read_to_string(case).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect:"))
            .map(str::trim)
            .unwrap_or_else(|| panic!("{}: no '# expect:' line", case.display()));
        for cmd in ["apply", "check"] {
            let out = r.cage(case, &[cmd]);
            let err = stderr(&out);
            if out.status.success() {
                failures.push(format!("{}: cage {cmd} succeeded", case.display()));
            } else if !err.contains(expect) {
                failures.push(format!(
                    "{}: cage {cmd} said {err:?}, expected it to contain {expect:?}",
                    case.display()
                ));
            }
        }
        if r.ruleset() != before {
            failures.push(format!("{}: the ruleset changed", case.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    println!(
        "{} bad configs refused by apply and check, ruleset byte-identical",
        cases.len()
    );
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn apply_twice_changes_nothing() {
    let r = Router::new("twice");
    let first = r.apply_plain();
    assert!(stderr(&first).contains("created bridge br-cage"));
    let before = r.ruleset();
    let err = stderr(&r.apply_plain());
    assert!(
        !err.contains("created") && !err.contains("added") && !err.contains("isolated"),
        "second apply did something: {err}"
    );
    assert_eq!(r.ruleset(), before);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn reload_keeps_the_running_policy_on_a_bad_config_and_takes_a_good_one() {
    let (r, path, d) = Router::running("reload");
    let before = r.ruleset();

    // A bad configuration: refused, the kernel ruleset byte-identical.
    std::fs::write(
        &path,
        std::fs::read_to_string(&path).unwrap() + "\toption masquerade 'perhaps'\n",
    )
    .unwrap();
    d.signal(SIGHUP);
    r.wait_for("the refusal", || {
        r.log().contains("new configuration refused")
    });
    assert!(r.log().contains("cage.wan.masquerade"), "{}", r.log());
    assert_eq!(r.ruleset(), before, "a bad reload changed the ruleset");

    // A good one: applied.
    r.config("cage.conf", "\tlist admin_host '192.168.8.20'\n");
    d.signal(SIGHUP);
    r.wait_for("the new policy", || r.ruleset().contains("192.168.8.20"));
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn the_policy_outlives_the_daemon_and_only_disable_removes_it() {
    let (r, path, d) = Router::running("kill");
    let before = r.ruleset();

    // Removed behind the daemon's back: put back.
    sh(&[
        "ip", "netns", "exec", &r.ns, "nft", "delete", "table", "inet", "cage",
    ]);
    // The daemon re-applies within its watch interval; on a busy machine it may take a
    // moment more before the whole ruleset is back as it was.
    r.wait_for("the ruleset to be restored as it was", || {
        r.ruleset() == before
    });
    assert!(r.log().contains("re-applying"), "{}", r.log());

    // SIGKILL: the kernel keeps the policy.
    d.signal(SIGKILL);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        r.ruleset(),
        before,
        "the policy changed when the daemon died"
    );
    let status = r.cage(&path, &["status"]);
    assert!(status.status.success());
    assert!(String::from_utf8_lossy(&status.stdout).contains("ENFORCING"));

    // `cage disable` is the only way out.
    let out = r.cage(&path, &["disable"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(r.ruleset(), "");
    let status = r.cage(&path, &["status", "--json"]);
    assert_eq!(
        status.status.code(),
        Some(3),
        "status must fail when not enforcing"
    );
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["enforcing"], false);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn disable_stops_a_running_daemon_first() {
    let (r, path, mut d) = Router::running("disable");
    let out = r.cage(&path, &["disable"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let start = Instant::now();
    while d.0.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "daemon still running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The daemon is gone and did not restore anything.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(r.ruleset(), "");
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn the_daemon_puts_back_port_isolation_that_was_switched_off() {
    let (r, _, _d) = Router::running("repair");
    let isolated = || {
        let out = Command::new("ip")
            .args(["-n", &r.ns, "-d", "-j", "link", "show", "cage2"])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0]["linkinfo"]["info_slave_data"]["isolated"] == true
    };
    assert!(isolated());
    sh(&[
        "ip", "netns", "exec", &r.ns, "bridge", "link", "set", "dev", "cage2", "isolated", "off",
    ]);
    assert!(!isolated());
    r.wait_for("isolation to be restored", isolated);
    assert!(
        r.log().contains("segment repaired: isolated port cage2"),
        "{}",
        r.log()
    );
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn a_broken_configuration_at_boot_locks_the_segment_down() {
    let r = Router::new("lockdown");
    // A reboot with a broken file: no Cage policy in the kernel, and cage run cannot use
    // the configuration. The segment's bridge (named in the file) is locked down.
    let path = r.dir.join("cage.conf");
    std::fs::write(
        &path,
        format!(
            "config cage 'main'\n\toption state_dir '{}/state'\n\n\
             config segment 'ai'\n\toption bridge 'br-ai'\n\toption address 'nonsense'\n",
            r.dir.display()
        ),
    )
    .unwrap();
    let mut d = r.spawn_run(&path);
    let status = d.0.wait().unwrap();
    assert!(!status.success(), "cage run must refuse the configuration");
    assert!(r.log().contains("LOCKED DOWN"), "{}", r.log());
    // The refusal is in the audit log the file names, with the validator's error.
    let audit = std::fs::read_to_string(r.dir.join("state/audit.log")).unwrap_or_default();
    assert!(
        audit.contains("\"action\":\"config-refused\"") && audit.contains("cage.ai.address"),
        "{audit}"
    );
    let ruleset = r.ruleset();
    for hook in ["prerouting", "forward", "output"] {
        assert!(ruleset.contains(&format!("hook {hook}")), "{ruleset}");
    }
    assert!(ruleset.contains("iifname \"br-ai\""), "{ruleset}");
    assert!(ruleset.contains("oifname \"br-ai\""), "{ruleset}");
    let out = r.cage(&path, &["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("LOCKED DOWN"));

    // With a policy in the kernel, a broken file changes nothing.
    let before = r.ruleset();
    let mut d = r.spawn_run(&path);
    assert!(!d.0.wait().unwrap().success());
    assert_eq!(r.ruleset(), before);

    // A valid configuration replaces the lockdown with the policy.
    r.apply_plain();
    let ruleset = r.ruleset();
    assert!(!ruleset.contains("deny:lockdown"), "{ruleset}");
    assert!(ruleset.contains("segment_egress"), "{ruleset}");
}
