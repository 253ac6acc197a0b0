//! `cargo xtask demo`: idgate's data plane at work, narrated. A client namespace talks over veth to
//! an "API" namespace whose port 8000 idgate protects; a session opens it, expiry closes it again.
//! Everything it creates is removed on exit, also on Ctrl-C.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use idgate::dataplane::{
    AttachMode, Dataplane, EventKind, Expiry, LoadOptions, Protocol, Service, ServiceAction,
    ServiceId, Session,
};
use idgate_common::Reason;
use idgate_tests::netns::{CLI_V4, Pair, SRV_V4};

const API_PORT: u16 = 8000;
const HEALTH_PORT: u16 = 9000;
const SESSION: Duration = Duration::from_secs(4);
const ALICE: u32 = 1001;
const RULE: u32 = 7;

fn main() -> Result<()> {
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    let result = demo(&interrupted);
    // The namespaces (and the veth pair, and the attached program) are gone by now: `demo` owns
    // them and drops them on every path.
    if interrupted.load(Ordering::SeqCst) {
        println!("\ninterrupted: namespaces removed, nothing left behind");
        return Ok(());
    }
    result
}

fn step(interrupted: &AtomicBool, title: &str) -> Result<()> {
    if interrupted.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    println!("\n== {title}");
    Ok(())
}

fn demo(interrupted: &AtomicBool) -> Result<()> {
    step(
        interrupted,
        "setting up: namespaces `api` and `client`, joined by veth",
    )?;
    let net = Pair::new()?;
    println!(
        "   api    {SRV_V4} ({}), serving :{API_PORT} (the API) and :{HEALTH_PORT} (health)",
        net.srv_if
    );
    println!("   client {CLI_V4} ({})", net.cli_if);

    let stop = Arc::new(AtomicBool::new(false));
    let servers: Vec<_> = [(API_PORT, "hello from the API"), (HEALTH_PORT, "ok")]
        .into_iter()
        .map(|(port, body)| {
            let stop = stop.clone();
            let listener = net
                .srv
                .run_in(|| TcpListener::bind((SRV_V4, port)))
                .with_context(|| format!("binding :{port}"))?;
            listener.set_nonblocking(true)?;
            Ok(std::thread::spawn(move || serve(&listener, body, &stop)))
        })
        .collect::<Result<_>>()?;

    let mut dp = Dataplane::load(LoadOptions::default()).context("loading the programs")?;
    let mut events = dp.take_events()?;
    let api = ServiceId::new(1)?;
    dp.set_services(&[Service {
        id: api,
        protocol: Protocol::Tcp,
        port: API_PORT,
        // Drop: the client times out. (`reset` answers with a RST instead; on veth, native
        // XDP_TX only reaches a peer that runs an XDP program itself, see the README.)
        action: ServiceAction::Drop,
    }])?;
    let mode = net.srv.run_in(|| dp.attach(&net.srv_if, AttachMode::Xdp))?;
    println!(
        "   idgate attached to {} ({mode}); tcp/{API_PORT} protected, action drop",
        net.srv_if
    );

    let api_addr = SocketAddr::new(IpAddr::V4(SRV_V4), API_PORT);
    let health_addr = SocketAddr::new(IpAddr::V4(SRV_V4), HEALTH_PORT);

    step(interrupted, "1. the client has no session")?;
    show(&net, api_addr);
    show(&net, health_addr);

    step(
        interrupted,
        "2. alice logs in: a session for 192.0.2.2 → tcp/8000, 4 s",
    )?;
    dp.upsert_session(&Session {
        source: IpAddr::V4(CLI_V4),
        service: api,
        expires: Expiry::after(SESSION),
        identity_id: ALICE,
        rule_id: RULE,
    })?;
    show(&net, api_addr);

    step(
        interrupted,
        "3. the session expires; the kernel checks expiry on every packet",
    )?;
    let deadline = Instant::now() + SESSION + Duration::from_secs(1);
    while Instant::now() < deadline && !interrupted.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    show(&net, api_addr);

    step(interrupted, "4. what the kernel reported")?;
    for e in events.drain() {
        let what = match e.kind {
            EventKind::Denied { reason, reset } => format!(
                "denied ({}){}",
                reason.as_str(),
                if reset { ", RST sent" } else { "" }
            ),
            EventKind::NewConnection { reason } => format!("new connection ({})", reason.as_str()),
        };
        println!(
            "   event: {} → {}  {what}  identity {} rule {}",
            e.source, e.destination, e.identity_id, e.rule_id
        );
    }
    for c in dp.counters()?.iter().filter(|c| c.service_id == api.get()) {
        for r in [Reason::AllowSession, Reason::NoSession, Reason::Expired] {
            let n = c.get(r);
            println!(
                "   counter tcp/{API_PORT} {:<12} {:>3} packets {:>5} bytes",
                r.as_str(),
                n.packets,
                n.bytes
            );
        }
        println!(
            "   counter tcp/{API_PORT} {:<12} {:>3} packets",
            "rst-sent", c.rst_sent.packets
        );
    }

    step(interrupted, "cleaning up")?;
    stop.store(true, Ordering::SeqCst);
    for s in servers {
        let _ = s.join();
    }
    drop(dp);
    drop(net);
    println!("   programs detached, namespaces removed");
    Ok(())
}

/// Connects from the client namespace and says what happened.
fn show(net: &Pair, addr: SocketAddr) {
    let started = Instant::now();
    let outcome = net.cli.run_in(|| -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(800))?;
        s.set_read_timeout(Some(Duration::from_millis(800)))?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    });
    let ms = started.elapsed().as_millis();
    match outcome {
        Ok(body) => println!("   client → {addr}: answered {:?} in {ms} ms", body.trim()),
        Err(e) => println!("   client → {addr}: {} after {ms} ms", e.kind()),
    }
}

fn serve(listener: &TcpListener, body: &str, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((mut conn, _)) => {
                let _ = conn.write_all(format!("{body}\n").as_bytes());
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
