//! Cage's events reach a real rsyslog (Debian's rsyslogd with its gtls driver) in the
//! lab's LAN host, over UDP, TCP and TLS, with the RFC 5424 fields rsyslog itself parsed
//! (`mmpstrucdata` for the structured data); a collector with a certificate of another CA
//! gets nothing; a stopped collector costs the daemon nothing but counted drops; a flood
//! of blocked attempts stays one message a minute; and the caged segment cannot reach
//! the collector at all.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cage_agent::probe::{probe_in, NetNs, Probe, NETNS_RUN_DIR};
use cage_tests::browser::in_namespace;
use cage_tests::lab::{self, CageRun, Lab, Node, AI1_4, LAN_HOST4, PUBLIC4, ROUTER_LAN4};
use cage_web::client;

const UDP_PORT: u16 = 5514;
const TCP_PORT: u16 = 5514;
const TLS_PORT: u16 = 6514;
const COLLECTOR_NAME: &str = "collector.lab";
const PASSWORD: &str = "correct horse battery";
/// A reason a caged host could have put in a DHCP name or a DNS name: every character
/// RFC 5424 makes special, and a forged message after a newline.
const HOSTILE: &str = "evil\"] [cage@32473 isolated=\"0\"] \\ \n<13>1 - forged";

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    cage_tests::assert_success(&out, what)
}

/// A CA and, signed by it, the collector's certificate for `collector.lab` and the LAN
/// host's address; a second CA that signed nothing of the collector's.
fn make_certs(dir: &Path) {
    let o = |args: &[&str], what: &str| {
        run(Command::new("openssl").args(args).current_dir(dir), what);
    };
    for ca in ["ca", "other-ca"] {
        o(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=Cage test {ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ],
            "openssl: a CA",
        );
    }
    o(
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=collector.lab",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
        "openssl: the collector's request",
    );
    std::fs::write(
        dir.join("san.ext"),
        format!("subjectAltName=DNS:{COLLECTOR_NAME},IP:{LAN_HOST4}\n"),
    )
    .unwrap();
    o(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ],
        "openssl: the collector's certificate",
    );
}

/// rsyslogd in the LAN host's namespace: UDP and TCP on 5514, TLS (gtls) on 6514, every
/// message written as one JSON line of the fields rsyslog parsed.
struct Collector {
    dir: PathBuf,
    ns: String,
    child: Option<Child>,
}

impl Collector {
    fn start(lab: &Lab) -> Collector {
        let dir = lab.dir().join("rsyslog");
        std::fs::create_dir_all(dir.join("work")).unwrap();
        make_certs(&dir);
        let d = dir.display();
        let conf = format!(
            // No reverse DNS of the sender (the lab has no resolver: each lookup would
            // wait for its timeouts).
            r#"global(workDirectory="{d}/work" maxMessageSize="16k" net.enableDNS="off"
       defaultNetstreamDriverCAFile="{d}/ca.pem"
       defaultNetstreamDriverCertFile="{d}/server.pem"
       defaultNetstreamDriverKeyFile="{d}/server.key")
module(load="imudp")
module(load="imtcp" maxSessions="50")
module(load="mmpstrucdata")
input(type="imudp" port="{UDP_PORT}" name="udp" ruleset="cage")
input(type="imtcp" port="{TCP_PORT}" name="tcp" ruleset="cage")
input(type="imtcp" port="{TLS_PORT}" name="tls" ruleset="cage"
      streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon"
      gnutlsPriorityString="NORMAL")
template(name="fields" type="string"
         string="{{\"input\":\"%inputname%\",\"pri\":\"%pri%\",\"version\":\"%protocol-version%\",\"timestamp\":\"%timereported:::date-rfc3339%\",\"hostname\":\"%hostname:::json%\",\"app\":\"%app-name:::json%\",\"procid\":\"%procid:::json%\",\"msgid\":\"%msgid:::json%\",\"msg\":\"%msg:::json%\",\"sd\":%$!rfc5424-sd%}}\n")
ruleset(name="cage") {{
  action(type="mmpstrucdata" sd_name.lowercase="off")
  action(type="omfile" file="{d}/messages.jsonl" template="fields")
}}
"#
        );
        std::fs::write(dir.join("rsyslog.conf"), conf).unwrap();
        let mut c = Collector {
            dir,
            ns: lab.ns(Node::Lan),
            child: None,
        };
        c.restart(lab);
        c
    }

    fn restart(&mut self, lab: &Lab) {
        let d = &self.dir;
        let child = Command::new("nsenter")
            .arg(format!("--net={NETNS_RUN_DIR}/{}", self.ns))
            .arg("rsyslogd")
            .arg("-n")
            .arg("-f")
            .arg(d.join("rsyslog.conf"))
            .arg("-i")
            .arg(d.join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(d.join("rsyslogd.out")).unwrap())
            .stderr(std::fs::File::create(d.join("rsyslogd.err")).unwrap())
            .spawn()
            .expect("rsyslogd");
        self.child = Some(child);
        // Listening once both TCP ports take a connection from the LAN host itself.
        let lan = lab.netns(Node::Lan);
        let until = Instant::now() + Duration::from_secs(15);
        loop {
            let up = in_namespace(&lan, || {
                [TCP_PORT, TLS_PORT].iter().all(|p| {
                    TcpStream::connect_timeout(
                        &SocketAddr::new(LAN_HOST4, *p),
                        Duration::from_millis(300),
                    )
                    .is_ok()
                })
            });
            if up {
                return;
            }
            assert!(
                Instant::now() < until,
                "rsyslogd did not start: {}",
                std::fs::read_to_string(d.join("rsyslogd.err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Every message received so far, as rsyslog parsed it.
    fn messages(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("messages.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// Wait (bounded) for a message that `pick` accepts; panics with what did arrive.
    fn wait_for(
        &self,
        run: &CageRun,
        within: Duration,
        what: &str,
        pick: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let until = Instant::now() + within;
        loop {
            if let Some(m) = self.messages().into_iter().find(|m| pick(m)) {
                return m;
            }
            assert!(
                Instant::now() < until,
                "no {what} at the collector within {within:?}; it has:\n{:#?}\nrsyslogd:\n{}\n\
                 the exporter: {}\ncage run:\n{}",
                self.messages(),
                std::fs::read_to_string(self.dir.join("rsyslogd.err")).unwrap_or_default(),
                std::fs::read_to_string(self.dir.join("../log/syslog.json")).unwrap_or_default(),
                run.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Cage's own SD params of a message.
fn sd(m: &serde_json::Value) -> &serde_json::Value {
    &m["sd"]["cage@32473"]
}

fn reload(lab: &Lab, run: &CageRun, extra: &str) {
    lab.write_config(extra);
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(run.pid() as i32, libc::SIGHUP) };
}

fn export(url: &str, more: &str) -> String {
    format!("\nconfig export 'export'\n\toption syslog '{url}'\n{more}")
}

fn status(lab: &Lab) -> serde_json::Value {
    let out = lab.cage(&["status", "--json"]);
    serde_json::from_slice(&out.stdout).expect("status JSON")
}

fn cage_ok(lab: &Lab, args: &[&str]) {
    let out = lab.cage(args);
    cage_tests::assert_success(&out, format_args!("cage {args:?}"));
}

/// A blocked attempt from ai1: a TCP connection to the LAN host.
fn blocked_attempt(ai1: &NetNs, port: u16) {
    let r = probe_in(
        ai1,
        &Probe::tcp(LAN_HOST4, port).timeout(Duration::from_millis(300)),
    )
    .expect("probe");
    assert!(!r.outcome.answered(), "ai1 reached the LAN host: {r:?}");
}

fn password_config(lab: &Lab, extra: &str) {
    let path = lab.write_config(extra);
    cage_agent::web::set_password(&path, PASSWORD, PASSWORD).expect("cage passwd");
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn events_reach_rsyslog_over_udp_tcp_and_tls_with_their_fields_and_a_wrong_ca_gets_nothing() {
    let lab = Lab::for_test();
    let collector = Collector::start(&lab);
    let tcp = export(&format!("tcp://{LAN_HOST4}:{TCP_PORT}"), "");
    password_config(&lab, &tcp);
    let run = lab.cage_run_ai1_ready();
    let ai1 = lab.netns(Node::Ai1);
    let lan = lab.netns(Node::Lan);
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned();

    // The cage started: CONFIG_APPLIED, with every header field as sent.
    let m = collector.wait_for(&run, Duration::from_secs(10), "CONFIG_APPLIED", |m| {
        m["msgid"] == "CONFIG_APPLIED"
    });
    assert_eq!(m["input"], "tcp");
    assert_eq!(m["version"], "1");
    assert_eq!(m["hostname"], hostname.as_str());
    assert_eq!(m["app"], "cage");
    assert_eq!(m["procid"], run.pid().to_string());
    assert_eq!(m["pri"], "30", "daemon.info");
    assert!(m["sd"]["meta"]["sequenceId"].is_string(), "{m}");

    // The segment cannot reach the collector: no TCP connection, and a datagram in
    // syslog's own format from ai1 never arrives.
    let forged = "<13>1 - caged - - FORGED [x@1 a=\"b\"] from the cage";
    let reached = in_namespace(&ai1, || {
        let tcp = TcpStream::connect_timeout(
            &SocketAddr::new(LAN_HOST4, TCP_PORT),
            Duration::from_millis(800),
        )
        .is_ok();
        let udp = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..5 {
            let _ = udp.send_to(forged.as_bytes(), SocketAddr::new(LAN_HOST4, UDP_PORT));
        }
        tcp
    });
    assert!(!reached, "a caged host connected to the collector");

    // Isolate from the CLI (another process: the audit log carries it), with a reason
    // full of what RFC 5424 makes special.
    cage_ok(&lab, &["isolate", "--reason", HOSTILE]);
    let m = collector.wait_for(&run, Duration::from_secs(10), "ISOLATE", |m| {
        m["msgid"] == "ISOLATE"
    });
    assert_eq!(sd(&m)["action"], "isolate", "{m}");
    assert_eq!(sd(&m)["source"], "cli", "{m}");
    assert_eq!(sd(&m)["result"], "ok", "{m}");
    // The audit log's hash chain reaches the collector with the line.
    assert!(
        sd(&m)["seq"]
            .as_str()
            .is_some_and(|n| n.parse::<u64>().is_ok()),
        "{m}"
    );
    let prev = sd(&m)["prev"].as_str().unwrap_or("");
    assert!(
        prev.len() == 64 && prev.chars().all(|c| c.is_ascii_hexdigit()),
        "{m}"
    );
    // rsyslog unescaped the value to what Cage wrote, the newline replaced.
    assert_eq!(sd(&m)["reason"], HOSTILE.replace('\n', "\u{FFFD}"), "{m}");
    assert_eq!(m["pri"], "28", "daemon.warning: {m}");
    cage_ok(&lab, &["release", "--reason", "done"]);
    let m = collector.wait_for(&run, Duration::from_secs(10), "RELEASE", |m| {
        m["msgid"] == "RELEASE"
    });
    assert_eq!(sd(&m)["reason"], "done");
    assert!(m["msg"].as_str().unwrap().contains("release by cli"), "{m}");

    // The attempt to reach the collector was itself a blocked attempt, reported; the
    // next ones of the same host and rule within the minute are folded into a count.
    let m = collector.wait_for(&run, Duration::from_secs(10), "BLOCKED", |m| {
        m["msgid"] == "BLOCKED" && sd(m)["host"] == AI1_4.to_string()
    });
    assert_eq!(sd(&m)["peer"], LAN_HOST4.to_string(), "{m}");
    assert_eq!(sd(&m)["proto"], "tcp", "{m}");
    assert_eq!(sd(&m)["peer_port"], TCP_PORT.to_string(), "{m}");
    assert_eq!(sd(&m)["mac"], lab::AI1_MAC, "{m}");
    assert_eq!(sd(&m)["rule"], "deny:lan", "{m}");
    assert_eq!(sd(&m)["count"], "1", "{m}");
    let folded = || {
        status(&lab)["syslog"]["blocked_folded"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = folded();
    blocked_attempt(&ai1, 22);
    run.wait_until(Duration::from_secs(10), "the attempt folded", || {
        folded() > before
    });

    // A failed login and a login, from the LAN host.
    let ui = SocketAddr::new(ROUTER_LAN4, lab::WEB_PORT);
    cage_tests::http::wait_page(&lan, ui, &run);
    let a = cage_tests::http::request(&lan, ui, client::login_request(ui, "wrong password"))
        .expect("an answer");
    assert_eq!(a.status, 401, "{a:?}");
    let m = collector.wait_for(&run, Duration::from_secs(10), "LOGIN_FAILED", |m| {
        m["msgid"] == "LOGIN_FAILED"
    });
    assert_eq!(sd(&m)["who"], format!("web:{LAN_HOST4}"), "{m}");
    assert_eq!(m["pri"], "28", "{m}");
    cage_tests::http::login(&lan, ui, PASSWORD, || run.log());
    collector.wait_for(&run, Duration::from_secs(10), "LOGIN", |m| {
        m["msgid"] == "LOGIN" && sd(m)["who"] == format!("web:{LAN_HOST4}")
    });

    // A configuration refused: said with its error, the running exporter goes on.
    reload(
        &lab,
        &run,
        &export(
            &format!("udp://{LAN_HOST4}:{UDP_PORT}"),
            "\toption syslog_queue '8'\n",
        ),
    );
    let m = collector.wait_for(&run, Duration::from_secs(10), "CONFIG_REFUSED", |m| {
        m["msgid"] == "CONFIG_REFUSED"
    });
    assert_eq!(m["input"], "tcp", "{m}");
    assert_eq!(m["pri"], "27", "daemon.err: {m}");
    let error = sd(&m)["result"].as_str().unwrap_or("");
    assert!(error.contains("syslog_queue"), "{m}");

    // UDP, on SIGHUP, without a restart; with the flow records too.
    reload(
        &lab,
        &run,
        &export(
            &format!("udp://{LAN_HOST4}:{UDP_PORT}"),
            "\toption syslog_flows '1'\n",
        ),
    );
    let m = collector.wait_for(&run, Duration::from_secs(15), "an event over UDP", |m| {
        m["input"] == "udp" && m["msgid"] == "CONFIG_APPLIED"
    });
    assert_eq!(m["procid"], run.pid().to_string(), "the same daemon");
    cage_ok(&lab, &["isolate", "--reason", "over udp"]);
    collector.wait_for(&run, Duration::from_secs(10), "ISOLATE over UDP", |m| {
        m["input"] == "udp" && sd(m)["reason"] == "over udp"
    });
    cage_ok(&lab, &["release", "--reason", "flows"]);
    lab.pin_router_neighbours(Node::Ai1).expect("neighbours");
    blocked_attempt(&ai1, 23);
    let m = collector.wait_for(&run, Duration::from_secs(20), "a FLOW record", |m| {
        m["msgid"] == "FLOW" && sd(m)["peer_port"] == "23"
    });
    assert_eq!(sd(&m)["verdict"], "blocked", "{m}");
    assert_eq!(sd(&m)["host"], AI1_4.to_string(), "{m}");
    assert_eq!(sd(&m)["mac"], lab::AI1_MAC, "{m}");

    // TLS, the collector's certificate checked for its name.
    let ca = collector.dir.join("ca.pem");
    reload(
        &lab,
        &run,
        &export(
            &format!("tls://{LAN_HOST4}:{TLS_PORT}"),
            &format!(
                "\toption syslog_ca '{}'\n\toption syslog_name '{COLLECTOR_NAME}'\n",
                ca.display()
            ),
        ),
    );
    collector.wait_for(
        &run,
        Duration::from_secs(15),
        "CONFIG_APPLIED over TLS",
        |m| m["input"] == "tls" && m["msgid"] == "CONFIG_APPLIED",
    );
    cage_ok(&lab, &["release", "--reason", "over tls"]);
    let m = collector.wait_for(&run, Duration::from_secs(10), "RELEASE over TLS", |m| {
        m["input"] == "tls" && sd(m)["reason"] == "over tls"
    });
    assert_eq!(m["hostname"], hostname.as_str());
    // And for its address when no name is given (the certificate has it too).
    reload(
        &lab,
        &run,
        &export(
            &format!("tls://{LAN_HOST4}:{TLS_PORT}"),
            &format!("\toption syslog_ca '{}'\n", ca.display()),
        ),
    );
    cage_ok(&lab, &["isolate", "--reason", "tls by address"]);
    collector.wait_for(&run, Duration::from_secs(15), "ISOLATE over TLS", |m| {
        m["input"] == "tls" && sd(m)["reason"] == "tls by address"
    });

    // A CA that did not sign the collector's certificate: nothing arrives, and the
    // errors are counted and shown.
    let other = collector.dir.join("other-ca.pem");
    reload(
        &lab,
        &run,
        &export(
            &format!("tls://{LAN_HOST4}:{TLS_PORT}"),
            &format!("\toption syslog_ca '{}'\n", other.display()),
        ),
    );
    run.wait_until(Duration::from_secs(15), "the wrong CA's exporter", || {
        status(&lab)["syslog"]["errors"].as_u64().unwrap_or(0) > 0
    });
    cage_ok(&lab, &["release", "--reason", "must not arrive"]);
    std::thread::sleep(Duration::from_secs(4));
    let s = status(&lab);
    assert_eq!(s["syslog"]["connected"], false, "{s:#}");
    let err = s["syslog"]["last_error"].as_str().unwrap_or("");
    assert!(
        err.contains("certificate") || err.contains("Certificate"),
        "{s:#}"
    );
    let text = String::from_utf8_lossy(&lab.cage(&["status"]).stdout).into_owned();
    assert!(text.contains("syslog:  tls://"), "{text}");
    let all = collector.messages();
    assert!(
        !all.iter()
            .any(|m| sd(m)["reason"] == "must not arrive" || m["msgid"] == "FORGED"),
        "a message arrived past a wrong CA, or from the cage: {all:#?}"
    );
    // Every message rsyslog got came from Cage.
    assert!(all.iter().all(|m| m["app"] == "cage"), "{all:#?}");
    drop(run);
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn a_stopped_collector_costs_only_counted_drops_and_a_flood_stays_bounded() {
    let lab = Lab::for_test();
    let mut collector = Collector::start(&lab);
    password_config(
        &lab,
        &export(
            &format!("tcp://{LAN_HOST4}:{TCP_PORT}"),
            "\toption syslog_queue '16'\n",
        ),
    );
    let run = lab.cage_run_ai1_ready();
    let ai1 = lab.netns(Node::Ai1);
    let lan = lab.netns(Node::Lan);
    collector.wait_for(&run, Duration::from_secs(10), "CONFIG_APPLIED", |m| {
        m["msgid"] == "CONFIG_APPLIED"
    });

    // A flood of blocked attempts from the hostile host: many ports, one rule.
    let flood_start = Instant::now();
    let flooded = in_namespace(&ai1, || {
        let mut n = 0;
        for port in 1000..1600u16 {
            let _ = TcpStream::connect_timeout(
                &SocketAddr::new(LAN_HOST4, port),
                Duration::from_millis(2),
            );
            n += 1;
        }
        n
    });
    assert_eq!(flooded, 600);
    std::thread::sleep(Duration::from_secs(3));
    let blocked = |c: &Collector| -> Vec<serde_json::Value> {
        c.messages()
            .into_iter()
            .filter(|m| m["msgid"] == "BLOCKED" && sd(m)["host"] == AI1_4.to_string())
            .collect()
    };
    let first = blocked(&collector);
    let rules: std::collections::BTreeSet<String> = first
        .iter()
        .map(|m| sd(m)["rule"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(
        !first.is_empty() && first.len() == rules.len(),
        "one message per rule for 600 attempts: {first:#?}"
    );
    let folded = status(&lab)["syslog"]["blocked_folded"]
        .as_u64()
        .unwrap_or(0);
    assert!(folded > 100, "the rest folded and counted: {folded}");

    // The collector stops. The daemon goes on: the kill switch, the page, the status.
    collector.stop();
    let t = Instant::now();
    cage_ok(&lab, &["isolate", "--reason", "collector down"]);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "isolate took {:?}",
        t.elapsed()
    );
    let internet = probe_in(
        &ai1,
        &Probe::tcp(PUBLIC4, 80).timeout(Duration::from_millis(500)),
    )
    .expect("probe");
    assert!(!internet.outcome.answered(), "isolated, yet: {internet:?}");
    // Enough audit lines to overflow a queue of 16.
    for i in 0..32 {
        let what = if i % 2 == 0 { "release" } else { "isolate" };
        cage_ok(&lab, &[what, "--reason", &format!("down {i}")]);
    }
    let ui = SocketAddr::new(ROUTER_LAN4, lab::WEB_PORT);
    let page = cage_tests::http::get_login(&lan, ui);
    assert!(matches!(page, Ok(200 | 303)), "the page: {page:?}");
    run.wait_until(Duration::from_secs(15), "drops counted", || {
        let s = status(&lab);
        s["syslog"]["dropped"].as_u64().unwrap_or(0) > 0
            && s["syslog"]["connected"] == false
            && s["syslog"]["errors"].as_u64().unwrap_or(0) > 0
    });
    let s = status(&lab);
    assert!(s["daemon_running"] == true, "{s:#}");
    assert!(
        s["syslog"]["queued"].as_u64().unwrap() <= 16,
        "bounded: {s:#}"
    );
    assert!(
        run.log().contains("syslog: ") && run.log().contains("dropped"),
        "the losses are logged:\n{}",
        run.log()
    );

    // Back: new events arrive, and of those queued while it was down the newest came
    // through, the oldest were dropped.
    collector.restart(&lab);
    cage_ok(&lab, &["isolate", "--reason", "collector back"]);
    collector.wait_for(&run, Duration::from_secs(70), "a new event", |m| {
        sd(m)["reason"] == "collector back"
    });
    let got = collector.messages();
    let down: Vec<u32> = got
        .iter()
        .filter_map(|m| {
            sd(m)["reason"]
                .as_str()?
                .strip_prefix("down ")?
                .parse()
                .ok()
        })
        .collect();
    assert!(
        !got.iter().any(|m| sd(m)["reason"] == "collector down") && !down.is_empty(),
        "the oldest dropped, the newest kept: {got:#?}"
    );
    let lowest = *down.iter().min().unwrap();
    assert_eq!(
        down,
        (lowest..32).collect::<Vec<_>>(),
        "the newest kept, in order, without a gap"
    );
    cage_ok(&lab, &["release", "--reason", "end"]);

    // The flood's window ends: one message with the count of what was folded into it.
    let left = Duration::from_secs(75).saturating_sub(flood_start.elapsed());
    let m = collector.wait_for(&run, left, "the flood's count", |m| {
        m["msgid"] == "BLOCKED"
            && sd(m)["host"] == AI1_4.to_string()
            && sd(m)["count"].as_str().unwrap_or("1") != "1"
    });
    let count: u64 = sd(&m)["count"].as_str().unwrap().parse().unwrap();
    assert!(count > 100, "{m}");
    let all = blocked(&collector);
    assert!(
        all.len() <= 2 * rules.len(),
        "a minute's flood is at most one message and its count per rule: {all:#?}"
    );

    // Stopping says so, and sends what is queued before it goes.
    let pid = run.pid().to_string();
    run.stop();
    let until = Instant::now() + Duration::from_secs(5);
    while !collector
        .messages()
        .iter()
        .any(|m| m["msgid"] == "STOPPED" && m["procid"] == pid.as_str())
    {
        assert!(
            Instant::now() < until,
            "no STOPPED: {:#?}",
            collector.messages()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
