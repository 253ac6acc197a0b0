//! Benchmark 4: scale and churn. Sessions installed per second in batches and kernel memory per
//! session at 1k, 64k and 1M sessions, next to nftables set insertion and an fwknop-style
//! iptables chain (one rule per authorized address); then the receive CPU per packet with 10,
//! 1k and 100k authorized addresses for the three.

use std::{net::Ipv4Addr, time::Instant};

use anyhow::{Context as _, Result};
use idgate::dataplane::{Dataplane, Expiry, LoadOptions, Session};

use super::{
    Goal, Outcome, Plan, Table,
    drop::{self, PORT},
    peers::{self, Idgate, Rules},
    topo::{self, Topology},
};
use crate::netns::NetNs;

/// `n` distinct addresses in 100.64.0.0/10 (shared address space: never a flood source).
pub fn addresses(n: usize) -> Vec<Ipv4Addr> {
    let base = u32::from(Ipv4Addr::new(100, 64, 0, 0));
    // A stride coprime with 2^22 spreads them without repeats.
    (0..n as u32)
        .map(|i| Ipv4Addr::from(base + (i.wrapping_mul(2_654_435_761) & 0x3f_ffff)))
        .collect()
}

/// Kernel memory in use (Slab + VmallocUsed + Percpu from /proc/meminfo), bytes.
fn kernel_mem() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.starts_with("Slab:") || l.starts_with("VmallocUsed:") || l.starts_with("Percpu:")
        })
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum::<u64>()
        * 1024
}

/// The sessions map's `memlock` from this process's fdinfo (a hash map of `max` entries).
fn sessions_memlock(max: u32) -> Option<u64> {
    for e in std::fs::read_dir("/proc/self/fdinfo").ok()? {
        let Ok(text) = std::fs::read_to_string(e.ok()?.path()) else {
            continue;
        };
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_owned())
        };
        if field("map_type:").as_deref() == Some("1")
            && field("max_entries:").and_then(|v| v.parse::<u32>().ok()) == Some(max)
        {
            return field("memlock:").and_then(|v| v.parse().ok());
        }
    }
    None
}

/// Inserts `n` sessions in batches; returns (sessions/s, memlock bytes per session).
fn idgate_insert(n: usize) -> Result<(f64, f64)> {
    let mut dp = Dataplane::load(LoadOptions {
        max_sessions: n as u32,
        ..LoadOptions::default()
    })?;
    let svc = peers::service(1, PORT)?;
    dp.set_services(&[svc])?;
    let expires = Expiry::after(std::time::Duration::from_secs(3600));
    let sessions: Vec<Session> = addresses(n)
        .into_iter()
        .map(|a| Session {
            source: a.into(),
            service: svc.id,
            expires,
            identity_id: 1,
            rule_id: 1,
            idle: None,
        })
        .collect();
    let start = Instant::now();
    for chunk in sessions.chunks(16_384) {
        dp.upsert_sessions(chunk)?;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let memlock = sessions_memlock(n as u32).context("the sessions map's fdinfo")?;
    Ok((rate, memlock as f64 / n as f64))
}

/// Adds `n` addresses to an nftables set in one `nft -f` batch; (elements/s, bytes/element).
fn nft_insert(ns: &NetNs, n: usize) -> Result<(f64, f64)> {
    peers::nft_file(
        ns,
        "table inet bench {\n set allowed {\n  type ipv4_addr\n }\n}\n",
    )?;
    let elems = addresses(n)
        .iter()
        .map(Ipv4Addr::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mem0 = kernel_mem();
    let took = peers::nft_file(
        ns,
        &format!("add element inet bench allowed {{ {elems} }}\n"),
    )?;
    let mem = kernel_mem().saturating_sub(mem0);
    ns.exec("nft", &["flush", "ruleset"])?;
    Ok((n as f64 / took.as_secs_f64(), per_entry(mem, n)))
}

/// Loads an fwknop-style chain of `n` rules with iptables-legacy-restore; (rules/s, bytes/rule).
fn fwknop_insert(ns: &NetNs, n: usize) -> Result<(f64, f64)> {
    let text = peers::iptables_fwknop_chain(PORT, &addresses(n));
    let mem0 = kernel_mem();
    let took = peers::restore(ns, &text)?;
    let mem = kernel_mem().saturating_sub(mem0);
    ns.exec("iptables-legacy", &["-F"])?;
    ns.exec("iptables-legacy", &["-X"])?;
    Ok((n as f64 / took.as_secs_f64(), per_entry(mem, n)))
}

/// Bytes per entry, or NaN when other activity on the machine hid the growth.
fn per_entry(mem: u64, n: usize) -> f64 {
    if mem == 0 {
        f64::NAN
    } else {
        mem as f64 / n as f64
    }
}

/// Runs benchmark 4.
pub fn run(plan: &Plan) -> Result<Outcome> {
    let sizes: &[usize] = if plan.smoke {
        &[1_000, 4_096]
    } else {
        &[1_000, 65_536, 1_048_576]
    };
    let mut rate = Table::new(
        "scale_insert",
        "Authorizations installed per second (batched)",
        "entries/s",
        false,
    );
    let mut mem = Table::new(
        "scale_bytes",
        "Kernel memory per authorization",
        "bytes",
        true,
    );
    let ns = NetNs::new(&format!("idgb-{}-scale", std::process::id()))?;
    for &n in sizes {
        let label = |what: &str| format!("{what} @ {}", human(n));
        let (mut r, mut m) = (Vec::new(), Vec::new());
        for _ in 0..plan.runs {
            let (a, b) = idgate_insert(n)?;
            r.push(a);
            m.push(b);
        }
        rate.push(&label("idgate"), r);
        mem.push(&label("idgate"), m);
        let (mut r, mut m) = (Vec::new(), Vec::new());
        for _ in 0..plan.runs {
            let (a, b) = nft_insert(&ns, n)?;
            r.push(a);
            m.push(b);
        }
        rate.push(&label("nftables set"), r);
        mem.push(&label("nftables set"), m);
        // One million iptables rules take minutes to load: the chain stops at 64k.
        if n <= 65_536 {
            let (mut r, mut m) = (Vec::new(), Vec::new());
            for _ in 0..plan.runs {
                let (a, b) = fwknop_insert(&ns, n)?;
                r.push(a);
                m.push(b);
            }
            rate.push(&label("iptables fwknop chain"), r);
            mem.push(&label("iptables fwknop chain"), m);
        }
    }
    drop(ns);

    // Per-packet cost as the authorized set grows: the flood's sources are never authorized,
    // the worst case for a chain (every rule is tried).
    let counts: &[usize] = if plan.smoke {
        &[10, 1_000]
    } else {
        &[10, 1_000, 100_000]
    };
    let t = Topology::new()?;
    let flood_rate = drop::rate(plan);
    let frames = drop::frames(&t, flood_rate, 16_384)?;
    let mut cost = Table::new(
        "scale_packet_cost",
        "Receive CPU per flood packet vs authorized addresses",
        "ns/packet",
        true,
    );
    let window = plan.window / 2;
    for &n in counts {
        let allowed = addresses(n);
        let measure = |t: &Topology| -> Result<Vec<f64>> {
            let mut v = Vec::new();
            drop::measure(
                t,
                &frames,
                flood_rate,
                std::time::Duration::from_millis(200),
            )?;
            for _ in 0..plan.runs {
                v.push(drop::measure(t, &frames, flood_rate, window)?.ns_per_packet);
            }
            Ok(v)
        };
        let samples = {
            let _g = Idgate::start(
                &t.srv,
                &[topo::SRV_ATT_IF],
                idgate::dataplane::AttachMode::XdpNative,
                &[PORT],
                &allowed,
                (n as u32).max(1024),
            )?;
            measure(&t)?
        };
        cost.push(&format!("idgate @ {}", human(n)), samples);
        let samples = {
            let _r = Rules::nft(&t.srv, &peers::nft_address_set(&[PORT], &allowed))?;
            measure(&t)?
        };
        cost.push(&format!("nftables set @ {}", human(n)), samples);
        let samples = {
            let _r = Rules::iptables(&t.srv, &peers::iptables_fwknop_chain(PORT, &allowed))?;
            measure(&t)?
        };
        cost.push(&format!("iptables fwknop chain @ {}", human(n)), samples);
    }
    let big = *sizes.last().unwrap_or(&1);
    let ours = rate.median_of(&format!("idgate @ {}", human(big)));
    let nft = rate.median_of(&format!("nftables set @ {}", human(big)));
    let (lo, hi) = (counts[0], *counts.last().unwrap_or(&10));
    let flat = cost.median_of(&format!("idgate @ {}", human(hi)))
        / cost.median_of(&format!("idgate @ {}", human(lo)));
    let chain = cost.median_of(&format!("iptables fwknop chain @ {}", human(hi)))
        / cost.median_of(&format!("iptables fwknop chain @ {}", human(lo)));
    let mut o = Outcome::new("scale", "4. Scale and churn");
    o.goals = vec![
        Goal::check(
            &format!("idgate installs ≥ 2M sessions/s (at {})", human(big)),
            ours / 1e6,
            2.0,
            true,
            " M/s",
        ),
        Goal::check(
            &format!("idgate ≥ 2× nftables set insertion (at {})", human(big)),
            ours / nft,
            2.0,
            true,
            "×",
        ),
        Goal::check(
            &format!(
                "idgate's per-packet cost flat from {} to {} addresses (≤ 1.15×)",
                human(lo),
                human(hi)
            ),
            flat,
            1.15,
            false,
            "×",
        ),
    ];
    o.findings.push(format!(
        "Per-packet cost from {} to {} authorized addresses: idgate {flat:.2}×, fwknop-style \
         iptables chain {chain:.2}×.",
        human(lo),
        human(hi)
    ));
    o.method = vec![
        "idgate: sessions written with the data plane's batched BPF_MAP_UPDATE_BATCH in \
         batches of 16,384 into a map sized to the count; bytes per session from the map's \
         memlock (preallocated hash). nftables: one `nft -f` adding every element to an \
         ipv4_addr set. fwknop-style: one iptables-legacy-restore of a chain with one ACCEPT \
         rule per address. Peer memory: kernel Slab + VmallocUsed + Percpu before/after (noisy \
         on a busy machine; idgate's memlock is exact)."
            .into(),
        format!(
            "Per-packet cost: as benchmark 1 ({flood_rate} SYN/s offered, NAPI kthread CPU per \
             packet taken in), the flood's sources never authorized, so a chain tries every \
             rule; authorized addresses from 100.64.0.0/10. The nftables set is the one of \
             benchmark 2 (`flags interval`, so CIDRs fit: a tree lookup, which grows slowly \
             with the set; a plain hash set of /32s would stay flatter)."
        ),
    ];
    o.tables = vec![rate, mem, cost];
    Ok(o)
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}M", n >> 20),
        n if n >= 1024 && n % 1024 == 0 => format!("{}k", n >> 10),
        n if n >= 1000 && n % 1000 == 0 => format!("{}k", n / 1000),
        n => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn addresses_are_distinct() {
        let v = super::addresses(100_000);
        let set: std::collections::HashSet<_> = v.iter().collect();
        assert_eq!(set.len(), v.len());
    }
}
