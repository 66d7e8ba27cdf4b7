//! The architectures the VM stage boots: Debian 12's kernel for each, the qemu that runs
//! it, and the router binary (`dist::TARGETS`) that goes in.

/// How qemu is given the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelImage {
    /// The bzImage's xz payload, unpacked on the host into the ELF `vmlinux`, booted
    /// through its PVH entry: the guest then does not decompress 8 MB with an emulated
    /// CPU (about 13 s of a 17 s boot under TCG on the 2-core machine).
    PvhFromBzImage,
    /// The package's file as it is (arm64: an uncompressed `Image`; malta: an ELF that
    /// decompresses itself).
    AsIs,
}

#[derive(Debug)]
pub struct Arch {
    /// The name on the command line and in the results.
    pub name: &'static str,
    /// `dist::TARGETS`' short name of the static binaries that run in the guest.
    pub dist: &'static str,
    /// Debian's architecture.
    pub deb: &'static str,
    /// The kernel metapackage (it depends on the current `linux-image-6.1.0-N-…`).
    pub kernel_meta: &'static str,
    /// Debian's multiarch directory (`/lib/<triplet>`) of the guest's shared libraries.
    pub triplet: &'static str,
    pub qemu: &'static str,
    /// Machine and CPU.
    pub machine: &'static [&'static str],
    pub console: &'static str,
    pub memory_mib: u32,
    pub cpus: u32,
    pub kernel: KernelImage,
    /// The Debian package with qemu for this architecture (for `cargo xtask setup`).
    pub qemu_package: &'static str,
}

pub const ARCHS: &[Arch] = &[
    Arch {
        name: "x86_64",
        dist: "x86_64",
        deb: "amd64",
        kernel_meta: "linux-image-amd64",
        triplet: "x86_64-linux-gnu",
        qemu: "qemu-system-x86_64",
        machine: &["-M", "pc"],
        console: "ttyS0",
        memory_mib: 768,
        cpus: 2,
        kernel: KernelImage::PvhFromBzImage,
        qemu_package: "qemu-system-x86",
    },
    Arch {
        name: "aarch64",
        dist: "aarch64",
        deb: "arm64",
        kernel_meta: "linux-image-arm64",
        triplet: "aarch64-linux-gnu",
        qemu: "qemu-system-aarch64",
        // The GL-MT3000's and GL-MT6000's Filogic cores are Cortex-A53s.
        machine: &["-M", "virt", "-cpu", "cortex-a53"],
        console: "ttyAMA0",
        memory_mib: 768,
        cpus: 2,
        kernel: KernelImage::AsIs,
        qemu_package: "qemu-system-arm",
    },
    Arch {
        name: "mipsel",
        dist: "mipsel",
        deb: "mipsel",
        kernel_meta: "linux-image-4kc-malta",
        triplet: "mipsel-linux-gnu",
        qemu: "qemu-system-mipsel",
        // The MT7628's core is a 24KEc (no FPU); the Malta board takes 256 MiB without
        // highmem, which Debian's 4kc-malta kernel does not have.
        machine: &["-M", "malta", "-cpu", "24KEc"],
        console: "ttyS0",
        memory_mib: 256,
        cpus: 1,
        kernel: KernelImage::AsIs,
        qemu_package: "qemu-system-mips",
    },
];

pub fn find(name: &str) -> Option<&'static Arch> {
    ARCHS
        .iter()
        .find(|a| a.name == name || a.deb == name || a.dist == name)
}
