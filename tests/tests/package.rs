//! The router binaries and the OpenWrt package, checked from the outside:
//! - the aarch64 and armv7 binaries that `cargo xtask dist` built are static, run under
//!   qemu-user (`cage --version`) and pass `cage check` on the shipped configuration
//!   inside a throwaway network namespace (qemu runs the router's binary, which runs the
//!   build machine's `nft`);
//! - the `.ipk` files that `cargo xtask package` made are read here, archive by archive,
//!   rather than trusted: members, control fields, conffiles, modes and owners;
//! - the shell scripts parse (`sh -n`), and the init script, the uci-defaults script and
//!   the button hook run against stand-ins for procd, uci and cage.
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
    "openwrt/control/postinst",
    "openwrt/control/prerm",
    "tests/openwrt/uci",
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

/// Source the init script the way rc.common does, with procd's functions stubbed to
/// record their calls, and run `what` (shell) after it.
fn run_init(dir: &Path, what: &str) -> (Output, String) {
    let log = dir.join("procd.log");
    let _ = std::fs::remove_file(&log);
    let harness = format!(
        r#"
log='{log}'
procd_open_instance() {{ echo "open_instance $*" >>"$log"; }}
procd_set_param() {{ echo "set_param $*" >>"$log"; }}
procd_close_instance() {{ echo "close_instance" >>"$log"; }}
procd_add_reload_trigger() {{ echo "reload_trigger $*" >>"$log"; }}
procd_send_signal() {{ echo "send_signal $*" >>"$log"; }}
. '{script}'
{what}
"#,
        log = log.display(),
        script = root().join("openwrt/files/etc/init.d/cage").display(),
    );
    let out = output(Command::new("sh").arg("-c").arg(harness));
    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    (out, calls)
}

#[test]
fn init_script_runs_cage_under_procd_and_reloads_with_sighup() {
    let dir = temp_dir("init");
    let (out, calls) = run_init(
        &dir,
        r#"echo "USE_PROCD=$USE_PROCD START=$START"; start_service; service_triggers
type stop_service >/dev/null 2>&1 && echo "stop_service defined"; true"#,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("USE_PROCD=1"), "{stdout}");
    // Stopping the service must not remove the policy: only the daemon ends.
    assert!(
        !stdout.contains("stop_service defined"),
        "stop_service exists"
    );
    let expected = [
        "open_instance cage",
        "set_param command /usr/bin/cage --config /etc/config/cage run",
        "set_param respawn 3600 5 0",
        "set_param stdout 1",
        "set_param stderr 1",
        "close_instance",
        "reload_trigger cage",
    ];
    assert_eq!(calls.lines().collect::<Vec<_>>(), expected, "procd calls");

    // Reload: `cage check` first; SIGHUP only when the configuration is valid.
    let cage_log = dir.join("cage.log");
    for (rc, signalled) in [(0, true), (1, false)] {
        let _ = std::fs::remove_file(&cage_log);
        recorder(&dir.join("cage"), &cage_log, rc);
        let (out, calls) = run_init(
            &dir,
            &format!("PROG='{}'; reload_service", dir.join("cage").display()),
        );
        assert_eq!(out.status.success(), signalled, "reload with check rc {rc}");
        let checked = std::fs::read_to_string(&cage_log).unwrap_or_default();
        assert!(
            checked.contains("--config /etc/config/cage check"),
            "reload did not run cage check: {checked:?}"
        );
        assert_eq!(
            calls.contains("send_signal cage cage HUP"),
            signalled,
            "check rc {rc}: {calls:?}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
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

/// The shipped /etc/config/cage as the fake uci's store lines.
fn shipped_config_as_store() -> String {
    let text = std::fs::read_to_string(root().join("openwrt/files/etc/config/cage")).unwrap();
    let mut store = String::new();
    let mut section = String::new();
    for line in text.lines() {
        let words: Vec<_> = line
            .split_whitespace()
            .map(|w| w.trim_matches('\''))
            .collect();
        match words.as_slice() {
            ["config", kind, name] => {
                section = format!("cage.{name}");
                store.push_str(&format!("{section}={kind}\n"));
            }
            ["option", key, value] => store.push_str(&format!("{section}.{key}={value}\n")),
            ["list", key, value] => store.push_str(&format!("{section}.{key}+={value}\n")),
            _ => {}
        }
    }
    store
}

/// What a GL-MT6000-like router has before Cage: br-lan on lan1..lan3, a wan, a radio.
const ROUTER: &str = "\
network.@device[0]=device
network.@device[0].name=br-lan
network.@device[0].type=bridge
network.@device[0].ports+=lan1
network.@device[0].ports+=lan2
network.@device[0].ports+=lan3
network.lan=interface
network.lan.device=br-lan
network.lan.proto=static
network.lan.ipaddr=192.168.8.1
network.wan=interface
network.wan.device=eth1
network.wan.proto=dhcp
dhcp.lan=dhcp
dhcp.lan.interface=lan
wireless.radio0=wifi-device
wireless.radio0.band=2g
wireless.radio1=wifi-device
wireless.radio1.band=5g
firewall.@zone[0]=zone
firewall.@zone[0].name=lan
firewall.@zone[1]=zone
firewall.@zone[1].name=wan
";

/// Run 90-cage with the fake uci on `store`, a fake /sys with `ports`, a stub logger.
fn run_uci_defaults(dir: &Path, store: &Path, ports: &[&str]) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    recorder(&bin.join("logger"), &dir.join("logger.log"), 0);
    let sysfs = dir.join("sys");
    let _ = std::fs::remove_dir_all(&sysfs);
    for port in ports {
        std::fs::create_dir_all(sysfs.join("class/net").join(port)).unwrap();
    }
    let path = format!(
        "{}:{}:{}",
        root().join("tests/openwrt").display(),
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = output(
        Command::new("sh")
            .arg(root().join("openwrt/files/etc/uci-defaults/90-cage"))
            .env("PATH", path)
            .env("UCI_STORE", store)
            .env("CAGE_SYSFS", &sysfs)
            .current_dir(dir),
    );
    assert!(
        out.status.success(),
        "90-cage: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn uci_get(store: &Path, key: &str) -> String {
    let out = output(
        Command::new(root().join("tests/openwrt/uci"))
            .args(["-q", "get", key])
            .env("UCI_STORE", store),
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn uci_defaults_declares_the_segment_once() {
    let dir = temp_dir("uci");
    let store = dir.join("store");
    std::fs::write(&store, format!("{ROUTER}{}", shipped_config_as_store())).unwrap();
    run_uci_defaults(&dir, &store, &["lan1", "lan2", "lan3", "eth1"]);
    let get = |k: &str| uci_get(&store, k);

    // The bridge: the configured port (lan3) moved out of br-lan; the other LAN ports
    // carry the segment tagged with its VLAN id.
    assert_eq!(get("network.cage_dev"), "device");
    assert_eq!(get("network.cage_dev.type"), "bridge");
    assert_eq!(get("network.cage_dev.name"), "br-cage");
    assert_eq!(get("network.cage_dev.ports"), "lan3 lan1.10 lan2.10");
    assert_eq!(get("network.@device[0].ports"), "lan1 lan2");
    assert_eq!(get("network.cage_vlan_lan1.type"), "8021q");
    assert_eq!(get("network.cage_vlan_lan1.ifname"), "lan1");
    assert_eq!(get("network.cage_vlan_lan1.vid"), "10");
    // The interface, with the segment's addresses from /etc/config/cage.
    assert_eq!(get("network.cage.device"), "br-cage");
    assert_eq!(get("network.cage.proto"), "static");
    assert_eq!(get("network.cage.ipaddr"), "192.168.10.1");
    assert_eq!(get("network.cage.netmask"), "255.255.255.0");
    assert_eq!(get("network.cage.ip6addr"), "fd00:cafe:10::1/64");
    // DHCP pool and router advertisements.
    assert_eq!(get("dhcp.cage"), "dhcp");
    assert_eq!(get("dhcp.cage.interface"), "cage");
    assert_eq!(get("dhcp.cage.ra"), "server");
    // The AI SSID on the first radio, isolated, encrypted with a generated key.
    assert_eq!(get("wireless.cage.device"), "radio0");
    assert_eq!(get("wireless.cage.network"), "cage");
    assert_eq!(get("wireless.cage.mode"), "ap");
    assert_eq!(get("wireless.cage.isolate"), "1");
    assert_eq!(get("wireless.cage.encryption"), "psk2");
    assert!(get("wireless.cage.key").len() >= 16, "weak or no Wi-Fi key");
    // The fw4 zone: nothing in by default but DHCP, DNS and neighbour discovery;
    // forwarding to the WAN only.
    assert_eq!(get("firewall.cage_zone.name"), "cage");
    assert_eq!(get("firewall.cage_zone.network"), "cage");
    assert_eq!(get("firewall.cage_zone.input"), "REJECT");
    assert_eq!(get("firewall.cage_zone.forward"), "REJECT");
    assert_eq!(get("firewall.cage_zone.output"), "ACCEPT");
    assert_eq!(get("firewall.cage_wan.src"), "cage");
    assert_eq!(get("firewall.cage_wan.dest"), "wan");
    assert_eq!(get("firewall.cage_dns.dest_port"), "53");
    // Cage's DNS forwarder, where Cage redirects the segment's port 53.
    assert_eq!(get("firewall.cage_dnsfwd.dest_port"), "5354");
    assert_eq!(get("firewall.cage_dnsfwd.src"), "cage");
    assert_eq!(get("firewall.cage_dhcp.dest_port"), "67");
    let forwardings = std::fs::read_to_string(&store)
        .unwrap()
        .lines()
        .filter(|l| l.ends_with("=forwarding"))
        .count();
    // cage -> wan, and lan -> cage: fw4 rejects forwarding between zones without one, so
    // it is what lets the admin hosts in (Cage's table lets no other LAN host in).
    assert_eq!(forwardings, 2, "only cage -> wan and lan -> cage");
    assert_eq!(get("firewall.cage_lan.src"), "lan");
    assert_eq!(get("firewall.cage_lan.dest"), "cage");
    let commits = std::fs::read_to_string(dir.join("store.commits")).unwrap();
    for pkg in ["network", "dhcp", "wireless", "firewall"] {
        assert!(commits.contains(&format!("commit {pkg}")), "{commits}");
    }

    // Again: nothing changes (a user's edits in between would be kept too).
    let before = std::fs::read_to_string(&store).unwrap();
    run_uci_defaults(&dir, &store, &["lan1", "lan2", "lan3", "eth1"]);
    assert_eq!(
        std::fs::read_to_string(&store).unwrap(),
        before,
        "not idempotent"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn uci_defaults_on_a_router_without_the_port_or_a_radio() {
    let dir = temp_dir("uci-small");
    let store = dir.join("store");
    let router: String = ROUTER
        .lines()
        .filter(|l| !l.starts_with("wireless.") && !l.ends_with("+=lan3"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&store, format!("{router}{}", shipped_config_as_store())).unwrap();
    run_uci_defaults(&dir, &store, &["lan1", "lan2", "eth1"]);
    let get = |k: &str| uci_get(&store, k);
    assert_eq!(get("network.cage_dev.ports"), "lan1.10 lan2.10");
    assert_eq!(get("network.@device[0].ports"), "lan1 lan2");
    assert_eq!(get("network.cage.ipaddr"), "192.168.10.1");
    assert_eq!(get("wireless.cage"), "", "an SSID without a radio");
    std::fs::remove_dir_all(&dir).unwrap();
}
