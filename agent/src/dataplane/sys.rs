//! The few raw system calls aya 0.14 does not wrap: batched map updates and deletes, and the
//! monotonic clock the kernel side uses for expiry. All unsafe code of the agent lives here.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd},
    time::Duration,
};

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h). Shorter than the whole union,
/// which the kernel accepts: it zero-fills the rest.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Issues one bpf(2) command with `attr` (a prefix of `union bpf_attr`; the kernel zero-fills the
/// rest) and returns what it returned.
///
/// # Safety
///
/// `attr` must be the layout the command expects, and every pointer in it must stay valid for the
/// call, for the reads and writes that command does.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: upheld by the caller; `attr` is borrowed for the whole call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret)
}

/// Inserts or replaces `keys[i] → values[i]` in one `BPF_MAP_UPDATE_BATCH` call (kernel ≥ 5.6).
///
/// Returns how many elements the kernel processed; on error, the elements before that count were
/// written and the rest were not.
pub fn map_update_batch<K, V>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, io::Error)> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: u32::try_from(keys.len()).unwrap_or(u32::MAX),
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: `attr` points at `count` keys and values that stay borrowed for the call; the kernel
    // reads them and writes back only `attr.count`.
    unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr) }
        .map(|_| ())
        .map_err(|e| (attr.count as usize, e))
}

/// Deletes `keys` in one `BPF_MAP_DELETE_BATCH` call. Stops at the first missing key (ENOENT),
/// reporting how many it deleted before it.
pub fn map_delete_batch<K>(map: BorrowedFd<'_>, keys: &[K]) -> Result<(), (usize, io::Error)> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        count: u32::try_from(keys.len()).unwrap_or(u32::MAX),
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: as in `map_update_batch`; the kernel only reads the keys.
    unsafe { bpf(BPF_MAP_DELETE_BATCH, &mut attr) }
        .map(|_| ())
        .map_err(|e| (attr.count as usize, e))
}

/// `CLOCK_MONOTONIC_COARSE` now: the very clock the programs read (`bpf_ktime_get_coarse_ns`), so
/// an expiry computed here means the same instant to the kernel.
pub fn monotonic_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC_COARSE exists since Linux 2.6.32.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    assert_eq!(ret, 0, "clock_gettime(CLOCK_MONOTONIC_COARSE) cannot fail");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Registers an fd-owning object with tokio's reactor, for readability.
pub fn register_readable<T: std::os::fd::AsRawFd>(
    inner: T,
) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: `inner` owns its fd and the AsyncFd owns `inner`, so the fd stays open for as long
    // as it is registered and is deregistered before it is closed (AsyncFd's Drop runs first).
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE)
    }
    .map_err(io::Error::from)
}

const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_DETACH: libc::c_long = 34;

/// Detaches the bpf_link with this id now (`BPF_LINK_DETACH`), whoever else holds it open.
pub fn link_detach(link_id: u32) -> io::Result<()> {
    #[repr(C)]
    struct GetFdById {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    #[repr(C)]
    struct LinkDetach {
        link_fd: u32,
    }
    let mut get = GetFdById {
        id: link_id,
        next_id: 0,
        open_flags: 0,
    };
    // SAFETY: `get` is the attr prefix BPF_LINK_GET_FD_BY_ID reads; it holds no pointers.
    let fd = unsafe { bpf(BPF_LINK_GET_FD_BY_ID, &mut get) }?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    let mut detach = LinkDetach {
        link_fd: fd.as_raw_fd() as u32,
    };
    // SAFETY: `detach` is the attr prefix BPF_LINK_DETACH reads; `fd` stays open for the call.
    unsafe { bpf(BPF_LINK_DETACH, &mut detach) }.map(|_| ())
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;

/// `struct ethtool_drvinfo` (include/uapi/linux/ethtool.h).
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// `struct ifreq` with the `ifr_data` member of its union (padded to the union's 24 bytes).
#[repr(C)]
struct IfreqData {
    name: [u8; libc::IFNAMSIZ],
    data: *mut EthtoolDrvinfo,
    _pad: [u8; 16],
}

/// The driver behind `iface` in the calling thread's network namespace (`veth`, `virtio_net`,
/// `mlx5_core`, ...), as `ethtool -i` reports it. Needs no privilege.
pub fn driver_name(iface: &str) -> io::Result<String> {
    let bytes = iface.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: a plain socket(2) call; the descriptor is owned (and closed) below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nothing else.
    let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let mut info = EthtoolDrvinfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        n_priv_flags: 0,
        n_stats: 0,
        testinfo_len: 0,
        eedump_len: 0,
        regdump_len: 0,
    };
    let mut req = IfreqData {
        name: [0; libc::IFNAMSIZ],
        data: &mut info,
        _pad: [0; 16],
    };
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: SIOCETHTOOL with ETHTOOL_GDRVINFO reads the name and writes one ethtool_drvinfo
    // through `data`; both outlive the call.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut req as *mut IfreqData) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Ok(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}
