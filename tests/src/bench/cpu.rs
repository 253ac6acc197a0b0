//! CPU accounting: the receive kthread of an interface, its pinning, and the CPU time it spent.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// Pins thread or process `pid` (0: the calling thread) to `cpu`.
pub fn pin(pid: i32, cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid, size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        bail!(
            "pinning {pid} to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The pid of the threaded-NAPI kthread of `iface` (`napi/<iface>-<id>`). Kthreads are not per
/// namespace, so the name must be unlikely elsewhere: the topology uses two-letter names.
pub fn napi_thread(iface: &str) -> Result<i32> {
    let prefix = format!("napi/{iface}-");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc")? {
            let entry = entry?;
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            if let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                && comm.trim().starts_with(&prefix)
            {
                found.push(pid);
            }
        }
        match found.as_slice() {
            [pid] => return Ok(*pid),
            // A namespace deleted just before is cleaned up asynchronously: its kthread may
            // linger for a moment next to the new one.
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            [] => bail!("no NAPI kthread {prefix}*: is threaded NAPI on?"),
            many => bail!("several NAPI kthreads named {prefix}*: {many:?}"),
        }
    }
}

/// Nanoseconds `pid` has run on a CPU (`/proc/<pid>/schedstat`, first field).
pub fn run_ns(pid: i32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .with_context(|| format!("reading /proc/{pid}/schedstat"))?;
    text.split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .context("schedstat format")
}

/// A receive kthread, pinned and measured.
#[derive(Clone, Copy, Debug)]
pub struct Napi {
    /// Its pid.
    pub pid: i32,
}

impl Napi {
    /// Finds the kthread of `iface` and pins it to `cpu`.
    pub fn pinned(iface: &str, cpu: usize) -> Result<Napi> {
        let pid = napi_thread(iface)?;
        pin(pid, cpu)?;
        Ok(Napi { pid })
    }

    /// Its CPU time so far, in nanoseconds.
    pub fn ns(&self) -> Result<u64> {
        run_ns(self.pid)
    }
}
