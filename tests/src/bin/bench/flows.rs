//! `cargo xtask bench flows`: what the eBPF flow counter costs and how much it can take.
//! Forwarding throughput from a caged host to the internet host (iperf3, TCP and UDP)
//! with the program attached to the segment bridge and without it, alternated in one run,
//! Cage's nftables policy in force in both; then bursts of new one-datagram UDP flows at
//! rising rates, each checked against the flow map: is every flow there? Release binary
//! (`$CAGE_BIN`, set by xtask).

use std::collections::HashSet;
use std::net::{IpAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cage_agent::probe::NetNs;
use cage_tests::contract;
use cage_tests::lab::{self, Lab, Node, PUBLIC4};

use crate::results::{load_average, median, pct, record};

/// iperf3's port on the internet host.
const IPERF_PORT: u16 = 5201;
/// Seconds per iperf3 run.
pub(crate) const RUN_SECS: u64 = 3;
/// With/without pairs per transport, alternated (ABBA, so that a drift of the machine's
/// speed during the run does not favour one side).
const PAIRS: usize = 9;
/// UDP: one stream of small datagrams offered faster than the lab forwards them, so the
/// received rate is the forwarding capacity in packets. TCP hands the bridge 64 KiB GSO
/// packets, in which a per-packet cost hides; this shows it.
pub(crate) const UDP_RATE: &str = "300M";
const UDP_LEN: &str = "512";
/// The smallest datagrams (`bench product`): what a per-packet cost does at its worst.
const SMALL_UDP_LEN: &str = "64";
/// New flows per step of the flow-rate test: one datagram each, each from its own
/// source port (the same ports every step: the map is new each step, and conntrack's
/// entries are reused instead of filling its table).
const FLOWS: u16 = 20_000;
const FIRST_SPORT: u16 = 20_000;
const FLOW_PORT: u16 = 9998;
/// Offered new-flow rates per second, rising; 0 is as fast as two senders go, one a CPU
/// half the ports each (inserts into the map from both CPUs at once).
const RATES: [u32; 7] = [5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 0];
/// A flow map with room for every flow of a step. With the default 16384, 20 000 flows
/// inside the idle timeout cannot all be held at any rate (the LRU evicts the oldest,
/// which the collector counts as lost): a matter of size, not of rate.
/// The whole map for the one sending host (no per-host share): the map's capacity is
/// what is measured.
const FLOW_CONFIG: &str = "\nconfig flowlog 'flowlog'\n\toption max_flows '32768'\n\n\
                           config limits 'limits'\n\toption flow_share '100'\n";
/// The pinned programs (`cage_common::PROG_INGRESS`, `PROG_EGRESS`).
const PROGRAMS: [&str; 2] = ["cage_tc_ingress", "cage_tc_egress"];

pub fn flows() -> Result<()> {
    let load = load_average();
    // The kernel times every run of every BPF program while this is open (two clock
    // reads a run; it costs the "with" side, never helps it). Closed when dropped.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling BPF run-time statistics")?;

    let lab = Lab::up(&lab::unique_prefix()).context("lab up")?;
    lab.write_config(&format!("{}{FLOW_CONFIG}", contract::CONFIG_EXTRA));
    let out = lab.cage(&["apply"]);
    if !out.status.success() {
        bail!("cage apply: {}", String::from_utf8_lossy(&out.stderr));
    }
    lab.wait_segment_ready()?;
    lab.pin_router_neighbours(Node::Ai1)?;
    let cfg = cage_agent::config::load(&lab.config_path()).context("the lab's configuration")?;
    let counter = Counter {
        router: lab.netns(Node::Router),
        cfg,
    };
    if !cage_agent::ebpf::is_pinned(&counter.cfg.pin_dir()) {
        bail!(
            "cage apply did not attach the eBPF flow counter:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let tcp = throughput(&lab, &counter, Transport::Tcp)?;
    let udp = throughput(&lab, &counter, Transport::Udp)?;
    let steps = flow_rates(&lab, &counter)?;
    lab.down()?;

    let mut body = String::new();
    let mut summary = Vec::new();
    for (t, pairs) in [(Transport::Tcp, &tcp), (Transport::Udp, &udp)] {
        let udp = t == Transport::Udp;
        body.push_str(&format!(
            "{}:\n\n| pair | with eBPF Mbit/s | without | ratio |{} program ns/packet | program CPU |\n\
             | --- | --- | --- | --- |{} --- | --- |\n",
            t.name(),
            if udp { " lost with | without |" } else { "" },
            if udp { " --- | --- |" } else { "" },
        ));
        for (i, (with, without)) in pairs.iter().enumerate() {
            body.push_str(&format!("{}\n", pair_row(i + 1, with, without)));
        }
        let ratios: Vec<f64> = pairs.iter().map(|(w, wo)| w.mbps / wo.mbps).collect();
        let ratio = median(pairs.iter().map(|p| p.0.mbps)) / median(pairs.iter().map(|p| p.1.mbps));
        let line = format!(
            "{} throughput with/without the eBPF program, ratio of medians: **{ratio:.3}** \
             (goal ≥ 0.95; pairs {:.3}–{:.3}); the program: {:.0} ns a packet, {:.2} % of \
             the machine's CPU time (medians).",
            t.name(),
            pct(&ratios, 0.0),
            pct(&ratios, 100.0),
            median(pairs.iter().map(|p| p.0.prog.ns_per_run())),
            median(pairs.iter().map(|p| p.0.prog.share(p.0.wall))),
        );
        body.push_str(&format!("\n{line}\n\n"));
        summary.push(line);
    }
    body.push_str(
        "New flows:\n\n| offered /s | sent /s | sent | recorded | arrived | update failed | \
         lost | program ns/packet |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for s in &steps {
        body.push_str(&format!("{}\n", s.row()));
    }
    let best = steps
        .iter()
        .filter(|s| s.lost() == 0)
        .map(Step::achieved)
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))));
    let line = match best {
        Some(r) => format!(
            "Highest new-flow rate with every flow recorded: **{r:.0} flows/s** \
             ({FLOWS} flows a step{}).",
            if steps.iter().all(|s| s.lost() == 0) {
                "; no step lost one: the senders, not Cage, set the ceiling"
            } else {
                ""
            }
        ),
        None => "Every step lost flows.".to_owned(),
    };
    body.push_str(&format!("\n{line}\n"));
    summary.push(line);
    for l in &summary {
        println!("xtask bench: {l}");
    }
    let method = format!(
        "Load average at the start: {load}; the machine is shared, so pairs alternate \
         with/without (ABBA) and load moves both sides alike. Lab: `cage apply` (no \
         daemon), Cage's nftables policy in force throughout; \"with\" is the eBPF flow \
         counter attached anew to br-cage (TCX), \"without\" is it detached. Throughput: \
         iperf3 from ai1 to the internet host through the lab router, {RUN_SECS} s a run, \
         {PAIRS} pairs; TCP one stream; UDP one stream of {UDP_LEN}-byte datagrams offered \
         at {UDP_RATE}bit/s (more than the lab forwards); Mbit/s as the receiver counted. \
         \"program\" is the kernel's own run-time statistics of Cage's two programs during \
         the \"with\" run (BPF_ENABLE_STATS): nanoseconds a run (a packet) and their time \
         as a share of all CPUs' time. New flows: from ai1, {FLOWS} one-datagram UDP flows \
         (distinct source ports, raw socket) to the internet host a step, at the offered \
         rate (bursts every ~100 µs), each step with a fresh flow map (flowlog.max_flows \
         32768); \"recorded\" is how many of them the map holds afterwards, \"update \
         failed\" the program's `flow_update_failed` counter, \"arrived\" how many the \
         internet host received, \"lost\" sent − recorded + update failed."
    );
    record("Flow counter: throughput and new-flow rate", &method, &body)
}

fn pair_row(i: usize, with: &Run, without: &Run) -> String {
    let mut row = format!(
        "| {i} | {:.0} | {:.0} | {:.3} |",
        with.mbps,
        without.mbps,
        with.mbps / without.mbps,
    );
    if let (Some(a), Some(b)) = (with.lost, without.lost) {
        row.push_str(&format!(" {a:.1} % | {b:.1} % |"));
    }
    row.push_str(&format!(
        " {:.0} | {:.2} % |",
        with.prog.ns_per_run(),
        with.prog.share(with.wall)
    ));
    row
}

/// Cage's eBPF flow counter on the lab router's bridge, switched from a thread inside the
/// router's namespace (attaching and detaching find the bridge by name there).
struct Counter {
    router: NetNs,
    cfg: cage_agent::config::Config,
}

impl Counter {
    /// Attached anew: a fresh program, flow map and counters.
    fn fresh(&self) -> Result<()> {
        self.off()?;
        let cfg = self.cfg.clone();
        in_ns(&self.router, "attach", move || {
            cage_agent::apply::attach_ebpf(&cfg, false)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    fn off(&self) -> Result<()> {
        let (bridge, pin_dir) = (self.cfg.segment.bridge.clone(), self.cfg.pin_dir());
        in_ns(&self.router, "detach", move || {
            cage_agent::ebpf::detach(&bridge, &pin_dir).map_err(|errors| {
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            })
        })
    }

    fn maps(&self) -> Result<cage_agent::ebpf::Maps> {
        cage_agent::ebpf::Maps::open(&self.cfg.pin_dir()).context("opening the flow map")
    }

    /// Both programs' runs and run time since they were attached.
    fn program_stats(&self) -> Result<Prog> {
        let mut p = Prog::default();
        for name in PROGRAMS {
            let path = self.cfg.pin_dir().join(name);
            let info = aya::programs::ProgramInfo::from_pin(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            p.runs += info.run_count();
            p.time += info.run_time();
        }
        Ok(p)
    }
}

/// What the kernel measured of Cage's programs.
#[derive(Default, Clone, Copy)]
struct Prog {
    runs: u64,
    time: Duration,
}

impl Prog {
    fn ns_per_run(&self) -> f64 {
        self.time.as_nanos() as f64 / self.runs.max(1) as f64
    }

    /// The programs' time as a share of all CPUs' time over `wall`, percent.
    fn share(&self, wall: Duration) -> f64 {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        100.0 * self.time.as_secs_f64() / (wall.as_secs_f64() * cpus as f64).max(1e-9)
    }
}

/// Run `f` on a thread in `ns`.
fn in_ns<T: Send + 'static>(
    ns: &NetNs,
    what: &str,
    f: impl FnOnce() -> std::result::Result<T, String> + Send + 'static,
) -> Result<T> {
    ns.run(what, move || Ok(f()))?
        .map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Tcp,
    /// 512-byte datagrams.
    Udp,
    /// 64-byte datagrams.
    SmallUdp,
}

impl Transport {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "TCP",
            Transport::Udp => "UDP",
            Transport::SmallUdp => "UDP 64 B",
        }
    }

    /// The datagrams' payload length, for UDP.
    pub(crate) fn datagram_len(self) -> Option<&'static str> {
        match self {
            Transport::Tcp => None,
            Transport::Udp => Some(UDP_LEN),
            Transport::SmallUdp => Some(SMALL_UDP_LEN),
        }
    }
}

/// One iperf3 run.
pub(crate) struct Run {
    /// What the receiver got, Mbit/s.
    pub(crate) mbps: f64,
    /// UDP: datagrams lost, percent.
    pub(crate) lost: Option<f64>,
    /// How long the client ran.
    wall: Duration,
    /// Cage's programs during the run (zero without them).
    prog: Prog,
}

/// `PAIRS` pairs of runs, with the eBPF program and without.
fn throughput(lab: &Lab, counter: &Counter, t: Transport) -> Result<Vec<(Run, Run)>> {
    let mut pairs = Vec::new();
    for i in 0..PAIRS {
        let order = if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        let (mut with, mut without) = (None, None);
        for on in order {
            if on {
                counter.fresh()?;
            } else {
                counter.off()?;
            }
            let mut r = iperf(lab, t)?;
            if on {
                r.prog = counter.program_stats()?;
                check_counted(counter, t)?;
                with = Some(r);
            } else {
                without = Some(r);
            }
        }
        let (Some(with), Some(without)) = (with, without) else {
            unreachable!("each pair has both runs")
        };
        println!(
            "xtask bench: {} pair {}: with eBPF {:.0} Mbit/s, without {:.0} Mbit/s, ratio \
             {:.3}{}; program {:.0} ns/packet, {:.2} % CPU",
            t.name(),
            i + 1,
            with.mbps,
            without.mbps,
            with.mbps / without.mbps,
            match (with.lost, without.lost) {
                (Some(a), Some(b)) => format!(", lost {a:.1} % / {b:.1} %"),
                _ => String::new(),
            },
            with.prog.ns_per_run(),
            with.prog.share(with.wall),
        );
        pairs.push((with, without));
    }
    Ok(pairs)
}

/// The program did see the run: the flow map holds iperf3's data flow with packets
/// from the client (else "with" would be measuring nothing).
fn check_counted(counter: &Counter, t: Transport) -> Result<()> {
    let proto = if t == Transport::Tcp { 6 } else { 17 };
    let packets: u64 = counter
        .maps()?
        .flows()?
        .iter()
        .filter(|(k, _)| {
            k.protocol == proto && k.server_ip() == PUBLIC4 && k.server_port == IPERF_PORT
        })
        .map(|(_, v)| v.packets_from_client)
        .sum();
    if packets < 1000 {
        bail!(
            "the flow map holds only {packets} packets of the iperf3 run: is the program \
             attached?"
        );
    }
    Ok(())
}

/// One iperf3 run from ai1 to the internet host, with a one-off server.
pub(crate) fn iperf(lab: &Lab, t: Transport) -> Result<Run> {
    let (inet, ai1) = (lab.ns(Node::Inet), lab.ns(Node::Ai1));
    let port = IPERF_PORT.to_string();
    let server = Command::new("ip")
        .args(["netns", "exec", &inet, "iperf3", "-s", "-1", "-B"])
        .arg(PUBLIC4.to_string())
        .args(["-p", &port])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s")?;
    let mut server = Reaped(server);
    wait_listening(&inet, &port)?;
    let secs = RUN_SECS.to_string();
    let mut client = Command::new("ip");
    client
        .args(["netns", "exec", &ai1, "iperf3", "-c"])
        .arg(PUBLIC4.to_string())
        .args(["-p", &port, "-t", &secs, "-i", "0", "-J"]);
    if let Some(len) = t.datagram_len() {
        client.args(["-u", "-b", UDP_RATE, "-l", len]);
    }
    let start = Instant::now();
    let out = output_within(&mut client, Duration::from_secs(RUN_SECS + 20))?;
    let wall = start.elapsed();
    server.finish(Duration::from_secs(3));
    let json = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("iperf3 client failed ({}): {json}", out.status);
    }
    // "sum_received": what the server counted (iperf3 ≥ 3.10 reports it for UDP too).
    let mbps = json_number(&json, &["sum_received"], "bits_per_second")
        .with_context(|| format!("no throughput in iperf3's output: {json}"))?
        / 1e6;
    let lost = match t {
        Transport::Tcp => None,
        Transport::Udp | Transport::SmallUdp => {
            json_number(&json, &["sum_received"], "lost_percent")
        }
    };
    Ok(Run {
        mbps,
        lost,
        wall,
        prog: Prog::default(),
    })
}

/// A child process killed and reaped when dropped (our own iperf3, by its pid).
struct Reaped(std::process::Child);

impl Reaped {
    /// Wait up to `limit` for it to exit by itself.
    fn finish(&mut self, limit: Duration) {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn wait_listening(ns: &str, port: &str) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "ss", "-Hltn", "sport", "="])
            .arg(format!(":{port}"))
            .output()?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        if Instant::now() >= until {
            bail!("iperf3 -s does not listen on port {port} in {ns}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run a command and collect its output; kill it after `limit`.
fn output_within(cmd: &mut Command, limit: Duration) -> Result<std::process::Output> {
    let shown = format!("{cmd:?}");
    let mut child = Reaped(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {shown}"))?,
    );
    // Read while it runs: a command that fills a pipe would block.
    let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = read(child.0.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read(child.0.stderr.take().map(|p| Box::new(p) as _));
    let until = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.0.try_wait()? {
            break status;
        }
        if Instant::now() >= until {
            bail!("{shown} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(std::process::Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// The number after `"key":` in iperf3's JSON output, found after each of `path`'s keys
/// in turn (e.g. "sum_received", which only the final summary has): enough for iperf3's
/// fixed layout, without a JSON parser in xtask.
fn json_number(json: &str, path: &[&str], key: &str) -> Option<f64> {
    let mut rest = json;
    for section in path {
        let quoted = format!("\"{section}\"");
        rest = &rest[rest.find(&quoted)? + quoted.len()..];
    }
    let quoted = format!("\"{key}\"");
    rest = rest[rest.find(&quoted)? + quoted.len()..].trim_start();
    rest = rest.strip_prefix(':')?.trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// One step of the new-flow test.
struct Step {
    /// Offered rate per second (0: as fast as the senders go).
    rate: u32,
    sent: u32,
    elapsed: Duration,
    /// Of the step's flows, how many the flow map holds.
    recorded: u32,
    /// How many reached the internet host.
    arrived: u32,
    /// The program's `flow_update_failed` counter (packets it could not record).
    failed: u64,
    /// The program's `flows_created` counter (the step's flows and any other).
    created: u64,
    prog: Prog,
}

impl Step {
    fn achieved(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn lost(&self) -> u64 {
        u64::from(self.sent.saturating_sub(self.recorded)) + self.failed
    }

    fn offered(&self) -> String {
        if self.rate == 0 {
            "max (2 senders)".to_owned()
        } else {
            self.rate.to_string()
        }
    }

    fn row(&self) -> String {
        format!(
            "| {} | {:.0} | {} | {} | {} | {} | {} | {:.0} |",
            self.offered(),
            self.achieved(),
            self.sent,
            self.recorded,
            self.arrived,
            self.failed,
            self.lost(),
            self.prog.ns_per_run(),
        )
    }
}

/// Bursts of `FLOWS` new flows at each rate of `RATES`, each against a fresh flow map.
fn flow_rates(lab: &Lab, counter: &Counter) -> Result<Vec<Step>> {
    // What reached the internet host: (step << 16 | source port) from each payload.
    let arrived: Arc<Mutex<HashSet<u32>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = {
        let (arrived, stop) = (arrived.clone(), stop.clone());
        lab.netns(Node::Inet).spawn("flow receiver", move || {
            let s = UdpSocket::bind((PUBLIC4, FLOW_PORT)).expect("bind");
            // A deep receive queue, so that bursts are not dropped here (root may exceed
            // rmem_max).
            let size: libc::c_int = 32 << 20;
            // SAFETY: setsockopt reads `size`, a c_int we own, for the length given.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            let mut buf = [0u8; 64];
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(300) {
                if let Ok(n) = s.recv(&mut buf) {
                    if n >= 3 {
                        let port = u16::from_be_bytes([buf[1], buf[2]]);
                        arrived
                            .lock()
                            .unwrap()
                            .insert(u32::from(buf[0]) << 16 | u32::from(port));
                    }
                }
            }
            Ok(())
        })?
    };
    let ai1 = lab.netns(Node::Ai1);
    let result = (|| -> Result<Vec<Step>> {
        // The path works end to end before anything is measured.
        in_ns(&ai1, "warm-up", || send_flows(0, 1_000, FIRST_SPORT, 100))?;
        wait_quiet(&arrived, 0)?;
        if count(&arrived, 0) == 0 {
            bail!("no warm-up datagram reached the internet host");
        }
        let mut steps = Vec::new();
        for (i, &rate) in RATES.iter().enumerate() {
            let tag = i as u8 + 1;
            counter.fresh()?;
            let (sent, elapsed) = if rate == 0 {
                let half = FLOWS / 2;
                let senders =
                    [(FIRST_SPORT, half), (FIRST_SPORT + half, FLOWS - half)].map(|(first, n)| {
                        ai1.spawn("new flows", move || Ok(send_flows(tag, 0, first, n)))
                    });
                let mut total = (0, Duration::ZERO);
                for s in senders {
                    let (sent, took) = s?.join()?.map_err(anyhow::Error::msg)?;
                    total = (total.0 + sent, total.1.max(took));
                }
                total
            } else {
                in_ns(&ai1, "new flows", move || {
                    send_flows(tag, rate, FIRST_SPORT, FLOWS)
                })?
            };
            wait_quiet(&arrived, tag)?;
            let maps = counter.maps()?;
            let stats = maps.stats()?;
            let recorded = maps
                .flows()?
                .iter()
                .filter(|(k, _)| {
                    k.protocol == 17
                        && k.client_ip() == lab::AI1_4
                        && k.server_ip() == PUBLIC4
                        && k.server_port == FLOW_PORT
                        && (FIRST_SPORT..FIRST_SPORT + FLOWS).contains(&k.client_port)
                })
                .count() as u32;
            let step = Step {
                rate,
                sent,
                elapsed,
                recorded,
                arrived: count(&arrived, tag),
                failed: stats.flow_update_failed,
                created: stats.flows_created,
                prog: counter.program_stats()?,
            };
            println!(
                "xtask bench: new flows offered {}/s: sent {} in {:.2} s ({:.0}/s), recorded \
                 {}, arrived {}, update failed {}, flows created {}, lost {}; program {:.0} \
                 ns/packet",
                step.offered(),
                step.sent,
                elapsed.as_secs_f64(),
                step.achieved(),
                step.recorded,
                step.arrived,
                step.failed,
                step.created,
                step.lost(),
                step.prog.ns_per_run(),
            );
            steps.push(step);
        }
        Ok(steps)
    })();
    stop.store(true, Ordering::Relaxed);
    receiver.join()?;
    result
}

fn count(arrived: &Mutex<HashSet<u32>>, tag: u8) -> u32 {
    arrived
        .lock()
        .unwrap()
        .iter()
        .filter(|id| *id >> 16 == u32::from(tag))
        .count() as u32
}

/// Wait (bounded) until no more of step `tag`'s datagrams arrive for 300 ms.
fn wait_quiet(arrived: &Mutex<HashSet<u32>>, tag: u8) -> Result<()> {
    let start = Instant::now();
    let (mut last, mut since) = (u32::MAX, Instant::now());
    while start.elapsed() < Duration::from_secs(10) {
        let n = count(arrived, tag);
        if n != last {
            (last, since) = (n, Instant::now());
        } else if since.elapsed() > Duration::from_millis(300) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("datagrams of step {tag} still arriving after 10 s")
}

/// From the calling thread's namespace (ai1): `flows` one-datagram UDP flows to the
/// internet host, source ports from `first` up, at `rate` per second (0: as fast as it
/// goes), through a raw socket so that a new flow costs one `sendto`. Returns how many
/// were sent and how long it took.
fn send_flows(
    tag: u8,
    rate: u32,
    first: u16,
    flows: u16,
) -> std::result::Result<(u32, Duration), String> {
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (lab::AI1_4, PUBLIC4) else {
        return Err("the lab's addresses are not IPv4".into());
    };
    // SAFETY: socket has no memory preconditions; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(format!("raw socket: {}", std::io::Error::last_os_error()));
    }
    // IPv4 (the kernel fills in the checksum and, when 0, the id) and UDP (checksum 0:
    // none, allowed over IPv4); the payload is the step and the source port.
    const LEN: usize = 20 + 8 + 4;
    let mut pkt = [0u8; LEN];
    pkt[0] = 0x45;
    pkt[2..4].copy_from_slice(&(LEN as u16).to_be_bytes());
    pkt[8] = 64;
    pkt[9] = 17;
    pkt[12..16].copy_from_slice(&src.octets());
    pkt[16..20].copy_from_slice(&dst.octets());
    pkt[22..24].copy_from_slice(&FLOW_PORT.to_be_bytes());
    pkt[24..26].copy_from_slice(&((LEN - 20) as u16).to_be_bytes());
    pkt[28] = tag;
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        },
        sin_zero: [0; 8],
    };
    let all = u32::from(flows);
    let limit = Duration::from_secs(20);
    let start = Instant::now();
    let (mut next, mut sent) = (0u32, 0u32);
    while next < all && start.elapsed() < limit {
        let due = if rate == 0 {
            all
        } else {
            ((start.elapsed().as_secs_f64() * f64::from(rate)) as u32 + 1).min(all)
        };
        while next < due {
            let port = first + next as u16;
            pkt[20..22].copy_from_slice(&port.to_be_bytes());
            pkt[29..31].copy_from_slice(&port.to_be_bytes());
            // SAFETY: the buffer and the address are ours and outlive the call.
            let n = unsafe {
                libc::sendto(
                    fd,
                    pkt.as_ptr().cast(),
                    LEN,
                    0,
                    (&to as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if n == LEN as isize {
                sent += 1;
            }
            next += 1;
        }
        if next < all {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    let elapsed = start.elapsed();
    // SAFETY: fd is the socket opened above, closed once.
    unsafe { libc::close(fd) };
    Ok((sent, elapsed))
}
