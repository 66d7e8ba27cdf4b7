//! `cargo xtask demo` and `cargo xtask lab down`: build `cage`, then run the lab's demo
//! program (`cage-tests`' binary `demo`, `tests/src/bin/demo.rs`), which brings the lab
//! up with `cage run` in it, checks the contract and leaves the lab up, or removes it.

use anyhow::Result;

use crate::{cargo, lab_program, run, setup};

pub fn up() -> Result<()> {
    setup::require_root("the lab builds network namespaces and nftables tables")?;
    run(cargo().args(["build", "--locked", "-p", "cage-agent"]))?;
    run(lab_program("demo")?.arg("up"))
}

pub fn down() -> Result<()> {
    setup::require_root("removing network namespaces")?;
    run(lab_program("demo")?.arg("down"))
}
