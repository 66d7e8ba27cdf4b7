//! `cargo xtask vm ARCH… [--full]`: Cage on the routers' kind of kernel and CPU. Boots
//! Debian 12's Linux 6.1 for x86_64, aarch64 (Cortex-A53) or mipsel (24KEc on a Malta
//! board) under qemu's TCG, with an initramfs holding the static router `cage` that
//! `cargo xtask dist` builds and `cage-tests`' `vmlab` built for the same target. `vmlab`
//! runs the lab of the host's tests inside the guest (network namespaces of the guest's
//! own), prints its results on the serial console, and the guest powers off; this side
//! prints them as a table per architecture and keeps them in `target/vm/<arch>/`.
//!
//! - `arch.rs`: the architectures (kernel package, qemu machine and CPU, console).
//! - `debian.rs`: the kernel and userspace packages, fetched once into a cache.
//! - `initramfs.rs`: the guest's root (programs with their libraries, modules, `/init`).
//! - `qemu.rs`: the boot, bounded in time, and the results read off the console.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};

pub mod arch;
mod debian;
mod initramfs;
mod qemu;

use arch::Arch;

/// What the guest runs: every check (`--full`) or the CI smoke run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Smoke,
    Full,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Smoke => "smoke",
            Mode::Full => "full",
        }
    }
}

pub const USAGE: &str = "cargo xtask vm ARCH... [--full] [--only SCENARIO,...] | cargo xtask vm ci
  ARCH: x86_64 aarch64 mipsel, or all; ci: x86_64 --full, then aarch64 and mipsel (CI's stage)";

/// `cargo xtask vm …`.
pub fn run_vm(args: &[&str]) -> Result<()> {
    let mut archs: Vec<&'static Arch> = Vec::new();
    let mut mode = Mode::Smoke;
    let mut only: Option<String> = None;
    let mut ci = false;
    let mut iter = args.iter();
    while let Some(&a) = iter.next() {
        match a {
            "--full" => mode = Mode::Full,
            "--smoke" => mode = Mode::Smoke,
            "--only" => only = Some(iter.next().context("--only needs a value")?.to_string()),
            "all" => archs.extend(arch::ARCHS.iter()),
            "ci" => ci = true,
            name => archs.push(
                arch::find(name)
                    .with_context(|| format!("unknown architecture {name}; {USAGE}"))?,
            ),
        }
    }
    let runs: Vec<(&'static Arch, Mode)> = if ci {
        // The full suite where the CPU is fastest to emulate and both builds are there
        // already (cargo xtask test packaged x86_64 and aarch64); the smoke run on the
        // routers' own CPUs (mipsel's cage is built here: about 4 minutes).
        ["x86_64", "aarch64", "mipsel"]
            .iter()
            .map(|n| {
                let a = arch::find(n).expect("a known architecture");
                (
                    a,
                    if a.name == "x86_64" {
                        Mode::Full
                    } else {
                        Mode::Smoke
                    },
                )
            })
            .collect()
    } else {
        archs.into_iter().map(|a| (a, mode)).collect()
    };
    if runs.is_empty() {
        bail!("which architecture? {USAGE}");
    }
    crate::setup::require_root("the guest's packages are fetched with apt")?;
    let started = Instant::now();
    let mut failed = Vec::new();
    let mut summaries = Vec::new();
    let mut times = Vec::new();
    for (a, mode) in runs {
        let t = Instant::now();
        match run_arch(a, mode, only.as_deref()) {
            Ok(outcome) => {
                if !outcome.passed {
                    failed.push(a.name);
                }
                summaries.push(outcome.table);
            }
            Err(e) => {
                eprintln!("xtask vm: {}: {e:#}", a.name);
                failed.push(a.name);
            }
        }
        times.push(format!(
            "{} {} {:.0} s",
            a.name,
            mode.as_str(),
            t.elapsed().as_secs_f64()
        ));
    }
    for s in &summaries {
        println!("\n{s}");
    }
    println!(
        "xtask vm: {} in {:.1} min (with fetching and building)",
        times.join(", "),
        started.elapsed().as_secs_f64() / 60.0
    );
    if !failed.is_empty() {
        bail!("the VM stage failed on {}", failed.join(", "));
    }
    Ok(())
}

/// What one guest's run came to.
pub struct Outcome {
    pub passed: bool,
    /// The results table, as printed and as written to `target/vm/<arch>/results.txt`.
    pub table: String,
}

/// Where one architecture's initramfs, console log and results go.
pub fn out_dir(arch: &Arch) -> PathBuf {
    crate::dist::target_dir().join("vm").join(arch.name)
}

fn run_arch(arch: &'static Arch, mode: Mode, only: Option<&str>) -> Result<Outcome> {
    let started = Instant::now();
    let packages = debian::fetch(arch)?;
    let fetched = started.elapsed();

    let target = crate::dist::select(&[arch.dist])?[0];
    let built = Instant::now();
    let cage = crate::dist::build(target)?.binary;
    let vmlab = build_vmlab(target)?;
    let build_time = built.elapsed();

    let mut tree = initramfs::Tree::default();
    initramfs::add_programs(&mut tree, arch, &packages)?;
    let modules = initramfs::add_modules(&mut tree, &packages)?;
    tree.copy("usr/bin/cage", 0o755, &cage)?;
    tree.copy("usr/bin/vmlab", 0o755, &vmlab)?;
    tree.file("init", 0o755, init_script(arch).into_bytes());
    tree.char_dev("dev/console", 5, 1);
    tree.char_dev("dev/null", 1, 3);
    for d in ["proc", "sys", "dev", "run", "tmp", "root", "bb"] {
        tree.dir(d);
    }
    let dir = out_dir(arch);
    std::fs::create_dir_all(&dir)?;
    let initrd = dir.join("initramfs.cpio");
    std::fs::write(&initrd, tree.cpio())
        .with_context(|| format!("writing {}", initrd.display()))?;
    let kernel = initramfs::kernel_image(arch, &packages)?;
    println!(
        "xtask vm: {}: {} with {modules} modules, {:.1} MiB of files; packages ready in {:.0} s, binaries in {:.0} s",
        arch.name,
        packages.kernel_package,
        tree.size() as f64 / (1024.0 * 1024.0),
        fetched.as_secs_f64(),
        build_time.as_secs_f64(),
    );

    let mut cmdline = format!(
        "console={} panic=-1 quiet vmlab.mode={}",
        arch.console,
        mode.as_str()
    );
    if let Some(only) = only {
        cmdline.push_str(&format!(" vmlab.only={only}"));
    }
    let timeout = match (mode, arch.name) {
        (Mode::Full, "mipsel") => 1800,
        (Mode::Full, _) => 1200,
        (Mode::Smoke, _) => 600,
    };
    let run = qemu::boot(
        arch,
        &kernel,
        &initrd,
        &cmdline,
        std::time::Duration::from_secs(timeout),
        &dir.join("console.log"),
    )?;
    let table = qemu::table(arch, &packages, mode, &run, started.elapsed());
    std::fs::write(dir.join(format!("results-{}.txt", mode.as_str())), &table)?;
    Ok(Outcome {
        passed: run.passed(),
        table,
    })
}

/// `cage-tests`' `vmlab`, static for `t`, with the release profile and toolchain that
/// `dist` builds `cage` with, and without the `web` feature: its dependencies then
/// resolve with the same features as `cage`'s, so every crate but `cage-tests` comes
/// from `cage`'s build (about 30 s after `cage`, where a profile of its own took minutes
/// per target). Its path.
fn build_vmlab(t: &'static crate::dist::Target) -> Result<PathBuf> {
    let mut cmd = crate::dist::cargo_for(t)?;
    cmd.args([
        "--release",
        "--locked",
        "--package",
        "cage-tests",
        "--no-default-features",
        "--bin",
        "vmlab",
    ])
    .args(["--target", t.triple])
    .current_dir(crate::dist::workspace_root());
    crate::run(&mut cmd).context("vmlab did not build")?;
    let path = crate::dist::target_dir()
        .join(t.triple)
        .join("release")
        .join("vmlab");
    if !path.is_file() {
        bail!("no {} after the build", path.display());
    }
    Ok(path)
}

/// The guest's `/init`: the file systems (and the /dev/stdin that udev would make: nft
/// reads `-f -` from it), busybox's applets behind the real tools on PATH, then `vmlab`,
/// then power off (qemu runs with `-no-reboot`, so the VM ends).
fn init_script(arch: &Arch) -> String {
    format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t proc proc /proc\n\
         /bin/busybox mount -t sysfs sys /sys\n\
         /bin/busybox mount -t devtmpfs dev /dev 2>/dev/null\n\
         /bin/busybox ln -sf /proc/self/fd /dev/fd\n\
         /bin/busybox ln -sf /proc/self/fd/0 /dev/stdin\n\
         /bin/busybox ln -sf /proc/self/fd/1 /dev/stdout\n\
         /bin/busybox ln -sf /proc/self/fd/2 /dev/stderr\n\
         /bin/busybox mount -t tmpfs run /run\n\
         /bin/busybox mount -t tmpfs tmp /tmp\n\
         /bin/busybox mount -t bpf bpf /sys/fs/bpf\n\
         /bin/busybox --install -s /bb\n\
         export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/bb\n\
         export LD_LIBRARY_PATH=/lib/{t}:/usr/lib/{t}\n\
         export HOME=/root TMPDIR=/tmp CAGE_BIN=/usr/bin/cage\n\
         hostname vmlab-{name}\n\
         ip link set lo up\n\
         /usr/bin/vmlab\n\
         echo \"VMLAB\tEXIT\t$?\"\n\
         poweroff -f\n",
        t = arch.triplet,
        name = arch.name,
    )
}

/// The Debian packages with the qemu of every architecture (for `cargo xtask setup`).
pub fn qemu_packages() -> Vec<(&'static str, &'static str)> {
    arch::ARCHS
        .iter()
        .map(|a| (a.qemu_package, a.qemu))
        .collect()
}
