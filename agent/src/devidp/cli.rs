//! The `idgate dev-idp` command: its arguments, the warning, a summary of what is served, and
//! serving until SIGINT or SIGTERM. Kept here rather than in `main.rs` so that the command line
//! grows with the module.

use std::{io::Write as _, net::SocketAddr, path::PathBuf, time::Duration};

use tracing_subscriber::EnvFilter;

use super::{DEFAULT_LISTEN, DevIdp, DevIdpConfig, DevIdpError, Options, SigningAlg, WARNING};
use crate::{
    config::{format_duration, parse_duration},
    exit,
};

/// Arguments of `idgate dev-idp`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value_t = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Issuer identifier; its path, if any, prefixes every endpoint [default: http://<listen>].
    #[arg(long)]
    pub issuer: Option<String>,
    /// Clients file (TOML, see devidp.example.toml); without it, that example's clients.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Token signing algorithm: ES256, EdDSA or RS256.
    #[arg(long, default_value_t = SigningAlg::Es256)]
    pub alg: SigningAlg,
    /// Serve POST /rotate, which replaces the signing key (unauthenticated: keep it local).
    #[arg(long)]
    pub allow_rotate: bool,
    /// How long a rotated-out key stays published, e.g. "10m" [default: the longest token
    /// lifetime plus 1m].
    #[arg(long, value_parser = parse_duration)]
    pub rotation_grace: Option<Duration>,
}

/// Runs the command; returns the process exit code.
pub fn run(args: Args) -> i32 {
    let config = match &args.config {
        Some(path) => DevIdpConfig::load(path),
        None => Ok(DevIdpConfig::example()),
    };
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::CONFIG;
        }
    };
    // Another command may have set up logging already; then its subscriber stays.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    eprintln!("{}", banner());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return exit::FAILURE;
        }
    };
    let options = Options {
        listen: args.listen,
        issuer: args.issuer,
        alg: args.alg,
        allow_rotate: args.allow_rotate,
        rotation_grace: args.rotation_grace,
    };
    runtime.block_on(serve(config, options))
}

async fn serve(config: DevIdpConfig, options: Options) -> i32 {
    let idp = match DevIdp::start(config, options).await {
        Ok(idp) => idp,
        Err(e @ DevIdpError::Issuer { .. }) => {
            eprintln!("error: {e}");
            return exit::USAGE;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return exit::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    // A closed stdout must not stop the server: its output is a courtesy.
    let _ = out
        .write_all(summary(&idp).as_bytes())
        .and_then(|()| out.flush());
    drop(out);
    wait_for_signal().await;
    tracing::info!("dev-idp: stopping");
    idp.shutdown().await;
    exit::OK
}

/// The warning, boxed so that it stands out among log lines.
fn banner() -> String {
    let rule = "!".repeat(78);
    let mut lines = vec![rule.clone()];
    let mut line = String::from("!!");
    for word in WARNING.split_whitespace() {
        if line.len() + 1 + word.len() > 74 {
            lines.push(line);
            line = String::from("!!");
        }
        line.push(' ');
        line.push_str(word);
    }
    lines.push(line);
    lines.push(rule);
    lines.join("\n")
}

/// What is served, for a person; the last line, `READY <issuer>`, is for scripts.
fn summary(idp: &DevIdp) -> String {
    let mut s = format!(
        concat!(
            "idgate dev-idp on {}\n",
            "  issuer     {}\n",
            "  discovery  {}\n",
            "  token      {}\n",
            "  signing    {}, key {}\n",
        ),
        idp.local_addr(),
        idp.issuer(),
        idp.discovery_url(),
        idp.token_endpoint(),
        idp.alg(),
        idp.active_kid(),
    );
    if let Some(rotate) = idp.rotation_endpoint() {
        s.push_str(&format!(
            "  rotate     POST {rotate} (old keys stay published {})\n",
            format_duration(idp.rotation_grace())
        ));
    }
    for c in &idp.config().clients {
        s.push_str(&format!(
            "  client     {}: sub {}, groups [{}], scopes [{}], aud [{}], tokens for {}\n",
            c.client_id,
            c.subject,
            c.groups.join(", "),
            c.scopes.join(", "),
            c.audiences.join(", "),
            format_duration(c.token_lifetime),
        ));
    }
    s.push_str(&format!(
        "  try        curl -s -u CLIENT_ID:CLIENT_SECRET -d grant_type=client_credentials {}\n\
         READY {}\n",
        idp.token_endpoint(),
        idp.issuer()
    ));
    s
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).ok();
    let terminated = async {
        match &mut terminate {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminated => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn banner_lines_fit_and_keep_every_word() {
        let b = banner();
        assert!(b.lines().all(|l| l.len() <= 78), "{b}");
        let words: Vec<&str> = b
            .split_whitespace()
            .filter(|w| !w.chars().all(|c| c == '!'))
            .collect();
        assert_eq!(words, WARNING.split_whitespace().collect::<Vec<_>>());
    }
}
