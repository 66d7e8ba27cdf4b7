//! The tamper-evident audit log in the lab: real presses of the kill switch (two `cage
//! isolate` processes at once among them), `cage run`'s start and a refused reload, a
//! login and a failed login on the page from the LAN host — all in one chain that
//! `cage audit verify` accepts; then one line edited on disk with sed, and verify names
//! exactly that line and exits non-zero.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use cage_tests::http::{login, request};
use cage_tests::lab::{self, Lab, Node, LAN_HOST4, ROUTER_LAN4};
use cage_web::client;

const PASSWORD: &str = "correct horse battery";

fn audit_log(lab: &Lab) -> PathBuf {
    lab.dir().join("state/audit.log")
}

/// The log's entries as JSON values, oldest first.
fn entries(lab: &Lab) -> Vec<serde_json::Value> {
    std::fs::read_to_string(audit_log(lab))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("an audit line is JSON"))
        .collect()
}

fn actions(lab: &Lab) -> Vec<String> {
    entries(lab)
        .iter()
        .map(|e| e["action"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn ok(out: Output, what: &str) -> String {
    cage_tests::assert_success(&out, format_args!("{what}"))
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn every_event_is_chained_and_a_line_edited_on_disk_is_named() {
    let lab = Lab::for_test();
    let path = lab.write_config("");
    cage_agent::web::set_password(&path, PASSWORD, PASSWORD).expect("cage passwd");
    let run = lab.cage_run();
    let why = || format!("cage run:\n{}", run.log());
    assert_eq!(actions(&lab), ["config-applied"], "{}", why());

    // A login and a failed one from the LAN host.
    let lan = lab.netns(Node::Lan);
    let ui = SocketAddr::new(ROUTER_LAN4, lab::WEB_PORT);
    login(&lan, ui, PASSWORD, why);
    let wrong = request(&lan, ui, client::login_request(ui, "not the password")).expect("login");
    assert_eq!(wrong.status, 401, "{}", wrong.body);

    // Presses from the command line: one, and two processes at once.
    ok(lab.cage(&["isolate", "--reason", "first"]), "cage isolate");
    ok(
        lab.cage(&["release", "--reason", "all clear"]),
        "cage release",
    );
    let both: Vec<_> = ["together a", "together b"]
        .map(|r| {
            lab.cage_command(&["isolate", "--reason", r])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("cage isolate")
        })
        .into();
    for child in both {
        ok(
            child.wait_with_output().expect("cage isolate"),
            "cage isolate",
        );
    }
    ok(lab.cage(&["release", "--reason", "done"]), "cage release");

    // A reload with a configuration the validator refuses: audited with the error.
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{good}\toption masquerade 'perhaps'\n")).unwrap();
    // SAFETY: kill with a pid of our own child.
    assert_eq!(unsafe { libc::kill(run.pid() as i32, libc::SIGHUP) }, 0);
    run.wait_until(
        Duration::from_secs(15),
        "the refused reload never reached the audit log",
        || actions(&lab).last().map(String::as_str) == Some("config-refused"),
    );
    std::fs::write(&path, good).unwrap();

    let e = entries(&lab);
    let got: Vec<(&str, &str, &str)> = e
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap(),
                e["source"].as_str().unwrap(),
                e["who"].as_str().unwrap(),
            )
        })
        .collect();
    let lan_who = format!("web:{LAN_HOST4}");
    assert_eq!(
        &got[..3],
        [
            ("config-applied", "daemon", "cage"),
            ("login", "web", lan_who.as_str()),
            ("login-failed", "web", lan_who.as_str()),
        ]
    );
    assert_eq!(
        got[3..].iter().map(|g| g.0).collect::<Vec<_>>(),
        [
            "isolate",
            "release",
            "isolate",
            "isolate",
            "release",
            "config-refused"
        ]
    );
    let refused = &e[8];
    assert!(
        refused["result"]
            .as_str()
            .is_some_and(|r| r.contains("refused") && r.contains("unknown option 'masquerade'")),
        "{refused}"
    );
    // One chain: seq 1 to 9, each line once, whichever `cage isolate` came first.
    let seqs: Vec<u64> = e.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=9).collect::<Vec<u64>>());

    // What is hashed, as the README says: line 4's bytes without its newline.
    let sh = format!(
        "head -n 4 '{}' | tail -n 1 | tr -d '\\n' | sha256sum",
        audit_log(&lab).display()
    );
    let out = std::process::Command::new("sh").args(["-c", &sh]).output();
    let sum = ok(out.expect("sh"), "sha256sum");
    assert_eq!(
        sum.split_whitespace().next(),
        e[4]["prev"].as_str(),
        "{sum}"
    );

    let out = lab.cage(&["audit", "verify", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("verify JSON");
    assert!(out.status.success(), "{report:#}");
    assert_eq!(report["verified"], 9, "{report:#}");
    assert!(report["broken"].is_null(), "{report:#}");
    let shown = ok(lab.cage(&["audit", "show"]), "cage audit show");
    assert_eq!(shown.lines().count(), 9, "{shown}");
    assert!(
        shown.contains("login-failed") && shown.contains("together b"),
        "{shown}"
    );

    // The release "all clear", line 5, edited on disk.
    let before = std::fs::read_to_string(audit_log(&lab)).unwrap();
    let sed = std::process::Command::new("sed")
        .args(["-i", "5s/all clear/all fine/"])
        .arg(audit_log(&lab))
        .status()
        .expect("sed");
    assert!(sed.success());
    assert_ne!(std::fs::read_to_string(audit_log(&lab)).unwrap(), before);

    let out = lab.cage(&["audit", "verify"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "an edited log verified:\n{text}");
    let named = format!(
        "BROKEN at {} line 5 (seq 5): changed",
        audit_log(&lab).display()
    );
    assert!(text.contains(&named), "{text}");
    let out = lab.cage(&["audit", "verify", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("verify JSON");
    assert_eq!(report["broken"]["line"], 5, "{report:#}");
    assert_eq!(report["broken"]["kind"], "changed", "{report:#}");
    assert_eq!(report["verified"], 4, "{report:#}");

    // A log that is not there: a clear error, not a verdict.
    let out = lab.cage(&["audit", "verify", "--file", "/nonexistent/audit.log"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no audit log at /nonexistent/audit.log"),
        "{out:?}"
    );
    drop(run);
}
