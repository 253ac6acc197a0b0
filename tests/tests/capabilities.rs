//! The fewest capabilities `idgate run` needs, measured: the real daemon (the `idgate-run` binary
//! of this crate, i.e. `idgate run`) is started in a network namespace as uid/gid 65534 with
//! exactly a given capability set (inheritable, ambient and bounding: `setpriv`), with
//! `RLIMIT_MEMLOCK` 0, attaching XDP to a veth and pinning under /sys/fs/bpf. It counts as working
//! when it sends `READY=1` to a `$NOTIFY_SOCKET` this test binds (which also checks the sd_notify
//! path end to end: `READY=1`, `WATCHDOG=1`, `STOPPING=1`, exit 0 on SIGTERM).
//!
//! Asserted: CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON works, on a fresh start and on a restart over
//! existing pins; each set with one of them removed fails (CAP_SYS_ADMIN is never granted). The
//! unit (packaging/idgate.service) grants exactly this set. Run with `--nocapture` for the table.
//!
//! Needs root (to create the namespace, the pin directory and drop to uid 65534), `nsenter`,
//! `setpriv` and `prlimit` (util-linux). `nsenter --net`, not `ip netns exec`: the latter remounts
//! /sys, hiding the bpffs at /sys/fs/bpf.

use std::{
    fs,
    os::unix::{fs::PermissionsExt as _, net::UnixDatagram},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use idgate_tests::{
    netns::{NetNs, run_cmd, unique_id},
    run::require_root,
};

const NOBODY: &str = "65534";
const START_WITHIN: Duration = Duration::from_secs(30);

struct Fixture {
    ns: NetNs,
    dir: PathBuf,
    bpf_dir: PathBuf,
    notify: UnixDatagram,
    config: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let id = format!("{}-{}", std::process::id(), unique_id());
        let ns = NetNs::new(&format!("idgcap-{id}")).expect("a namespace");
        ns.ip(&[
            "link", "add", "cap0", "type", "veth", "peer", "name", "cap1",
        ])
        .expect("a veth pair");
        ns.ip(&["link", "set", "cap0", "up"]).expect("cap0 up");
        ns.ip(&["link", "set", "cap1", "up"]).expect("cap1 up");

        let dir = std::env::temp_dir().join(format!("idgate-cap-{id}"));
        fs::create_dir_all(&dir).expect("a temp dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).expect("chmod");
        // systemd mounts bpffs at boot; where nothing has yet (a fresh VM, this test run first),
        // mount it as the host would, since the unprivileged agent cannot.
        let mounts = fs::read_to_string("/proc/mounts").expect("/proc/mounts");
        if !mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
        {
            run_cmd("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"]).expect("mounting bpffs");
        }
        let bpf_dir = PathBuf::from(format!("/sys/fs/bpf/idgate-cap-{id}"));
        fs::create_dir_all(&bpf_dir).expect("a directory on bpffs");
        run_cmd("chown", &[&format!("{NOBODY}:{NOBODY}"), path(&bpf_dir)]).expect("chown");

        let sock = dir.join("notify.sock");
        let notify = UnixDatagram::bind(&sock).expect("the notify socket");
        fs::set_permissions(&sock, fs::Permissions::from_mode(0o666)).expect("chmod");
        notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("a read timeout");

        let config = dir.join("idgate.toml");
        fs::write(
            &config,
            format!(
                r#"
[dataplane]
interfaces = [{{ name = "cap0", mode = "xdp" }}]
pin_dir = "{pins}"
session_state = "{state}"

[[services]]
name = "web"
protocol = "tcp"
port = 8000

# Nothing listens here: the daemon starts anyway (tokens refused until the keys come).
[[issuers]]
issuer = "http://127.0.0.1:9/"
audiences = ["idgate"]
allow_http = true

[session_endpoint]
listen = "127.0.0.1:8443"

[admin]
socket = "{admin}"

[policy]
default = "drop"
"#,
                pins = bpf_dir.join("pins").display(),
                admin = dir.join("admin.sock").display(),
                state = dir.join("sessions.jsonl").display(),
            ),
        )
        .expect("the configuration");
        fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).expect("chmod");
        Fixture {
            ns,
            dir,
            bpf_dir,
            notify,
            config,
        }
    }

    fn pins(&self) -> PathBuf {
        self.bpf_dir.join("pins")
    }

    fn clear_pins(&self) {
        if self.pins().exists() {
            idgate::dataplane::cleanup(&self.pins()).expect("cleanup of the pins");
        }
    }

    fn spawn(&self, caps: &[&str]) -> Child {
        let list: String = caps.iter().map(|c| format!(",+{c}")).collect();
        let set = format!("-all{list}");
        let stderr = fs::File::create(self.dir.join("stderr")).expect("a log file");
        Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.ns.name()))
            .args(["prlimit", "--memlock=0:0", "setpriv"])
            .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
            .args(["--inh-caps", &set, "--ambient-caps", &set])
            .args(["--bounding-set", &set, "--"])
            .arg(env!("CARGO_BIN_EXE_idgate-run"))
            .arg("--config")
            .arg(&self.config)
            .env("NOTIFY_SOCKET", self.dir.join("notify.sock"))
            .env("WATCHDOG_USEC", "2000000")
            .env_remove("WATCHDOG_PID")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("starting nsenter/setpriv/idgate-run")
    }

    fn recv(&self) -> Option<String> {
        let mut buf = [0u8; 4096];
        let n = self.notify.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Runs the daemon with `caps`: `Ok(())` if it became ready (then stopped cleanly), else the
    /// error it exited with.
    fn attempt(&self, caps: &[&str]) -> Result<(), String> {
        while self.recv().is_some() {}
        let mut child = self.spawn(caps);
        let deadline = Instant::now() + START_WITHIN;
        let ready = loop {
            if let Some(msg) = self.recv() {
                if msg.lines().any(|l| l == "READY=1") {
                    break true;
                }
                continue;
            }
            if let Some(status) = child.try_wait().expect("waiting for the daemon") {
                let log = fs::read_to_string(self.dir.join("stderr")).unwrap_or_default();
                let error = log
                    .lines()
                    .rev()
                    .find(|l| l.starts_with("error: "))
                    .unwrap_or("(no error line)")
                    .to_owned();
                break Err(format!("{status}: {error}"))?;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("neither READY=1 nor an exit within {START_WITHIN:?}");
            }
        };
        assert!(ready);
        // The watchdog: WATCHDOG_USEC is 2 s, so a ping at least every second (sweeper ticks).
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut pinged = false;
        while Instant::now() < deadline && !pinged {
            pinged = self.recv().is_some_and(|m| m == "WATCHDOG=1");
        }
        run_cmd("kill", &["-TERM", &child.id().to_string()]).expect("kill -TERM");
        let status = child.wait().expect("waiting for the daemon");
        let mut stopping = false;
        while let Some(m) = self.recv() {
            stopping |= m.lines().any(|l| l == "STOPPING=1");
        }
        assert!(
            pinged,
            "no WATCHDOG=1 within 5 s of READY=1 (caps {caps:?})"
        );
        assert!(stopping, "no STOPPING=1 on SIGTERM (caps {caps:?})");
        assert!(
            status.success(),
            "exit on SIGTERM: {status} (caps {caps:?})"
        );
        Ok(())
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.clear_pins();
        let _ = fs::remove_dir(&self.bpf_dir);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

#[test]
fn fewest_capabilities() {
    require_root();
    let fx = Fixture::new();
    const MINIMAL: [&str; 3] = ["bpf", "net_admin", "perfmon"];
    let mut table = Vec::new();
    let mut record = |what: String, result: &Result<(), String>| {
        table.push(format!(
            "{what:<44} {}",
            match result {
                Ok(()) => "READY".to_owned(),
                Err(e) => format!("fails: {e}"),
            }
        ));
    };

    fx.clear_pins();
    let fresh = fx.attempt(&MINIMAL);
    record(format!("{MINIMAL:?} (fresh)"), &fresh);
    let restart = fx.attempt(&MINIMAL);
    record(format!("{MINIMAL:?} (restart over pins)"), &restart);

    let mut smaller = Vec::new();
    for drop in MINIMAL {
        let caps: Vec<&str> = MINIMAL.into_iter().filter(|c| *c != drop).collect();
        fx.clear_pins();
        let result = fx.attempt(&caps);
        record(format!("{caps:?} (fresh, without {drop})"), &result);
        smaller.push((drop, result));
    }
    fx.clear_pins();
    let none = fx.attempt(&[]);
    record("[] (fresh)".to_owned(), &none);

    eprintln!("capabilities of `idgate run` (uid 65534, RLIMIT_MEMLOCK 0):");
    for line in &table {
        eprintln!("  {line}");
    }
    assert_eq!(fresh, Ok(()), "the minimal set must start the daemon");
    assert_eq!(restart, Ok(()), "the minimal set must restart over pins");
    for (drop, result) in smaller {
        assert!(result.is_err(), "works without CAP_{drop}: not minimal");
    }
    assert!(none.is_err());
}
