//! Builds a TCP RST in place of a refused TCP segment (RFC 9293 §3.10.7.1, "reset generation"),
//! shared by both attach points: the attach point then trims the packet to the returned length and
//! sends it back out of the interface it came in on.

use crate::parse::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, addr_bytes, header};

/// Rewrites the packet into a RST answering `flow`; returns the new packet length.
///
/// The Ethernet header and any VLAN tags are kept (addresses swapped); IP options and IPv6
/// extension headers are dropped, so the reply is never longer than the packet it replaces.
#[inline(always)]
pub fn build(start: usize, end: usize, flow: &Flow) -> Option<usize> {
    let eth = header::<[u8; 12]>(start, end, 0)?;
    // SAFETY: `header` checked the 12 bytes are within the packet; nothing else aliases them.
    let eth = unsafe { &mut *eth };
    for i in 0..6 {
        eth.swap(i, i + 6);
    }

    // RFC 9293: if the segment has ACK, the RST takes its sequence number from SEG.ACK; otherwise
    // it has sequence 0 and acknowledges everything the segment occupied.
    let (seq, ack, flags) = if flow.tcp_flags & TCP_ACK != 0 {
        (flow.ack, 0u32, TCP_RST)
    } else {
        let mut len = flow.payload_len;
        if flow.tcp_flags & TCP_SYN != 0 {
            len += 1;
        }
        if flow.tcp_flags & TCP_FIN != 0 {
            len += 1;
        }
        (0u32, flow.seq.wrapping_add(len), TCP_RST | TCP_ACK)
    };
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&flow.dport.to_be_bytes());
    tcp[2..4].copy_from_slice(&flow.sport.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    // Window, checksum and urgent pointer stay zero until the checksum is computed.

    let l3 = flow.l3_off;
    let (src, dst) = (addr_bytes(flow.src), addr_bytes(flow.dst));
    if flow.ip_version == 4 {
        let out = header::<[u8; 40]>(start, end, l3)?;
        // SAFETY: checked by `header`.
        let out = unsafe { &mut *out };
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&40u16.to_be_bytes());
        ip[6] = 0x40; // DF
        ip[8] = 64;
        ip[9] = idgate_common::IPPROTO_TCP;
        ip[12..16].copy_from_slice(&dst[12..16]);
        ip[16..20].copy_from_slice(&src[12..16]);
        let ip_sum = fold(sum_words(&ip, 0));
        ip[10..12].copy_from_slice(&(!ip_sum).to_be_bytes());

        let mut pseudo = sum_words(&dst[12..16], 0);
        pseudo = sum_words(&src[12..16], pseudo);
        pseudo += idgate_common::IPPROTO_TCP as u32 + 20;
        let tcp_sum = fold(sum_words(&tcp, pseudo));
        tcp[16..18].copy_from_slice(&(!tcp_sum).to_be_bytes());

        out[0..20].copy_from_slice(&ip);
        out[20..40].copy_from_slice(&tcp);
        Some(l3 + 40)
    } else {
        let out = header::<[u8; 60]>(start, end, l3)?;
        // SAFETY: checked by `header`.
        let out = unsafe { &mut *out };
        let mut ip = [0u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&20u16.to_be_bytes());
        ip[6] = idgate_common::IPPROTO_TCP;
        ip[7] = 64;
        ip[8..24].copy_from_slice(&dst);
        ip[24..40].copy_from_slice(&src);

        let mut pseudo = sum_words(&dst, 0);
        pseudo = sum_words(&src, pseudo);
        pseudo += idgate_common::IPPROTO_TCP as u32 + 20;
        let tcp_sum = fold(sum_words(&tcp, pseudo));
        tcp[16..18].copy_from_slice(&(!tcp_sum).to_be_bytes());

        out[0..40].copy_from_slice(&ip);
        out[40..60].copy_from_slice(&tcp);
        Some(l3 + 60)
    }
}

/// One's-complement sum of big-endian 16-bit words (even-length input), added to `acc`.
#[inline(always)]
fn sum_words(bytes: &[u8], mut acc: u32) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        acc += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    acc
}

#[inline(always)]
fn fold(mut acc: u32) -> u16 {
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    acc as u16
}
