//! `RawConfig` → `Config`: types, ranges, cross-checks, and errors that say where and what.

use std::fmt;

use super::uci::RawConfig;
use super::Config;

/// One problem in a configuration, with its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Section name (or `@type[index]` for an anonymous one), if the error is in a section.
    pub section: Option<String>,
    /// Option name, if the error is about one option.
    pub option: Option<String>,
    /// 1-based line number in the file.
    pub line: usize,
    /// What is wrong and what would be accepted.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.section, &self.option) {
            (Some(s), Some(o)) => write!(f, "cage.{s}.{o} (line {}): {}", self.line, self.message),
            (Some(s), None) => write!(f, "cage.{s} (line {}): {}", self.line, self.message),
            _ => write!(f, "line {}: {}", self.line, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in a configuration (validation does not stop at the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(f, "{n} error{} in configuration", if n == 1 { "" } else { "s" })?;
        for e in &self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

pub fn validate(_raw: &RawConfig) -> Result<Config, ConfigErrors> {
    todo!("validation")
}
