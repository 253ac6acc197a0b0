//! Running the loaded programs on crafted packets through BPF_PROG_TEST_RUN.

use anyhow::{Context as _, Result, ensure};
use aya::{TestRun, TestRunOptions};
use idgate::dataplane::{Dataplane, LoadOptions};

/// XDP return codes.
pub mod xdp {
    /// XDP_DROP.
    pub const DROP: u32 = 1;
    /// XDP_PASS.
    pub const PASS: u32 = 2;
    /// XDP_TX.
    pub const TX: u32 = 3;
}

/// TC return codes, as the classifier uses them.
pub mod tc {
    /// TC_ACT_UNSPEC (TCX_NEXT): pass on.
    pub const NEXT: u32 = -1i32 as u32;
    /// TC_ACT_SHOT: drop.
    pub const SHOT: u32 = 2;
    /// TC_ACT_REDIRECT: the RST went back out.
    pub const REDIRECT: u32 = 7;
}

/// Which program to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// The XDP program.
    Xdp,
    /// The TC classifier.
    Tc,
}

/// The verdict a run produced, normalised across hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Let through.
    Pass,
    /// Dropped.
    Drop,
    /// Answered (RST sent back).
    Bounce,
}

/// What one run returned.
#[derive(Debug)]
pub struct Ran {
    /// Normalised verdict.
    pub outcome: Outcome,
    /// Packet after the program (the RST, for `Bounce`).
    pub data: Vec<u8>,
}

/// Fails with a clear message unless running as root (CI is root; the suites need the kernel).
pub fn require_root() {
    // SAFETY-free: geteuid via std is not available; read /proc instead.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("?");
    assert_eq!(
        euid, "0",
        "these suites load BPF programs and create network namespaces: run them as root, \
         through `cargo xtask test`"
    );
}

/// Loads the programs with default options, as root.
pub fn load() -> Dataplane {
    require_root();
    Dataplane::load(LoadOptions::default()).expect("loading the data plane")
}

/// Runs one packet through one hook.
pub fn run(dp: &Dataplane, hook: Hook, packet: &[u8]) -> Result<Ran> {
    let mut out = vec![0u8; packet.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        repeat: 1,
        ..Default::default()
    };
    let res = match hook {
        Hook::Xdp => dp.xdp_program()?.test_run(opts),
        Hook::Tc => dp.tc_program()?.test_run(opts),
    }
    .context("BPF_PROG_TEST_RUN")?;
    out.truncate(res.data_size_out as usize);
    let outcome = match (hook, res.return_value) {
        (Hook::Xdp, xdp::PASS) | (Hook::Tc, tc::NEXT) => Outcome::Pass,
        (Hook::Xdp, xdp::DROP) | (Hook::Tc, tc::SHOT) => Outcome::Drop,
        (Hook::Xdp, xdp::TX) | (Hook::Tc, tc::REDIRECT) => Outcome::Bounce,
        (h, rv) => anyhow::bail!("{h:?} returned unexpected code {rv}"),
    };
    ensure!(
        outcome != Outcome::Bounce || !out.is_empty(),
        "a bounced packet came back empty"
    );
    Ok(Ran { outcome, data: out })
}
