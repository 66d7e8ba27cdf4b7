//! Builds the eBPF program (`cage-ebpf`) and leaves it in `OUT_DIR/cage-ebpf.o`, where
//! `src/ebpf.rs` embeds it: the `cage` binary stays one file.
//!
//! The program is built for `bpfel-unknown-none` (or `bpfeb` when the binary is for a
//! big-endian router) with the nightly toolchain, `-Z build-std=core` and bpf-linker,
//! which `cargo xtask setup` installs. `cage-ebpf` is a workspace of its own, so host
//! builds never compile it; its build goes to `target/[<triple>/]ebpf`, shared by every
//! profile and by clippy, so it is built once and then only when its sources change.
//!
//! When the toolchain is missing the build fails and says what is missing: a `cage`
//! without its eBPF program would have no flow log and no kill-switch fast path, and must
//! never ship quietly. `cargo xtask setup` installs the toolchain (xtask links none of
//! Cage, so it runs before anything here is built). Set `CAGE_EBPF_OBJECT=path` to embed
//! an object built elsewhere.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    link_without_unwind_tables();
    println!("cargo:rerun-if-env-changed=CAGE_EBPF_OBJECT");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out_dir.join("cage-ebpf.o");

    if let Some(prebuilt) = env::var_os("CAGE_EBPF_OBJECT") {
        let prebuilt = PathBuf::from(prebuilt);
        println!("cargo:rerun-if-changed={}", prebuilt.display());
        std::fs::copy(&prebuilt, &object).unwrap_or_else(|e| {
            panic!("CAGE_EBPF_OBJECT={}: {e}", prebuilt.display());
        });
        return;
    }

    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let repo = manifest_dir
        .parent()
        .expect("cage-agent lives in the repository");
    let ebpf_crate = repo.join("cage-ebpf");
    for path in [
        "cage-ebpf/src",
        "cage-ebpf/Cargo.toml",
        "cage-ebpf/Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", repo.join(path).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        repo.join("cage-common/src").display()
    );

    if let Err(missing) = toolchain() {
        // Cargo shows a failed build script's stderr in full.
        eprintln!(
            "error: cannot build cage's eBPF program (the flow log and the kill switch's \
             fast path): {missing}.\n\
             Run `cargo xtask setup` (it installs nightly's rust-src and a bpf-linker built \
             against nightly's LLVM), then build again; or set CAGE_EBPF_OBJECT to an \
             object built elsewhere."
        );
        std::process::exit(1);
    }

    let big_endian = env::var("CARGO_CFG_TARGET_ENDIAN").is_ok_and(|e| e == "big");
    let target = if big_endian {
        "bpfeb-unknown-none"
    } else {
        "bpfel-unknown-none"
    };
    // aya-ebpf reads this cfg for architecture-specific code (kprobe registers); the
    // router's architecture, not the build machine's. MIPS is "mips" either way.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets CARGO_CFG_TARGET_ARCH");
    let target_dir = ebpf_target_dir(&out_dir);

    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--release", "--locked"])
        .args(["--target", target, "-Z", "build-std=core"])
        .arg("--manifest-path")
        .arg(ebpf_crate.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&ebpf_crate)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                format!("--cfg=bpf_target_arch=\"{arch}\""),
                // No BPF-to-BPF calls: bpf-linker's default `--bpf-expand-memcpy-in-order`
                // leaves LLVM no way to inline a memset, which then becomes a call into a
                // `memset` subprogram, and the MIPS32 eBPF JIT takes no subprograms (6.1's
                // `emit_call` refuses a call whose address is not fixed in the first pass)
                // and falls back to the interpreter: on the Mango (MT7628) Cage's program
                // ran interpreted with `bpf_jit_enable=1` (the VM stage, `cargo xtask vm
                // mipsel --full`). Without that option memsets are inlined; with
                // `--disable-memory-builtins` a call to one that is not fails the build.
                "-Clink-arg=--disable-expand-memcpy-in-order".into(),
                "-Clink-arg=--disable-memory-builtins".into(),
            ]
            .join("\x1f"),
        );
    // What the outer cargo (or clippy) set for the host build must not leak into the
    // nested one: its compiler, wrappers, flags and toolchain choice.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "CARGO_UNSTABLE_BUILD_STD",
        "CARGO_UNSTABLE_BUILD_STD_FEATURES",
    ] {
        cmd.env_remove(var);
    }
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !output.status.success() {
        panic!(
            "building the eBPF program failed ({}):\n{cmd:?}\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let built = target_dir.join(target).join("release").join("cage-ebpf");
    std::fs::copy(&built, &object)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", built.display(), object.display()));
}

/// The router binaries that rust-lld links (`cargo xtask dist`'s x86_64,
/// `.cargo/config.toml`) leave out `.eh_frame` and `.eh_frame_hdr`. The release profile
/// aborts on panic, so nothing unwinds; the tables are there only because the standard
/// library's bitcode carries debug info, which makes LLVM describe every frame of the LTO
/// module. A panic still prints its message and aborts; only the backtrace that
/// `RUST_BACKTRACE` asks for (addresses without names, the binary being stripped) ends at
/// the first frame. Host builds, linked by `cc`, keep their tables. The zig-linked
/// build-std targets (aarch64, armv7, mipsel) get there another way: their standard
/// library and Cage are compiled with `-C force-unwind-tables=no` (xtask's `dist`), which
/// leaves about 15 KB of tables, musl's and compiler-rt's.
fn link_without_unwind_tables() {
    let linker = env::var_os("RUSTC_LINKER").map(PathBuf::from);
    let lld = linker
        .as_deref()
        .and_then(Path::file_name)
        .is_some_and(|name| name == "rust-lld");
    if !lld || env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let script = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"))
        .join("no-eh-frame.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rustc-link-arg-bins=--no-eh-frame-hdr");
    println!("cargo:rustc-link-arg-bins=-T{}", script.display());
}

/// Nightly with rust-src, and bpf-linker on PATH; or what is missing. Paths that would
/// appear when the toolchain is installed are watched, so the next build after
/// `cargo xtask setup` builds the program.
fn toolchain() -> Result<(), String> {
    let linker = find_on_path("bpf-linker");
    match &linker {
        Some(path) => println!("cargo:rerun-if-changed={}", path.display()),
        None => {
            // A path that does not exist makes cargo run this script on every build,
            // until bpf-linker is installed there (where `cargo install` puts it).
            if let Some(home) = cargo_home() {
                println!(
                    "cargo:rerun-if-changed={}",
                    home.join("bin/bpf-linker").display()
                );
            }
        }
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let Some(sysroot) = sysroot else {
        println!("cargo:rerun-if-changed={}", rustup_home_guess().display());
        return Err("no nightly toolchain (rustup run nightly rustc fails)".into());
    };
    let core_src = sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml");
    println!("cargo:rerun-if-changed={}", core_src.display());
    if !core_src.exists() {
        return Err("nightly has no rust-src component".into());
    }
    if linker.is_none() {
        return Err("bpf-linker is not on PATH".into());
    }
    Ok(())
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

fn cargo_home() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
}

fn rustup_home_guess() -> PathBuf {
    env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".rustup")))
        .unwrap_or_default()
        .join("toolchains")
}

/// `target/[<triple>/]ebpf`, found from `OUT_DIR`
/// (`target/[<triple>/]<profile>/build/cage-agent-<hash>/out`), so that debug, release,
/// test and clippy builds share one eBPF build; `OUT_DIR` itself if the layout differs.
fn ebpf_target_dir(out_dir: &Path) -> PathBuf {
    let mut up = out_dir.ancestors();
    let build = up.nth(2);
    match (build, up.nth(1)) {
        (Some(build), Some(target)) if build.file_name().is_some_and(|n| n == "build") => {
            target.join("ebpf")
        }
        _ => out_dir.join("ebpf-target"),
    }
}
