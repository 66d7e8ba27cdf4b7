//! `bench idle`: what `cage run` costs a router that has nothing to do, and how soon it
//! repairs a change made behind its back, listening to the kernel's announcements
//! (`events`, the default) against reading the kernel every 2 s (`poll`,
//! `CAGE_WATCH=poll`), side by side in one run: a fresh lab each, alternated.
//!
//! CPU is the daemon's own and its children's (the `nft` runs it waits for), from
//! `/proc/PID/stat`: utime, stime, cutime, cstime, in clock ticks.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cage_tests::lab::{self, CageRun, Lab, Node};

use crate::results::{load_average, median, pct, record};

const ROUNDS: usize = 2;
/// How long the idle daemon is measured, once it has settled.
const IDLE_SECS: u64 = 60;
const SETTLE: Duration = Duration::from_secs(20);
/// Repairs timed in each lab.
const REPAIRS: usize = 5;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Events,
    Poll,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Events => "events",
            Mode::Poll => "poll",
        }
    }
}

struct Measured {
    mode: Mode,
    /// CPU over the idle period, percent of one core.
    cpu_pct: f64,
    /// Resident memory at the end, kB.
    rss_kb: u64,
    /// Milliseconds from each change to its repair.
    repairs_ms: Vec<f64>,
}

pub fn idle() -> Result<()> {
    let started = Instant::now();
    let load = load_average();
    let mut all = Vec::new();
    for round in 0..ROUNDS {
        let mut order = [Mode::Events, Mode::Poll];
        if round % 2 == 1 {
            order.reverse();
        }
        for mode in order {
            let m =
                measure(mode).with_context(|| format!("round {}, {}", round + 1, mode.name()))?;
            println!(
                "xtask bench: round {}: {}: idle CPU {:.4} % of a core, {} kB resident, \
                 repairs {:?} ms",
                round + 1,
                mode.name(),
                m.cpu_pct,
                m.rss_kb,
                m.repairs_ms
            );
            all.push(m);
        }
    }
    let load_end = load_average();
    let of = |mode: Mode| all.iter().filter(move |m| m.mode == mode);
    let cpu = |mode: Mode| median(of(mode).map(|m| m.cpu_pct));
    let repairs = |mode: Mode| -> Vec<f64> {
        of(mode)
            .flat_map(|m| m.repairs_ms.iter().copied())
            .collect()
    };
    let mut body = String::from(
        "| mode | idle CPU, % of a core (median) | resident kB (median) | repair ms p50 | repair ms max |\n\
         | --- | --- | --- | --- | --- |\n",
    );
    for mode in [Mode::Events, Mode::Poll] {
        let r = repairs(mode);
        body.push_str(&format!(
            "| {} | {:.4} | {:.0} | {:.0} | {:.0} |\n",
            mode.name(),
            cpu(mode),
            median(of(mode).map(|m| m.rss_kb as f64)),
            pct(&r, 50.0),
            pct(&r, 100.0),
        ));
    }
    let ratio = cpu(Mode::Events) / cpu(Mode::Poll);
    let summary = format!(
        "`events` against `poll`: idle CPU ratio **{ratio:.3}** ({:.4} % against {:.4} % of \
         a core); a change behind Cage's back repaired in {:.0} ms (p50) against {:.0} ms.",
        cpu(Mode::Events),
        cpu(Mode::Poll),
        pct(&repairs(Mode::Events), 50.0),
        pct(&repairs(Mode::Poll), 50.0),
    );
    body.push_str(&format!("\n{summary}\n\nEach lab:\n\n| round | mode | idle CPU % | resident kB | repairs ms |\n| --- | --- | --- | --- | --- |\n"));
    for (i, m) in all.iter().enumerate() {
        body.push_str(&format!(
            "| {} | {} | {:.4} | {} | {} |\n",
            i / 2 + 1,
            m.mode.name(),
            m.cpu_pct,
            m.rss_kb,
            m.repairs_ms
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    println!("xtask bench: {summary}");
    let took = started.elapsed();
    let method = format!(
        "Load average at the start: {load}, at the end: {load_end}. The release `cage run` \
         in a fresh lab with the contract's configuration, for each mode of each of \
         {ROUNDS} rounds (events poll, poll events): `events` listens to the kernel's \
         announcements (nf_tables, rtnetlink) and reads everything every 5 minutes; `poll` \
         (`CAGE_WATCH=poll`) reads Cage's tables with `nft` and the links, addresses and \
         routes every 2 s, as `cage run` did before. Idle CPU: the daemon's and its \
         children's CPU time (/proc/PID/stat) over {IDLE_SECS} s, {} s after the policy was \
         applied, nothing sent. Repairs: {REPAIRS} times, `nft flush chain inet cage \
         forward`, then the time until the chain has its rules again (read every 10 ms). \
         One run took {:.0} s.",
        SETTLE.as_secs(),
        took.as_secs_f64()
    );
    record("Idle: cage run listening against polling", &method, &body)
}

fn measure(mode: Mode) -> Result<Measured> {
    let lab = Lab::up(&lab::unique_prefix()).context("lab up")?;
    lab.write_config(cage_tests::contract::CONFIG_EXTRA);
    let env: &[(&str, &str)] = match mode {
        Mode::Events => &[],
        Mode::Poll => &[("CAGE_WATCH", "poll")],
    };
    let run = lab.spawn_cage_run_env(env);
    wait(
        &run,
        Duration::from_secs(15),
        "cage run applied its policy",
        || run.log().contains("policy applied"),
    )?;
    lab.wait_segment_ready().context("segment ready")?;
    std::thread::sleep(SETTLE);

    let pid = run.pid();
    let before = cpu_ticks(pid)?;
    std::thread::sleep(Duration::from_secs(IDLE_SECS));
    let after = cpu_ticks(pid)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu_pct = (after - before) as f64 / hz / IDLE_SECS as f64 * 100.0;
    let rss_kb = rss_kb(pid)?;

    let rules = || -> Result<usize> {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.ns(Node::Router),
                "nft",
                "-a",
                "list",
                "chain",
            ])
            .args(["inet", "cage", "forward"])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("# handle"))
            .count())
    };
    let full = rules()?;
    if full < 3 {
        bail!("Cage's forward chain has {full} rules");
    }
    let mut repairs_ms = Vec::new();
    for _ in 0..REPAIRS {
        let start = Instant::now();
        lab.nft(Node::Router, "flush chain inet cage forward");
        wait(&run, Duration::from_secs(10), "the chain repaired", || {
            rules().is_ok_and(|n| n == full)
        })?;
        repairs_ms.push(start.elapsed().as_secs_f64() * 1000.0);
        // The re-applied policy read back, before the next change.
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(Measured {
        mode,
        cpu_pct,
        rss_kb,
        repairs_ms,
    })
}

fn wait(run: &CageRun, within: Duration, what: &str, cond: impl Fn() -> bool) -> Result<()> {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > within {
            bail!("{what}: not within {within:?}\ncage run:\n{}", run.log());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// utime + stime + cutime + cstime of a process, in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name, in parentheses, may hold spaces: count fields after its end.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("a /proc stat line without its name")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the line, so utime (14) is index 11 here.
    let ticks = fields
        .get(11..15)
        .context("a short /proc stat line")?
        .iter()
        .map(|f| f.parse::<u64>())
        .sum::<Result<u64, _>>()?;
    Ok(ticks)
}

pub(crate) fn rss_kb(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}
