//! MISSION.md's contract in the guest, with `crate::contract`'s table and runner (real
//! packets, judged by witnesses): all of it on x86_64; every allow and the first deny of
//! every kind (LAN, router, upstream, private ranges, the other caged host, spoofed
//! sources, LAN into the segment) on the slower emulated CPUs; one allow and one deny
//! in the smoke run.

use crate::contract::{self, Check, Expect};
use crate::lab::Lab;

use super::{caged, row};

/// One row for a run of `checks`.
pub fn prove(lab: &Lab, section: &str, what: &str, checks: &[Check]) -> bool {
    let report = contract::run_matrix(lab, checks);
    let failures = report.failures();
    let ok = failures.is_empty() && !checks.is_empty();
    let allows = checks.iter().filter(|c| c.expect == Expect::Allow).count();
    row(
        section,
        what,
        ok,
        format!(
            "{} of {} ({allows} allows, {} denies)",
            report.results.len() - failures.len(),
            report.results.len(),
            checks.len() - allows
        ),
        if ok {
            format!(
                "every allow delivered, every deny blocked (no packet at the witness), {:.0} s",
                report.elapsed.as_secs_f64()
            )
        } else {
            failures
                .iter()
                .map(|f| {
                    format!(
                        "FAIL {} {} -> {} {} (expected {})",
                        f.check.row,
                        f.check.from.label(),
                        f.check.target(),
                        f.check.proto,
                        f.check.expect
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        },
    )
}

/// Every allow, and the first check of every deny row.
pub fn subset_checks() -> Vec<Check> {
    let mut out = Vec::new();
    let mut deny_rows = Vec::new();
    for c in contract::checks() {
        match c.expect {
            Expect::Allow => out.push(c),
            Expect::Deny => {
                let kind = (c.row, c.from);
                if !deny_rows.contains(&kind) {
                    deny_rows.push(kind);
                    out.push(c);
                }
            }
        }
    }
    out
}

/// The smoke run's: a caged host reaches the internet, and not the LAN.
pub fn smoke(lab: &Lab) {
    let all = contract::checks();
    let pick = |row: &str, expect: Expect| {
        all.iter()
            .find(|c| c.row == row && c.expect == expect)
            .cloned()
            .expect("the contract has this row")
    };
    let checks = [
        pick("caged -> internet", Expect::Allow),
        pick("caged -> LAN", Expect::Deny),
    ];
    prove(lab, "smoke", "one allow, one deny (contract)", &checks);
}

pub fn full() {
    let Some(c) = caged::up("contract", "") else {
        return;
    };
    prove(&c.lab, "contract", "the whole matrix", &contract::checks());
}

pub fn subset() {
    let Some(c) = caged::up("contract", "") else {
        return;
    };
    prove(
        &c.lab,
        "contract",
        "every allow, one deny of every kind",
        &subset_checks(),
    );
}
