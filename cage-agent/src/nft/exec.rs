//! Running the `nft` program: the ruleset as JSON on its standard input, its standard
//! error captured for the message (the `nftables` crate's helper lets it through to
//! ours), and "no such table" told apart, because Cage's tables are often absent.

use std::io::Write as _;
use std::process::{Command, Stdio};

use super::NftError;

/// The nft program; `CAGE_NFT` overrides it (tests, unusual installs).
fn nft_program() -> String {
    std::env::var("CAGE_NFT").unwrap_or_else(|_| "nft".to_owned())
}

pub(super) fn run(
    args: &[&str],
    stdin: Option<&str>,
    operation: &'static str,
) -> Result<String, NftError> {
    let program = nft_program();
    let exec = |source| NftError::Exec {
        program: program.clone(),
        operation,
        source,
    };
    let mut child = Command::new(&program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(exec)?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin was piped");
        pipe.write_all(input.as_bytes()).map_err(exec)?;
    }
    let out = child.wait_with_output().map_err(exec)?;
    if !out.status.success() {
        return Err(NftError::Failed {
            operation,
            stderr: String::from_utf8_lossy(&out.stderr).trim_end().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`run`] for a JSON listing (`nft -j list …`): the objects it lists (its `nftables`
/// array); `None` when nft says the table, set, meter or counter does not exist.
pub(super) fn list_objects(
    args: &[&str],
    operation: &'static str,
) -> Result<Option<Vec<serde_json::Value>>, NftError> {
    let out = match run(args, None, operation) {
        Ok(out) => out,
        Err(NftError::Failed { stderr, .. }) if stderr.contains("No such file") => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut v: serde_json::Value =
        serde_json::from_str(&out).map_err(|source| NftError::Json { operation, source })?;
    Ok(Some(match v["nftables"].take() {
        serde_json::Value::Array(objects) => objects,
        _ => Vec::new(),
    }))
}
