//! A small builder for the packets the suites feed the programs: Ethernet with VLAN tags, IPv4
//! (options, fragments) or IPv6 (extension headers, fragment header), TCP or UDP, with correct
//! lengths and checksums unless a test breaks them on purpose.

use std::net::IpAddr;

/// TCP flag bits.
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// PSH.
    pub const PSH: u8 = 0x08;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// Client MAC used by the builder.
pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Server MAC used by the builder.
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// Transport of a built packet.
#[derive(Clone, Debug)]
pub enum Transport {
    /// TCP with flags, sequence and acknowledgment numbers, and option bytes (multiple of 4).
    Tcp {
        /// Flags.
        flags: u8,
        /// Sequence number.
        seq: u32,
        /// Acknowledgment number.
        ack: u32,
        /// Options (length a multiple of 4).
        options: Vec<u8>,
    },
    /// UDP.
    Udp,
    /// Any other IP protocol, with its number; the payload is the whole body.
    Other(u8),
}

/// IPv6 extension headers to put before the transport header.
#[derive(Clone, Debug)]
pub enum Ext {
    /// Hop-by-hop options (8 bytes of padding).
    HopByHop,
    /// Destination options with `len8` extra 8-byte units.
    DestOpts(u8),
    /// Routing header (type 4 shape, no segments left).
    Routing,
    /// Authentication header (12 bytes of ICV).
    Auth,
    /// Fragment header: offset in 8-byte units, more-fragments, identification.
    Fragment(u16, bool, u32),
}

/// A packet to build.
#[derive(Clone, Debug)]
pub struct Spec {
    /// VLAN tags, outermost first: (TPID, VLAN id).
    pub vlans: Vec<(u16, u16)>,
    /// Source address (IPv4 or IPv6; both must be the same family).
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Transport.
    pub transport: Transport,
    /// Payload after the transport header.
    pub payload: Vec<u8>,
    /// IPv4 options (multiple of 4 bytes).
    pub ipv4_options: Vec<u8>,
    /// IPv4 fragment: (offset in 8-byte units, more fragments, identification).
    pub ipv4_frag: Option<(u16, bool, u16)>,
    /// IPv6 extension headers.
    pub ext: Vec<Ext>,
    /// For a non-first fragment: omit the transport header (the body is just `payload`).
    pub omit_transport: bool,
}

impl Spec {
    /// A TCP SYN from `src:40000` to `dst:dport`.
    pub fn syn(src: IpAddr, dst: IpAddr, dport: u16) -> Spec {
        Spec {
            vlans: Vec::new(),
            src,
            dst,
            sport: 40000,
            dport,
            transport: Transport::Tcp {
                flags: tcp_flags::SYN,
                seq: 0x1234_5678,
                ack: 0,
                options: vec![2, 4, 0x05, 0xb4], // MSS 1460
            },
            payload: Vec::new(),
            ipv4_options: Vec::new(),
            ipv4_frag: None,
            ext: Vec::new(),
            omit_transport: false,
        }
    }

    /// A UDP datagram from `src:40000` to `dst:dport` with a small payload.
    pub fn udp(src: IpAddr, dst: IpAddr, dport: u16) -> Spec {
        Spec {
            transport: Transport::Udp,
            payload: b"hello".to_vec(),
            ..Spec::syn(src, dst, dport)
        }
    }

    /// Replaces the TCP flags, sequence and acknowledgment numbers.
    pub fn tcp(mut self, flags: u8, seq: u32, ack: u32) -> Spec {
        self.transport = Transport::Tcp {
            flags,
            seq,
            ack,
            options: Vec::new(),
        };
        self
    }

    /// Adds a VLAN tag (outermost first).
    pub fn vlan(mut self, tpid: u16, id: u16) -> Spec {
        self.vlans.push((tpid, id));
        self
    }

    /// A datagram of another IP protocol (ICMP, ICMPv6, ...) whose body is `body`.
    pub fn other(src: IpAddr, dst: IpAddr, proto: u8, body: &[u8]) -> Spec {
        Spec {
            transport: Transport::Other(proto),
            payload: body.to_vec(),
            ..Spec::syn(src, dst, 0)
        }
    }

    /// Replaces the source port.
    pub fn with_sport(mut self, sport: u16) -> Spec {
        self.sport = sport;
        self
    }

    /// Replaces the payload after the transport header.
    pub fn with_payload(mut self, payload: &[u8]) -> Spec {
        self.payload = payload.to_vec();
        self
    }

    /// Sets the IPv4 options (a multiple of 4 bytes).
    pub fn with_ipv4_options(mut self, options: &[u8]) -> Spec {
        self.ipv4_options = options.to_vec();
        self
    }

    /// Sets the IPv6 extension headers.
    pub fn with_ext(mut self, ext: Vec<Ext>) -> Spec {
        self.ext = ext;
        self
    }

    /// Makes this packet a fragment of datagram `id`, in either family: offset in 8-byte units,
    /// more-fragments flag. A fragment with a non-zero offset carries no transport header. For
    /// IPv6 the fragment header goes first, before any extension headers already set.
    pub fn fragment(mut self, offset: u16, more: bool, id: u16) -> Spec {
        if self.src.is_ipv4() {
            self.ipv4_frag = Some((offset, more, id));
        } else {
            self.ext
                .insert(0, Ext::Fragment(offset, more, u32::from(id)));
        }
        self.omit_transport = offset != 0;
        self
    }

    /// Offset of the IP header in the frame: Ethernet plus the VLAN tags.
    pub fn l3_offset(&self) -> usize {
        14 + 4 * self.vlans.len()
    }

    /// Offset of the transport header in the frame: after IPv4 options or IPv6 extension headers.
    pub fn l4_offset(&self) -> usize {
        match self.src {
            IpAddr::V4(_) => self.l3_offset() + 20 + self.ipv4_options.len(),
            IpAddr::V6(_) => self.l3_offset() + 40 + self.ext_bytes().0.len(),
        }
    }

    /// Builds the frame.
    pub fn build(&self) -> Vec<u8> {
        let l4 = self.transport_bytes();
        let mut f = Vec::new();
        f.extend_from_slice(&DST_MAC);
        f.extend_from_slice(&SRC_MAC);
        for (tpid, id) in &self.vlans {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
        }
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&0x0800u16.to_be_bytes());
                let ihl = 20 + self.ipv4_options.len();
                let total = ihl + l4.len();
                let mut ip = vec![0u8; 20];
                ip[0] = 0x40 | (ihl / 4) as u8;
                ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
                let (off, mf, id) = self.ipv4_frag.unwrap_or((0, false, 0x4242));
                ip[4..6].copy_from_slice(&id.to_be_bytes());
                let frag = off | if mf { 0x2000 } else { 0 };
                ip[6..8].copy_from_slice(&frag.to_be_bytes());
                ip[8] = 64;
                ip[9] = self.proto();
                ip[12..16].copy_from_slice(&s.octets());
                ip[16..20].copy_from_slice(&d.octets());
                ip.extend_from_slice(&self.ipv4_options);
                let sum = checksum(&ip, 0);
                ip[10..12].copy_from_slice(&sum.to_be_bytes());
                f.extend_from_slice(&ip);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&0x86ddu16.to_be_bytes());
                let (ext, first_next) = self.ext_bytes();
                let mut ip = vec![0u8; 40];
                ip[0] = 0x60;
                ip[4..6].copy_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
                ip[6] = first_next;
                ip[7] = 64;
                ip[8..24].copy_from_slice(&s.octets());
                ip[24..40].copy_from_slice(&d.octets());
                f.extend_from_slice(&ip);
                f.extend_from_slice(&ext);
            }
            _ => panic!("source and destination must be the same family"),
        }
        f.extend_from_slice(&l4);
        f
    }

    fn proto(&self) -> u8 {
        match self.transport {
            Transport::Tcp { .. } => 6,
            Transport::Udp => 17,
            Transport::Other(p) => p,
        }
    }

    fn ext_bytes(&self) -> (Vec<u8>, u8) {
        let mut out = Vec::new();
        let codes: Vec<u8> = self
            .ext
            .iter()
            .map(|e| match e {
                Ext::HopByHop => 0,
                Ext::Routing => 43,
                Ext::Fragment(..) => 44,
                Ext::Auth => 51,
                Ext::DestOpts(_) => 60,
            })
            .collect();
        for (i, e) in self.ext.iter().enumerate() {
            let next = codes.get(i + 1).copied().unwrap_or(self.proto());
            match e {
                Ext::HopByHop => out.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]),
                Ext::DestOpts(extra) => {
                    out.extend_from_slice(&[next, *extra, 1, 4, 0, 0, 0, 0]);
                    out.extend(std::iter::repeat_n(0u8, 8 * *extra as usize));
                }
                Ext::Routing => out.extend_from_slice(&[next, 0, 4, 0, 0, 0, 0, 0]),
                Ext::Auth => {
                    // Length in 4-byte units minus 2: 12 bytes header + 12 bytes ICV = 6 - 2.
                    out.extend_from_slice(&[next, 4, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]);
                    out.extend_from_slice(&[0u8; 12]);
                }
                Ext::Fragment(off, more, id) => {
                    let field = (off << 3) | u16::from(*more);
                    out.extend_from_slice(&[next, 0]);
                    out.extend_from_slice(&field.to_be_bytes());
                    out.extend_from_slice(&id.to_be_bytes());
                }
            }
        }
        (out, codes.first().copied().unwrap_or(self.proto()))
    }

    fn transport_bytes(&self) -> Vec<u8> {
        if self.omit_transport {
            return self.payload.clone();
        }
        let mut t = Vec::new();
        match &self.transport {
            Transport::Tcp {
                flags,
                seq,
                ack,
                options,
            } => {
                t.extend_from_slice(&self.sport.to_be_bytes());
                t.extend_from_slice(&self.dport.to_be_bytes());
                t.extend_from_slice(&seq.to_be_bytes());
                t.extend_from_slice(&ack.to_be_bytes());
                t.push((((20 + options.len()) / 4) as u8) << 4);
                t.push(*flags);
                t.extend_from_slice(&64240u16.to_be_bytes());
                t.extend_from_slice(&[0, 0, 0, 0]);
                t.extend_from_slice(options);
                t.extend_from_slice(&self.payload);
                let sum = l4_checksum(self.src, self.dst, 6, &t);
                t[16..18].copy_from_slice(&sum.to_be_bytes());
            }
            Transport::Udp => {
                t.extend_from_slice(&self.sport.to_be_bytes());
                t.extend_from_slice(&self.dport.to_be_bytes());
                t.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                t.extend_from_slice(&[0, 0]);
                t.extend_from_slice(&self.payload);
                let sum = l4_checksum(self.src, self.dst, 17, &t);
                t[6..8].copy_from_slice(&sum.to_be_bytes());
            }
            Transport::Other(_) => t.extend_from_slice(&self.payload),
        }
        t
    }
}

/// An ARP request from the client MAC: not IP, never judged.
pub fn arp_request() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    // Ethernet/IPv4, request, sender 192.0.2.9, target 192.0.2.1.
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&SRC_MAC);
    f.extend_from_slice(&[192, 0, 2, 9]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[192, 0, 2, 1]);
    f
}

/// Recomputes the IPv4 header checksum of the header at `l3` after a test changed it.
pub fn fix_ipv4_checksum(frame: &mut [u8], l3: usize) {
    let ihl = usize::from(frame[l3] & 0x0f) * 4;
    let end = (l3 + ihl.max(20)).min(frame.len());
    frame[l3 + 10..l3 + 12].fill(0);
    let sum = checksum(&frame[l3..end], 0);
    frame[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
}

/// The Internet checksum (RFC 1071) of `data`, starting from `acc`.
pub fn checksum(data: &[u8], mut acc: u32) -> u16 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The TCP/UDP checksum of `segment` (its checksum field zeroed) with the pseudo-header.
pub fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, proto]);
            pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&(segment.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => panic!("mixed families"),
    }
    pseudo.extend_from_slice(segment);
    checksum(&pseudo, 0)
}

/// Whether the checksum over `data` (with its checksum field in place) verifies.
pub fn verifies(data: &[u8], acc: u32) -> bool {
    checksum(data, acc) == 0
}
