//! What probes are made of: protocols, address families, and the token that makes one
//! probe's packets recognisable.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
// portable-atomic: 32-bit MIPS (the GL-MT300N) has no native 64-bit atomics.
use portable_atomic::AtomicU64;
use std::sync::atomic::Ordering;

use socket2::Domain;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    /// ICMP echo (ICMPv6 echo for IPv6 destinations).
    Icmp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    pub(super) fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => Ipv4Addr::UNSPECIFIED.into(),
            Family::V6 => Ipv6Addr::UNSPECIFIED.into(),
        }
    }

    pub(super) fn domain(self) -> Domain {
        match self {
            Family::V4 => Domain::IPV4,
            Family::V6 => Domain::IPV6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        })
    }
}

/// What makes one probe's packets recognisable: `cage-probe:` and 16 hex digits, in the
/// payload of every packet that has one (UDP datagrams, ICMP echoes, TCP data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(pub u64);

const TOKEN_TAG: &[u8] = b"cage-probe:";
/// Length of a token on the wire.
pub const TOKEN_LEN: usize = TOKEN_TAG.len() + 16;

impl Token {
    /// A token no other probe of this process, nor of another process running at the same
    /// time, carries: the process id in the high bits, a counter in the low ones.
    pub fn fresh() -> Token {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let n = NEXT.fetch_add(1, Ordering::Relaxed) & 0xff_ffff_ffff;
        Token(((std::process::id() as u64 & 0xff_ffff) << 40) | n)
    }

    pub fn to_bytes(self) -> Vec<u8> {
        format!("cage-probe:{:016x}", self.0).into_bytes()
    }

    /// The first token in a payload, if there is one.
    pub fn find(payload: &[u8]) -> Option<Token> {
        let at = payload
            .windows(TOKEN_TAG.len())
            .position(|w| w == TOKEN_TAG)?;
        let hex = payload.get(at + TOKEN_TAG.len()..at + TOKEN_LEN)?;
        let hex = std::str::from_utf8(hex).ok()?;
        u64::from_str_radix(hex, 16).ok().map(Token)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_and_found_again() {
        let a = Token::fresh();
        let b = Token::fresh();
        assert_ne!(a, b);
        let mut payload = b"junk before ".to_vec();
        payload.extend_from_slice(&a.to_bytes());
        payload.extend_from_slice(b" and after");
        assert_eq!(Token::find(&payload), Some(a));
        assert_eq!(a.to_bytes().len(), TOKEN_LEN);
        assert_eq!(Token::find(b"cage-probe:12"), None);
        assert_eq!(Token::find(b"nothing here"), None);
    }
}
