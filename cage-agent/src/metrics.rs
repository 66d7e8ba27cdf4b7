//! What `/metrics` counts inside `cage run` itself, beside the files `cage status`
//! reads: the bytes of each caged host as the flow log writes its records, and how the
//! daemon notices the kernel's changes. Both live in this process only (a Prometheus
//! counter starts again at 0 when its process does: `cage_daemon_start_time_seconds`
//! says when). A leaf: the flow log and the daemon tell it, the web page reads it.
//!
//! The hosts are bounded: at most [`MAX_HOSTS`] machines have their own totals, any
//! further one is added to one `other` total. A machine bound to a bridge port (the
//! record's `bridge_port`: a MAC the layer-2 bindings accepted) takes the place of one
//! that is not (its totals move to `other`), so a caged host that forges thousands of
//! MACs — which the bindings refuse as a flood — gets them all counted, in `other`,
//! cannot keep the real machines out, and the table stays 64 entries long.

use std::collections::BTreeMap;
use std::sync::Mutex;

use cage_common::records::FlowRecord;
use cage_web::metrics::HostBytes;

pub use cage_web::metrics::MAX_HOSTS;

/// Bytes up and down per host, at most [`MAX_HOSTS`] hosts of their own.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HostTable {
    hosts: BTreeMap<String, Totals>,
    other: (u64, u64),
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Totals {
    up: u64,
    down: u64,
    /// A record of it named the bridge port its MAC is bound to.
    bound: bool,
}

/// The machine a record belongs to: its MAC (lowercase), or its address when the
/// record has no MAC of the usual form.
fn host_key(r: &FlowRecord) -> String {
    match r.mac.as_deref() {
        Some(mac)
            if mac.len() == 17
                && mac.bytes().enumerate().all(|(i, b)| {
                    if i % 3 == 2 {
                        b == b':'
                    } else {
                        b.is_ascii_hexdigit()
                    }
                }) =>
        {
            mac.to_ascii_lowercase()
        }
        _ => r.host.to_string(),
    }
}

impl HostTable {
    pub const fn new() -> HostTable {
        HostTable {
            hosts: BTreeMap::new(),
            other: (0, 0),
        }
    }

    /// Count `r`'s bytes. The self-test's probe hosts are not caged machines (and have
    /// new MACs at every run), so their records are left out.
    pub fn add(&mut self, r: &FlowRecord) {
        if r.tag.as_deref() == Some("selftest") {
            return;
        }
        let key = host_key(r);
        let bound = r.bridge_port.is_some();
        if !self.hosts.contains_key(&key) && self.hosts.len() >= MAX_HOSTS {
            // Full: a bound machine takes the place of an unbound one (the least
            // counted), whose bytes stay counted in `other`; anything else goes there.
            let unbound = self
                .hosts
                .iter()
                .filter(|(_, t)| !t.bound)
                .min_by_key(|(_, t)| t.up.saturating_add(t.down))
                .map(|(k, _)| k.clone());
            match unbound.filter(|_| bound) {
                Some(k) => {
                    let t = self.hosts.remove(&k).unwrap_or_default();
                    self.other.0 = self.other.0.saturating_add(t.up);
                    self.other.1 = self.other.1.saturating_add(t.down);
                }
                None => {
                    self.other.0 = self.other.0.saturating_add(r.bytes_out);
                    self.other.1 = self.other.1.saturating_add(r.bytes_in);
                    return;
                }
            }
        }
        let t = self.hosts.entry(key).or_default();
        t.up = t.up.saturating_add(r.bytes_out);
        t.down = t.down.saturating_add(r.bytes_in);
        t.bound |= bound;
    }

    /// Each host's totals, in host order, and the sum of the others.
    pub fn snapshot(&self) -> (Vec<HostBytes>, (u64, u64)) {
        let hosts = self
            .hosts
            .iter()
            .map(|(host, t)| HostBytes {
                host: host.clone(),
                up: t.up,
                down: t.down,
            })
            .collect();
        (hosts, self.other)
    }
}

static HOSTS: Mutex<HostTable> = Mutex::new(HostTable::new());
static MONITORS: Mutex<Option<&'static str>> = Mutex::new(None);

/// Count the bytes of records just written to the flow log.
pub fn record(records: &[FlowRecord]) {
    let mut t = HOSTS.lock().unwrap_or_else(|e| e.into_inner());
    for r in records {
        t.add(r);
    }
}

/// The hosts' totals since this process started.
pub fn hosts() -> (Vec<HostBytes>, (u64, u64)) {
    HOSTS.lock().unwrap_or_else(|e| e.into_inner()).snapshot()
}

/// How the daemon notices changes now: `listen`, `partial` or `poll`.
pub fn set_monitors(mode: &'static str) {
    *MONITORS.lock().unwrap_or_else(|e| e.into_inner()) = Some(mode);
}

pub fn monitors() -> Option<&'static str> {
    *MONITORS.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(mac: Option<&str>, host: &str, out: u64, inn: u64) -> FlowRecord {
        FlowRecord {
            start: String::new(),
            end: String::new(),
            verdict: "allowed".into(),
            rule: None,
            proto: "udp".into(),
            host: host.parse().unwrap(),
            host_port: None,
            mac: mac.map(str::to_owned),
            bridge_port: None,
            peer: "203.0.113.10".parse().unwrap(),
            peer_port: None,
            direction: "out".into(),
            packets_out: 1,
            bytes_out: out,
            packets_in: 1,
            bytes_in: inn,
            tag: None,
            tcp_flags: None,
            hostname: None,
            name: None,
        }
    }

    #[test]
    fn a_host_forging_thousands_of_macs_fills_64_entries_and_other() {
        let mut t = HostTable::new();
        t.add(&record(
            Some("02:CA:9E:00:00:11"),
            "192.168.10.11",
            100,
            1000,
        ));
        t.add(&record(Some("02:ca:9e:00:00:11"), "192.168.10.11", 1, 10));
        for i in 0..10_000u32 {
            let mac = format!(
                "02:66:{:02x}:{:02x}:{:02x}:00",
                i >> 16,
                (i >> 8) & 0xff,
                i & 0xff
            );
            t.add(&record(Some(&mac), "192.168.10.99", 7, 0));
        }
        // Without a usable MAC, the address names the host.
        t.add(&record(Some("not a mac"), "192.168.10.12", 5, 5));
        let (hosts, other) = t.snapshot();
        assert_eq!(hosts.len(), MAX_HOSTS);
        assert_eq!(t.hosts.len(), MAX_HOSTS, "the table itself stays bounded");
        let ai1 = hosts
            .iter()
            .find(|h| h.host == "02:ca:9e:00:00:11")
            .unwrap();
        assert_eq!((ai1.up, ai1.down), (101, 1010));
        let all_up: u64 = hosts.iter().map(|h| h.up).sum::<u64>() + other.0;
        assert_eq!(
            all_up,
            101 + 7 * 10_000 + 5,
            "every byte is counted somewhere"
        );
        assert_eq!(other.0, 7 * (10_000 - (MAX_HOSTS as u64 - 1)) + 5);
    }

    #[test]
    fn forged_macs_first_cannot_keep_a_bound_machine_out() {
        let mut t = HostTable::new();
        for i in 0..1000u32 {
            let mac = format!("02:66:00:00:{:02x}:{:02x}", i >> 8, i & 0xff);
            t.add(&record(Some(&mac), "192.168.10.99", 3, 1));
        }
        let mut ai1 = record(Some("02:ca:9e:00:00:11"), "192.168.10.11", 500, 600);
        ai1.bridge_port = Some("cage1".into());
        t.add(&ai1);
        // An unbound one does not push the bound one out again.
        t.add(&record(Some("02:66:ff:ff:ff:ff"), "192.168.10.99", 3, 1));
        t.add(&ai1);
        let (hosts, other) = t.snapshot();
        assert_eq!(hosts.len(), MAX_HOSTS);
        let mine = hosts
            .iter()
            .find(|h| h.host == "02:ca:9e:00:00:11")
            .unwrap();
        assert_eq!((mine.up, mine.down), (1000, 1200));
        let up: u64 = hosts.iter().map(|h| h.up).sum::<u64>() + other.0;
        let down: u64 = hosts.iter().map(|h| h.down).sum::<u64>() + other.1;
        assert_eq!(
            (up, down),
            (3 * 1001 + 1000, 1001 + 1200),
            "nothing lost or twice"
        );
        // With every place bound, a further bound machine goes to `other`.
        let mut full = HostTable::new();
        for i in 0..MAX_HOSTS as u32 + 1 {
            let mut r = record(
                Some(&format!("02:00:00:00:00:{i:02x}")),
                "192.168.10.5",
                1,
                1,
            );
            r.bridge_port = Some("cage1".into());
            full.add(&r);
        }
        assert_eq!(full.snapshot().0.len(), MAX_HOSTS);
        assert_eq!(full.snapshot().1, (1, 1));
    }

    #[test]
    fn the_self_tests_probes_are_not_hosts() {
        let mut t = HostTable::new();
        let mut r = record(Some("02:5e:1f:00:00:01"), "192.168.10.200", 9, 9);
        r.tag = Some("selftest".into());
        t.add(&r);
        assert_eq!(t.snapshot(), (vec![], (0, 0)));
    }
}
