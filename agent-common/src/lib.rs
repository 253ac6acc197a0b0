//! Types shared by idgate's eBPF programs and the userspace agent.
//!
//! Every struct here is `#[repr(C)]`, `Copy`, has explicit widths and no implicit padding, so the
//! kernel and userspace agree on its bytes without any translation. Map names are constants so the
//! two sides cannot drift apart.
#![no_std]
#![deny(unsafe_code)]

/// Version of the map layout below. Bump it on any change to a map's key, value or type; the agent
/// migrates what it knows how to (see the agent's `dataplane::pin`) and refuses any other layout.
///
/// - 1: the first layout.
/// - 2: [`SessionValue`] gained `last_seen_ns` and `idle_ns` (idle timeouts); 16 → 32 bytes. The
///   agent migrates a version-1 sessions map in place, keeping every session.
pub const MAP_LAYOUT_VERSION: u32 = 2;

/// Size of a version-1 [`SessionValue`] (`expires_ns`, `identity_id`, `rule_id`).
pub const SESSION_VALUE_V1_SIZE: usize = 16;

/// Map names, as they appear in the eBPF object.
pub mod maps {
    /// Array indexed by [`super::port_index`] (protocol, port) → service id (0: not protected).
    pub const PORTS: &str = "IDGATE_PORTS";
    /// Array indexed by service id → [`super::ServiceValue`].
    pub const SERVICES: &str = "IDGATE_SERVICES";
    /// [`super::SessionKey`] → [`super::SessionValue`].
    pub const SESSIONS: &str = "IDGATE_SESSIONS";
    /// LPM trie of [`super::CidrKey`] → [`super::CidrValue`], checked before sessions.
    pub const CIDR_DENY: &str = "IDGATE_CIDR_DENY";
    /// LPM trie of [`super::CidrKey`] → [`super::CidrValue`], checked after the deny trie.
    pub const CIDR_ALLOW: &str = "IDGATE_CIDR_ALLOW";
    /// Per-CPU array of [`super::Counter`], indexed by [`super::counter_index`].
    pub const COUNTERS: &str = "IDGATE_COUNTERS";
    /// Ring buffer of [`super::Event`].
    pub const EVENTS: &str = "IDGATE_EVENTS";
    /// Per-CPU array (one slot) of [`super::EventBucket`], the in-kernel event rate limiter.
    pub const EVENT_BUCKET: &str = "IDGATE_EVENT_BUCKET";
    /// Array (one slot) of [`super::GlobalConfig`].
    pub const CONFIG: &str = "IDGATE_CONFIG";
    /// LRU hash of [`super::FragKey`] → [`super::FragValue`]: ports of first fragments.
    pub const FRAGMENTS: &str = "IDGATE_FRAGMENTS";
}

/// Program names, as they appear in the eBPF object.
pub mod programs {
    /// The XDP enforcement program.
    pub const XDP: &str = "idgate_xdp";
    /// The TC (TCX ingress) enforcement program.
    pub const TC: &str = "idgate_tc";
    /// An XDP program that passes everything: the floor of the verdict benchmark.
    pub const XDP_FLOOR: &str = "idgate_xdp_floor";
}

/// Default capacity of the sessions map; the agent overrides it from its configuration.
pub const DEFAULT_MAX_SESSIONS: u32 = 65_536;
/// Capacity of each CIDR trie.
pub const MAX_CIDR_RULES: u32 = 16_384;
/// Service ids are `1..MAX_SERVICES`; id 0 counts traffic that could not be attributed to a
/// service (malformed packets, unknown fragments).
pub const MAX_SERVICES: u32 = 256;
/// Ring buffer size in bytes (a power of two, a multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 1 << 20;
/// Capacity of the fragment-tracking LRU.
pub const MAX_TRACKED_FRAGMENTS: u32 = 8_192;

/// IP protocol numbers the data plane understands.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;

/// Entries of the ports array: one per (protocol, port) for TCP and UDP.
pub const PORT_ENTRIES: u32 = 2 * 65_536;

/// Index of (protocol, port) in the ports array; `None` for protocols idgate never protects.
///
/// An array indexed by port rather than a hash keyed by it: the lookup on every TCP/UDP packet is
/// then a bounds check and a load, inlined by the verifier, with no hashing and no helper call.
pub const fn port_index(proto: u8, port: u16) -> Option<u32> {
    match proto {
        IPPROTO_TCP => Some(port as u32),
        IPPROTO_UDP => Some(65_536 + port as u32),
        _ => None,
    }
}

/// What happens to traffic for a protected service that no rule or session lets through.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DefaultAction {
    /// Drop silently: the client times out.
    Drop = 0,
    /// Answer TCP with a RST (UDP is dropped): the client fails at once.
    Reset = 1,
}

/// Service flag: the CIDR deny trie holds entries for this service.
pub const SERVICE_HAS_DENY: u32 = 1 << 0;
/// Service flag: the CIDR allow trie holds entries for this service.
pub const SERVICE_HAS_ALLOW: u32 = 1 << 1;

/// Value of the services array (indexed by service id).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceValue {
    /// `1..MAX_SERVICES`.
    pub service_id: u32,
    /// A [`DefaultAction`] as `u32`.
    pub action: u32,
    /// `SERVICE_HAS_*` bits, so the tries are only consulted when they can match.
    pub flags: u32,
}

/// Key of the sessions map: a source address (IPv4 as IPv4-mapped IPv6) and a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SessionKey {
    /// Source address, network byte order; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    /// The service this session opens.
    pub service_id: u32,
}

/// How stale [`SessionValue::last_seen_ns`] may get before a packet refreshes it: one write per
/// session per second at most, so the entry's cache line stays shared between CPUs.
pub const ACTIVITY_GRANULARITY_NS: u64 = 1_000_000_000;

/// Value of the sessions map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SessionValue {
    /// Expiry on the kernel's coarse monotonic clock (`CLOCK_MONOTONIC_COARSE`, which the
    /// programs read with `bpf_ktime_get_coarse_ns`).
    pub expires_ns: u64,
    /// The last packet the session let through, same clock; the programs refresh it at most
    /// once per [`ACTIVITY_GRANULARITY_NS`], the agent sets it when it writes the entry.
    pub last_seen_ns: u64,
    /// Idle timeout: the session lets nothing through once `last_seen_ns + idle_ns` has passed.
    /// 0: none.
    pub idle_ns: u64,
    /// The identity (user) the agent verified; reported in events.
    pub identity_id: u32,
    /// The policy rule that allowed the session; reported in events.
    pub rule_id: u32,
}

/// Key of the CIDR tries: `prefix_len` covers the 32 bits of service id, the 8 bits of address
/// family, then the address bits.
///
/// The family byte keeps an IPv6 rule with a short prefix (`::/0`) from matching IPv4 sources,
/// whose addresses are kept in their IPv4-mapped form.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CidrData {
    /// Service id, big endian, so it forms the leading 32 bits of the match.
    pub service_id_be: [u8; 4],
    /// 4 or 6: the IP version of the source.
    pub family: u8,
    /// Address, network byte order; IPv4 as IPv4-mapped IPv6.
    pub addr: [u8; 16],
}

/// Number of prefix bits a CIDR key spends on the service id and the family, before the address.
pub const CIDR_SERVICE_BITS: u32 = 32 + 8;
/// Number of prefix bits of the IPv4-mapped prefix (`::ffff:0:0/96`).
pub const CIDR_V4_MAPPED_BITS: u32 = 96;

/// Value of the CIDR tries: the rule that put the entry there, for events.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CidrValue {
    /// Policy rule id.
    pub rule_id: u32,
}

/// Why a packet got the verdict it got; indexes the counters and tags events.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Passed: a valid, unexpired session.
    AllowSession = 0,
    /// Passed: the source is in a CIDR allow rule.
    AllowCidr = 1,
    /// Refused: no session for this source and service.
    NoSession = 2,
    /// Refused: the session exists but has expired.
    Expired = 3,
    /// Refused: the source is in a CIDR deny rule.
    DeniedCidr = 4,
    /// Refused: truncated or malformed, and possibly for a protected port.
    Malformed = 5,
    /// Refused: a non-first fragment whose first fragment was not seen.
    UnknownFragment = 6,
}

impl Reason {
    /// All reasons, in counter order.
    pub const ALL: [Reason; 7] = [
        Reason::AllowSession,
        Reason::AllowCidr,
        Reason::NoSession,
        Reason::Expired,
        Reason::DeniedCidr,
        Reason::Malformed,
        Reason::UnknownFragment,
    ];

    /// Whether this reason lets the packet through.
    pub const fn allows(self) -> bool {
        matches!(self, Reason::AllowSession | Reason::AllowCidr)
    }

    /// The reason for a raw value from the kernel, if it is one.
    pub const fn from_u32(v: u32) -> Option<Reason> {
        match v {
            0 => Some(Reason::AllowSession),
            1 => Some(Reason::AllowCidr),
            2 => Some(Reason::NoSession),
            3 => Some(Reason::Expired),
            4 => Some(Reason::DeniedCidr),
            5 => Some(Reason::Malformed),
            6 => Some(Reason::UnknownFragment),
            _ => None,
        }
    }

    /// A stable lowercase name, for logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::AllowSession => "session",
            Reason::AllowCidr => "cidr-allow",
            Reason::NoSession => "no-session",
            Reason::Expired => "expired",
            Reason::DeniedCidr => "cidr-deny",
            Reason::Malformed => "malformed",
            Reason::UnknownFragment => "unknown-fragment",
        }
    }
}

/// Counter slots per service: one per [`Reason`], plus one counting RSTs sent.
pub const COUNTER_SLOTS: u32 = 8;
/// The counter slot that counts RSTs sent (in addition to the reason's slot).
pub const COUNTER_SLOT_RST_SENT: u32 = 7;
/// Total entries in the counters array.
pub const COUNTER_ENTRIES: u32 = MAX_SERVICES * COUNTER_SLOTS;

/// Index into the counters array for a service and a slot.
pub const fn counter_index(service_id: u32, slot: u32) -> u32 {
    service_id * COUNTER_SLOTS + slot
}

/// One counter cell (per CPU in the kernel; summed by userspace).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Counter {
    /// Packets.
    pub packets: u64,
    /// Bytes, as seen at the hook (layer 2 included).
    pub bytes: u64,
}

/// Event kind: a packet was refused.
pub const EVENT_DENIED: u32 = 1;
/// Event kind: a TCP SYN was let through (a new allowed connection).
pub const EVENT_NEW_CONNECTION: u32 = 2;

/// Action field of an event: the packet was dropped.
pub const ACTION_DROP: u32 = 0;
/// Action field of an event: a RST was sent back.
pub const ACTION_RESET: u32 = 1;
/// Action field of an event: the packet passed.
pub const ACTION_PASS: u32 = 2;

/// One ring-buffer event.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Event {
    /// `bpf_ktime_get_coarse_ns` when the packet was seen.
    pub ts_ns: u64,
    /// [`EVENT_DENIED`] or [`EVENT_NEW_CONNECTION`].
    pub kind: u32,
    /// A [`Reason`] as `u32`.
    pub reason: u32,
    /// `ACTION_*`.
    pub action: u32,
    /// Service id (0 when the packet could not be attributed).
    pub service_id: u32,
    /// Identity from the session (0 when none).
    pub identity_id: u32,
    /// Rule from the session or CIDR entry (0 when none).
    pub rule_id: u32,
    /// Source address (IPv4 as IPv4-mapped IPv6).
    pub src: [u8; 16],
    /// Destination address (IPv4 as IPv4-mapped IPv6).
    pub dst: [u8; 16],
    /// Source port, host order (0 when unknown).
    pub sport: u16,
    /// Destination port, host order (0 when unknown).
    pub dport: u16,
    /// IP protocol (0 when unknown).
    pub proto: u8,
    /// 4 or 6 (0 when unknown).
    pub ip_version: u8,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// Always zero.
    pub pad: u8,
    /// Ingress interface index.
    pub ifindex: u32,
    /// Packet length at the hook.
    pub len: u32,
}

/// State of the per-CPU event token bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct EventBucket {
    /// Tokens available, scaled by [`TOKEN_SCALE`].
    pub tokens: u64,
    /// Last refill, monotonic ns.
    pub last_ns: u64,
    /// Events not emitted because the bucket was empty.
    pub suppressed: u64,
    /// Events not emitted because the ring buffer was full.
    pub ring_full: u64,
}

/// Largest event rate the kernel honours, per CPU (larger configured values are capped).
pub const MAX_EVENTS_PER_SEC: u64 = 1_000_000;
/// Largest event burst the kernel honours, per CPU.
pub const MAX_EVENT_BURST: u64 = 1_000_000;

/// Fixed-point scale of [`EventBucket::tokens`]: one event costs this many units.
pub const TOKEN_SCALE: u64 = 1_000_000;

/// Global configuration of the data plane, written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct GlobalConfig {
    /// Events allowed per second, per CPU.
    pub events_per_sec: u64,
    /// Burst of events allowed, per CPU.
    pub events_burst: u64,
    /// `PROTECTS_*` bits: which protocols have at least one protected service.
    pub protects: u32,
    /// [`MAP_LAYOUT_VERSION`] of whoever wrote this.
    pub layout_version: u32,
}

/// [`GlobalConfig::protects`] bit: some TCP port is protected.
pub const PROTECTS_TCP: u32 = 1 << 0;
/// [`GlobalConfig::protects`] bit: some UDP port is protected.
pub const PROTECTS_UDP: u32 = 1 << 1;

/// The `protects` bit for an IP protocol, 0 for protocols the data plane never protects.
pub const fn protects_bit(proto: u8) -> u32 {
    match proto {
        IPPROTO_TCP => PROTECTS_TCP,
        IPPROTO_UDP => PROTECTS_UDP,
        _ => 0,
    }
}

/// Key of the fragment-tracking LRU: identifies one fragmented datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    /// Source address (IPv4 as IPv4-mapped IPv6).
    pub src: [u8; 16],
    /// Destination address (IPv4 as IPv4-mapped IPv6).
    pub dst: [u8; 16],
    /// IP identification (IPv4: 16 bits; IPv6 fragment header: 32 bits).
    pub id: u32,
    /// The protocol field every fragment of the datagram carries: IPv4's protocol, or the next
    /// header of IPv6's fragment header.
    pub proto: u8,
    /// Always zero.
    pub pad: [u8; 3],
}

/// Value of the fragment-tracking LRU: the transport the first fragment carried.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragValue {
    /// Source port, host order.
    pub sport: u16,
    /// Destination port, host order.
    pub dport: u16,
    /// Transport protocol (the key's protocol may name an extension header or AH instead).
    pub proto: u8,
    /// Always zero.
    pub pad: [u8; 3],
}

#[cfg(feature = "user")]
#[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
mod user {
    use super::*;

    // SAFETY: each type is repr(C), Copy, made only of integers and byte arrays, with no padding
    // (checked by the layout tests below), so any bit pattern is a valid value.
    unsafe impl aya::Pod for ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SessionKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SessionValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CidrData {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CidrValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Counter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EventBucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for GlobalConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FragKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FragValue {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, size_of};

    // Sizes are the sum of the fields: any implicit padding would make them differ, and padding
    // bytes are uninitialised garbage as map keys.
    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(size_of::<ServiceValue>(), 12);
        assert_eq!(size_of::<SessionKey>(), 20);
        assert_eq!(size_of::<SessionValue>(), 32);
        assert_eq!(size_of::<CidrData>(), 21);
        assert_eq!(size_of::<CidrValue>(), 4);
        assert_eq!(size_of::<Counter>(), 16);
        assert_eq!(size_of::<Event>(), 8 + 6 * 4 + 32 + 2 + 2 + 4 + 4 + 4);
        assert_eq!(size_of::<EventBucket>(), 32);
        assert_eq!(size_of::<GlobalConfig>(), 24);
        assert_eq!(size_of::<FragKey>(), 40);
        assert_eq!(size_of::<FragValue>(), 8);
        assert_eq!(align_of::<Event>(), 8);
    }

    #[test]
    fn reasons_round_trip_and_fit_the_counter_slots() {
        for r in Reason::ALL {
            assert_eq!(Reason::from_u32(r as u32), Some(r));
            assert!((r as u32) < COUNTER_SLOT_RST_SENT);
        }
        assert_eq!(Reason::from_u32(COUNTER_SLOT_RST_SENT), None);
        assert!(Reason::AllowSession.allows() && Reason::AllowCidr.allows());
        assert!(!Reason::NoSession.allows() && !Reason::Malformed.allows());
    }

    #[test]
    fn port_index_covers_tcp_and_udp_apart() {
        assert_eq!(port_index(IPPROTO_TCP, 0), Some(0));
        assert_eq!(port_index(IPPROTO_TCP, 8000), Some(8000));
        assert_eq!(port_index(IPPROTO_UDP, 8000), Some(65_536 + 8000));
        assert_eq!(port_index(IPPROTO_UDP, u16::MAX), Some(PORT_ENTRIES - 1));
        assert_eq!(port_index(1, 8000), None);
    }

    #[test]
    fn counter_index_stays_in_bounds() {
        assert_eq!(counter_index(0, 0), 0);
        assert_eq!(
            counter_index(MAX_SERVICES - 1, COUNTER_SLOTS - 1),
            COUNTER_ENTRIES - 1
        );
    }
}
