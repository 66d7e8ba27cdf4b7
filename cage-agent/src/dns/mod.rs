//! DNS through the router: Cage's own forwarder in `cage run`.
//!
//! The policy redirects every query the segment sends to port 53 (to the router or to any
//! server outside) to the forwarder's port on the router's segment addresses
//! (`policy`), and rejects DNS over TLS. The forwarder (`forwarder`) answers each query
//! itself or relays it to the upstream resolver, and so sees every name a caged host
//! asks for:
//!
//! - per-host limits (query rate, query-name length): violations answered REFUSED,
//!   counted, logged at a bounded rate, and an automatic-isolation trigger;
//! - DNS-over-HTTPS endpoints by name answered NXDOMAIN;
//! - in allow-list mode, names not allowed answered REFUSED and recorded for review
//!   (`refused`, `cage dns refused`), and the addresses of answers to allowed names put
//!   into the policy's allow sets *before* the answer is relayed, so the host can never
//!   connect before its destination is allowed;
//! - every answer's addresses remembered per host with the name asked for, so the flow
//!   log can name its flows (`Shared::name_of`).

pub mod forwarder;
pub mod refused;

pub use cage_policy::dns::name;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{self, Config};

pub use forwarder::Forwarder;
pub use refused::RefusedName;

/// Answers are remembered for naming flows this long beyond their (floored) TTL: a flow
/// is written when it ends, which can be long after the lookup.
pub const NAME_GRACE: Duration = Duration::from_secs(3600);
/// (host, address) pairs remembered at most; the oldest go first.
pub const MAX_NAMES: usize = 65_536;

/// What the forwarder counted since `cage run` started, for `cage status`
/// (`<log_dir>/dns.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsStats {
    pub queries: u64,
    pub forwarded: u64,
    /// Not on the allow list (allow-list mode).
    pub refused_not_allowed: u64,
    /// Over the per-host query rate.
    pub refused_rate: u64,
    /// Query name longer than `max_name_length`.
    pub refused_long: u64,
    /// DNS-over-HTTPS endpoints (answered NXDOMAIN).
    pub doh_blocked: u64,
    /// Not a DNS query: dropped.
    pub malformed: u64,
    /// No upstream answered (the host got SERVFAIL).
    pub upstream_failures: u64,
    /// The allow sets could not be filled (the host got SERVFAIL).
    pub set_failures: u64,
    /// Limit violations (rate and length) per caged host.
    pub violations: HashMap<IpAddr, u64>,
}

impl DnsStats {
    pub fn violations_total(&self) -> u64 {
        self.violations.values().sum()
    }
}

pub fn stats_path(log_dir: &Path) -> std::path::PathBuf {
    log_dir.join("dns.json")
}

/// The forwarder's statistics as last written, if `cage run` has a forwarder.
pub fn read_stats(cfg: &Config) -> Option<DnsStats> {
    let bytes = std::fs::read(stats_path(&cfg.main.log_dir)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// What the forwarder shares with the rest of the daemon: names for flows, statistics.
#[derive(Debug, Default)]
pub struct Shared {
    names: Mutex<Names>,
    pub(crate) stats: Mutex<DnsStats>,
    /// Per-host violations since automatic isolation last started afresh (see
    /// [`Shared::violations`]); `stats.violations` keeps the totals.
    pub(crate) auto_counts: Mutex<HashMap<IpAddr, u64>>,
}

#[derive(Debug, Default)]
struct Names {
    map: HashMap<(IpAddr, IpAddr), (String, Instant)>,
}

impl Shared {
    /// The name `host` last resolved to reach `peer`, while it is remembered.
    pub fn name_of(&self, host: IpAddr, peer: IpAddr) -> Option<String> {
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        names
            .map
            .get(&(host, peer))
            .filter(|(_, until)| *until > Instant::now())
            .map(|(n, _)| n.clone())
    }

    pub(crate) fn remember(&self, host: IpAddr, addrs: &[(IpAddr, u32)], name: &str) {
        let now = Instant::now();
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        if names.map.len() + addrs.len() > MAX_NAMES {
            names.map.retain(|_, (_, until)| *until > now);
            if names.map.len() + addrs.len() > MAX_NAMES {
                // Still full of live entries: drop those that expire first.
                let mut by_expiry: Vec<_> = names.map.iter().map(|(k, (_, u))| (*u, *k)).collect();
                by_expiry.sort();
                let excess = names.map.len() + addrs.len() - MAX_NAMES;
                for (_, k) in by_expiry.into_iter().take(excess) {
                    names.map.remove(&k);
                }
            }
        }
        for &(addr, ttl) in addrs {
            names.map.insert(
                (host, addr),
                (
                    name.to_owned(),
                    now + Duration::from_secs(u64::from(ttl)) + NAME_GRACE,
                ),
            );
        }
    }

    /// Per-host limit violations (cumulative since the last [`Shared::restart_violations`]),
    /// for automatic isolation.
    pub fn violations(&self) -> HashMap<IpAddr, u64> {
        self.auto_counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Start the counts for automatic isolation from zero (after it fired: a released
    /// segment must not be isolated again for what it did before).
    pub fn restart_violations(&self) {
        self.auto_counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// The names the forwarder refused in allow-list mode, most recent first: for the owner
/// to review (`cage dns refused`, the web UI).
pub fn refused(cfg: &Config) -> Vec<RefusedName> {
    let mut v = refused::load(&cfg.main.log_dir)
        .into_values()
        .collect::<Vec<_>>();
    v.sort_by(|a, b| b.last.cmp(&a.last).then_with(|| a.name.cmp(&b.name)));
    // Names allowed since they were refused are no longer for review.
    v.retain(|r| !name::any_matches(&cfg.dns.allow_domains, &r.name));
    v
}

#[derive(Debug, thiserror::Error)]
pub enum AllowError {
    #[error("'{name}' is not a domain name or wildcard ({why}); e.g. api.anthropic.com")]
    BadName { name: String, why: &'static str },
    #[error(
        "DNS through Cage is off in {path} (no dns section, or enabled '0'): allowing a \
         name needs it on, in allowlist mode"
    )]
    DnsOff { path: std::path::PathBuf },
    #[error(transparent)]
    Load(#[from] config::LoadError),
    #[error(transparent)]
    Edit(#[from] config::edit::EditError),
    #[error("the configuration was changed, but cage run could not be told to reload: {0}")]
    Reload(std::io::Error),
}

/// What [`allow`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// The name as written to the configuration.
    pub name: String,
    /// False when it was already allowed (nothing changed).
    pub added: bool,
    /// Whether a running `cage run` was told to reload.
    pub reloaded: bool,
}

/// Allow a name: `list allow_domain NAME` in the `dns` section of the configuration at
/// `config_path` (validated like any configuration; the file is untouched on error),
/// then a running `cage run` reloads it, so the name resolves and is reachable at once.
pub fn allow(config_path: &Path, name: &str) -> Result<Allowed, AllowError> {
    let pattern = name::pattern(name).map_err(|why| AllowError::BadName {
        name: name.to_owned(),
        why,
    })?;
    let cfg = config::load(config_path)?;
    if !cfg.dns.enabled {
        return Err(AllowError::DnsOff {
            path: config_path.to_owned(),
        });
    }
    if cfg.dns.allow_domains.contains(&pattern) {
        return Ok(Allowed {
            name: pattern,
            added: false,
            reloaded: false,
        });
    }
    let cfg = config::edit::edit_file(
        config_path,
        &[config::edit::Edit::add_list(
            "dns",
            "dns",
            "allow_domain",
            &pattern,
        )],
    )?;
    let reloaded = crate::running::request_reload(&cfg).map_err(AllowError::Reload)?;
    Ok(Allowed {
        name: pattern,
        added: true,
        reloaded,
    })
}
