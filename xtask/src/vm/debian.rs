//! Debian 12's packages for a guest: its 6.1 kernel with modules, busybox, nft and
//! iproute2 with their shared libraries, fetched with `apt-get download` from the
//! machine's own mirror and kept in `target/vm/cache/<arch>/` (a second run fetches
//! nothing; with no mirror at all, what the cache holds is used).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::arch::Arch;
use crate::run;

/// Userspace for the guest: busybox (the shell, mount, nsenter…), nft (which `cage`
/// runs), iproute2 (`ip` and `bridge`, which the lab runs; `tc` for the attach check),
/// and every shared library they need, by package. A library missing here is reported
/// by name when the root is assembled.
pub const USERSPACE: &[&str] = &[
    "busybox-static",
    "nftables",
    "libnftables1",
    "libedit2",
    "libgmp10",
    "libjansson4",
    "libmnl0",
    "libnftnl11",
    "libxtables12",
    "iproute2",
    "libbpf1",
    "libelf1",
    "libbsd0",
    "libmd0",
    "libcap2",
    "libc6",
    "libtinfo6",
    "zlib1g",
];

/// The packages, unpacked, of one architecture.
pub struct Unpacked {
    /// The kernel package's root (`boot/`, `lib/modules/<release>/`).
    pub kernel: PathBuf,
    /// The kernel's release (`6.1.0-57-amd64`).
    pub release: String,
    /// The kernel package's name and version, for the results.
    pub kernel_package: String,
    /// Every userspace package's root, in [`USERSPACE`] order.
    pub roots: Vec<PathBuf>,
}

pub fn cache_dir(arch: &Arch) -> PathBuf {
    crate::dist::target_dir()
        .join("vm")
        .join("cache")
        .join(arch.deb)
}

/// Fetch (when not cached) and unpack everything `arch`'s guest needs.
pub fn fetch(arch: &Arch) -> Result<Unpacked> {
    let dir = cache_dir(arch);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let kernel_name = kernel_package(arch, &dir)?;
    let mut names = vec![kernel_name.clone()];
    names.extend(USERSPACE.iter().map(|s| s.to_string()));

    let wanted = wanted_files(arch, &names);
    let mut debs = Vec::new();
    let mut missing = Vec::new();
    for name in &names {
        match wanted.get(name) {
            Some(file) if dir.join(file).is_file() => debs.push(dir.join(file)),
            Some(file) => {
                missing.push(format!("{name}:{}", arch.deb));
                debs.push(dir.join(file));
            }
            // No mirror metadata: whatever version the cache has.
            None => debs.push(cached_any(&dir, name, arch).with_context(|| {
                format!(
                    "{name}:{} is neither known to apt nor cached in {} (run `apt-get update`?)",
                    arch.deb,
                    dir.display()
                )
            })?),
        }
    }
    if !missing.is_empty() {
        println!(
            "xtask vm: downloading {} package(s) for {}",
            missing.len(),
            arch.deb
        );
        crate::setup::require_root("apt-get download")?;
        run(Command::new("apt-get")
            .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
            .args(&missing)
            .current_dir(&dir))?;
    }
    let mut roots = Vec::new();
    for deb in &debs {
        if !deb.is_file() {
            bail!("apt-get download did not leave {}", deb.display());
        }
        roots.push(unpack(deb)?);
    }
    let kernel = roots.remove(0);
    let release = kernel_release(&kernel)?;
    let kernel_package = debs[0]
        .file_stem()
        .map(|s| s.to_string_lossy().replace("%3a", ":"))
        .unwrap_or_default();
    Ok(Unpacked {
        kernel,
        release,
        kernel_package,
        roots,
    })
}

/// Make apt know `arch`'s packages: `dpkg --add-architecture` and `apt-get update` when
/// the architecture is foreign and not added yet.
fn ensure_architecture(arch: &Arch) -> Result<()> {
    let native = output(Command::new("dpkg").arg("--print-architecture"))?;
    if native.trim() == arch.deb {
        return Ok(());
    }
    let foreign = output(Command::new("dpkg").arg("--print-foreign-architectures"))?;
    if foreign.lines().any(|l| l.trim() == arch.deb) {
        return Ok(());
    }
    crate::setup::require_root("adding a dpkg architecture")?;
    println!(
        "xtask vm: dpkg --add-architecture {} and apt-get update",
        arch.deb
    );
    run(Command::new("dpkg").args(["--add-architecture", arch.deb]))?;
    run(Command::new("apt-get").args(["update", "-qq"]))
}

/// The kernel package the metapackage points at now (`linux-image-6.1.0-57-amd64`);
/// remembered in the cache, for runs without a mirror.
fn kernel_package(arch: &Arch, dir: &Path) -> Result<String> {
    let remembered = dir.join("kernel-package");
    // Without a mirror this fails; the cache may still hold everything.
    if let Err(e) = ensure_architecture(arch) {
        println!("xtask vm: {e:#}");
    }
    let asked = output(Command::new("apt-cache").args([
        "depends",
        "--no-recommends",
        "--no-suggests",
        &format!("{}:{}", arch.kernel_meta, arch.deb),
    ]))
    .ok()
    .and_then(|out| {
        out.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .map(|d| d.split(':').next().unwrap_or(d).to_owned())
            .find(|d| d.starts_with("linux-image-6."))
    });
    match asked {
        Some(name) => {
            let _ = std::fs::write(&remembered, &name);
            Ok(name)
        }
        None => std::fs::read_to_string(&remembered)
            .map(|s| s.trim().to_owned())
            .with_context(|| {
                format!(
                    "apt does not know {}:{} (and nothing is cached)",
                    arch.kernel_meta, arch.deb
                )
            }),
    }
}

/// The file names `apt-get download` gives the candidate versions of `names`, by
/// package, from one `apt-cache show` (each run of apt-cache reads the whole cache, a
/// second or two); a package apt has no record of is missing from the map.
fn wanted_files(arch: &Arch, names: &[String]) -> std::collections::BTreeMap<String, String> {
    let mut found = std::collections::BTreeMap::new();
    let args: Vec<String> = names.iter().map(|n| format!("{n}:{}", arch.deb)).collect();
    // apt-cache fails as a whole when one name is unknown; what it printed still counts.
    let Ok(out) = Command::new("apt-cache")
        .args(["show", "--no-all-versions"])
        .args(&args)
        .output()
    else {
        return found;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    for record in text.split("\n\n") {
        let field = |key: &str| {
            record
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_owned())
        };
        let (Some(name), Some(version)) = (field("Package:"), field("Version:")) else {
            continue;
        };
        let package_arch = field("Architecture:").unwrap_or_else(|| arch.deb.to_owned());
        found.entry(name.clone()).or_insert(format!(
            "{name}_{}_{package_arch}.deb",
            version.replace(':', "%3a")
        ));
    }
    found
}

/// Any cached `.deb` of `name` (the newest by name).
fn cached_any(dir: &Path, name: &str, arch: &Arch) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let f = p.file_name().unwrap_or_default().to_string_lossy();
            f.starts_with(&format!("{name}_"))
                && (f.ends_with(&format!("_{}.deb", arch.deb)) || f.ends_with("_all.deb"))
        })
        .collect();
    found.sort();
    found.pop()
}

/// `dpkg-deb -x` into a directory next to the `.deb`, once.
fn unpack(deb: &Path) -> Result<PathBuf> {
    let root = deb.with_extension("");
    let done = root.join(".unpacked");
    if done.exists() {
        return Ok(root);
    }
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root))?;
    std::fs::write(&done, "")?;
    Ok(root)
}

/// The one directory under `lib/modules/` of the kernel package.
fn kernel_release(kernel: &Path) -> Result<String> {
    let dir = kernel.join("lib/modules");
    let mut releases: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if releases.len() != 1 {
        bail!(
            "expected one kernel release in {}: {releases:?}",
            dir.display()
        );
    }
    Ok(releases.remove(0))
}

fn output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
