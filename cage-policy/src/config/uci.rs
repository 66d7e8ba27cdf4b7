//! A parser for OpenWrt's UCI configuration syntax (see `uci(1)`): `config TYPE [NAME]`,
//! `option NAME VALUE`, `list NAME VALUE`, `#` comments, quoting with '' and "".
//!
//! It follows libuci's own parser (`file.c`) so that a file `uci import` accepts reads the
//! same here: words are separated by blanks; a word is made of bare, '…' and "…" pieces
//! glued together like in a shell ('a'"b" is `ab`); a backslash outside single quotes takes
//! the next character literally (this is how `uci export` writes a quote: 'it'\''s');
//! an unquoted `#` starts a comment, even in the middle of a word, as in libuci; the
//! keywords may be abbreviated to their first letter, as libuci allows.
//!
//! Two things libuci accepts are refused here, because they make a line's meaning hard
//! to see: a backslash at the end of a line (libuci joins the next line) and an unquoted
//! `;` (libuci starts another command on the same line). Both get an error that says so.

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
pub fn parse(text: &str) -> Result<RawConfig, ConfigError> {
    let mut config = RawConfig::default();
    for (index, line) in text.split('\n').enumerate() {
        let lineno = index + 1;
        let words = split_words(line).map_err(|message| syntax(lineno, message))?;
        let Some((keyword, args)) = words.split_first() else {
            continue;
        };
        match keyword.as_str() {
            "config" | "c" => {
                let (kind, name) = match args {
                    [] => {
                        return Err(syntax(
                            lineno,
                            "'config' needs a section type: config TYPE ['NAME'], \
                             e.g. config segment 'ai'"
                                .into(),
                        ))
                    }
                    [kind] => (kind, None),
                    [kind, name] => (kind, Some(name)),
                    [_, _, extra, ..] => {
                        return Err(trailing(lineno, extra, "config TYPE ['NAME']"))
                    }
                };
                check_name(lineno, "section type", kind)?;
                if let Some(name) = name {
                    check_name(lineno, "section name", name)?;
                }
                config.sections.push(RawSection {
                    kind: kind.clone(),
                    name: name.cloned(),
                    line: lineno,
                    options: Vec::new(),
                });
            }
            "option" | "o" | "list" | "l" => {
                let is_list = keyword.starts_with('l');
                let keyword = if is_list { "list" } else { "option" };
                let Some(section) = config.sections.last_mut() else {
                    return Err(syntax(
                        lineno,
                        format!(
                            "'{keyword}' before any 'config' line; start a section first \
                             with config TYPE ['NAME'], e.g. config segment 'ai'"
                        ),
                    ));
                };
                let (name, value) = match args {
                    [] => {
                        return Err(syntax(
                            lineno,
                            format!("'{keyword}' needs a name and a value: {keyword} NAME 'VALUE'"),
                        ))
                    }
                    [name] => {
                        check_name(lineno, "option name", name)?;
                        return Err(syntax(
                            lineno,
                            format!(
                                "{keyword} '{name}' has no value; write {keyword} {name} 'VALUE' \
                                 ('' for an empty one)"
                            ),
                        ));
                    }
                    [name, value] => (name, value),
                    [_, _, extra, ..] => {
                        return Err(trailing(lineno, extra, &format!("{keyword} NAME 'VALUE'")))
                    }
                };
                check_name(lineno, "option name", name)?;
                section.options.push(RawOption {
                    name: name.clone(),
                    value: value.clone(),
                    is_list,
                    line: lineno,
                });
            }
            // `package NAME` names the configuration in `uci import` streams; the file
            // itself is the package here, so the line is checked and otherwise ignored.
            "package" | "p" => match args {
                [] => {
                    return Err(syntax(
                        lineno,
                        "'package' needs a name: package 'cage'".into(),
                    ))
                }
                [name] => check_name(lineno, "package name", name)?,
                [_, extra, ..] => return Err(trailing(lineno, extra, "package 'NAME'")),
            },
            other => {
                return Err(syntax(
                    lineno,
                    format!(
                        "unknown keyword '{}'; a line starts with config, option, list \
                         or package, or is a # comment",
                        printable(other)
                    ),
                ))
            }
        }
    }
    Ok(config)
}

fn syntax(line: usize, message: String) -> ConfigError {
    ConfigError {
        section: None,
        option: None,
        line,
        message,
    }
}

fn trailing(line: usize, extra: &str, form: &str) -> ConfigError {
    syntax(
        line,
        format!(
            "unexpected '{}' after the last argument; the form is {form}, and a value \
             with blanks in it must be quoted",
            printable(extra)
        ),
    )
}

/// UCI names (section types and names, option names) are `[A-Za-z0-9_]+`.
fn check_name(line: usize, what: &str, name: &str) -> Result<(), ConfigError> {
    if is_uci_name(name) {
        return Ok(());
    }
    let mut message = format!(
        "'{}' is not a valid {what}: UCI names are made of letters, digits and '_'",
        printable(name)
    );
    let fixed = name.replace('-', "_");
    if is_uci_name(&fixed) {
        message.push_str(&format!(", e.g. '{fixed}'"));
    }
    Err(syntax(line, message))
}

pub(crate) fn is_uci_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Blanks as libuci sees them (`isspace` in the C locale); `\r` makes CRLF files work.
fn is_blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\x0b' | '\x0c')
}

/// Split one line into words, removing quotes, escapes and the comment.
fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    'words: loop {
        while chars.peek().is_some_and(|&c| is_blank(c)) {
            chars.next();
        }
        match chars.peek() {
            None | Some('#') => break,
            Some(_) => {}
        }
        let mut word = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\'' => loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => {
                            return Err("unterminated ' quote; close the value with ' on the \
                                        same line"
                                .into())
                        }
                    }
                },
                '"' => loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c) => word.push(c),
                            None => return Err(continuation()),
                        },
                        Some(c) => word.push(c),
                        None => {
                            return Err("unterminated \" quote; close the value with \" on the \
                                        same line"
                                .into())
                        }
                    }
                },
                '\\' => match chars.next() {
                    Some(c) => word.push(c),
                    None => return Err(continuation()),
                },
                // As in libuci, an unquoted '#' ends the word and the line.
                '#' => {
                    words.push(word);
                    break 'words;
                }
                ';' => {
                    return Err("unquoted ';'; put each command on a line of its own, and \
                                quote a value that contains ';'"
                        .into())
                }
                c if is_blank(c) => break,
                c => word.push(c),
            }
        }
        words.push(word);
    }
    Ok(words)
}

fn continuation() -> String {
    "backslash at the end of the line; a value must fit on one line (quote it, \
     and write a literal backslash as \\\\)"
        .into()
}

/// A value for an error message: control characters are escaped so that a message can't
/// forge lines of its own, and a very long value is cut.
pub(crate) fn printable(s: &str) -> String {
    const MAX: usize = 80;
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == MAX {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        split_words(line).unwrap()
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    fn one_option(text: &str) -> RawOption {
        let raw = parse(text).unwrap();
        assert_eq!(raw.sections.len(), 1);
        assert_eq!(raw.sections[0].options.len(), 1);
        raw.sections[0].options[0].clone()
    }

    #[test]
    fn splits_bare_and_quoted_words() {
        assert_eq!(words("option a b"), ["option", "a", "b"]);
        assert_eq!(words("\toption  'a'\t\"b c\"  "), ["option", "a", "b c"]);
        assert_eq!(words(""), Vec::<String>::new());
        assert_eq!(words("   \t "), Vec::<String>::new());
    }

    #[test]
    fn concatenates_adjacent_pieces() {
        assert_eq!(words(r#"'a'"b"c"#), ["abc"]);
        // How `uci export` writes a single quote inside a value.
        assert_eq!(words(r"'it'\''s'"), ["it's"]);
    }

    #[test]
    fn escapes() {
        assert_eq!(words(r#""a\"b""#), ["a\"b"]);
        assert_eq!(words(r#""a\\b""#), [r"a\b"]);
        // libuci does not decode escapes: \n is an 'n'.
        assert_eq!(words(r#""a\nb""#), ["anb"]);
        // Single quotes keep backslashes as they are.
        assert_eq!(words(r"'a\b'"), [r"a\b"]);
        assert_eq!(words(r"a\ b"), ["a b"]);
    }

    #[test]
    fn comments() {
        assert_eq!(words("# all of it"), Vec::<String>::new());
        assert_eq!(words("option a 'b' # trailing"), ["option", "a", "b"]);
        assert_eq!(words("option a b#c"), ["option", "a", "b"]);
        assert_eq!(words("option a '#b'"), ["option", "a", "#b"]);
        assert_eq!(words("option a \"#b\""), ["option", "a", "#b"]);
    }

    #[test]
    fn empty_quoted_value_is_a_value() {
        assert_eq!(words("option a ''"), ["option", "a", ""]);
        assert_eq!(one_option("config x\noption a ''").value, "");
    }

    #[test]
    fn parses_sections_and_options() {
        let raw = parse(
            "package cage\n\nconfig segment 'ai'\n\toption bridge br-cage # the bridge\n\
             \tlist port \"lan3\"\nconfig lan\n\tlist device 'br-lan'\n",
        )
        .unwrap();
        assert_eq!(
            raw,
            RawConfig {
                sections: vec![
                    RawSection {
                        kind: "segment".into(),
                        name: Some("ai".into()),
                        line: 3,
                        options: vec![
                            RawOption {
                                name: "bridge".into(),
                                value: "br-cage".into(),
                                is_list: false,
                                line: 4,
                            },
                            RawOption {
                                name: "port".into(),
                                value: "lan3".into(),
                                is_list: true,
                                line: 5,
                            },
                        ],
                    },
                    RawSection {
                        kind: "lan".into(),
                        name: None,
                        line: 6,
                        options: vec![RawOption {
                            name: "device".into(),
                            value: "br-lan".into(),
                            is_list: true,
                            line: 7,
                        }],
                    },
                ],
            }
        );
    }

    #[test]
    fn quoted_names_and_crlf() {
        let raw = parse("config 'segment' 'ai'\r\n\toption 'vlan' '10'\r\n").unwrap();
        assert_eq!(raw.sections[0].kind, "segment");
        assert_eq!(raw.sections[0].name.as_deref(), Some("ai"));
        assert_eq!(raw.sections[0].options[0].name, "vlan");
        assert_eq!(raw.sections[0].options[0].value, "10");
    }

    #[test]
    fn abbreviated_keywords_like_libuci() {
        let raw = parse("c segment\no vlan 10\nl port lan3\np cage\n").unwrap();
        assert_eq!(raw.sections[0].options.len(), 2);
        assert!(raw.sections[0].options[1].is_list);
    }

    #[test]
    fn errors_name_the_line_and_the_form() {
        for (text, start) in [
            (
                "config cage\n\toption a 'b\n",
                "line 2: unterminated ' quote",
            ),
            (
                "config cage\n\toption a \"b\n",
                "line 2: unterminated \" quote",
            ),
            (
                "\n# hi\n\toption a b\n",
                "line 3: 'option' before any 'config' line",
            ),
            ("\nlist a b\n", "line 2: 'list' before any 'config' line"),
            (
                "config cage\n\toption state_dir\n",
                "line 2: option 'state_dir' has no value",
            ),
            (
                "config cage\n\toption state_dir /a /b\n",
                "line 2: unexpected '/b' after the last argument",
            ),
            ("config cage main extra\n", "line 1: unexpected 'extra'"),
            ("config\n", "line 1: 'config' needs a section type"),
            (
                "config cage 'my main'\n",
                "line 1: 'my main' is not a valid section name",
            ),
            (
                "config 'seg.ment'\n",
                "line 1: 'seg.ment' is not a valid section type",
            ),
            (
                "config cage\n\toption '' x\n",
                "line 2: '' is not a valid option name",
            ),
            (
                "config cage\n\topton a b\n",
                "line 2: unknown keyword 'opton'",
            ),
            (
                "config cage\n\toption a b; option c d\n",
                "line 2: unquoted ';'",
            ),
            (
                "config cage\n\toption a b\\\n",
                "line 2: backslash at the end of the line",
            ),
            ("package\n", "line 1: 'package' needs a name"),
        ] {
            let e = err(text);
            assert!(e.starts_with(start), "{e}");
        }
        // The one error that also suggests the name meant.
        let e = err("config cage\n\toption state-dir /a\n");
        assert!(
            e.starts_with("line 2: 'state-dir' is not a valid option name")
                && e.ends_with("e.g. 'state_dir'"),
            "{e}"
        );
    }

    #[test]
    fn error_messages_escape_control_characters() {
        let e = err("config cage\n\toption a b '\x1b[31m'\n");
        assert!(e.contains(r"\u{1b}[31m"), "{e}");
        assert!(!e.contains('\x1b'));
    }
}
