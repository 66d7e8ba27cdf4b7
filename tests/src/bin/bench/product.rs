//! `cargo xtask bench product`: Cage as a whole against the other ways a travel router
//! could forward a caged host's traffic, side by side in one run (issue 14):
//!
//! - `plain`: a plain router, the segment routed and masqueraded, no policy at all
//!   ([`Lab::plain_segment`]);
//! - `hand`: the same router with a minimal hand-written nftables ruleset that enforces
//!   the connectivity contract ([`HAND_RULESET`]), its ports isolated;
//! - `cage`: `cage run` with the contract's configuration, as the lab runs Cage: its
//!   policy, the layer-2 bindings, the eBPF flow counter and the flow log.
//!
//! Each variant of each round gets a fresh lab; the rounds alternate the order (plain
//! hand cage, cage hand plain, …: ABBA for three), so that a drift of the machine's speed
//! favours none. In each lab, after a probe that the variant forwards what it should and
//! denies what it should, iperf3 from ai1 to the internet host: 64-byte UDP, 512-byte
//! UDP, bulk TCP. For `cage`, its programs' run time per packet from the kernel's own
//! statistics, and once per lab, in one more 64-byte UDP run, a trivial TC program with
//! one counter attached next to Cage's: the floor any TC program costs in this harness.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cage_agent::probe::{self, Outcome, Probe};
use cage_tests::contract;
use cage_tests::lab::{self, Lab, Node, HOTEL4, LAN_HOST4, PUBLIC4};

use crate::flows::{iperf, Run, Transport, RUN_SECS, UDP_RATE};
use crate::results::{load_average, median, record};

/// Rounds; each measures the three variants, in an order that alternates.
const ROUNDS: usize = 4;
/// What each lab measures, in this order.
const TRANSPORTS: [Transport; 3] = [Transport::SmallUdp, Transport::Udp, Transport::Tcp];
/// Cage's pinned programs (`cage_common::PROG_INGRESS`, `PROG_EGRESS`).
const PROGRAMS: [&str; 2] = ["cage_tc_ingress", "cage_tc_egress"];

/// The `hand` variant: what a careful person would write by hand for the lab's router to
/// enforce the contract: the caged hosts (`br-cage`, 192.168.10.0/24, fd00:cafe:10::/64)
/// reach the internet through the WAN (`wan`) and nothing else (the LAN, the router, the
/// private and special ranges, the hotel's network), DNS and DHCP to the router, replies
/// allowed, masqueraded. Replaces the plain router's `labplain` in one transaction.
const HAND_RULESET: &str = r#"delete table inet labplain
table inet hand {
	comment "bench product: a minimal hand-written cage"
	set deny4 {
		type ipv4_addr; flags interval
		elements = { 0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16,
			     172.16.0.0/12, 192.0.0.0/24, 192.168.0.0/16, 198.18.0.0/15, 224.0.0.0/3 }
	}
	set deny6 {
		type ipv6_addr; flags interval
		elements = { ::/127, ::ffff:0:0/96, fc00::/7, fe80::/10, ff00::/8,
			     2001:db8:99::/64 }
	}
	chain input {
		type filter hook input priority filter; policy accept;
		iifname != "br-cage" accept
		ct state established,related accept
		meta l4proto { tcp, udp } th dport 53 accept comment "DNS"
		udp dport { 67, 547 } accept comment "DHCP"
		icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } accept
		counter drop comment "nothing else to the router"
	}
	chain forward {
		type filter hook forward priority filter; policy accept;
		ct state established,related accept
		oifname "br-cage" counter drop comment "nothing new into the segment"
		iifname != "br-cage" accept
		oifname != "wan" counter drop comment "out by the WAN only"
		ip saddr != 192.168.10.0/24 counter drop comment "spoofed"
		ip6 saddr != fd00:cafe:10::/64 counter drop comment "spoofed"
		ip daddr @deny4 counter drop comment "private, CGNAT, link-local, multicast"
		ip6 daddr @deny6 counter drop comment "ULA, link-local, multicast, the hotel"
	}
	chain srcnat {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "wan" masquerade
	}
}
"#;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Plain,
    Hand,
    Cage,
}

impl Variant {
    const ALL: [Variant; 3] = [Variant::Plain, Variant::Hand, Variant::Cage];

    fn name(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::Hand => "hand",
            Variant::Cage => "cage",
        }
    }
}

/// One variant in one fresh lab.
struct Measured {
    variant: Variant,
    /// One run each of `TRANSPORTS`, in order.
    runs: Vec<Run>,
    /// `cage`: its programs' nanoseconds a run during each of `runs`.
    cage_ns: Vec<f64>,
    /// `cage`: the run with the trivial program next to Cage's.
    floor: Option<Floor>,
}

/// One 64-byte UDP run with Cage's programs and the trivial one on the same hooks.
struct Floor {
    cage_ns: f64,
    trivial_ns: f64,
}

/// The figure a run is judged by: received kpps for UDP, Gbit/s for TCP.
fn figure(t: Transport, r: &Run) -> f64 {
    match t.datagram_len().and_then(|l| l.parse::<f64>().ok()) {
        Some(len) => r.mbps * 1e6 / (len * 8.0) / 1e3,
        None => r.mbps / 1e3,
    }
}

/// A transport as this benchmark's tables name it (the datagrams' size said each time).
fn label(t: Transport) -> &'static str {
    match t {
        Transport::SmallUdp => "UDP 64 B",
        Transport::Udp => "UDP 512 B",
        Transport::Tcp => "TCP",
    }
}

fn unit(t: Transport) -> &'static str {
    if t.datagram_len().is_some() {
        "kpps"
    } else {
        "Gbit/s"
    }
}

pub fn product() -> Result<()> {
    let started = Instant::now();
    let load = load_average();
    let model = cpu_model();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("xtask bench: machine: {cpus} CPUs, {model}; load average {load}");
    // The kernel times every run of every BPF program while this is open (the same
    // switch as kernel.bpf_stats_enabled=1, closed when dropped). Only `cage` has
    // programs, so only it pays the two clock reads a run.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling BPF run-time statistics")?;

    let mut all: Vec<Measured> = Vec::new();
    for round in 0..ROUNDS {
        let mut order = Variant::ALL;
        if round % 2 == 1 {
            order.reverse();
        }
        for v in order {
            let m = measure(v).with_context(|| format!("round {}, {}", round + 1, v.name()))?;
            println!("xtask bench: round {}: {}", round + 1, row(round + 1, &m));
            all.push(m);
        }
    }
    let load_end = load_average();
    let took = started.elapsed();
    println!("xtask bench: machine: {cpus} CPUs, {model}; load average at the end {load_end}");

    let medians = |v: Variant, i: usize| {
        median(
            all.iter()
                .filter(|m| m.variant == v)
                .map(|m| figure(TRANSPORTS[i], &m.runs[i])),
        )
    };
    let mut body = String::from("Medians, and their ratio to `plain`'s:\n\n| variant |");
    for t in TRANSPORTS {
        body.push_str(&format!(" {} {} | ratio |", label(t), unit(t)));
    }
    body.push_str(" program ns/packet (UDP 64 B, UDP 512 B, TCP) |\n| --- |");
    body.push_str(&" --- | --- |".repeat(TRANSPORTS.len()));
    body.push_str(" --- |\n");
    let mut summary = Vec::new();
    for v in Variant::ALL {
        body.push_str(&format!("| {} |", v.name()));
        let mut parts = Vec::new();
        for (i, t) in TRANSPORTS.iter().enumerate() {
            let (m, base) = (medians(v, i), medians(Variant::Plain, i));
            body.push_str(&format!(" {} | {:.3} |", fmt(*t, m), m / base));
            parts.push(format!(
                "{} {} {} ({:.3})",
                label(*t),
                fmt(*t, m),
                unit(*t),
                m / base
            ));
        }
        let ns = if v == Variant::Cage {
            let ns: Vec<String> = (0..TRANSPORTS.len())
                .map(|i| {
                    let per = median(all.iter().filter(|m| m.variant == v).map(|m| m.cage_ns[i]));
                    format!("{per:.0}")
                })
                .collect();
            ns.join(" / ")
        } else {
            "–".to_owned()
        };
        body.push_str(&format!(" {ns} |\n"));
        summary.push(format!(
            "{}: {} (medians; ratio to plain){}",
            v.name(),
            parts.join(", "),
            if v == Variant::Cage {
                format!("; Cage's programs {ns} ns/packet")
            } else {
                String::new()
            }
        ));
    }
    body.push('\n');
    for v in [Variant::Hand, Variant::Cage] {
        let ratios: Vec<String> = TRANSPORTS
            .iter()
            .enumerate()
            .map(|(i, t)| {
                format!(
                    "{} **{:.3}**",
                    label(*t),
                    medians(v, i) / medians(Variant::Plain, i)
                )
            })
            .collect();
        body.push_str(&format!(
            "`{}` against `plain`, ratio of medians: {}.\n\n",
            v.name(),
            ratios.join(", ")
        ));
    }
    // The same packet rate at 64 and 512 bytes means the sender set it, not the router.
    let (small, large) = (medians(Variant::Plain, 0), medians(Variant::Plain, 1));
    if (small / large - 1.0).abs() < 0.25 {
        body.push_str(&format!(
            "The plain router received about as many packets a second at 64 bytes as at \
             512 ({small:.0} against {large:.0} kpps): iperf3's sender, not the forwarding, \
             set the UDP rates. The lab forwards in the sending CPU's softirq, so what a \
             variant costs a packet shows as fewer packets sent on the same CPUs.\n\n"
        ));
    }
    let floors: Vec<&Floor> = all.iter().filter_map(|m| m.floor.as_ref()).collect();
    let floor_line = format!(
        "In the same 64-byte UDP run, Cage's two programs {:.0} ns/packet, a trivial TC \
         program with one counter on the same hooks {:.0} ns/packet (medians over {} labs).",
        median(floors.iter().map(|f| f.cage_ns)),
        median(floors.iter().map(|f| f.trivial_ns)),
        floors.len(),
    );
    summary.push(floor_line.clone());
    body.push_str(&format!("{floor_line}\n\nEach lab:\n\n| round | variant |"));
    for t in TRANSPORTS {
        body.push_str(&format!(" {} {} |", label(t), unit(t)));
    }
    body.push_str(
        " UDP lost (64 B, 512 B) | Cage ns/packet | floor run: Cage, trivial ns/packet |\n| --- | --- |",
    );
    body.push_str(&" --- |".repeat(TRANSPORTS.len() + 3));
    body.push('\n');
    for (i, m) in all.iter().enumerate() {
        body.push_str(&format!("{}\n", row(i / Variant::ALL.len() + 1, m)));
    }
    for l in &summary {
        println!("xtask bench: {l}");
    }
    println!("xtask bench: the run took {:.0} s", took.as_secs_f64());
    let busy = match load.split_whitespace().next().map(str::parse::<f64>) {
        Some(Ok(l)) if l > 0.5 * cpus as f64 => format!(
            " The machine was busy with other work (load {l:.2} on {cpus} CPUs): the \
             ratios, measured side by side, mean more than the absolute figures."
        ),
        _ => String::new(),
    };
    let method = format!(
        "CPU: {model}. Load average at the start: {load}, at the end: {load_end}.{busy} \
         Three variants forward ai1's traffic to the internet host: `plain`, the lab \
         router with the segment bridged, routed and masqueraded and no policy; `hand`, \
         that router with a minimal hand-written nftables ruleset for the same contract \
         (input: DNS and DHCP from the segment; forward: replies, new connections out of \
         the WAN only, not spoofed, not to private, CGNAT, link-local, multicast, ULA or \
         the hotel's ranges; masquerade; the bridge ports isolated; the ruleset is in \
         `tests/src/bin/bench/product.rs`); `cage`, `cage run` with the contract's \
         configuration (policy, layer-2 bindings, per-host shares, eBPF flow counter on \
         br-cage by TCX, flow log). A fresh lab for each variant of each round, {ROUNDS} \
         rounds alternating the order (plain hand cage, cage hand plain); in each lab, a \
         probe first (ai1 reaches the internet host; the LAN and hotel hosts only without \
         a policy), then iperf3 from ai1 to the internet host, {RUN_SECS} s a run: UDP \
         datagrams of 64 and 512 bytes offered at {UDP_RATE}bit/s (received packets a \
         second as the receiver counted; at 64 bytes iperf3's sender may be the limit), \
         TCP one stream. \"Cage ns/packet\": the kernel's run-time statistics of Cage's \
         two programs (BPF_ENABLE_STATS, the switch behind kernel.bpf_stats_enabled): \
         run_time_ns / run_cnt over each run. \"floor run\": one more 64-byte UDP run \
         with a trivial TC program (one array counter, atomic add; hand-assembled, \
         loaded with bpf(2), attached by `tc` with clsact to the same bridge's ingress \
         and egress) next to Cage's, both measured over that run. One run took {:.0} s.",
        took.as_secs_f64()
    );
    record(
        "Product: plain router, hand-written nftables, Cage",
        &method,
        &body,
    )
}

fn fmt(t: Transport, v: f64) -> String {
    if t.datagram_len().is_some() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn row(round: usize, m: &Measured) -> String {
    let mut s = format!("| {round} | {} |", m.variant.name());
    for (t, r) in TRANSPORTS.iter().zip(&m.runs) {
        s.push_str(&format!(" {} |", fmt(*t, figure(*t, r))));
    }
    let lost: Vec<String> = m
        .runs
        .iter()
        .filter_map(|r| r.lost.map(|l| format!("{l:.1} %")))
        .collect();
    s.push_str(&format!(" {} |", lost.join(", ")));
    if m.cage_ns.is_empty() {
        s.push_str(" – |");
    } else {
        let ns: Vec<String> = m.cage_ns.iter().map(|n| format!("{n:.0}")).collect();
        s.push_str(&format!(" {} |", ns.join(" / ")));
    }
    match &m.floor {
        Some(f) => s.push_str(&format!(" {:.0}, {:.0} |", f.cage_ns, f.trivial_ns)),
        None => s.push_str(" – |"),
    }
    s
}

/// A fresh lab with `v` in its router; each transport measured once.
fn measure(v: Variant) -> Result<Measured> {
    let lab = Lab::up(&lab::unique_prefix()).context("lab up")?;
    // Declared after the lab, so dropped before it: `cage run` stops before its
    // namespace goes.
    let mut daemon = None;
    match v {
        Variant::Plain => lab.plain_segment()?,
        Variant::Hand => {
            lab.plain_segment()?;
            for port in ["cage1", "cage2"] {
                lab.ip(
                    Node::Router,
                    &[
                        "link",
                        "set",
                        port,
                        "type",
                        "bridge_slave",
                        "isolated",
                        "on",
                    ],
                )?;
            }
            lab.nft(Node::Router, HAND_RULESET);
        }
        Variant::Cage => {
            lab.write_config(contract::CONFIG_EXTRA);
            daemon = Some(crate::cage_run(&lab)?);
            lab.wait_segment_ready()?;
        }
    }
    lab.pin_router_neighbours(Node::Ai1)?;
    check_contract(&lab, v)?;
    let pin_dir = match v {
        Variant::Cage => Some(
            cage_agent::config::load(&lab.config_path())
                .context("the lab's configuration")?
                .pin_dir(),
        ),
        _ => None,
    };
    let cage_stats = || -> Result<(u64, Duration)> {
        match &pin_dir {
            Some(dir) => programs_stats(dir),
            None => Ok((0, Duration::ZERO)),
        }
    };
    let (mut runs, mut cage_ns) = (Vec::new(), Vec::new());
    for t in TRANSPORTS {
        let before = cage_stats()?;
        runs.push(iperf(&lab, t)?);
        if pin_dir.is_some() {
            cage_ns.push(ns_per_run(before, cage_stats()?));
        }
    }
    let floor = match &pin_dir {
        Some(dir) => Some(floor(&lab, dir)?),
        None => None,
    };
    drop(daemon);
    lab.down()?;
    Ok(Measured {
        variant: v,
        runs,
        cage_ns,
        floor,
    })
}

/// The variant does what it claims before it is measured: ai1 reaches the internet host;
/// the LAN host and the hotel's host only without a policy.
fn check_contract(lab: &Lab, v: Variant) -> Result<()> {
    let ai1 = lab.netns(Node::Ai1);
    for (addr, open) in [
        (PUBLIC4, true),
        (LAN_HOST4, v == Variant::Plain),
        (HOTEL4, v == Variant::Plain),
    ] {
        let answered = (0..3).any(|_| {
            let p = Probe::icmp(addr).timeout(Duration::from_millis(300));
            probe::probe_in(&ai1, &p).is_ok_and(|a| a.outcome == Outcome::Answered)
        });
        if answered != open {
            bail!(
                "{}: ai1 → {addr} {}, but should {}\n{}",
                v.name(),
                if answered {
                    "answered"
                } else {
                    "did not answer"
                },
                if open { "answer" } else { "not" },
                lab.nft_ruleset(Node::Router)
            );
        }
    }
    Ok(())
}

/// Runs and run time of Cage's two programs since they were loaded.
fn programs_stats(pin_dir: &Path) -> Result<(u64, Duration)> {
    let (mut runs, mut time) = (0, Duration::ZERO);
    for name in PROGRAMS {
        let (r, t) = program_stats(&pin_dir.join(name))?;
        runs += r;
        time += t;
    }
    Ok((runs, time))
}

fn program_stats(pin: &Path) -> Result<(u64, Duration)> {
    let info = aya::programs::ProgramInfo::from_pin(pin)
        .with_context(|| format!("reading {}", pin.display()))?;
    Ok((info.run_count(), info.run_time()))
}

fn ns_per_run(before: (u64, Duration), after: (u64, Duration)) -> f64 {
    let runs = after.0.saturating_sub(before.0);
    (after.1.saturating_sub(before.1)).as_nanos() as f64 / runs.max(1) as f64
}

/// One more 64-byte UDP run with the trivial program on br-cage's ingress and egress
/// next to Cage's: both programs' nanoseconds a run over it.
fn floor(lab: &Lab, pin_dir: &Path) -> Result<Floor> {
    let pin = lab::bpf_dir(lab.prefix()).join("bench_trivial");
    let counter = trivial::load(&pin)?;
    let tc = |args: &[&str]| {
        let out = lab
            .in_router_netns()
            .arg("tc")
            .args(args)
            .output()
            .context("running tc")?;
        if !out.status.success() {
            bail!(
                "tc {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    // Cage attaches by TCX where the kernel has it; the clsact qdisc is the trivial
    // program's own (its filters run after TCX's programs when those return UNSPEC).
    tc(&["qdisc", "add", "dev", "br-cage", "clsact"])?;
    let path = pin.to_string_lossy();
    for hook in ["ingress", "egress"] {
        tc(&[
            "filter",
            "add",
            "dev",
            "br-cage",
            hook,
            "bpf",
            "object-pinned",
            &path,
            "direct-action",
        ])?;
    }
    let (c0, t0) = (programs_stats(pin_dir)?, program_stats(&pin)?);
    iperf(lab, Transport::SmallUdp)?;
    let (c1, t1) = (programs_stats(pin_dir)?, program_stats(&pin)?);
    let counted = trivial::read(&counter)?;
    let trivial_runs = t1.0 - t0.0;
    if trivial_runs < 1000 || counted < t1.0 {
        bail!(
            "the trivial program ran {trivial_runs} times in the run and counted {counted} \
             of its {} runs: is it attached?",
            t1.0
        );
    }
    Ok(Floor {
        cage_ns: ns_per_run(c0, c1),
        trivial_ns: ns_per_run(t0, t1),
    })
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

/// The trivial TC program: one counter in an array map, incremented atomically, and the
/// packet let go on (TC_ACT_UNSPEC). Eleven instructions, assembled here and loaded with
/// bpf(2) directly: Cage's eBPF toolchain builds only Cage's program (`cage-ebpf`), and a
/// second program is not worth a second eBPF crate.
mod trivial {
    use super::*;

    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

    /// `union bpf_attr`, as bytes: large enough for the commands used, zero elsewhere
    /// (the kernel checks that what it does not know is zero).
    struct Attr([u8; 128]);

    impl Attr {
        fn new() -> Attr {
            Attr([0; 128])
        }
        fn u32(mut self, off: usize, v: u32) -> Attr {
            self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
            self
        }
        fn u64(mut self, off: usize, v: u64) -> Attr {
            self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
            self
        }
        fn call(mut self, cmd: libc::c_long, what: &str) -> Result<libc::c_long> {
            // SAFETY: the attribute is 128 bytes we own, laid out as `union bpf_attr` for
            // `cmd`; every pointer in it points to memory that outlives the call.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    cmd,
                    self.0.as_mut_ptr(),
                    self.0.len() as libc::c_uint,
                )
            };
            if r < 0 {
                bail!("bpf({what}): {}", std::io::Error::last_os_error());
            }
            Ok(r)
        }
    }

    fn fd(raw: libc::c_long) -> OwnedFd {
        // SAFETY: a file descriptor the kernel just returned to us, owned by no one else.
        unsafe { OwnedFd::from_raw_fd(raw as i32) }
    }

    /// One instruction: opcode, destination and source registers, offset, immediate.
    fn insn(op: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
        let mut i = [0u8; 8];
        i[0] = op;
        i[1] = dst | src << 4;
        i[2..4].copy_from_slice(&off.to_le_bytes());
        i[4..8].copy_from_slice(&imm.to_le_bytes());
        i
    }

    /// Load the program, pin it at `pin`, and return its counter map.
    pub fn load(pin: &Path) -> Result<OwnedFd> {
        let map = fd(Attr::new()
            .u32(0, BPF_MAP_TYPE_ARRAY)
            .u32(4, 4)
            .u32(8, 8)
            .u32(12, 1)
            .call(BPF_MAP_CREATE, "map create")?);
        let prog: Vec<u8> = [
            insn(0x62, 10, 0, -4, 0),             // *(u32 *)(r10 - 4) = 0
            insn(0xbf, 2, 10, 0, 0),              // r2 = r10
            insn(0x07, 2, 0, 0, -4),              // r2 += -4
            insn(0x18, 1, 1, 0, map.as_raw_fd()), // r1 = the map (ld_imm64,
            insn(0, 0, 0, 0, 0),                  //   BPF_PSEUDO_MAP_FD)
            insn(0x85, 0, 0, 0, 1),               // call bpf_map_lookup_elem
            insn(0x15, 0, 0, 2, 0),               // if r0 == 0 goto +2
            insn(0xb7, 1, 0, 0, 1),               // r1 = 1
            insn(0xdb, 0, 1, 0, 0),               // lock *(u64 *)(r0 + 0) += r1
            insn(0xb7, 0, 0, 0, -1),              // r0 = TC_ACT_UNSPEC
            insn(0x95, 0, 0, 0, 0),               // exit
        ]
        .concat();
        let license = b"GPL\0";
        let mut log = vec![0u8; 64 * 1024];
        let mut name = [0u8; 16];
        name[..13].copy_from_slice(b"bench_trivial");
        let mut attr = Attr::new()
            .u32(0, BPF_PROG_TYPE_SCHED_CLS)
            .u32(4, (prog.len() / 8) as u32)
            .u64(8, prog.as_ptr() as u64)
            .u64(16, license.as_ptr() as u64)
            .u32(24, 1)
            .u32(28, log.len() as u32)
            .u64(32, log.as_mut_ptr() as u64);
        attr.0[48..64].copy_from_slice(&name);
        let loaded = attr.call(BPF_PROG_LOAD, "prog load").map_err(|e| {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            e.context(String::from_utf8_lossy(&log[..end]).into_owned())
        })?;
        let prog = fd(loaded);
        let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes())?;
        if let Some(dir) = pin.parent() {
            std::fs::create_dir_all(dir)?;
        }
        Attr::new()
            .u64(0, path.as_ptr() as u64)
            .u32(8, prog.as_raw_fd() as u32)
            .call(BPF_OBJ_PIN, "obj pin")?;
        Ok(map)
    }

    /// The counter's value.
    pub fn read(map: &OwnedFd) -> Result<u64> {
        let key = 0u32;
        let mut value = 0u64;
        Attr::new()
            .u32(0, map.as_raw_fd() as u32)
            .u64(8, &key as *const u32 as u64)
            .u64(16, &mut value as *mut u64 as u64)
            .call(BPF_MAP_LOOKUP_ELEM, "map lookup")?;
        Ok(value)
    }
}
