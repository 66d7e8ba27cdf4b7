//! `cargo xtask package`: installable `.ipk` packages (opkg: OpenWrt 23.05, 24.10 and
//! GL.iNet's firmware) without the OpenWrt SDK, one per OpenWrt package architecture,
//! from the binaries `cargo xtask dist` builds and the files in `openwrt/`.
//!
//! The format is the one OpenWrt's own `scripts/ipkg-build` writes and opkg-lede reads:
//! a gzip'd tar (not the `ar` archive of Debian and older opkg) holding
//! `./debian-binary` ("2.0"), `./data.tar.gz` and `./control.tar.gz`, each tar in GNU
//! format with numeric owners 0:0, names sorted and one fixed mtime, gzip without a
//! name or time (reproducible). `Installed-Size` is the size of the uncompressed data
//! tar, as ipkg-build computes it.
//!
//! No `.apk` for OpenWrt 25.12: apk-tools 3 (the ADB format) is not packaged for the
//! build machines' Debian, and an unsigned hand-made ADB would need `--allow-untrusted`
//! anyway; the OpenWrt 25.12 SDK builds and signs one from `openwrt/Makefile`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::dist::{self, Built};
use crate::run;

/// Package version: the workspace version and OpenWrt's release counter (`-r1`), as an
/// SDK build of `openwrt/Makefile` (PKG_RELEASE 1) names it.
pub fn version() -> String {
    format!("{}-r{}", env!("CARGO_PKG_VERSION"), RELEASE)
}
const RELEASE: u32 = 1;

/// What opkg resolves on the router: nft with JSON support, the bridge family for the
/// layer-2 rule, cls_bpf/clsact for the flow-log program on kernels before TCX.
pub const DEPENDS: &str = "nftables-json, kmod-nft-bridge, kmod-sched-bpf";

/// Files that `opkg upgrade` keeps when the user changed them.
pub const CONFFILES: &[&str] = &["/etc/config/cage"];

/// The package's files: path on the router, source in the repository (None: the
/// binary), mode. Owners are root:root.
pub const FILES: &[(&str, Option<&str>, u32)] = &[
    ("usr/bin/cage", None, 0o755),
    (
        "etc/init.d/cage",
        Some("openwrt/files/etc/init.d/cage"),
        0o755,
    ),
    // 0600 like the SDK's INSTALL_CONF.
    (
        "etc/config/cage",
        Some("openwrt/files/etc/config/cage"),
        0o600,
    ),
    (
        "etc/uci-defaults/90-cage",
        Some("openwrt/files/etc/uci-defaults/90-cage"),
        0o755,
    ),
    (
        "etc/hotplug.d/button/50-cage",
        Some("openwrt/files/etc/hotplug.d/button/50-cage"),
        0o755,
    ),
    // Which wired port is the AI port (90-cage at install, `cage port`).
    (
        "usr/libexec/cage-port",
        Some("openwrt/files/usr/libexec/cage-port"),
        0o755,
    ),
    // What removing the package does (the prerm runs it).
    (
        "usr/libexec/cage-remove",
        Some("openwrt/files/usr/libexec/cage-remove"),
        0o755,
    ),
];

/// Maintainer scripts in the control archive.
const SCRIPTS: &[&str] = &["postinst", "prerm"];

const DESCRIPTION: &str = "Cage puts a machine that runs an autonomous AI agent on a network segment of its own: it reaches the internet and nothing else (not the LAN, the router, the upstream network or another caged host). nftables policy, eBPF flow log, kill switch.";

/// `cargo xtask package [--target T]...`: dist, then one `.ipk` per package architecture.
pub fn run_package(args: &[&str]) -> Result<()> {
    let targets = dist::select(args)?;
    let (built, failed) = dist::build_all(&targets);
    let mut made = Vec::new();
    for b in &built {
        for arch in b.target.opkg_archs {
            made.push(ipk(b, arch)?);
        }
    }
    let _ = std::fs::remove_dir(dist::dist_dir().join("ipk"));
    dist::print_summary(&built, &failed);
    for p in &made {
        let size = std::fs::metadata(p)?.len();
        println!("{} ({size} bytes)", p.display());
    }
    if !failed.is_empty() {
        bail!(
            "no package for {}: the binary did not build or does not run",
            dist::triples(&failed)
        );
    }
    Ok(())
}

/// `target/dist/cage_<version>_<arch>.ipk`
pub fn ipk_path(arch: &str) -> PathBuf {
    dist::dist_dir().join(format!("cage_{}_{arch}.ipk", version()))
}

/// Build the `.ipk` of one binary for one package architecture.
pub fn ipk(built: &Built, arch: &str) -> Result<PathBuf> {
    let root = dist::workspace_root();
    check_files_listed(&root)?;
    let work = dist::dist_dir().join("ipk").join(arch);
    if work.exists() {
        std::fs::remove_dir_all(&work)
            .with_context(|| format!("cannot remove {}", work.display()))?;
    }
    let data = work.join("data");
    let control = work.join("control");
    for (path, source, mode) in FILES {
        let from = match source {
            Some(s) => root.join(s),
            None => built.binary.clone(),
        };
        let to = data.join(path);
        mkdir_755(&data, to.parent().expect("file has a directory"))?;
        std::fs::copy(&from, &to)
            .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
        chmod(&to, *mode)?;
    }
    chmod(&data, 0o755)?;
    let mtime = source_date_epoch(&root);
    let data_tar = work.join("data.tar");
    tar(&data, &["."], &data_tar, mtime)?;
    let installed_size = std::fs::metadata(&data_tar)?.len();
    let data_gz = gzip(&data_tar)?;

    mkdir_755(&work, &control)?;
    write(
        &control.join("control"),
        &control_file(arch, installed_size),
        0o644,
    )?;
    let conffiles: String = CONFFILES.iter().map(|c| format!("{c}\n")).collect();
    write(&control.join("conffiles"), &conffiles, 0o644)?;
    for script in SCRIPTS {
        let from = root.join("openwrt/control").join(script);
        let text = std::fs::read_to_string(&from)
            .with_context(|| format!("cannot read {}", from.display()))?;
        write(&control.join(script), &text, 0o755)?;
    }
    let control_tar = work.join("control.tar");
    tar(&control, &["."], &control_tar, mtime)?;
    let control_gz = gzip(&control_tar)?;

    let outer_dir = work.join("outer");
    mkdir_755(&work, &outer_dir)?;
    write(&outer_dir.join("debian-binary"), "2.0\n", 0o644)?;
    std::fs::rename(&data_gz, outer_dir.join("data.tar.gz"))?;
    std::fs::rename(&control_gz, outer_dir.join("control.tar.gz"))?;
    let outer_tar = work.join("outer.tar");
    // ipkg-build's order, which opkg does not depend on but tools that read the first
    // member as the format marker do.
    tar(
        &outer_dir,
        &["./debian-binary", "./data.tar.gz", "./control.tar.gz"],
        &outer_tar,
        mtime,
    )?;
    let outer_gz = gzip(&outer_tar)?;
    let out = ipk_path(arch);
    std::fs::rename(&outer_gz, &out)
        .with_context(|| format!("cannot move the package to {}", out.display()))?;
    std::fs::remove_dir_all(&work).ok();
    Ok(out)
}

/// The control file. Field order as ipkg-build's packages have it.
pub fn control_file(arch: &str, installed_size: u64) -> String {
    format!(
        "Package: cage\n\
         Version: {version}\n\
         Depends: {DEPENDS}\n\
         License: MIT OR Apache-2.0\n\
         Section: net\n\
         Maintainer: Cage developers <cage@localhost>\n\
         Architecture: {arch}\n\
         Installed-Size: {installed_size}\n\
         Description: {DESCRIPTION}\n",
        version = version()
    )
}

/// Every file under `openwrt/files` must be in FILES (with its mode): a new file must
/// not be silently left out of the package.
fn check_files_listed(root: &Path) -> Result<()> {
    let base = root.join("openwrt/files");
    let mut stack = vec![base.clone()];
    while let Some(dir) = stack.pop() {
        for e in
            std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
        {
            let path = e?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(&base).expect("under base");
            let rel = rel.to_string_lossy();
            if !FILES.iter().any(|(p, _, _)| *p == rel) {
                bail!("openwrt/files/{rel} is not listed in xtask/src/package.rs FILES (with its mode)");
            }
        }
    }
    Ok(())
}

/// The last commit's time, so that two builds of one commit give the same archives.
fn source_date_epoch(root: &Path) -> u64 {
    if let Some(e) = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return e;
    }
    Command::new("git")
        .args(["log", "-1", "--format=%ct"])
        .current_dir(root)
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(0)
}

/// GNU tar as ipkg-build calls it: GNU format, numeric owners 0:0, sorted, fixed mtime.
fn tar(dir: &Path, members: &[&str], out: &Path, mtime: u64) -> Result<()> {
    run(Command::new("tar")
        .args([
            "--format=gnu",
            "--numeric-owner",
            "--owner=0",
            "--group=0",
            "--sort=name",
        ])
        .arg(format!("--mtime=@{mtime}"))
        .arg("-C")
        .arg(dir)
        .arg("-cf")
        .arg(out)
        .args(members))
}

/// `gzip -n -9`: no name, no time stamp. Returns `<file>.gz`; the input is removed.
fn gzip(file: &Path) -> Result<PathBuf> {
    run(Command::new("gzip").args(["-n", "-9", "-f"]).arg(file))?;
    let mut gz = file.as_os_str().to_owned();
    gz.push(".gz");
    Ok(PathBuf::from(gz))
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    chmod(path, mode)
}

fn chmod(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {} {mode:o}", path.display()))
}

/// Create `dir` and the directories between `base` and it, each 0755 whatever the umask.
fn mkdir_755(base: &Path, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut d = dir;
    while d.starts_with(base) {
        chmod(d, 0o755)?;
        match d.parent() {
            Some(p) if p != d => d = p,
            _ => break,
        }
    }
    Ok(())
}
