//! The connectivity contract, enforced by the real `cage` binary in the lab's router and
//! proven with real packets: every allow delivered, every deny blocked (the witness in
//! the destination saw nothing arrive). The baseline in `lab.rs` shows that without Cage
//! every one of these checks gets through.
//!
//! Needs the `cage` binary: `cargo build -p cage-agent` first, or `$CAGE_BIN`.

use std::time::{Duration, Instant};

use cage_agent::probe::Verdict;
use cage_tests::contract::{self, run_matrix, Expect, Report};
use cage_tests::lab::{Lab, Node};

fn assert_passes(lab: &Lab, report: &Report) {
    let failures = report.failures();
    assert!(
        failures.is_empty(),
        "{} checks of the contract failed:\n{report}\nruleset in the router:\n{}",
        failures.len(),
        lab.nft_ruleset(Node::Router)
    );
}

fn status_json(lab: &Lab) -> serde_json::Value {
    let out = lab.cage(&["status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "cage status --json ({}): {e}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn cage_apply_enforces_the_contract() {
    let lab = Lab::for_contract("");
    let t = Instant::now();
    cage_tests::assert_success(&lab.cage(&["apply"]), "cage apply");
    println!("cage apply took {:?}", t.elapsed());
    let report = run_matrix(&lab, &contract::checks());
    assert_passes(&lab, &report);

    // The denies were Cage's, and Cage counted them.
    let status = status_json(&lab);
    assert_eq!(status["enforcing"], true, "{status:#}");
    let denied = status["denied_total"].as_u64().unwrap_or(0);
    assert!(denied > 0, "no denied packets counted: {status:#}");
    println!("cage status: {denied} packets denied");
}

/// `cage run` enforces the same contract, and the kernel keeps enforcing it after the
/// daemon is killed (fail closed).
#[test]
#[ignore = "needs root: cargo xtask test"]
fn cage_run_enforces_the_contract_and_it_outlives_the_daemon() {
    let lab = Lab::for_contract("");
    let mut daemon = lab.spawn_cage_run();
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        assert!(daemon.is_running(), "cage run exited:\n{}", daemon.log());
        let status = status_json(&lab);
        if status["enforcing"] == true && status["daemon_running"] == true {
            break;
        }
        assert!(
            Instant::now() < until,
            "cage run did not enforce within 15 s: {status:#}\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let report = run_matrix(&lab, &contract::checks());
    assert_passes(&lab, &report);

    // SAFETY: kill(2) on the pid of our own child.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGKILL) };
    let status = daemon.stop();
    assert!(status.is_some(), "the daemon did not die");
    println!("cage run killed ({status:?}); the matrix again:");
    let report = run_matrix(&lab, &contract::checks());
    assert_passes(&lab, &report);
}

/// The matrix is not vacuous against Cage's own segment: with Cage's tables removed
/// (`cage disable`) and the segment it made left in place, the packets of every deny
/// arrive again. (Hosts on the segment stay apart: port isolation is the segment's,
/// not the tables'.)
#[test]
#[ignore = "needs root: cargo xtask test"]
fn without_cages_tables_the_denied_packets_arrive() {
    let lab = Lab::for_contract("");
    let out = lab.cage(&["apply"]);
    assert!(out.status.success(), "cage apply failed: {out:?}");
    let out = lab.cage(&["disable"]);
    assert!(out.status.success(), "cage disable failed: {out:?}");
    let denies: Vec<_> = contract::checks()
        .into_iter()
        .filter(|c| c.expect == Expect::Deny && !c.row.starts_with("caged -> caged"))
        .collect();
    println!("Cage's tables removed: every deny below must FAIL, its packets arriving");
    let report = run_matrix(&lab, &denies);
    let unseen: Vec<_> = report
        .results
        .iter()
        .filter(|r| !matches!(r.observed, Ok(Verdict::Delivered | Verdict::Leaked)))
        .collect();
    assert!(
        unseen.is_empty(),
        "{} denied probes did not arrive even without Cage's tables; the matrix would \
         prove nothing for them:\n{report}",
        unseen.len()
    );
}
