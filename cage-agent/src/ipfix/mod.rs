//! The flow log as IPFIX (RFC 7011) over UDP to `export.ipfix`, the owner's collector
//! (nfcapd, pmacct, ntopng): every record the flow log writes, allowed and blocked, as
//! it is written. `encode` makes the messages; this module sends them.
//!
//! The collector can never hold the daemon up: the socket is non-blocking and a
//! message the kernel will not take (no buffer, no route) is dropped and counted, as is
//! the batch before an ICMP port unreachable (the collector's host said nothing
//! listens). What is counted, `<log_dir>/ipfix.json`, `cage status` shows. Templates go
//! out at the start, every `ipfix_template_interval` seconds (RFC 7011 §8.4, UDP), and
//! again after the collector refused, so one that comes back gets them before the next
//! data. The configuration is read at every call, so a reload (SIGHUP) that changes the
//! collector or the domain starts a new stream (sequence number 0) at the next flush.

pub mod encode;

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use cage_common::records::FlowRecord;

use crate::config::{Config, IpfixExport};
use crate::log;

use encode::Stream;

/// What the exporter counted since `cage run` started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Where it sends (`192.168.8.10:4739`).
    pub collector: String,
    /// Data records exported (encoded and handed to the socket, or lost below).
    pub records: u64,
    /// Messages the kernel took, templates included.
    pub messages: u64,
    /// Template messages among them.
    pub templates: u64,
    /// Records that did not reach the collector as far as Cage can tell: the kernel
    /// would not send their message, or the collector's host answered that nothing
    /// listens (ICMP port unreachable).
    pub lost: u64,
    /// Messages lost so.
    pub lost_messages: u64,
    /// The last error, if any.
    pub last_error: Option<String>,
}

pub fn stats_path(log_dir: &Path) -> PathBuf {
    log_dir.join("ipfix.json")
}

/// The exporter's counts as `cage run` last wrote them, when the export is configured.
pub fn read_stats(cfg: &Config) -> Option<Stats> {
    cfg.export.ipfix.as_ref()?;
    let bytes = std::fs::read(stats_path(&cfg.main.log_dir)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The daemon's exporter. One a process: the flow log's writer calls [`export`] with
/// every batch, and the configuration in force decides where it goes.
static EXPORTER: Mutex<Option<Exporter>> = Mutex::new(None);

/// Export `records` (possibly none: the templates may be due) as `cfg` says: started,
/// moved to a new collector or stopped as the configuration now reads.
pub fn export(cfg: &Config, records: &[FlowRecord]) {
    let mut exporter = EXPORTER.lock().unwrap_or_else(|e| e.into_inner());
    let Some(want) = &cfg.export.ipfix else {
        if exporter.take().is_some() {
            log::info("ipfix: export stopped (export.ipfix is no longer set)");
        }
        return;
    };
    if exporter.as_ref().map(|e| &e.cfg) != Some(want) {
        let stats = exporter.take().map(|e| e.stats).unwrap_or_default();
        log::info(&format!(
            "ipfix: exporting flow records to {} (observation domain {})",
            want.collector, want.domain
        ));
        *exporter = Some(Exporter::new(
            want.clone(),
            stats,
            stats_path(&cfg.main.log_dir),
        ));
    }
    if let Some(e) = exporter.as_mut() {
        e.export(records, SystemTime::now(), Instant::now());
    }
}

pub struct Exporter {
    cfg: IpfixExport,
    socket: Option<UdpSocket>,
    stream: Stream,
    /// When the templates last went out; `None`: due now.
    templates_at: Option<Instant>,
    /// Records and messages of the last batch sent: the batch an ICMP port
    /// unreachable reported at the next one refers to.
    last_batch: (u64, u64),
    /// The exporter was failing at its last batch (said once, and once when it mends).
    failing: bool,
    pub stats: Stats,
    stats_path: PathBuf,
    saved: Option<Stats>,
}

/// A non-blocking UDP socket connected to the collector (so the kernel reports the
/// collector's ICMP errors to it).
fn open(collector: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = match collector {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(any)?;
    s.set_nonblocking(true)?;
    s.connect(collector)?;
    Ok(s)
}

impl Exporter {
    pub fn new(cfg: IpfixExport, mut stats: Stats, stats_path: PathBuf) -> Exporter {
        stats.collector = cfg.collector.to_string();
        Exporter {
            stream: Stream::new(cfg.domain),
            cfg,
            socket: None,
            templates_at: None,
            last_batch: (0, 0),
            failing: false,
            stats,
            stats_path,
            saved: None,
        }
    }

    /// Send the templates when due, then `records`; count what is lost; write the
    /// counts when they changed.
    pub fn export(&mut self, records: &[FlowRecord], now: SystemTime, at: Instant) {
        let export_time = now
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(0);
        if self.socket.is_none() {
            match open(self.cfg.collector) {
                Ok(s) => self.socket = Some(s),
                Err(e) => self.error(format!(
                    "cannot open a socket to {}: {e}",
                    self.cfg.collector
                )),
            }
        }
        // An ICMP error since the last batch: that batch did not arrive.
        match self.socket.as_ref().map(UdpSocket::take_error) {
            Some(Ok(Some(e))) => self.refused(e),
            // The last batch went out and nothing came back: mended.
            Some(Ok(None)) if self.failing && self.last_batch.0 > 0 => {
                self.failing = false;
                log::info(&format!("ipfix: sending to {} again", self.cfg.collector));
            }
            _ => {}
        }
        let mut batch = (0u64, 0u64);
        let interval = Duration::from_secs(u64::from(self.cfg.template_interval));
        let due = self
            .templates_at
            .is_none_or(|t| at.duration_since(t) >= interval);
        if due {
            let m = self.stream.templates(export_time);
            if self.send(&m.bytes) {
                self.templates_at = Some(at);
                self.stats.templates += 1;
                batch.1 += 1;
            }
        }
        let messages = self.stream.data(records, export_time);
        let mut lost = 0u64;
        for m in &messages {
            self.stats.records += u64::from(m.records);
            if self.send(&m.bytes) {
                batch.0 += u64::from(m.records);
                batch.1 += 1;
            } else {
                lost += u64::from(m.records);
                self.stats.lost += u64::from(m.records);
                self.stats.lost_messages += 1;
            }
        }
        if lost > 0 {
            self.say_failing(&format!(
                "{lost} flow records not sent ({})",
                self.stats.last_error.as_deref().unwrap_or("")
            ));
        }
        self.last_batch = batch;
        self.save();
    }

    /// Hand one message to the kernel; false when it was not taken.
    fn send(&mut self, bytes: &[u8]) -> bool {
        for attempt in 0..2 {
            let Some(socket) = &self.socket else {
                return false;
            };
            match socket.send(bytes) {
                Ok(_) => {
                    self.stats.messages += 1;
                    return true;
                }
                // The refusal of an earlier message, reported now (and cleared): that
                // batch is lost, this one goes out on the second attempt.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused && attempt == 0 => {
                    self.refused(e)
                }
                Err(e) => {
                    self.error(format!("sending to {}: {e}", self.cfg.collector));
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::ConnectionRefused
                    ) && e.raw_os_error() != Some(libc::ENOBUFS)
                    {
                        // No route, an address gone: a new socket next time.
                        self.socket = None;
                    }
                    return false;
                }
            }
        }
        false
    }

    /// The collector's host answered an earlier message with an ICMP error: count the
    /// last batch lost, and send the templates again before the next data (a collector
    /// that restarts has forgotten them).
    fn refused(&mut self, e: io::Error) {
        let (records, messages) = std::mem::take(&mut self.last_batch);
        self.stats.lost += records;
        self.stats.lost_messages += messages;
        self.templates_at = None;
        self.error(format!("{} refused: {e}", self.cfg.collector));
        self.say_failing(&format!(
            "the collector's host answers that nothing listens on {}; flow records are lost",
            self.cfg.collector
        ));
    }

    fn error(&mut self, text: String) {
        self.stats.last_error = Some(text);
    }

    fn say_failing(&mut self, what: &str) {
        if !self.failing {
            self.failing = true;
            log::warn(&format!(
                "ipfix: {what}; counted in cage status, said again when it mends"
            ));
        }
    }

    fn save(&mut self) {
        if self.saved.as_ref() == Some(&self.stats) {
            return;
        }
        let Ok(bytes) = serde_json::to_vec(&self.stats) else {
            return;
        };
        let tmp = self.stats_path.with_extension("json.tmp");
        match std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, &self.stats_path)) {
            Ok(()) => self.saved = Some(self.stats.clone()),
            Err(e) => ::log::debug!("ipfix: cannot write {}: {e}", self.stats_path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(port: u16) -> FlowRecord {
        FlowRecord {
            start: "2027-01-15T08:00:00.123Z".into(),
            end: "2027-01-15T08:00:01.456Z".into(),
            verdict: "allowed".into(),
            rule: None,
            proto: "udp".into(),
            host: "192.168.10.11".parse().unwrap(),
            host_port: Some(port),
            mac: None,
            bridge_port: None,
            peer: "203.0.113.10".parse().unwrap(),
            peer_port: Some(53),
            direction: "out".into(),
            packets_out: 1,
            bytes_out: 60,
            packets_in: 1,
            bytes_in: 80,
            tag: None,
            tcp_flags: None,
            hostname: None,
            name: None,
        }
    }

    /// On loopback: templates first, then the data with its sequence number; later
    /// templates only when the interval has passed.
    #[test]
    fn templates_go_first_and_again_after_the_interval() {
        let collector = UdpSocket::bind("127.0.0.1:0").unwrap();
        collector
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let dir = std::env::temp_dir().join(format!("cage-ipfix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = IpfixExport {
            collector: collector.local_addr().unwrap(),
            template_interval: 60,
            domain: 7,
        };
        let mut e = Exporter::new(cfg, Stats::default(), dir.join("ipfix.json"));
        let t0 = Instant::now();
        e.export(&[record(1), record(2)], SystemTime::now(), t0);
        let mut buf = [0u8; 2000];
        let n = collector.recv(&mut buf).unwrap();
        assert_eq!(&buf[16..18], &[0, 2], "a template set first");
        assert_eq!(n, 16 + encode::template_set().len());
        let n = collector.recv(&mut buf).unwrap();
        assert_eq!(&buf[16..18], &[1, 0], "then the IPv4 data set");
        assert_eq!(&buf[8..12], &[0, 0, 0, 0]);
        assert_eq!(&buf[12..16], &[0, 0, 0, 7]);
        assert_eq!(u16::from_be_bytes([buf[2], buf[3]]) as usize, n);

        e.export(
            &[record(3)],
            SystemTime::now(),
            t0 + Duration::from_secs(30),
        );
        collector.recv(&mut buf).unwrap();
        assert_eq!(&buf[16..18], &[1, 0], "no templates within the interval");
        assert_eq!(
            &buf[8..12],
            &[0, 0, 0, 2],
            "two records before this message"
        );

        e.export(&[], SystemTime::now(), t0 + Duration::from_secs(61));
        collector.recv(&mut buf).unwrap();
        assert_eq!(&buf[16..18], &[0, 2], "templates again after the interval");
        assert_eq!(&buf[8..12], &[0, 0, 0, 3]);
        assert_eq!(e.stats.records, 3);
        assert_eq!(e.stats.messages, 4);
        assert_eq!(e.stats.templates, 2);
        assert_eq!(e.stats.lost, 0);
        let saved: Stats =
            serde_json::from_slice(&std::fs::read(dir.join("ipfix.json")).unwrap()).unwrap();
        assert_eq!(saved, e.stats);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Nothing listens: the loopback's port unreachable comes back at once, and the
    /// next batch reports the one before lost; the daemon's call never blocks.
    #[test]
    fn a_collector_that_is_not_there_costs_counted_losses_only() {
        let port = {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap().port()
        };
        let dir = std::env::temp_dir().join(format!("cage-ipfix-gone-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = IpfixExport {
            collector: ([127, 0, 0, 1], port).into(),
            template_interval: 60,
            domain: 1,
        };
        let mut e = Exporter::new(cfg, Stats::default(), dir.join("ipfix.json"));
        let t0 = Instant::now();
        let started = Instant::now();
        for i in 0..5u16 {
            e.export(
                &[record(i)],
                SystemTime::now(),
                t0 + Duration::from_secs(u64::from(i)),
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(e.stats.records, 5);
        // The first four batches were refused (the fifth's answer is still to be read).
        assert!(e.stats.lost >= 4, "{:?}", e.stats);
        assert!(
            e.stats
                .last_error
                .as_deref()
                .unwrap_or("")
                .contains("refused"),
            "{:?}",
            e.stats
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
