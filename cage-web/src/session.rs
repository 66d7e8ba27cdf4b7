//! Sessions, CSRF tokens, the login rate limit and password hashing.
//!
//! Sessions live in memory only: a restart of `cage run` logs everyone out, which is the
//! safe direction. A session token is 256 random bits; its CSRF token another 256.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// The session cookie.
pub const COOKIE: &str = "cage_session";
/// The cookie that carries the CSRF token of the login and setup forms, before there is
/// a session (double submit: the form's hidden field must equal it).
pub const PRE_COOKIE: &str = "cage_pre";
/// A session ends after this long without a request…
pub const IDLE: Duration = Duration::from_secs(30 * 60);
/// …and this long after login in any case.
pub const ABSOLUTE: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; logging in beyond this ends the oldest.
const MAX_SESSIONS: usize = 64;

/// Passwords shorter than this are refused (`cage passwd` and the pages alike).
pub const MIN_PASSWORD: usize = 8;
/// Longer ones too: hashing a megabyte is a way to keep the router busy.
pub const MAX_PASSWORD: usize = 1024;

/// 256 random bits as 64 hex digits.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compare without an early exit, so the time taken says nothing about the token.
pub fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Debug, Clone)]
struct Session {
    csrf: String,
    created: Instant,
    last: Instant,
}

/// What a valid session cookie stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Active {
    pub token: String,
    pub csrf: String,
}

#[derive(Debug, Default)]
pub struct Sessions {
    map: HashMap<String, Session>,
}

impl Sessions {
    /// A new session; returns its token and CSRF token.
    pub fn create(&mut self, now: Instant) -> Active {
        self.expire(now);
        if self.map.len() >= MAX_SESSIONS {
            if let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, s)| s.last)
                .map(|(k, _)| k.clone())
            {
                self.map.remove(&oldest);
            }
        }
        let active = Active {
            token: random_token(),
            csrf: random_token(),
        };
        self.map.insert(
            active.token.clone(),
            Session {
                csrf: active.csrf.clone(),
                created: now,
                last: now,
            },
        );
        active
    }

    /// The session of `token` if it is still valid; a request keeps it alive.
    pub fn touch(&mut self, token: &str, now: Instant) -> Option<Active> {
        self.expire(now);
        let s = self.map.get_mut(token)?;
        s.last = now;
        Some(Active {
            token: token.to_owned(),
            csrf: s.csrf.clone(),
        })
    }

    pub fn remove(&mut self, token: &str) {
        self.map.remove(token);
    }

    /// End every session but `keep` (after a password change).
    pub fn retain_only(&mut self, keep: &str) {
        self.map.retain(|k, _| k == keep);
    }

    fn expire(&mut self, now: Instant) {
        self.map.retain(|_, s| {
            now.saturating_duration_since(s.last) < IDLE
                && now.saturating_duration_since(s.created) < ABSOLUTE
        });
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Exponential backoff after failed logins: per client address (the first 3 failures are
/// free, a typo is no attack; then 1 s, doubling up to 5 minutes) and for all clients together (free for the first
/// 10 failures, then doubling from 1 s up to 1 minute), so that guessing from many
/// addresses is slowed down as well. A success clears the address's record.
#[derive(Debug, Default)]
pub struct Limiter {
    per_ip: HashMap<IpAddr, Backoff>,
    global: Backoff,
}

#[derive(Debug, Clone, Copy, Default)]
struct Backoff {
    failures: u32,
    until: Option<Instant>,
    last: Option<Instant>,
}

const IP_FREE: u32 = 3;
const IP_MAX_DELAY: Duration = Duration::from_secs(300);
const GLOBAL_FREE: u32 = 10;
const GLOBAL_MAX_DELAY: Duration = Duration::from_secs(60);
/// Failures older than this are forgotten.
const FORGET: Duration = Duration::from_secs(15 * 60);
/// Client addresses tracked at most (a LAN has far fewer).
const MAX_TRACKED: usize = 4096;

fn doubling(n: u32, max: Duration) -> Duration {
    let secs = 1u64
        .checked_shl(n.saturating_sub(1).min(30))
        .unwrap_or(u64::MAX);
    Duration::from_secs(secs).min(max)
}

impl Limiter {
    /// `Err(wait)` when a login from `ip` must not be tried yet.
    pub fn check(&mut self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        self.forget(now);
        let waits = [
            self.per_ip.get(&ip).and_then(|b| b.until),
            self.global.until,
        ];
        match waits.into_iter().flatten().max() {
            Some(until) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    pub fn failure(&mut self, ip: IpAddr, now: Instant) {
        self.forget(now);
        if self.per_ip.len() >= MAX_TRACKED && !self.per_ip.contains_key(&ip) {
            // Beyond this many addresses, only the global backoff counts.
            self.per_ip.retain(|_, b| b.until.is_some_and(|u| u > now));
        }
        if self.per_ip.len() < MAX_TRACKED || self.per_ip.contains_key(&ip) {
            let b = self.per_ip.entry(ip).or_default();
            b.failures = b.failures.saturating_add(1);
            if b.failures > IP_FREE {
                b.until = Some(now + doubling(b.failures - IP_FREE, IP_MAX_DELAY));
            }
            b.last = Some(now);
        }
        let g = &mut self.global;
        g.failures = g.failures.saturating_add(1);
        g.last = Some(now);
        if g.failures > GLOBAL_FREE {
            g.until = Some(now + doubling(g.failures - GLOBAL_FREE, GLOBAL_MAX_DELAY));
        }
    }

    pub fn success(&mut self, ip: IpAddr) {
        self.per_ip.remove(&ip);
    }

    fn forget(&mut self, now: Instant) {
        let old = |b: &Backoff| {
            b.last
                .is_some_and(|l| now.saturating_duration_since(l) > FORGET)
        };
        self.per_ip.retain(|_, b| !old(b));
        if old(&self.global) {
            self.global = Backoff::default();
        }
    }
}

/// The argon2id PHC string of `password`, with a random salt and argon2's default
/// parameters (19 MiB, 2 passes: a fraction of a second on a router).
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

/// Whether `password` matches the PHC string `phc` (with the parameters it names).
pub fn verify_password(password: &str, phc: &str) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else {
        return false;
    };
    Argon2::default()
        .verify_password(password.as_bytes(), &hash)
        .is_ok()
}

/// Why a new password is refused, if it is.
pub fn password_problem(password: &str, confirm: &str) -> Option<String> {
    let n = password.chars().count();
    if n < MIN_PASSWORD {
        Some(format!(
            "the password is too short: at least {MIN_PASSWORD} characters"
        ))
    } else if password.len() > MAX_PASSWORD {
        Some(format!(
            "the password is too long: at most {MAX_PASSWORD} bytes"
        ))
    } else if password != confirm {
        Some("the two passwords differ".into())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_when_idle_and_absolutely() {
        let mut s = Sessions::default();
        let t0 = Instant::now();
        let a = s.create(t0);
        assert!(s
            .touch(&a.token, t0 + IDLE - Duration::from_secs(1))
            .is_some());
        assert!(s.touch(&a.token, t0 + 2 * IDLE).is_none(), "idle");
        let b = s.create(t0);
        let mut t = t0;
        while t < t0 + ABSOLUTE - Duration::from_secs(600) {
            t += Duration::from_secs(600);
            assert!(s.touch(&b.token, t).is_some());
        }
        assert!(s.touch(&b.token, t0 + ABSOLUTE).is_none(), "absolute");
    }

    #[test]
    fn backoff_doubles_per_address_and_globally() {
        let mut l = Limiter::default();
        let ip: IpAddr = "192.168.8.10".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..IP_FREE {
            assert!(l.check(ip, t0).is_ok());
            l.failure(ip, t0);
        }
        assert!(l.check(ip, t0).is_ok());
        l.failure(ip, t0);
        assert_eq!(l.check(ip, t0), Err(Duration::from_secs(1)));
        assert!(l.check(ip, t0 + Duration::from_secs(1)).is_ok());
        l.failure(ip, t0 + Duration::from_secs(1));
        assert_eq!(
            l.check(ip, t0 + Duration::from_secs(1)),
            Err(Duration::from_secs(2))
        );
        // Other addresses are free until the global allowance is spent.
        let t1 = t0 + Duration::from_secs(10);
        for i in 0..20u8 {
            let other = IpAddr::from([192, 168, 8, 100 + i]);
            let _ = l.check(other, t1);
            l.failure(other, t1);
        }
        let fresh: IpAddr = "192.168.8.200".parse().unwrap();
        assert!(l.check(fresh, t1).is_err(), "global backoff");
        l.success(ip);
    }

    #[test]
    fn passwords_verify_against_their_hash_only() {
        let h = Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            argon2::Params::new(64, 1, 1, None).unwrap(),
        )
        .hash_password(b"correct horse", &SaltString::generate(&mut OsRng))
        .unwrap()
        .to_string();
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong horse", &h));
        for bad in ["", "hunter2", "$md5$abc"] {
            assert!(!verify_password("correct horse", bad), "{bad}");
        }
    }
}
