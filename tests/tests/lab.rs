//! The lab itself: it cleans up after itself (also after a crash), and without Cage it
//! routes every destination the contract denies, so that Cage's denies mean something.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cage_tests::contract::{self, Expect};
use cage_tests::lab::{self, Lab, LINK_NAMES};
use cage_tests::require_root;

/// Lab link names that appeared in the root namespace between two snapshots.
fn leaked_links(before: &[String]) -> Vec<String> {
    lab::root_links()
        .expect("listing root links")
        .into_iter()
        .filter(|l| !before.contains(l) && LINK_NAMES.contains(&l.as_str()))
        .collect()
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn up_and_down_leave_nothing_behind() {
    require_root();
    let before = lab::root_links().unwrap();
    let prefix = lab::unique_prefix();
    let t = Instant::now();
    let lab = Lab::up(&prefix).expect("lab up");
    println!("lab {prefix} up in {:?}", t.elapsed());
    assert_eq!(
        lab::leftovers(&prefix).len(),
        8,
        "seven namespaces and a directory while up: {:?}",
        lab::leftovers(&prefix)
    );
    assert_eq!(
        leaked_links(&before),
        Vec::<String>::new(),
        "links in the root netns"
    );
    let t = Instant::now();
    lab.down().expect("lab down");
    println!("lab {prefix} down in {:?}", t.elapsed());
    assert_eq!(lab::leftovers(&prefix), Vec::<String>::new());
    assert_eq!(leaked_links(&before), Vec::<String>::new());

    // Dropping does the same as `down`.
    let lab = Lab::up(&prefix).expect("lab up again");
    drop(lab);
    assert_eq!(lab::leftovers(&prefix), Vec::<String>::new());
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn up_removes_what_a_crashed_run_left_behind() {
    require_root();
    let before = lab::root_links().unwrap();
    let prefix = lab::unique_prefix();
    let lab = Lab::up(&prefix).expect("lab up");
    // A daemon left running in the router's namespace by the crashed run.
    let mut orphan = Command::new("ip")
        .args(["netns", "exec", &lab.ns(lab::Node::Router), "sleep", "300"])
        .stdin(Stdio::null())
        .spawn()
        .expect("starting sleep in the router namespace");
    // Wait until it has entered the namespace: on a busy machine `ip netns exec` can
    // still be setting up when the next lab comes up, and then nobody could find it.
    let router_ns = lab.ns(lab::Node::Router);
    let entered = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = Command::new("ip")
            .args(["netns", "pids", &router_ns])
            .output()
            .expect("ip netns pids");
        let pids = String::from_utf8_lossy(&pids.stdout);
        if pids
            .split_whitespace()
            .any(|p| p == orphan.id().to_string())
        {
            break;
        }
        assert!(
            Instant::now() < entered,
            "the orphan never entered the router namespace"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The crash: no Drop, nothing torn down.
    std::mem::forget(lab);
    assert_eq!(lab::leftovers(&prefix).len(), 8);

    let lab = Lab::up(&prefix).expect("lab up over a crashed run's leftovers");
    let until = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = orphan.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > until {
            let _ = orphan.kill();
            let _ = orphan.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        status.is_some(),
        "the crashed run's process in the router namespace is still running"
    );
    drop(lab);
    assert_eq!(lab::leftovers(&prefix), Vec::<String>::new());
    assert_eq!(leaked_links(&before), Vec::<String>::new());

    // `down` alone cleans up too.
    std::mem::forget(Lab::up(&prefix).expect("lab up"));
    lab::down(&prefix).expect("down");
    assert_eq!(lab::leftovers(&prefix), Vec::<String>::new());
}

/// Without Cage (the segment made by a plain router: bridged, routed and masqueraded,
/// no policy), every check of the contract gets through, the denied ones included.
/// Otherwise a deny in the contract test could pass because the lab does not route the
/// packet at all.
#[test]
#[ignore = "needs root: cargo xtask test"]
fn baseline_without_cage_every_destination_is_reachable() {
    require_root();
    let lab = Lab::up(&lab::unique_prefix()).expect("lab up");
    lab.plain_segment().expect("plain segment");
    let checks: Vec<_> = contract::checks()
        .into_iter()
        .map(|c| c.expecting(Expect::Allow))
        .collect();
    assert!(
        checks.len() == contract::checks().len() && checks.len() > 100,
        "the whole matrix"
    );
    let report = contract::run_matrix(&lab, &checks);
    let failures = report.failures();
    assert!(
        failures.is_empty(),
        "without Cage, {} checks did not get through; the lab does not route them:\n{report}",
        failures.len()
    );
}
