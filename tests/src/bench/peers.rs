//! The peers idgate is measured against, and the tools that load them: packages from apt,
//! nftables and iptables rule sets, a bare `XDP_DROP` program, HAProxy with `jwt_verify`, a small
//! HTTP server, wrk and iperf3. Every piece that changes the system is a guard undoing it on drop.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aws_lc_rs::{
    encoding::{AsDer as _, PublicKeyX509Der},
    rand::SystemRandom,
    rsa::KeySize,
    signature::{KeyPair as _, RSA_PKCS1_SHA256, RsaKeyPair},
};
use base64::{
    Engine as _,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use idgate::dataplane::{
    AttachMode, Attached, Dataplane, Expiry, LoadOptions, Protocol, Service, ServiceAction,
    ServiceId, Session,
};
use serde_json::json;

use crate::netns::{NetNs, run_cmd};

/// Packages the suite needs, installed with apt when missing.
pub const PACKAGES: &[&str] = &[
    "nftables", "iptables", "haproxy", "wrk", "iperf3", "ethtool",
];

/// Installs whichever of [`PACKAGES`] are missing (`dpkg -s` first: quick when all are there).
pub fn ensure_installed() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg")
                .args(["-s", p])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {}", missing.join(" "));
    run_cmd("apt-get", &["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(missing);
    let out = Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()?;
    ensure!(
        out.status.success(),
        "apt-get install failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Rules loaded into the server's namespace, flushed on drop.
pub struct Rules<'a> {
    ns: &'a NetNs,
    undo: Vec<Vec<String>>,
}

impl<'a> Rules<'a> {
    /// Loads an nftables rule set (text for `nft -f`).
    pub fn nft(ns: &'a NetNs, ruleset: &str) -> Result<Rules<'a>> {
        nft_file(ns, ruleset)?;
        Ok(Rules {
            ns,
            undo: vec![vec!["nft".into(), "flush".into(), "ruleset".into()]],
        })
    }

    /// Loads iptables-legacy rules (text for `iptables-legacy-restore`).
    pub fn iptables(ns: &'a NetNs, rules: &str) -> Result<Rules<'a>> {
        restore(ns, rules)?;
        let mut undo = Vec::new();
        for table in ["raw", "filter"] {
            undo.push(vec![
                "iptables-legacy".into(),
                "-t".into(),
                table.into(),
                "-F".into(),
            ]);
            undo.push(vec![
                "iptables-legacy".into(),
                "-t".into(),
                table.into(),
                "-X".into(),
            ]);
        }
        Ok(Rules { ns, undo })
    }
}

impl Drop for Rules<'_> {
    fn drop(&mut self) {
        for cmd in &self.undo {
            let args: Vec<&str> = cmd[1..].iter().map(String::as_str).collect();
            if let Err(e) = self.ns.exec(&cmd[0], &args) {
                eprintln!("warning: undoing rules: {e:#}");
            }
        }
    }
}

/// Runs `nft -f` on `text` inside `ns`.
pub fn nft_file(ns: &NetNs, text: &str) -> Result<Duration> {
    let path = tmp_path("nft");
    std::fs::write(&path, text)?;
    let start = Instant::now();
    let r = ns.exec("nft", &["-f", path.to_str().unwrap_or_default()]);
    let took = start.elapsed();
    let _ = std::fs::remove_file(&path);
    r?;
    Ok(took)
}

/// Runs `iptables-legacy-restore --noflush` on `text` inside `ns`; returns how long it took.
pub fn restore(ns: &NetNs, text: &str) -> Result<Duration> {
    let path = tmp_path("ipt");
    std::fs::write(&path, text)?;
    let start = Instant::now();
    let r = ns.exec(
        "sh",
        &[
            "-c",
            &format!("iptables-legacy-restore --noflush < {}", path.display()),
        ],
    );
    let took = start.elapsed();
    let _ = std::fs::remove_file(&path);
    r?;
    Ok(took)
}

fn tmp_path(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "idgate-bench-{}-{}-{what}",
        std::process::id(),
        crate::netns::unique_id()
    ))
}

/// nftables: drop TCP to `port` at the netdev ingress hook of `iface`.
pub fn nft_netdev_drop(iface: &str, port: u16) -> String {
    format!(
        "table netdev bench {{\n chain ingress {{\n  type filter hook ingress device \"{iface}\" \
         priority 0; policy accept;\n  ip protocol tcp tcp dport {port} drop\n }}\n}}\n"
    )
}

/// nftables as a user protects a port for a list of addresses: an address set in the inet
/// input chain; `ports` open to the set, dropped for everyone else.
pub fn nft_address_set(ports: &[u16], allowed: &[Ipv4Addr]) -> String {
    let ports = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let elements = if allowed.is_empty() {
        String::new()
    } else {
        format!(
            "  elements = {{ {} }}\n",
            allowed
                .iter()
                .map(Ipv4Addr::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    format!(
        "table inet bench {{\n set allowed {{\n  type ipv4_addr\n  flags interval\n{elements} }}\n \
         chain input {{\n  type filter hook input priority 0; policy accept;\n  \
         tcp dport {{ {ports} }} ip saddr @allowed accept\n  tcp dport {{ {ports} }} drop\n }}\n}}\n"
    )
}

/// iptables-legacy: drop TCP to `port` in the raw table's PREROUTING (before conntrack).
pub fn iptables_raw_drop(port: u16) -> String {
    format!("*raw\n-A PREROUTING -p tcp --dport {port} -j DROP\nCOMMIT\n")
}

/// iptables-legacy: drop new TCP connections to `port` in INPUT, through conntrack.
pub fn iptables_conntrack_drop(port: u16) -> String {
    format!("*filter\n-A INPUT -p tcp --dport {port} -m conntrack --ctstate NEW -j DROP\nCOMMIT\n")
}

/// An fwknop-style chain: one ACCEPT rule per authorized address, then a DROP, jumped to from
/// INPUT for `port`.
pub fn iptables_fwknop_chain(port: u16, allowed: &[Ipv4Addr]) -> String {
    let mut s = String::from("*filter\n:FWKNOP - [0:0]\n");
    s.push_str(&format!("-A INPUT -p tcp --dport {port} -j FWKNOP\n"));
    for a in allowed {
        s.push_str(&format!(
            "-A FWKNOP -s {a}/32 -p tcp --dport {port} -j ACCEPT\n"
        ));
    }
    s.push_str("-A FWKNOP -j DROP\nCOMMIT\n");
    s
}

/// A minimal XDP program, `r0 = XDP_DROP; exit`, attached through a BPF link: the floor every
/// XDP filter is held to. Detached when dropped (closing the link).
pub struct BareXdpDrop {
    _prog: OwnedFd,
    _link: OwnedFd,
}

impl BareXdpDrop {
    /// Loads the program and attaches it to `iface` of the calling thread's namespace, in
    /// native (driver) mode.
    pub fn attach(iface: &str) -> Result<BareXdpDrop> {
        const BPF_PROG_LOAD: i64 = 5;
        const BPF_LINK_CREATE: i64 = 28;
        const BPF_PROG_TYPE_XDP: u32 = 6;
        const BPF_XDP: u32 = 37;
        const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
        // mov64 r0, 1 (XDP_DROP); exit.
        let insns: [u64; 2] = [
            u64::from_le_bytes([0xb7, 0x00, 0, 0, 1, 0, 0, 0]),
            u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
        ];
        let license = c"GPL";
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&BPF_PROG_TYPE_XDP.to_ne_bytes());
        attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        // prog_name at offset 48 (after log_*, kern_version, prog_flags).
        attr[48..56].copy_from_slice(b"bench_xd");
        attr[68..72].copy_from_slice(&BPF_XDP.to_ne_bytes());
        let prog = bpf(BPF_PROG_LOAD, &mut attr).context("loading the bare XDP_DROP program")?;
        let name = std::ffi::CString::new(iface)?;
        // SAFETY: a NUL-terminated name that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        ensure!(ifindex != 0, "no interface {iface}");
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        attr[8..12].copy_from_slice(&BPF_XDP.to_ne_bytes());
        attr[12..16].copy_from_slice(&XDP_FLAGS_DRV_MODE.to_ne_bytes());
        let link =
            bpf(BPF_LINK_CREATE, &mut attr).context("attaching the bare XDP_DROP program")?;
        Ok(BareXdpDrop {
            _prog: prog,
            _link: link,
        })
    }
}

fn bpf(cmd: i64, attr: &mut [u8; 128]) -> Result<OwnedFd> {
    // SAFETY: `attr` is a zero-padded bpf_attr of the size passed; pointers in it outlive the
    // call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        bail!("bpf({cmd}): {}", std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor the kernel just returned.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The service id idgate's benchmarks protect ports under.
pub fn service(id: u32, port: u16) -> Result<Service> {
    Ok(Service {
        id: ServiceId::new(id)?,
        protocol: Protocol::Tcp,
        port,
        action: ServiceAction::Drop,
    })
}

/// idgate's data plane loaded with `ports` protected, attached to `ifaces` of `ns` in `mode`,
/// with a session for each of `allowed` on every port.
pub struct Idgate {
    /// The data plane (detached when dropped).
    pub dp: Dataplane,
    /// How it ended up attached.
    pub attached: Attached,
    /// The protected services.
    pub services: Vec<Service>,
}

impl Idgate {
    /// Loads and attaches.
    pub fn start(
        ns: &NetNs,
        ifaces: &[&str],
        mode: AttachMode,
        ports: &[u16],
        allowed: &[Ipv4Addr],
        max_sessions: u32,
    ) -> Result<Idgate> {
        let mut dp = Dataplane::load(LoadOptions {
            max_sessions,
            ..LoadOptions::default()
        })?;
        let services = ports
            .iter()
            .enumerate()
            .map(|(i, p)| service(i as u32 + 1, *p))
            .collect::<Result<Vec<_>>>()?;
        dp.set_services(&services)?;
        let mut sessions = Vec::new();
        for a in allowed {
            for s in &services {
                sessions.push(Session {
                    source: (*a).into(),
                    service: s.id,
                    expires: Expiry::after(Duration::from_secs(3600)),
                    identity_id: 1,
                    rule_id: 1,
                    idle: None,
                });
            }
        }
        for chunk in sessions.chunks(65_536) {
            dp.upsert_sessions(chunk)?;
        }
        let mut attached = Attached::Tc;
        for iface in ifaces {
            attached = ns.run_in(|| dp.attach(iface, mode))?;
        }
        Ok(Idgate {
            dp,
            attached,
            services,
        })
    }
}

/// A one-thread HTTP/1.1 server answering `hello\n` to every request, pinned to a CPU, inside
/// a namespace. Stops on drop.
pub struct HttpServer {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl HttpServer {
    /// Serves on `addr` in `ns`, pinned to `cpu`.
    pub fn start(ns: &NetNs, addr: SocketAddr, cpu: usize) -> Result<HttpServer> {
        let listener = ns.run_in(|| std::net::TcpListener::bind(addr))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::Builder::new()
            .name("bench-http".into())
            .spawn(move || {
                let _ = super::cpu::pin(0, cpu);
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the HTTP server's runtime");
                rt.block_on(serve_http(listener, flag));
            })?;
        Ok(HttpServer {
            stop,
            thread: Some(thread),
        })
    }
}

async fn serve_http(listener: std::net::TcpListener, stop: Arc<AtomicBool>) {
    use hyper::{Response, server::conn::http1, service::service_fn};
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    while !stop.load(Ordering::Relaxed) {
        let accepted = tokio::time::timeout(Duration::from_millis(100), listener.accept()).await;
        let Ok(Ok((stream, _))) = accepted else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = service_fn(|_req| async {
                Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                    bytes::Bytes::from_static(b"hello\n"),
                )))
            });
            let _ = http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An RS256 signer (the algorithm the test IdP signs with) and its public key as a PEM file,
/// for HAProxy's `jwt_verify`.
pub struct Jwt {
    key: RsaKeyPair,
    /// The public key (SubjectPublicKeyInfo PEM).
    pub pem: PathBuf,
}

impl Jwt {
    /// A fresh key; its public half written under `dir`.
    pub fn new(dir: &Path) -> Result<Jwt> {
        let key = RsaKeyPair::generate(KeySize::Rsa2048)?;
        let der: PublicKeyX509Der<'static> = key.public_key().as_der()?;
        let b64 = STANDARD.encode(der.as_ref());
        let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line)?);
            pem.push('\n');
        }
        pem.push_str("-----END PUBLIC KEY-----\n");
        std::fs::create_dir_all(dir)?;
        let path = dir.join("jwt-pub.pem");
        std::fs::write(&path, pem)?;
        Ok(Jwt { key, pem: path })
    }

    /// A token for `sub`, valid for an hour.
    pub fn token(&self, sub: &str) -> String {
        let now = crate::idp::now_secs();
        let header = json!({"alg": "RS256", "typ": "at+jwt", "kid": "bench"});
        let claims = json!({"iss": "https://idp.bench", "aud": "idgate", "sub": sub,
            "groups": ["web"], "iat": now, "exp": now + 3600});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut sig = vec![0; self.key.public_modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .expect("RSA signing");
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }
}

/// HAProxy in front of a backend, checking a JWT on every request; killed on drop.
pub struct Haproxy {
    child: Child,
    cfg: PathBuf,
}

impl Haproxy {
    /// Starts HAProxy in `ns` (pinned to `cpu`, one thread) on `front`, forwarding to `back`
    /// what carries a valid RS256 bearer token for `pem`.
    pub fn start(
        ns: &NetNs,
        front: SocketAddr,
        back: SocketAddr,
        pem: &Path,
        cpu: usize,
    ) -> Result<Haproxy> {
        let cfg = tmp_path("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  nbthread 1\n  maxconn 4000\n\
                 defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  \
                 timeout server 30s\n\
                 frontend api\n  bind {front}\n  \
                 http-request set-var(txn.bearer) http_auth_bearer\n  \
                 http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')\n  \
                 http-request deny unless {{ var(txn.alg) -m str RS256 }}\n  \
                 http-request deny unless {{ var(txn.bearer),jwt_verify(txn.alg,\"{pem}\") -m int 1 }}\n  \
                 default_backend app\n\
                 backend app\n  http-reuse always\n  server app {back}\n",
                pem = pem.display()
            ),
        )?;
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns.name(),
                "taskset",
                "-c",
                &cpu.to_string(),
            ])
            .args(["haproxy", "-db", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting haproxy")?;
        let mut h = Haproxy { child, cfg };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = h.child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = h.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                bail!("haproxy exited ({status}): {err}");
            }
            if ns
                .run_in(|| TcpStream::connect_timeout(&front, Duration::from_millis(200)))
                .is_ok()
            {
                return Ok(h);
            }
            if Instant::now() > deadline {
                bail!("haproxy did not listen on {front} within 10 s");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.cfg);
    }
}

/// One `GET /` with an optional bearer token, from `ns`; returns the status code.
pub fn http_status(ns: &NetNs, addr: SocketAddr, token: Option<&str>) -> Result<u16> {
    ns.run_in(|| -> Result<u16> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        write!(
            s,
            "GET / HTTP/1.1\r\nHost: bench\r\n{auth}Connection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("no HTTP status in {answer:?}"))
    })
}

/// What one wrk run measured.
#[derive(Clone, Copy, Debug)]
pub struct WrkResult {
    /// Requests per second.
    pub rps: f64,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: f64,
    /// Non-2xx answers and socket errors.
    pub errors: u64,
}

/// Runs wrk from `ns` pinned to `cpu` against `url` for `window`, with `conns` connections;
/// `close` makes every request a new connection.
pub fn wrk(
    ns: &NetNs,
    url: &str,
    window: Duration,
    conns: u32,
    close: bool,
    token: Option<&str>,
    cpu: usize,
) -> Result<WrkResult> {
    let secs = format!("{}s", window.as_secs().max(1));
    let conns = conns.to_string();
    let cpu = cpu.to_string();
    let mut args = vec![
        "taskset",
        "-c",
        &cpu,
        "wrk",
        "-t1",
        "-c",
        &conns,
        "-d",
        &secs,
        "--latency",
    ];
    let auth;
    if let Some(t) = token {
        auth = format!("Authorization: Bearer {t}");
        args.extend(["-H", &auth]);
    }
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    let out = ns.exec(args[0], &args[1..])?;
    parse_wrk(&out)
}

fn parse_wrk(out: &str) -> Result<WrkResult> {
    let rps = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{out}"))?;
    let p99_ms = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(|v| latency_ms(v.trim()))
        .unwrap_or(f64::NAN);
    let mut errors = 0;
    for l in out.lines() {
        let l = l.trim();
        if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            errors += v.trim().parse::<u64>().unwrap_or(0);
        }
        if let Some(v) = l.strip_prefix("Socket errors:") {
            errors += v
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    Ok(WrkResult {
        rps,
        p99_ms,
        errors,
    })
}

fn latency_ms(v: &str) -> f64 {
    let split = v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => f64::NAN,
    }
}

/// An iperf3 server in `ns` on `port`, pinned to `cpu`; killed on drop.
pub struct Iperf3Server {
    child: Child,
}

impl Iperf3Server {
    /// Starts it and waits until it listens.
    pub fn start(ns: &NetNs, addr: SocketAddr, cpu: usize) -> Result<Iperf3Server> {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns.name(),
                "taskset",
                "-c",
                &cpu.to_string(),
            ])
            .args(["iperf3", "-s", "-B", &addr.ip().to_string(), "-p"])
            .arg(addr.port().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s")?;
        let s = Iperf3Server { child };
        let deadline = Instant::now() + Duration::from_secs(5);
        while ns
            .exec("ss", &["-Hltn", &format!("sport = :{}", addr.port())])?
            .trim()
            .is_empty()
        {
            ensure!(Instant::now() < deadline, "iperf3 did not listen");
            thread::sleep(Duration::from_millis(20));
        }
        Ok(s)
    }
}

impl Drop for Iperf3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// iperf3 from `ns` to `addr` for `window`; returns the received throughput in Gbit/s.
pub fn iperf3(ns: &NetNs, addr: SocketAddr, window: Duration, cpu: usize) -> Result<f64> {
    let out = ns.exec(
        "taskset",
        &[
            "-c",
            &cpu.to_string(),
            "iperf3",
            "-c",
            &addr.ip().to_string(),
            "-p",
            &addr.port().to_string(),
            "-t",
            &window.as_secs().max(1).to_string(),
            "-J",
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("no throughput in iperf3's output")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let out = "Running 2s test @ http://192.0.2.1:8000/\n  Latency Distribution\n     50%  \
                   120.00us\n     99%    1.50ms\n  20000 requests in 2.00s\n  \
                   Socket errors: connect 0, read 3, write 0, timeout 1\n  \
                   Non-2xx or 3xx responses: 2\nRequests/sec:  10000.50\n";
        let r = parse_wrk(out).unwrap();
        assert_eq!(r.rps, 10000.5);
        assert_eq!(r.p99_ms, 1.5);
        assert_eq!(r.errors, 6);
    }

    #[test]
    fn fwknop_chain_has_one_rule_per_address_and_a_drop() {
        let s = iptables_fwknop_chain(8000, &[Ipv4Addr::new(192, 0, 2, 9); 3]);
        assert_eq!(s.matches("-j ACCEPT").count(), 3);
        assert!(s.contains("-A FWKNOP -j DROP"));
    }
}
