//! Golden files: a configuration in, the whole rendered ruleset out.
//!
//! Each `tests/golden/NAME.conf` starts with a line `# facts: …` giving what detection
//! would find on the router (WAN devices, upstream subnets, kernel bridge-meta support);
//! the expected ruleset is `tests/golden/NAME.nft`. The example configuration shipped in
//! the package is a case of its own. To regenerate the expectations on purpose, after a
//! deliberate policy change, run with `CAGE_BLESS=1` and review the diff.
//!
//! Every rendered ruleset is also fed to the real `nft --check` inside a throwaway network
//! namespace, so a golden file can never hold a ruleset the kernel would refuse.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cage_agent::probe::NetNsGuard;
use cage_agent::{config, nft, policy};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn example_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../openwrt/files/etc/config/cage")
}

fn parse_facts(line: &str) -> policy::Facts {
    let mut f = policy::Facts::default();
    for kv in line.split_whitespace() {
        let (k, v) = kv.split_once('=').expect("facts are key=value");
        let list = || v.split(',').filter(|s| !s.is_empty());
        match k {
            "wan" => f.wan_devices = list().map(str::to_owned).collect(),
            "upstream4" => f.upstream4 = list().map(|s| s.parse().unwrap()).collect(),
            "upstream6" => f.upstream6 = list().map(|s| s.parse().unwrap()).collect(),
            "bridge_meta" => f.bridge_meta = v == "1",
            other => panic!("unknown fact {other}"),
        }
    }
    f
}

/// (case name, configuration text, facts, where the expectation lives)
fn cases() -> Vec<(String, String, policy::Facts, PathBuf)> {
    let mut cases = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(golden_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "conf"))
        .collect();
    entries.sort();
    for path in entries {
        let text = std::fs::read_to_string(&path).unwrap();
        let first = text.lines().next().unwrap_or_default();
        let facts = first
            .strip_prefix("# facts:")
            .unwrap_or_else(|| panic!("{}: first line must be '# facts: …'", path.display()));
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        cases.push((
            name,
            text.clone(),
            parse_facts(facts),
            path.with_extension("nft"),
        ));
    }
    cases.push((
        "example".into(),
        std::fs::read_to_string(example_config()).unwrap(),
        parse_facts("wan=wan upstream4=192.168.1.0/24 bridge_meta=1"),
        golden_dir().join("example.nft"),
    ));
    cases
}

#[test]
fn rendered_rulesets_match_golden_files() {
    let bless = std::env::var_os("CAGE_BLESS").is_some();
    let cases = cases();
    assert!(cases.len() >= 5, "only {} golden cases", cases.len());
    let mut failures = Vec::new();
    for (name, text, facts, expected_path) in &cases {
        let cfg = config::parse(text).unwrap_or_else(|e| panic!("golden case {name}: {e}"));
        let got = nft::to_text(&policy::render(&cfg, facts));
        if bless {
            std::fs::write(expected_path, &got).unwrap();
            continue;
        }
        match std::fs::read_to_string(expected_path) {
            Ok(want) if want == got => {}
            Ok(want) => failures.push(format!(
                "{name}: rendered ruleset differs from {}\n{}",
                expected_path.display(),
                first_difference(&want, &got)
            )),
            Err(e) => failures.push(format!(
                "{name}: cannot read {} ({e}); run with CAGE_BLESS=1 to create it",
                expected_path.display()
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    println!("{} golden cases match", cases.len());
}

fn first_difference(want: &str, got: &str) -> String {
    for (i, (w, g)) in want.lines().zip(got.lines()).enumerate() {
        if w != g {
            return format!("line {}:\n  want: {w}\n  got:  {g}", i + 1);
        }
    }
    format!(
        "lengths differ: want {} lines, got {}",
        want.lines().count(),
        got.lines().count()
    )
}

/// A check that could not run on this kernel: said on stderr, and collected in a file
/// that `cargo xtask test` prints at the end of the run so it is not lost in the output.
fn warn(msg: &str) {
    eprintln!("WARNING: {msg}");
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cage-test-warnings.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        use std::io::Write;
        let _ = writeln!(f, "{msg}");
    }
}

/// A network namespace for the duration of a test, removed on drop.
fn netns(tag: &str) -> NetNsGuard {
    // SAFETY: geteuid has no preconditions.
    assert!(
        unsafe { libc::geteuid() } == 0,
        "this test needs root: it runs nft in a throwaway network namespace"
    );
    NetNsGuard::named(format!("cgt-golden-{tag}-{}", std::process::id()))
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn every_golden_ruleset_passes_nft_check_and_applies() {
    let ns = netns("check");
    let kernel_bridge_meta = nft::supports_bridge_meta();
    for (name, text, mut facts, _) in cases() {
        let cfg = config::parse(&text).unwrap();
        if facts.bridge_meta && !kernel_bridge_meta {
            warn(&format!(
                "golden case {name}: this kernel has no nft_meta_bridge \
                 (CONFIG_NFT_BRIDGE_META), so its `meta ibrname` rule is NOT checked here; \
                 the variant without it was checked instead"
            ));
            facts.bridge_meta = false;
        }
        let json = nft::to_json(&policy::render(&cfg, &facts));
        for args in [&["--check", "-j", "-f", "-"][..], &["-j", "-f", "-"][..]] {
            let mut child = Command::new("ip")
                .args(["netns", "exec", ns.name(), "nft"])
                .args(args)
                .stdin(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(json.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{name}: nft {args:?} refused the ruleset: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
