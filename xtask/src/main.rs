//! `cargo xtask`: set-up, demo, lab and tests, so a fresh machine needs two commands.

use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};

mod demo;
mod setup;

const USAGE: &str = "\
usage: cargo xtask <command>

  setup              install what Cage's build and tests need (idempotent)
  demo               bring up the lab with Cage running, check the contract, print hints
  lab down           tear the demo lab down (also cleans up after a crashed run)
  test               setup, build, run every test, check nothing was left behind
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["setup"] => setup::run(),
        ["demo"] => setup::run().and_then(|()| demo::up()),
        ["lab", "down"] => demo::down(),
        ["test"] => setup::run().and_then(|()| test()),
        _ => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Run a command, inheriting stdio; fail with its name if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn test() -> Result<()> {
    setup::require_root("the tests build network namespaces and nftables tables")?;
    let before = cage_tests::lab::leftovers("cgt-");
    let warnings = std::path::Path::new("target/tmp/cage-test-warnings.txt");
    let _ = std::fs::remove_file(warnings);
    run(cargo().args(["build", "--workspace", "--locked"]))?;
    let tests = run(cargo().args(["test", "--workspace", "--locked", "--no-fail-fast"]));
    // Checks the kernel here could not run: said loudly, at the end, every time.
    if let Ok(w) = std::fs::read_to_string(warnings) {
        for line in w.lines() {
            println!("xtask: NOT CHECKED ON THIS MACHINE: {line}");
        }
    }
    tests?;
    // The tests each clean up after themselves; prove it for the whole run.
    let after = cage_tests::lab::leftovers("cgt-");
    let new: Vec<_> = after.iter().filter(|l| !before.contains(l)).collect();
    if !new.is_empty() {
        bail!("the tests left these behind: {new:?}");
    }
    println!("xtask: no namespace, link or table left behind by the tests");
    Ok(())
}
