//! `cargo xtask bench verdict`: nanoseconds per packet through BPF_PROG_TEST_RUN, for an empty XDP
//! program (the floor) and idgate's allowed, denied and unprotected paths, with the same key every
//! time and with random source addresses, at 1k, 64k and 1M sessions. Everything in one run, so
//! the ratios compare like with like.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::{TestRun, TestRunOptions, programs::Xdp};
use idgate::dataplane::{
    Dataplane, Expiry, LoadOptions, Protocol, Service, ServiceAction, ServiceId, Session,
};
use idgate_tests::packet::{Spec, tcp_flags};

const SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const PROTECTED: u16 = 8000;
const UNPROTECTED: u16 = 9000;

struct Config {
    sizes: Vec<u32>,
    repeat: u32,
    random_packets: usize,
    runs: usize,
}

fn main() -> Result<()> {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let cfg = if smoke {
        Config {
            sizes: vec![1_000],
            repeat: 10_000,
            random_packets: 256,
            runs: 1,
        }
    } else {
        Config {
            sizes: vec![1_000, 65_536, 1_048_576],
            repeat: 1_000_000,
            random_packets: 8_192,
            runs: 5,
        }
    };
    let max = *cfg.sizes.iter().max().context("no sizes")?;
    let mut dp = Dataplane::load(LoadOptions {
        max_sessions: max,
        ..LoadOptions::default()
    })?;
    let service = ServiceId::new(1)?;
    dp.set_services(&[Service {
        id: service,
        protocol: Protocol::Tcp,
        port: PROTECTED,
        action: ServiceAction::Drop,
    }])?;

    println!(
        "idgate verdict benchmark: BPF_PROG_TEST_RUN, XDP, median of {} runs; \
         repeated: one packet {} times in the kernel; once: {} calls of one run each",
        cfg.runs, cfg.repeat, cfg.random_packets
    );
    println!(
        "{:>9}  {:<12} {:<12} {:>9} {:>11}",
        "sessions", "path", "run", "ns/pkt", "over floor"
    );

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut installed: Vec<Ipv4Addr> = Vec::new();
    for &n in &cfg.sizes {
        // Grow the table to n sessions with batched updates; time that too.
        let fresh: Vec<Ipv4Addr> = (installed.len()..n as usize)
            .map(|_| random_client(&mut rng))
            .collect();
        let sessions: Vec<Session> = fresh
            .iter()
            .map(|a| Session {
                source: IpAddr::V4(*a),
                service,
                expires: Expiry::after(Duration::from_secs(3600)),
                identity_id: 1,
                rule_id: 1,
                idle: None,
            })
            .collect();
        let t = Instant::now();
        for chunk in sessions.chunks(65_536) {
            dp.upsert_sessions(chunk)?;
        }
        let took = t.elapsed();
        installed.extend(fresh);
        if !sessions.is_empty() {
            println!(
                "# grew to {n} sessions: {} inserted in {:.1} ms ({:.2} M sessions/s, batched)",
                sessions.len(),
                took.as_secs_f64() * 1e3,
                sessions.len() as f64 / took.as_secs_f64() / 1e6
            );
        }

        let known = installed[0];
        let floor = dp.floor_program()?;
        let xdp = dp.xdp_program()?;
        // Three ways to run each path: one packet repeated inside the kernel (everything hot);
        // the same packet once per call (what a call costs cold, keys hot); a different random
        // source once per call (adds what random keys cost: hash buckets and entries out of cache).
        let paths: [(&str, PacketMaker); 3] = [
            (
                "allowed",
                Box::new(|rng: &mut Rng| one(installed[rng.below(installed.len())], PROTECTED)),
            ),
            (
                "denied",
                Box::new(|rng: &mut Rng| one(random_stranger(rng), PROTECTED)),
            ),
            (
                "unprotected",
                Box::new(|rng: &mut Rng| one(random_stranger(rng), UNPROTECTED)),
            ),
        ];
        let same_floor = median(cfg.runs, || {
            same_key(floor, &one(known, PROTECTED), cfg.repeat)
        })?;
        let fixed_one: Vec<Vec<u8>> = vec![one(known, PROTECTED); cfg.random_packets];
        let once_floor = median(cfg.runs, || random_keys(floor, &fixed_one))?;
        print_row(n, "floor", "repeated", same_floor, same_floor);
        print_row(n, "floor", "once", once_floor, once_floor);
        for (path, make) in &paths {
            let first = make(&mut Rng(1));
            let repeated = median(cfg.runs, || same_key(xdp, &first, cfg.repeat))?;
            let same_once: Vec<Vec<u8>> = vec![first.clone(); cfg.random_packets];
            let once = median(cfg.runs, || random_keys(xdp, &same_once))?;
            let random: Vec<Vec<u8>> = (0..cfg.random_packets).map(|_| make(&mut rng)).collect();
            let random_once = median(cfg.runs, || random_keys(xdp, &random))?;
            print_row(n, path, "repeated", repeated, same_floor);
            print_row(n, path, "once", once, once_floor);
            print_row(n, path, "once-random", random_once, once_floor);
        }
    }
    let stats = dp.event_stats()?;
    println!(
        "# events suppressed by the in-kernel limiter during the run: {} (ring full: {})",
        stats.suppressed, stats.ring_full
    );
    Ok(())
}

fn print_row(sessions: u32, path: &str, run: &str, ns: f64, floor: f64) {
    println!(
        "{sessions:>9}  {path:<12} {run:<12} {ns:>9.1} {:>+11.1}",
        ns - floor
    );
}

fn one(src: Ipv4Addr, port: u16) -> Vec<u8> {
    Spec::syn(IpAddr::V4(src), IpAddr::V4(SERVER), port)
        .tcp(tcp_flags::ACK, 1, 1)
        .build()
}

/// ns per run of one packet repeated `repeat` times inside the kernel.
fn same_key(prog: &Xdp, packet: &[u8], repeat: u32) -> Result<f64> {
    let res = prog.test_run(TestRunOptions {
        data_in: Some(packet),
        repeat,
        ..Default::default()
    })?;
    Ok(res.duration.as_nanos() as f64)
}

/// Mean ns per run over many different packets, each run once (cold keys, like real traffic).
fn random_keys(prog: &Xdp, packets: &[Vec<u8>]) -> Result<f64> {
    let mut total = 0u128;
    for p in packets {
        let res = prog.test_run(TestRunOptions {
            data_in: Some(p),
            repeat: 1,
            ..Default::default()
        })?;
        total += res.duration.as_nanos();
    }
    Ok(total as f64 / packets.len() as f64)
}

fn median(runs: usize, mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    let mut v = (0..runs).map(|_| f()).collect::<Result<Vec<_>>>()?;
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

/// Clients drawn from 10.0.0.0/8: only map keys and packet headers, never sent anywhere.
fn random_client(rng: &mut Rng) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000 | (rng.next() as u32 & 0x00ff_ffff))
}

/// Sources from 172.16.0.0/12, disjoint from the clients: never have a session.
fn random_stranger(rng: &mut Rng) -> Ipv4Addr {
    Ipv4Addr::from(0xac10_0000 | (rng.next() as u32 & 0x000f_ffff))
}

/// Makes one packet of a benchmarked path, drawing its source from the generator.
type PacketMaker<'a> = Box<dyn Fn(&mut Rng) -> Vec<u8> + 'a>;

/// xorshift64*: reproducible, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}
