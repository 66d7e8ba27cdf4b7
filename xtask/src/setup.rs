//! Install what building and testing Cage needs, idempotently and quickly when it is
//! already there: Debian packages (nftables, iproute2, ping, tcpdump, iperf3, and
//! Chromium with its WebDriver for the web page's browser test, zbar's QR reader; qemu for the VM stage),
//! the rustup components
//! the checks use, and the eBPF toolchain (nightly's rust-src and a bpf-linker built
//! against the nightly toolchain's own libLLVM).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::run;

/// Debian packages and a program (or an absolute path) each provides, to tell whether it
/// is installed.
const PACKAGES: &[(&str, &str)] = &[
    ("nftables", "nft"),
    ("iproute2", "ip"),
    ("iputils-ping", "ping"),
    ("tcpdump", "tcpdump"),
    ("iperf3", "iperf3"),
    // The DHCP server OpenWrt's dnsmasq init script configures in the procd test (2.90,
    // as OpenWrt 23.05 ships; the daemon only, no Debian service).
    ("dnsmasq-base", "dnsmasq"),
    // OpenWrt's busybox awk has math, Debian's static busybox does not: base-files'
    // ipcalc.sh (dnsmasq's DHCP ranges) runs on GNU awk in the lab's OpenWrt root.
    ("gawk", "gawk"),
    // The web page's end-to-end test drives a real headless Chromium.
    ("chromium", "chromium"),
    ("chromium-driver", "chromedriver"),
    // The first-run page's test reads the AI Wi-Fi's QR code as a phone would.
    ("zbar-tools", "zbarimg"),
    // The metrics test scrapes /metrics with a real Prometheus (2.42), its binary run by
    // the test in the lab; the Debian service it would start is not (policy-rc.d here).
    ("prometheus", "prometheus"),
    // The IPFIX export's test stores it with nfcapd and reads it back with nfdump.
    ("nfdump", "nfcapd"),
    // The syslog export's test runs a real rsyslogd (UDP, TCP and, with gtls, TLS).
    ("rsyslog", "rsyslogd"),
    (
        "rsyslog-gnutls",
        "/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so",
    ),
    // `cargo xtask vm` (the guests' qemu is in `vm::arch::ARCHS`): the ELF headers of the
    // guest's programs are read, the x86_64 kernel's xz payload unpacked.
    ("binutils", "readelf"),
    ("xz-utils", "xz"),
];

fn have(program: &str) -> bool {
    // A file a package provides that is not a program (a plug-in module).
    if program.starts_with('/') {
        return std::path::Path::new(program).exists();
    }
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn require_root(why: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run this as root: {why}");
    }
    Ok(())
}

/// Packages whose Debian service must not run: the tests start the program themselves,
/// inside the lab. Where apt started it (no `policy-rc.d` said no), it is stopped and
/// kept from starting at boot.
const NO_SERVICE: &[&str] = &["prometheus"];

fn no_services(installed: &[&str]) {
    let quiet = |c: &mut Command| {
        let _ = c
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    };
    for name in NO_SERVICE.iter().filter(|n| installed.contains(n)) {
        quiet(Command::new("systemctl").args(["disable", "--now", name]));
        let script = format!("/etc/init.d/{name}");
        if std::path::Path::new(&script).exists() {
            quiet(Command::new(&script).arg("stop"));
            quiet(Command::new("update-rc.d").args([name, "disable"]));
        }
    }
}

pub fn install() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .chain(crate::vm::qemu_packages())
        .filter(|(_, program)| !have(program))
        .map(|(pkg, _)| pkg)
        .collect();
    if !missing.is_empty() {
        require_root("installing Debian packages")?;
        println!("xtask setup: installing {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        no_services(&missing);
    }
    for component in ["rustfmt", "clippy"] {
        let installed = Command::new("rustup")
            .args(["component", "list", "--installed"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains(component))
            .unwrap_or(false);
        if !installed {
            println!("xtask setup: adding rustup component {component}");
            run(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    ebpf_toolchain()?;
    cross_toolchain()?;
    crate::openwrt::install(&crate::dist::workspace_root())?;
    println!("xtask setup: ready");
    Ok(())
}

/// The toolchain that builds `cage-ebpf`: nightly with rust-src (for `-Z build-std=core`)
/// and bpf-linker. Prebuilt bpf-linker downloads are not reachable here and
/// `cargo install bpf-linker` with its default features wants a system libLLVM 23, so
/// bpf-linker is built against the libLLVM that ships inside the nightly toolchain (the
/// one that produces the bitcode it links; an older reader fails with "Invalid record").
/// Takes about a minute the first time, nothing afterwards.
fn ebpf_toolchain() -> Result<()> {
    let nightly_ok = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !nightly_ok {
        println!("xtask setup: installing the nightly toolchain (for the eBPF program)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let src_installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("rust-src"))
        .unwrap_or(false);
    if !src_installed {
        println!("xtask setup: adding rust-src to nightly (eBPF builds core from source)");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    let libllvm = nightly_libllvm()?;
    let lib_name = libllvm
        .file_name()
        .and_then(|n| n.to_str())
        .context("libLLVM path without a file name")?
        .to_owned();
    if bpf_linker_uses(&lib_name) {
        return Ok(());
    }
    // "libLLVM.so.22.1-rust-1.97.0-nightly" → major version 22 → feature llvm-22.
    let major = lib_name
        .strip_prefix("libLLVM.so.")
        .and_then(|v| v.split('.').next())
        .filter(|m| m.chars().all(|c| c.is_ascii_digit()) && !m.is_empty())
        .with_context(|| format!("cannot read the LLVM version from {lib_name}"))?
        .to_owned();

    // llvm-sys looks for `$LLVM_PREFIX/lib/libLLVM.so`; the toolchain has the library under
    // its versioned name only (its `libLLVM-22-rust-….so` is a linker script), so point a
    // prefix of our own at it. The rpath lets bpf-linker find it when run by rustc.
    let prefix = cargo_home()?.join("cage-llvm").join(&lib_name);
    let lib_dir = prefix.join("lib");
    std::fs::create_dir_all(&lib_dir)
        .with_context(|| format!("cannot create {}", lib_dir.display()))?;
    for link in ["libLLVM.so", lib_name.as_str()] {
        let path = lib_dir.join(link);
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(&libllvm, &path)
            .with_context(|| format!("cannot link {} to {}", path.display(), libllvm.display()))?;
    }
    println!(
        "xtask setup: building bpf-linker against {} (LLVM {major}); this takes a few minutes",
        libllvm.display()
    );
    let started = Instant::now();
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{major}")])
        .env("LLVM_PREFIX", &prefix)
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}", lib_dir.display()),
        )
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR"))?;
    println!(
        "xtask setup: bpf-linker built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if !bpf_linker_uses(&lib_name) {
        bail!("bpf-linker was installed but does not run against {lib_name}; is $CARGO_HOME/bin on PATH?");
    }
    Ok(())
}

fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home));
    }
    let home = std::env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(Path::new(&home).join(".cargo"))
}

/// The real libLLVM shared library inside the nightly toolchain's sysroot
/// (`lib/libLLVM.so.<major>.<minor>-rust-<version>`).
fn nightly_libllvm() -> Result<PathBuf> {
    let out = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .context("cannot run rustc from the nightly toolchain")?;
    if !out.status.success() {
        bail!("rustc +nightly --print sysroot failed");
    }
    let lib = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("lib");
    let entries =
        std::fs::read_dir(&lib).with_context(|| format!("cannot read {}", lib.display()))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("libLLVM.so.") && name.contains("-rust-") {
            return Ok(e.path());
        }
    }
    bail!(
        "no libLLVM.so.*-rust-* in {}: the nightly toolchain has no shared LLVM to build bpf-linker against",
        lib.display()
    )
}

/// Whether the bpf-linker on PATH runs and is linked against this exact libLLVM.
fn bpf_linker_uses(lib_name: &str) -> bool {
    let runs = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !runs {
        return false;
    }
    let Ok(out) = Command::new("sh")
        .args(["-c", "ldd \"$(command -v bpf-linker)\""])
        .output()
    else {
        return false;
    };
    let ldd = String::from_utf8_lossy(&out.stdout);
    ldd.lines()
        .any(|l| l.contains(lib_name) && !l.contains("not found"))
}

/// What `cargo xtask dist` and the packaging tests need to build for the routers and run
/// the results here: the musl rust-std of the targets rustup ships (linked by rust-lld,
/// which is in every toolchain), qemu-user-static (run explicitly as
/// `qemu-<arch>-static`, no binfmt registration), and cargo-zigbuild with zig from PyPI
/// for the targets built with `-Z build-std` (armv7, mipsel), whose musl crt objects,
/// libc and libunwind zig provides.
fn cross_toolchain() -> Result<()> {
    const RUST_STD: &[&str] = &["aarch64-unknown-linux-musl", "x86_64-unknown-linux-musl"];
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let missing: Vec<&str> = RUST_STD
        .iter()
        .copied()
        .filter(|t| !installed.lines().any(|l| l.trim() == *t))
        .collect();
    if !missing.is_empty() {
        println!("xtask setup: adding rustup targets {}", missing.join(" "));
        run(Command::new("rustup")
            .args(["target", "add"])
            .args(&missing))?;
    }
    if !have("qemu-aarch64-static") {
        require_root("installing qemu-user-static")?;
        println!("xtask setup: installing qemu-user-static");
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .arg("qemu-user-static")
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if !have("cargo-zigbuild") {
        println!("xtask setup: installing cargo-zigbuild and zig (PyPI)");
        let pip = |extra: &[&str]| {
            run(Command::new("python3")
                .args(["-m", "pip", "install", "--quiet"])
                .args(extra)
                .args(["cargo-zigbuild==0.24.1", "ziglang==0.17.1"]))
        };
        // Debian's own python3 refuses user installs (PEP 668) unless told otherwise.
        pip(&[]).or_else(|_| pip(&["--break-system-packages"]))?;
        // pyenv installs behind shims that exist only after a rehash.
        if have("pyenv") {
            let _ = Command::new("pyenv").arg("rehash").status();
        }
        if !have("cargo-zigbuild") {
            bail!("cargo-zigbuild was installed but is not on PATH");
        }
    }
    Ok(())
}
