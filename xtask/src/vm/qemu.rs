//! One boot under qemu (TCG: no KVM on these machines), bounded in time, with the serial
//! console shown as it comes and kept in `console.log`; and the results `vmlab` printed
//! there, as lines `VMLAB<TAB>…` (see `cage_tests::vm::report`).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::arch::Arch;
use super::debian::Unpacked;
use super::Mode;

/// One result row from the guest.
#[derive(Debug, Clone)]
pub struct Row {
    pub section: String,
    pub check: String,
    pub status: String,
    pub figure: String,
    pub detail: String,
}

impl Row {
    pub fn ok(&self) -> bool {
        self.status == "ok"
    }
}

/// What one boot gave.
#[derive(Debug, Default)]
pub struct Run {
    pub rows: Vec<Row>,
    pub facts: Vec<(String, String)>,
    /// `vmlab`'s exit code, as `/init` printed it.
    pub exit: Option<i32>,
    /// `vmlab` printed its closing line.
    pub done: bool,
    pub timed_out: bool,
    pub wall: Duration,
}

impl Run {
    pub fn passed(&self) -> bool {
        self.exit == Some(0)
            && self.done
            && !self.timed_out
            && !self.rows.is_empty()
            && self.rows.iter().all(Row::ok)
    }

    fn fact(&self, key: &str) -> Option<&str> {
        self.facts
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Boot `kernel` with `initrd` and wait for the guest to power off, at most `timeout`
/// (then qemu is killed and the run counts as failed).
pub fn boot(
    arch: &Arch,
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    timeout: Duration,
    log: &Path,
) -> Result<Run> {
    let mut cmd = Command::new(arch.qemu);
    cmd.args(arch.machine)
        .args(["-m", &arch.memory_mib.to_string()])
        .args(["-smp", &arch.cpus.to_string()])
        .args(["-nodefaults", "-no-reboot", "-display", "none"])
        .args(["-serial", "stdio"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    println!("xtask vm: {cmd:?}");
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {} (cargo xtask setup installs it)", arch.qemu))?;
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_owned();
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx2.send(format!("qemu: {line}")).is_err() {
                break;
            }
        }
    });
    let mut file =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut run = Run::default();
    let deadline = started + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(line) => {
                let _ = writeln!(file, "{line}");
                println!("[{}] {line}", arch.name);
                parse(&mut run, &line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if Instant::now() >= deadline {
                    run.timed_out = true;
                    let _ = child.kill();
                    println!(
                        "[{}] xtask vm: no power-off within {} s: qemu killed",
                        arch.name,
                        timeout.as_secs()
                    );
                    break;
                }
            }
        }
    }
    let _ = child.wait();
    run.wall = started.elapsed();
    Ok(run)
}

fn parse(run: &mut Run, line: &str) {
    // The console may put kernel messages in front of a line; the marker starts ours.
    let Some(at) = line.find("VMLAB\t") else {
        return;
    };
    let fields: Vec<&str> = line[at..].split('\t').collect();
    match fields.as_slice() {
        ["VMLAB", "ROW", section, check, status, figure, detail] => run.rows.push(Row {
            section: section.to_string(),
            check: check.to_string(),
            status: status.to_string(),
            figure: figure.to_string(),
            detail: detail.to_string(),
        }),
        ["VMLAB", "FACT", key, value] => run.facts.push((key.to_string(), value.to_string())),
        ["VMLAB", "DONE", ..] => run.done = true,
        ["VMLAB", "EXIT", code] => run.exit = code.trim().parse().ok(),
        _ => {}
    }
}

/// The results of one architecture as a table, with a heading that says what ran where.
pub fn table(arch: &Arch, pk: &Unpacked, mode: Mode, run: &Run, stage: Duration) -> String {
    let ok = run.rows.iter().filter(|r| r.ok()).count();
    let mut out = format!(
        "{} VM ({}): Linux {} ({}) under {} {} (TCG), {} CPU(s), {} MiB\n",
        arch.name,
        mode.as_str(),
        pk.release,
        pk.kernel_package,
        arch.qemu,
        arch.machine.join(" "),
        arch.cpus,
        arch.memory_mib,
    );
    out.push_str(&format!(
        "{ok} of {} checks ok; userspace after {} s of boot; VM {:.0} s; stage {:.0} s (with fetching and building){}\n",
        run.rows.len(),
        run.fact("boot_s").unwrap_or("?"),
        run.wall.as_secs_f64(),
        stage.as_secs_f64(),
        if run.timed_out {
            "; TIMED OUT"
        } else if !run.done {
            "; vmlab did not finish"
        } else {
            ""
        }
    ));
    let mut rows = vec![vec![
        "section".to_owned(),
        "check".to_owned(),
        "result".to_owned(),
        "figure".to_owned(),
        "detail".to_owned(),
    ]];
    for r in &run.rows {
        rows.push(vec![
            r.section.clone(),
            r.check.clone(),
            r.status.clone(),
            r.figure.clone(),
            r.detail.clone(),
        ]);
    }
    let widths: Vec<usize> = (0..4)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i < 4 {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            } else {
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
