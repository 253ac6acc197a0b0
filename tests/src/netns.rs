//! Network namespaces that delete themselves, threads that run inside them, and the two-namespace
//! topology the end-to-end suite runs in.
//!
//! Namespaces are created with iproute2 (`ip netns add`, so they live under `/var/run/netns`) and
//! entered per thread with setns(2): a namespace switch only affects the calling thread, so code
//! "in" a namespace runs on a thread of its own ([`NetNs::run_in`], [`NetNs::spawn_in`]). Sockets
//! stay in the namespace they were created in, whichever thread uses them later.
//!
//! Every guard cleans up in `Drop`, so a failing (panicking) test leaves nothing behind.

use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
};

use anyhow::{Context as _, Result, bail};

/// Per-process counter that makes namespace and interface names unique.
static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// Serialises `ip netns add` (a precaution): the first one on a host mounts `/var/run/netns`
/// shared, and concurrent first calls may race on that mount.
static CREATE: Mutex<()> = Mutex::new(());

/// A fresh id, unique within this process; combine it with [`std::process::id`] for names.
pub fn unique_id() -> usize {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Runs a command and fails with its stderr unless it exits successfully.
pub fn run_cmd(program: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// A named network namespace (`ip netns`), deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace `name` and brings its loopback up.
    pub fn new(name: &str) -> Result<NetNs> {
        {
            let _serial = CREATE.lock().unwrap_or_else(|e| e.into_inner());
            run_cmd("ip", &["netns", "add", name])?;
        }
        // From here on, `ns` deletes the namespace even if the rest of the setup fails.
        let ns = NetNs {
            name: name.to_owned(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <this namespace> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        let out = run_cmd("ip", &full)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `program args` inside the namespace (through `ip netns exec`); returns its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        let out = run_cmd("ip", &full)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `f` on a new thread that has entered this namespace, waits for it and returns its
    /// result. A panic in `f` is resumed in the caller, with its original message. `f` may
    /// borrow from the caller (a scoped thread), e.g. `&mut Dataplane` for an attach.
    pub fn run_in<R, F>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        thread::scope(|s| {
            let handle = thread::Builder::new()
                .name(format!("in-{}", self.name))
                .spawn_scoped(s, || {
                    enter(&self.name)
                        .unwrap_or_else(|e| panic!("entering namespace {}: {e}", self.name));
                    f()
                })
                .expect("spawning a thread");
            handle
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Spawns a long-running thread inside this namespace (e.g. a server). Stop and join it before
    /// the guard drops: deleting the name does not end a namespace a thread is still in.
    pub fn spawn_in<R, F>(&self, f: F) -> thread::JoinHandle<R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let name = self.name.clone();
        thread::Builder::new()
            .name(format!("in-{name}"))
            .spawn(move || {
                enter(&name).unwrap_or_else(|e| panic!("entering namespace {name}: {e}"));
                f()
            })
            .expect("spawning a thread")
    }
}

/// Moves the calling thread into the namespace `name`. Only for threads made for the purpose: such
/// a thread never goes back.
fn enter(name: &str) -> io::Result<()> {
    let file = File::open(format!("/var/run/netns/{name}"))?;
    // SAFETY: a plain system call on a file descriptor that stays open for the whole call.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run_cmd("ip", &["netns", "del", &self.name]) {
            // Never panic in drop (it may run during a panic); say what was left behind.
            eprintln!(
                "warning: could not delete network namespace {}: {e:#}",
                self.name
            );
        }
    }
}

/// Server-side IPv4 address of a [`Pair`].
pub const SRV_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// Client-side IPv4 address of a [`Pair`].
pub const CLI_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// Server-side IPv6 address of a [`Pair`].
pub const SRV_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// Client-side IPv6 address of a [`Pair`].
pub const CLI_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);

/// Two namespaces joined by a veth pair: `srv` (192.0.2.1/24, 2001:db8::1/64) and `cli`
/// (192.0.2.2/24, 2001:db8::2/64). Names are `idg-<pid>-<n>-srv` / `-cli`; interfaces
/// `i<pid>-<n>s` / `…c`. Dropping it deletes both namespaces, and with them the veth pair.
#[derive(Debug)]
pub struct Pair {
    /// The server's interface (in `srv`).
    pub srv_if: String,
    /// The client's interface (in `cli`).
    pub cli_if: String,
    /// The server's namespace.
    pub srv: NetNs,
    /// The client's namespace.
    pub cli: NetNs,
}

impl Pair {
    /// Creates the namespaces, the veth pair and the addresses, and brings everything up.
    pub fn new() -> Result<Pair> {
        let pid = std::process::id();
        let n = unique_id();
        let srv = NetNs::new(&format!("idg-{pid}-{n}-srv"))?;
        let cli = NetNs::new(&format!("idg-{pid}-{n}-cli"))?;
        let srv_if = format!("i{pid}-{n}s");
        let cli_if = format!("i{pid}-{n}c");
        assert!(
            srv_if.len() < libc::IFNAMSIZ,
            "interface name {srv_if} is too long"
        );
        // Created directly inside the namespaces: the interfaces never exist outside them.
        srv.ip(&[
            "link",
            "add",
            &srv_if,
            "type",
            "veth",
            "peer",
            "name",
            &cli_if,
            "netns",
            cli.name(),
        ])?;
        for (ns, ifname, v4, v6) in [
            (&srv, &srv_if, SRV_V4, SRV_V6),
            (&cli, &cli_if, CLI_V4, CLI_V6),
        ] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", ifname])?;
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                ifname,
                "nodad",
            ])?;
            ns.ip(&["link", "set", ifname, "up"])?;
        }
        Ok(Pair {
            srv_if,
            cli_if,
            srv,
            cli,
        })
    }

    /// The server's address in the given family.
    pub fn srv_addr(v6: bool) -> IpAddr {
        if v6 { SRV_V6.into() } else { SRV_V4.into() }
    }

    /// The client's address in the given family.
    pub fn cli_addr(v6: bool) -> IpAddr {
        if v6 { CLI_V6.into() } else { CLI_V4.into() }
    }
}
