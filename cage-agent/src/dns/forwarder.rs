//! The forwarder: UDP and TCP on the router's segment addresses at `dns.listen_port`,
//! where the policy redirects every port-53 query from the segment.
//!
//! Each query is checked (query rate and name length per host, DNS-over-HTTPS names, the
//! allow list), then relayed unchanged to the upstream resolver. In allow-list mode the
//! answer's A and AAAA addresses go into the policy's allow sets, in one nft transaction,
//! *before* the answer goes back to the host: when the host has the address, the kernel
//! already lets it through. Answer TTLs above `ttl_max` are cut to it, so a host never
//! keeps an address longer than the allow set does.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use simple_dns::{Packet, PacketFlag, RCODE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

use cage_policy::dns::message::{digest, reply, with_slack};

use super::refused::{self, RefusedName};
use super::{name, stats_path, Shared};
use crate::config::{Config, Egress};
use crate::log;
use crate::nft::AllowElement;

/// How long one upstream may take to answer before the next is tried.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// A TCP client that sends nothing for this long is disconnected.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// TCP connections served at once at most: sixteen hosts' worth of the per-host share
/// the policy enforces in the kernel (`limits.dns_tcp_per_host`, 16 by default), so one
/// host, or a few, cannot take every slot.
const MAX_TCP: usize = 256;
/// Limit violations of one kind are logged at most once in this interval (the rest are
/// counted and summed up in the next line).
const LOG_EVERY: Duration = Duration::from_secs(10);
/// How often statistics and the refused names are written out.
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// Learned addresses kept for re-adding at most; beyond it, expired ones are dropped.
/// (The kernel's sets hold them regardless; only a reload during such a flood could
/// forget some, which the hosts' next lookups put back.)
const MAX_LEARNED: usize = 65_536;
/// How long after its timeout a learned address may be forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// Token buckets kept at most (one per host address seen).
const MAX_BUCKETS: usize = 4096;

/// The forwarder of a running `cage run`.
pub struct Forwarder {
    state: Arc<State>,
    tasks: Vec<JoinHandle<()>>,
    bound: (u16, Vec<IpAddr>),
}

struct Current {
    cfg: Config,
    upstreams: Vec<SocketAddr>,
    segment: Vec<IpNet>,
}

struct State {
    current: RwLock<Arc<Current>>,
    shared: Arc<Shared>,
    /// Addresses in the allow sets: address → (name, until), to put them back after the
    /// policy was replaced (a reload replaces the sets with empty ones).
    learned: Mutex<HashMap<IpAddr, (String, Instant)>>,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
    refused: Mutex<(BTreeMap<String, RefusedName>, bool)>,
    /// The statistics as last written (written again only when they changed).
    saved: Mutex<Option<super::DnsStats>>,
    log_gate: Mutex<HashMap<&'static str, (Instant, u64)>>,
    tcp_slots: Arc<tokio::sync::Semaphore>,
}

fn current(cfg: &Config) -> Current {
    Current {
        upstreams: upstreams(cfg),
        segment: std::iter::once(IpNet::V4(cfg.segment.subnet4()))
            .chain(cfg.segment.subnet6().map(IpNet::V6))
            .collect(),
        cfg: cfg.clone(),
    }
}

/// `dns.upstream`, or the router's own resolver and then /etc/resolv.conf's nameservers.
pub fn upstreams(cfg: &Config) -> Vec<SocketAddr> {
    if !cfg.dns.upstreams.is_empty() {
        return cfg.dns.upstreams.clone();
    }
    let mut v = vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 53)];
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        if w.next() != Some("nameserver") {
            continue;
        }
        // A zone index (fe80::1%eth0) is not kept: link-local upstreams are rare.
        if let Some(ip) = w
            .next()
            .and_then(|a| a.split('%').next())
            .and_then(|a| a.parse::<IpAddr>().ok())
        {
            let sa = SocketAddr::new(ip, 53);
            if !v.contains(&sa) {
                v.push(sa);
            }
        }
    }
    v
}

fn listen_addrs(cfg: &Config) -> Vec<IpAddr> {
    std::iter::once(IpAddr::V4(cfg.segment.router4()))
        .chain(cfg.segment.router6().map(IpAddr::V6))
        .collect()
}

fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let s = socket(addr, socket2::Type::DGRAM, socket2::Protocol::UDP)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = socket(addr, socket2::Type::STREAM, socket2::Protocol::TCP)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(128)?;
    TcpListener::from_std(s.into())
}

/// A non-blocking socket for `addr`, not bound yet.
fn socket(
    addr: SocketAddr,
    ty: socket2::Type,
    protocol: socket2::Protocol,
) -> io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), ty, Some(protocol))?;
    // The segment's addresses may not be there yet (OpenWrt: netifd brings the bridge
    // up when it likes); binding to them anyway means listening only on the segment.
    if addr.is_ipv4() {
        s.set_freebind_v4(true)?;
    } else {
        s.set_only_v6(true)?;
        s.set_freebind_v6(true)?;
    }
    s.set_nonblocking(true)?;
    Ok(s)
}

impl Forwarder {
    /// Bind the sockets and start serving. Must be called inside the tokio runtime.
    pub fn start(cfg: &Config, shared: Arc<Shared>) -> io::Result<Forwarder> {
        let state = Arc::new(State {
            current: RwLock::new(Arc::new(current(cfg))),
            shared,
            learned: Mutex::default(),
            buckets: Mutex::default(),
            refused: Mutex::new((refused::load(&cfg.main.log_dir), false)),
            saved: Mutex::default(),
            log_gate: Mutex::default(),
            tcp_slots: Arc::new(tokio::sync::Semaphore::new(MAX_TCP)),
        });
        let mut f = Forwarder {
            state,
            tasks: Vec::new(),
            bound: (0, Vec::new()),
        };
        f.bind(cfg)?;
        let st = f.state.clone();
        f.tasks.push(tokio::spawn(async move {
            let mut t = tokio::time::interval(SAVE_EVERY);
            loop {
                t.tick().await;
                st.save();
            }
        }));
        Ok(f)
    }

    fn bind(&mut self, cfg: &Config) -> io::Result<()> {
        let port = cfg.dns.listen_port;
        let addrs = listen_addrs(cfg);
        let mut tasks = Vec::new();
        for &ip in &addrs {
            let sa = SocketAddr::new(ip, port);
            let what = |e: io::Error| io::Error::new(e.kind(), format!("binding {sa}: {e}"));
            let udp = Arc::new(bind_udp(sa).map_err(what)?);
            let tcp = bind_tcp(sa).map_err(what)?;
            tasks.push(tokio::spawn(serve_udp(self.state.clone(), udp)));
            tasks.push(tokio::spawn(serve_tcp(self.state.clone(), tcp)));
        }
        for t in self.bound_tasks_drain() {
            t.abort();
        }
        self.tasks.extend(tasks);
        self.bound = (port, addrs);
        Ok(())
    }

    /// The serving tasks (all but the first, the saver).
    fn bound_tasks_drain(&mut self) -> Vec<JoinHandle<()>> {
        if self.tasks.len() <= 1 {
            return Vec::new();
        }
        self.tasks.drain(1..).collect()
    }

    /// A new configuration was applied: serve it (re-binding if the port or the
    /// segment's addresses changed), and put the learned addresses that are still valid
    /// and still allowed back into the policy's new (empty) allow sets.
    pub fn reapplied(&mut self, cfg: &Config) {
        *self
            .state
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(current(cfg));
        if self.bound != (cfg.dns.listen_port, listen_addrs(cfg)) {
            // Old sockets go first: the new ones may want the same port.
            for t in self.bound_tasks_drain() {
                t.abort();
            }
            if let Err(e) = self.bind(cfg) {
                log::error(&format!(
                    "DNS forwarder: {e}; the segment has no DNS until this is fixed"
                ));
            }
        }
        if cfg.dns.egress != Egress::Allowlist {
            return;
        }
        let now = Instant::now();
        let entries: Vec<AllowElement> = {
            let mut learned = self.state.learned.lock().unwrap_or_else(|e| e.into_inner());
            learned.retain(|_, (n, until)| {
                *until > now && name::any_matches(&cfg.dns.allow_domains, n)
            });
            // The sets were replaced: each address is new there.
            learned
                .iter()
                .map(|(a, (_, until))| AllowElement {
                    addr: *a,
                    timeout: (until.duration_since(now).as_secs() as u32).max(1),
                    renew: false,
                })
                .collect()
        };
        if let Err(e) = crate::nft::add_allowed(&entries) {
            log::error(&format!(
                "DNS forwarder: cannot put {} learned addresses back into the allow sets: {e}; \
                 the hosts' next lookups add them",
                entries.len()
            ));
            // Not in the sets: forget them, so the next answers add them again.
            self.state
                .learned
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        }
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.state.shared.clone()
    }

    /// Stop serving; statistics and refused names are written one last time.
    pub fn stop(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.state.save();
    }
}

impl State {
    fn current(&self) -> Arc<Current> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn count(&self, f: impl FnOnce(&mut super::DnsStats)) {
        f(&mut self.shared.stats.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn save(&self) {
        let log_dir = self.current().cfg.main.log_dir.clone();
        let stats = self
            .shared
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let write = || -> io::Result<()> {
            if saved.as_ref() == Some(&stats) {
                return Ok(());
            }
            std::fs::create_dir_all(&log_dir)?;
            let tmp = log_dir.join("dns.json.tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(&stats)?)?;
            std::fs::rename(tmp, stats_path(&log_dir))
        };
        let result = write();
        if result.is_ok() {
            *saved = Some(stats.clone());
        }
        drop(saved);
        if let Err(e) = result {
            self.log_limited(
                "save",
                format!("DNS forwarder: cannot write its statistics: {e}"),
            );
        }
        let mut r = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        if r.1 {
            match refused::save(&log_dir, &r.0) {
                Ok(()) => r.1 = false,
                Err(e) => self.log_limited(
                    "save",
                    format!("DNS forwarder: cannot write the refused names: {e}"),
                ),
            }
        }
    }

    /// Log at most once per [`LOG_EVERY`] for each `kind`; what is held back is counted
    /// and said in the next line.
    fn log_limited(&self, kind: &'static str, msg: String) {
        let now = Instant::now();
        let mut gate = self.log_gate.lock().unwrap_or_else(|e| e.into_inner());
        let e = gate.entry(kind).or_insert((now - LOG_EVERY * 2, 0));
        if now.duration_since(e.0) < LOG_EVERY {
            e.1 += 1;
            return;
        }
        let held = std::mem::take(&mut e.1);
        e.0 = now;
        drop(gate);
        if held > 0 {
            log::warn(&format!("{msg} (and {held} more like it not logged)"));
        } else {
            log::warn(&msg);
        }
    }

    /// One query from `host`, by the token bucket: within the rate?
    fn take_token(&self, host: IpAddr, qps: u32, burst: u32) -> bool {
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if b.len() >= MAX_BUCKETS && !b.contains_key(&host) {
            b.retain(|_, (_, at)| now.duration_since(*at) < Duration::from_secs(60));
            if b.len() >= MAX_BUCKETS {
                b.clear();
            }
        }
        let bucket = b.entry(host).or_insert((f64::from(burst), now));
        take(bucket, now, qps, burst)
    }

    fn violation(&self, host: IpAddr, kind: &'static str, msg: String) {
        *self
            .shared
            .auto_counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(host)
            .or_default() += 1;
        self.count(|s| {
            *s.violations.entry(host).or_default() += 1;
            match kind {
                "rate" => s.refused_rate += 1,
                _ => s.refused_long += 1,
            }
        });
        self.log_limited(kind, msg);
    }
}

/// One token from a bucket `(tokens, last refill)` that holds `burst` and refills at `qps`
/// a second: whether there was one.
fn take(bucket: &mut (f64, Instant), now: Instant, qps: u32, burst: u32) -> bool {
    let (tokens, at) = bucket;
    *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * f64::from(qps))
        .min(f64::from(burst));
    *at = now;
    if *tokens >= 1.0 {
        *tokens -= 1.0;
        true
    } else {
        false
    }
}

async fn serve_udp(st: Arc<State>, sock: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                st.log_limited("socket", format!("DNS forwarder: receiving: {e}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let query = buf[..n].to_vec();
        let (st, sock) = (st.clone(), sock.clone());
        tokio::spawn(async move {
            if let Some(answer) = answer(&st, from.ip(), &query, false).await {
                let _ = sock.send_to(&answer, from).await;
            }
        });
    }
}

async fn serve_tcp(st: Arc<State>, listener: TcpListener) {
    loop {
        let (conn, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                st.log_limited("socket", format!("DNS forwarder: accepting: {e}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Beyond MAX_TCP connections at once, new ones are closed at once.
        let Ok(permit) = st.tcp_slots.clone().try_acquire_owned() else {
            continue;
        };
        let st = st.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = serve_tcp_conn(&st, conn, from.ip()).await;
        });
    }
}

async fn serve_tcp_conn(st: &State, mut conn: TcpStream, host: IpAddr) -> io::Result<()> {
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, conn.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
        match tokio::time::timeout(TCP_IDLE, conn.read_exact(&mut query)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let Some(answer) = answer(st, host, &query, true).await else {
            return Ok(());
        };
        let mut out = Vec::with_capacity(answer.len() + 2);
        out.extend_from_slice(&(answer.len() as u16).to_be_bytes());
        out.extend_from_slice(&answer);
        conn.write_all(&out).await?;
    }
}

/// Answer one query from `host`: `None` means no answer at all (not a DNS query).
async fn answer(st: &State, host: IpAddr, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
    let cur = st.current();
    if !cur.segment.iter().any(|n| n.contains(&host)) {
        // Only the segment is served (the sockets are on its addresses anyway).
        return None;
    }
    let dns = &cur.cfg.dns;
    st.count(|s| s.queries += 1);
    let parsed = match Packet::parse(query) {
        Ok(p) if !p.has_flags(PacketFlag::RESPONSE) && p.questions.len() == 1 => p,
        _ => {
            st.count(|s| s.malformed += 1);
            ::log::debug!(
                "DNS: {host} sent {} bytes that are not a query: dropped",
                query.len()
            );
            return None;
        }
    };
    let qname = parsed.questions[0].qname.to_string().to_ascii_lowercase();
    // The name as log lines show it: a hostile host chooses it, control characters and all.
    let shown = name::printable(&qname);
    if !st.take_token(host, dns.max_qps, dns.burst) {
        st.violation(
            host,
            "rate",
            format!(
                "DNS: {host} is over {} queries a second: REFUSED",
                dns.max_qps
            ),
        );
        ::log::debug!("DNS: {host} asked for {shown}: REFUSED (over the query rate)");
        return reply(&parsed, RCODE::Refused);
    }
    if qname.len() > dns.max_name_length {
        st.violation(
            host,
            "long",
            format!(
                "DNS: {host} asked for a name of {} characters (limit {}): REFUSED: {}…",
                qname.len(),
                dns.max_name_length,
                shown.chars().take(60).collect::<String>()
            ),
        );
        ::log::debug!(
            "DNS: {host} asked for a name of {} characters: REFUSED (too long)",
            qname.len()
        );
        return reply(&parsed, RCODE::Refused);
    }
    if name::any_matches(&dns.doh_block, &qname) {
        st.count(|s| s.doh_blocked += 1);
        st.log_limited(
            "doh",
            format!("DNS: {host} asked for DNS-over-HTTPS endpoint {shown}: NXDOMAIN"),
        );
        ::log::debug!("DNS: {host} asked for {shown}: NXDOMAIN (a DNS-over-HTTPS endpoint)");
        return reply(&parsed, RCODE::NameError);
    }
    let allowlist = dns.egress == Egress::Allowlist;
    if allowlist && !name::any_matches(&dns.allow_domains, &qname) {
        st.count(|s| s.refused_not_allowed += 1);
        let now = crate::clock::rfc3339(std::time::SystemTime::now());
        let mut r = st.refused.lock().unwrap_or_else(|e| e.into_inner());
        refused::note(&mut r.0, &qname, host, &now);
        r.1 = true;
        ::log::debug!("DNS: {host} asked for {shown}: REFUSED (not on the allow list)");
        return reply(&parsed, RCODE::Refused);
    }

    let Some(response) = ask_upstreams(&cur.upstreams, query, tcp).await else {
        st.count(|s| s.upstream_failures += 1);
        st.log_limited(
            "upstream",
            format!(
                "DNS: no upstream answered for {shown} ({}): SERVFAIL",
                cur.upstreams
                    .iter()
                    .map(|u| u.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        return reply(&parsed, RCODE::ServerFailure);
    };
    st.count(|s| s.forwarded += 1);
    let (addrs, capped) = digest(&response, dns);
    // Addresses put into the allow sets for this answer (the others were there already).
    let mut allowed_now = 0;
    if allowlist && !addrs.is_empty() {
        // Only what the sets do not already keep for as long as the host may cache the
        // answer: running nft costs milliseconds, a repeated lookup should not.
        let now = Instant::now();
        let entries: Vec<AllowElement> = {
            let learned = st.learned.lock().unwrap_or_else(|e| e.into_inner());
            addrs
                .iter()
                .filter_map(|&(addr, ttl)| {
                    let known = learned.get(&addr);
                    let enough = known.is_some_and(|(_, until)| {
                        until.saturating_duration_since(now) >= Duration::from_secs(u64::from(ttl))
                    });
                    (!enough).then_some(AllowElement {
                        addr,
                        timeout: with_slack(ttl),
                        // Known (even just expired): it may still be in the set.
                        renew: known.is_some(),
                    })
                })
                .collect()
        };
        if !entries.is_empty() {
            let added = {
                let entries = entries.clone();
                tokio::task::spawn_blocking(move || crate::nft::add_allowed(&entries)).await
            };
            let failed = match added {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(e) = failed {
                st.count(|s| s.set_failures += 1);
                st.log_limited(
                    "nft",
                    format!("DNS: cannot allow the addresses of {shown}: {e}: SERVFAIL"),
                );
                return reply(&parsed, RCODE::ServerFailure);
            }
            let mut learned = st.learned.lock().unwrap_or_else(|e| e.into_inner());
            if learned.len() >= MAX_LEARNED {
                // Only what the kernel has surely dropped too: an address forgotten
                // here is added without renewal next time.
                learned.retain(|_, (_, until)| *until + FORGET_AFTER > now);
            }
            allowed_now = entries.len();
            for e in &entries {
                learned.insert(
                    e.addr,
                    (
                        qname.clone(),
                        now + Duration::from_secs(u64::from(e.timeout)),
                    ),
                );
            }
        }
    }
    st.shared.remember(host, &addrs, &qname);
    ::log::debug!(
        "DNS: {host} asked for {shown}: answered, {} addresses{}{}",
        addrs.len(),
        if allowlist {
            format!(", {allowed_now} put into the allow sets")
        } else {
            String::new()
        },
        if capped.is_some() { ", TTLs cut" } else { "" }
    );
    Some(capped.unwrap_or(response))
}

async fn ask_upstreams(upstreams: &[SocketAddr], query: &[u8], tcp: bool) -> Option<Vec<u8>> {
    let id = [*query.first()?, *query.get(1)?];
    for &up in upstreams {
        let exchange = async {
            if tcp {
                tcp_exchange(up, query).await
            } else {
                udp_exchange(up, query, id).await
            }
        };
        if let Ok(Ok(r)) = tokio::time::timeout(UPSTREAM_TIMEOUT, exchange).await {
            if r.len() >= 12 && r[..2] == id {
                return Some(r);
            }
        }
    }
    None
}

async fn udp_exchange(up: SocketAddr, query: &[u8], id: [u8; 2]) -> io::Result<Vec<u8>> {
    let local: SocketAddr = if up.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    // A fresh socket (random port) connected to the upstream: only its answers arrive.
    let sock = UdpSocket::bind(local).await?;
    sock.connect(up).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = sock.recv(&mut buf).await?;
        if n >= 12 && buf[..2] == id {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn tcp_exchange(up: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let mut conn = TcpStream::connect(up).await?;
    let mut out = Vec::with_capacity(query.len() + 2);
    out.extend_from_slice(&(query.len() as u16).to_be_bytes());
    out.extend_from_slice(query);
    conn.write_all(&out).await?;
    let mut len = [0u8; 2];
    conn.read_exact(&mut len).await?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    conn.read_exact(&mut buf).await?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_allows_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = (40.0, t0);
        let taken = (0..100).filter(|_| take(&mut b, t0, 20, 40)).count();
        assert_eq!(taken, 40);
        // Half a second later: 10 more.
        let t1 = t0 + Duration::from_millis(500);
        let taken = (0..100).filter(|_| take(&mut b, t1, 20, 40)).count();
        assert_eq!(taken, 10);
        // A long pause refills to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(3600);
        let taken = (0..100).filter(|_| take(&mut b, t2, 20, 40)).count();
        assert_eq!(taken, 40);
    }
}
