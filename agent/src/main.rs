//! The `idgate` command line: a thin layer over the library's modules.

use std::{net::IpAddr, path::PathBuf, process::ExitCode};

use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};
use idgate::{
    config::{self, Config, Diagnostic, LoadError},
    exit,
    policy::Identity,
};

#[derive(Parser)]
#[command(
    name = "idgate",
    about = "Identity-aware host firewall",
    version,
    after_help = exit::HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the version and whether this build carries its eBPF programs.
    Version,
    /// Validate the configuration: print every error (exit 2), or "configuration OK" and any
    /// warnings.
    CheckConfig {
        /// The configuration file.
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Inspect the policy.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Run a development OpenID provider (client credentials, JWT access tokens). Not for
    /// production: secrets in a plain file, keys in memory only.
    DevIdp(idgate::devidp::cli::Args),
    /// Run the daemon: enforce on the configured interfaces, serve the session endpoint and the
    /// admin socket, until SIGINT or SIGTERM.
    Run(idgate::runtime::cli::RunArgs),
    /// List or revoke sessions (through the admin socket).
    Sessions(idgate::runtime::cli::SessionsArgs),
    /// Show who is logged in from an address (through the admin socket); exit 5 if nobody is.
    Whois(idgate::runtime::cli::WhoisArgs),
    /// Show the running agent: interfaces, programs, sessions, counters, issuers (through the
    /// admin socket).
    Status(idgate::runtime::cli::AgentArgs),
    /// Make the running agent re-read its configuration file (as SIGHUP does) and print what
    /// changed, or every error (exit 2; the running configuration stays in force).
    Reload(idgate::runtime::cli::AgentArgs),
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// End pinned enforcement: detach every pinned link and remove the pin directory (sessions
    /// included) and the record of their owners. For after `idgate run` has stopped, or to
    /// clear an incompatible layout.
    Cleanup {
        /// The pin directory (`[dataplane] pin_dir`).
        #[arg(long, default_value = idgate::dataplane::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// The owners of the pinned sessions (`[dataplane] session_state`).
        #[arg(long, default_value = config::DEFAULT_SESSION_STATE)]
        session_state: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Show, per service, every rule in order and why it did or did not match.
    Explain {
        /// The configuration file.
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
        /// A file holding an access token: verified against the configured issuers (their keys
        /// are fetched), then explained. Without --token or --identity, the explanation is for
        /// traffic without a token.
        #[arg(long, conflicts_with = "identity")]
        token: Option<PathBuf>,
        /// A JSON identity ({"issuer", "user", "groups", "scopes", "claims"}) instead of a token.
        #[arg(long)]
        identity: Option<PathBuf>,
        /// The client's source address.
        #[arg(long)]
        source: IpAddr,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Translate an exported PAN-OS configuration's security rules into a [policy] section for
    /// this host, with a report of what became of every rule (exit 1 if any was refused, unless
    /// --allow-partial).
    ImportPanos(idgate::policy::panos::cli::Args),
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    /// A readable table.
    Table,
    /// JSON, for scripts.
    Json,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
            // Printing help or an error to a closed pipe is not worth a second error.
            let _ = e.print();
            return code_of(code);
        }
    };
    code_of(match cli.command {
        Command::Version => {
            println!(
                "idgate {} (eBPF programs {})",
                env!("CARGO_PKG_VERSION"),
                if idgate::dataplane::has_programs() {
                    "embedded"
                } else {
                    "missing: built without bpf-linker"
                }
            );
            exit::OK
        }
        Command::CheckConfig { config } => check_config(&config),
        Command::Policy {
            command:
                PolicyCommand::Explain {
                    config,
                    token,
                    identity,
                    source,
                    output,
                },
        } => explain(
            &config,
            token.as_deref(),
            identity.as_deref(),
            source,
            output,
        ),
        Command::Policy {
            command: PolicyCommand::ImportPanos(args),
        } => idgate::policy::panos::cli::run(&args),
        Command::DevIdp(args) => idgate::devidp::cli::run(args),
        Command::Run(args) => idgate::runtime::cli::run(args),
        Command::Sessions(args) => idgate::runtime::cli::sessions(args),
        Command::Whois(args) => idgate::runtime::cli::whois(args),
        Command::Status(args) => idgate::runtime::cli::status(args),
        Command::Reload(args) => idgate::runtime::cli::reload(args),
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "idgate", &mut script);
            write_stdout(&String::from_utf8_lossy(&script))
        }
        Command::Cleanup {
            pin_dir,
            session_state,
        } => match idgate::dataplane::cleanup(&pin_dir) {
            Ok(detached) => {
                for l in &detached {
                    println!("detached {l}");
                }
                println!("removed {}", pin_dir.display());
                match std::fs::remove_file(&session_state) {
                    Ok(()) => println!("removed {}", session_state.display()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        eprintln!("error: removing {}: {e}", session_state.display());
                        return code_of(exit::FAILURE);
                    }
                }
                exit::OK
            }
            Err(e) => {
                eprintln!("error: cleanup of {}: {e}", pin_dir.display());
                exit::FAILURE
            }
        },
    })
}

fn code_of(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn print_warnings(warnings: &[Diagnostic]) {
    for w in warnings {
        eprintln!("warning: {w}");
    }
}

/// Loads the configuration, printing every error; `None` means exit with [`exit::CONFIG`].
fn load(path: &std::path::Path) -> Option<(Config, Vec<Diagnostic>)> {
    match Config::load(path) {
        Ok(loaded) => Some(loaded),
        Err(e @ LoadError::Read { .. }) => {
            eprintln!("error: {e}");
            None
        }
        Err(LoadError::Invalid { path, errors }) => {
            eprintln!("error: {}: {errors}", path.display());
            None
        }
    }
}

fn check_config(path: &std::path::Path) -> i32 {
    let Some((_, warnings)) = load(path) else {
        return exit::CONFIG;
    };
    print_warnings(&warnings);
    write_stdout("configuration OK\n")
}

fn explain(
    config: &std::path::Path,
    token: Option<&std::path::Path>,
    identity: Option<&std::path::Path>,
    source: IpAddr,
    output: Output,
) -> i32 {
    let Some((config, warnings)) = load(config) else {
        return exit::CONFIG;
    };
    print_warnings(&warnings);
    let identity = match token {
        Some(path) => verify_token_file(&config, path).map(Some),
        None => identity.map(read_identity).transpose(),
    };
    let identity = match identity {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::INPUT;
        }
    };
    let policy = config.policy();
    let explanation = match &identity {
        Some(id) => policy.explain(id, source),
        None => policy.explain_unauthenticated(source),
    };
    let text = match output {
        Output::Table => explanation.to_string(),
        Output::Json => match serde_json::to_string_pretty(&explanation) {
            Ok(s) => s + "\n",
            Err(e) => {
                eprintln!("error: encoding the explanation: {e}");
                return exit::FAILURE;
            }
        },
    };
    write_stdout(&text)
}

/// Writes to stdout; a reader that went away (`| head`) ends the command quietly, not in a panic.
fn write_stdout(text: &str) -> i32 {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => exit::OK,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => exit::OK,
        Err(e) => {
            eprintln!("error: writing output: {e}");
            exit::FAILURE
        }
    }
}

/// Verifies the token in `path` as the daemon would (keys fetched from the configured issuers);
/// touches no data plane.
fn verify_token_file(config: &Config, path: &std::path::Path) -> Result<Identity, String> {
    let token = std::fs::read_to_string(path)
        .map_err(|e| format!("reading token {}: {e}", path.display()))?;
    let settings =
        idgate::wiring::all_issuer_settings(&config.issuers).map_err(|e| e.to_string())?;
    let verifier = idgate::identity::Verifier::new(settings).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    runtime.block_on(async {
        for (issuer, result) in verifier.refresh_all().await {
            if let Err(e) = result {
                eprintln!("warning: fetching the keys of {issuer}: {e}");
            }
        }
        verifier
            .verify(token.trim())
            .await
            .map(|t| idgate::wiring::identity_of(&t))
            .map_err(|e| format!("token {} refused: {} ({e})", path.display(), e.reason()))
    })
}

fn read_identity(path: &std::path::Path) -> Result<Identity, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading identity {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("identity {}: {e}", path.display()))
}
