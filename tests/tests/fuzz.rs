//! Randomised verdicts: valid frames from the builder, mutated (bytes flipped, truncated, padded,
//! length fields rewritten, random VLAN stacks, IPv6 extension chains and fragments) and fully
//! random bytes, each run through both programs and held to an independent reading of the frame
//! (`idgate_tests::oracle`, built on etherparse).
//!
//! Properties, for every frame:
//! - the kernel runs it unless BPF_PROG_TEST_RUN refuses it up front, and the program answers
//!   with a known code (no "unexpected code" from `run`);
//! - XDP and TC agree on the verdict, and on the bytes of a RST;
//! - a pass is never a complete TCP/UDP header (whole datagram or first fragment) to a protected
//!   (protocol, port) from a source without a live session or CIDR allow for that service (or with
//!   a CIDR deny), nor a later fragment of a protected protocol whose first fragment did not pass;
//! - a bounce answers a complete, unfragmented TCP segment to a reset service that nothing lets
//!   in, with a correct RST;
//! - afterwards, every drop and bounce is counted under exactly one refusal reason and every
//!   bounce as one RST.
//!
//! The seed is fixed; set IDGATE_FUZZ_SEED (and IDGATE_FUZZ_FRAMES) to explore others. A failure
//! prints the seed, the frame index and the frame in hex.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use idgate::dataplane::{
    CidrAction, CidrRule, Dataplane, Expiry, Protocol, Service, ServiceAction, ServiceId, Session,
};
use idgate_common::Reason;
use idgate_tests::{
    fixture::{
        HOOKS, REFUSALS, Tally, cidr, expired_session, hex, session, tcp_service, test_run_refuses,
        udp_service,
    },
    oracle::{self, Answered, DatagramId, Reading},
    packet::{Ext, Spec, Transport},
    run::{Outcome, load, run},
};

/// SplitMix64: small, fast, and the same sequence everywhere for a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn percent(&mut self, p: usize) -> bool {
        self.below(100) < p
    }

    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn v4(s: &str) -> IpAddr {
    IpAddr::V4(s.parse::<Ipv4Addr>().unwrap())
}

fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse::<Ipv6Addr>().unwrap())
}

/// What the data plane is configured with, and what that lets in.
struct Config {
    services: Vec<Service>,
    live: Vec<Session>,
    expired: Vec<Session>,
    rules: Vec<CidrRule>,
}

impl Config {
    /// TCP 22 (reset) and 8000, UDP 53 and 8000 (reset); sessions, expired sessions, CIDR rules.
    fn tcp_and_udp() -> Config {
        let sessions = |addr: &str, ids: &[u32]| -> Vec<Session> {
            let a: IpAddr = addr.parse().unwrap();
            ids.iter().map(|&id| session(a, id, id, id)).collect()
        };
        let mut live = Vec::new();
        live.extend(sessions("192.0.2.10", &[1, 3]));
        live.extend(sessions("192.0.2.11", &[2, 4]));
        live.extend(sessions("203.0.113.5", &[1, 2]));
        live.extend(sessions("2001:db8::10", &[1, 2, 3, 4]));
        live.extend(sessions("2001:db8::11", &[3]));
        live.extend(sessions("2001:db8:b::5", &[3, 4]));
        let expired = [v4("192.0.2.12"), v6("2001:db8::12")]
            .iter()
            .flat_map(|&a| (1..=4).map(move |id| expired_session(a, id, Expiry::from_ns(1))))
            .collect();
        Config {
            services: vec![
                tcp_service(1, 22, ServiceAction::Reset),
                tcp_service(2, 8000, ServiceAction::Drop),
                udp_service(3, 53, ServiceAction::Drop),
                udp_service(4, 8000, ServiceAction::Reset),
            ],
            live,
            expired,
            rules: vec![
                cidr(2, "198.51.100.0/24".parse().unwrap(), CidrAction::Allow, 1),
                cidr(1, "203.0.113.0/24".parse().unwrap(), CidrAction::Deny, 2),
                cidr(3, "2001:db8:a::/64".parse().unwrap(), CidrAction::Allow, 3),
                cidr(4, "2001:db8:b::/64".parse().unwrap(), CidrAction::Deny, 4),
            ],
        }
    }

    /// Only the TCP services (and their sessions and rules): UDP is not protected at all.
    fn tcp_only() -> Config {
        let mut c = Config::tcp_and_udp();
        c.services.retain(|s| s.protocol == Protocol::Tcp);
        let tcp: HashSet<ServiceId> = c.services.iter().map(|s| s.id).collect();
        c.live.retain(|s| tcp.contains(&s.service));
        c.expired.retain(|s| tcp.contains(&s.service));
        c.rules.retain(|r| tcp.contains(&r.service));
        c
    }

    /// Nothing protected.
    fn nothing() -> Config {
        Config {
            services: Vec::new(),
            live: Vec::new(),
            expired: Vec::new(),
            rules: Vec::new(),
        }
    }

    fn load(&self) -> Dataplane {
        let mut dp = load();
        dp.set_services(&self.services).unwrap();
        dp.set_cidr_rules(&self.rules).unwrap();
        dp.upsert_sessions(&self.live).unwrap();
        dp.upsert_sessions(&self.expired).unwrap();
        dp
    }

    fn service(&self, proto: u8, port: u16) -> Option<&Service> {
        self.services
            .iter()
            .find(|s| s.protocol.number() == proto && s.port == port)
    }

    fn protects(&self, proto: u8) -> bool {
        self.services.iter().any(|s| s.protocol.number() == proto)
    }

    /// Whether `src` may reach `service`: no deny rule, and an allow rule or a live session.
    /// Addresses compare exactly: an IPv4-mapped IPv6 source is not its IPv4 address.
    fn lets_in(&self, service: ServiceId, src: IpAddr) -> bool {
        let rule = |action| {
            self.rules
                .iter()
                .any(|r| r.service == service && r.action == action && r.net.contains(&src))
        };
        !rule(CidrAction::Deny)
            && (rule(CidrAction::Allow)
                || self
                    .live
                    .iter()
                    .any(|s| s.service == service && s.source == src))
    }
}

/// Sources the generator draws from: session holders, expired, allowed, denied, strangers, and
/// IPv4-mapped IPv6 forms of IPv4 holders.
fn sources(v6_family: bool, rng: &mut Rng) -> IpAddr {
    const V4: [&str; 7] = [
        "192.0.2.10",
        "192.0.2.11",
        "192.0.2.12",
        "192.0.2.13",
        "198.51.100.7",
        "198.51.101.7",
        "203.0.113.5",
    ];
    const V6: [&str; 9] = [
        "2001:db8::10",
        "2001:db8::11",
        "2001:db8::12",
        "2001:db8::13",
        "2001:db8:a::7",
        "2001:db8:a:1::7",
        "2001:db8:b::5",
        "::ffff:192.0.2.10",
        "::ffff:192.0.2.11",
    ];
    match (v6_family, rng.percent(10)) {
        (false, true) => IpAddr::V4(Ipv4Addr::from(rng.next() as u32)),
        (true, true) => IpAddr::V6(Ipv6Addr::from(u128::from(rng.next()) << 64 | 1)),
        (false, false) => v4(rng.pick(&V4)),
        (true, false) => rng.pick(&V6).parse().unwrap(),
    }
}

const PORTS: [u16; 9] = [22, 8000, 53, 80, 443, 5353, 0, 65535, 8000];
/// A small pool, so later fragments often meet their first fragment (or someone else's).
const FRAG_IDS: [u16; 6] = [1, 2, 3, 0x4242, 0xffff, 7];

/// A valid frame spec with random addresses, ports, transport, VLAN tags, IPv4 options,
/// IPv6 extension headers and fragmentation.
fn random_spec(rng: &mut Rng) -> Spec {
    let is_v6 = rng.percent(50);
    let src = sources(is_v6, rng);
    let dst = match (is_v6, rng.percent(90)) {
        (false, true) => v4("192.0.2.1"),
        (true, true) => v6("2001:db8::1"),
        _ => sources(is_v6, rng),
    };
    let dport = if rng.percent(85) {
        rng.pick(&PORTS)
    } else {
        rng.next() as u16
    };
    let mut spec = Spec::syn(src, dst, dport);
    spec.sport = if rng.percent(50) {
        40000
    } else {
        rng.next() as u16
    };
    spec.transport = match rng.below(10) {
        0..=4 => {
            let any = rng.next() as u8;
            let flags = rng.pick(&[0x02, 0x02, 0x12, 0x10, 0x18, 0x04, 0x14, 0x01, 0x11, any]);
            let words = rng.below(11);
            let options = rng.bytes(4 * words);
            Transport::Tcp {
                flags,
                seq: rng.next() as u32,
                ack: rng.next() as u32,
                options,
            }
        }
        5..=8 => Transport::Udp,
        _ => {
            let any = rng.next() as u8;
            Transport::Other(rng.pick(&[1, 58, 47, 50, 132, 59, 255, any]))
        }
    };
    let len = rng.below(48);
    spec.payload = rng.bytes(len);
    let tags = match rng.below(100) {
        0..=64 => 0,
        65..=79 => 1,
        80..=91 => 2,
        92..=97 => 3,
        _ => 4,
    };
    for _ in 0..tags {
        let any = rng.next() as u16;
        let tpid = rng.pick(&[0x8100, 0x8100, 0x88a8, 0x9100, any]);
        spec.vlans.push((tpid, rng.next() as u16 & 0x0fff));
    }
    let fragment = rng.below(100);
    let id = rng.pick(&FRAG_IDS);
    if !is_v6 {
        if rng.percent(20) {
            let words = 1 + rng.below(10);
            spec.ipv4_options = rng.bytes(4 * words);
        }
        if fragment < 15 {
            spec = spec.fragment(0, true, id);
        } else if fragment < 30 {
            spec = spec.fragment(1 + rng.below(300) as u16, rng.percent(50), id);
        }
    } else if rng.percent(50) {
        let n = 1 + rng.below(10);
        for _ in 0..n {
            let ext = match rng.below(6) {
                0 => Ext::HopByHop,
                1 => Ext::DestOpts(rng.below(3) as u8),
                2 => Ext::Routing,
                3 => Ext::Auth,
                _ => {
                    let offset = if rng.percent(50) {
                        0
                    } else {
                        1 + rng.below(300) as u16
                    };
                    Ext::Fragment(offset, rng.percent(60), u32::from(rng.pick(&FRAG_IDS)))
                }
            };
            spec.ext.push(ext);
        }
        let later = spec
            .ext
            .iter()
            .any(|e| matches!(e, Ext::Fragment(o, ..) if *o != 0));
        spec.omit_transport = later && rng.percent(70);
    } else if fragment < 15 {
        spec = spec.fragment(0, true, id);
    } else if fragment < 30 {
        spec = spec.fragment(1 + rng.below(300) as u16, rng.percent(50), id);
    }
    spec
}

/// Breaks a built frame in one of several ways (or leaves it whole).
fn mutate(rng: &mut Rng, spec: &Spec, frame: &mut Vec<u8>) {
    match rng.below(100) {
        0..=44 => {}
        45..=59 => {
            for _ in 0..1 + rng.below(3) {
                let i = rng.below(frame.len());
                frame[i] ^= 1 + rng.below(255) as u8;
            }
        }
        60..=71 => {
            // Somewhere in the headers.
            let end = frame.len().min(spec.l4_offset() + 24);
            for _ in 0..1 + rng.below(2) {
                let i = rng.below(end);
                frame[i] = rng.next() as u8;
            }
        }
        72..=81 => frame.truncate(rng.below(frame.len())),
        82..=86 => {
            let n = 1 + rng.below(64);
            frame.extend(rng.bytes(n));
        }
        87..=91 => {
            // A length field: IPv4 total length / IPv6 payload length, IPv4 ihl, TCP data offset.
            let l3 = spec.l3_offset();
            let (at, wide) = match rng.below(3) {
                0 if spec.src.is_ipv4() => (l3 + 2, true),
                0 => (l3 + 4, true),
                1 => (l3, false),
                _ => (spec.l4_offset() + 12, false),
            };
            if at + 2 <= frame.len() {
                if wide {
                    let v = rng.next() as u16 % 256;
                    frame[at..at + 2].copy_from_slice(&v.to_be_bytes());
                } else {
                    frame[at] = (frame[at] & 0x0f) | ((rng.next() as u8) << 4);
                    if at == l3 {
                        frame[at] = (frame[at] & 0xf0) | (rng.next() as u8 & 0x0f);
                    }
                }
            }
        }
        _ => {
            let n = 14 + rng.below(150);
            *frame = rng.bytes(n);
            let any = rng.next() as u16;
            let ether_type: u16 = rng.pick(&[0x0800, 0x86dd, 0x8100, 0x88a8, any]);
            frame[12..14].copy_from_slice(&ether_type.to_be_bytes());
            if frame.len() > 14 && rng.percent(50) {
                let version = if ether_type == 0x86dd { 0x60 } else { 0x45 };
                frame[14] = version | (frame[14] & 0x0f);
            }
        }
    }
}

/// The frames of one step: usually one, sometimes a first fragment and a later one of the same
/// datagram (so later fragments meet first fragments that passed and ones that did not).
fn step(rng: &mut Rng) -> Vec<Vec<u8>> {
    let spec = random_spec(rng);
    if rng.percent(10) && !matches!(spec.transport, Transport::Other(_)) {
        let mut base = spec;
        base.ipv4_frag = None;
        base.ext.retain(|e| !matches!(e, Ext::Fragment(..)));
        base.omit_transport = false;
        let id = rng.pick(&FRAG_IDS);
        let first = base.clone().fragment(0, true, id).build();
        let later = base
            .with_payload(&[0xee; 16])
            .fragment(1 + rng.below(100) as u16, rng.percent(30), id)
            .build();
        return vec![first, later];
    }
    let mut frame = spec.build();
    mutate(rng, &spec, &mut frame);
    vec![frame]
}

/// Running totals the end-of-run checks compare with the counters.
#[derive(Default)]
struct Totals {
    runs: u64,
    refused: u64,
    bounced: u64,
    passed: u64,
    kernel_refused: u64,
    passes_checked: u64,
}

/// Runs `frames` random frames from `seed` against `config` and checks every property.
fn fuzz(config: &Config, seed: u64, frames: usize) {
    let env = |name: &str| std::env::var(name).ok();
    let seed = env("IDGATE_FUZZ_SEED")
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or(seed);
    let frames = env("IDGATE_FUZZ_FRAMES")
        .and_then(|s| s.parse().ok())
        .unwrap_or(frames);
    eprintln!("fuzz: seed {seed:#x}, {frames} frames (IDGATE_FUZZ_SEED / IDGATE_FUZZ_FRAMES)");
    let mut fuzzer = Fuzzer {
        config,
        dp: config.load(),
        seed,
        passed_first: HashSet::new(),
        totals: Totals::default(),
    };
    let mut rng = Rng(seed);
    let start = Instant::now();
    let mut index = 0;
    while index < frames {
        for frame in step(&mut rng) {
            index += 1;
            fuzzer.judge(index, &frame);
        }
    }
    let elapsed = start.elapsed();
    let t = &fuzzer.totals;
    eprintln!(
        "fuzz: {index} frames, {} runs in {elapsed:?}: {} passed ({} of them TCP/UDP or \
         fragments), {} refused ({} bounced), {} refused by the kernel",
        t.runs, t.passed, t.passes_checked, t.refused, t.bounced, t.kernel_refused
    );

    let counted = Tally::read(&fuzzer.dp);
    assert_eq!(
        counted.packets(&REFUSALS),
        t.refused,
        "seed {seed:#x}: every drop and bounce is counted once under a refusal reason"
    );
    assert_eq!(
        counted.rsts(),
        t.bounced,
        "seed {seed:#x}: every bounce counts one RST"
    );
    let allowed = counted.packets(&[Reason::AllowSession, Reason::AllowCidr]);
    assert!(
        allowed <= t.passed,
        "seed {seed:#x}: {allowed} allowed, {} passed",
        t.passed
    );
    if config.services.is_empty() {
        assert_eq!(
            t.refused, 0,
            "seed {seed:#x}: refused with nothing protected"
        );
        assert_eq!(
            counted,
            Tally::new(),
            "seed {seed:#x}: counted with nothing protected"
        );
    } else {
        // The generator must keep exercising every verdict, or the properties hold vacuously.
        assert!(
            t.passes_checked > 1000 && t.refused > 1000,
            "seed {seed:#x}: too little coverage"
        );
        assert!(
            t.bounced > 100,
            "seed {seed:#x}: too few bounces to check RSTs"
        );
    }
}

/// One fuzzing run: the data plane, what it was configured with, and what has been seen.
struct Fuzzer<'a> {
    config: &'a Config,
    dp: Dataplane,
    seed: u64,
    /// Datagrams whose first fragment passed: their later fragments may pass too.
    passed_first: HashSet<DatagramId>,
    totals: Totals,
}

impl Fuzzer<'_> {
    /// Runs one frame through both hooks and checks every per-frame property.
    fn judge(&mut self, index: usize, frame: &[u8]) {
        let reading = oracle::read(frame);
        let fail = |why: String| -> ! {
            panic!(
                "fuzz seed {:#x}, frame #{index}: {why}\nframe {}\nreading {reading:?}",
                self.seed,
                hex(frame),
            )
        };
        let t = &mut self.totals;
        let mut verdicts = Vec::new();
        for hook in HOOKS {
            t.runs += 1;
            match run(&self.dp, hook, frame) {
                Ok(_) if test_run_refuses(hook, frame) => {
                    fail(format!("[{hook:?}] ran a frame the kernel should refuse"))
                }
                Ok(ran) => verdicts.push((hook, ran)),
                Err(e)
                    if test_run_refuses(hook, frame)
                        && format!("{e:#}").contains("os error 22") =>
                {
                    t.kernel_refused += 1
                }
                Err(e) => fail(format!("[{hook:?}] {e:#}")),
            }
        }
        if let [(_, x), (_, tc)] = &verdicts[..]
            && (x.outcome != tc.outcome || (x.outcome == Outcome::Bounce && x.data != tc.data))
        {
            let (xo, to) = (hex(&x.data), hex(&tc.data));
            fail(format!(
                "XDP {:?} and TC {:?} disagree\nXDP out {xo}\nTC  out {to}",
                x.outcome, tc.outcome
            ));
        }
        for (hook, ran) in &verdicts {
            match ran.outcome {
                Outcome::Drop => t.refused += 1,
                Outcome::Bounce => {
                    t.refused += 1;
                    t.bounced += 1;
                    if let Err(why) = check_bounce(self.config, frame, &reading, &ran.data) {
                        fail(format!("[{hook:?}] bounce: {why}\nout {}", hex(&ran.data)));
                    }
                }
                Outcome::Pass => {
                    t.passed += 1;
                    if let Err(why) = check_pass(self.config, &reading, &self.passed_first) {
                        fail(format!("[{hook:?}] pass: {why}"));
                    }
                    t.passes_checked += u64::from(matches!(
                        reading,
                        Reading::Transport(_) | Reading::LaterFragment { .. }
                    ));
                }
            }
        }
        if let (Some((_, ran)), Reading::Transport(flow)) = (verdicts.first(), &reading)
            && let (Outcome::Pass, Some(id)) = (ran.outcome, flow.first_fragment)
        {
            self.passed_first.insert(id);
        }
    }
}

/// The safety property of a pass.
fn check_pass(
    config: &Config,
    reading: &Reading,
    passed_first: &HashSet<DatagramId>,
) -> Result<(), String> {
    match reading {
        Reading::Transport(f) => match config.service(f.proto, f.dport) {
            Some(svc) if !config.lets_in(svc.id, f.src) => Err(format!(
                "{} {} -> port {} (service {}) from a source nothing lets in",
                if f.proto == 6 { "TCP" } else { "UDP" },
                if f.first_fragment.is_some() {
                    "first fragment"
                } else {
                    "packet"
                },
                f.dport,
                svc.id.get()
            )),
            _ => Ok(()),
        },
        Reading::LaterFragment { datagram, proto }
            if (*proto == 6 || *proto == 17)
                && config.protects(*proto)
                && !passed_first.contains(datagram) =>
        {
            Err(format!(
                "later fragment of protocol {proto} whose first fragment never passed"
            ))
        }
        _ => Ok(()),
    }
}

/// What a bounce must be: the answer to a refused, whole TCP segment for a reset service.
fn check_bounce(
    config: &Config,
    frame: &[u8],
    reading: &Reading,
    out: &[u8],
) -> Result<(), String> {
    let Reading::Transport(f) = reading else {
        return Err("the frame is not a complete TCP segment".into());
    };
    let svc = config
        .service(f.proto, f.dport)
        .ok_or("bounced a frame for no service")?;
    if f.proto != 6 || svc.action != ServiceAction::Reset || f.first_fragment.is_some() {
        return Err("bounced UDP, a fragment, or for a drop service".into());
    }
    if config.lets_in(svc.id, f.src) {
        return Err("bounced a source that is let in".into());
    }
    let incoming = Answered::from_reading(frame, reading).ok_or("no TCP fields")?;
    if incoming.tcp.flags & 0x04 != 0 {
        return Err("answered a RST with a RST".into());
    }
    oracle::check_rst(&incoming, out)
}

/// Four protected services, sessions, CIDR rules: the properties hold for 300,000 random frames,
/// each run on both hooks.
#[test]
fn random_frames_never_pass_unauthorised_traffic() {
    fuzz(&Config::tcp_and_udp(), 0x1d6a_7e5e_ed00_0001, 300_000);
}

/// With only TCP protected, UDP (fragments included) is free, TCP is not.
#[test]
fn random_frames_with_only_tcp_protected() {
    fuzz(&Config::tcp_only(), 0x1d6a_7e5e_ed00_0002, 20_000);
}

/// With nothing protected, every frame the kernel runs passes and nothing is counted.
#[test]
fn random_frames_all_pass_when_nothing_is_protected() {
    fuzz(&Config::nothing(), 0x1d6a_7e5e_ed00_0003, 20_000);
}
