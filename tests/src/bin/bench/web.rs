//! `cargo xtask bench web`: the page and the API with 10 000 flows in the log. The
//! measuring program is `cage-agent/examples/web_bench.rs`, which xtask builds with the
//! release profile the routers get, twice: for the host (glibc) and static with musl, the
//! libc of the router binaries, whose allocator gives memory back where glibc's keeps it.
//! This runs both and records their tables.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::results::{load_average, record};

pub fn web(glibc: &str, musl: &str) -> Result<()> {
    let builds = [("glibc", glibc), ("musl, static (as on the routers)", musl)];
    let mut body = String::new();
    for (name, bin) in builds {
        let out = Command::new(bin)
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("running {bin}"))?;
        let table = String::from_utf8_lossy(&out.stdout).into_owned();
        println!("{name}:\n{table}");
        if !out.status.success() {
            bail!("the web benchmark ({name}) failed ({})", out.status);
        }
        body.push_str(&format!("{name}:\n\n{table}\n"));
    }
    record(
        "Web page and API latency with 10 000 flows",
        &format!(
            "Load average at the start: {}. The real router (`cage_web::router`) over the \
             real backend (`cage_agent::web::AgentBackend`, the loop `cage run` serves \
             with) on loopback, release build, for glibc and for static musl; a flow log \
             of 10 000 records over the last 24 hours (20 caged hosts, one flow in ten \
             blocked); logged in once \
             through `POST /api/login`; then 300 sequential requests per route after one \
             warm-up, each on a new TCP connection with its own TLS 1.3 handshake (the page \
             is HTTPS only), timed from connect to the last byte. \
             The peak memory before serving includes making the 10 000 records. The \
             dashboard runs `cage status`'s gathering (nft, netlink) on this machine's \
             kernel, which holds no Cage policy here, and reads the whole log for its \
             pictures, as the Hosts page and API do for the machines. Milliseconds.",
            load_average()
        ),
        &body,
    )
}
