//! `cage`: parse the command line, dispatch.

use std::path::PathBuf;
use std::process::ExitCode;

use cage_agent::isolation::{self, Source};
use cage_agent::killswitch::{self, ButtonAction};
use cage_agent::{apply, config, daemon, dns, flows, nft, running, selftest, status};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cage",
    version,
    about = "Cages a host running an AI agent on a segment of its own"
)]
struct Cli {
    /// Configuration file (UCI syntax).
    #[arg(long, short, global = true, env = "CAGE_CONFIG", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

// `cage flows`: its options, handed to `show_flows` as they are. (No doc comment: the
// command's help is the variant's.)
#[derive(clap::Args)]
struct FlowsArgs {
    /// Only flows of this caged host or peer address.
    #[arg(long)]
    host: Option<std::net::IpAddr>,
    /// Only flows to or from this port.
    #[arg(long)]
    port: Option<u16>,
    /// Only `allowed` or `blocked` flows.
    #[arg(long, value_parser = ["allowed", "blocked"])]
    verdict: Option<String>,
    /// How many of the newest matching flows (0: all).
    #[arg(long, short = 'n', default_value_t = 50)]
    limit: usize,
    /// Print the records as JSON Lines.
    #[arg(long)]
    json: bool,
    /// Keep printing new flows as they are written.
    #[arg(long, short)]
    follow: bool,
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
    /// Prove the cage on this router now: two throwaway probe hosts plugged into the
    /// segment send real packets towards what the contract denies and allows.
    /// Exits 0 only when every check holds; the result is kept for `cage status`.
    Selftest {
        /// Print the report as JSON (the same as <log_dir>/selftest.json).
        #[arg(long)]
        json: bool,
        /// An internet destination that must be reachable from the segment: ADDR
        /// (pinged) or ADDR:PORT (TCP). Without one, the internet check is skipped.
        #[arg(long = "target", value_name = "ADDR[:PORT]")]
        targets: Vec<selftest::Target>,
    },
    /// Remove Cage's tables: the segment is no longer caged. Stops a running daemon first.
    /// Refused while the kill switch is on.
    Disable,
    /// Kill switch: cut the segment off from everything, established connections
    /// included, until `cage release`. Survives restarts and reboots.
    Isolate {
        /// Why, for the audit log.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// End an isolation: the segment gets its usual access again.
    Release {
        /// Why, for the audit log.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// A hardware button event, as OpenWrt's button hotplug reports it (the hotplug
    /// script calls this with $BUTTON and $ACTION).
    Button { button: String, action: String },
    /// Set the web page's password: read from the terminal twice (or one line from
    /// standard input when it is not a terminal), stored as an argon2 hash in
    /// cage.main.password_hash. At least 8 characters.
    Passwd,
    /// The flow log: recent flows, newest last.
    Flows(FlowsArgs),
    /// DNS through the router: review refused names, allow one.
    Dns {
        #[command(subcommand)]
        command: DnsCommand,
    },
    /// The audit log (kill switch, configuration applied or refused, logins): without a
    /// subcommand, the newest entries.
    Audit {
        #[command(subcommand)]
        command: Option<AuditCommand>,
    },
    /// The AI port: which wired port the agent's machine plugs into (OpenWrt). Without
    /// a subcommand, show it and the owner's way in.
    Port {
        #[command(subcommand)]
        command: Option<PortCommand>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PortCommand {
    /// Make DEV (a wired LAN port, e.g. eth1 or lan5) the AI port; the previous one goes
    /// back to the LAN. Refused when it would leave you no way into the router.
    Set {
        device: String,
        /// Do it even if no LAN port or LAN Wi-Fi is left for you to reach the router.
        #[arg(long)]
        force: bool,
    },
    /// No wired AI port: every wired port back on the LAN.
    None {
        #[arg(long)]
        force: bool,
    },
    /// The board's default, as the package chose it at install.
    Auto {
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// The newest entries, oldest first, from audit.log.1 and audit.log.
    Show {
        /// How many (0: all).
        #[arg(long, short = 'n', default_value_t = 50)]
        limit: usize,
        /// Print the entries as JSON Lines.
        #[arg(long)]
        json: bool,
    },
    /// Check the hash chain over audit.log.1 and audit.log: exits 0 when it holds, 1
    /// when a line was changed, removed, inserted or moved (the first one is named).
    Verify {
        /// The log to check (its rotated file PATH.1 with it), instead of
        /// <state_dir>/audit.log.
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
        /// A line's seq and prev as a copy kept elsewhere has them (the syslog
        /// collector): the log must still have that line, unchanged up to it.
        #[arg(long, value_name = "SEQ:PREV")]
        expect: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DnsCommand {
    /// The names refused in allow-list mode (most recent first), with counts, last time
    /// and the hosts that asked.
    Refused {
        #[arg(long)]
        json: bool,
    },
    /// Allow a name (or `*.domain`): adds `list allow_domain` to the configuration and
    /// makes the running `cage run` reload it.
    Allow { name: String },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    cage_agent::log::init();
    // The configuration's log level, when it can be read; every command reads it again
    // and says what is wrong with it.
    if let Ok(cfg) = config::load(&cli.config) {
        cage_agent::log::configure(cfg.main.log_level);
    }
    let result = match cli.command {
        Command::Check { json } => check(&cli.config, json).await,
        Command::Apply => apply_once(&cli.config).await,
        Command::Run => daemon::run(&cli.config).await.map(|()| ExitCode::SUCCESS),
        Command::Status { json } => show_status(&cli.config, json).await,
        Command::Selftest { json, targets } => self_test(&cli.config, json, targets),
        Command::Disable => disable(&cli.config),
        Command::Isolate { reason } => switch(&cli.config, true, Source::Cli, &reason).await,
        Command::Release { reason } => switch(&cli.config, false, Source::Cli, &reason).await,
        Command::Button { button, action } => press(&cli.config, &button, &action).await,
        Command::Passwd => passwd(&cli.config),
        Command::Flows(args) => show_flows(&cli.config, args),
        Command::Dns { command } => dns_command(&cli.config, command),
        Command::Port { command, json } => port_command(&cli.config, command, json),
        Command::Audit { command } => audit_command(&cli.config, command),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cage: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn audit_command(
    path: &std::path::Path,
    command: Option<AuditCommand>,
) -> anyhow::Result<ExitCode> {
    use cage_agent::audit;
    let command = command.unwrap_or(AuditCommand::Show {
        limit: 50,
        json: false,
    });
    // The log the configuration names, unless --file gives one.
    let log = |file: Option<PathBuf>| -> anyhow::Result<PathBuf> {
        match file {
            Some(f) => Ok(f),
            None => Ok(audit::path(&config::load(path)?)),
        }
    };
    match command {
        AuditCommand::Show { limit, json } => {
            let log = log(None)?;
            if !log.exists() && !audit::rotated(&log).exists() {
                anyhow::bail!("no audit log at {} (nothing audited yet)", log.display());
            }
            let all = audit::read_all(&log);
            let skip = if limit == 0 {
                0
            } else {
                all.len().saturating_sub(limit)
            };
            for e in &all[skip..] {
                if json {
                    println!("{}", serde_json::to_string(e)?);
                } else {
                    println!("{}", audit::table_line(e));
                }
            }
        }
        AuditCommand::Verify { file, expect, json } => {
            let expect = expect.as_deref().map(audit::parse_expect).transpose()?;
            let report = audit::verify_file(&log(file)?, expect.as_ref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render_text());
            }
            if !report.ok() {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn port_command(
    path: &std::path::Path,
    command: Option<PortCommand>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use cage_agent::aiport::{self, Choice};
    let cfg = config::load(path)?;
    let report = match command {
        None => aiport::show(&cfg)?,
        Some(c) => {
            let (choice, force) = match c {
                PortCommand::Set { device, force } => (Choice::Port(device), force),
                PortCommand::None { force } => (Choice::None, force),
                PortCommand::Auto { force } => (Choice::Auto, force),
            };
            let report = aiport::set(&cfg, &choice, force)?;
            eprintln!("cage: the network reloads with the new AI port; cage run isolates it");
            report
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for line in report.lines() {
            println!("{line}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn check(path: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    let checked = apply::check(path).await?;
    if json {
        println!("{}", nft::to_json(&checked.ruleset));
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
    if let Ok(cfg) = config::load(path) {
        // Removing the tables would also end an isolation, which only `release` may do.
        if isolation::load(&cfg).isolated {
            anyhow::bail!(
                "the kill switch is on (the segment is isolated); `cage release` first \
                 if you really mean to uncage it"
            );
        }
        // A running daemon would put the tables back: stop it first.
        running::stop_daemon(&cfg.main.log_dir)?;
    }
    if let Ok(cfg) = config::load(path) {
        let bridge = &cfg.segment.bridge;
        if let Err(errors) = cage_agent::ebpf::detach(bridge, &cfg.pin_dir()) {
            for e in errors {
                eprintln!("cage: removing the eBPF program: {e}");
            }
        }
    }
    if nft::remove()? {
        eprintln!("cage: Cage's tables removed; the segment is NOT caged any more");
    } else {
        eprintln!("cage: Cage's tables were not in the kernel");
    }
    Ok(ExitCode::SUCCESS)
}

async fn switch(
    path: &std::path::Path,
    on: bool,
    source: Source,
    reason: &str,
) -> anyhow::Result<ExitCode> {
    let cfg = config::load(path)?;
    let who = killswitch::local_user();
    if on {
        killswitch::isolate(&cfg, source, reason, &who).await?;
        eprintln!("cage: ISOLATED: the segment is cut off until `cage release`");
    } else {
        killswitch::release(&cfg, source, reason, &who).await?;
        eprintln!("cage: released: the segment has its usual access again");
    }
    Ok(ExitCode::SUCCESS)
}

fn passwd(path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let (password, confirm) = cage_agent::web::read_new_password()?;
    cage_agent::web::set_password(path, &password, &confirm)?;
    eprintln!("cage: the web page's password is set ({})", path.display());
    Ok(ExitCode::SUCCESS)
}

async fn press(path: &std::path::Path, button: &str, action: &str) -> anyhow::Result<ExitCode> {
    let cfg = config::load(path)?;
    let reason = format!("button {button} {action}");
    let who = format!("button:{button}");
    match killswitch::button_action(&cfg, button, action) {
        ButtonAction::Isolate => {
            killswitch::isolate(&cfg, Source::Button, &reason, &who).await?;
            eprintln!("cage: ISOLATED by {reason}");
        }
        ButtonAction::Release => {
            killswitch::release(&cfg, Source::Button, &reason, &who).await?;
            eprintln!("cage: released by {reason}");
        }
        ButtonAction::Ignore => {}
    }
    Ok(ExitCode::SUCCESS)
}

fn self_test(
    path: &std::path::Path,
    json: bool,
    targets: Vec<selftest::Target>,
) -> anyhow::Result<ExitCode> {
    let cfg = config::load(path)?;
    // Ctrl-C and SIGTERM stop the probes; the probe hosts are removed either way.
    let _interrupts = selftest::catch_interrupts();
    let report = match selftest::run_and_store(&cfg, &selftest::Options { targets }) {
        Ok(r) => r,
        Err(selftest::SelftestError::Interrupted) => {
            eprintln!("cage: self-test interrupted; everything it made was removed");
            return Ok(ExitCode::from(130));
        }
        Err(e) => return Err(e.into()),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render_text());
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn dns_command(path: &std::path::Path, command: DnsCommand) -> anyhow::Result<ExitCode> {
    match command {
        DnsCommand::Refused { json } => {
            let cfg = config::load(path)?;
            let list = dns::refused(&cfg);
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                eprintln!("cage: no refused names");
            } else {
                for r in list {
                    let hosts: Vec<String> = r.hosts.iter().map(|h| h.to_string()).collect();
                    println!(
                        "{:<40} {:>6}x  last {}  by {}",
                        r.name,
                        r.count,
                        r.last,
                        hosts.join(", ")
                    );
                }
            }
        }
        DnsCommand::Allow { name } => {
            let a = dns::allow(path, &name)?;
            match (a.added, a.reloaded) {
                (false, _) => eprintln!("cage: {} is already allowed", a.name),
                (true, true) => eprintln!(
                    "cage: {} allowed (added to {}); cage run reloads it",
                    a.name,
                    path.display()
                ),
                (true, false) => eprintln!(
                    "cage: {} allowed (added to {}); cage run is not running, it takes \
                     effect when it starts",
                    a.name,
                    path.display()
                ),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn show_flows(path: &std::path::Path, args: FlowsArgs) -> anyhow::Result<ExitCode> {
    let FlowsArgs {
        host,
        port,
        verdict,
        limit,
        json,
        follow,
    } = args;
    let filter = &flows::FlowFilter {
        host,
        port,
        verdict,
    };
    let cfg = config::load(path)?;
    let dir = flows::dir(&cfg);
    let print = |r: &flows::FlowRecord| {
        if json {
            println!("{}", serde_json::to_string(r).expect("a record serialises"));
        } else {
            println!("{}", flows::table_line(r));
        }
    };
    let (records, bad) = flows::read_all(&cfg, filter);
    let skip = if limit == 0 {
        0
    } else {
        records.len().saturating_sub(limit)
    };
    records[skip..].iter().for_each(print);
    if bad > 0 {
        eprintln!("cage: {bad} unreadable lines in the flow log were skipped");
    }
    if !follow {
        return Ok(ExitCode::SUCCESS);
    }
    // Follow: print what is appended, across rotations, until interrupted. The log's
    // running count of records written says how many of the newest lines are new.
    let mut written = flows::read_stats(&cfg).map(|s| s.written).unwrap_or(0);
    loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let now_written = flows::read_stats(&cfg).map(|s| s.written).unwrap_or(0);
        if now_written <= written {
            continue;
        }
        let all = flows::read(&dir, cfg.flowlog.log_files, &flows::FlowFilter::default()).0;
        let new = (now_written - written) as usize;
        all[all.len().saturating_sub(new)..]
            .iter()
            .filter(|r| filter.matches(r))
            .for_each(print);
        written = now_written;
    }
}
