//! The packet generator: an AF_PACKET socket sending prebuilt frames with `sendmmsg` at a fixed
//! offered rate (this kernel has no pktgen), and a sniffer for the revocation benchmark.

use std::{
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

use crate::packet::Spec;

/// A raw AF_PACKET socket bound to one interface of the calling thread's namespace.
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// Opens a socket on `iface`: send-only unless `receive`, in which case it gets every IPv4
    /// frame the interface takes in (after XDP, which runs first).
    pub fn open(iface: &str, receive: bool) -> Result<PacketSocket> {
        let proto = if receive {
            (libc::ETH_P_IP as u16).to_be()
        } else {
            0
        };
        // SAFETY: plain system call; the result is checked before use.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        if raw < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let name = std::ffi::CString::new(iface)?;
        // SAFETY: a NUL-terminated name that outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            bail!("no interface {iface}: {}", std::io::Error::last_os_error());
        }
        // SAFETY: sockaddr_ll is plain data.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: `sll` is a valid sockaddr_ll of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const sll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            bail!("binding to {iface}: {}", std::io::Error::last_os_error());
        }
        let one: i32 = 1;
        if !receive {
            // Straight to the driver: no qdisc in the generator's cost.
            // SAFETY: an int option of the right size.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_QDISC_BYPASS,
                    (&raw const one).cast(),
                    4,
                );
            }
        } else {
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 50_000,
            };
            // SAFETY: a timeval option of the right size.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const tv).cast(),
                    size_of::<libc::timeval>() as u32,
                );
            }
        }
        Ok(PacketSocket { fd })
    }

    /// Sends `frames` with one `sendmmsg`; returns (sent, refused). A refused frame (the peer's
    /// ring was full) ends the call, as the kernel does; the caller moves past it.
    pub fn send_batch(&self, frames: &[&[u8]]) -> (usize, usize) {
        let mut iovs: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            })
            .collect();
        // SAFETY: mmsghdr is plain data; every pointer set below stays valid during the call.
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .map(|iov| {
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: `msgs` holds `len` initialised headers pointing at live buffers.
        let n =
            unsafe { libc::sendmmsg(self.fd.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as u32, 0) };
        if n < 0 {
            (0, 1)
        } else if (n as usize) < frames.len() {
            (n as usize, 1)
        } else {
            (n as usize, 0)
        }
    }

    /// Receives one frame into `buf`; `None` on timeout.
    pub fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        // SAFETY: `buf` is writable for its whole length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        (n > 0).then_some(n as usize)
    }
}

/// A tiny xorshift generator: reproducible spoofed sources without a dependency.
pub struct XorShift(u64);

impl XorShift {
    /// Seeded generator (seed must not be 0).
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.max(1))
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// What to flood with.
#[derive(Clone, Debug)]
pub struct Flood {
    /// The interface to send on (in the calling thread's namespace).
    pub iface: String,
    /// Source and destination MACs of the frames.
    pub src_mac: [u8; 6],
    /// The receiving interface's MAC: the frames must be addressed to it to reach IP.
    pub dst_mac: [u8; 6],
    /// The target address and port.
    pub dst: Ipv4Addr,
    /// Destination port.
    pub dport: u16,
    /// Offered rate, packets per second.
    pub rate: u64,
    /// Distinct (source address, source port) pairs, cycled.
    pub flows: usize,
}

/// What a flood sent.
#[derive(Clone, Copy, Debug, Default)]
pub struct FloodStats {
    /// Frames the kernel took.
    pub sent: u64,
    /// Frames refused (a full ring).
    pub refused: u64,
    /// How long it ran.
    pub elapsed: Duration,
}

/// Frames of SYNs from random sources in [`super::topo::SPOOF_NET`] to `f.dst:f.dport`.
pub fn spoofed_syns(f: &Flood) -> Vec<Vec<u8>> {
    let (base, prefix) = super::topo::SPOOF_NET;
    let span = 1u64 << (32 - prefix);
    let mut rng = XorShift::new(0x1d6a_7e5b_0c31_9f27);
    (0..f.flows)
        .map(|_| {
            let r = rng.next_u64();
            let src = Ipv4Addr::from(u32::from(base) + (r % span) as u32);
            let sport = 1024 + ((r >> 32) % 60_000) as u16;
            let mut frame = Spec::syn(IpAddr::V4(src), IpAddr::V4(f.dst), f.dport)
                .with_sport(sport)
                .build();
            frame[0..6].copy_from_slice(&f.dst_mac);
            frame[6..12].copy_from_slice(&f.src_mac);
            frame
        })
        .collect()
}

/// Sends `frames` round-robin at `rate` per second until `stop` is set or `limit` passes.
/// Pinned by the caller; paced in batches of 32 against the clock, so a late batch catches up.
pub fn run(
    iface: &str,
    frames: &[Vec<u8>],
    rate: u64,
    limit: Duration,
    stop: &AtomicBool,
) -> Result<FloodStats> {
    const BATCH: usize = 32;
    let sock = PacketSocket::open(iface, false)?;
    let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
    let start = Instant::now();
    let mut stats = FloodStats::default();
    let mut next = 0usize;
    let per_packet = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let mut offered: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let now = start.elapsed();
        if now >= limit {
            break;
        }
        let due = (now.as_secs_f64() * rate as f64) as u64;
        if offered >= due {
            let ahead = per_packet * (offered - due) as u32;
            if ahead > Duration::from_micros(200) {
                std::thread::sleep(ahead - Duration::from_micros(100));
            } else {
                std::hint::spin_loop();
            }
            continue;
        }
        let want = ((due - offered) as usize).min(BATCH);
        let mut batch = Vec::with_capacity(want);
        for _ in 0..want {
            batch.push(refs[next]);
            next = (next + 1) % refs.len();
        }
        let (sent, refused) = sock.send_batch(&batch);
        // A refused frame counts as offered: the rate is what was offered, not what fitted.
        let done = sent + refused;
        stats.sent += sent as u64;
        stats.refused += refused as u64;
        offered += done.max(1) as u64;
    }
    stats.elapsed = start.elapsed();
    Ok(stats)
}

/// A running flood on a thread of its own, pinned to [`super::topo::GEN_CPU`].
pub struct Running {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<FloodStats>>>,
}

impl Running {
    /// Starts flooding from `ns` with `frames` at `rate`, for at most `limit`.
    pub fn start(
        ns: &crate::netns::NetNs,
        iface: &str,
        frames: Arc<Vec<Vec<u8>>>,
        rate: u64,
        limit: Duration,
    ) -> Running {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let iface = iface.to_owned();
        let thread = ns.spawn_in(move || {
            super::cpu::pin(0, super::topo::GEN_CPU)?;
            run(&iface, &frames, rate, limit, &flag)
        });
        Running {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops it and returns what it sent.
    pub fn stop(mut self) -> Result<FloodStats> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("the generator panicked"))?,
            None => Ok(FloodStats::default()),
        }
    }

    /// Waits for it to end by itself (its time limit) and returns what it sent.
    pub fn join(mut self) -> Result<FloodStats> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("the generator panicked"))?,
            None => Ok(FloodStats::default()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
