//! OpenWrt's own userspace, built from the sources in `../shared/openwrt` (nothing is
//! downloaded), for the tests that run Cage against the real thing: uci, ubus/ubusd,
//! jshn, ucode with the modules fw4 needs, netifd, procd, odhcpd and opkg, plus
//! firewall4 (the 23.05 pin and its newest commit) and OpenWrt 23.05.4's base-files,
//! service scripts and board definitions.
//!
//! Everything lands in `target/openwrt` (layout below); a stamp of the source tarballs
//! and of this recipe makes a second run do nothing. About a minute on 2 cores the first
//! time.
//!
//! What the tests find where, relative to the workspace root:
//!
//! ```text
//! target/openwrt/prefix/bin       uci jshn ubus ucode utpl
//! target/openwrt/prefix/sbin      ubusd netifd procd odhcpd opkg
//! target/openwrt/prefix/lib       libuci libubox libubus libblobmsg_json libjson_script libnl-tiny libucode libsetlbf, ucode/*.so
//! target/openwrt/prefix/share/libubox/jshn.sh
//! target/openwrt/prefix/share/netifd  netifd's own shell half (netifd-proto.sh, netifd-wireless.sh, utils.sh; /lib/netifd on a router)
//! target/openwrt/firewall4-23.05  firewall4 at OpenWrt 23.05.4's pin (root/, tests/, run_tests.sh)
//! target/openwrt/firewall4-main   firewall4's newest commit
//! target/openwrt/openwrt-23.05.4  base-files, procd/netifd/dnsmasq scripts, board definitions
//! ```
//!
//! The third-party sources are built as they are, with two build-flag changes that gcc 12
//! needs: netifd's and procd's CMakeLists.txt turn every warning into an error, and gcc 12
//! warns where their compilers did not, so `-Werror` is removed from the unpacked copy.
//!
//! And one change for the CI kernel, which has no bridge VLAN filtering
//! (`CONFIG_BRIDGE_VLAN_FILTERING` unset): it refuses to create a bridge whose request
//! carries `IFLA_BR_VLAN_FILTERING` at all, even 0 (`ip link add b type bridge
//! vlan_filtering 0` fails the same way), and netifd always sends it, so netifd could make
//! no bridge here. The unpacked copy sends it only when VLAN filtering is on; 0 is what the
//! kernel sets for a new bridge anyway, so on a router's kernel nothing changes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::run;

/// Bumped whenever the recipe below changes, so a stamp from an older recipe rebuilds.
const RECIPE: &str = "cage-openwrt-tools 3";

/// Debian packages the build needs, and a file each installs.
const PACKAGES: &[(&str, &str)] = &[
    ("cmake", "/usr/bin/cmake"),
    ("pkg-config", "/usr/bin/pkg-config"),
    ("libjson-c-dev", "/usr/include/json-c/json.h"),
    // The board fixtures' chroot runs OpenWrt's shell scripts under busybox's ash.
    ("busybox-static", "/bin/busybox"),
];

/// The sources, in build order (each one's libraries are there for the next).
const SOURCES: &[&str] = &[
    "libubox",
    "uci",
    "ubus",
    "libnl-tiny",
    "ucode",
    "netifd",
    "procd",
    "odhcpd",
    "opkg-lede",
];

pub fn source_dir(root: &Path) -> PathBuf {
    std::env::var_os("CAGE_OPENWRT_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../shared/openwrt"))
}

pub fn install(root: &Path) -> Result<()> {
    let src = source_dir(root);
    if !src.join("src").is_dir() {
        bail!(
            "OpenWrt's sources are not at {} (set CAGE_OPENWRT_SRC): the tests that run \
             OpenWrt's own uci, fw4, netifd and opkg need them",
            src.display()
        );
    }
    let out = root.join("target/openwrt");
    let stamp = out.join("stamp");
    let wanted = stamp_text(&src)?;
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str())
        && out.join("prefix/sbin/netifd").exists()
    {
        return Ok(());
    }
    debian_packages()?;
    println!(
        "xtask setup: building OpenWrt's uci, ubus, ucode, netifd, procd, odhcpd and opkg from {}",
        src.display()
    );
    let started = Instant::now();
    let _ = std::fs::remove_dir_all(&out);
    let build = out.join("build");
    let prefix = out.join("prefix");
    std::fs::create_dir_all(&build)
        .with_context(|| format!("cannot create {}", build.display()))?;
    for name in SOURCES {
        let tarball = tarball(&src, name, "23.05")?;
        unpack(&tarball, &build)?;
        build_one(name, &build.join(name), &prefix)
            .with_context(|| format!("building OpenWrt's {name}"))?;
    }
    // jshn's shell half, which OpenWrt's /lib/functions.sh sources.
    let share = prefix.join("share/libubox");
    std::fs::create_dir_all(&share)?;
    std::fs::copy(build.join("libubox/sh/jshn.sh"), share.join("jshn.sh"))
        .context("copying libubox's jshn.sh")?;
    // netifd's shell half: the protocol and wireless handler libraries its scripts source.
    let netifd_share = prefix.join("share/netifd");
    std::fs::create_dir_all(&netifd_share)?;
    for script in ["netifd-proto.sh", "netifd-wireless.sh", "utils.sh"] {
        std::fs::copy(
            build.join("netifd/scripts").join(script),
            netifd_share.join(script),
        )
        .with_context(|| format!("copying netifd's {script}"))?;
    }
    for (version, dir) in [("23.05", "firewall4-23.05"), ("main", "firewall4-main")] {
        let tmp = out.join(format!("{dir}.tmp"));
        std::fs::create_dir_all(&tmp)?;
        unpack(&tarball(&src, "firewall4", version)?, &tmp)?;
        std::fs::rename(tmp.join("firewall4"), out.join(dir))
            .with_context(|| format!("firewall4 {version}: no firewall4/ in its tarball"))?;
        std::fs::remove_dir_all(&tmp)?;
    }
    let files = std::fs::read_dir(&src)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("openwrt-23.05.4-files-") && n.ends_with(".tar.gz"))
        })
        .with_context(|| format!("no openwrt-23.05.4-files-*.tar.gz in {}", src.display()))?;
    unpack(&files, &out)?;
    if !out
        .join("openwrt-23.05.4/package/base-files/files/bin/config_generate")
        .exists()
    {
        bail!("{} has no base-files/bin/config_generate", files.display());
    }
    for tool in [
        "bin/uci",
        "bin/jshn",
        "bin/ucode",
        "sbin/ubusd",
        "sbin/netifd",
        "sbin/opkg",
    ] {
        let path = prefix.join(tool);
        if !path.exists() {
            bail!("the OpenWrt build made no {}", path.display());
        }
    }
    std::fs::remove_dir_all(&build)?;
    std::fs::write(&stamp, wanted)?;
    println!(
        "xtask setup: OpenWrt's tools built in {:.0} s, in {}",
        started.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(())
}

/// The recipe and the tarballs' names and sizes: what the build depends on.
fn stamp_text(src: &Path) -> Result<String> {
    let mut lines = vec![RECIPE.to_owned()];
    let mut entries: Vec<_> = std::fs::read_dir(src.join("src"))
        .with_context(|| format!("cannot read {}", src.join("src").display()))?
        .chain(std::fs::read_dir(src)?)
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tar.gz"))
        .map(|e| {
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            format!("{} {len}", e.file_name().to_string_lossy())
        })
        .collect();
    entries.sort();
    lines.extend(entries);
    Ok(lines.join("\n") + "\n")
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    crate::setup::require_root("installing Debian packages")?;
    println!("xtask setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// `src/NAME-VERSION-COMMIT.tar.gz`.
fn tarball(src: &Path, name: &str, version: &str) -> Result<PathBuf> {
    let prefix = format!("{name}-{version}-");
    std::fs::read_dir(src.join("src"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".tar.gz"))
        })
        .with_context(|| format!("no {prefix}*.tar.gz in {}", src.join("src").display()))
}

fn unpack(tarball: &Path, into: &Path) -> Result<()> {
    run(Command::new("tar")
        .arg("-xzf")
        .arg(tarball)
        .arg("-C")
        .arg(into))
}

fn build_one(name: &str, dir: &Path, prefix: &Path) -> Result<()> {
    let p = prefix.display();
    let include = format!("-I{p}/include -I{p}/include/libnl-tiny");
    // An rpath, so the tools run from the prefix without LD_LIBRARY_PATH.
    let link = format!("-L{p}/lib -Wl,-rpath,{p}/lib");
    let mut cmake = Command::new("cmake");
    cmake
        .arg(format!("-DCMAKE_INSTALL_PREFIX={p}"))
        .arg(format!("-DCMAKE_PREFIX_PATH={p}"))
        .arg(format!("-DCMAKE_INSTALL_RPATH={p}/lib"))
        .arg(format!("-DCMAKE_C_FLAGS={include}"))
        .arg(format!("-DCMAKE_EXE_LINKER_FLAGS={link}"))
        .arg(format!("-DCMAKE_SHARED_LINKER_FLAGS={link}"))
        .arg("-Wno-dev");
    match name {
        "libubox" | "uci" | "ubus" => {
            cmake.args(["-DBUILD_LUA=OFF", "-DBUILD_EXAMPLES=OFF"]);
        }
        "ucode" => {
            cmake.args([
                "-DUBUS_SUPPORT=ON",
                "-DUCI_SUPPORT=ON",
                "-DULOOP_SUPPORT=ON",
                "-DRTNL_SUPPORT=OFF",
                "-DNL80211_SUPPORT=OFF",
            ]);
        }
        "netifd" => {
            drop_werror(&dir.join("CMakeLists.txt"))?;
            replace_once(
                &dir.join("system-linux.c"),
                "\tnla_put_u8(msg, IFLA_BR_VLAN_FILTERING, !!cfg->vlan_filtering);",
                "\tif (cfg->vlan_filtering)\n\t\tnla_put_u8(msg, IFLA_BR_VLAN_FILTERING, 1);",
            )?;
            cmake.arg("-DLIBNL_LIBS=nl-tiny");
        }
        "procd" => {
            drop_werror(&dir.join("CMakeLists.txt"))?;
            cmake.args([
                "-DSECCOMP_SUPPORT=OFF",
                "-DJAIL_SUPPORT=OFF",
                "-DUTRACE_SUPPORT=OFF",
            ]);
        }
        _ => {}
    }
    // netifd's build runs a script of its own from the source directory, so it is built
    // in place (a separate build directory fails at make_ethtool_modes_h.sh).
    cmake.arg("-S").arg(dir).arg("-B").arg(dir);
    quiet(&mut cmake)?;
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut make = Command::new("make");
    make.arg("-C").arg(dir).arg(format!("-j{jobs}"));
    match name {
        // Its test program does not link here; opkg-cl is the `opkg` command.
        "opkg-lede" => {
            quiet(make.arg("opkg-cl"))?;
            install_bin(&dir.join("src/opkg-cl"), &prefix.join("sbin/opkg"))
        }
        "netifd" | "procd" | "odhcpd" => {
            quiet(&mut make)?;
            let bin = if name == "odhcpd" { "odhcpd" } else { name };
            install_bin(&dir.join(bin), &prefix.join("sbin").join(bin))?;
            if name == "procd" {
                install_bin(&dir.join("init"), &prefix.join("sbin/procd-init"))?;
                // What procd preloads into an instance whose output it logs
                // (`procd_set_param stdout 1`), so that it is line-buffered.
                install_bin(&dir.join("libsetlbf.so"), &prefix.join("lib/libsetlbf.so"))?;
            }
            Ok(())
        }
        _ => quiet(make.arg("install")),
    }
}

/// Replace the one occurrence of `from` in a source file of the unpacked copy; an error if
/// it is not there exactly once (a changed source must not build silently unpatched).
fn replace_once(file: &Path, from: &str, to: &str) -> Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    if text.matches(from).count() != 1 {
        bail!("{}: expected `{from}` exactly once", file.display());
    }
    std::fs::write(file, text.replacen(from, to, 1))
        .with_context(|| format!("cannot write {}", file.display()))
}

/// Remove `-Werror` from the unpacked copy's compiler flags (`-Werror=<warning>` stays).
fn drop_werror(cmakelists: &Path) -> Result<()> {
    let text = std::fs::read_to_string(cmakelists)
        .with_context(|| format!("cannot read {}", cmakelists.display()))?;
    let fixed = text
        .lines()
        .map(|l| {
            if l.to_ascii_uppercase()
                .trim_start()
                .starts_with("ADD_DEFINITIONS(")
            {
                l.split(' ')
                    .filter(|w| *w != "-Werror")
                    .collect::<Vec<_>>()
                    .join(" ")
                    .replace(" -Werror)", ")")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(cmakelists, fixed + "\n")?;
    Ok(())
}

fn install_bin(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to.parent().context("no parent")?)?;
    std::fs::copy(from, to)
        .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// Run a build step, showing its output only when it fails.
fn quiet(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {shown}"))?;
    if !out.status.success() {
        let tail = |b: &[u8]| {
            let s = String::from_utf8_lossy(b).into_owned();
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        bail!(
            "{shown} failed ({}):\n{}\n{}",
            out.status,
            tail(&out.stdout),
            tail(&out.stderr)
        );
    }
    Ok(())
}
