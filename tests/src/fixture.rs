//! Shared setup for the verdict and fuzz suites: the hooks and address families tests loop over,
//! services, sessions and CIDR rules with less ceremony, runs that explain themselves when they
//! fail, and exact counter deltas.

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr, time::Duration};

use idgate::dataplane::{
    CidrAction, CidrRule, Count, Dataplane, Expiry, Protocol, Service, ServiceAction, ServiceId,
    Session,
};
use idgate_common::Reason;
use ipnet::IpNet;

use crate::run::{Hook, Outcome, Ran, run};

/// Both attach points: every verdict test runs on each.
pub const HOOKS: [Hook; 2] = [Hook::Xdp, Hook::Tc];

/// IP version of a test packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// Both families: every verdict test that is not family-specific runs on each.
pub const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

fn addr(s: &str) -> IpAddr {
    s.parse().expect("a valid address literal")
}

impl Family {
    /// The protected host (the packets' destination).
    pub fn server(self) -> IpAddr {
        match self {
            Family::V4 => addr("192.0.2.1"),
            Family::V6 => addr("2001:db8::1"),
        }
    }

    /// Host `n` of the client network ([`Family::client_net`]).
    pub fn client(self, n: u8) -> IpAddr {
        match self {
            Family::V4 => addr(&format!("198.51.100.{n}")),
            Family::V6 => addr(&format!("2001:db8:c:1::{n:x}")),
        }
    }

    /// The client network: a /24 for IPv4, a /64 for IPv6.
    pub fn client_net(self) -> IpNet {
        match self {
            Family::V4 => "198.51.100.0/24".parse().unwrap(),
            Family::V6 => "2001:db8:c:1::/64".parse().unwrap(),
        }
    }

    /// The highest address inside [`Family::client_net`].
    pub fn client_net_last(self) -> IpAddr {
        match self {
            Family::V4 => addr("198.51.100.255"),
            Family::V6 => addr("2001:db8:c:1:ffff:ffff:ffff:ffff"),
        }
    }

    /// The addresses right below and right above [`Family::client_net`].
    pub fn just_outside_client_net(self) -> [IpAddr; 2] {
        match self {
            Family::V4 => [addr("198.51.99.255"), addr("198.51.101.0")],
            Family::V6 => [
                addr("2001:db8:c:0:ffff:ffff:ffff:ffff"),
                addr("2001:db8:c:2::"),
            ],
        }
    }

    /// Host `n` of [`Family::banned_net`].
    pub fn banned(self, n: u8) -> IpAddr {
        match self {
            Family::V4 => addr(&format!("10.66.0.{n}")),
            Family::V6 => addr(&format!("2001:db8:bad::{n:x}")),
        }
    }

    /// A network tests put under a CIDR deny rule.
    pub fn banned_net(self) -> IpNet {
        match self {
            Family::V4 => "10.66.0.0/24".parse().unwrap(),
            Family::V6 => "2001:db8:bad::/64".parse().unwrap(),
        }
    }

    /// The ICMP (IPv4) or ICMPv6 protocol number and an echo request body.
    pub fn echo_request(self) -> (u8, Vec<u8>) {
        match self {
            Family::V4 => (1, vec![8, 0, 0xf7, 0xfe, 0, 1, 0, 0]),
            Family::V6 => (58, vec![128, 0, 0, 0, 0, 1, 0, 0]),
        }
    }

    /// Host `n` of an unrelated network nobody configured.
    pub fn stranger(self, n: u8) -> IpAddr {
        match self {
            Family::V4 => addr(&format!("203.0.113.{n}")),
            Family::V6 => addr(&format!("2001:db8:f00::{n:x}")),
        }
    }
}

/// A service id; panics outside `1..MAX_SERVICES`.
pub fn sid(id: u32) -> ServiceId {
    ServiceId::new(id).expect("a valid service id")
}

/// A protected TCP port.
pub fn tcp_service(id: u32, port: u16, action: ServiceAction) -> Service {
    Service {
        id: sid(id),
        protocol: Protocol::Tcp,
        port,
        action,
    }
}

/// A protected UDP port.
pub fn udp_service(id: u32, port: u16, action: ServiceAction) -> Service {
    Service {
        id: sid(id),
        protocol: Protocol::Udp,
        port,
        action,
    }
}

/// A session of `source` for `service`, valid for an hour.
pub fn session(source: IpAddr, service: u32, identity_id: u32, rule_id: u32) -> Session {
    Session {
        source,
        service: sid(service),
        expires: Expiry::after(Duration::from_secs(3600)),
        identity_id,
        rule_id,
        idle: None,
    }
}

/// A session that has already expired at `expires`.
pub fn expired_session(source: IpAddr, service: u32, expires: Expiry) -> Session {
    Session {
        expires,
        ..session(source, service, 0, 0)
    }
}

/// A CIDR rule.
pub fn cidr(service: u32, net: IpNet, action: CidrAction, rule_id: u32) -> CidrRule {
    CidrRule {
        service: sid(service),
        net,
        action,
        rule_id,
    }
}

/// A single-address network (/32 or /128) around `a`.
pub fn host_net(a: IpAddr) -> IpNet {
    IpNet::from(a)
}

/// Lowercase hex, for failure messages.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Runs `packet` through `hook`; panics with the hook, the context and the packet on error.
pub fn run_ok(dp: &Dataplane, hook: Hook, packet: &[u8], what: &str) -> Ran {
    run(dp, hook, packet).unwrap_or_else(|e| {
        panic!(
            "{what} [{hook:?}]: run failed: {e:#}\npacket {}",
            hex(packet)
        )
    })
}

/// Runs `packet` through `hook` and asserts the outcome; returns what came out.
pub fn expect(dp: &Dataplane, hook: Hook, packet: &[u8], want: Outcome, what: &str) -> Ran {
    let ran = run_ok(dp, hook, packet, what);
    assert_eq!(
        ran.outcome,
        want,
        "{what} [{hook:?}]: wrong verdict\npacket {}",
        hex(packet)
    );
    ran
}

/// Runs `packet`, asserts the outcome and that the counters moved by exactly `counted`.
pub fn expect_counted(
    dp: &Dataplane,
    hook: Hook,
    packet: &[u8],
    want: Outcome,
    counted: &Tally,
    what: &str,
) -> Ran {
    let before = Tally::read(dp);
    let ran = expect(dp, hook, packet, want, what);
    let moved = Tally::read(dp).since(&before);
    assert_eq!(
        &moved,
        counted,
        "{what} [{hook:?}]: counters moved by {moved:?}, expected {counted:?}\npacket {}",
        hex(packet)
    );
    ran
}

/// Whether BPF_PROG_TEST_RUN refuses `frame` (EINVAL) before running `hook`'s program: every
/// program type needs a whole Ethernet header, and since Linux 6.x the TC (skb) test run also
/// wants a whole IPv4 or IPv6 header behind an untagged Ethernet header whose EtherType names one.
pub fn test_run_refuses(hook: Hook, frame: &[u8]) -> bool {
    if frame.len() < 14 {
        return true;
    }
    let l3 = frame.len() - 14;
    hook == Hook::Tc
        && match u16::from_be_bytes([frame[12], frame[13]]) {
            0x0800 => l3 < 20,
            0x86dd => l3 < 40,
            _ => false,
        }
}

/// Asserts that the kernel refused to run `frame` with EINVAL.
pub fn expect_refused(dp: &Dataplane, hook: Hook, frame: &[u8], what: &str) {
    match run(dp, hook, frame) {
        Ok(ran) => panic!(
            "{what} [{hook:?}]: the kernel ran a frame it should refuse: {:?}\npacket {}",
            ran.outcome,
            hex(frame)
        ),
        Err(e) => assert!(
            format!("{e:#}").contains("os error 22"),
            "{what} [{hook:?}]: expected EINVAL, got {e:#}"
        ),
    }
}

/// [`expect_counted`] where the kernel runs `frame` on `hook`, [`expect_refused`] where it does
/// not (see [`test_run_refuses`]).
pub fn expect_counted_or_refused(
    dp: &Dataplane,
    hook: Hook,
    frame: &[u8],
    want: Outcome,
    counted: &Tally,
    what: &str,
) {
    if test_run_refuses(hook, frame) {
        expect_refused(dp, hook, frame, what);
    } else {
        expect_counted(dp, hook, frame, want, counted, what);
    }
}

/// Name of the counter slot that counts RSTs sent.
pub const RST_SENT: &str = "rst-sent";

/// The non-zero counters of a data plane, by (service id, slot name): a reason's
/// [`Reason::as_str`] or [`RST_SENT`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally(pub BTreeMap<(u32, &'static str), Count>);

impl Tally {
    /// Nothing counted.
    pub fn new() -> Tally {
        Tally::default()
    }

    /// Reads every counter of `dp` (services configured now, and id 0).
    pub fn read(dp: &Dataplane) -> Tally {
        let mut t = Tally::new();
        for sc in dp.counters().expect("reading counters") {
            for (reason, count) in &sc.by_reason {
                t.put(sc.service_id, reason.as_str(), *count);
            }
            t.put(sc.service_id, RST_SENT, sc.rst_sent);
        }
        t
    }

    fn put(&mut self, service: u32, slot: &'static str, c: Count) {
        if c != Count::default() {
            self.0.insert((service, slot), c);
        }
    }

    /// What was counted since `before`.
    pub fn since(&self, before: &Tally) -> Tally {
        let mut t = Tally::new();
        for (k, c) in &self.0 {
            let b = before.0.get(k).copied().unwrap_or_default();
            t.put(
                k.0,
                k.1,
                Count {
                    packets: c.packets - b.packets,
                    bytes: c.bytes - b.bytes,
                },
            );
        }
        t
    }

    fn add(mut self, service: u32, slot: &'static str, bytes: usize) -> Tally {
        let c = self.0.entry((service, slot)).or_default();
        c.packets += 1;
        c.bytes += bytes as u64;
        self
    }

    /// Plus one packet of `bytes` counted for `service` under `reason`.
    pub fn with(self, service: u32, reason: Reason, bytes: usize) -> Tally {
        self.add(service, reason.as_str(), bytes)
    }

    /// Plus one RST of `bytes` sent for `service`.
    pub fn with_rst(self, service: u32, bytes: usize) -> Tally {
        self.add(service, RST_SENT, bytes)
    }

    /// Total packets in the slots of `reasons`, over all services.
    pub fn packets(&self, reasons: &[Reason]) -> u64 {
        self.0
            .iter()
            .filter(|((_, slot), _)| reasons.iter().any(|r| r.as_str() == *slot))
            .map(|(_, c)| c.packets)
            .sum()
    }

    /// Total RSTs sent, over all services.
    pub fn rsts(&self) -> u64 {
        self.0
            .iter()
            .filter(|((_, slot), _)| *slot == RST_SENT)
            .map(|(_, c)| c.packets)
            .sum()
    }
}

/// The reasons that refuse a packet.
pub const REFUSALS: [Reason; 5] = [
    Reason::NoSession,
    Reason::Expired,
    Reason::DeniedCidr,
    Reason::Malformed,
    Reason::UnknownFragment,
];
