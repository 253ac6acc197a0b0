//! The systemd notification protocol (`sd_notify(3)`), implemented here rather than linked from
//! libsystemd: one datagram of `KEY=value` lines to the unix socket named by `$NOTIFY_SOCKET`
//! (a path, or an abstract name when it starts with `@`). Without `$NOTIFY_SOCKET` (not started by
//! systemd with `Type=notify`) every call is a no-op.
//!
//! `idgate run` sends `STATUS=` lines while it starts, `READY=1` once the configuration is valid,
//! the programs are attached (and pinned) and every endpoint listens, `WATCHDOG=1` keep-alives
//! from the session sweeper (see [`Watchdog`]), and `STOPPING=1` when it shuts down.

use std::{
    env, io,
    os::unix::net::{SocketAddr, UnixDatagram},
    path::Path,
    time::{Duration, Instant},
};

/// Where notifications go; [`Notifier::from_env`] without `$NOTIFY_SOCKET` sends nothing.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// The notifier for `$NOTIFY_SOCKET`; a no-op one when it is unset, empty or unusable (the
    /// last is logged: a unit waiting for `READY=1` would otherwise time out without a hint).
    pub fn from_env() -> Notifier {
        match env::var_os("NOTIFY_SOCKET") {
            Some(s) if !s.is_empty() => match Notifier::to_socket(Path::new(&s)) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(socket = ?s, error = %e, "NOTIFY_SOCKET unusable; not notifying systemd");
                    Notifier::disabled()
                }
            },
            _ => Notifier::disabled(),
        }
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier { target: None }
    }

    /// A notifier for an explicit socket: a filesystem path, or `@name` for an abstract socket.
    pub fn to_socket(socket: &Path) -> io::Result<Notifier> {
        let addr = socket_addr(socket)?;
        let sock = UnixDatagram::unbound()?;
        Ok(Notifier {
            target: Some((sock, addr)),
        })
    }

    /// Whether notifications are sent anywhere.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `state` (newline-separated `KEY=value` assignments) as one datagram.
    pub fn send(&self, state: &str) -> io::Result<()> {
        match &self.target {
            Some((sock, addr)) => sock.send_to_addr(state.as_bytes(), addr).map(|_| ()),
            None => Ok(()),
        }
    }

    /// [`Notifier::send`], logging (at debug) instead of failing: a notification that cannot be
    /// delivered must not stop the daemon.
    pub fn notify(&self, state: &str) {
        if let Err(e) = self.send(state) {
            tracing::debug!(error = %e, state, "sd_notify failed");
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.notify(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// A `STATUS=` line.
    pub fn status(&self, status: &str) {
        self.notify(&format!("STATUS={}", one_line(status)));
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&self, status: &str) {
        self.notify(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
    }
}

/// Status text on one line (a newline would start a new assignment).
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

fn socket_addr(socket: &Path) -> io::Result<SocketAddr> {
    use std::os::{linux::net::SocketAddrExt as _, unix::ffi::OsStrExt as _};
    let bytes = socket.as_os_str().as_bytes();
    match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None if bytes.starts_with(b"/") => SocketAddr::from_pathname(socket),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NOTIFY_SOCKET is neither an absolute path nor an abstract name (@...)",
        )),
    }
}

/// The watchdog interval systemd asked for (`$WATCHDOG_USEC`), if it is meant for this process
/// (`$WATCHDOG_PID` unset or ours).
pub fn watchdog_timeout() -> Option<Duration> {
    watchdog_timeout_from(
        env::var("WATCHDOG_USEC").ok().as_deref(),
        env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn watchdog_timeout_from(usec: Option<&str>, pid: Option<&str>, own: u32) -> Option<Duration> {
    if let Some(pid) = pid
        && pid.trim().parse::<u32>().ok() != Some(own)
    {
        return None;
    }
    let usec = usec?.trim().parse::<u64>().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec))
}

/// `WATCHDOG=1` keep-alives at half the watchdog timeout, sent by whoever calls [`Watchdog::tick`]:
/// the daemon calls it from the session sweeper, after each sweep, so a sweeper that is stuck (a
/// wedged session lock, a starved runtime) stops the pings and systemd restarts the service.
/// Pings come at most as often as the caller ticks (the sweeper: every second), so a watchdog
/// timeout under two seconds is not served.
#[derive(Debug)]
pub struct Watchdog {
    notifier: Notifier,
    every: Duration,
    last: Option<Instant>,
}

impl Watchdog {
    /// From `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`; `None` if no watchdog is
    /// wanted.
    pub fn from_env() -> Option<Watchdog> {
        let timeout = watchdog_timeout()?;
        let notifier = Notifier::from_env();
        notifier
            .is_enabled()
            .then(|| Watchdog::new(notifier, timeout))
    }

    /// Pings through `notifier` at half of `timeout`.
    pub fn new(notifier: Notifier, timeout: Duration) -> Watchdog {
        Watchdog {
            notifier,
            every: timeout / 2,
            last: None,
        }
    }

    /// Sends `WATCHDOG=1` if half the timeout has passed since the last one (or none was sent).
    pub fn tick(&mut self) {
        let now = Instant::now();
        if self
            .last
            .is_none_or(|l| now.duration_since(l) >= self.every)
        {
            self.notifier.notify("WATCHDOG=1");
            self.last = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8(buf[..n].to_vec()).expect("utf-8")
    }

    #[test]
    fn sends_to_a_path_socket() {
        let dir = std::env::temp_dir().join(format!("idgate-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let n = Notifier::to_socket(&path).unwrap();
        n.status("loading\nthe data plane");
        assert_eq!(recv(&server), "STATUS=loading the data plane");
        n.ready("running");
        assert_eq!(recv(&server), "READY=1\nSTATUS=running");
        n.stopping("bye");
        assert_eq!(recv(&server), "STOPPING=1\nSTATUS=bye");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("idgate-notify-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let n = Notifier::to_socket(Path::new(&format!("@{name}"))).unwrap();
        let mut w = Watchdog::new(n, Duration::from_secs(3600));
        w.tick();
        assert_eq!(recv(&server), "WATCHDOG=1");
        // Not due again for half an hour: nothing sent.
        w.tick();
        server.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        assert!(server.recv(&mut buf).is_err());
    }

    #[test]
    fn disabled_and_bad_sockets() {
        assert!(Notifier::disabled().send("READY=1").is_ok());
        assert!(Notifier::to_socket(Path::new("relative.sock")).is_err());
        // Nobody listens: an error to the caller, never a panic.
        let n = Notifier::to_socket(Path::new("/nonexistent/idgate/notify.sock")).unwrap();
        assert!(n.send("READY=1").is_err());
        n.ready("ignored");
    }

    #[test]
    fn watchdog_env() {
        assert_eq!(
            watchdog_timeout_from(Some("30000000"), None, 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_timeout_from(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(watchdog_timeout_from(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_timeout_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_timeout_from(Some("x"), None, 7), None);
        assert_eq!(watchdog_timeout_from(None, None, 7), None);
    }
}
