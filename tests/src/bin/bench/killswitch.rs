//! `cargo xtask bench killswitch`: how fast the kill switch cuts a running stream. In the
//! lab, a caged host sends a steady UDP stream (one datagram every 200 µs) to the internet
//! host, which timestamps every arrival. For each press, the time from just before `cage
//! isolate` starts to the last datagram that still arrives is the isolate latency; the
//! time until the command returns is reported beside it. Then `cage release` and the
//! stream resumes. Both with `cage run` up and with no daemon at all. Release binary
//! (`$CAGE_BIN`, set by xtask).

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cage_tests::contract;
use cage_tests::lab::{self, Lab, Node, PUBLIC4};

use crate::results::{pct, record};

const PRESSES: usize = 60;
const PORT: u16 = 9999;
const SEND_EVERY: Duration = Duration::from_micros(200);

pub fn killswitch() -> Result<()> {
    let mut report = String::new();
    for daemon in [true, false] {
        let lab = Lab::up(&lab::unique_prefix()).context("lab up")?;
        lab.write_config(contract::CONFIG_EXTRA);
        let mut _run = None;
        if daemon {
            _run = Some(crate::cage_run(&lab)?);
        } else {
            let out = lab.cage(&["apply"]);
            if !out.status.success() {
                bail!("cage apply: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        lab.wait_segment_ready()?;
        lab.pin_router_neighbours(Node::Ai1)?;
        let (effect, returned) = presses(&lab)?;
        let line = format!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            if daemon { "cage run up" } else { "no daemon" },
            effect.len(),
            pct(&effect, 50.0),
            pct(&effect, 99.0),
            pct(&effect, 100.0),
            pct(&returned, 50.0),
            pct(&returned, 99.0),
        );
        println!("{line}");
        report.push_str(&line);
        report.push('\n');
        drop(_run);
        lab.down()?;
    }
    let method = format!(
        "Lab: a caged host streams UDP (one datagram every {} µs) to the internet host; \
         {PRESSES} presses each. \"last packet\" is the time from just before `cage isolate` \
         starts to the last datagram that still arrived; \"command\" is how long the command \
         took (release binary). Milliseconds.",
        SEND_EVERY.as_micros()
    );
    let body = format!(
        "| mode | presses | last packet p50 | p99 | max | command p50 | p99 |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n{report}"
    );
    record("Kill switch latency", &method, &body)
}

/// Press `PRESSES` times; per press, the isolate latency (last arrival after the press
/// started) and the command's own duration, in milliseconds.
fn presses(lab: &Lab) -> Result<(Vec<f64>, Vec<f64>)> {
    let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let inet = lab.netns(Node::Inet);
    let ai1 = lab.netns(Node::Ai1);

    let receiver = {
        let (arrivals, stop) = (arrivals.clone(), stop.clone());
        inet.spawn("receiver", move || {
            let s = UdpSocket::bind(("0.0.0.0", PORT)).expect("bind");
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            let mut buf = [0u8; 64];
            let start = Instant::now();
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(600) {
                if s.recv(&mut buf).is_ok() {
                    arrivals.lock().unwrap().push(Instant::now());
                }
            }
            Ok(())
        })?
    };
    let sender = {
        let stop = stop.clone();
        ai1.spawn("sender", move || {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            let start = Instant::now();
            let mut seq: u64 = 0;
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(600) {
                // Sending fails with EPERM while isolated: that is the point.
                let _ = s.send_to(&seq.to_be_bytes(), (PUBLIC4, PORT));
                seq += 1;
                std::thread::sleep(SEND_EVERY);
            }
            Ok(())
        })?
    };

    let mut effect = Vec::new();
    let mut returned = Vec::new();
    let result = (|| -> Result<()> {
        for i in 0..PRESSES {
            wait_flowing(&arrivals)?;
            let t0 = Instant::now();
            cage(lab, &["isolate", "--reason", "benchmark"])?;
            let back = t0.elapsed();
            std::thread::sleep(Duration::from_millis(300));
            let last = *arrivals.lock().unwrap().last().expect("arrivals");
            let latency = last.saturating_duration_since(t0);
            effect.push(latency.as_secs_f64() * 1000.0);
            returned.push(back.as_secs_f64() * 1000.0);
            cage(lab, &["release", "--reason", "benchmark"])?;
            if (i + 1) % 10 == 0 {
                eprintln!("xtask bench: {} presses", i + 1);
            }
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    receiver.join()?;
    sender.join()?;
    result?;
    Ok((effect, returned))
}

fn wait_flowing(arrivals: &Mutex<Vec<Instant>>) -> Result<()> {
    let start = Instant::now();
    loop {
        let recent = arrivals
            .lock()
            .unwrap()
            .last()
            .is_some_and(|t| t.elapsed() < Duration::from_millis(5));
        if recent {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(5) {
            bail!("the stream did not resume after release");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn cage(lab: &Lab, args: &[&str]) -> Result<()> {
    let out = lab.cage_command(args).output()?;
    if !out.status.success() {
        bail!("cage {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
