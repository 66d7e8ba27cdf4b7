//! What Cage's configuration means, computed without touching the system.
//!
//! `config` parses UCI text, validates it into a typed [`config::Config`] (or errors that
//! name section, option and line) and edits the text; `policy` renders a `Config` and the
//! detected facts into Cage's nftables tables; `text` prints a rendered ruleset as nft's
//! JSON and text; `dns` holds DNS name syntax and matching and the forwarder's message
//! handling. *Pure: no I/O.* Cargo holds this crate to it: it depends on nothing that
//! talks to the kernel, the network or the disk, and `cage-agent` does all of that.

pub mod config;
pub mod dns;
pub mod policy;
pub mod text;
