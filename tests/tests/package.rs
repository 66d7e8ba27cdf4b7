//! The router binaries and the OpenWrt package, checked from the outside:
//! - the aarch64 and armv7 binaries that `cargo xtask dist` built are static, run under
//!   qemu-user (`cage --version`) and pass `cage check` on the shipped configuration
//!   inside a throwaway network namespace (qemu runs the router's binary, which runs the
//!   build machine's `nft`);
//! - the `.ipk` files that `cargo xtask package` made are read here, archive by archive,
//!   rather than trusted: members, control fields, conffiles, modes and owners;
//! - the shell scripts parse (`sh -n`), and the button hook passes its event to a
//!   stand-in for `cage`. The init script, the uci-defaults script, `cage-port` and the
//!   maintainer scripts run with OpenWrt's own opkg, uci and procd in tests/tests/install.rs.
//!
//! `cargo xtask test` runs `cargo xtask package --target aarch64 --target armv7` first; a
//! missing binary or package fails these tests with the command that makes it.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use cage_agent::probe::NetNsGuard;

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The targets CI builds and checks: (triple, qemu-user program and the CPU it emulates
/// (the routers' core), ELF e_machine, ELF class (1: 32-bit, 2: 64-bit), the package
/// architecture of the devices Cage targets).
const CHECKED: &[(&str, [&str; 3], u16, u8, &str)] = &[
    (
        "aarch64-unknown-linux-musl",
        ["qemu-aarch64-static", "-cpu", "cortex-a53"],
        183,
        2,
        "aarch64_cortex-a53",
    ),
    (
        "armv7-unknown-linux-musleabihf",
        ["qemu-arm-static", "-cpu", "cortex-a7"],
        40,
        1,
        "arm_cortex-a7_neon-vfpv4",
    ),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

fn dist_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
        .join("dist")
}

fn binary(triple: &str) -> PathBuf {
    let path = dist_dir().join(triple).join("cage");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask dist --target {triple}` (cargo xtask test does)",
        path.display()
    );
    path
}

fn ipk(arch: &str) -> PathBuf {
    let path = dist_dir().join(format!("cage_{VERSION}-r1_{arch}.ipk"));
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask package` (cargo xtask test does)",
        path.display()
    );
    path
}

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

// ---- the binaries ---------------------------------------------------------------------

#[test]
#[ignore = "needs the router builds: cargo xtask test"]
fn binaries_are_static_for_the_right_machine() {
    for &(triple, _, machine, class, _) in CHECKED {
        let elf = std::fs::read(binary(triple)).unwrap();
        assert_eq!(&elf[..4], b"\x7fELF", "{triple}: not an ELF file");
        assert_eq!(elf[4], class, "{triple}: ELF class");
        assert_eq!(elf[5], 1, "{triple}: not little-endian");
        let e_machine = u16::from_le_bytes([elf[18], elf[19]]);
        assert_eq!(e_machine, machine, "{triple}: e_machine");
        // No program interpreter: nothing on the router has to provide a libc.
        let types = program_header_types(&elf);
        assert!(!types.is_empty(), "{triple}: no program headers");
        assert!(
            !types.contains(&3),
            "{triple}: has PT_INTERP, so it is not static"
        );
        // The eBPF program: an ELF object for EM_BPF (247) inside the binary. The linker
        // (LTO) keeps it only once something in `cage` loads it, so it is required as
        // soon as a module other than `ebpf` calls into `ebpf::`.
        let embedded = elf
            .windows(20)
            .skip(1)
            .any(|w| w.starts_with(b"\x7fELF") && u16::from_le_bytes([w[18], w[19]]) == 247);
        if uses_ebpf() {
            assert!(embedded, "{triple}: no eBPF object embedded");
        } else if !embedded {
            cage_tests::warn(&format!(
                "{triple}: the eBPF program is not in the binary: nothing in cage calls cage_agent::ebpf yet"
            ));
        }
        let size = elf.len();
        println!("{triple}: {size} bytes, static, eBPF program embedded: {embedded}");
        assert!(
            size < 4 * 1024 * 1024,
            "{triple}: {size} bytes, over the 4 MiB goal"
        );
    }
}

/// Whether any module of cage-agent but `ebpf` itself calls into `ebpf::`.
fn uses_ebpf() -> bool {
    let src = root().join("cage-agent/src");
    let mut stack = vec![src];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n != "ebpf.rs")
                && std::fs::read_to_string(&path).is_ok_and(|t| t.contains("ebpf::"))
            {
                return true;
            }
        }
    }
    false
}

fn program_header_types(elf: &[u8]) -> Vec<u32> {
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = if elf[4] == 2 {
        (u64_at(32), u16_at(54), u16_at(56))
    } else {
        (u32_at(28) as usize, u16_at(42), u16_at(44))
    };
    (0..phnum).map(|i| u32_at(phoff + i * phentsize)).collect()
}

#[test]
#[ignore = "needs the router builds: cargo xtask test"]
fn binaries_run_under_qemu() {
    for &(triple, qemu, ..) in CHECKED {
        let out = output(
            Command::new(qemu[0])
                .args(&qemu[1..])
                .arg(binary(triple))
                .arg("--version"),
        );
        let qemu = qemu.join(" ");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{triple} under {qemu}: {}\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout.trim(), format!("cage {VERSION}"), "{triple}");
        println!("{triple} under {qemu}: {}", stdout.trim());
    }
}

/// A network namespace of this test's own, removed when dropped.
fn netns(tag: &str) -> NetNsGuard {
    let name = format!("cgt-{}-{tag}", std::process::id());
    NetNsGuard::named(name).unwrap_or_else(|e| panic!("{e} (this test needs root)"))
}

#[test]
#[ignore = "needs root: cargo xtask test"]
fn cage_check_passes_under_qemu() {
    let config = root().join("openwrt/files/etc/config/cage");
    for &(triple, qemu, ..) in CHECKED {
        let ns = netns(&format!("qemu-{}", &triple[..5]));
        let out = output(
            Command::new("ip")
                .args(["netns", "exec", ns.name()])
                .args(qemu)
                .arg(binary(triple))
                .arg("--config")
                .arg(&config)
                .arg("check"),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let qemu = qemu.join(" ");
        assert!(
            out.status.success(),
            "{triple}: cage check under {qemu}: {}\n{stdout}{stderr}",
            out.status
        );
        assert!(
            stdout.contains("table inet cage") && stderr.contains("nft accepts the ruleset"),
            "{triple}: cage check did not render and dry-run the policy:\n{stdout}{stderr}"
        );
        println!("{triple} under {qemu}: {}", stderr.trim());
    }
}

// ---- the packages ---------------------------------------------------------------------

/// One member of a tar archive.
#[derive(Debug)]
struct Entry {
    name: String,
    mode: u32,
    uid: u64,
    gid: u64,
    kind: u8,
    data: Vec<u8>,
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut child = Command::new("gzip")
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("gzip");
    let mut stdin = child.stdin.take().unwrap();
    let input = bytes.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "not gzip data");
    out.stdout
}

fn octal(field: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(field);
    let text = text.trim_matches(|c: char| c == '\0' || c == ' ');
    u64::from_str_radix(text, 8).unwrap_or_else(|_| panic!("bad octal field {text:?}"))
}

/// Read a tar archive (ustar/GNU, with GNU long names).
fn untar(bytes: &[u8]) -> Vec<Entry> {
    let mut entries = Vec::new();
    let mut at = 0;
    let mut long_name = None;
    while at + 512 <= bytes.len() {
        let h = &bytes[at..at + 512];
        if h.iter().all(|&b| b == 0) {
            break;
        }
        let size = octal(&h[124..136]) as usize;
        let data = bytes[at + 512..at + 512 + size].to_vec();
        at += 512 + size.div_ceil(512) * 512;
        let kind = h[156];
        if kind == b'L' {
            long_name = Some(
                String::from_utf8_lossy(&data)
                    .trim_end_matches('\0')
                    .to_owned(),
            );
            continue;
        }
        let name = long_name.take().unwrap_or_else(|| {
            let end = h[..100].iter().position(|&b| b == 0).unwrap_or(100);
            String::from_utf8_lossy(&h[..end]).into_owned()
        });
        entries.push(Entry {
            name,
            mode: octal(&h[100..108]) as u32,
            uid: octal(&h[108..116]),
            gid: octal(&h[116..124]),
            kind,
            data,
        });
    }
    entries
}

fn member<'a>(entries: &'a [Entry], name: &str) -> &'a Entry {
    entries.iter().find(|e| e.name == name).unwrap_or_else(|| {
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        panic!("no {name} in the archive; it has {names:?}")
    })
}

fn control_fields(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[test]
#[ignore = "needs the router builds: cargo xtask test"]
fn ipk_has_the_opkg_layout_fields_and_permissions() {
    for &(triple, _, _, _, arch) in CHECKED {
        let path = ipk(arch);
        let outer = untar(&gunzip(&std::fs::read(&path).unwrap()));
        let names: Vec<_> = outer.iter().map(|e| e.name.as_str()).collect();
        // OpenWrt's ipkg-build: a gzip'd tar of exactly these, in this order.
        assert_eq!(
            names,
            ["./debian-binary", "./data.tar.gz", "./control.tar.gz"],
            "{arch}: outer members"
        );
        assert_eq!(member(&outer, "./debian-binary").data, b"2.0\n");

        let data_tar = gunzip(&member(&outer, "./data.tar.gz").data);
        let data = untar(&data_tar);
        let expected: &[(&str, u32)] = &[
            ("./usr/bin/cage", 0o755),
            ("./etc/init.d/cage", 0o755),
            ("./etc/config/cage", 0o600),
            ("./etc/uci-defaults/90-cage", 0o755),
            ("./etc/hotplug.d/button/50-cage", 0o755),
            ("./usr/libexec/cage-port", 0o755),
            ("./usr/libexec/cage-remove", 0o755),
        ];
        for &(name, mode) in expected {
            let e = member(&data, name);
            assert_eq!(e.kind, b'0', "{arch}: {name} is not a regular file");
            assert_eq!(e.mode & 0o7777, mode, "{arch}: mode of {name}");
        }
        let files: Vec<_> = data
            .iter()
            .filter(|e| e.kind != b'5')
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(
            files.len(),
            expected.len(),
            "{arch}: unexpected files {files:?}"
        );
        for e in &data {
            assert_eq!((e.uid, e.gid), (0, 0), "{arch}: owner of {}", e.name);
            if e.kind == b'5' {
                assert_eq!(e.mode & 0o7777, 0o755, "{arch}: mode of {}", e.name);
            }
        }
        // The packaged binary is the one dist built and checked, the files the repo's.
        assert_eq!(
            member(&data, "./usr/bin/cage").data,
            std::fs::read(binary(triple)).unwrap(),
            "{arch}: packaged binary"
        );
        for (name, source) in [
            ("./etc/init.d/cage", "openwrt/files/etc/init.d/cage"),
            ("./etc/config/cage", "openwrt/files/etc/config/cage"),
            (
                "./etc/uci-defaults/90-cage",
                "openwrt/files/etc/uci-defaults/90-cage",
            ),
            (
                "./usr/libexec/cage-port",
                "openwrt/files/usr/libexec/cage-port",
            ),
        ] {
            assert_eq!(
                member(&data, name).data,
                std::fs::read(root().join(source)).unwrap(),
                "{arch}: {name}"
            );
        }

        let control = untar(&gunzip(&member(&outer, "./control.tar.gz").data));
        let fields = control_fields(&String::from_utf8_lossy(
            &member(&control, "./control").data,
        ));
        assert_eq!(fields["Package"], "cage");
        assert_eq!(fields["Version"], format!("{VERSION}-r1"));
        assert_eq!(fields["Architecture"], arch);
        assert!(fields["Maintainer"].contains('@'), "{arch}: Maintainer");
        assert!(!fields["Description"].is_empty(), "{arch}: Description");
        let depends: Vec<_> = fields["Depends"].split(", ").collect();
        for dep in ["nftables-json", "kmod-nft-bridge", "kmod-sched-bpf"] {
            assert!(depends.contains(&dep), "{arch}: Depends lacks {dep}");
        }
        // ipkg-build's Installed-Size: the uncompressed data tar.
        assert_eq!(
            fields["Installed-Size"],
            data_tar.len().to_string(),
            "{arch}: Installed-Size"
        );
        assert_eq!(
            member(&control, "./conffiles").data,
            b"/etc/config/cage\n",
            "{arch}: conffiles"
        );
        for script in ["./postinst", "./prerm"] {
            let e = member(&control, script);
            assert_eq!(e.mode & 0o7777, 0o755, "{arch}: mode of {script}");
            assert!(e.data.starts_with(b"#!/bin/sh\n"), "{arch}: {script}");
        }
        let postinst = String::from_utf8_lossy(&member(&control, "./postinst").data).into_owned();
        assert!(
            postinst.contains("default_postinst"),
            "{arch}: postinst does not enable the service (default_postinst)"
        );
        println!(
            "{}: {} bytes; {}",
            path.display(),
            std::fs::metadata(&path).unwrap().len(),
            fields
                .iter()
                .filter(|(k, _)| *k != "Description")
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
}

// ---- the shell scripts ----------------------------------------------------------------

const SCRIPTS: &[&str] = &[
    "openwrt/files/etc/init.d/cage",
    "openwrt/files/etc/uci-defaults/90-cage",
    "openwrt/files/etc/hotplug.d/button/50-cage",
    "openwrt/files/usr/libexec/cage-port",
    "openwrt/files/usr/libexec/cage-remove",
    "openwrt/control/postinst",
    "openwrt/control/prerm",
];

#[test]
fn scripts_parse() {
    for script in SCRIPTS {
        let out = output(Command::new("sh").arg("-n").arg(root().join(script)));
        assert!(
            out.status.success(),
            "sh -n {script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mode = std::fs::metadata(root().join(script))
            .unwrap()
            .permissions()
            .mode();
        assert!(mode & 0o111 != 0, "{script} is not executable in the repo");
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cage-pkg-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A stand-in program that records its arguments, one call a line, and exits with `rc`.
fn recorder(path: &Path, log: &Path, rc: i32) {
    std::fs::write(
        path,
        format!(
            "#!/bin/sh\necho \"$0 $*\" >>'{}'\nexit {rc}\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn button_hook_passes_the_event_to_cage() {
    let dir = temp_dir("button");
    let log = dir.join("cage.log");
    recorder(&dir.join("cage"), &log, 0);
    let hook = root().join("openwrt/files/etc/hotplug.d/button/50-cage");
    let run = |env: &[(&str, &str)]| {
        let mut cmd = Command::new("sh");
        cmd.arg(&hook)
            .env("CAGE", dir.join("cage"))
            .env("PATH", "/usr/bin:/bin")
            .env_remove("BUTTON")
            .env_remove("ACTION");
        for (k, v) in env {
            cmd.env(k, v);
        }
        assert!(output(&mut cmd).status.success());
    };
    run(&[]);
    assert!(!log.exists(), "cage was called without a button event");
    run(&[("BUTTON", "BTN_0"), ("ACTION", "pressed")]);
    let calls = std::fs::read_to_string(&log).unwrap();
    assert!(calls.ends_with(" button BTN_0 pressed\n"), "{calls:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}
