//! End to end: idgate's programs attached to a veth in a network namespace, judged by real TCP
//! and UDP traffic from a second namespace.
//!
//! Every scenario runs for each attach mode (native XDP, generic XDP, TC) and each address family,
//! the six cases in parallel, each in a topology of its own ([`Pair`]: namespaces `srv` and `cli`
//! joined by a veth pair, documentation addresses only). Nothing is sent outside those
//! namespaces, and every guard cleans up on drop, panics included.
//!
//! Needs root (CI runs it through `cargo xtask test`).

use std::{
    fmt,
    io::{self, BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, tc::TcAttachType};
use idgate::dataplane::{
    AttachMode, Attached, CidrAction, CidrRule, Dataplane, DataplaneError, DataplaneEvent,
    EventKind, EventReader, Expiry, LoadOptions, Protocol, Service, ServiceAction, ServiceCounters,
    ServiceId, Session,
};
use idgate_common::Reason;
use idgate_tests::{
    netns::{NetNs, Pair},
    run::require_root,
};
use ipnet::IpNet;

/// The protected TCP port (service 1).
const PROTECTED: u16 = 8000;
/// A second protected TCP port (service 2).
const OTHER_PROTECTED: u16 = 8001;
/// A TCP port no service names.
const UNPROTECTED: u16 = 9000;
/// The protected UDP port (service 3).
const UDP_PROTECTED: u16 = 5300;
/// A UDP port no service names.
const UDP_UNPROTECTED: u16 = 5301;

/// How long a connect or a receive waits where the test expects it to fail by timing out.
const BLOCKED_WAIT: Duration = Duration::from_millis(400);
/// How long a connect or a read may take where the test expects it to succeed (or be refused).
const GENEROUS: Duration = Duration::from_secs(3);
/// A refused connect must come back faster than this: a RST answers at once.
const REFUSED_WITHIN: Duration = Duration::from_millis(300);
/// Upper bound for any poll-wait on a condition.
const DEADLINE: Duration = Duration::from_secs(10);

/// The attach modes every scenario runs in.
const MODES: [AttachMode; 3] = [
    AttachMode::XdpNative,
    AttachMode::XdpGeneric,
    AttachMode::Tc,
];

fn id(n: u32) -> ServiceId {
    ServiceId::new(n).expect("a valid service id")
}

fn tcp_service(n: u32, port: u16, action: ServiceAction) -> Service {
    Service {
        id: id(n),
        protocol: Protocol::Tcp,
        port,
        action,
    }
}

/// One attach mode and one address family.
#[derive(Clone, Copy, Debug)]
struct Case {
    mode: AttachMode,
    v6: bool,
}

impl Case {
    fn all() -> Vec<Case> {
        MODES
            .iter()
            .flat_map(|&mode| [false, true].map(|v6| Case { mode, v6 }))
            .collect()
    }

    /// What `attach` must report for this mode on a veth (which supports native XDP).
    fn expected_attached(self) -> Attached {
        match self.mode {
            AttachMode::Xdp | AttachMode::XdpNative => Attached::XdpNative,
            AttachMode::XdpGeneric => Attached::XdpGeneric,
            // On a veth, which every case attaches to.
            AttachMode::Tc | AttachMode::Auto => Attached::Tc,
        }
    }
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.mode {
            AttachMode::Auto => "auto",
            AttachMode::Xdp => "xdp",
            AttachMode::XdpNative => "xdp-native",
            AttachMode::XdpGeneric => "xdp-generic",
            AttachMode::Tc => "tc",
        };
        write!(f, "{mode}/{}", if self.v6 { "ipv6" } else { "ipv4" })
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "(non-string panic)".to_owned())
}

/// Runs `body` for every case at once, each on a thread named after it; fails naming every case
/// that failed.
fn for_each_case(body: fn(Case)) {
    require_root();
    let results: Vec<(Case, thread::Result<()>)> = thread::scope(|s| {
        let handles: Vec<_> = Case::all()
            .into_iter()
            .map(|case| {
                let h = thread::Builder::new()
                    .name(case.to_string())
                    .spawn_scoped(s, move || body(case))
                    .expect("spawning a case thread");
                (case, h)
            })
            .collect();
        handles.into_iter().map(|(c, h)| (c, h.join())).collect()
    });
    let failed: Vec<String> = results
        .iter()
        .filter_map(|(c, r)| {
            r.as_ref()
                .err()
                .map(|p| format!("  {c}: {}", panic_message(&**p)))
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} cases failed:\n{}",
        failed.len(),
        results.len(),
        failed.join("\n")
    );
}

/// Polls `f` until it returns `Some`, failing after [`DEADLINE`].
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP server in a namespace: answers every connection with `hello <port>\n`, then closes it.
/// Stops and joins its thread on drop.
struct TcpServer {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<thread::JoinHandle<()>>,
}

impl TcpServer {
    fn start(ns: &NetNs, addr: SocketAddr) -> TcpServer {
        // The socket is created inside the namespace and stays there; the accept loop can run on
        // an ordinary thread.
        let listener = ns
            .run_in(|| TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("binding {addr} in {}: {e}", ns.name()));
        // Non-blocking, so the loop sees the stop flag.
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let greeting = greeting(addr.port());
        let thread = {
            let (stop, accepted) = (stop.clone(), accepted.clone());
            thread::Builder::new()
                .name(format!("server-{addr}"))
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match listener.accept() {
                            Ok((mut conn, _)) => {
                                accepted.fetch_add(1, Ordering::Relaxed);
                                let _ = conn.set_nonblocking(false);
                                let _ = conn.set_write_timeout(Some(GENEROUS));
                                // The client judges the outcome; a failed write shows there.
                                let _ = conn.write_all(greeting.as_bytes());
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                thread::sleep(Duration::from_millis(5));
                            }
                            Err(e) => panic!("accept on {addr}: {e}"),
                        }
                    }
                })
                .expect("spawning a server thread")
        };
        TcpServer {
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    /// Connections accepted so far.
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn greeting(port: u16) -> String {
    format!("hello {port}\n")
}

/// One case's world: a topology, TCP servers on every test port, and a data plane attached to
/// the server's interface. Fields drop in order: servers, data planes, then the namespaces.
struct Env {
    case: Case,
    servers: Vec<(u16, TcpServer)>,
    dp: Option<Dataplane>,
    /// A data plane with no services (so it passes everything) attached natively to the client's
    /// veth, for native-XDP cases; see [`Env::with_peer_xdp`].
    peer: Option<Dataplane>,
    net: Pair,
}

impl Env {
    /// Builds the topology, starts the servers, loads the programs with `services` and attaches
    /// them in the case's mode (checking the mode `attach` reports).
    fn new(case: Case, services: &[Service]) -> Env {
        Env::with_peer_xdp(
            case,
            services,
            case.expected_attached() == Attached::XdpNative,
        )
    }

    /// As [`Env::new`], choosing whether the client's veth gets an XDP program of its own.
    ///
    /// Native XDP on a veth sends an XDP_TX frame (idgate's RST) straight into the peer veth's
    /// NAPI ring, never through the peer's normal receive path:
    /// - with no NAPI on the peer (no XDP program there and GRO off, the default), `veth_xdp_xmit`
    ///   finds no ring and drops the frame (counted in the sender's `xdp_tx_errors`);
    /// - turning GRO on on the peer (`ethtool -K <peer> gro on`) gives it NAPI and a ring, and the
    ///   frame is queued and counted as `xdp_tx`, but `veth_xdp_flush` only schedules the peer's
    ///   NAPI when the peer has an XDP program (`rcv_rq->xdp_prog`), so the RST sits in the ring
    ///   and the client still times out (seen on 6.18; drivers/net/veth.c);
    /// - with an XDP program on the peer, the frame is flushed and the client gets the RST.
    ///
    /// So native-XDP cases attach a pass-all program to the client's veth: a second idgate data
    /// plane with no services, which protects nothing and passes every packet. Generic XDP and TC
    /// send their RSTs through the ordinary transmit path and need nothing on the peer.
    /// `native_xdp_reset_needs_an_xdp_program_on_the_peer` shows the difference.
    fn with_peer_xdp(case: Case, services: &[Service], peer_xdp: bool) -> Env {
        let net = Pair::new().expect("creating the namespaces and the veth pair");
        let servers = [PROTECTED, OTHER_PROTECTED, UNPROTECTED]
            .into_iter()
            .map(|port| {
                let addr = SocketAddr::new(Pair::srv_addr(case.v6), port);
                (port, TcpServer::start(&net.srv, addr))
            })
            .collect();
        let mut dp = Dataplane::load(LoadOptions::default()).expect("loading the data plane");
        dp.set_services(services).expect("setting the services");
        let mut env = Env {
            case,
            servers,
            dp: Some(dp),
            peer: None,
            net,
        };
        if peer_xdp {
            env.attach_peer_xdp();
        }
        env.attach();
        // Sanity, and neighbour resolution out of the way: a connect that must time out then
        // sends its SYN at once instead of waiting on ARP/ND under load.
        env.assert_open(UNPROTECTED, "the client reaches the server");
        env
    }

    /// Attaches a pass-all XDP program (natively) to the client's veth; see [`Env::with_peer_xdp`].
    fn attach_peer_xdp(&mut self) {
        let mut peer = Dataplane::load(LoadOptions::default()).expect("loading the peer program");
        let attached = self
            .net
            .cli
            .run_in(|| peer.attach(&self.net.cli_if, AttachMode::XdpNative))
            .expect("attaching the peer program");
        assert_eq!(attached, Attached::XdpNative);
        self.peer = Some(peer);
    }

    fn dp(&mut self) -> &mut Dataplane {
        self.dp.as_mut().expect("the data plane was dropped")
    }

    /// Attaches in the case's mode from inside `srv` (aya resolves the interface name in the
    /// calling thread's namespace) and checks the mode it ended up in.
    fn attach(&mut self) {
        let Env { case, dp, net, .. } = self;
        let dp = dp.as_mut().expect("the data plane was dropped");
        let attached = net
            .srv
            .run_in(|| dp.attach(&net.srv_if, case.mode))
            .unwrap_or_else(|e| panic!("attaching in {case}: {e}"));
        assert_eq!(
            attached,
            case.expected_attached(),
            "attach reported the wrong mode"
        );
        assert_eq!(dp.attachments(), vec![(net.srv_if.clone(), attached)]);
    }

    fn detach(&mut self) -> Result<(), DataplaneError> {
        let Env { dp, net, .. } = self;
        let dp = dp.as_mut().expect("the data plane was dropped");
        net.srv.run_in(|| dp.detach(&net.srv_if))
    }

    fn srv_ip(&self) -> IpAddr {
        Pair::srv_addr(self.case.v6)
    }

    fn cli_ip(&self) -> IpAddr {
        Pair::cli_addr(self.case.v6)
    }

    /// Another address in the client's subnet, not the client's.
    fn stranger_ip(&self) -> IpAddr {
        if self.case.v6 {
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 3))
        } else {
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 3))
        }
    }

    /// The client's subnet (covers the client).
    fn cli_subnet(&self) -> IpNet {
        let s = if self.case.v6 {
            "2001:db8::/64"
        } else {
            "192.0.2.0/24"
        };
        s.parse().expect("a valid network")
    }

    /// The client's address as a host route.
    fn cli_host_net(&self) -> IpNet {
        IpNet::from(self.cli_ip())
    }

    fn server(&self, port: u16) -> &TcpServer {
        &self
            .servers
            .iter()
            .find(|(p, _)| *p == port)
            .expect("a server on that port")
            .1
    }

    fn session(&self, source: IpAddr, service: u32, expires: Expiry) -> Session {
        Session {
            source,
            service: id(service),
            expires,
            identity_id: 4242,
            rule_id: 77,
            idle: None,
        }
    }

    /// Connects from `cli` to the server's `port`; returns the result and how long it took.
    fn connect(&self, port: u16, timeout: Duration) -> (io::Result<TcpStream>, Duration) {
        let to = SocketAddr::new(self.srv_ip(), port);
        self.net.cli.run_in(|| {
            let start = Instant::now();
            let r = TcpStream::connect_timeout(&to, timeout);
            (r, start.elapsed())
        })
    }

    /// Connects to `port` and reads the server's greeting; fails unless both work. Returns the
    /// client's end of the connection.
    #[track_caller]
    fn assert_open(&self, port: u16, why: &str) -> SocketAddr {
        let (r, _) = self.connect(port, GENEROUS);
        let conn = r.unwrap_or_else(|e| panic!("{why}: connecting to port {port} failed: {e}"));
        conn.set_read_timeout(Some(GENEROUS)).expect("read timeout");
        let local = conn.local_addr().expect("local address");
        let mut line = String::new();
        BufReader::new(&conn)
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("{why}: reading port {port}'s greeting failed: {e}"));
        assert_eq!(line, greeting(port), "{why}: wrong greeting on port {port}");
        local
    }

    /// Connects to `port`; fails unless the attempt times out (the SYN was dropped) without the
    /// server seeing a connection.
    #[track_caller]
    fn assert_dropped(&self, port: u16, why: &str) {
        let before = self.server(port).accepted();
        let (r, took) = self.connect(port, BLOCKED_WAIT);
        match r {
            Ok(_) => panic!("{why}: connecting to port {port} succeeded; it should time out"),
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                ),
                "{why}: connecting to port {port} failed with {e} ({:?}); it should time out",
                e.kind()
            ),
        }
        assert!(
            took >= BLOCKED_WAIT,
            "{why}: gave up after {took:?}, before the timeout"
        );
        assert_eq!(
            self.server(port).accepted(),
            before,
            "{why}: the server accepted anyway"
        );
    }

    /// Connects to `port`; fails unless the attempt is refused (a RST came back) at once.
    #[track_caller]
    fn assert_refused(&self, port: u16, why: &str) {
        let before = self.server(port).accepted();
        let (r, took) = self.connect(port, GENEROUS);
        match r {
            Ok(_) => panic!("{why}: connecting to port {port} succeeded; it should be refused"),
            Err(e) => assert_eq!(
                e.kind(),
                io::ErrorKind::ConnectionRefused,
                "{why}: connecting to port {port} failed with {e} after {took:?}; it should be \
                 refused"
            ),
        }
        assert!(
            took < REFUSED_WITHIN,
            "{why}: refusal took {took:?}, not at once"
        );
        assert_eq!(
            self.server(port).accepted(),
            before,
            "{why}: the server accepted anyway"
        );
    }

    /// Polls the service's counters until `pred` holds (a packet the client sent may still be on
    /// its way when the client gives up waiting); fails after [`DEADLINE`] showing the last read.
    fn wait_counters(
        &mut self,
        service: u32,
        what: &str,
        pred: impl Fn(&ServiceCounters) -> bool,
    ) -> ServiceCounters {
        let start = Instant::now();
        loop {
            let c = self.counters(service);
            if pred(&c) {
                return c;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{}: timed out waiting for {what}: {c:?}",
                self.case
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn counters(&mut self, service: u32) -> ServiceCounters {
        self.dp()
            .counters()
            .expect("reading counters")
            .into_iter()
            .find(|c| c.service_id == service)
            .expect("counters for the service")
    }

    /// The idgate program the server's interface shows, and how it is attached: XDP as
    /// `ip -d link` reports it, TC as a TCX ingress query reports it.
    fn hooked(&self) -> Option<Attached> {
        let link = self
            .net
            .srv
            .ip(&["-d", "link", "show", "dev", &self.net.srv_if])
            .expect("ip link show");
        let xdp = if !link.contains("prog/xdp") {
            None
        } else if link.contains(" xdpgeneric ") {
            Some(Attached::XdpGeneric)
        } else if link.contains(" xdp ") {
            Some(Attached::XdpNative)
        } else {
            panic!("an XDP program in an unexpected mode: {link}")
        };
        assert!(
            xdp.is_none() || link.contains("name idgate_xdp "),
            "another XDP program: {link}"
        );
        let (_, tcx) = self
            .net
            .srv
            .run_in(|| SchedClassifier::query_tcx(&self.net.srv_if, TcAttachType::Ingress))
            .expect("querying the TCX ingress programs");
        let names: Vec<_> = tcx.iter().map(|p| p.name_as_str()).collect();
        let tc = match names.as_slice() {
            [] => None,
            [Some("idgate_tc")] => Some(Attached::Tc),
            other => panic!("unexpected TCX ingress programs: {other:?}"),
        };
        assert!(xdp.is_none() || tc.is_none(), "attached both as XDP and TC");
        xdp.or(tc)
    }

    /// The server interface's index, as seen in `srv`.
    fn srv_ifindex(&self) -> u32 {
        let out = self
            .net
            .srv
            .ip(&["-o", "link", "show", "dev", &self.net.srv_if])
            .expect("ip link show");
        out.split(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no ifindex in {out:?}"))
    }
}

/// Drains `events` until `pred` matches one, with a deadline; returns it and everything drained.
fn wait_event(
    events: &mut EventReader,
    seen: &mut Vec<DataplaneEvent>,
    what: &str,
    pred: impl Fn(&DataplaneEvent) -> bool,
) -> DataplaneEvent {
    wait_for(what, || {
        seen.extend(events.drain());
        seen.iter().find(|e| pred(e)).cloned()
    })
}

/// A Drop service makes connects to its port time out, while an unprotected port keeps working.
#[test]
fn drop_service_times_out_while_other_ports_work() {
    for_each_case(|case| {
        let mut env = Env::new(case, &[tcp_service(1, PROTECTED, ServiceAction::Drop)]);
        env.assert_open(UNPROTECTED, "unprotected port before");
        env.assert_dropped(PROTECTED, "protected port without a session");
        env.assert_open(UNPROTECTED, "unprotected port after");
        let c = env.wait_counters(1, "the no-session drop to be counted", |c| {
            c.get(Reason::NoSession).packets >= 1
        });
        assert_eq!(c.rst_sent.packets, 0, "a Drop service sent a RST: {c:?}");
        assert_eq!(c.get(Reason::AllowSession).packets, 0, "{c:?}");
        // Traffic to unprotected ports (and ARP/ND) passes uncounted.
        let unattributed = env.counters(0);
        assert!(
            unattributed.by_reason.iter().all(|(_, n)| n.packets == 0),
            "unprotected traffic was counted: {unattributed:?}"
        );
    });
}

/// A Reset service refuses connects at once with a RST, and counts the RST it sent.
#[test]
fn reset_service_refuses_at_once() {
    for_each_case(|case| {
        let mut env = Env::new(case, &[tcp_service(1, PROTECTED, ServiceAction::Reset)]);
        env.assert_refused(PROTECTED, "protected port without a session");
        env.assert_open(UNPROTECTED, "unprotected port");
        let c = env.counters(1);
        assert!(c.rst_sent.packets >= 1, "no RST counted: {c:?}");
        assert!(
            c.get(Reason::NoSession).packets >= 1,
            "refusal not counted: {c:?}"
        );
    });
}

/// A session opens the port until it expires; then the kernel alone refuses new connections.
#[test]
fn session_opens_the_port_until_it_expires() {
    for_each_case(|case| {
        let mut env = Env::new(case, &[tcp_service(1, PROTECTED, ServiceAction::Drop)]);
        env.assert_dropped(PROTECTED, "before the session");
        let expires = Expiry::after(Duration::from_millis(1500));
        let session = env.session(env.cli_ip(), 1, expires);
        env.dp()
            .upsert_session(&session)
            .expect("upserting the session");
        env.assert_open(PROTECTED, "with a live session");
        assert!(
            expires.remaining() > Duration::ZERO,
            "the session expired before the connection was checked; the test is too slow"
        );
        wait_for("the session to expire", || {
            (expires.remaining() == Duration::ZERO).then_some(())
        });
        env.assert_dropped(PROTECTED, "after the session expired");
        // Nothing removed it: the kernel compared the expiry with its clock.
        let sessions = env.dp().sessions().expect("listing sessions");
        assert_eq!(
            sessions,
            vec![session],
            "the expired session should still be in the map"
        );
        let c = env.wait_counters(1, "the expired session's drop to be counted", |c| {
            c.get(Reason::Expired).packets >= 1
        });
        assert!(c.get(Reason::AllowSession).packets >= 1, "{c:?}");
    });
}

/// A bulk upload through a session arrives whole. The sender's TCP hands the veth segments of up
/// to 64 KiB (GSO), which reach the server's ingress as one skb whose IP length exceeds its linear
/// part: the parser must judge the datagram by the packet's length, not by the bytes it can read
/// directly (TC once dropped every such skb as malformed, stalling any transfer).
#[test]
fn bulk_uploads_through_a_session_arrive_whole() {
    const BULK: u16 = 8100;
    const BYTES: usize = 8 << 20;
    for_each_case(|case| {
        let mut env = Env::new(case, &[tcp_service(1, BULK, ServiceAction::Drop)]);
        let addr = SocketAddr::new(Pair::srv_addr(case.v6), BULK);
        let listener = env
            .net
            .srv
            .run_in(|| TcpListener::bind(addr))
            .expect("binding the bulk sink");
        // The sink counts what it receives until EOF and answers with the count.
        let sink = thread::spawn(move || -> io::Result<u64> {
            let (mut conn, _) = listener.accept()?;
            conn.set_read_timeout(Some(DEADLINE))?;
            let got = io::copy(&mut conn.try_clone()?, &mut io::sink())?;
            conn.write_all(format!("{got}\n").as_bytes())?;
            Ok(got)
        });
        let session = env.session(env.cli_ip(), 1, Expiry::after(Duration::from_secs(60)));
        env.dp()
            .upsert_session(&session)
            .expect("upserting the session");
        let (conn, _) = env.connect(BULK, GENEROUS);
        let mut conn = conn.unwrap_or_else(|e| panic!("connecting to the bulk sink: {e}"));
        conn.set_write_timeout(Some(DEADLINE))
            .expect("write timeout");
        conn.set_read_timeout(Some(DEADLINE)).expect("read timeout");
        let chunk = vec![0x5a_u8; 256 << 10];
        for _ in 0..BYTES / chunk.len() {
            conn.write_all(&chunk)
                .unwrap_or_else(|e| panic!("uploading through the session: {e}"));
        }
        conn.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut answer = String::new();
        BufReader::new(&conn)
            .read_line(&mut answer)
            .unwrap_or_else(|e| panic!("reading the sink's count: {e}"));
        let got = sink.join().expect("the sink thread").expect("the sink");
        assert_eq!(got, BYTES as u64, "bytes the server received");
        assert_eq!(answer.trim(), BYTES.to_string());
        let c = env.counters(1);
        assert!(c.get(Reason::Malformed).packets == 0, "{c:?}");
    });
}

/// A session with an idle timeout stays open while it carries traffic, and closes in the kernel
/// once it has carried none for that long, well before its expiry.
#[test]
fn idle_sessions_close_in_the_kernel() {
    for_each_case(|case| {
        let mut env = Env::new(case, &[tcp_service(1, PROTECTED, ServiceAction::Drop)]);
        let idle = Duration::from_millis(1800);
        let mut session = env.session(env.cli_ip(), 1, Expiry::after(Duration::from_secs(60)));
        session.idle = Some(idle);
        env.dp()
            .upsert_session(&session)
            .expect("upserting the session");
        // Traffic every 300 ms for three times the timeout: never idle long enough to close.
        let start = Instant::now();
        while start.elapsed() < 3 * idle {
            env.assert_open(PROTECTED, "while it carries traffic");
            thread::sleep(Duration::from_millis(300));
        }
        let listed = env.dp().sessions().expect("listing sessions");
        assert_eq!(listed, vec![session], "the kernel entry keeps its timeout");
        // Quiet for longer than the timeout: closed, though not expired.
        thread::sleep(idle + Duration::from_millis(500));
        env.assert_dropped(PROTECTED, "after idling past the timeout");
        let seen = env
            .dp()
            .last_seen(&[(session.source, session.service)])
            .expect("reading the activity")[0]
            .expect("the entry is still there");
        let quiet = Expiry::after(Duration::ZERO).as_ns() - seen.as_ns();
        assert!(
            quiet >= idle.as_nanos() as u64 && session.expires.remaining() > Duration::ZERO,
            "the entry is idle ({quiet} ns without traffic), not expired"
        );
        let c = env.wait_counters(1, "the idle session's drop to be counted", |c| {
            c.get(Reason::Expired).packets >= 1
        });
        assert!(c.get(Reason::AllowSession).packets >= 3, "{c:?}");
    });
}

/// A session opens only its own (source, service), and removing it closes the port again.
#[test]
fn sessions_are_specific_and_removable() {
    for_each_case(|case| {
        let mut env = Env::new(
            case,
            &[
                tcp_service(1, PROTECTED, ServiceAction::Drop),
                tcp_service(2, OTHER_PROTECTED, ServiceAction::Drop),
            ],
        );
        let later = Expiry::after(Duration::from_secs(60));
        let stranger = env.session(env.stranger_ip(), 1, later);
        let other_service = env.session(env.cli_ip(), 2, later);
        env.dp().upsert_session(&stranger).expect("upserting");
        env.dp().upsert_session(&other_service).expect("upserting");
        env.assert_open(
            OTHER_PROTECTED,
            "the other service, with the client's session for it",
        );
        env.assert_dropped(
            PROTECTED,
            "sessions for another address and another service only",
        );

        let own = env.session(env.cli_ip(), 1, later);
        env.dp().upsert_session(&own).expect("upserting");
        env.assert_open(PROTECTED, "with the client's own session");

        let cli = env.cli_ip();
        assert!(
            env.dp().remove_session(cli, id(1)).expect("removing"),
            "session was missing"
        );
        env.assert_dropped(PROTECTED, "after removing the session");
        env.assert_open(OTHER_PROTECTED, "the other service keeps its session");
        assert!(!env.dp().remove_session(cli, id(1)).expect("removing twice"));
    });
}

/// CIDR allow opens the port without a session; CIDR deny closes it despite a session or allow.
#[test]
fn cidr_rules_allow_and_deny() {
    for_each_case(|case| {
        let mut env = Env::new(case, &[tcp_service(1, PROTECTED, ServiceAction::Drop)]);
        let rule = |net: IpNet, action: CidrAction, rule_id: u32| CidrRule {
            service: id(1),
            net,
            action,
            rule_id,
        };
        let allow = rule(env.cli_subnet(), CidrAction::Allow, 11);
        let deny = rule(env.cli_host_net(), CidrAction::Deny, 12);

        env.dp().set_cidr_rules(&[allow]).expect("setting rules");
        env.assert_open(PROTECTED, "allowed by CIDR, no session");
        assert!(env.counters(1).get(Reason::AllowCidr).packets >= 1);

        let session = env.session(env.cli_ip(), 1, Expiry::after(Duration::from_secs(60)));
        env.dp().upsert_session(&session).expect("upserting");
        env.dp().set_cidr_rules(&[deny]).expect("setting rules");
        env.assert_dropped(PROTECTED, "denied by CIDR despite a session");
        env.dp()
            .set_cidr_rules(&[allow, deny])
            .expect("setting rules");
        env.assert_dropped(PROTECTED, "denied and allowed by CIDR: deny wins");
        env.wait_counters(1, "both CIDR denials to be counted", |c| {
            c.get(Reason::DeniedCidr).packets >= 2
        });

        env.dp().set_cidr_rules(&[]).expect("clearing rules");
        env.assert_open(
            PROTECTED,
            "the session works again once the deny rule is gone",
        );
    });
}

/// Datagrams to a protected UDP port arrive only with a session; Reset drops UDP silently.
#[test]
fn udp_needs_a_session() {
    for_each_case(|case| {
        let udp = Service {
            id: id(3),
            protocol: Protocol::Udp,
            port: UDP_PROTECTED,
            action: ServiceAction::Reset,
        };
        let mut env = Env::new(case, &[udp]);
        let (srv_ip, cli_ip) = (env.srv_ip(), env.cli_ip());
        let bind = |ns: &NetNs, addr: SocketAddr| {
            ns.run_in(|| UdpSocket::bind(addr))
                .expect("binding a UDP socket")
        };
        let protected = bind(&env.net.srv, SocketAddr::new(srv_ip, UDP_PROTECTED));
        let unprotected = bind(&env.net.srv, SocketAddr::new(srv_ip, UDP_UNPROTECTED));
        let client = bind(&env.net.cli, SocketAddr::new(cli_ip, 0));
        let recv = |s: &UdpSocket, wait: Duration| -> io::Result<(String, SocketAddr)> {
            s.set_read_timeout(Some(wait)).expect("read timeout");
            let mut buf = [0u8; 256];
            let (n, from) = s.recv_from(&mut buf)?;
            Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
        };
        let send = |msg: &str, port: u16| {
            client
                .send_to(msg.as_bytes(), SocketAddr::new(srv_ip, port))
                .expect("sending");
        };
        let client_addr = client.local_addr().expect("client address");

        // Control (it also resolves the neighbour, so later datagrams do not wait on it).
        send("control", UDP_UNPROTECTED);
        let got = recv(&unprotected, GENEROUS).expect("the unprotected port receives");
        assert_eq!(got, ("control".to_owned(), client_addr));

        // Long enough that a RST could be built in its place, were one wrongly attempted.
        send(&format!("no session{}", ".".repeat(100)), UDP_PROTECTED);
        match recv(&protected, BLOCKED_WAIT) {
            Ok(got) => panic!("a datagram arrived without a session: {got:?}"),
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ),
                "unexpected receive error {e}"
            ),
        }
        let c = env.wait_counters(3, "the UDP drop to be counted", |c| {
            c.get(Reason::NoSession).packets >= 1
        });
        assert_eq!(c.rst_sent.packets, 0, "a RST was counted for UDP: {c:?}");

        let session = env.session(cli_ip, 3, Expiry::after(Duration::from_secs(60)));
        env.dp().upsert_session(&session).expect("upserting");
        send("with session", UDP_PROTECTED);
        // The first datagram to arrive is this one: the earlier one was dropped, not delayed.
        let got = recv(&protected, GENEROUS).expect("the datagram should arrive with a session");
        assert_eq!(got, ("with session".to_owned(), client_addr));
    });
}

/// Detach lifts enforcement, re-attach restores it, dropping the data plane leaves no program.
#[test]
fn detach_and_drop_remove_the_program() {
    for_each_case(|case| {
        let mut env = Env::new(case, &[tcp_service(1, PROTECTED, ServiceAction::Drop)]);
        let expected = Some(case.expected_attached());
        assert_eq!(
            env.hooked(),
            expected,
            "what the interface shows after attach"
        );
        env.assert_dropped(PROTECTED, "attached");

        env.detach().expect("detaching");
        assert!(env.dp().attachments().is_empty());
        // At once, not polled: detach forces the link off (BPF_LINK_DETACH) even while a child
        // forked by another thread (a parallel case running `ip`) still holds its descriptor.
        assert_eq!(env.hooked(), None, "what the interface shows after detach");
        env.assert_open(PROTECTED, "detached: nothing else blocks the port");
        assert!(
            matches!(env.detach(), Err(DataplaneError::NotAttached(_))),
            "detaching twice should say it is not attached"
        );

        env.attach();
        assert_eq!(
            env.hooked(),
            expected,
            "what the interface shows after re-attaching"
        );
        env.assert_dropped(PROTECTED, "re-attached");

        drop(env.dp.take());
        assert_eq!(
            env.hooked(),
            None,
            "what the interface shows after dropping the data plane"
        );
        env.assert_open(PROTECTED, "after the data plane was dropped");
        // A new data plane can take the interface again (an XDP program left behind would make
        // this fail with EBUSY) and enforces again.
        env.dp = Some(Dataplane::load(LoadOptions::default()).expect("loading again"));
        env.dp()
            .set_services(&[tcp_service(1, PROTECTED, ServiceAction::Drop)])
            .expect("setting the services");
        env.attach();
        assert_eq!(
            env.hooked(),
            expected,
            "what the interface shows with a second data plane"
        );
        env.assert_dropped(PROTECTED, "a second data plane");
    });
}

/// A refused connect gives a Denied event; an allowed one a NewConnection with its identity.
#[test]
fn events_report_denials_and_new_connections() {
    for_each_case(|case| {
        let mut env = Env::new(case, &[tcp_service(1, PROTECTED, ServiceAction::Reset)]);
        let mut events = env.dp().take_events().expect("taking the event reader");
        assert!(
            env.dp().take_events().is_err(),
            "the reader can be taken only once"
        );
        let (cli_ip, srv_ip, ifindex) = (env.cli_ip(), env.srv_ip(), env.srv_ifindex());
        let mut seen = Vec::new();

        env.assert_open(UNPROTECTED, "unprotected port");
        env.assert_refused(PROTECTED, "without a session");
        let denied = wait_event(&mut events, &mut seen, "a Denied event", |e| {
            matches!(e.kind, EventKind::Denied { .. })
        });
        assert_eq!(
            denied.kind,
            EventKind::Denied {
                reason: Reason::NoSession,
                reset: true
            }
        );
        assert_eq!(denied.source.ip(), cli_ip);
        assert_eq!(denied.destination, SocketAddr::new(srv_ip, PROTECTED));
        assert_eq!(
            (denied.service_id, denied.protocol, denied.identity_id),
            (1, 6, 0)
        );
        assert_eq!(
            denied.tcp_flags & 0x12,
            0x02,
            "the refused packet was a SYN"
        );
        assert_eq!(denied.ifindex, ifindex);

        let session = env.session(cli_ip, 1, Expiry::after(Duration::from_secs(60)));
        env.dp().upsert_session(&session).expect("upserting");
        let local = env.assert_open(PROTECTED, "with a session");
        let new = wait_event(&mut events, &mut seen, "a NewConnection event", |e| {
            matches!(e.kind, EventKind::NewConnection { .. })
        });
        assert_eq!(
            new.kind,
            EventKind::NewConnection {
                reason: Reason::AllowSession
            }
        );
        assert_eq!(
            (new.identity_id, new.rule_id, new.service_id),
            (4242, 77, 1)
        );
        assert_eq!(
            new.source, local,
            "the event names the client's end of the connection"
        );
        assert_eq!(new.destination, SocketAddr::new(srv_ip, PROTECTED));

        seen.extend(events.drain());
        assert!(
            seen.iter().all(|e| e.destination.port() == PROTECTED),
            "events for other ports: {seen:?}"
        );
        let denials = seen
            .iter()
            .filter(|e| matches!(e.kind, EventKind::Denied { .. }))
            .count();
        assert_eq!(denials, 1, "one refused SYN, one Denied event: {seen:?}");
    });
}

/// `AttachMode::Xdp` on a veth (whose driver supports XDP) attaches natively, and enforces.
#[test]
fn xdp_mode_attaches_natively_on_veth() {
    require_root();
    for v6 in [false, true] {
        let case = Case {
            mode: AttachMode::Xdp,
            v6,
        };
        // `Env::attach` asserts the reported mode is XdpNative; check what the kernel shows too.
        let env = Env::new(case, &[tcp_service(1, PROTECTED, ServiceAction::Reset)]);
        assert_eq!(env.hooked(), Some(Attached::XdpNative), "{case}");
        env.assert_refused(PROTECTED, &format!("{case}"));
    }
}

/// The default mode, `auto`, picks TC on a veth (the clean-path benchmark's measured best there)
/// and enforces as TC does.
#[test]
fn auto_mode_attaches_tc_on_veth() {
    require_root();
    for v6 in [false, true] {
        let case = Case {
            mode: AttachMode::Auto,
            v6,
        };
        let env = Env::new(case, &[tcp_service(1, PROTECTED, ServiceAction::Reset)]);
        assert_eq!(env.hooked(), Some(Attached::Tc), "{case}");
        env.assert_refused(PROTECTED, &format!("{case}"));
    }
}

/// Native XDP on veth: the RST (XDP_TX) reaches the client only if the peer veth runs XDP too.
#[test]
fn native_xdp_reset_needs_an_xdp_program_on_the_peer() {
    require_root();
    for v6 in [false, true] {
        let case = Case {
            mode: AttachMode::XdpNative,
            v6,
        };
        let services = [tcp_service(1, PROTECTED, ServiceAction::Reset)];
        let mut env = Env::with_peer_xdp(case, &services, false);
        env.assert_dropped(PROTECTED, &format!("{case}, peer without XDP"));
        // The program returned XDP_TX and counted the RST as sent; the veth lost it afterwards
        // (the server veth's `xdp_tx_errors`), which no XDP program can see.
        env.wait_counters(1, "the program to send a RST", |c| c.rst_sent.packets >= 1);
        env.attach_peer_xdp();
        env.assert_refused(PROTECTED, &format!("{case}, peer with XDP"));
    }
}

/// A child process holding copies of this process's file descriptors (as any fork does until it
/// execs), killed and reaped on drop.
struct ForkedFds(libc::pid_t);

impl ForkedFds {
    fn spawn() -> ForkedFds {
        // SAFETY: after fork in a multithreaded process the child may only call async-signal-safe
        // functions; it calls alarm and pause until it is killed.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: async-signal-safe. SIGALRM ends the child should the parent die without
            // killing it; SIGKILL from `drop` ends it otherwise.
            unsafe {
                libc::alarm(30);
                loop {
                    libc::pause();
                }
            }
        }
        ForkedFds(pid)
    }
}

impl Drop for ForkedFds {
    fn drop(&mut self) {
        // SAFETY: plain system calls on our own child.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
            libc::waitpid(self.0, std::ptr::null_mut(), 0);
        }
    }
}

/// Detach and drop take effect at once, even while another process shares the link's descriptor.
///
/// Fails today: `Dataplane::detach` (and dropping the data plane) only close aya's link fd, and
/// the kernel detaches a bpf_link when the last reference to it goes. Any other holder keeps the
/// program attached and enforcing after `detach` has returned `Ok`: a child between fork and
/// exec (every `Command::spawn` by another thread of the agent), or a tool that opened the link
/// by id (`bpftool link`). BPF_LINK_DETACH on the link fd detaches regardless of other holders.
#[test]
fn detach_is_immediate_while_the_link_fd_is_shared() {
    require_root();
    let mut problems = Vec::new();
    for mode in MODES {
        let case = Case { mode, v6: false };
        let mut env = Env::new(case, &[tcp_service(1, PROTECTED, ServiceAction::Reset)]);

        let child = ForkedFds::spawn();
        env.detach().expect("detaching");
        let still = env.hooked();
        let (r, _) = env.connect(PROTECTED, GENEROUS);
        drop(child);
        if still.is_some() {
            let kind = r
                .map(|_| "connected".to_owned())
                .unwrap_or_else(|e| format!("{e}"));
            problems.push(format!(
                "{case}: detach returned Ok but the program is still attached ({still:?}); a \
                 connect to the protected port got: {kind}"
            ));
        }
        wait_for("the detach to take effect", || {
            env.hooked().is_none().then_some(())
        });

        env.attach();
        let child = ForkedFds::spawn();
        drop(env.dp.take());
        let still = env.hooked();
        drop(child);
        if still.is_some() {
            problems.push(format!(
                "{case}: the data plane was dropped but the program is still attached ({still:?})"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
