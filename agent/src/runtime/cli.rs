//! The daemon's commands: `idgate run`, and the admin-socket clients `idgate sessions list`,
//! `idgate sessions revoke` and `idgate whois`.

use std::{
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::Value;

use crate::{
    api::client::{escape, request},
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

/// `idgate sessions`.
#[derive(Debug, Args)]
pub struct SessionsArgs {
    #[command(subcommand)]
    command: SessionsCommand,
}

#[derive(Debug, Subcommand)]
enum SessionsCommand {
    /// List every source with its identity and sessions.
    List {
        /// The admin socket.
        #[arg(long, default_value = config::DEFAULT_ADMIN_SOCKET)]
        socket: PathBuf,
        /// Print the JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// End sessions at once, by source address or by user (user claim or subject).
    Revoke {
        /// The admin socket.
        #[arg(long, default_value = config::DEFAULT_ADMIN_SOCKET)]
        socket: PathBuf,
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
    /// The admin socket.
    #[arg(long, default_value = config::DEFAULT_ADMIN_SOCKET)]
    pub socket: PathBuf,
    /// Print the JSON answer.
    #[arg(long)]
    pub json: bool,
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
    match args.command {
        SessionsCommand::List { socket, json } => {
            admin_call(&socket, Method::GET, "/v1/sessions", |v| {
                if json {
                    return pretty(v);
                }
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
                                .map(|x| {
                                    format!(
                                        "{} ({})",
                                        text(&x["service"]),
                                        text(&x["rule"]["name"])
                                    )
                                })
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
            })
        }
        SessionsCommand::Revoke {
            socket,
            source,
            user,
        } => {
            let query = match (source, user) {
                (Some(a), _) => format!("source={}", escape(&a.to_string())),
                (None, Some(u)) => format!("user={}", escape(&u)),
                (None, None) => {
                    eprintln!("error: give --source or --user");
                    return exit::USAGE;
                }
            };
            admin_call(
                &socket,
                Method::DELETE,
                &format!("/v1/sessions?{query}"),
                |v| {
                    format!(
                        "revoked {} session(s) of {} source(s)\n",
                        v["removed"]["sessions"], v["removed"]["sources"]
                    )
                },
            )
        }
    }
}

/// `idgate whois ADDR`; returns the process exit code.
pub fn whois(args: WhoisArgs) -> i32 {
    let path = format!("/v1/whois/{}", escape(&args.address.to_string()));
    admin_call(&args.socket, Method::GET, &path, |v| {
        if args.json {
            return pretty(v);
        }
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

/// Calls the admin API; prints `render(answer)` on success, the error otherwise.
fn admin_call(
    socket: &Path,
    method: Method,
    path: &str,
    render: impl FnOnce(&Value) -> String,
) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return exit::FAILURE;
        }
    };
    match runtime.block_on(request(socket, method, path)) {
        Ok((200, v)) => {
            print!("{}", render(&v));
            exit::OK
        }
        Ok((status, v)) => {
            eprintln!("error: {} ({status})", text(&v["description"]));
            exit::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
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
