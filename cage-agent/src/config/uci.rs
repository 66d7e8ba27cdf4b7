//! A parser for OpenWrt's UCI configuration syntax (see `uci(1)`): `config TYPE [NAME]`,
//! `option NAME VALUE`, `list NAME VALUE`, `#` comments, quoting with '' and "".

use super::ConfigError;

/// One `config` section as written, nothing interpreted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawSection {
    pub kind: String,
    /// `None` for an anonymous section.
    pub name: Option<String>,
    pub line: usize,
    pub options: Vec<RawOption>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawOption {
    pub name: String,
    pub value: String,
    /// `list` rather than `option`.
    pub is_list: bool,
    pub line: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RawConfig {
    pub sections: Vec<RawSection>,
}

/// Parse UCI text. Syntax errors name the line.
pub fn parse(_text: &str) -> Result<RawConfig, ConfigError> {
    todo!("UCI parser")
}
