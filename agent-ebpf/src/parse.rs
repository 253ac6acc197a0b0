//! Header parsing, shared by both attach points. Pure: no maps, no side effects.
//!
//! Every read goes through [`header`], which checks the whole header against the end of the packet
//! once. The parser never guesses: anything it cannot read to the end is reported as such, and
//! the verdict decides what that means (it fails closed when the packet may be for a protected
//! port).

use core::{
    mem::{MaybeUninit, size_of},
    ptr::write_volatile,
};

use idgate_common::{IPPROTO_TCP, IPPROTO_UDP};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// VLAN tags looked through (802.1ad outer + 802.1Q inner); more is refused as unparseable.
const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked before giving up; real traffic carries one or two.
const MAX_IPV6_EXT_HEADERS: usize = 8;

/// [`Flow::proto`] of a later fragment whose transport is not named in it.
pub const PROTO_UNKNOWN: u8 = 0;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Where a packet sits in a fragmented datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    /// Not fragmented.
    None,
    /// Offset 0 with more fragments: carries the transport header.
    First,
    /// Offset > 0: carries no transport header.
    Later,
}

/// How far the transport header could be read.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    /// Ports (and TCP fields) are valid.
    Complete,
    /// A non-first fragment: no transport header, ports unknown.
    Fragment,
    /// The transport header is truncated or malformed.
    Malformed,
}

/// What the parser found in a TCP or UDP packet.
///
/// Aligned to 8 so that zeroing it is a handful of 8-byte stores rather than a call to a byte-wise
/// `memset`; the attach points keep it in memory (see [`Flow::init`]).
#[repr(C, align(8))]
pub struct Flow {
    /// Source address as two native words holding the network-order bytes (IPv4 mapped into
    /// IPv6): two values for LLVM to carry instead of sixteen.
    pub src: [u64; 2],
    /// Destination address, same form.
    pub dst: [u64; 2],
    pub l3_off: usize,
    pub seq: u32,
    pub ack: u32,
    /// TCP segment length after the header (for the RST's acknowledgment number).
    pub payload_len: u32,
    pub frag_id: u32,
    pub sport: u16,
    pub dport: u16,
    /// Transport protocol; [`PROTO_UNKNOWN`] for a later fragment whose fragmentable part starts
    /// with an extension header.
    pub proto: u8,
    /// The protocol field shared by all fragments of a datagram (see `FragKey::proto`).
    pub frag_proto: u8,
    pub ip_version: u8,
    pub tcp_flags: u8,
    pub frag: Frag,
    pub l4: L4,
}

impl Flow {
    /// Initialises `slot` with one store per field and returns it, opaque to LLVM.
    ///
    /// The stores are volatile so that LLVM cannot merge them into a `memset` call: on BPF that is
    /// a byte-at-a-time loop in a subprogram, which cost more than the whole parse. The returned
    /// reference goes through `black_box`, so the flow stays one struct in memory instead of being
    /// split into dozens of values that the ten BPF registers can only hold by spilling them on
    /// every branch.
    #[inline(always)]
    pub fn init(slot: &mut MaybeUninit<Flow>) -> &mut Flow {
        let p = slot.as_mut_ptr();
        // SAFETY: `p` points at `slot`, valid and aligned for a Flow; every field is written
        // before the reference to the whole is made.
        unsafe {
            write_volatile(&raw mut (*p).src[0], 0);
            write_volatile(&raw mut (*p).src[1], 0);
            write_volatile(&raw mut (*p).dst[0], 0);
            write_volatile(&raw mut (*p).dst[1], 0);
            write_volatile(&raw mut (*p).l3_off, 0);
            write_volatile(&raw mut (*p).seq, 0);
            write_volatile(&raw mut (*p).ack, 0);
            write_volatile(&raw mut (*p).payload_len, 0);
            write_volatile(&raw mut (*p).frag_id, 0);
            write_volatile(&raw mut (*p).sport, 0);
            write_volatile(&raw mut (*p).dport, 0);
            write_volatile(&raw mut (*p).proto, 0);
            write_volatile(&raw mut (*p).frag_proto, 0);
            write_volatile(&raw mut (*p).ip_version, 0);
            write_volatile(&raw mut (*p).tcp_flags, 0);
            write_volatile(&raw mut (*p).frag, Frag::None);
            write_volatile(&raw mut (*p).l4, L4::Malformed);
            core::hint::black_box(&mut *p)
        }
    }

    /// A TCP SYN without ACK: the first packet of a new connection.
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.proto == IPPROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// The parser's finding.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Not IP, or IP carrying neither TCP nor UDP: nothing idgate protects.
    Unprotected,
    /// Claims to be IP but its network layer cannot be read to the end (bad version, lengths,
    /// truncation, too many VLAN tags or extension headers): the protocol is unknown.
    BadL3,
    /// TCP or UDP; see [`Flow::l4`] for how much of it could be read.
    Ip,
}

/// A pointer to a `T`-sized header at `off`, if the whole header lies within the packet.
///
/// The pointer goes through `black_box` so LLVM cannot prove this check redundant from earlier
/// arithmetic on lengths and drop it: the verifier only accepts bounds it sees checked on the very
/// pointer that is dereferenced.
#[inline(always)]
pub fn header<T>(start: usize, end: usize, off: usize) -> Option<*mut T> {
    let p = core::hint::black_box(start + off);
    if p + size_of::<T>() > end {
        return None;
    }
    Some(p as *mut T)
}

/// An IPv4 address as `::ffff:a.b.c.d`, in the two-word form of [`Flow::src`].
#[inline(always)]
fn v4_mapped(a: [u8; 4]) -> [u64; 2] {
    [
        0,
        u64::from_ne_bytes([0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]),
    ]
}

/// Sixteen bytes at `i` in the two-word form of [`Flow::src`].
#[inline(always)]
fn words(b: &[u8], i: usize) -> [u64; 2] {
    let w = |j: usize| {
        u64::from_ne_bytes([
            b[j],
            b[j + 1],
            b[j + 2],
            b[j + 3],
            b[j + 4],
            b[j + 5],
            b[j + 6],
            b[j + 7],
        ])
    };
    [w(i), w(i + 8)]
}

/// The network-order bytes of an address in two-word form.
#[inline(always)]
pub fn addr_bytes(a: [u64; 2]) -> [u8; 16] {
    let (x, y) = (a[0].to_ne_bytes(), a[1].to_ne_bytes());
    [
        x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7], y[0], y[1], y[2], y[3], y[4], y[5], y[6],
        y[7],
    ]
}

#[inline(always)]
fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

#[inline(always)]
fn be32(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// The packet as an attach point sees it.
pub trait Packet {
    /// Address of the first byte (direct packet access).
    fn data(&self) -> usize;
    /// Address one past the last directly accessible byte.
    fn data_end(&self) -> usize;
    /// The whole packet's length. More than `data_end - data` when part of it is not directly
    /// accessible: a TC skb built by GRO or handed over by a GSO sender carries up to 64 KiB,
    /// most of it in paged fragments behind a linear area holding little more than the headers.
    fn len(&self) -> usize;
    /// Copies `N` bytes at `off` through the hook's load-bytes helper.
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]>;
}

/// Parses Ethernet (with up to two VLAN tags), IPv4 or IPv6 (with extension headers), TCP or UDP.
#[inline(always)]
pub fn parse<P: Packet>(pkt: &P, flow: &mut Flow) -> Parsed {
    let start = pkt.data();
    let end = pkt.data_end();
    // Headers are read from the directly accessible part; a datagram is judged whole against
    // the packet's length (see [`Packet::len`]).
    let len = pkt.len();
    let Some(eth) = header::<[u8; 14]>(start, end, 0) else {
        // Shorter than an Ethernet header: no stack will take it as IP.
        return Parsed::Unprotected;
    };
    // SAFETY: `header` checked that 14 bytes are within the packet.
    let mut ethertype = be16(unsafe { &*eth }, 12);
    let mut off = 14usize;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let Some(tag) = header::<[u8; 4]>(start, end, off) else {
            return Parsed::BadL3;
        };
        // SAFETY: checked by `header`.
        ethertype = be16(unsafe { &*tag }, 2);
        off += 4;
    }
    flow.l3_off = off;
    match ethertype {
        ETH_P_IP => parse_ipv4(start, end, len, off, flow),
        ETH_P_IPV6 => parse_ipv6(pkt, start, end, len, off, flow),
        ETH_P_8021Q | ETH_P_8021AD => Parsed::BadL3,
        _ => Parsed::Unprotected,
    }
}

#[inline(always)]
fn parse_ipv4(start: usize, end: usize, len: usize, off: usize, flow: &mut Flow) -> Parsed {
    let Some(ip) = header::<[u8; 20]>(start, end, off) else {
        return Parsed::BadL3;
    };
    // SAFETY: checked by `header`.
    let ip = unsafe { &*ip };
    if ip[0] >> 4 != 4 {
        return Parsed::BadL3;
    }
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let total = be16(ip, 2) as usize;
    if ihl < 20 || total < ihl || off + total > len {
        return Parsed::BadL3;
    }
    let mut proto = ip[9];
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPV6_AUTH {
        return Parsed::Unprotected;
    }
    flow.ip_version = 4;
    flow.frag_proto = proto;
    flow.src = v4_mapped([ip[12], ip[13], ip[14], ip[15]]);
    flow.dst = v4_mapped([ip[16], ip[17], ip[18], ip[19]]);
    flow.frag_id = be16(ip, 4) as u32;
    let frag = be16(ip, 6);
    let more_fragments = frag & 0x2000 != 0;
    if frag & 0x1fff != 0 {
        flow.frag = Frag::Later;
        flow.l4 = L4::Fragment;
        flow.proto = if proto == IPV6_AUTH {
            PROTO_UNKNOWN
        } else {
            proto
        };
        return Parsed::Ip;
    }
    if more_fragments {
        flow.frag = Frag::First;
    }
    let mut l4 = off + ihl;
    if proto == IPV6_AUTH {
        // An authentication header (RFC 4302) authenticates but does not hide what follows: look
        // through it, as for IPv6. Two in a row are not something any peer sends: refused.
        let Some(ah) = header::<[u8; 2]>(start, end, l4) else {
            return Parsed::BadL3;
        };
        // SAFETY: checked by `header`.
        let ah = unsafe { &*ah };
        proto = ah[0];
        l4 += (ah[1] as usize + 2) * 4;
        if proto == IPV6_AUTH || l4 > off + total {
            return Parsed::BadL3;
        }
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
            return Parsed::Unprotected;
        }
    }
    flow.proto = proto;
    parse_l4(start, end, l4, off + total, flow);
    Parsed::Ip
}

#[inline(always)]
fn parse_ipv6<P: Packet>(
    pkt: &P,
    start: usize,
    end: usize,
    len: usize,
    off: usize,
    flow: &mut Flow,
) -> Parsed {
    let Some(ip) = header::<[u8; 40]>(start, end, off) else {
        return Parsed::BadL3;
    };
    // SAFETY: checked by `header`.
    let ip = unsafe { &*ip };
    if ip[0] >> 4 != 6 {
        return Parsed::BadL3;
    }
    // RFC 4291 §2.5.5.2: IPv4-mapped addresses never appear on the wire. Refusing them keeps an
    // IPv6 packet from posing as the IPv4 client whose session key it would share.
    if ip[8..20] == V4_MAPPED_PREFIX {
        return Parsed::BadL3;
    }
    let ip_end = off + 40 + be16(ip, 4) as usize;
    flow.src = words(ip, 8);
    flow.dst = words(ip, 24);
    flow.ip_version = 6;
    let next = ip[6];
    if next == IPPROTO_TCP || next == IPPROTO_UDP {
        // The common case, no extension headers: read the transport header in place.
        flow.proto = next;
        if ip_end > len {
            return Parsed::BadL3;
        }
        parse_l4(start, end, off + 40, ip_end, flow);
        return Parsed::Ip;
    }
    if !is_extension(next) {
        return Parsed::Unprotected;
    }
    parse_ipv6_extensions(pkt, len, off + 40, ip_end, next, flow)
}

const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

#[inline(always)]
fn is_extension(next: u8) -> bool {
    matches!(
        next,
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_AUTH | IPV6_FRAGMENT
    )
}

/// Walks the extension headers, then reads the transport header.
///
/// Reads go through the hook's load-bytes helper rather than direct packet access: the offset
/// then stays an ordinary scalar to the verifier, so the bounded walk is verified in a handful
/// of states instead of one per combination of header lengths.
#[inline(always)]
fn parse_ipv6_extensions<P: Packet>(
    pkt: &P,
    len: usize,
    mut l4: usize,
    ip_end: usize,
    mut next: u8,
    flow: &mut Flow,
) -> Parsed {
    let mut walked = false;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        if !is_extension(next) {
            walked = true;
            break;
        }
        let Some(ext) = pkt.load::<8>(l4) else {
            return Parsed::BadL3;
        };
        let kind = next;
        next = ext[0];
        l4 += match kind {
            // The authentication header counts in 4-byte units, the others in 8-byte units.
            IPV6_AUTH => (ext[1] as usize + 2) * 4,
            IPV6_FRAGMENT => 8,
            _ => (ext[1] as usize + 1) * 8,
        };
        if kind == IPV6_FRAGMENT {
            let field = be16(&ext, 2);
            flow.frag_id = be32(&ext, 4);
            flow.frag_proto = next;
            if field >> 3 != 0 {
                // What follows is the middle of the payload; `next` names its protocol.
                flow.frag = Frag::Later;
                walked = true;
                break;
            }
            if field & 1 != 0 {
                flow.frag = Frag::First;
            }
            // Otherwise an atomic fragment (RFC 6946): a whole datagram.
        }
    }
    // The walk may also end by reaching its bound exactly as the last extension header ends.
    let walked = walked || !is_extension(next);
    if !walked || l4 > ip_end || ip_end > len {
        return Parsed::BadL3;
    }
    if flow.frag == Frag::Later {
        // `next` names the first header of the fragmentable part, which may be another extension
        // header: then the transport is only known from the first fragment.
        flow.proto = if next == IPPROTO_TCP || next == IPPROTO_UDP {
            next
        } else if is_extension(next) {
            PROTO_UNKNOWN
        } else {
            return Parsed::Unprotected;
        };
        flow.l4 = L4::Fragment;
        return Parsed::Ip;
    }
    if next != IPPROTO_TCP && next != IPPROTO_UDP {
        return Parsed::Unprotected;
    }
    flow.proto = next;
    flow.l4 = L4::Malformed;
    if next == IPPROTO_TCP {
        if let Some(tcp) = pkt.load::<20>(l4) {
            fill_tcp(&tcp, l4, ip_end, flow);
        }
    } else if let Some(udp) = pkt.load::<8>(l4) {
        fill_udp(&udp, l4, ip_end, flow);
    }
    Parsed::Ip
}

#[inline(always)]
fn parse_l4(start: usize, end: usize, l4: usize, ip_end: usize, flow: &mut Flow) {
    flow.l4 = L4::Malformed;
    if flow.proto == IPPROTO_TCP {
        if let Some(tcp) = header::<[u8; 20]>(start, end, l4) {
            // SAFETY: checked by `header`.
            fill_tcp(unsafe { &*tcp }, l4, ip_end, flow);
        }
    } else if let Some(udp) = header::<[u8; 8]>(start, end, l4) {
        // SAFETY: checked by `header`.
        fill_udp(unsafe { &*udp }, l4, ip_end, flow);
    }
}

/// Fills the flow from a TCP header at `l4` if it is whole within the datagram ending at `ip_end`.
#[inline(always)]
fn fill_tcp(tcp: &[u8; 20], l4: usize, ip_end: usize, flow: &mut Flow) {
    let header_len = ((tcp[12] >> 4) as usize) * 4;
    if header_len < 20 || l4 + header_len > ip_end {
        return;
    }
    flow.sport = be16(tcp, 0);
    flow.dport = be16(tcp, 2);
    flow.seq = be32(tcp, 4);
    flow.ack = be32(tcp, 8);
    flow.tcp_flags = tcp[13];
    flow.payload_len = (ip_end - l4 - header_len) as u32;
    flow.l4 = L4::Complete;
}

/// Fills the flow from a UDP header at `l4` if it is whole within the datagram ending at `ip_end`.
#[inline(always)]
fn fill_udp(udp: &[u8; 8], l4: usize, ip_end: usize, flow: &mut Flow) {
    if l4 + 8 > ip_end {
        return;
    }
    flow.sport = be16(udp, 0);
    flow.dport = be16(udp, 2);
    flow.l4 = L4::Complete;
}
