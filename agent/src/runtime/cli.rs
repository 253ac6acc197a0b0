//! The daemon's commands: `idgate run`, and the admin-socket clients `idgate sessions list`,
//! `idgate sessions revoke`, `idgate whois`, `idgate status` and `idgate reload`.

use std::{
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use clap::{Args, Subcommand, ValueEnum};
use hyper::Method;
use serde_json::Value;

use crate::{
    api::{
        ApiError,
        client::{escape, request},
    },
    config::{self, Config, LoadError},
    exit,
};

/// `idgate run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The configuration file.
    #[arg(long, default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// Log filter, e.g. `info` or `info,idgate::audit=info,idgate=debug` (default: RUST_LOG, else
    /// `info`).
    #[arg(long)]
    pub log_level: Option<String>,
}

/// Output format of the commands that print data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// A readable table.
    #[default]
    Table,
    /// JSON, for scripts.
    Json,
}

/// How to reach the running agent.
#[derive(Debug, Args)]
pub struct Connect {
    /// The admin socket (default: `[admin] socket` of --config if it can be read, else
    /// /run/idgate/admin.sock).
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// The configuration file naming the admin socket.
    #[arg(long, global = true, default_value = config::DEFAULT_PATH)]
    pub config: PathBuf,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

impl Connect {
    /// The socket to use: `--socket`, else the configuration's, else the default.
    pub fn socket(&self) -> PathBuf {
        if let Some(s) = &self.socket {
            return s.clone();
        }
        match Config::load(&self.config) {
            Ok((c, _)) => c.admin.socket,
            Err(_) => PathBuf::from(config::DEFAULT_ADMIN_SOCKET),
        }
    }
}

/// `idgate sessions`.
#[derive(Debug, Args)]
pub struct SessionsArgs {
    #[command(subcommand)]
    command: SessionsCommand,
    #[command(flatten)]
    connect: Connect,
}

#[derive(Debug, Subcommand)]
enum SessionsCommand {
    /// List every source with its identity and sessions.
    List,
    /// End sessions at once, by source address or by user (user claim or subject).
    Revoke {
        /// Revoke the sessions of this address.
        #[arg(long, conflicts_with = "user", required_unless_present = "user")]
        source: Option<IpAddr>,
        /// Revoke every session of this user.
        #[arg(long)]
        user: Option<String>,
    },
}

/// `idgate whois`.
#[derive(Debug, Args)]
pub struct WhoisArgs {
    /// The address to look up.
    pub address: IpAddr,
    #[command(flatten)]
    pub connect: Connect,
}

/// `idgate status` and `idgate reload`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub connect: Connect,
}

/// Runs the daemon; returns the process exit code.
pub fn run(args: RunArgs) -> i32 {
    if let Err(e) = super::init_logging(args.log_level.as_deref()) {
        eprintln!("error: {e}");
        return exit::USAGE;
    }
    let (config, warnings) = match Config::load(&args.config) {
        Ok(loaded) => loaded,
        Err(e @ LoadError::Read { .. }) => {
            eprintln!("error: {e}");
            return exit::CONFIG;
        }
        Err(LoadError::Invalid { path, errors }) => {
            eprintln!("error: {}: {errors}", path.display());
            return exit::CONFIG;
        }
    };
    for w in &warnings {
        tracing::warn!("configuration: {w}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return exit::FAILURE;
        }
    };
    match runtime.block_on(super::run_from(
        config,
        Some(args.config.clone()),
        super::shutdown_signal(),
    )) {
        Ok(()) => exit::OK,
        Err(e) => {
            tracing::error!(error = %e, "idgate stopped");
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

/// `idgate sessions ...`; returns the process exit code.
pub fn sessions(args: SessionsArgs) -> i32 {
    let socket = args.connect.socket();
    let output = args.connect.output;
    match args.command {
        SessionsCommand::List => {
            let v = match call(&socket, Method::GET, "/v1/sessions") {
                Ok((200, v)) => v,
                Ok((status, v)) => return refused(status, &v),
                Err(code) => return code,
            };
            print_data(output, &v, render_sessions)
        }
        SessionsCommand::Revoke { source, user } => {
            let query = match (source, user) {
                (Some(a), _) => format!("source={}", escape(&a.to_string())),
                (None, Some(u)) => format!("user={}", escape(&u)),
                (None, None) => {
                    eprintln!("error: give --source or --user");
                    return exit::USAGE;
                }
            };
            let v = match call(&socket, Method::DELETE, &format!("/v1/sessions?{query}")) {
                Ok((200, v)) => v,
                Ok((status, v)) => return refused(status, &v),
                Err(code) => return code,
            };
            print_data(output, &v, |v| {
                format!(
                    "revoked {} session(s) of {} source(s)\n",
                    v["removed"]["sessions"], v["removed"]["sources"]
                )
            })
        }
    }
}

fn render_sessions(v: &Value) -> String {
    let mut out = String::new();
    let list = v["sessions"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        return "no sessions\n".to_owned();
    }
    let _ = writeln!(
        out,
        "{:<40} {:<24} {:<24} SERVICES",
        "SOURCE", "USER", "EXPIRES"
    );
    for s in &list {
        let services: Vec<String> = s["services"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| format!("{} ({})", text(&x["service"]), text(&x["rule"]["name"])))
                    .collect()
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<40} {:<24} {:<24} {}",
            text(&s["source"]),
            text(&s["user"]),
            text(&s["expires_at"]),
            services.join(", ")
        );
    }
    out
}

/// `idgate whois ADDR`; returns the process exit code ([`exit::NOT_FOUND`] if nobody is logged
/// in from the address).
pub fn whois(args: WhoisArgs) -> i32 {
    let path = format!("/v1/whois/{}", escape(&args.address.to_string()));
    let v = match call(&args.connect.socket(), Method::GET, &path) {
        Ok((200, v)) => v,
        Ok((404, v)) => {
            eprintln!("error: {}", text(&v["description"]));
            return exit::NOT_FOUND;
        }
        Ok((status, v)) => return refused(status, &v),
        Err(code) => return code,
    };
    print_data(args.connect.output, &v, |v| {
        let mut out = format!(
            "{}: {} ({}), issuer {}\n  groups: {}\n  token expires {}\n",
            text(&v["source"]),
            text(&v["user"]),
            text(&v["subject"]),
            text(&v["issuer"]),
            v["groups"]
                .as_array()
                .map(|g| g.iter().map(text).collect::<Vec<_>>().join(", "))
                .unwrap_or_default(),
            text(&v["token_expires_at"]),
        );
        for s in v["services"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "  {}: rule {} (id {}), until {}",
                text(&s["service"]),
                text(&s["rule"]["name"]),
                s["rule"]["id"],
                text(&s["expires_at"])
            );
        }
        out
    })
}

/// `idgate status`; returns the process exit code.
pub fn status(args: AgentArgs) -> i32 {
    let v = match call(&args.connect.socket(), Method::GET, "/v1/status") {
        Ok((200, v)) => v,
        Ok((status, v)) => return refused(status, &v),
        Err(code) => return code,
    };
    print_data(args.connect.output, &v, render_status)
}

fn render_status(v: &Value) -> String {
    let mut out = format!("idgate {}\n\ninterfaces:\n", text(&v["version"]));
    let interfaces = v["interfaces"].as_array().cloned().unwrap_or_default();
    if interfaces.is_empty() {
        out.push_str("  (none attached)\n");
    }
    for i in &interfaces {
        let _ = writeln!(
            out,
            "  {:<16} {:<12} program {}",
            text(&i["name"]),
            text(&i["mode"]),
            i["program_id"]
        );
    }
    let _ = writeln!(
        out,
        "\nsessions: {} (capacity {}), sources {}, identities {}",
        v["sessions"],
        text(&v["capacity"]),
        v["sources"],
        v["identities"]
    );
    let _ = writeln!(
        out,
        "events: {} suppressed, {} lost",
        v["events_suppressed"], v["events_lost"]
    );
    out.push_str("\nissuers:\n");
    for i in v["issuers"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {}: {} key(s), last refresh {}, refreshes {} ok / {} failed",
            text(&i["issuer"]),
            i["keys"],
            text(&i["last_refresh_ok"]),
            i["refreshes_ok"],
            i["refreshes_failed"]
        );
    }
    let _ = writeln!(
        out,
        "\n{:<24} {:<20} {:>14} {:>16}",
        "SERVICE", "REASON", "PACKETS", "BYTES"
    );
    for c in v["counters"].as_array().into_iter().flatten() {
        let service = text(&c["service"]);
        let mut rows: Vec<(String, &Value)> = c["reasons"]
            .as_object()
            .map(|m| m.iter().map(|(k, n)| (k.clone(), n)).collect())
            .unwrap_or_default();
        if c["rst_sent"]["packets"].as_u64() > Some(0) {
            rows.push(("rst-sent".to_owned(), &c["rst_sent"]));
        }
        if rows.is_empty() {
            let _ = writeln!(out, "{service:<24} {:<20} {:>14} {:>16}", "-", 0, 0);
        }
        for (reason, n) in rows {
            let _ = writeln!(
                out,
                "{service:<24} {reason:<20} {:>14} {:>16}",
                n["packets"], n["bytes"]
            );
        }
    }
    out
}

/// `idgate reload`; returns the process exit code ([`exit::CONFIG`] if the agent refused the
/// new configuration).
pub fn reload(args: AgentArgs) -> i32 {
    let output = args.connect.output;
    match call(&args.connect.socket(), Method::POST, "/v1/reload") {
        Ok((200, v)) => print_data(output, &v, |v| {
            let mut out = format!(
                "reloaded {}\n  issuers changed: {}, TLS reloaded: {}\n  sessions: {}\n",
                text(&v["path"]),
                v["issuers_changed"],
                v["tls_reloaded"],
                v["sessions"]
            );
            for w in v["warnings"].as_array().into_iter().flatten() {
                let _ = writeln!(out, "  warning: {}", text(w));
            }
            out
        }),
        Ok((422, v)) => {
            if output == Output::Json {
                print!("{}", pretty(&v));
            } else {
                eprintln!(
                    "error: configuration reload refused; the running configuration stays in force:"
                );
                for e in v["errors"].as_array().into_iter().flatten() {
                    eprintln!("  {}", text(e));
                }
            }
            exit::CONFIG
        }
        Ok((status, v)) => refused(status, &v),
        Err(code) => code,
    }
}

/// One admin API call: the status and JSON answer, or (after printing why) the exit code:
/// [`exit::NOT_RUNNING`] when the socket is missing or refuses, [`exit::PERMISSION`] when this
/// user may not connect.
fn call(socket: &Path, method: Method, path: &str) -> Result<(u16, Value), i32> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: starting the async runtime: {e}");
            exit::FAILURE
        })?;
    runtime
        .block_on(request(socket, method, path))
        .map_err(|e| {
            eprintln!("error: {e}");
            match e {
                ApiError::Socket { .. } => connect_failure(socket),
                _ => exit::FAILURE,
            }
        })
}

/// Why connecting to `socket` fails, as an exit code.
fn connect_failure(socket: &Path) -> i32 {
    use std::io::ErrorKind;
    match std::os::unix::net::UnixStream::connect(socket) {
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            exit::NOT_RUNNING
        }
        Err(e) if e.kind() == ErrorKind::PermissionDenied => exit::PERMISSION,
        _ => exit::FAILURE,
    }
}

/// An answer other than success: prints its description.
fn refused(status: u16, v: &Value) -> i32 {
    eprintln!("error: {} ({status})", text(&v["description"]));
    exit::FAILURE
}

/// Prints `v` as JSON or as `render(v)`.
fn print_data(output: Output, v: &Value, render: impl FnOnce(&Value) -> String) -> i32 {
    let text = match output {
        Output::Json => pretty(v),
        Output::Table => render(v),
    };
    write_stdout(&text)
}

/// Writes to stdout; a reader that went away (`| head`) ends the command quietly.
fn write_stdout(text: &str) -> i32 {
    use std::io::Write as _;
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

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

/// A JSON value as plain text (strings without quotes).
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}
