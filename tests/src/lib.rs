//! The lab and the end-to-end tests' library.
//!
//! - [`lab`]: a simulated travel router in network namespaces (router, two caged hosts,
//!   a LAN host, the hotel's gateway and one of its hosts, "the internet"), made by a
//!   guard type that tears everything down again, also after a crash.
//! - [`browser`]: a real headless Chromium in a lab namespace, over WebDriver.
//! - [`frames`]: raw Ethernet frames out of a lab namespace, as a hostile host sends them.
//! - [`wait`]: waiting on a condition, bounded in time, instead of fixed sleeps.
//! - [`contract`]: MISSION.md's connectivity contract as a table of checks, and a runner
//!   that proves each one with real packets (see `cage_agent::probe`) and prints a matrix.
//! - [`vm`]: what the program `vmlab` runs inside `cargo xtask vm`'s guests (the lab on
//!   Debian's 6.1 kernels for x86_64, aarch64 and mipsel).
//!
//! Everything here needs root: namespaces, veths and raw sockets.

use std::path::{Path, PathBuf};

#[cfg(feature = "web")]
pub mod browser;
pub mod contract;
pub mod dns;
pub mod frames;
#[cfg(feature = "web")]
pub mod http;
pub mod jsonfilter;
pub mod lab;
pub mod openwrt;
pub mod owlab;
pub mod vm;
pub mod wait;

/// The workspace's directory, where the tests crate lives.
pub fn workspace_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
}

/// Where cargo puts what it builds: `$CARGO_TARGET_DIR`, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join("target"))
}

/// Whether this process runs as root (effective user id 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// An error unless running as root; `why` says what needs it. For the lab's programs.
pub fn root_for(why: &str) -> anyhow::Result<()> {
    if !is_root() {
        anyhow::bail!("run this as root: {why}");
    }
    Ok(())
}

/// The `main` of the lab's programs (`demo`, `bench`), which xtask builds and runs:
/// `dispatch` gets the arguments and gives `None` when they make no sense (then `usage`
/// is printed and the exit code is 2); an error is printed the way xtask prints its own.
pub fn program_main(
    usage: &str,
    dispatch: impl FnOnce(&[&str]) -> Option<anyhow::Result<()>>,
) -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match dispatch(&args) {
        None => {
            eprint!("{usage}");
            std::process::ExitCode::from(2)
        }
        Some(Ok(())) => std::process::ExitCode::SUCCESS,
        Some(Err(e)) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Panic with a clear message unless running as root: a test that cannot run must fail,
/// not pass silently.
pub fn require_root() {
    assert!(
        is_root(),
        "this test needs root (network namespaces, veths, raw sockets); the kernel tests \
         run as root with `cargo xtask test`"
    );
}

/// A finished command that must have succeeded: panics naming `what`, with the exit
/// status and everything the command printed, when it did not. Its standard output.
pub fn assert_success(out: &std::process::Output, what: impl std::fmt::Display) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Say on stderr that something could not be checked on this machine, and add it to the
/// list that `cargo xtask test` prints at the end of the run
/// (`<target>/tmp/cage-test-warnings.txt`): loudly, never a silent pass.
pub fn warn(msg: &str) {
    use std::io::Write;
    eprintln!("WARNING: {msg}");
    let dir = target_dir().join("tmp");
    let _ = std::fs::create_dir_all(&dir);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("cage-test-warnings.txt"))
    {
        let _ = writeln!(f, "{msg}");
    }
}
