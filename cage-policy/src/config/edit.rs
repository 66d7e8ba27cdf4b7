//! Changing the configuration from inside Cage (the web page's settings, `cage passwd`,
//! `cage dns allow`): edits are applied to the UCI text line by line, so that the
//! owner's comments, order and layout stay, and the result is validated with the same
//! validator as `cage check`. Writing the result to the file (atomically, and only when
//! it is valid) is `cage_agent::config::edit::edit_file`.

use std::fmt;
use std::path::PathBuf;

use super::uci::{self, RawConfig};
use super::{Config, ConfigError, ConfigErrors};

/// One change to the configuration. `kind` and `section` name a section the way the file
/// does (`config segment 'ai'`: kind `segment`, section `ai`); a section that is not
/// there is added at the end of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// `option NAME VALUE`, replacing the option if it is there.
    Set {
        kind: String,
        section: String,
        option: String,
        value: String,
    },
    /// Remove `option NAME` (nothing to do if it is not there).
    Unset {
        kind: String,
        section: String,
        option: String,
    },
    /// Replace every `list NAME …` with these values (none: remove the list).
    SetList {
        kind: String,
        section: String,
        option: String,
        values: Vec<String>,
    },
    /// Add `list NAME VALUE` unless that value is already in the list.
    AddList {
        kind: String,
        section: String,
        option: String,
        value: String,
    },
}

impl Edit {
    pub fn set(kind: &str, section: &str, option: &str, value: &str) -> Edit {
        Edit::Set {
            kind: kind.into(),
            section: section.into(),
            option: option.into(),
            value: value.into(),
        }
    }
    pub fn unset(kind: &str, section: &str, option: &str) -> Edit {
        Edit::Unset {
            kind: kind.into(),
            section: section.into(),
            option: option.into(),
        }
    }
    pub fn set_list(kind: &str, section: &str, option: &str, values: &[String]) -> Edit {
        Edit::SetList {
            kind: kind.into(),
            section: section.into(),
            option: option.into(),
            values: values.to_vec(),
        }
    }
    pub fn add_list(kind: &str, section: &str, option: &str, value: &str) -> Edit {
        Edit::AddList {
            kind: kind.into(),
            section: section.into(),
            option: option.into(),
            value: value.into(),
        }
    }

    fn target(&self) -> (&str, &str, &str) {
        match self {
            Edit::Set {
                kind,
                section,
                option,
                ..
            }
            | Edit::Unset {
                kind,
                section,
                option,
            }
            | Edit::SetList {
                kind,
                section,
                option,
                ..
            }
            | Edit::AddList {
                kind,
                section,
                option,
                ..
            } => (kind, section, option),
        }
    }
}

/// Why an edit was not made. The file is unchanged in every case. `Read` and `Write`
/// are the file's errors, which only `edit_file` meets.
#[derive(Debug)]
pub enum EditError {
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file as it is does not parse, so it cannot be edited safely.
    Unparsable { path: PathBuf, error: ConfigError },
    /// An edit that cannot be written in UCI (a newline in a value, a bad name).
    BadEdit(String),
    /// The edited configuration does not validate: the validator's own messages.
    Invalid(ConfigErrors),
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl fmt::Display for EditError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EditError::Read { path, source } => {
                write!(f, "cannot read configuration {}: {source}", path.display())
            }
            EditError::Unparsable { path, error } => write!(
                f,
                "{} cannot be edited, it does not parse: {error}",
                path.display()
            ),
            EditError::BadEdit(m) => f.write_str(m),
            EditError::Invalid(errors) => {
                write!(f, "the change was not made: {errors}")
            }
            EditError::Write { path, source } => write!(
                f,
                "cannot write configuration {} (it is unchanged): {source}",
                path.display()
            ),
        }
    }
}

impl std::error::Error for EditError {}

/// Apply `edits` to configuration text; the new text and its validated `Config`.
pub fn edit_text(text: &str, edits: &[Edit]) -> Result<(String, Config), EditError> {
    let mut lines: Vec<String> = text.split('\n').map(str::to_owned).collect();
    for edit in edits {
        check_edit(edit)?;
        let raw = uci::parse(&lines.join("\n")).map_err(|error| EditError::Unparsable {
            path: PathBuf::from("(configuration)"),
            error,
        })?;
        apply_one(&mut lines, &raw, edit);
    }
    let new = lines.join("\n");
    let config = super::parse(&new).map_err(EditError::Invalid)?;
    Ok((new, config))
}

fn check_edit(edit: &Edit) -> Result<(), EditError> {
    let (kind, section, option) = edit.target();
    for (what, word) in [
        ("section type", kind),
        ("section", section),
        ("option", option),
    ] {
        if word.is_empty()
            || !word
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(EditError::BadEdit(format!(
                "{what} name {word:?} is not a UCI name (letters, digits, '_' and '-')"
            )));
        }
    }
    let values: Vec<&String> = match edit {
        Edit::Set { value, .. } | Edit::AddList { value, .. } => vec![value],
        Edit::SetList { values, .. } => values.iter().collect(),
        Edit::Unset { .. } => vec![],
    };
    for v in values {
        if v.chars().any(|c| c.is_control()) {
            return Err(EditError::BadEdit(format!(
                "cage.{section}.{option}: a value cannot hold control characters (newline, tab, …)"
            )));
        }
    }
    Ok(())
}

/// `'value'` with the quoting `uci export` uses for a single quote.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

fn apply_one(lines: &mut Vec<String>, raw: &RawConfig, edit: &Edit) {
    let (kind, name, option) = edit.target();
    let Some(section) = raw
        .sections
        .iter()
        .find(|s| s.kind == kind && s.name.as_deref() == Some(name))
    else {
        // A new section at the end, separated by an empty line.
        let body: Vec<String> = match edit {
            Edit::Set { value, .. } => vec![format!("\toption {option} {}", quote(value))],
            Edit::SetList { values, .. } => values
                .iter()
                .map(|v| format!("\tlist {option} {}", quote(v)))
                .collect(),
            Edit::AddList { value, .. } => vec![format!("\tlist {option} {}", quote(value))],
            Edit::Unset { .. } => return,
        };
        if body.is_empty() {
            return;
        }
        while lines.last().is_some_and(|l| l.trim().is_empty()) {
            lines.pop();
        }
        lines.push(String::new());
        lines.push(format!("config {kind} {}", quote(name)));
        lines.extend(body);
        lines.push(String::new());
        return;
    };
    // Line numbers are 1-based; the last line that belongs to the section.
    let end = section
        .options
        .iter()
        .map(|o| o.line)
        .max()
        .unwrap_or(section.line);
    let mine = |is_list: bool| -> Vec<usize> {
        section
            .options
            .iter()
            .filter(|o| o.name == option && o.is_list == is_list)
            .map(|o| o.line)
            .collect()
    };
    match edit {
        Edit::Set { value, .. } => {
            let new = format!("\toption {option} {}", quote(value));
            let existing = mine(false);
            if let Some(&first) = existing.first() {
                lines[first - 1] = new;
                remove_lines(lines, &existing[1..]);
            } else {
                lines.insert(end, new);
            }
        }
        Edit::Unset { .. } => remove_lines(lines, &mine(false)),
        Edit::SetList { values, .. } => {
            let existing = mine(true);
            let at = existing.first().map(|l| l - 1).unwrap_or(end);
            remove_lines(lines, &existing);
            for (i, v) in values.iter().enumerate() {
                lines.insert(at + i, format!("\tlist {option} {}", quote(v)));
            }
        }
        Edit::AddList { value, .. } => {
            let present = section
                .options
                .iter()
                .any(|o| o.name == option && o.is_list && &o.value == value);
            if !present {
                let at = mine(true).last().copied().unwrap_or(end);
                lines.insert(at, format!("\tlist {option} {}", quote(value)));
            }
        }
    }
}

/// Remove these 1-based lines.
fn remove_lines(lines: &mut Vec<String>, which: &[usize]) {
    let mut which = which.to_vec();
    which.sort_unstable();
    for l in which.into_iter().rev() {
        lines.remove(l - 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "# Cage\n\
config cage 'main'\n\
\toption state_dir '/tmp/st'\n\
\n\
config segment 'ai'\n\
\toption bridge 'br-cage'\n\
\toption address '192.168.10.1/24'\n\
\t# the caged host's port\n\
\tlist port 'lan2'\n\
\n\
config lan 'lan'\n\
\toption device 'br-lan'\n\
\tlist admin_host '192.168.8.20'\n";

    fn edit(edits: &[Edit]) -> String {
        edit_text(BASE, edits).expect("valid edit").0
    }

    #[test]
    fn base_is_valid() {
        crate::config::parse(BASE).expect("the test's base configuration");
    }

    #[test]
    fn set_replaces_in_place_and_keeps_comments() {
        let out = edit(&[Edit::set("segment", "ai", "address", "192.168.11.1/24")]);
        assert_eq!(
            out,
            BASE.replace("192.168.10.1/24", "192.168.11.1/24"),
            "only that line changes"
        );
    }

    #[test]
    fn set_adds_a_missing_option_at_the_end_of_its_section() {
        let out = edit(&[Edit::set("segment", "ai", "ipv6", "0")]);
        assert!(
            out.contains("\tlist port 'lan2'\n\toption ipv6 '0'\n\nconfig lan"),
            "{out}"
        );
    }

    #[test]
    fn lists_are_replaced_added_once_and_removed() {
        let out = edit(&[Edit::set_list(
            "lan",
            "lan",
            "admin_host",
            &["192.168.8.30".into(), "192.168.8.31".into()],
        )]);
        assert!(
            out.ends_with("\tlist admin_host '192.168.8.30'\n\tlist admin_host '192.168.8.31'\n")
        );
        let out = edit(&[
            Edit::add_list("lan", "lan", "admin_host", "192.168.8.20"),
            Edit::add_list("lan", "lan", "admin_host", "192.168.8.21"),
        ]);
        assert_eq!(out.matches("192.168.8.20").count(), 1);
        assert!(out.ends_with("'192.168.8.20'\n\tlist admin_host '192.168.8.21'\n"));
        let out = edit(&[Edit::set_list("lan", "lan", "admin_host", &[])]);
        assert!(!out.contains("admin_host"));
    }

    #[test]
    fn a_missing_section_is_added_and_quotes_survive() {
        let out = edit(&[Edit::set("selftest", "selftest", "interval", "5")]);
        assert!(out.ends_with("\nconfig selftest 'selftest'\n\toption interval '5'\n"));
        let (text, _) =
            edit_text(BASE, &[Edit::set("cage", "main", "state_dir", "/tmp/it's")]).unwrap();
        let cfg = crate::config::parse(&text).unwrap();
        assert_eq!(cfg.main.state_dir, PathBuf::from("/tmp/it's"));
    }

    #[test]
    fn an_invalid_result_is_refused_with_the_validators_message() {
        let err =
            edit_text(BASE, &[Edit::set("segment", "ai", "address", "nonsense")]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("cage.ai.address"), "{msg}");
        let err = edit_text(BASE, &[Edit::set("segment", "ai", "adress", "x")]).unwrap_err();
        assert!(err.to_string().contains("address"), "nearest name: {err}");
        let err = edit_text(BASE, &[Edit::set("segment", "ai", "bridge", "a\nb")]).unwrap_err();
        assert!(matches!(err, EditError::BadEdit(_)), "{err}");
    }
}
