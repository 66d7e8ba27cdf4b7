//! The `cage` binary's library: everything but command-line parsing.
//!
//! `config` reads the configuration, `policy` renders it as nftables rules, `nft` is the
//! only module that talks to nftables, `netlink` the only one that talks rtnetlink,
//! `ebpf` the only one that talks to BPF (Cage's TC program, its pins and maps),
//! `apply` strings them together, `daemon` keeps the policy in force, `status` reports,
//! `probe` sends and witnesses test packets (lab and self-test).

pub mod aiport;
pub mod apply;
pub mod audit;
pub mod cert;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod dns;
pub mod ebpf;
pub mod events;
pub mod flows;
pub mod ipfix;
pub mod isolation;
pub mod killswitch;
#[cfg(test)]
mod layers;
pub mod listen;
pub mod log;
pub mod metrics;
pub mod netlink;
pub mod nflog;
pub mod nft;
pub mod offload;
pub mod probe;
pub mod running;
pub mod selftest;
pub mod status;
pub mod syslog;
pub mod web;

/// The policy is rendered by the pure crate; re-exported so that `cage_agent::policy` is
/// where the rest of the agent and its tests find it.
pub use cage_policy::policy;
