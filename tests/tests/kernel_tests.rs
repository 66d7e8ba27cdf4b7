//! Plain `cargo test` passes as anyone: the tests that need root (network namespaces,
//! nftables, BPF, raw sockets) are `#[ignore = "needs root: cargo xtask test"]`, and
//! `cargo xtask test` runs them, as root, with `--include-ignored`. CI runs as root, so
//! it would never notice a new kernel test without the mark; this test holds the sources
//! to it, both ways, and says how many tests plain `cargo test` leaves out.
//!
//! It reads every Rust file of the crates that have tests, with strings and comments
//! removed, and follows calls within each file: a test needs root when its body, or a
//! function of the same file it calls (`f(…)`, `Type::f(…)`), uses one of [`MARKERS`].

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What needs root, wherever a test reaches it.
const MARKERS: &[&str] = &[
    "require_root(",
    "geteuid(",
    "Lab::up(",
    "Lab::for_test(",
    "Lab::for_contract(",
    "require_cage(",
    "NetNsGuard::named(",
    "NetNsGuard::anonymous(",
];
const KERNEL: &str = "#[ignore = \"needs root: cargo xtask test\"]";
const BUILDS: &str = "#[ignore = \"needs the router builds: cargo xtask test\"]";
const CRATES: &[&str] = &[
    "cage-agent",
    "cage-common",
    "cage-policy",
    "cage-web",
    "tests",
];

#[test]
fn every_test_that_needs_root_is_marked_and_only_those() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap();
    let mut files = Vec::new();
    for krate in CRATES {
        collect(&root.join(krate), &mut files);
    }
    let (mut kernel, mut builds, mut tests) = (0, 0, 0);
    let mut wrong = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let (fns, found) = scan(&text);
        let needs = needs_root(&fns);
        for t in found {
            tests += 1;
            let marked = t.attrs.contains(KERNEL);
            builds += usize::from(t.attrs.contains(BUILDS));
            kernel += usize::from(marked);
            let file = path.strip_prefix(&root).unwrap_or(path);
            let name = format!("{}: {}", file.display(), t.name);
            match (needs.contains(&t.name), marked) {
                (true, false) if !t.attrs.contains("#[ignore") => wrong.push(format!(
                    "{name} needs root but plain `cargo test` would run it: add {KERNEL}"
                )),
                (false, true) => wrong.push(format!(
                    "{name} is marked as needing root but reaches none of {MARKERS:?}"
                )),
                _ => {}
            }
        }
    }
    assert!(
        tests > 100 && kernel > 50,
        "the scan found too little: {tests} tests, {kernel} marked"
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Straight to the terminal: the test harness captures what `println!` writes.
    let _ = writeln!(
        std::io::stderr(),
        "\n{kernel} tests need root and {builds} the router builds: plain `cargo test` \
         skips them (\"ignored\"); `cargo xtask test`, as root, runs them all\n"
    );
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        if path.is_dir() {
            // Build output and the fuzz workspace (no tests of ours) are not sources.
            if name != "target" && name != "fuzz" {
                collect(&path, out);
            }
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// A `#[test]` function: its name and the attributes above it.
struct Test {
    name: String,
    attrs: String,
}

/// Every function of `text` by name (`f`, or `Type::f` inside `impl Type`) with its
/// body, and the tests.
fn scan(text: &str) -> (BTreeMap<String, String>, Vec<Test>) {
    let code = strip(text);
    let mut fns = BTreeMap::new();
    let mut tests = Vec::new();
    // `impl … Type {` blocks: (start, end, Type).
    let mut impls = Vec::new();
    for (at, _) in code.match_indices("impl") {
        let before = code[..at].chars().last().unwrap_or('\n');
        let after = code[at + 4..].chars().next().unwrap_or(' ');
        if before.is_alphanumeric() || before == '_' || !(after.is_whitespace() || after == '<') {
            continue;
        }
        let Some(open) = code[at..].find('{').map(|o| at + o) else {
            continue;
        };
        let head = &code[at..open];
        if head.contains(';') {
            continue;
        }
        // The implemented type: the last path segment before `{` (after `for`, if any).
        let ty_part = head.rsplit(" for ").next().unwrap_or(head);
        let ty: String = ty_part
            .trim()
            .trim_start_matches("impl")
            .split('<')
            .next()
            .unwrap_or("")
            .rsplit("::")
            .next()
            .unwrap_or("")
            .trim()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        impls.push((open, close_of(&code, open), ty));
    }
    let mut search = 0;
    while let Some(found) = code[search..].find("fn ") {
        let at = search + found;
        search = at + 3;
        let before = code[..at].chars().last().unwrap_or('\n');
        if before.is_alphanumeric() || before == '_' {
            continue;
        }
        let name: String = code[at + 3..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        // The body: the first `{` after the signature (a `;` first: no body).
        let Some(open) = code[at..].find(['{', ';']).map(|o| at + o) else {
            continue;
        };
        if code.as_bytes()[open] == b';' || name.is_empty() {
            continue;
        }
        let close = close_of(&code, open);
        let body = code[open..close].to_owned();
        let qualified = match impls.iter().find(|(s, e, _)| *s < at && at < *e) {
            Some((_, _, ty)) => format!("{ty}::{name}"),
            None => name.clone(),
        };
        // The attributes right above: lines starting with `#[`.
        let line_start = code[..at].rfind('\n').map_or(0, |i| i + 1);
        let mut attrs = Vec::new();
        for line in code[..line_start].lines().rev() {
            let line = line.trim();
            if line.starts_with("#[") {
                attrs.push(line.to_owned());
            } else if !line.is_empty() {
                break;
            }
        }
        // Attributes are read from the original text: the stripped one has no strings.
        let original_attrs = attributes_in(text, &name);
        if attrs.iter().any(|a| a == "#[test]") {
            tests.push(Test {
                name: qualified.clone(),
                attrs: original_attrs,
            });
        }
        fns.insert(qualified, body);
    }
    (fns, tests)
}

/// The attribute lines right above `fn name(` in the original text.
fn attributes_in(text: &str, name: &str) -> String {
    let Some(at) = text.find(&format!("fn {name}(")) else {
        return String::new();
    };
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let mut attrs = Vec::new();
    for line in text[..line_start].lines().rev() {
        let line = line.trim();
        if line.starts_with("#[") {
            attrs.push(line);
        } else if !line.starts_with("//") && !line.is_empty() {
            break;
        }
    }
    attrs.join("\n")
}

/// The index just past the brace that closes the one at `open`.
fn close_of(code: &str, open: usize) -> usize {
    let mut depth = 0usize;
    for (i, c) in code[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return open + i + 1;
                }
            }
            _ => {}
        }
    }
    code.len()
}

/// The functions that need root: a marker in their body, or a call of one that does.
fn needs_root(fns: &BTreeMap<String, String>) -> BTreeSet<String> {
    let mut needs: BTreeSet<String> = fns
        .iter()
        .filter(|(_, body)| MARKERS.iter().any(|m| body.contains(m)))
        .map(|(name, _)| name.clone())
        .collect();
    loop {
        let more: Vec<String> = fns
            .iter()
            .filter(|(name, _)| !needs.contains(*name))
            .filter(|(_, body)| needs.iter().any(|n| calls(body, n)))
            .map(|(name, _)| name.clone())
            .collect();
        if more.is_empty() {
            return needs;
        }
        needs.extend(more);
    }
}

/// Whether `body` calls `f` (`f(…)` not as a method or another type's function) or
/// `Type::f(…)`.
fn calls(body: &str, f: &str) -> bool {
    let pattern = format!("{f}(");
    body.match_indices(&pattern).any(|(at, _)| {
        let before = body[..at].chars().last().unwrap_or(' ');
        if f.contains("::") {
            !(before.is_alphanumeric() || before == '_')
        } else {
            !(before.is_alphanumeric() || matches!(before, '_' | '.' | ':'))
        }
    })
}

/// The code without comments, string and character literals (their contents could hold
/// braces or markers).
fn strip(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'r' if b.get(i + 1) == Some(&b'#') || b.get(i + 1) == Some(&b'"') => {
                let prev = if i > 0 { b[i - 1] } else { b' ' };
                if prev.is_ascii_alphanumeric() || prev == b'_' {
                    out.push('r');
                    i += 1;
                    continue;
                }
                let mut j = i + 1;
                let mut hashes = 0;
                while b.get(j) == Some(&b'#') {
                    hashes += 1;
                    j += 1;
                }
                if b.get(j) != Some(&b'"') {
                    out.push('r');
                    i += 1;
                    continue;
                }
                let end = format!("\"{}", "#".repeat(hashes));
                let rest = &text[j + 1..];
                i = j + 1 + rest.find(&end).map_or(rest.len(), |e| e + end.len());
                out.push_str("\"\"");
            }
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                out.push_str("\"\"");
            }
            b'\'' => {
                // A character literal ('{', '\n', '\u{1F}'), not a lifetime ('a).
                let close = text[i + 1..]
                    .char_indices()
                    .take(12)
                    .find(|&(_, c)| c == '\'');
                match close {
                    Some((k, _)) if k > 0 && (b[i + 1] == b'\\' || k <= 4) => {
                        i += k + 2;
                        out.push_str("' '");
                    }
                    _ => {
                        out.push('\'');
                        i += 1;
                    }
                }
            }
            _ => {
                let c = text[i..].chars().next().unwrap();
                out.push(c);
                i += c.len_utf8();
            }
        }
    }
    out
}

#[test]
fn the_scanner_follows_calls_within_a_file() {
    let text = r##"
        struct Router;
        impl Router {
            fn new() -> Router { assert!(unsafe { geteuid() } == 0, "{"); Router }
        }
        fn helper() { let _r = Router::new(); }
        fn pure() { let v = Vec::new(); v.new(); let s = "require_root("; }
        #[test]
        #[ignore = "needs root: cargo xtask test"]
        fn kernel() { helper(); }
        #[test]
        fn plain() { pure(); let c = '{'; }
    "##;
    let (fns, tests) = scan(text);
    let needs = needs_root(&fns);
    assert!(needs.contains("Router::new") && needs.contains("helper"));
    assert!(needs.contains("kernel"), "{needs:?}");
    assert!(
        !needs.contains("pure") && !needs.contains("plain"),
        "{needs:?}"
    );
    let names: Vec<&str> = tests.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["kernel", "plain"]);
    assert!(tests[0].attrs.contains(KERNEL) && !tests[1].attrs.contains(KERNEL));
}
