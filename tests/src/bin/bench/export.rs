//! `bench export`: what exporting costs `cage run` at 10 000 flows a minute: the daemon's
//! CPU and resident memory with no export, with `export.ipfix`, and with both IPFIX and
//! syslog carrying every flow (`syslog_flows`, over UDP), side by side in one run (one
//! lab, `cage run` restarted with each configuration, the order turned round between
//! rounds). The flows are real: one UDP datagram, echoed, from a new port of the caged
//! host to the internet host each 6 ms; the collectors are UDP sockets on the LAN host
//! that count what arrives.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cage_agent::probe::{Servers, Service};
use cage_tests::lab::{self, Lab, Node, AI1_4, LAN_HOST4, PUBLIC4};

use crate::results::{load_average, record};

const FLOWS_PER_MINUTE: u64 = 10_000;
/// How long each configuration is measured, after a settling period with the same
/// traffic.
const MEASURE: Duration = Duration::from_secs(20);
const SETTLE: Duration = Duration::from_secs(6);
const ROUNDS: usize = 2;

/// What `cage run` exports in one measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setting {
    Off,
    Ipfix,
    IpfixAndSyslog,
}

impl Setting {
    fn name(self) -> &'static str {
        match self {
            Setting::Off => "none",
            Setting::Ipfix => "IPFIX",
            Setting::IpfixAndSyslog => "IPFIX + syslog with flows",
        }
    }
}

const SYSLOG_PORT: u16 = 5514;

struct Measured {
    export: Setting,
    cpu_pct: f64,
    rss_kb: u64,
    flows: u64,
    /// Records the exporter counted sent, lost; datagrams the collector got.
    records: u64,
    lost: u64,
    /// Syslog messages the exporter counted sent, dropped.
    syslog_sent: u64,
    syslog_dropped: u64,
    datagrams: u64,
}

pub fn export() -> Result<()> {
    let started = Instant::now();
    let load = load_average();
    let lab = Lab::up(&lab::unique_prefix()).context("lab up")?;
    let _servers = Servers::start(
        &lab.netns(Node::Inet),
        &[Service::udp(7000)],
        Duration::from_secs(600),
    )
    .context("echo server")?;
    // The collector: counts datagrams until stopped.
    let stop = Arc::new(AtomicBool::new(false));
    let got = Arc::new(AtomicU64::new(0));
    let (flag, count) = (stop.clone(), got.clone());
    let sink = lab.netns(Node::Lan).spawn("collector", move || {
        let ipfix = UdpSocket::bind((LAN_HOST4, 4739)).unwrap();
        let syslog = UdpSocket::bind((LAN_HOST4, SYSLOG_PORT)).unwrap();
        // A flush sends hundreds of messages at once: room for them all, so the
        // collector's count is what Cage sent, not what a small buffer kept.
        // (SO_RCVBUFFORCE: as root, past net.core.rmem_max.)
        for s in [&ipfix, &syslog] {
            let size: libc::c_int = 8 << 20;
            // SAFETY: a valid socket and a c_int option value of its own size.
            let rc = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(s),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
        }
        ipfix.set_nonblocking(true).unwrap();
        syslog.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(900);
        while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
            let mut got_one = false;
            for s in [&ipfix, &syslog] {
                while s.recv(&mut buf).is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                    got_one = true;
                }
            }
            if !got_one {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    })?;
    let mut all = Vec::new();
    for round in 0..ROUNDS {
        let mut order = [Setting::Off, Setting::Ipfix, Setting::IpfixAndSyslog];
        if round % 2 == 1 {
            order.reverse();
        }
        for export in order {
            let m = measure(&lab, export, &got)
                .with_context(|| format!("round {}, export {}", round + 1, export.name()))?;
            println!(
                "xtask bench: round {}: export: {}: CPU {:.3} % of a core, {} kB resident, \
                 {} flows; exported {} records, {} lost; syslog {} sent, {} dropped; {} datagrams \
                 at the collectors",
                round + 1,
                export.name(),
                m.cpu_pct,
                m.rss_kb,
                m.flows,
                m.records,
                m.lost,
                m.syslog_sent,
                m.syslog_dropped,
                m.datagrams
            );
            all.push(m);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = sink.join();
    let of = |e: Setting| all.iter().filter(move |m| m.export == e);
    // The mean of the rounds (two: a median would be one of them).
    let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
    let cpu = |e: Setting| mean(of(e).map(|m| m.cpu_pct).collect());
    let rss = |e: Setting| mean(of(e).map(|m| m.rss_kb as f64).collect());
    let against = |e: Setting| {
        format!(
            "{} against none: CPU ratio **{:.2}** ({:.3} % against {:.3} % of a core), \
             resident memory ratio **{:.2}** ({:.0} kB against {:.0} kB)",
            e.name(),
            cpu(e) / cpu(Setting::Off),
            cpu(e),
            cpu(Setting::Off),
            rss(e) / rss(Setting::Off),
            rss(e),
            rss(Setting::Off)
        )
    };
    let summary = format!(
        "At {FLOWS_PER_MINUTE} flows a minute: {}; {}.",
        against(Setting::Ipfix),
        against(Setting::IpfixAndSyslog)
    );
    let mut body = String::from(
        "| round | export | CPU % of a core | resident kB | flows made | IPFIX records exported | lost | syslog sent | dropped | datagrams at the collectors |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for (i, m) in all.iter().enumerate() {
        body.push_str(&format!(
            "| {} | {} | {:.3} | {} | {} | {} | {} | {} | {} | {} |\n",
            i / 3 + 1,
            m.export.name(),
            m.cpu_pct,
            m.rss_kb,
            m.flows,
            m.records,
            m.lost,
            m.syslog_sent,
            m.syslog_dropped,
            m.datagrams
        ));
    }
    body.push_str(&format!("\n{summary}\n"));
    println!("xtask bench: {summary}");
    let method = format!(
        "Load average at the start: {load}, at the end: {}. The release `cage run` in one \
         lab (contract configuration, `flowlog.idle_timeout` 2 s), restarted for each \
         configuration, {ROUNDS} rounds, the second in the reverse order: without export, \
         with `export.ipfix` set to a UDP socket on the LAN host, and with that and \
         `export.syslog` (udp://, `syslog_flows '1'`: every flow record a message too) to \
         another. Traffic: one UDP datagram a flow, echoed \
         by the internet host, a new source port every {} ms ({FLOWS_PER_MINUTE} flows a \
         minute). CPU: the daemon's and its children's CPU time (/proc/PID/stat) over {} s \
         after {} s of the same traffic, in clock ticks of 10 ms (a resolution of {:.2} % of \
         a core); resident memory at the end; the figures are the means of the rounds. One \
         run took {:.0} s.",
        load_average(),
        60_000 / FLOWS_PER_MINUTE,
        MEASURE.as_secs(),
        SETTLE.as_secs(),
        1.0 / MEASURE.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    record(
        "Export: IPFIX and syslog at 10 000 flows a minute",
        &method,
        &body,
    )
}

fn measure(lab: &Lab, export: Setting, datagrams: &AtomicU64) -> Result<Measured> {
    let mut extra = format!(
        "{}\nconfig flowlog 'flowlog'\n\toption idle_timeout '2'\n",
        cage_tests::contract::CONFIG_EXTRA
    );
    if export != Setting::Off {
        extra.push_str(&format!(
            "\nconfig export 'export'\n\toption ipfix '{LAN_HOST4}:4739'\n"
        ));
    }
    if export == Setting::IpfixAndSyslog {
        extra.push_str(&format!(
            "\toption syslog 'udp://{LAN_HOST4}:{SYSLOG_PORT}'\n\toption syslog_flows '1'\n"
        ));
    }
    lab.write_config(&extra);
    let run = crate::cage_run(lab)?;
    lab.wait_segment_ready().context("segment ready")?;
    lab.pin_router_neighbours(Node::Ai1).context("neighbours")?;

    // The traffic, for the settling period and the measurement.
    let total = SETTLE + MEASURE;
    let gap = Duration::from_millis(60_000 / FLOWS_PER_MINUTE);
    let traffic = lab.netns(Node::Ai1).spawn("flows", move || {
        let start = Instant::now();
        let mut n = 0u64;
        let mut buf = [0u8; 64];
        while start.elapsed() < total {
            let s = UdpSocket::bind((AI1_4, 0)).unwrap();
            s.set_read_timeout(Some(gap)).unwrap();
            if s.send_to(&[1u8; 32], (PUBLIC4, 7000)).is_ok() {
                n += 1;
            }
            let _ = s.recv(&mut buf);
            let next = gap * (n as u32 + 1);
            if let Some(wait) = next.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(n)
    })?;
    std::thread::sleep(SETTLE);
    let pid = run.pid();
    let sent_before = datagrams.load(Ordering::Relaxed);
    let before = crate::idle::cpu_ticks(pid)?;
    std::thread::sleep(MEASURE);
    let after = crate::idle::cpu_ticks(pid)?;
    let rss_kb = crate::idle::rss_kb(pid)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu_pct = (after - before) as f64 / hz / MEASURE.as_secs_f64() * 100.0;
    let flows = traffic.join().context("traffic")?;
    let status = lab.cage(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).context("status")?;
    let (records, lost) = (
        v["ipfix"]["records"].as_u64().unwrap_or(0),
        v["ipfix"]["lost"].as_u64().unwrap_or(0),
    );
    if export != Setting::Off && records == 0 {
        bail!("the export exported nothing:\n{}", run.log());
    }
    let syslog_sent = v["syslog"]["sent"].as_u64().unwrap_or(0);
    let syslog_dropped = v["syslog"]["dropped"].as_u64().unwrap_or(0);
    if export == Setting::IpfixAndSyslog && syslog_sent < flows / 4 {
        bail!(
            "syslog sent {syslog_sent} messages for {flows} flows:\n{}",
            run.log()
        );
    }
    run.stop();
    Ok(Measured {
        export,
        cpu_pct,
        rss_kb,
        flows,
        records,
        lost,
        syslog_sent,
        syslog_dropped,
        datagrams: datagrams.load(Ordering::Relaxed) - sent_before,
    })
}
