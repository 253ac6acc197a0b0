//! Benchmark 5: revocation. The time from `sessions revoke` (the admin API's `DELETE
//! /v1/sessions?source=`) and from a token's expiry to the first dropped packet of a client
//! sending continuously, observed at the server (a packet socket sees what XDP let through).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, ensure};
use hyper::Method;

use super::{Goal, Outcome, Plan, Table, quantile, traffic::PacketSocket};
use crate::{
    daemon::{Daemon, ENDPOINT, PROTECTED, config},
    idp::{Issuer as _, TestCa, TestIdp},
    netns::{Pair, unique_id},
    packet::{Spec, tcp_flags},
};

/// One packet every this often from the client.
const INTERVAL: Duration = Duration::from_micros(100);

/// Send times (monotonic, wall) by sequence number.
type Sent = Arc<Mutex<Vec<(Instant, SystemTime)>>>;

/// A client sending numbered SYNs to the protected port and a sniffer at the server noting the
/// highest number it saw; both stop on [`Probe::finish`].
struct Probe {
    stop: Arc<AtomicBool>,
    last_seen: Arc<AtomicU32>,
    sent: Sent,
    threads: Vec<std::thread::JoinHandle<Result<()>>>,
}

impl Probe {
    fn start(pair: &Pair) -> Result<Probe> {
        let stop = Arc::new(AtomicBool::new(false));
        let last_seen = Arc::new(AtomicU32::new(0));
        let sent: Sent = Arc::new(Mutex::new(Vec::new()));
        let src_mac = super::topo::Topology::mac(&pair.cli, &pair.cli_if)?;
        let dst_mac = super::topo::Topology::mac(&pair.srv, &pair.srv_if)?;
        let (flag, seen, srv_if) = (stop.clone(), last_seen.clone(), pair.srv_if.clone());
        let sniffer = pair.srv.spawn_in(move || -> Result<()> {
            let sock = PacketSocket::open(&srv_if, true)?;
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                let Some(n) = sock.recv(&mut buf) else {
                    continue;
                };
                // Ethernet + IPv4 (no options) + TCP: dport at 36, seq at 38, flags at 47.
                if n >= 54
                    && buf[23] == 6
                    && u16::from_be_bytes([buf[36], buf[37]]) == PROTECTED
                    && buf[47] & tcp_flags::SYN != 0
                {
                    let seq = u32::from_be_bytes([buf[38], buf[39], buf[40], buf[41]]);
                    seen.fetch_max(seq, Ordering::Relaxed);
                }
            }
            Ok(())
        });
        // The sniffer's socket must be open before the first packet.
        std::thread::sleep(Duration::from_millis(50));
        let (flag, log, cli_if) = (stop.clone(), sent.clone(), pair.cli_if.clone());
        let sender = pair.cli.spawn_in(move || -> Result<()> {
            super::cpu::pin(0, super::topo::GEN_CPU)?;
            let sock = PacketSocket::open(&cli_if, false)?;
            let spec = Spec::syn(Pair::cli_addr(false), Pair::srv_addr(false), PROTECTED)
                .with_sport(40_123);
            let start = Instant::now();
            // Sequence numbers start at 1: 0 means "nothing seen yet".
            let mut seq: u32 = 1;
            while !flag.load(Ordering::Relaxed) {
                let due = start + INTERVAL * seq;
                while Instant::now() < due {
                    std::hint::spin_loop();
                }
                let mut frame = spec.clone().tcp(tcp_flags::SYN, seq, 0).build();
                frame[0..6].copy_from_slice(&dst_mac);
                frame[6..12].copy_from_slice(&src_mac);
                let stamp = (Instant::now(), SystemTime::now());
                sock.send_batch(&[&frame]);
                log.lock().unwrap_or_else(|e| e.into_inner()).push(stamp);
                seq += 1;
            }
            Ok(())
        });
        Ok(Probe {
            stop,
            last_seen,
            sent,
            threads: vec![sniffer, sender],
        })
    }

    /// Waits until the server has seen at least `n` packets.
    fn wait_flowing(&self, n: u32) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.last_seen.load(Ordering::Relaxed) < n {
            ensure!(
                Instant::now() < deadline,
                "the client's packets do not reach the server"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Stops both threads; returns the send times of the first packet the server did not see.
    fn finish(mut self) -> Result<(Instant, SystemTime)> {
        // Packets still in flight reach the sniffer within this.
        std::thread::sleep(Duration::from_millis(30));
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join()
                .map_err(|_| anyhow::anyhow!("a probe thread panicked"))??;
        }
        let last = self.last_seen.load(Ordering::Relaxed) as usize;
        let sent = self.sent.lock().unwrap_or_else(|e| e.into_inner());
        // Sequence number s is sent[s - 1]; the first unseen is last + 1.
        sent.get(last)
            .copied()
            .context("the server saw every packet: nothing was dropped")
    }
}

/// Runs benchmark 5.
pub fn run(plan: &Plan) -> Result<Outcome> {
    let samples = if plan.smoke { 2 } else { 25 };
    let pair = Pair::new()?;
    let ca = TestCa::new()?;
    let srv = Pair::srv_addr(false);
    let idp = TestIdp::start(&pair.srv, SocketAddr::new(srv, 0), &ca)?;
    let cert = ca.server_cert("endpoint", srv)?;
    let socket = ca
        .dir()
        .join(format!("bench-{}", unique_id()))
        .join("admin.sock");
    // The audit stream (a flow record per packet, rate-limited) to a file, not the report's
    // output.
    let audit = ca.dir().join("audit.log");
    let toml = format!(
        "{}\n[audit]\noutput = \"file\"\npath = \"{}\"\n",
        config(&pair, &idp, &cert, &socket),
        audit.display()
    );
    let daemon = Daemon::start(&pair.srv, &toml)?;
    let ca_pem = ca.ca_pem();
    let url = format!("https://{srv}:{ENDPOINT}/v1/sessions");
    let client = pair.cli.run_in(|| -> Result<reqwest::blocking::Client> {
        Ok(reqwest::blocking::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes())?])
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()?)
    })?;
    let login = |token: &str| -> Result<()> {
        let status = pair
            .cli
            .run_in(|| client.post(&url).bearer_auth(token).send())?
            .status();
        ensure!(status.is_success(), "login answered {status}");
        Ok(())
    };
    let cli = Pair::cli_addr(false);
    let revoke_path = format!("/v1/sessions?source={cli}");

    let mut from_revoke = Vec::new();
    let token = pair
        .srv
        .run_in(|| idp.mint("alice", &["web"], Duration::from_secs(3600)))?;
    for _ in 0..samples {
        login(&token)?;
        let probe = Probe::start(&pair)?;
        probe.wait_flowing(20)?;
        let t0 = Instant::now();
        let (status, _) = daemon.admin(Method::DELETE, &revoke_path)?;
        ensure!(status == 200, "revoke answered {status}");
        std::thread::sleep(Duration::from_millis(20));
        let (first_dropped, _) = probe.finish()?;
        from_revoke.push(signed_ms(first_dropped, t0));
    }

    let mut from_expiry = Vec::new();
    for _ in 0..samples {
        // exp is whole seconds: 1–2 s from now.
        let token = pair
            .srv
            .run_in(|| idp.mint("alice", &["web"], Duration::from_secs(2)))?;
        let exp = SystemTime::UNIX_EPOCH + Duration::from_secs(token_exp(&token)?);
        login(&token)?;
        let probe = Probe::start(&pair)?;
        probe.wait_flowing(20)?;
        while SystemTime::now() < exp + Duration::from_millis(150) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let (_, first_dropped) = probe.finish()?;
        from_expiry.push(match first_dropped.duration_since(exp) {
            Ok(d) => d.as_secs_f64() * 1e3,
            Err(e) => -e.duration().as_secs_f64() * 1e3,
        });
    }
    daemon.stop()?;

    let mut t = Table::new(
        "revoke_latency",
        "Time to the first dropped packet",
        "ms",
        true,
    );
    t.push(
        "after `sessions revoke` (admin API call)",
        from_revoke.clone(),
    );
    t.push("after token expiry (exp)", from_expiry.clone());
    let mut o = Outcome::new("revoke", "5. Revocation");
    let p99r = quantile(&from_revoke, 0.99);
    let p99e = quantile(&from_expiry, 0.99);
    o.goals = vec![
        Goal::check(
            "p99 from `sessions revoke` to the first dropped packet ≤ 100 ms",
            p99r,
            100.0,
            false,
            " ms",
        ),
        Goal::check(
            "p99 from token expiry to the first dropped packet ≤ 100 ms",
            p99e,
            100.0,
            false,
            " ms",
        ),
    ];
    o.findings.push(format!(
        "Revoke: p50 {:.2} ms, p99 {p99r:.2} ms over {} samples. Expiry: p50 {:.2} ms, p99 \
         {p99e:.2} ms over {} samples (the kernel checks each session's expiry on every packet, \
         so no sweep is waited for; a negative figure would mean a drop before the exp instant).",
        quantile(&from_revoke, 0.5),
        from_revoke.len(),
        quantile(&from_expiry, 0.5),
        from_expiry.len()
    ));
    o.method = vec![format!(
        "The daemon in-process with native XDP on the server's veth and a real login (RS256 \
         token from the test IdP over HTTPS). The client sends a numbered SYN to the protected \
         port every {} µs (pinned to CPU 0); a packet socket on the server sees what XDP lets \
         through. The first dropped packet is the one after the last seen; its send time is \
         measured from the start of the revoke call (monotonic clock) or from the token's exp \
         (wall clock). Resolution: the send interval.",
        INTERVAL.as_micros()
    )];
    o.tables = vec![t];
    Ok(o)
}

fn signed_ms(a: Instant, b: Instant) -> f64 {
    if a >= b {
        (a - b).as_secs_f64() * 1e3
    } else {
        -(b - a).as_secs_f64() * 1e3
    }
}

/// The `exp` claim of a JWT (not verified: the token is ours).
fn token_exp(token: &str) -> Result<u64> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).context("not a JWT")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?;
    let v: serde_json::Value = serde_json::from_slice(&bytes)?;
    v["exp"].as_u64().context("no exp")
}
