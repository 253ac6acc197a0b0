//! An independent OpenID provider for the identity tests: node-oidc-provider
//! (`tests/assets/oidc/server.mjs`) run as a child process, so that idgate's verifier is held to
//! tokens it had no part in making.
//!
//! The provider issues RFC 9068 JWT access tokens by the client credentials grant, with a
//! `groups` claim per client, and rotates its signing key on SIGHUP. [`OidcProvider`] starts it
//! (optionally inside a network namespace), waits for it to say `READY`, mints tokens, rotates
//! keys, and kills it on drop. Everything here blocks; don't call it from inside an async runtime.
//!
//! Requests are made from the calling thread's network namespace: for a provider started inside
//! a namespace, mint tokens from a thread in it ([`crate::netns::NetNs::run_in`]).
//!
//! Needs Node.js and `npm ci --prefix tests/assets/oidc` (`cargo xtask setup` does it).

use std::{
    io::{BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    sync::{
        Arc, Mutex,
        mpsc::{self, Receiver, RecvTimeoutError},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::{Value, json};

use crate::netns::unique_id;

/// How long the provider may take to start: node, the library, and a key (RSA takes longest).
pub const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long a rotation may take to be confirmed.
pub const ROTATE_DEADLINE: Duration = Duration::from_secs(10);
/// The audience tokens are issued for unless [`ProviderOptions::audience`] says otherwise.
pub const DEFAULT_AUDIENCE: &str = "api://idgate";

/// The directory holding `server.mjs`, `package.json` and (after setup) `node_modules`.
pub fn assets_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/oidc")
}

/// One client the provider knows.
#[derive(Clone, Debug)]
pub struct OidcClient {
    /// The client id; it is also the tokens' `sub`.
    pub client_id: String,
    /// The client secret, sent with HTTP Basic.
    pub client_secret: String,
    /// The `groups` claim of this client's tokens.
    pub groups: Vec<String>,
    /// Scopes the client may ask for (space-separated).
    pub scope: String,
    /// Access token lifetime.
    pub ttl: Duration,
    /// The tokens' `preferred_username`, when set: lets several clients stand for one user.
    pub username: Option<String>,
}

impl OidcClient {
    /// A client with secret `<id>-secret`, these groups, no scope and a 5 minute token lifetime.
    pub fn new(client_id: &str, groups: &[&str]) -> Self {
        Self {
            client_id: client_id.to_owned(),
            client_secret: format!("{client_id}-secret"),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            scope: String::new(),
            ttl: Duration::from_secs(300),
            username: None,
        }
    }

    /// The same client with a `preferred_username` claim in its tokens.
    pub fn with_username(mut self, username: &str) -> Self {
        self.username = Some(username.to_owned());
        self
    }

    /// The same client with these scopes allowed.
    pub fn with_scope(mut self, scope: &str) -> Self {
        self.scope = scope.to_owned();
        self
    }

    /// The same client with another token lifetime (whole seconds, at least one).
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }
}

/// How to run the provider.
#[derive(Clone, Debug)]
pub struct ProviderOptions {
    /// `HOST:PORT` to listen on; port 0 picks a free one.
    pub listen: String,
    /// The issuer; `None` means `http://<the address listened on>`.
    pub issuer: Option<String>,
    /// Run inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
    /// Signing algorithm: `ES256`, `RS256` or `EdDSA`.
    pub alg: String,
    /// The audience (resource indicator) every token is issued for.
    pub audience: String,
    /// The clients.
    pub clients: Vec<OidcClient>,
}

impl ProviderOptions {
    /// ES256 on a free loopback port, for [`DEFAULT_AUDIENCE`].
    pub fn loopback(clients: Vec<OidcClient>) -> Self {
        Self {
            listen: "127.0.0.1:0".to_owned(),
            issuer: None,
            netns: None,
            alg: "ES256".to_owned(),
            audience: DEFAULT_AUDIENCE.to_owned(),
            clients,
        }
    }
}

/// The answer of the token endpoint.
#[derive(Clone, Debug)]
pub struct TokenResponse {
    /// The HTTP status.
    pub status: u16,
    /// The JSON body (`access_token`... or `error`...).
    pub body: Value,
}

/// A running provider; dropping it kills the process.
pub struct OidcProvider {
    child: Child,
    issuer: String,
    kid: String,
    /// Protocol lines (`KEY`, `READY`, `ROTATED`) from stdout; in a mutex only so that the
    /// provider is `Sync` and can be lent to a thread in a namespace.
    lines: Mutex<Receiver<String>>,
    /// Everything the process wrote to stderr so far, for error messages.
    stderr: Arc<Mutex<String>>,
    clients: Vec<OidcClient>,
    clients_file: PathBuf,
}

impl std::fmt::Debug for OidcProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcProvider")
            .field("pid", &self.child.id())
            .field("issuer", &self.issuer)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl OidcProvider {
    /// Starts the provider and waits until it listens.
    pub fn start(options: &ProviderOptions) -> Result<Self> {
        let dir = assets_dir();
        ensure!(
            dir.join("node_modules/oidc-provider").is_dir(),
            "{}/node_modules is missing: run `cargo xtask setup` (npm ci) first",
            dir.display()
        );
        let clients_file = std::env::temp_dir().join(format!(
            "idgate-oidc-clients-{}-{}.json",
            std::process::id(),
            unique_id()
        ));
        let document = json!({
            "audience": options.audience,
            "clients": options.clients.iter().map(|c| json!({
                "client_id": c.client_id,
                "client_secret": c.client_secret,
                "groups": c.groups,
                "scope": c.scope,
                "ttl": c.ttl.as_secs().max(1),
                "username": c.username,
            })).collect::<Vec<_>>(),
        });
        std::fs::write(&clients_file, document.to_string())
            .with_context(|| format!("writing {}", clients_file.display()))?;

        let mut command = match &options.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "node"]);
                c
            }
            None => Command::new("node"),
        };
        command
            .current_dir(&dir)
            .arg(dir.join("server.mjs"))
            .arg("--clients")
            .arg(&clients_file)
            .args(["--listen", &options.listen, "--alg", &options.alg]);
        if let Some(issuer) = &options.issuer {
            command.args(["--issuer", issuer]);
        }
        let spawned = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_file(&clients_file);
                return Err(e).context("starting node (is Node.js installed?)");
            }
        };
        let stdout = child.stdout.take().context("the child's stdout")?;
        let mut stderr_pipe = child.stderr.take().context("the child's stderr")?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        thread::spawn(move || {
            let mut buf = [0; 4096];
            while let Ok(n @ 1..) = stderr_pipe.read(&mut buf) {
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let lines = forward_protocol_lines(stdout);

        // From here on, `provider` kills the child and removes the file if anything fails.
        let mut provider = Self {
            child,
            issuer: String::new(),
            kid: String::new(),
            lines: Mutex::new(lines),
            stderr,
            clients: options.clients.clone(),
            clients_file,
        };
        let deadline = Instant::now() + START_DEADLINE;
        provider.kid = provider.expect_line("KEY", deadline)?;
        provider.issuer = provider.expect_line("READY", deadline)?;
        Ok(provider)
    }

    /// The issuer identifier.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The key id new tokens are signed with.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The process id (of node; `ip netns exec` execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Mints an access token for a configured client with its own secret.
    pub fn token(&self, client_id: &str) -> Result<String> {
        self.token_with_scope(client_id, None)
    }

    /// Mints an access token for a configured client, asking for `scope`.
    pub fn token_with_scope(&self, client_id: &str, scope: Option<&str>) -> Result<String> {
        let client = self
            .clients
            .iter()
            .find(|c| c.client_id == client_id)
            .with_context(|| format!("no client {client_id} is configured"))?;
        let response = self.request_token(client_id, &client.client_secret, scope)?;
        ensure!(
            response.status == 200,
            "token endpoint answered {}: {}",
            response.status,
            response.body
        );
        response.body["access_token"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("no access_token in {}", response.body))
    }

    /// POSTs a client credentials request with these credentials (HTTP Basic) and returns the
    /// answer, whatever its status.
    pub fn request_token(
        &self,
        client_id: &str,
        client_secret: &str,
        scope: Option<&str>,
    ) -> Result<TokenResponse> {
        let mut body = "grant_type=client_credentials".to_owned();
        if let Some(scope) = scope {
            body.push_str("&scope=");
            body.push_str(&form_encode(scope));
        }
        let url = format!("{}/token", self.issuer);
        // A client per request: its I/O thread is spawned here, so it connects from the caller's
        // network namespace.
        let http = reqwest::blocking::Client::builder()
            // A proxy from the environment must not see loopback or namespace traffic.
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?;
        let response = http
            .post(&url)
            .basic_auth(form_encode(client_id), Some(form_encode(client_secret)))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .with_context(|| format!("POST {url}"))?;
        let status = response.status().as_u16();
        let text = response.text().with_context(|| format!("POST {url}"))?;
        let body = serde_json::from_str(&text)
            .with_context(|| format!("POST {url}: not JSON ({status}): {text}"))?;
        Ok(TokenResponse { status, body })
    }

    /// Rotates the signing key (SIGHUP) and waits for the confirmation; returns the new key id.
    /// New tokens are signed with it; the key set lists it first, then the previous keys.
    pub fn rotate(&mut self) -> Result<String> {
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: a plain system call; the child has not been waited for, so the pid is ours.
        let rc = unsafe { libc::kill(pid, libc::SIGHUP) };
        if rc != 0 {
            bail!("SIGHUP to {pid}: {}", std::io::Error::last_os_error());
        }
        let kid = self.expect_line("ROTATED", Instant::now() + ROTATE_DEADLINE)?;
        ensure!(kid != self.kid, "the rotated key id is the old one");
        self.kid = kid.clone();
        Ok(kid)
    }

    /// Waits for the next protocol line, which must be `<word> <value>`; returns the value.
    fn expect_line(&mut self, word: &str, deadline: Instant) -> Result<String> {
        let wait = deadline.saturating_duration_since(Instant::now());
        let lines = self.lines.get_mut().unwrap_or_else(|p| p.into_inner());
        let line = match lines.recv_timeout(wait) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => bail!(
                "the OpenID provider did not print {word} in time; stderr:\n{}",
                self.stderr()
            ),
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().map(|s| s.to_string());
                bail!(
                    "the OpenID provider exited ({}) before printing {word}; stderr:\n{}",
                    status.unwrap_or_else(|e| e.to_string()),
                    self.stderr()
                )
            }
        };
        match line.split_once(' ') {
            Some((w, value)) if w == word && !value.is_empty() => Ok(value.to_owned()),
            _ => bail!("expected {word} from the OpenID provider, got {line:?}"),
        }
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        // SIGKILL: nothing of the provider needs to survive, and it cannot ignore it.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.clients_file);
    }
}

/// Sends the protocol lines of the child's stdout to a channel; the channel closes at EOF. Other
/// lines (the library's notices) are dropped.
fn forward_protocol_lines(stdout: ChildStdout) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let protocol = ["KEY ", "READY ", "ROTATED "]
                .iter()
                .any(|p| line.starts_with(p));
            if protocol && tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// `application/x-www-form-urlencoded` for one value (RFC 6749 Appendix B, also for the Basic
/// credentials per §2.3.1).
fn form_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(char::from(b));
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The real provider as an [`Issuer`] for the session scenario: each (user, groups, lifetime) the
/// scenario asks for is one configured client, whose tokens carry the user as
/// `preferred_username` (the provider's `sub` is always the client id).
pub struct OidcIssuer {
    provider: Mutex<OidcProvider>,
    issuer: String,
    /// (user, groups, short-lived?) → client id.
    clients: Vec<(String, Vec<String>, bool, String)>,
}

/// Tokens asked for with at most this lifetime come from the short-lived clients.
const SHORT_TTL: Duration = Duration::from_secs(3);

impl OidcIssuer {
    /// Starts the provider (on `listen`, in `netns` if given) with a client per (user, groups),
    /// each in a normal (5 minutes) and a short-lived ([`SHORT_TTL`]) variant.
    pub fn start(listen: &str, netns: Option<&str>, users: &[(&str, &[&str])]) -> Result<Self> {
        let mut clients = Vec::new();
        let mut table = Vec::new();
        for (user, groups) in users {
            for short in [false, true] {
                let id = format!("{user}{}", if short { "-short" } else { "" });
                let mut client = OidcClient::new(&id, groups).with_username(user);
                if short {
                    client = client.with_ttl(SHORT_TTL);
                }
                clients.push(client);
                let groups = groups.iter().map(|g| (*g).to_owned()).collect();
                table.push(((*user).to_owned(), groups, short, id));
            }
        }
        let options = ProviderOptions {
            listen: listen.to_owned(),
            netns: netns.map(str::to_owned),
            ..ProviderOptions::loopback(clients)
        };
        let provider = OidcProvider::start(&options)?;
        Ok(Self {
            issuer: provider.issuer().to_owned(),
            provider: Mutex::new(provider),
            clients: table,
        })
    }
}

impl crate::idp::Issuer for OidcIssuer {
    fn issuer(&self) -> &str {
        &self.issuer
    }

    fn config_toml(&self) -> String {
        format!(
            "[[issuers]]\nissuer = \"{}\"\naudiences = [\"{DEFAULT_AUDIENCE}\"]\n\
             algorithms = [\"ES256\"]\nallow_http = true\nrequire_typ_at_jwt = true\n\
             user_claim = \"preferred_username\"\ngroup_claims = [{{ path = \"groups\" }}]\n",
            self.issuer
        )
    }

    fn mint(&self, user: &str, groups: &[&str], ttl: Duration) -> Result<String> {
        let short = ttl <= SHORT_TTL;
        let (.., id) = self
            .clients
            .iter()
            .find(|(u, g, s, _)| u == user && g.iter().eq(groups.iter()) && *s == short)
            .with_context(|| format!("no client stands for {user} {groups:?} (short: {short})"))?;
        self.provider
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .token(id)
    }

    fn rotate_keys(&self) -> Result<bool> {
        self.provider
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .rotate()?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::form_encode;

    #[test]
    fn form_encoding_escapes_reserved_bytes() {
        assert_eq!(form_encode("a b+c/d~é"), "a+b%2Bc%2Fd%7E%C3%A9");
        assert_eq!(form_encode("Az09-._*"), "Az09-._*");
    }
}
