//! The benchmark topology: three network namespaces, an attacker (`att`), an authorized client
//! (`cli`) and the protected server (`srv`), the server joined to each by its own veth pair.
//!
//! ```text
//!   att: a0 198.51.100.2 ──── ba 198.51.100.1 ┐
//!                                             srv (idgate / peers on ba and bc)
//!   cli: c0 192.0.2.2    ──── bc 192.0.2.1    ┘
//! ```
//!
//! The server's two interfaces run their receive path in a threaded NAPI kthread
//! (`napi/ba-<id>`, `napi/bc-<id>`): GRO on a veth turns its NAPI on even without XDP, and
//! `threaded` moves the poll out of softirq into a kthread that can be pinned and whose CPU time
//! can be read. XDP, TC, the netdev ingress hook, netfilter's PREROUTING and INPUT hooks and
//! conntrack all run inside that poll, so every variant's cost lands in the same place.
//! Everything is deleted with the namespaces, on drop, also on failure.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::netns::{NetNs, run_cmd};

/// The server's address on the client link.
pub const SRV: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The authorized client's address.
pub const CLI: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// The server's address on the attacker link.
pub const SRV_ATT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The attacker's own address (its floods carry spoofed sources from [`SPOOF_NET`]).
pub const ATT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// Spoofed sources are drawn from 198.18.0.0/15, the range RFC 2544 sets aside for benchmarks.
pub const SPOOF_NET: (Ipv4Addr, u32) = (Ipv4Addr::new(198, 18, 0, 0), 15);
/// The server's interface towards the attacker.
pub const SRV_ATT_IF: &str = "ba";
/// The server's interface towards the client.
pub const SRV_CLI_IF: &str = "bc";
/// The attacker's interface.
pub const ATT_IF: &str = "a0";
/// The client's interface.
pub const CLI_IF: &str = "c0";
/// CPU the generators and clients are pinned to.
pub const GEN_CPU: usize = 0;
/// CPU the system under test (NAPI kthreads, servers, proxies) is pinned to.
pub const SUT_CPU: usize = 1;

/// The three namespaces and their links; deleted on drop.
pub struct Topology {
    /// The protected server.
    pub srv: NetNs,
    /// The authorized client.
    pub cli: NetNs,
    /// The attacker.
    pub att: NetNs,
}

impl Topology {
    /// Creates the namespaces, links, addresses and routes, and turns on threaded NAPI on the
    /// server's interfaces.
    pub fn new() -> Result<Topology> {
        let pid = std::process::id();
        let n = crate::netns::unique_id();
        let srv = NetNs::new(&format!("idgb-{pid}-{n}-srv"))?;
        let cli = NetNs::new(&format!("idgb-{pid}-{n}-cli"))?;
        let att = NetNs::new(&format!("idgb-{pid}-{n}-att"))?;
        let topo = Topology { srv, cli, att };
        for (peer, peer_if, srv_if, srv_addr, peer_addr) in [
            (&topo.att, ATT_IF, SRV_ATT_IF, SRV_ATT, ATT),
            (&topo.cli, CLI_IF, SRV_CLI_IF, SRV, CLI),
        ] {
            topo.srv.ip(&[
                "link",
                "add",
                srv_if,
                "type",
                "veth",
                "peer",
                "name",
                peer_if,
                "netns",
                peer.name(),
            ])?;
            topo.srv
                .ip(&["addr", "add", &format!("{srv_addr}/24"), "dev", srv_if])?;
            peer.ip(&["addr", "add", &format!("{peer_addr}/24"), "dev", peer_if])?;
            // GRO turns the veth's NAPI on; `threaded` needs it to exist and the link up.
            topo.srv.exec("ethtool", &["-K", srv_if, "gro", "on"])?;
            topo.srv.ip(&["link", "set", srv_if, "up"])?;
            // A veth hands the peer's packets to NAPI only when the sender has TSO off
            // (veth_skb_is_eligible_for_gro); otherwise they go through the sender CPU's
            // backlog and no variant but XDP would run in the kthread.
            peer.exec("ethtool", &["-K", peer_if, "tso", "off"])?;
            peer.ip(&["link", "set", peer_if, "up"])?;
            topo.srv.exec(
                "sh",
                &["-c", &format!("echo 1 > /sys/class/net/{srv_if}/threaded")],
            )?;
        }
        // SYN-ACKs to spoofed sources (peers that let the flood through) leave towards the
        // attacker, whose namespace drops them.
        topo.srv
            .ip(&["route", "add", "default", "via", &ATT.to_string()])?;
        for (k, v) in [
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.tcp_syncookies", "1"),
        ] {
            topo.srv.exec("sysctl", &["-qw", &format!("{k}={v}")])?;
        }
        // Permanent neighbour entries: ARP must not be part of any measurement.
        for (peer, peer_if, srv_if, srv_addr, peer_addr) in [
            (&topo.att, ATT_IF, SRV_ATT_IF, SRV_ATT, ATT),
            (&topo.cli, CLI_IF, SRV_CLI_IF, SRV, CLI),
        ] {
            let srv_mac = mac_text(&Topology::mac(&topo.srv, srv_if)?);
            let peer_mac = mac_text(&Topology::mac(peer, peer_if)?);
            topo.srv.ip(&[
                "neigh",
                "replace",
                &peer_addr.to_string(),
                "lladdr",
                &peer_mac,
                "dev",
                srv_if,
                "nud",
                "permanent",
            ])?;
            peer.ip(&[
                "neigh",
                "replace",
                &srv_addr.to_string(),
                "lladdr",
                &srv_mac,
                "dev",
                peer_if,
                "nud",
                "permanent",
            ])?;
        }
        Ok(topo)
    }

    /// The MAC address of `iface` in `ns`.
    pub fn mac(ns: &NetNs, iface: &str) -> Result<[u8; 6]> {
        let v = link_json(ns, iface)?;
        let text = v["address"].as_str().context("no address")?;
        let mut mac = [0u8; 6];
        let parts: Vec<&str> = text.split(':').collect();
        if parts.len() != 6 {
            bail!("odd MAC address {text}");
        }
        for (b, p) in mac.iter_mut().zip(parts) {
            *b = u8::from_str_radix(p, 16)?;
        }
        Ok(mac)
    }

    /// (rx packets, tx packets, tx dropped) of `iface` in `ns`.
    pub fn counters(ns: &NetNs, iface: &str) -> Result<LinkCounters> {
        let v = link_json(ns, iface)?;
        let s = &v["stats64"];
        let n = |a: &Value| a.as_u64().unwrap_or(0);
        Ok(LinkCounters {
            rx_packets: n(&s["rx"]["packets"]),
            rx_dropped: n(&s["rx"]["dropped"]),
            tx_packets: n(&s["tx"]["packets"]),
            tx_dropped: n(&s["tx"]["dropped"]),
        })
    }
}

/// An interface's packet counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinkCounters {
    /// Packets its receive path took in (for a veth with NAPI: every packet polled, including
    /// those XDP dropped).
    pub rx_packets: u64,
    /// Packets dropped on receive.
    pub rx_dropped: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Packets refused on send (a full peer ring).
    pub tx_dropped: u64,
}

fn mac_text(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn link_json(ns: &NetNs, iface: &str) -> Result<Value> {
    let out = run_cmd(
        "ip",
        &["-n", ns.name(), "-j", "-s", "link", "show", "dev", iface],
    )?;
    let v: Value = serde_json::from_slice(&out.stdout).context("ip -j output")?;
    v.get(0).cloned().context("no such link")
}
