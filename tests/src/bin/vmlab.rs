//! `vmlab`: the program `cargo xtask vm` runs inside its guests (see `cage_tests::vm`).
//!
//! - `vmlab`: the whole run: the kernel's facts, its modules loaded, then each scenario
//!   of the plan (`vmlab.mode=smoke|full`, `vmlab.only=a,b` on the kernel's command line)
//!   in a process of its own, bounded in time; a scenario that dies or hangs is a failed
//!   row. Exits 0 when every row is ok. Built with the release profile (as `cage`, whose
//!   dependency builds it shares), so a panic aborts its scenario's process: the panic's
//!   message is on the console, the row says the scenario did not end, the run goes on
//!   (what the scenario made is left in the throwaway guest).
//! - `vmlab run NAME`: one scenario, in this process.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cage_tests::vm::{self, kernel, row, Mode};

/// How long one scenario may take in the guest.
const SCENARIO_LIMIT: Duration = Duration::from_secs(900);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["run", name] => {
            if vm::run_scenario(name) {
                ExitCode::SUCCESS
            } else {
                eprintln!("vmlab: no scenario {name}");
                ExitCode::from(2)
            }
        }
        [] => whole_run(),
        _ => {
            eprintln!("usage: vmlab [run SCENARIO]");
            ExitCode::from(2)
        }
    }
}

fn cmdline(key: &str) -> Option<String> {
    let line = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
}

fn whole_run() -> ExitCode {
    let started = Instant::now();
    kernel::facts();
    let mode = match cmdline("vmlab.mode").as_deref() {
        Some("full") => Mode::Full,
        _ => Mode::Smoke,
    };
    let (_, machine) = kernel::uname();
    let mut failed = 0usize;
    let mut rows = 0usize;
    if !kernel::load_modules() {
        failed += 1;
    }
    rows += 1;
    let only: Option<Vec<String>> =
        cmdline("vmlab.only").map(|o| o.split(',').map(str::to_owned).collect());
    for name in vm::plan(mode, &machine) {
        if only.as_ref().is_some_and(|o| !o.iter().any(|n| n == name)) {
            continue;
        }
        let (n, bad) = scenario(name);
        rows += n;
        failed += bad;
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "VMLAB\tDONE\t{}\t{failed}\t{:.0}",
        rows - failed,
        started.elapsed().as_secs_f64()
    );
    let _ = out.flush();
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Run `vmlab run NAME`, passing its output on; (rows, failed rows).
fn scenario(name: &str) -> (usize, usize) {
    let started = Instant::now();
    println!("vmlab: scenario {name}");
    let exe = std::env::current_exe().unwrap_or_else(|_| "/usr/bin/vmlab".into());
    let mut child = match Command::new(exe)
        .args(["run", name])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            row(name, "scenario", false, "-", format!("cannot start: {e}"));
            return (1, 1);
        }
    };
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let (mut rows, mut failed) = (0, 0);
    let deadline = started + SCENARIO_LIMIT;
    let mut timed_out = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(line) => {
                if line.starts_with("VMLAB\tROW\t") {
                    rows += 1;
                    if line.split('\t').nth(4) != Some("ok") {
                        failed += 1;
                    }
                }
                println!("{line}");
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if Instant::now() > deadline {
                    timed_out = true;
                    let _ = child.kill();
                    break;
                }
            }
        }
    }
    let status = child.wait();
    let clean = matches!(&status, Ok(s) if s.success());
    if timed_out || !clean || rows == 0 {
        row(
            name,
            "scenario ran to its end",
            false,
            "-",
            if timed_out {
                format!("killed after {} s", SCENARIO_LIMIT.as_secs())
            } else if rows == 0 {
                format!("no result at all ({status:?})")
            } else {
                format!("ended with {status:?}: a panic or an abort, see the console above")
            },
        );
        rows += 1;
        failed += 1;
    }
    println!(
        "vmlab: scenario {name}: {rows} rows, {failed} failed, {:.0} s",
        started.elapsed().as_secs_f64()
    );
    (rows, failed)
}
