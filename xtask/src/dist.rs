//! `cargo xtask dist`: the `cage` binary for the routers, static (musl), size-optimised
//! (the workspace's release profile), with the eBPF program embedded, in
//! `target/dist/<triple>/cage`. Each binary is then run under qemu-user (`cage
//! --version`): a binary that only links is not shipped.
//!
//! Two ways to build, per target:
//! - rust-std from rustup and rust-lld as the linker (`.cargo/config.toml`): x86_64, on
//!   the stable toolchain.
//! - nightly with `-Z build-std` and zig as the C toolchain (cargo-zigbuild, from PyPI),
//!   which brings musl's crt objects, libc and libunwind for the target: aarch64, armv7
//!   (rustup ships no rust-std for armv7-unknown-linux-musleabihf for these toolchains)
//!   and mipsel (tier 3, no rust-std at all). rustc is told not to add its own
//!   self-contained crt objects (`-C link-self-contained=no`); zig's linker adds them.
//!   mipsel is built as a non-PIE static executable (see its entry in TARGETS). The
//!   standard library is built for size with the release profile (opt-level z, LTO) and
//!   `optimize_for_size`, without unwind tables (`-C force-unwind-tables=no`: panics
//!   abort) and without the backtrace symbolizer (a stripped binary has no symbols to
//!   show): on aarch64 that is 2 926 688 bytes where the stable rust-std gave 3 233 960.
//!
//! Both need a C compiler for the target, for ring (the web page's TLS): cargo-zigbuild
//! sets one for the targets it builds; for the stable ones [`c_compiler`] points the cc
//! crate at zig through the same cargo-zigbuild (`CC_<target>`/`AR_<target>`), so no
//! cross gcc is needed.
//!
//! qemu runs each binary on the routers' own core (`-cpu cortex-a53`, `cortex-a7`,
//! `24KEc`, which has no FPU), not qemu's default CPU.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::{cargo, run};

/// How a target's standard library and C runtime come about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Toolchain {
    /// Stable, rust-std from rustup, linked by rust-lld.
    Stable,
    /// Nightly, `-Z build-std`, linked by zig (cargo-zigbuild).
    BuildStd,
}

/// A router architecture Cage is built for.
#[derive(Debug)]
pub struct Target {
    pub triple: &'static str,
    /// Short name accepted on the command line.
    pub short: &'static str,
    pub toolchain: Toolchain,
    /// The qemu-user program that runs it here, and the CPU it emulates (the routers'
    /// own core); None: the build machine runs it.
    pub qemu: Option<(&'static str, &'static str)>,
    /// Extra rustc flags for this target (BuildStd targets only).
    pub rustflags: &'static [&'static str],
    /// OpenWrt package architectures this binary is packaged for (the first is the one
    /// of the devices Cage targets; the binary is the same for each).
    pub opkg_archs: &'static [&'static str],
}

pub const TARGETS: &[Target] = &[
    Target {
        triple: "aarch64-unknown-linux-musl",
        short: "aarch64",
        toolchain: Toolchain::BuildStd,
        qemu: Some(("qemu-aarch64-static", "cortex-a53")),
        rustflags: &[],
        // GL-MT3000, GL-MT6000 (Filogic); Raspberry Pi 4 class; armsr/generic.
        opkg_archs: &[
            "aarch64_cortex-a53",
            "aarch64_cortex-a72",
            "aarch64_generic",
        ],
    },
    Target {
        triple: "armv7-unknown-linux-musleabihf",
        short: "armv7",
        toolchain: Toolchain::BuildStd,
        qemu: Some(("qemu-arm-static", "cortex-a7")),
        rustflags: &[],
        // GL-AXT1800 (IPQ6000, 32-bit userspace); mvebu; ipq806x. The binary needs ARMv7
        // with VFPv3-D16, which every one of these has.
        opkg_archs: &[
            "arm_cortex-a7_neon-vfpv4",
            "arm_cortex-a9_vfpv3-d16",
            "arm_cortex-a15_neon-vfpv4",
        ],
    },
    Target {
        triple: "x86_64-unknown-linux-musl",
        short: "x86_64",
        toolchain: Toolchain::Stable,
        qemu: None,
        rustflags: &[],
        opkg_archs: &["x86_64"],
    },
    Target {
        triple: "mipsel-unknown-linux-musl",
        short: "mipsel",
        toolchain: Toolchain::BuildStd,
        // The MT7628's 24KEc has no FPU; the target is soft-float.
        qemu: Some(("qemu-mipsel-static", "24KEc")),
        // rustc makes a static-pie for this target by default, and that one segfaults
        // at its first instruction under qemu-mipsel (zig's musl start code does not
        // relocate a MIPS static-pie); a non-PIE static executable runs.
        rustflags: &["-Crelocation-model=static"],
        // GL-MT300N-V2 (MT7628), ramips mt76x8 and mt7621.
        opkg_archs: &["mipsel_24kc"],
    },
];

/// What `dist` made for one target.
#[derive(Debug)]
pub struct Built {
    pub target: &'static Target,
    pub binary: PathBuf,
    pub size: u64,
    pub seconds: f64,
    /// `cage --version` as the binary printed it (under qemu where needed).
    pub version: String,
}

/// The workspace's build output (`target`, or `$CARGO_TARGET_DIR`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// `target/dist`: the binaries (`<triple>/cage`) and the packages.
pub fn dist_dir() -> PathBuf {
    target_dir().join("dist")
}

pub fn workspace_root() -> PathBuf {
    // xtask's manifest directory is <workspace>/xtask.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// The targets named on the command line (`--target T`, by triple or short name, or
/// bare names), or every target.
pub fn select(args: &[&str]) -> Result<Vec<&'static Target>> {
    let mut chosen = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let name = match *arg {
            "--target" => iter.next().context("--target needs a value")?,
            other => other,
        };
        let target = TARGETS
            .iter()
            .find(|t| t.triple == name || t.short == name)
            .with_context(|| {
                let known: Vec<_> = TARGETS.iter().map(|t| t.short).collect();
                format!("unknown target {name}; known: {}", known.join(", "))
            })?;
        if !chosen.iter().any(|t: &&Target| t.triple == target.triple) {
            chosen.push(target);
        }
    }
    if chosen.is_empty() {
        chosen = TARGETS.iter().collect();
    }
    Ok(chosen)
}

/// `cargo xtask dist [--target T]...`: build, check each binary runs, print the sizes.
/// Every requested target is attempted; the command fails if any of them did not build
/// or does not run, after saying which.
pub fn run_dist(args: &[&str]) -> Result<()> {
    let targets = select(args)?;
    let (built, failed) = build_all(&targets);
    print_summary(&built, &failed);
    if !failed.is_empty() {
        bail!("not built or not running: {}", triples(&failed));
    }
    Ok(())
}

/// The targets that failed, for the error that ends the command: `a, b`.
pub fn triples(failed: &[(&'static Target, anyhow::Error)]) -> String {
    let names: Vec<_> = failed.iter().map(|(t, _)| t.triple).collect();
    names.join(", ")
}

/// Build every target in turn; the ones that failed come back with their error.
pub fn build_all(
    targets: &[&'static Target],
) -> (Vec<Built>, Vec<(&'static Target, anyhow::Error)>) {
    let mut built = Vec::new();
    let mut failed = Vec::new();
    for t in targets {
        match build(t) {
            Ok(b) => built.push(b),
            Err(e) => {
                eprintln!("xtask dist: {}: {e:#}", t.triple);
                failed.push((*t, e));
            }
        }
    }
    (built, failed)
}

pub fn print_summary(built: &[Built], failed: &[(&'static Target, anyhow::Error)]) {
    println!();
    println!(
        "{:<32} {:>12} {:>9} {:>8}  runs",
        "target", "bytes", "MiB", "build s"
    );
    for b in built {
        let how = match b.target.qemu {
            Some((q, cpu)) => format!("under {q} -cpu {cpu}: {}", b.version),
            None => format!("natively: {}", b.version),
        };
        println!(
            "{:<32} {:>12} {:>9.2} {:>8.0}  {how}",
            b.target.triple,
            b.size,
            b.size as f64 / (1024.0 * 1024.0),
            b.seconds
        );
    }
    for (t, e) in failed {
        // The outermost context only: "did not build" or "does not run under …".
        let first = e.to_string();
        let first = first.lines().next().unwrap_or_default().to_owned();
        println!(
            "{:<32} {:>12} {:>9} {:>8}  NO: {first}",
            t.triple, "-", "-", "-"
        );
    }
    println!("binaries in {}", dist_dir().display());
}

/// zig's name for a stable target's triple (`aarch64-linux-musl`).
fn zig_target(triple: &str) -> String {
    triple.replace("-unknown-", "-")
}

/// Point the cc crate at zig for `triple` (a stable target, linked by rust-lld, whose C
/// code, ring's, still needs a compiler): two small scripts in `target/zigcc/` that run
/// `cargo-zigbuild zig cc`/`ar` for it, named in `CC_<triple>` and `AR_<triple>`.
pub fn c_compiler(cmd: &mut Command, triple: &str) -> Result<()> {
    let dir = target_dir().join("zigcc");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let var = triple.replace('-', "_");
    for (tool, args, env) in [
        ("cc", format!("cc -- -target {}", zig_target(triple)), "CC"),
        ("ar", "ar --".to_owned(), "AR"),
    ] {
        let script = dir.join(format!("{triple}-{tool}"));
        let text = format!("#!/bin/sh\nexec cargo-zigbuild zig {args} \"$@\"\n");
        if std::fs::read_to_string(&script).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&script, &text)
                .with_context(|| format!("cannot write {}", script.display()))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        }
        cmd.env(format!("{env}_{var}"), &script);
    }
    Ok(())
}

/// `cargo build` for `t`'s toolchain (stable, or nightly `zigbuild` with `-Z build-std`
/// and the target's flags), before the package, profile and target are given.
pub fn cargo_for(t: &Target) -> Result<Command> {
    Ok(match t.toolchain {
        Toolchain::Stable => {
            let mut c = cargo();
            c.arg("build");
            c_compiler(&mut c, t.triple)?;
            c
        }
        Toolchain::BuildStd => {
            // `-Z` on the command line, not CARGO_UNSTABLE_BUILD_STD: an environment
            // variable would reach the nested cargo that cage-agent's build script runs
            // for the eBPF program, which builds `core` only.
            let flags: Vec<String> = ["-Clink-self-contained=no", "-Cforce-unwind-tables=no"]
                .iter()
                .chain(t.rustflags)
                .map(|f| format!("{f:?}"))
                .collect();
            let mut c = Command::new("cargo");
            c.args(["+nightly", "zigbuild", "-Z", "build-std=std,panic_abort"])
                .args(["-Z", "build-std-features=optimize_for_size"])
                .arg("--config")
                .arg(format!(
                    "target.{}.rustflags=[{}]",
                    t.triple,
                    flags.join(",")
                ))
                // The rustup proxy picks nightly from `+nightly`; the stable toolchain
                // that runs xtask must not win through the environment.
                .env_remove("RUSTUP_TOOLCHAIN")
                .env_remove("CARGO")
                .env_remove("RUSTC");
            c
        }
    })
}

/// Build one target, copy the binary to `target/dist/<triple>/cage` and run it.
pub fn build(t: &'static Target) -> Result<Built> {
    let started = Instant::now();
    println!("xtask dist: building {} ({:?})", t.triple, t.toolchain);
    let mut cmd = cargo_for(t)?;
    cmd.args([
        "--release",
        "--locked",
        "--package",
        "cage-agent",
        "--bin",
        "cage",
    ])
    .args(["--target", t.triple])
    .current_dir(workspace_root());
    run(&mut cmd).context("did not build (the compiler's errors are above)")?;
    let seconds = started.elapsed().as_secs_f64();

    let built = target_dir().join(t.triple).join("release").join("cage");
    let out_dir = dist_dir().join(t.triple);
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let binary = out_dir.join("cage");
    std::fs::copy(&built, &binary)
        .with_context(|| format!("cannot copy {} to {}", built.display(), binary.display()))?;
    let size = std::fs::metadata(&binary)?.len();
    println!(
        "xtask dist: {}: {size} bytes ({:.2} MiB), built in {seconds:.0} s",
        t.triple,
        size as f64 / (1024.0 * 1024.0)
    );
    let version = run_version(t, &binary)?;
    Ok(Built {
        target: t,
        binary,
        size,
        seconds,
        version,
    })
}

/// `cage --version`, under the target's qemu-user where needed. A binary that crashes
/// here is reported as not running, with what qemu said.
pub fn run_version(t: &Target, binary: &Path) -> Result<String> {
    let mut cmd = match t.qemu {
        Some((q, cpu)) => {
            let mut c = Command::new("timeout");
            c.args(["30", q, "-cpu", cpu]).arg(binary);
            c
        }
        None => {
            let mut c = Command::new("timeout");
            c.arg("30").arg(binary);
            c
        }
    };
    cmd.arg("--version");
    let out = cmd.output().with_context(|| {
        format!("cannot run {cmd:?} (is qemu-user-static installed? cargo xtask setup)")
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || !stdout.starts_with("cage ") {
        bail!(
            "{} does not run{}: {} {}{}",
            binary.display(),
            t.qemu
                .map(|(q, cpu)| format!(" under {q} -cpu {cpu}"))
                .unwrap_or_default(),
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(stdout)
}
