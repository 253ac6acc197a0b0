//! Restart-safe enforcement: with a pin directory, dropping the data plane (as a crash would)
//! leaves the programs attached and the sessions in place; the next load reuses the maps and
//! swaps its programs in through the pinned links with no moment unenforced; an incompatible
//! pinned layout is refused; `cleanup` detaches everything and removes the directory.
//!
//! Needs root. Each test pins under its own directory below /sys/fs/bpf and removes it.

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use aya::{
    maps::{Array, Map, MapData},
    programs::links::{FdLink, PinnedLink},
};
use idgate::dataplane::{
    self, AttachMode, Attached, Dataplane, Expiry, LoadOptions, Protocol, Service, ServiceAction,
    ServiceId, Session,
};
use idgate_tests::{
    netns::{NetNs, Pair, unique_id},
    run::require_root,
};

const PROTECTED: u16 = 8000;
const NO_SESSION: u16 = 8001;
const BLOCKED_WAIT: Duration = Duration::from_millis(300);
const GENEROUS: Duration = Duration::from_secs(3);

/// A unique pin directory under /sys/fs/bpf, cleaned up (detached and removed) on drop.
struct PinDir(PathBuf);

impl PinDir {
    fn new() -> PinDir {
        PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/idgate-test-{}-{}",
            std::process::id(),
            unique_id()
        )))
    }

    fn options(&self) -> LoadOptions {
        LoadOptions {
            pin_dir: Some(self.0.clone()),
            ..LoadOptions::default()
        }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = dataplane::cleanup(&self.0) {
            eprintln!("warning: cleaning up {}: {e}", self.0.display());
        }
    }
}

fn services() -> Vec<Service> {
    [(1, PROTECTED), (2, NO_SESSION)]
        .into_iter()
        .map(|(id, port)| Service {
            id: ServiceId::new(id).expect("a valid id"),
            protocol: Protocol::Tcp,
            port,
            action: ServiceAction::Drop,
        })
        .collect()
}

fn greeting(port: u16) -> String {
    format!("hello {port}\n")
}

/// TCP servers in `ns` on `ports`, answering every connection with a greeting, until dropped.
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Servers {
    fn start(ns: &NetNs, ports: &[u16]) -> Servers {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = ports
            .iter()
            .map(|&port| {
                let addr = SocketAddr::new(Pair::srv_addr(false), port);
                let listener = ns
                    .run_in(|| TcpListener::bind(addr))
                    .unwrap_or_else(|e| panic!("binding {addr}: {e}"));
                listener.set_nonblocking(true).expect("non-blocking");
                let stop = stop.clone();
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match listener.accept() {
                            Ok((mut c, _)) => {
                                let _ = c.set_nonblocking(false);
                                let _ = c.write_all(greeting(port).as_bytes());
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                                thread::sleep(Duration::from_millis(2));
                            }
                            Err(e) => panic!("accept on {addr}: {e}"),
                        }
                    }
                })
            })
            .collect();
        Servers { stop, threads }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Connects to the server's `port` and reads the greeting; `Ok` only if both work.
fn fetch(port: u16, timeout: Duration) -> io::Result<()> {
    let to = SocketAddr::new(Pair::srv_addr(false), port);
    let conn = TcpStream::connect_timeout(&to, timeout)?;
    conn.set_read_timeout(Some(GENEROUS))?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    if line != greeting(port) {
        return Err(io::Error::other(format!("wrong greeting {line:?}")));
    }
    Ok(())
}

fn is_open(net: &Pair, port: u16, timeout: Duration) -> bool {
    net.cli.run_in(|| fetch(port, timeout)).is_ok()
}

/// The program id behind the link pinned for `iface`.
fn pinned_program_id(dir: &Path, iface: &str, attached: Attached) -> u32 {
    let path = dir.join("links").join(format!("{iface}@{attached}"));
    let link = PinnedLink::from_pin(&path)
        .unwrap_or_else(|e| panic!("opening the pinned link {}: {e}", path.display()));
    FdLink::from(link)
        .info()
        .expect("reading the link")
        .program_id()
}

/// Loops run from the client while the programs are replaced.
struct Probes {
    stop: Arc<AtomicBool>,
    /// Connections to the port without a session that got through (must stay 0), and attempts.
    leaked: Arc<AtomicUsize>,
    unauth_attempts: Arc<AtomicUsize>,
    /// Connections with a session that failed (must stay 0), and attempts.
    failed: Arc<AtomicUsize>,
    auth_attempts: Arc<AtomicUsize>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Probes {
    fn start(ns: &NetNs) -> Probes {
        let stop = Arc::new(AtomicBool::new(false));
        let counters: [Arc<AtomicUsize>; 4] = Default::default();
        let mut threads = Vec::new();
        for _ in 0..3 {
            let (stop, leaked, attempts) = (stop.clone(), counters[0].clone(), counters[1].clone());
            threads.push(ns.spawn_in(move || {
                while !stop.load(Ordering::Relaxed) {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    if fetch(NO_SESSION, Duration::from_millis(100)).is_ok() {
                        leaked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        {
            let (stop, failed, attempts) = (stop.clone(), counters[2].clone(), counters[3].clone());
            threads.push(ns.spawn_in(move || {
                while !stop.load(Ordering::Relaxed) {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = fetch(PROTECTED, GENEROUS) {
                        eprintln!("authenticated connection failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        let [leaked, unauth_attempts, failed, auth_attempts] = counters;
        Probes {
            stop,
            leaked,
            unauth_attempts,
            failed,
            auth_attempts,
            threads,
        }
    }

    /// Stops the loops; returns (leaked, unauthenticated attempts, failed, authenticated attempts).
    fn finish(mut self) -> (usize, usize, usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().expect("a probe thread panicked");
        }
        (
            self.leaked.load(Ordering::Relaxed),
            self.unauth_attempts.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.auth_attempts.load(Ordering::Relaxed),
        )
    }
}

fn restart_keeps_enforcement(mode: AttachMode, expected: Attached) {
    require_root();
    let pins = PinDir::new();
    let net = Pair::new().expect("creating the namespaces");
    let _servers = Servers::start(&net.srv, &[PROTECTED, NO_SESSION]);

    // First run: attach, one session for the client on PROTECTED only.
    let mut dp = Dataplane::load(pins.options()).expect("loading, pinned");
    dp.set_services(&services()).expect("services");
    let attached = net
        .srv
        .run_in(|| dp.attach(&net.srv_if, mode))
        .expect("attaching");
    assert_eq!(attached, expected);
    let session = Session {
        source: Pair::cli_addr(false),
        service: ServiceId::new(1).expect("id"),
        expires: Expiry::after(Duration::from_secs(600)),
        identity_id: 7,
        rule_id: 9,
        idle: None,
    };
    dp.upsert_session(&session).expect("a session");
    assert!(
        is_open(&net, PROTECTED, GENEROUS),
        "the session opens the port"
    );
    assert!(
        !is_open(&net, NO_SESSION, BLOCKED_WAIT),
        "no session, closed"
    );
    let first_prog = pinned_program_id(&pins.0, &net.srv_if, expected);

    // "Crash": the data plane goes away without detaching.
    drop(dp);
    assert!(
        !is_open(&net, NO_SESSION, BLOCKED_WAIT),
        "still enforced after the data plane is gone"
    );
    assert!(
        is_open(&net, PROTECTED, GENEROUS),
        "the session still works after the data plane is gone"
    );

    // Second run, while clients keep connecting.
    let probes = Probes::start(&net.cli);
    thread::sleep(Duration::from_millis(300));
    let mut dp = Dataplane::load(pins.options()).expect("loading again over the pinned maps");
    let sessions = dp.sessions().expect("listing sessions");
    assert_eq!(sessions.len(), 1, "the session survived: {sessions:?}");
    assert_eq!(sessions[0].source, Pair::cli_addr(false));
    assert_eq!(
        dp.services().len(),
        2,
        "the services were recovered from the pinned maps"
    );
    dp.set_services(&services()).expect("services again");
    let attached = net
        .srv
        .run_in(|| dp.attach(&net.srv_if, mode))
        .expect("taking over the pinned link");
    assert_eq!(attached, expected);
    thread::sleep(Duration::from_millis(300));
    let (leaked, unauth, failed, auth) = probes.finish();
    eprintln!("{mode:?}: {unauth} probes without a session, {auth} with one");
    let second_prog = pinned_program_id(&pins.0, &net.srv_if, expected);
    assert_ne!(first_prog, second_prog, "the new program replaced the old");
    assert!(unauth > 3 && auth > 3, "too few probes ({unauth}, {auth})");
    assert_eq!(
        leaked, 0,
        "{leaked} of {unauth} connections without a session got through during the replacement"
    );
    assert_eq!(
        failed, 0,
        "{failed} of {auth} connections with a session failed during the replacement"
    );
    assert_eq!(dp.attachments(), vec![(net.srv_if.clone(), expected)]);

    // Cleanup ends enforcement and removes the directory.
    let detached = dataplane::cleanup(&pins.0).expect("cleanup");
    assert_eq!(detached, vec![format!("{}@{expected}", net.srv_if)]);
    assert!(!pins.0.exists(), "the pin directory is gone");
    assert!(
        is_open(&net, NO_SESSION, GENEROUS),
        "cleanup detached the program"
    );
    drop(dp);
}

#[test]
fn xdp_restart_keeps_sessions_and_replaces_without_a_gap() {
    restart_keeps_enforcement(AttachMode::XdpNative, Attached::XdpNative);
}

#[test]
fn tc_restart_keeps_sessions_and_replaces_without_a_gap() {
    restart_keeps_enforcement(AttachMode::Tc, Attached::Tc);
}

fn refused(pins: &PinDir) -> String {
    match Dataplane::load(pins.options()) {
        Ok(_) => panic!("an incompatible pinned layout was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn wrong_layout_version_is_refused() {
    require_root();
    let pins = PinDir::new();
    drop(Dataplane::load(pins.options()).expect("loading, pinned"));
    let data = MapData::from_pin(pins.0.join(idgate_common::maps::CONFIG)).expect("pinned config");
    let mut config: Array<MapData, idgate_common::GlobalConfig> =
        Array::try_from(Map::Array(data)).expect("typed config");
    let mut cfg = config.get(&0, 0).expect("reading config");
    cfg.layout_version = 999;
    config.set(0, cfg, 0).expect("writing config");
    drop(config);

    let msg = refused(&pins);
    let ours = idgate_common::MAP_LAYOUT_VERSION;
    for want in [
        "layout version is 999".to_owned(),
        format!("this build's is {ours}"),
        "idgate cleanup".to_owned(),
    ] {
        assert!(msg.contains(&want), "{msg:?} lacks {want:?}");
    }
    // The refusal changed nothing: the version is still the wrong one, the maps still pinned.
    assert!(pins.0.join(idgate_common::maps::SESSIONS).exists());
}

#[test]
fn wrong_map_shape_is_refused() {
    require_root();
    let pins = PinDir::new();
    drop(Dataplane::load(pins.options()).expect("loading, pinned"));
    // Put a map of another shape where the sessions map is expected.
    let sessions = pins.0.join(idgate_common::maps::SESSIONS);
    std::fs::remove_file(&sessions).expect("unpinning the sessions map");
    std::fs::hard_link(pins.0.join(idgate_common::maps::PORTS), &sessions)
        .or_else(|_| {
            // bpffs may refuse hard links: pin the ports map again under the sessions name.
            MapData::from_pin(pins.0.join(idgate_common::maps::PORTS))
                .expect("pinned ports")
                .pin(&sessions)
                .map_err(io::Error::other)
        })
        .expect("faking the sessions map");

    let msg = refused(&pins);
    for want in [
        idgate_common::maps::SESSIONS,
        "4-byte values",
        "idgate cleanup",
    ] {
        assert!(msg.contains(want), "{msg:?} lacks {want:?}");
    }
}

/// Replaces the pinned sessions map in `pins` by a version-1 one (16-byte values: expiry,
/// identity id, rule id) holding `entries`, pinned at `at`, and marks the layout as version 1.
fn fake_v1_sessions(pins: &PinDir, at: &Path, entries: &[Session]) {
    use aya::maps::HashMap;
    const KEY: usize = std::mem::size_of::<idgate_common::SessionKey>();
    let mut v1: HashMap<MapData, [u8; KEY], [u8; idgate_common::SESSION_VALUE_V1_SIZE]> =
        HashMap::create(1024, 0).expect("creating a version-1 sessions map");
    for s in entries {
        let mut key = [0u8; KEY];
        key[..16].copy_from_slice(&dataplane::addr_to_kernel(s.source));
        key[16..].copy_from_slice(&s.service.get().to_ne_bytes());
        let mut value = [0u8; idgate_common::SESSION_VALUE_V1_SIZE];
        value[..8].copy_from_slice(&s.expires.as_ns().to_ne_bytes());
        value[8..12].copy_from_slice(&s.identity_id.to_ne_bytes());
        value[12..].copy_from_slice(&s.rule_id.to_ne_bytes());
        v1.insert(key, value, 0).expect("a version-1 entry");
    }
    let sessions = pins.0.join(idgate_common::maps::SESSIONS);
    if at == sessions {
        std::fs::remove_file(&sessions).expect("unpinning the sessions map");
    }
    v1.pin(at).expect("pinning the version-1 map");
    let data = MapData::from_pin(pins.0.join(idgate_common::maps::CONFIG)).expect("pinned config");
    let mut config: Array<MapData, idgate_common::GlobalConfig> =
        Array::try_from(Map::Array(data)).expect("typed config");
    let mut cfg = config.get(&0, 0).expect("reading config");
    cfg.layout_version = 1;
    config.set(0, cfg, 0).expect("writing config");
}

fn layout_version(pins: &PinDir) -> u32 {
    let data = MapData::from_pin(pins.0.join(idgate_common::maps::CONFIG)).expect("pinned config");
    let config: Array<MapData, idgate_common::GlobalConfig> =
        Array::try_from(Map::Array(data)).expect("typed config");
    config.get(&0, 0).expect("reading config").layout_version
}

/// Pins of map layout version 1 (session values without the idle-timeout fields) are migrated
/// in place: every session is kept, with its expiry, identity and rule, and opens its port; the
/// temporary `@v1` pin is gone and the layout says 2. An interrupted migration (the `@v1` pin
/// left beside a new sessions map) resumes.
#[test]
fn version_1_sessions_are_migrated() {
    require_root();
    let net = Pair::new().expect("creating the namespaces");
    let _servers = Servers::start(&net.srv, &[PROTECTED, NO_SESSION]);
    let session = Session {
        source: Pair::cli_addr(false),
        service: ServiceId::new(1).expect("id"),
        expires: Expiry::after(Duration::from_secs(600)),
        identity_id: 7,
        rule_id: 9,
        idle: None,
    };
    let other = Session {
        source: "2001:db8::77".parse().expect("address"),
        service: ServiceId::new(2).expect("id"),
        identity_id: 8,
        rule_id: 3,
        ..session
    };
    let v1_pin = |pins: &PinDir| pins.0.join(format!("{}@v1", idgate_common::maps::SESSIONS));
    for interrupted in [false, true] {
        let pins = PinDir::new();
        let mut dp = Dataplane::load(pins.options()).expect("loading, pinned");
        dp.set_services(&services()).expect("services");
        drop(dp);
        let at = if interrupted {
            v1_pin(&pins)
        } else {
            pins.0.join(idgate_common::maps::SESSIONS)
        };
        fake_v1_sessions(&pins, &at, &[session, other]);

        let mut dp = Dataplane::load(pins.options())
            .unwrap_or_else(|e| panic!("migrating (interrupted: {interrupted}): {e}"));
        let mut got = dp.sessions().expect("listing sessions");
        got.sort_by_key(|s| s.source);
        assert_eq!(got, [session, other], "interrupted: {interrupted}");
        assert!(!v1_pin(&pins).exists(), "the @v1 pin is left");
        assert_eq!(layout_version(&pins), idgate_common::MAP_LAYOUT_VERSION);
        let attached = net
            .srv
            .run_in(|| dp.attach(&net.srv_if, AttachMode::XdpNative))
            .expect("attaching");
        assert_eq!(attached, Attached::XdpNative);
        assert!(
            is_open(&net, PROTECTED, GENEROUS),
            "the migrated session opens its port"
        );
        assert!(!is_open(&net, NO_SESSION, BLOCKED_WAIT), "and nothing else");
        drop(dp);
    }
}
