//! The `cage` binary's library: everything but command-line parsing.

pub mod config;
pub mod netlink;
pub mod nft;
pub mod policy;
pub mod probe;
