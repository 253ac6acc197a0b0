//! Typed views of what the data plane enforces: services, CIDR rules, sessions, counters.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
    str::FromStr,
    time::{Duration, SystemTime},
};

use idgate_common as common;
use ipnet::IpNet;

use super::{DataplaneError, sys};

/// Transport protocol of a protected service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => common::IPPROTO_TCP,
            Protocol::Udp => common::IPPROTO_UDP,
        }
    }

    /// The protocol for an IP protocol number, if it is one idgate protects.
    pub const fn from_number(n: u8) -> Option<Protocol> {
        match n {
            common::IPPROTO_TCP => Some(Protocol::Tcp),
            common::IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// What a protected service does with traffic nothing lets through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ServiceAction {
    /// Drop silently: clients time out.
    Drop,
    /// Answer TCP with a RST (UDP is dropped): clients fail at once.
    Reset,
}

impl FromStr for ServiceAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "drop" => Ok(ServiceAction::Drop),
            "reset" => Ok(ServiceAction::Reset),
            other => Err(format!(
                "unknown action {other:?}: expected \"drop\" or \"reset\""
            )),
        }
    }
}

/// A service id: `1..MAX_SERVICES` (0 is reserved for traffic no service can be named for).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId(u32);

impl ServiceId {
    /// The id, if it is within `1..MAX_SERVICES`.
    pub fn new(id: u32) -> Result<Self, DataplaneError> {
        if id == 0 || id >= common::MAX_SERVICES {
            return Err(DataplaneError::Invalid(format!(
                "service id {id} is outside 1..{}",
                common::MAX_SERVICES
            )));
        }
        Ok(ServiceId(id))
    }

    /// The raw id.
    pub const fn get(self) -> u32 {
        self.0
    }
}

/// A protected (protocol, port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Service {
    /// Id used by sessions, CIDR rules and counters.
    pub id: ServiceId,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Destination port.
    pub port: u16,
    /// What happens to traffic nothing lets through.
    pub action: ServiceAction,
}

/// Whether a CIDR rule lets traffic through or refuses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CidrAction {
    /// Pass without a session (e.g. a load balancer's health checks).
    Allow,
    /// Drop, even with a session (e.g. a banned range).
    Deny,
}

/// A static address rule for one service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CidrRule {
    /// The service it applies to.
    pub service: ServiceId,
    /// Source network.
    pub net: IpNet,
    /// Allow or deny.
    pub action: CidrAction,
    /// Policy rule id, reported in events.
    pub rule_id: u32,
}

/// A point on the kernel's monotonic clock, the clock session expiries are kept on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Expiry(u64);

impl Expiry {
    /// `d` from now.
    pub fn after(d: Duration) -> Expiry {
        Expiry(duration_ns(sys::monotonic_now().saturating_add(d)))
    }

    /// The monotonic instant matching a wall-clock instant (e.g. a token's `exp`). An instant in
    /// the past maps to now, which is already expired.
    pub fn at(when: SystemTime) -> Expiry {
        let left = when
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        Expiry::after(left)
    }

    /// From raw monotonic nanoseconds.
    pub const fn from_ns(ns: u64) -> Expiry {
        Expiry(ns)
    }

    /// Raw monotonic nanoseconds.
    pub const fn as_ns(self) -> u64 {
        self.0
    }

    /// Time left before expiry (zero when already expired).
    pub fn remaining(self) -> Duration {
        Duration::from_nanos(self.0).saturating_sub(sys::monotonic_now())
    }

    /// The wall-clock instant matching this expiry (approximate: the clocks may drift apart).
    pub fn to_system_time(self) -> SystemTime {
        SystemTime::now() + self.remaining()
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A session: `source` may reach `service` until `expires`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Session {
    /// Client source address.
    pub source: IpAddr,
    /// The service it opens.
    pub service: ServiceId,
    /// When it stops letting packets through (checked by the kernel on every packet).
    pub expires: Expiry,
    /// The verified identity, reported in events.
    pub identity_id: u32,
    /// The policy rule that allowed it, reported in events.
    pub rule_id: u32,
    /// Idle timeout: the kernel lets nothing through once the session has carried no packet for
    /// this long (`None`: no idle timeout). Writing the entry counts as activity.
    pub idle: Option<Duration>,
}

impl Session {
    pub(super) fn key(&self) -> common::SessionKey {
        session_key(self.source, self.service)
    }

    pub(super) fn value(&self) -> common::SessionValue {
        common::SessionValue {
            expires_ns: self.expires.as_ns(),
            last_seen_ns: duration_ns(sys::monotonic_now()),
            idle_ns: self.idle.map_or(0, |d| duration_ns(d).max(1)),
            identity_id: self.identity_id,
            rule_id: self.rule_id,
        }
    }

    pub(super) fn from_entry(
        key: &common::SessionKey,
        value: &common::SessionValue,
    ) -> Option<Session> {
        Some(Session {
            source: addr_from_kernel(key.addr),
            service: ServiceId::new(key.service_id).ok()?,
            expires: Expiry::from_ns(value.expires_ns),
            identity_id: value.identity_id,
            rule_id: value.rule_id,
            idle: (value.idle_ns != 0).then(|| Duration::from_nanos(value.idle_ns)),
        })
    }
}

/// The session map key for a source and a service.
pub(super) fn session_key(source: IpAddr, service: ServiceId) -> common::SessionKey {
    common::SessionKey {
        addr: addr_to_kernel(source),
        service_id: service.get(),
    }
}

/// The kernel's form of an address: IPv6, with IPv4 as IPv4-mapped IPv6.
pub fn addr_to_kernel(addr: IpAddr) -> [u8; 16] {
    match addr.to_canonical() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address for the kernel's form (IPv4-mapped IPv6 becomes IPv4).
pub fn addr_from_kernel(bytes: [u8; 16]) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(bytes)).to_canonical()
}

/// Packets and bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Count {
    /// Packets.
    pub packets: u64,
    /// Bytes at the hook.
    pub bytes: u64,
}

/// Counters of one service (id 0: traffic that could not be attributed to a service), summed over
/// CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceCounters {
    /// The service id (0 for unattributed traffic).
    pub service_id: u32,
    /// Per reason, in [`common::Reason::ALL`] order.
    pub by_reason: Vec<(common::Reason, Count)>,
    /// RSTs sent.
    pub rst_sent: Count,
}

impl ServiceCounters {
    /// The count for one reason.
    pub fn get(&self, reason: common::Reason) -> Count {
        self.by_reason
            .iter()
            .find(|(r, _)| *r == reason)
            .map(|(_, c)| *c)
            .unwrap_or_default()
    }
}

/// Health of the event path, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventStats {
    /// Events the in-kernel rate limiter suppressed.
    pub suppressed: u64,
    /// Events lost because the ring buffer was full.
    pub ring_full: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn ipv4_maps_into_ipv6_and_back() {
        let v4 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
        let k = addr_to_kernel(v4);
        assert_eq!(&k[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(&k[12..], &[192, 0, 2, 7]);
        assert_eq!(addr_from_kernel(k), v4);
        // An IPv4-mapped IPv6 address is the same host as its IPv4 form.
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(addr_to_kernel(mapped), k);
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(addr_from_kernel(addr_to_kernel(v6)), v6);
    }

    #[test]
    fn service_ids_are_range_checked() {
        assert!(ServiceId::new(0).is_err());
        assert!(ServiceId::new(common::MAX_SERVICES).is_err());
        assert_eq!(ServiceId::new(1).unwrap().get(), 1);
    }

    #[test]
    fn expiry_tracks_the_monotonic_clock() {
        let e = Expiry::after(Duration::from_secs(60));
        let left = e.remaining();
        assert!(left > Duration::from_secs(59) && left <= Duration::from_secs(60));
        let past = Expiry::at(SystemTime::now() - Duration::from_secs(5));
        assert_eq!(past.remaining(), Duration::ZERO);
        let wall = Expiry::at(SystemTime::now() + Duration::from_secs(30)).to_system_time();
        let diff = wall
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        assert!(diff > Duration::from_secs(29) && diff <= Duration::from_secs(30));
    }

    #[test]
    fn actions_parse_strictly() {
        assert_eq!("drop".parse::<ServiceAction>(), Ok(ServiceAction::Drop));
        assert_eq!("reset".parse::<ServiceAction>(), Ok(ServiceAction::Reset));
        assert!("DROP".parse::<ServiceAction>().is_err());
    }
}
