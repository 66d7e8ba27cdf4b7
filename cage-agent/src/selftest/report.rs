//! The result: the checks and what became of them, the report `cage selftest` prints
//! and stores, and what `cage status` shows of it.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{io_err, SelftestError, RESULT_FILE, RUNNING_FILE};
use crate::clock::unix_now;
// ---- the result -----------------------------------------------------------------------

/// One check and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// The contract row, e.g. `caged -> LAN`.
    pub name: String,
    /// `address:port`, an address (ICMP), or a device.
    pub target: String,
    /// `tcp`, `udp`, `icmp`, or `state` for what is read from the kernel.
    pub proto: String,
    pub expected: String,
    pub observed: String,
    /// `None`: not run (the reason is in `observed`).
    pub ok: Option<bool>,
    /// `witness@router`, `witness@probe-b`, `prober` or `kernel`.
    pub judged_by: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// A probe host as the flow log will see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeHost {
    pub name: String,
    /// The router-side port in the segment bridge.
    pub port: String,
    pub mac: String,
    pub addresses: Vec<IpAddr>,
}

/// A whole self-test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Unix time (seconds) at the end of the run.
    pub finished_at: u64,
    pub duration_ms: u64,
    /// Every check that ran holds, and at least one ran.
    pub ok: bool,
    /// "all N checks hold" or "K of N checks FAIL: …".
    pub verdict: String,
    pub checks: Vec<Check>,
    /// What the checks could not cover, and why.
    pub notes: Vec<String>,
    pub probe_hosts: Vec<ProbeHost>,
}

impl Report {
    pub(super) fn new(
        checks: Vec<Check>,
        notes: Vec<String>,
        probe_hosts: Vec<ProbeHost>,
        took: Duration,
    ) -> Report {
        let ran: Vec<&Check> = checks.iter().filter(|c| c.ok.is_some()).collect();
        let failed: Vec<&Check> = ran
            .iter()
            .copied()
            .filter(|c| c.ok == Some(false))
            .collect();
        let skipped = checks.len() - ran.len();
        let skipped_text = if skipped > 0 {
            format!(" ({skipped} not run)")
        } else {
            String::new()
        };
        let ok = failed.is_empty() && !ran.is_empty();
        let verdict = if ran.is_empty() {
            "no check ran".to_owned()
        } else if ok {
            format!("all {} checks hold{skipped_text}", ran.len())
        } else {
            let list: Vec<String> = failed
                .iter()
                .take(8)
                .map(|c| format!("{} {} {}", c.name, c.target, c.proto))
                .collect();
            let more = if failed.len() > 8 {
                format!("; and {} more", failed.len() - 8)
            } else {
                String::new()
            };
            format!(
                "{} of {} checks FAIL{skipped_text}: {}{more}",
                failed.len(),
                ran.len(),
                list.join("; ")
            )
        };
        Report {
            finished_at: unix_now(),
            duration_ms: took.as_millis() as u64,
            ok,
            verdict,
            checks,
            notes,
            probe_hosts,
        }
    }

    /// The checks as a table, the notes, and the verdict.
    pub fn render_text(&self) -> String {
        let mut rows: Vec<Vec<String>> = vec![[
            "check",
            "target",
            "proto",
            "expected",
            "observed",
            "ok",
            "judged by",
        ]
        .map(String::from)
        .into()];
        for c in &self.checks {
            rows.push(vec![
                c.name.clone(),
                c.target.clone(),
                c.proto.clone(),
                c.expected.clone(),
                c.observed.clone(),
                match c.ok {
                    Some(true) => "ok",
                    Some(false) => "FAIL",
                    None => "-",
                }
                .into(),
                c.judged_by.clone(),
            ]);
        }
        let mut out = text_table(&rows);
        for c in self.checks.iter().filter(|c| c.ok == Some(false)) {
            if !c.detail.is_empty() {
                let _ = writeln!(
                    out,
                    "FAIL {} {} {}: {}",
                    c.name, c.target, c.proto, c.detail
                );
            }
        }
        let _ = writeln!(out);
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        let _ = writeln!(
            out,
            "\nselftest: {} (in {:.1} s)",
            self.verdict,
            self.duration_ms as f64 / 1000.0
        );
        out
    }
}

/// Rows as a plain-text table: columns padded to their widest cell and two spaces apart,
/// the first row a header underlined with dashes. The self-test's report and the lab's
/// contract matrix print with it.
pub fn text_table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; columns];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, &w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
        if i == 0 {
            let total = widths.iter().sum::<usize>() + 2 * (widths.len().max(1) - 1);
            let _ = writeln!(out, "{}", "-".repeat(total));
        }
    }
    out
}

/// What `cage status` shows of the last self-test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Last {
    pub finished_at: u64,
    pub ok: bool,
    pub verdict: String,
}

impl Last {
    /// "verified 2 minutes ago: all 87 checks hold".
    pub fn line(&self) -> String {
        let ago = unix_now().saturating_sub(self.finished_at);
        let when = match ago {
            0..=59 => format!("{ago} s ago"),
            60..=7199 => format!("{} minutes ago", ago / 60),
            7200..=172_799 => format!("{} hours ago", ago / 3600),
            _ => format!("{} days ago", ago / 86_400),
        };
        let word = if self.ok { "verified" } else { "FAILED" };
        format!("{word} {when}: {}", self.verdict)
    }
}

/// A self-test in progress, as `<log_dir>/selftest.running.json` tells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    pub pid: u32,
    /// Every source address the probe hosts use (spoofed ones included).
    pub addresses: Vec<IpAddr>,
}

/// The self-test running now, if any (its process is alive). Whatever reacts to a
/// caged host's behaviour (automatic isolation, alerts) should leave these addresses
/// alone while it runs: the self-test makes a hundred denied attempts in a few seconds
/// on purpose.
pub fn running(log_dir: &Path) -> Option<Running> {
    let bytes = std::fs::read(log_dir.join(RUNNING_FILE)).ok()?;
    let r: Running = serde_json::from_slice(&bytes).ok()?;
    Path::new(&format!("/proc/{}", r.pid)).exists().then_some(r)
}

/// The last self-test's result stored in `log_dir`, if there is one.
pub fn last(log_dir: &Path) -> Option<Last> {
    let bytes = std::fs::read(log_dir.join(RESULT_FILE)).ok()?;
    let r: Report = serde_json::from_slice(&bytes).ok()?;
    Some(Last {
        finished_at: r.finished_at,
        ok: r.ok,
        verdict: r.verdict,
    })
}

/// Store `report` as `<log_dir>/selftest.json` (written aside, then renamed).
pub fn store(report: &Report, log_dir: &Path) -> Result<PathBuf, SelftestError> {
    std::fs::create_dir_all(log_dir).map_err(io_err(format!("creating {}", log_dir.display())))?;
    let path = log_dir.join(RESULT_FILE);
    let tmp = log_dir.join(format!(".{RESULT_FILE}.{}", std::process::id()));
    let json = serde_json::to_vec_pretty(report).expect("a report serializes");
    std::fs::write(&tmp, json).map_err(io_err(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, &path).map_err(io_err(format!("renaming to {}", path.display())))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_every_column_to_its_widest_cell() {
        let rows: Vec<Vec<String>> = [["a", "bb", "c"], ["ccc", "d", ""]]
            .map(|r| r.map(String::from).into())
            .into();
        assert_eq!(text_table(&rows), "a    bb  c\n----------\nccc  d\n");
    }

    #[test]
    fn verdicts() {
        let check = |ok| Check {
            name: "caged -> LAN".into(),
            target: "192.168.8.10".into(),
            proto: "icmp".into(),
            expected: "deny".into(),
            observed: "x".into(),
            ok,
            judged_by: "prober".into(),
            detail: String::new(),
        };
        let r = Report::new(
            vec![check(Some(true)), check(None)],
            vec![],
            vec![],
            Duration::ZERO,
        );
        assert!(r.ok);
        assert_eq!(r.verdict, "all 1 checks hold (1 not run)");
        let r = Report::new(
            vec![check(Some(true)), check(Some(false))],
            vec![],
            vec![],
            Duration::ZERO,
        );
        assert!(!r.ok);
        assert_eq!(
            r.verdict,
            "1 of 2 checks FAIL: caged -> LAN 192.168.8.10 icmp"
        );
        let r = Report::new(vec![check(None)], vec![], vec![], Duration::ZERO);
        assert!(!r.ok);
    }
}
