//! Domain names and the patterns of `allow_domain` / `doh_block`: syntax and matching.
//!
//! Names are compared in lower case without the trailing dot. A pattern is a name
//! (`api.anthropic.com`: that name only) or a wildcard (`*.example.com`: any name below
//! example.com, not example.com itself, as in DNS and TLS certificates).

/// Check a pattern and return it normalised (lower case, no trailing dot), or say why not.
pub fn pattern(s: &str) -> Result<String, &'static str> {
    let (wild, rest) = match s.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let name = normalise(rest)?;
    if wild && !name.contains('.') {
        return Err("a wildcard needs at least two labels after '*.', e.g. *.example.com");
    }
    Ok(if wild { format!("*.{name}") } else { name })
}

/// Check a name and return it normalised (lower case, no trailing dot), or say why not.
pub fn normalise(s: &str) -> Result<String, &'static str> {
    let s = s.strip_suffix('.').unwrap_or(s);
    if s.is_empty() {
        return Err("empty");
    }
    if s.len() > 253 {
        return Err("longer than 253 characters");
    }
    for label in s.split('.') {
        if label.is_empty() {
            return Err("an empty label (two dots in a row)");
        }
        if label.len() > 63 {
            return Err("a label longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("only letters, digits, '-' and '_' in labels; '*' only as '*.' in front");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a label starting or ending with '-'");
        }
    }
    Ok(s.to_ascii_lowercase())
}

/// Whether `name` (any case, trailing dot or not) matches `pattern` (normalised).
pub fn matches(pattern: &str, name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    match pattern.strip_prefix("*.") {
        Some(domain) => {
            name.len() > domain.len() + 1
                && name.as_bytes()[name.len() - domain.len() - 1] == b'.'
                && name[name.len() - domain.len()..].eq_ignore_ascii_case(domain)
        }
        None => name.eq_ignore_ascii_case(pattern),
    }
}

/// Whether any of `patterns` matches `name`.
pub fn any_matches(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| matches(p, name))
}

/// A name as a caged host sent it, for a log line: control characters escaped (`\n` as
/// `\n`), so that a hostile query cannot forge log lines of its own. Other names are
/// unchanged.
pub fn printable(name: &str) -> std::borrow::Cow<'_, str> {
    if !name.chars().any(char::is_control) {
        return name.into();
    }
    let mut out = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_for_the_log_cannot_forge_lines() {
        assert_eq!(printable("api.anthropic.com"), "api.anthropic.com");
        assert_eq!(
            printable("x\ncage[1]: error: forged.cloudflare-dns.com\u{1b}"),
            "x\\ncage[1]: error: forged.cloudflare-dns.com\\u{1b}"
        );
    }

    #[test]
    fn patterns_are_checked_and_normalised() {
        assert_eq!(pattern("API.Anthropic.com.").unwrap(), "api.anthropic.com");
        assert_eq!(pattern("*.Example.com").unwrap(), "*.example.com");
        assert_eq!(pattern("_dmarc.example.com").unwrap(), "_dmarc.example.com");
        for bad in [
            "",
            ".",
            "a..b",
            "*.com",
            "*",
            "a.*.b",
            "ex ample.com",
            "-a.com",
            "a-.com",
            "a/b",
            "**.a.b",
            &"x".repeat(64),
            &format!("{}.com", "a.".repeat(130)),
        ] {
            assert!(pattern(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn exact_names_and_wildcards_match_as_in_dns() {
        assert!(matches("api.anthropic.com", "api.anthropic.com"));
        assert!(matches("api.anthropic.com", "API.Anthropic.COM."));
        assert!(!matches("api.anthropic.com", "x.api.anthropic.com"));
        assert!(!matches("api.anthropic.com", "anthropic.com"));
        assert!(matches("*.example.com", "a.example.com"));
        assert!(matches("*.example.com", "a.b.Example.com."));
        assert!(!matches("*.example.com", "example.com"));
        assert!(!matches("*.example.com", "badexample.com"));
        assert!(!matches("*.example.com", "a.example.com.evil"));
        assert!(!matches("*.example.com", ".example.com"));
        let list = vec!["github.com".to_owned(), "*.github.com".to_owned()];
        assert!(any_matches(&list, "github.com"));
        assert!(any_matches(&list, "api.github.com"));
        assert!(!any_matches(&list, "github.com.evil.net"));
    }
}
