//! Probing: real packets that prove the connectivity contract, the denies as well as the
//! allows.
//!
//! A *prober* sends one probe (a TCP connection, a UDP datagram or an ICMP echo request)
//! that carries a unique [`Token`] and waits for the answer. A [`Witness`] in the
//! destination's network namespace holds raw sockets for TCP, UDP and ICMP over IPv4 and
//! IPv6. The kernel hands a raw socket a copy of every packet it delivers locally, after
//! the netfilter input hook (`raw_local_deliver` runs in `ip_local_deliver_finish`, past
//! `NF_INET_LOCAL_IN`; `raw6_local_deliver` likewise), so the witness sees exactly what got
//! through the firewall, whether or not a server listens. [`Servers`] answer the probes that
//! are let through (TCP accept and echo, UDP echo).
//!
//! The witness is the judge: a probe was [`Verdict::Delivered`] when the witness saw it and
//! the prober got its answer, [`Verdict::Blocked`] when the witness saw nothing and the
//! prober got nothing, and anything else is inconsistent (a packet arrived but the answer
//! did not come back, or an answer came back from something the witness never saw) and
//! must be looked into.
//!
//! Network namespaces are per thread: [`NetNs::run`] and [`NetNs::spawn`] run a closure on a
//! fresh thread that has entered the namespace, and every socket that closure creates lives
//! there. [`NetNsGuard`] is the one type that makes a namespace and removes it again, for
//! the self-test's probe hosts and for every test that needs one. Nothing here knows any
//! particular topology: the lab of the end-to-end tests and `cage selftest` on a router
//! use the same code.
//!
//! One file per part: `netns` (namespaces and their threads), `packet` (what probes are
//! made of), `witness`, `servers`, `prober`, `verdict`, and `sys` (socket plumbing that
//! socket2 does not cover).
//!
//! Every loop here is bounded in count and in time.

use std::io;
use std::time::Duration;

mod netns;
mod packet;
mod prober;
mod servers;
mod sys;
mod verdict;
mod witness;

pub use netns::{Background, NetNs, NetNsGuard, NsThread};
pub use packet::{Family, Proto, Token, TOKEN_LEN};
pub use prober::{probe_in, send_probe, Attempt, Outcome, Probe};
pub use servers::{Servers, Service};
pub use verdict::{Observation, Verdict};
pub use witness::{Record, Witness, WitnessLimits, TCP_ACK, TCP_SYN};

/// Where `ip netns add` puts the namespaces it names.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// How long a packet may still be on its way after the prober gave up: the witness is
/// read up to this long past the end of an attempt before a "nothing arrived" counts.
pub const IN_FLIGHT: Duration = Duration::from_millis(50);

/// Errors that keep a probe from being made or judged (as opposed to a probe that was
/// made and failed, which is an [`Outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot enter network namespace {ns}: {source}")]
    Enter { ns: String, source: io::Error },
    #[error("creating network namespace {ns}{}: {source}", no_netns(.source))]
    Create { ns: String, source: io::Error },
    #[error("{op} (network namespace {ns}): {source}")]
    Io {
        ns: String,
        op: String,
        source: io::Error,
    },
    #[error("thread '{what}' in network namespace {ns} panicked")]
    Panicked { ns: String, what: String },
    #[error("witness in network namespace {ns}: {message}")]
    Witness { ns: String, message: String },
}

/// What an `EINVAL` from `unshare(CLONE_NEWNET)` means.
fn no_netns(e: &io::Error) -> &'static str {
    if e.raw_os_error() == Some(libc::EINVAL) {
        " (this kernel has no network namespaces, CONFIG_NET_NS)"
    } else {
        ""
    }
}
