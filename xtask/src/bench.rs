//! `cargo xtask bench killswitch | flows | dns | export | neighbour | product | idle | memory | web`: build what the
//! benchmark measures, then run it: the benchmarks are `cage-tests`' binary `bench`
//! (`tests/src/bin/bench/`, one file per benchmark), which prints the results and
//! appends them to `bench/RESULTS.md`.

use anyhow::{bail, Context, Result};

use crate::dist::target_dir;
use crate::{cargo, lab_program, run, setup};

pub fn run_bench(which: &str) -> Result<()> {
    match which {
        "killswitch" | "flows" | "dns" | "export" | "neighbour" | "product" | "idle" => {
            setup::require_root("the benchmark builds a lab in network namespaces")?;
            run(cargo().args(["build", "--locked", "--release", "-p", "cage-agent"]))?;
            // The release binary: the one that would run on a router.
            let cage = target_dir().join("release/cage");
            let cage = std::fs::canonicalize(&cage)
                .with_context(|| format!("no {} after the build", cage.display()))?;
            run(lab_program("bench")?.arg(which).env("CAGE_BIN", cage))
        }
        "memory" => {
            setup::require_root("the benchmark builds a lab in network namespaces")?;
            run(cargo().args(["build", "--locked", "--release", "-p", "cage-agent"]))?;
            let glibc = target_dir().join("release/cage");
            // The static musl binary the routers run, as `cargo xtask dist` makes it.
            crate::dist::run_dist(&["--target", "x86_64"])?;
            let musl = crate::dist::dist_dir().join("x86_64-unknown-linux-musl/cage");
            run(lab_program("bench")?.arg("memory").arg(glibc).arg(musl))
        }
        "web" => {
            // `cage-agent/examples/web_bench.rs`, with the release profile the routers
            // get, for the host (glibc) and static with musl (the routers' libc).
            let mut bins = Vec::new();
            for target in [None, Some("x86_64-unknown-linux-musl")] {
                let mut build = cargo();
                build.args([
                    "build",
                    "--locked",
                    "--release",
                    "-p",
                    "cage-agent",
                    "--example",
                    "web_bench",
                ]);
                let mut dir = target_dir();
                if let Some(t) = target {
                    build.args(["--target", t]);
                    // ring's C code, for the page's TLS.
                    crate::dist::c_compiler(&mut build, t)?;
                    dir.push(t);
                }
                run(&mut build)?;
                bins.push(dir.join("release/examples/web_bench"));
            }
            run(lab_program("bench")?.arg("web").args(&bins))
        }
        _ => bail!("no benchmark {which}"),
    }
}
