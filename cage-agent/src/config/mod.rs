//! Cage's configuration file: read it, validate it, and change it.
//!
//! What the configuration means (the UCI parser, the validator, the typed [`Config`],
//! the text edits) is the pure crate `cage-policy`, re-exported here; this module adds
//! what touches the system: reading the file ([`load`]), writing it ([`edit::edit_file`]),
//! and whether this is OpenWrt ([`on_openwrt`], for `cage.main.mode 'auto'`).

pub mod edit;

use std::path::{Path, PathBuf};

pub use cage_policy::config::*;

/// Whether this system is OpenWrt (`/etc/openwrt_release` exists): what `mode 'auto'`
/// resolves by.
pub fn on_openwrt() -> bool {
    Path::new("/etc/openwrt_release").exists()
}

/// Errors of loading a configuration file: reading, parsing or validating it.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read configuration {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {errors}")]
    Invalid { path: PathBuf, errors: ConfigErrors },
}

/// Read, parse and validate the configuration at `path`.
pub fn load(path: &Path) -> Result<Config, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text).map_err(|errors| LoadError::Invalid {
        path: path.to_owned(),
        errors,
    })
}
