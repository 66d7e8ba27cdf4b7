//! The agent's modules form layers: no module depends, directly or through others, on a
//! module that depends on it. This test reads the sources (`crate::NAME` paths outside
//! comments and test modules) and fails on a cycle, naming it, so that a new one is
//! caught when it is written rather than when it has grown roots.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each top-level module of the library and the top-level modules it names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = Vec::new();
    collect(&src, &mut files);
    for path in files {
        let rel = path.strip_prefix(&src).expect("under src");
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|s| s.trim_end_matches(".rs").to_owned())
            .expect("a file name");
        // main.rs is the binary (it uses `cage_agent::`), lib.rs only declares; this
        // file names modules in its own text.
        if ["main", "lib", "layers"].contains(&top.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable source");
        let deps = graph.entry(top.clone()).or_default();
        for dep in crate_paths(&without_tests(&without_comments(&text))) {
            if dep != top {
                deps.insert(dep);
            }
        }
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        // `crate::` followed by something that is not a module (a macro, a re-export
        // such as `crate::policy` from cage-policy) is not an edge between two files.
        deps.retain(|d| modules.contains(d));
    }
    graph
}

fn collect(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            collect(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The text without `//` comments (doc comments included), kept line for line.
fn without_comments(text: &str) -> String {
    text.lines()
        .map(|l| {
            if l.trim_start().starts_with("//") {
                ""
            } else {
                // A trailing comment; "//" inside a string (a URL) has no blank before it.
                l.split(" //").next().unwrap_or("")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The text without `#[cfg(test)]` modules: a test may use any module as a fixture.
fn without_tests(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "#[cfg(test)]".len()..];
        if !after.trim_start().starts_with("mod ") {
            out.push_str("#[cfg(test)]");
            rest = after;
            continue;
        }
        // Skip to the brace that closes the module (or its `;`).
        let mut depth = 0usize;
        let mut end = after.len();
        for (i, c) in after.char_indices() {
            match c {
                ';' if depth == 0 => {
                    end = i + 1;
                    break;
                }
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// The first segment of every `crate::…` path, `use crate::{a, b::c}` included.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group: the first segment of each item at depth 0.
            let mut depth = 0usize;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_ascii_alphabetic() || c == '_') => {
                        found.insert(ident(&group[i..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// A cycle through `start`, if there is one: the modules in order, `start` first.
fn cycle_from(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    // Depth-first search for a path from start's dependencies back to start.
    let mut stack: Vec<(String, Vec<String>)> = vec![(start.to_owned(), vec![start.to_owned()])];
    let mut seen = BTreeSet::new();
    while let Some((node, path)) = stack.pop() {
        for dep in graph.get(&node).into_iter().flatten() {
            if dep == start {
                return Some(path);
            }
            if seen.insert(dep.clone()) {
                let mut next = path.clone();
                next.push(dep.clone());
                stack.push((dep.clone(), next));
            }
        }
    }
    None
}

#[test]
fn modules_have_no_cycles() {
    let graph = graph();
    assert!(
        graph.len() > 15 && graph["daemon"].contains("apply"),
        "the source scan found too little: {graph:?}"
    );
    let cycles: Vec<String> = graph
        .keys()
        .filter_map(|m| cycle_from(&graph, m))
        .map(|c| format!("{} -> {}", c.join(" -> "), c[0]))
        .collect();
    assert!(
        cycles.is_empty(),
        "module cycles in cage-agent (break them by moving what both need into a leaf):\n{}",
        cycles.join("\n")
    );
}

#[test]
fn the_leaves_stay_leaves() {
    // What others read and write without depending on who acts on it: the running
    // daemon's state file, the kill switch's state and the audit log. They may log,
    // read the clock and append to the audit log (itself a leaf).
    let graph = graph();
    let allowed: BTreeSet<String> = ["config", "log", "clock", "audit"].map(String::from).into();
    for leaf in ["running", "isolation", "audit", "config", "clock", "log"] {
        let deps = &graph[leaf];
        assert!(
            deps.is_subset(&allowed),
            "{leaf} must depend on config, log, clock and audit only, but uses {deps:?}"
        );
    }
}

#[test]
fn the_scanner_sees_what_it_must() {
    let text = "use crate::{apply::{self, Checked}, config, nft::x};\n\
                // crate::daemon in a comment\n\
                let a = crate::dns::allow(); // crate::web trailing\n\
                #[cfg(test)]\nmod tests { use crate::status; }\n";
    let found = crate_paths(&without_tests(&without_comments(text)));
    let want: BTreeSet<String> = ["apply", "config", "nft", "dns"].map(String::from).into();
    assert_eq!(found, want);
    let looped: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(
        cycle_from(&looped, "a"),
        Some(vec!["a".into(), "b".into(), "c".into()])
    );
    assert_eq!(cycle_from(&looped, "d"), None);
}
