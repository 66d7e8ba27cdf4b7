//! `cage`: parse the command line, dispatch.

use std::path::PathBuf;
use std::process::ExitCode;

use cage_agent::{apply, config, daemon, nft, status};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cage",
    version,
    about = "Cages a host running an AI agent on a segment of its own"
)]
struct Cli {
    /// Configuration file (UCI syntax).
    #[arg(long, short, global = true, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration, render the policy, dry-run it with nft, print it.
    Check {
        /// Print the nftables JSON that `apply` would feed to nft.
        #[arg(long)]
        json: bool,
    },
    /// Apply the policy and set up the segment once.
    Apply,
    /// Apply, then keep the policy in force (SIGHUP reloads the configuration).
    Run,
    /// Show whether the cage holds, the daemon, and what was denied.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Remove Cage's tables: the segment is no longer caged. Stops a running daemon first.
    Disable,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { json } => check(&cli.config, json).await,
        Command::Apply => apply_once(&cli.config).await,
        Command::Run => daemon::run(&cli.config).await.map(|()| ExitCode::SUCCESS),
        Command::Status { json } => show_status(&cli.config, json).await,
        Command::Disable => disable(&cli.config),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cage: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn check(path: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    let checked = apply::check(path).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&checked.ruleset)?);
    } else {
        print!("{}", nft::to_text(&checked.ruleset));
        eprintln!("cage: {}: valid; nft accepts the ruleset", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

async fn apply_once(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let checked = apply::check(path).await?;
    for action in apply::enforce(&checked).await? {
        eprintln!("cage: {action}");
    }
    eprintln!("cage: policy applied from {}", path.display());
    Ok(ExitCode::SUCCESS)
}

async fn show_status(path: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    let s = status::gather(path).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", status::render_text(&s));
    }
    Ok(if s.enforcing {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

fn disable(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    // A running daemon would put the tables back: stop it first.
    if let Ok(cfg) = config::load(path) {
        status::stop_daemon(&cfg.main.log_dir)?;
    }
    if nft::remove()? {
        eprintln!("cage: Cage's tables removed; the segment is NOT caged any more");
    } else {
        eprintln!("cage: Cage's tables were not in the kernel");
    }
    Ok(ExitCode::SUCCESS)
}
