//! An independent reading of frames, built on `etherparse`'s header slices but layered the way
//! the Linux receive path layers them: what the programs' verdicts and RSTs are checked against.
//!
//! The model is a host with VLAN devices for any stack of 802.1Q/802.1ad tags. Where the reading
//! has a choice it takes the one that finds more TCP/UDP headers, which is the stricter check of a
//! "pass" verdict:
//!
//! - AH (IPv4 and IPv6) is looked through: it authenticates but hides nothing, and a host with a
//!   security association delivers what it carries. ESP, which does hide it, ends the reading.
//! - IPv6 hop-by-hop options are accepted anywhere in the chain (Linux accepts them only first).
//! - Checksums and the UDP length field are not verified: the programs never look at them, so a
//!   packet must be judged the same whatever they hold.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{
    EtherType, Ethernet2Slice, Ipv4HeaderSlice, Ipv6FragmentHeaderSlice, Ipv6HeaderSlice,
    Ipv6RawExtHeaderSlice, SingleVlanSlice, TcpHeaderSlice, UdpHeaderSlice,
};

use crate::packet::{Spec, Transport, tcp_flags};

const TCP: u8 = 6;
const UDP: u8 = 17;

/// Identifies a fragmented datagram: source, destination, identification (as the programs key
/// it, minus the protocol, which later IPv6 fragments need not name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DatagramId {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IPv4 identification or IPv6 fragment-header identification.
    pub id: u32,
}

/// TCP fields a RST answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpFields {
    /// Flags byte.
    pub flags: u8,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number.
    pub ack: u32,
    /// Segment payload after the TCP header (within the IP datagram).
    pub payload_len: u32,
}

/// A TCP or UDP header read completely.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    /// Bytes of Ethernet header and VLAN tags.
    pub l2_len: usize,
    /// Source address (IPv4 stays IPv4; an IPv4-mapped IPv6 source stays IPv6).
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// 6 or 17.
    pub proto: u8,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// For TCP.
    pub tcp: Option<TcpFields>,
    /// Set when this is the first fragment (offset 0, more fragments) of a datagram.
    pub first_fragment: Option<DatagramId>,
}

/// How a receiving host reads a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reading {
    /// Not IPv4 or IPv6 (ARP, unknown EtherType, a truncated link layer).
    NotIp,
    /// Claims to be IPv4 or IPv6 but the network layer is malformed or truncated: dropped.
    BadIp,
    /// IP carrying something other than TCP or UDP (ICMP, AH, ESP, an unknown header, ...).
    Other(u8),
    /// TCP or UDP whose header is truncated or malformed: dropped by the transport.
    BadTransport(u8),
    /// A complete TCP or UDP header: a whole datagram or the first fragment of one.
    Transport(Flow),
    /// A fragment with a non-zero offset; `proto` is what its header says follows.
    LaterFragment {
        /// The datagram it belongs to.
        datagram: DatagramId,
        /// The protocol the fragment header (IPv6) or IP header (IPv4) names.
        proto: u8,
    },
}

/// Reads a frame that starts with an Ethernet header.
pub fn read(frame: &[u8]) -> Reading {
    let Ok(eth) = Ethernet2Slice::from_slice_without_fcs(frame) else {
        return Reading::NotIp;
    };
    let mut ether_type = eth.ether_type();
    let mut rest = eth.payload_slice();
    loop {
        match ether_type {
            EtherType::VLAN_TAGGED_FRAME | EtherType::PROVIDER_BRIDGING => {
                let Ok(tag) = SingleVlanSlice::from_slice(rest) else {
                    return Reading::NotIp;
                };
                ether_type = tag.ether_type();
                rest = tag.payload_slice();
            }
            EtherType::IPV4 => return read_ipv4(frame.len() - rest.len(), rest),
            EtherType::IPV6 => return read_ipv6(frame.len() - rest.len(), rest),
            _ => return Reading::NotIp,
        }
    }
}

fn read_ipv4(l2_len: usize, bytes: &[u8]) -> Reading {
    let Ok(ip) = Ipv4HeaderSlice::from_slice(bytes) else {
        return Reading::BadIp;
    };
    let header_len = ip.slice().len();
    let total = usize::from(ip.total_len());
    if total < header_len || total > bytes.len() {
        return Reading::BadIp;
    }
    let src = IpAddr::V4(Ipv4Addr::from(ip.source()));
    let dst = IpAddr::V4(Ipv4Addr::from(ip.destination()));
    let datagram = DatagramId {
        src,
        dst,
        id: u32::from(ip.identification()),
    };
    let proto = ip.protocol().0;
    if ip.fragments_offset().value() != 0 {
        return Reading::LaterFragment { datagram, proto };
    }
    let first = ip.more_fragments().then_some(datagram);
    let mut rest = &bytes[header_len..total];
    let mut next = proto;
    while next == AH {
        let Some((n, len)) = auth_header(rest) else {
            return Reading::BadIp;
        };
        next = n;
        rest = &rest[len..];
    }
    transport(l2_len, src, dst, next, rest, first)
}

const AH: u8 = 51;

/// Next header and length of an authentication header (RFC 4302: length in 4-byte units minus 2).
fn auth_header(bytes: &[u8]) -> Option<(u8, usize)> {
    let len = (usize::from(*bytes.get(1)?) + 2) * 4;
    (bytes.len() >= len).then(|| (bytes[0], len))
}

fn read_ipv6(l2_len: usize, bytes: &[u8]) -> Reading {
    let Ok(ip) = Ipv6HeaderSlice::from_slice(bytes) else {
        return Reading::BadIp;
    };
    let end = 40 + usize::from(ip.payload_length());
    if end > bytes.len() {
        return Reading::BadIp;
    }
    let src = IpAddr::V6(Ipv6Addr::from(ip.source()));
    let dst = IpAddr::V6(Ipv6Addr::from(ip.destination()));
    let mut rest = &bytes[40..end];
    let mut next = ip.next_header().0;
    let mut first = None;
    loop {
        match next {
            0 | 43 | 60 => {
                let Ok(ext) = Ipv6RawExtHeaderSlice::from_slice(rest) else {
                    return Reading::BadIp;
                };
                next = ext.next_header().0;
                rest = &rest[ext.slice().len()..];
            }
            44 => {
                let Ok(frag) = Ipv6FragmentHeaderSlice::from_slice(rest) else {
                    return Reading::BadIp;
                };
                let datagram = DatagramId {
                    src,
                    dst,
                    id: frag.identification(),
                };
                if frag.fragment_offset().value() != 0 {
                    return Reading::LaterFragment {
                        datagram,
                        proto: frag.next_header().0,
                    };
                }
                if frag.more_fragments() {
                    first = Some(datagram);
                }
                next = frag.next_header().0;
                rest = &rest[8..];
            }
            AH => {
                let Some((n, len)) = auth_header(rest) else {
                    return Reading::BadIp;
                };
                next = n;
                rest = &rest[len..];
            }
            TCP | UDP => return transport(l2_len, src, dst, next, rest, first),
            // ESP, ICMPv6, No Next Header, anything unknown: not TCP/UDP.
            other => return Reading::Other(other),
        }
    }
}

fn transport(
    l2_len: usize,
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    payload: &[u8],
    first_fragment: Option<DatagramId>,
) -> Reading {
    let flow = |sport, dport, tcp| {
        Reading::Transport(Flow {
            l2_len,
            src,
            dst,
            proto,
            sport,
            dport,
            tcp,
            first_fragment,
        })
    };
    match proto {
        TCP => match TcpHeaderSlice::from_slice(payload) {
            Ok(t) => {
                let fields = TcpFields {
                    flags: t.slice()[13],
                    seq: t.sequence_number(),
                    ack: t.acknowledgment_number(),
                    payload_len: (payload.len() - t.slice().len()) as u32,
                };
                flow(t.source_port(), t.destination_port(), Some(fields))
            }
            Err(_) => Reading::BadTransport(proto),
        },
        // Only the 8 header bytes matter to the verdict; the length field is not consulted.
        UDP => match UdpHeaderSlice::from_slice(payload) {
            Ok(u) => flow(u.source_port(), u.destination_port(), None),
            Err(_) => Reading::BadTransport(proto),
        },
        other => Reading::Other(other),
    }
}

/// The segment a RST answers, as the test knows it.
#[derive(Clone, Debug)]
pub struct Answered {
    /// The incoming frame's Ethernet header and VLAN tags.
    pub l2: Vec<u8>,
    /// Incoming source address.
    pub src: IpAddr,
    /// Incoming destination address.
    pub dst: IpAddr,
    /// Incoming source port.
    pub sport: u16,
    /// Incoming destination port.
    pub dport: u16,
    /// Incoming TCP fields.
    pub tcp: TcpFields,
}

impl Answered {
    /// From a builder spec and the frame built from it.
    pub fn from_spec(spec: &Spec, frame: &[u8]) -> Answered {
        let Transport::Tcp {
            flags, seq, ack, ..
        } = spec.transport
        else {
            panic!("only TCP is answered with a RST");
        };
        Answered {
            l2: frame[..spec.l3_offset()].to_vec(),
            src: spec.src,
            dst: spec.dst,
            sport: spec.sport,
            dport: spec.dport,
            tcp: TcpFields {
                flags,
                seq,
                ack,
                payload_len: spec.payload.len() as u32,
            },
        }
    }

    /// From the oracle's reading of a frame, if it is a complete TCP segment.
    pub fn from_reading(frame: &[u8], reading: &Reading) -> Option<Answered> {
        let Reading::Transport(f) = reading else {
            return None;
        };
        Some(Answered {
            l2: frame[..f.l2_len].to_vec(),
            src: f.src,
            dst: f.dst,
            sport: f.sport,
            dport: f.dport,
            tcp: f.tcp?,
        })
    }
}

/// Checks that `out` is the RST RFC 9293 §3.10.7.1 prescribes for `incoming`: MACs swapped and
/// VLAN tags kept, a bare IP header (no options or extension headers) with swapped addresses and a
/// valid checksum, swapped ports, a 20-byte TCP header with a valid checksum, and nothing after it.
pub fn check_rst(incoming: &Answered, out: &[u8]) -> Result<(), String> {
    let l2 = incoming.l2.len();
    let ip_len = if incoming.src.is_ipv4() { 20 } else { 40 };
    if out.len() != l2 + ip_len + 20 {
        return Err(format!(
            "RST is {} bytes, expected {} (link {l2} + IP {ip_len} + TCP 20)",
            out.len(),
            l2 + ip_len + 20
        ));
    }
    let eth = Ethernet2Slice::from_slice_without_fcs(out).map_err(|e| e.to_string())?;
    if eth.destination() != incoming.l2[6..12] || eth.source() != incoming.l2[0..6] {
        return Err("Ethernet addresses not swapped".into());
    }
    if out[12..l2] != incoming.l2[12..] {
        return Err(format!(
            "VLAN tags / EtherType changed: {:02x?} became {:02x?}",
            &incoming.l2[12..],
            &out[12..l2]
        ));
    }
    let ip_bytes = &out[l2..l2 + ip_len];
    let tcp_bytes = &out[l2 + ip_len..];
    let tcp = TcpHeaderSlice::from_slice(tcp_bytes).map_err(|e| format!("TCP: {e}"))?;
    let sum = match (incoming.src, incoming.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let ip = Ipv4HeaderSlice::from_slice(ip_bytes).map_err(|e| format!("IPv4: {e}"))?;
            if ip.ihl() != 5 || ip.total_len() != 40 {
                return Err(format!(
                    "IPv4 ihl {} total {}, expected 5 and 40",
                    ip.ihl(),
                    ip.total_len()
                ));
            }
            if ip.source_addr() != d || ip.destination_addr() != s {
                return Err("IPv4 addresses not swapped".into());
            }
            if ip.protocol().0 != TCP || ip.ttl() == 0 {
                return Err("IPv4 protocol is not TCP or TTL is 0".into());
            }
            if ip.more_fragments() || ip.fragments_offset().value() != 0 {
                return Err("IPv4 RST is a fragment".into());
            }
            if !crate::packet::verifies(ip_bytes, 0) {
                return Err("IPv4 header checksum invalid".into());
            }
            tcp.calc_checksum_ipv4(&ip, &[])
                .map_err(|e| e.to_string())?
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let ip = Ipv6HeaderSlice::from_slice(ip_bytes).map_err(|e| format!("IPv6: {e}"))?;
            if ip.payload_length() != 20 || ip.next_header().0 != TCP {
                return Err(format!(
                    "IPv6 payload length {} next header {}, expected 20 and 6",
                    ip.payload_length(),
                    ip.next_header().0
                ));
            }
            if ip.source_addr() != d || ip.destination_addr() != s {
                return Err("IPv6 addresses not swapped".into());
            }
            if ip.hop_limit() == 0 {
                return Err("IPv6 hop limit 0".into());
            }
            tcp.calc_checksum_ipv6(&ip, &[])
                .map_err(|e| e.to_string())?
        }
        _ => return Err("mixed address families".into()),
    };
    if tcp.checksum() != sum {
        return Err(format!(
            "TCP checksum {:#06x}, expected {sum:#06x}",
            tcp.checksum()
        ));
    }
    if tcp.source_port() != incoming.dport || tcp.destination_port() != incoming.sport {
        return Err("TCP ports not swapped".into());
    }
    if tcp.data_offset() != 5 {
        return Err(format!("TCP data offset {}", tcp.data_offset()));
    }
    let t = incoming.tcp;
    let flags = tcp_bytes[13];
    if t.flags & tcp_flags::ACK != 0 {
        if flags != tcp_flags::RST || tcp.sequence_number() != t.ack {
            return Err(format!(
                "answering a segment with ACK: flags {flags:#04x} seq {}, expected RST and seq {}",
                tcp.sequence_number(),
                t.ack
            ));
        }
    } else {
        let occupied = t.payload_len
            + u32::from(t.flags & tcp_flags::SYN != 0)
            + u32::from(t.flags & tcp_flags::FIN != 0);
        let ack = t.seq.wrapping_add(occupied);
        if flags != tcp_flags::RST | tcp_flags::ACK
            || tcp.sequence_number() != 0
            || tcp.acknowledgment_number() != ack
        {
            return Err(format!(
                "answering a segment without ACK: flags {flags:#04x} seq {} ack {}, expected \
                 RST|ACK, seq 0, ack {ack}",
                tcp.sequence_number(),
                tcp.acknowledgment_number()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{DST_MAC, Ext, SRC_MAC, tcp_flags::*};

    fn addrs(v6: bool) -> (IpAddr, IpAddr) {
        if v6 {
            (
                "2001:db8::7".parse().unwrap(),
                "2001:db8::1".parse().unwrap(),
            )
        } else {
            ("192.0.2.7".parse().unwrap(), "192.0.2.1".parse().unwrap())
        }
    }

    /// The reading finds the fields the builder wrote, through tags, fragments and extension
    /// headers, and refuses what Linux would not read.
    #[test]
    fn reads_what_the_builder_builds() {
        for v6 in [false, true] {
            let (c, s) = addrs(v6);
            let syn = Spec::syn(c, s, 8000).vlan(0x88a8, 1).vlan(0x8100, 2);
            let Reading::Transport(f) = read(&syn.build()) else {
                panic!("a SYN is TCP");
            };
            assert_eq!(
                (f.l2_len, f.src, f.dst, f.sport, f.dport),
                (22, c, s, 40000, 8000)
            );
            assert_eq!(f.tcp.map(|t| t.flags), Some(SYN));
            let udp = Spec::udp(c, s, 53).fragment(0, true, 9).build();
            let Reading::Transport(f) = read(&udp) else {
                panic!("a first fragment carries the UDP header");
            };
            assert_eq!((f.proto, f.dport), (17, 53));
            assert_eq!(f.first_fragment.map(|d| d.id), Some(9));
            let later = Spec::udp(c, s, 53).fragment(3, false, 9).build();
            assert!(matches!(
                read(&later),
                Reading::LaterFragment { proto: 17, datagram } if datagram.id == 9
            ));
            let qinq = Spec::syn(c, s, 8000).vlan(0x9100, 1).build();
            assert_eq!(
                read(&qinq),
                Reading::NotIp,
                "0x9100 is not a tag Linux reads"
            );
            let esp = Spec::other(c, s, 50, &[0; 16]).build();
            assert_eq!(read(&esp), Reading::Other(50));
            let mut cut = Spec::syn(c, s, 8000).build();
            cut.truncate(cut.len() - 10);
            assert_eq!(read(&cut), Reading::BadIp, "the IP length no longer fits");
        }
        let (c, s) = addrs(true);
        let chain = vec![Ext::DestOpts(0), Ext::HopByHop, Ext::Auth, Ext::Routing];
        let deep = Spec::syn(c, s, 22).with_ext(chain).build();
        assert!(matches!(read(&deep), Reading::Transport(f) if f.dport == 22));
    }

    /// The RST a correct implementation sends for `syn`, built independently of the programs.
    fn correct_rst(syn: &Spec) -> Vec<u8> {
        let mut rst = Spec::syn(syn.dst, syn.src, syn.sport)
            .with_sport(syn.dport)
            .tcp(RST | ACK, 0, 0x1234_5679);
        rst.vlans = syn.vlans.clone();
        let mut frame = rst.build();
        frame[0..6].copy_from_slice(&SRC_MAC);
        frame[6..12].copy_from_slice(&DST_MAC);
        frame
    }

    /// The RST check accepts an independently built correct RST and rejects any one broken field.
    #[test]
    fn check_rst_accepts_a_correct_rst_and_nothing_else() {
        for v6 in [false, true] {
            let (c, s) = addrs(v6);
            let syn = Spec::syn(c, s, 2222).vlan(0x8100, 3);
            let frame = syn.build();
            let answered = Answered::from_spec(&syn, &frame);
            let good = correct_rst(&syn);
            assert_eq!(check_rst(&answered, &good), Ok(()));
            let l4 = syn.l3_offset() + if v6 { 40 } else { 20 };
            let mut bad: Vec<(&str, Vec<u8>)> = Vec::new();
            for (what, at) in [
                ("MAC", 0),
                ("VLAN tag", 15),
                ("source port", l4),
                ("sequence", l4 + 4),
                ("acknowledgment", l4 + 11),
                ("flags", l4 + 13),
                ("TCP checksum", l4 + 16),
            ] {
                let mut b = good.clone();
                b[at] ^= 1;
                bad.push((what, b));
            }
            let mut longer = good.clone();
            longer.push(0);
            bad.push(("trailing byte", longer));
            if !v6 {
                let mut b = good.clone();
                b[syn.l3_offset() + 10] ^= 1;
                bad.push(("IPv4 checksum", b));
            }
            for (what, b) in bad {
                assert!(
                    check_rst(&answered, &b).is_err(),
                    "{what} broken yet accepted"
                );
            }
        }
    }
}
