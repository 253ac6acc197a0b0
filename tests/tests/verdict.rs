//! The verdict suite: both enforcement programs (XDP and TC) run through BPF_PROG_TEST_RUN on
//! crafted frames, for IPv4 and IPv6, plus the typed data-plane API that configures them. Every
//! test loads its own data plane, so tests share no maps and run in parallel.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use idgate::dataplane::{
    CidrAction, Dataplane, DataplaneError, DataplaneEvent, EventKind, Expiry, LoadOptions, Service,
    ServiceAction, Session,
};
use idgate_common::Reason::{
    self, AllowCidr, AllowSession, DeniedCidr, Expired, Malformed, NoSession, UnknownFragment,
};
use idgate_tests::{
    fixture::*,
    oracle::{Answered, check_rst},
    packet::{Ext, Spec, Transport, arp_request, fix_ipv4_checksum, tcp_flags},
    run::{Hook, Outcome, Ran, load, require_root},
};

/// TCP, refused silently.
const WEB: u32 = 1;
const WEB_PORT: u16 = 8000;
/// UDP, refused silently.
const DNS: u32 = 2;
const DNS_PORT: u16 = 5353;
/// TCP, refused with a RST.
const SSH: u32 = 3;
const SSH_PORT: u16 = 2222;
/// UDP with the reset action (UDP is still dropped).
const SYSLOG: u32 = 4;
const SYSLOG_PORT: u16 = 5514;
/// TCP, refused silently: "some other service".
const OTHER: u32 = 5;
const OTHER_PORT: u16 = 9443;
/// Protected by nobody, for either protocol.
const UNPROTECTED: u16 = 9000;

const PASS: Outcome = Outcome::Pass;
const DROP: Outcome = Outcome::Drop;
const BOUNCE: Outcome = Outcome::Bounce;

fn services() -> Vec<Service> {
    vec![
        tcp_service(WEB, WEB_PORT, ServiceAction::Drop),
        udp_service(DNS, DNS_PORT, ServiceAction::Drop),
        tcp_service(SSH, SSH_PORT, ServiceAction::Reset),
        udp_service(SYSLOG, SYSLOG_PORT, ServiceAction::Reset),
        tcp_service(OTHER, OTHER_PORT, ServiceAction::Drop),
    ]
}

/// A data plane protecting [`services`].
fn protected() -> Dataplane {
    let mut dp = load();
    dp.set_services(&services()).expect("setting the services");
    dp
}

/// Counted once for `service` under `reason`.
fn once(service: u32, reason: Reason, frame: &[u8]) -> Tally {
    Tally::new().with(service, reason, frame.len())
}

/// Runs `frame`, asserts `want`, and that it was counted once as `counted` (or not at all).
fn check(
    dp: &Dataplane,
    hook: Hook,
    frame: &[u8],
    want: Outcome,
    counted: Option<(u32, Reason)>,
    what: &str,
) -> Ran {
    let tally = counted.map_or_else(Tally::new, |(svc, r)| once(svc, r, frame));
    expect_counted(dp, hook, frame, want, &tally, what)
}

/// Length of the RST answering a packet built from `spec`.
fn rst_len(spec: &Spec) -> usize {
    spec.l3_offset() + if spec.src.is_ipv4() { 40 } else { 60 }
}

/// A fresh fragment identification per call, so datagrams of different cases never meet.
fn frag_ids() -> impl FnMut() -> u16 {
    let mut next = 0x1000u16;
    move || {
        next += 1;
        next
    }
}

// --- What is protected and what is not -------------------------------------------------------

/// Traffic no service protects (other ports, the other protocol's port, ICMP, ARP) passes
/// byte-for-byte, uncounted and without events.
#[test]
fn unprotected_traffic_passes_untouched_and_uncounted() {
    let mut dp = protected();
    let mut events = dp.take_events().unwrap();
    for hook in HOOKS {
        for f in FAMILIES {
            let (c, s) = (f.stranger(1), f.server());
            let (icmp, body) = f.echo_request();
            #[rustfmt::skip]
            let cases = [
                ("TCP SYN to an unprotected port",         Spec::syn(c, s, UNPROTECTED).build()),
                ("UDP to an unprotected port",             Spec::udp(c, s, UNPROTECTED).build()),
                ("UDP to the port of a TCP service",       Spec::udp(c, s, WEB_PORT).build()),
                ("UDP to the port of a TCP reset service", Spec::udp(c, s, SSH_PORT).build()),
                ("TCP to the port of a UDP service",       Spec::syn(c, s, DNS_PORT).build()),
                ("ICMP echo request",                      Spec::other(c, s, icmp, &body).build()),
                ("ARP request",                            arp_request()),
            ];
            for (what, frame) in cases {
                let what = format!("{f:?} {what}");
                let ran = check(&dp, hook, &frame, PASS, None, &what);
                assert_eq!(ran.data, frame, "{what} [{hook:?}]: the frame was altered");
            }
        }
    }
    assert_eq!(events.drain(), vec![], "unprotected traffic raised events");
}

/// The decision order for a protected port: a CIDR deny beats everything, a CIDR allow needs no
/// session (inside its prefix only, for its own service only), a live session passes, anything
/// else is refused as no-session or expired; each is counted under its service and reason.
#[test]
fn cidr_rules_and_sessions_decide_protected_ports() {
    let mut dp = protected();
    let mut rules = Vec::new();
    for f in FAMILIES {
        dp.upsert_sessions(&[
            session(f.stranger(10), WEB, 100, 200),
            session(f.stranger(10), DNS, 101, 201),
            session(f.stranger(11), OTHER, 102, 202),
            expired_session(f.stranger(13), WEB, Expiry::from_ns(1)),
            expired_session(f.stranger(14), WEB, Expiry::after(Duration::ZERO)),
            session(f.banned(5), WEB, 103, 203),
            session(f.banned(5), DNS, 104, 204),
            session(f.client(99), WEB, 105, 205),
        ])
        .unwrap();
        rules.push(cidr(WEB, f.client_net(), CidrAction::Allow, 10));
        rules.push(cidr(WEB, f.banned_net(), CidrAction::Deny, 11));
        rules.push(cidr(WEB, host_net(f.client(99)), CidrAction::Deny, 12));
    }
    dp.set_cidr_rules(&rules).unwrap();

    for hook in HOOKS {
        for f in FAMILIES {
            let s = f.server();
            let syn = |src, port| Spec::syn(src, s, port).build();
            let udp = |src, port| Spec::udp(src, s, port).build();
            let [below, above] = f.just_outside_client_net();
            let last = f.client_net_last();
            let established = Spec::syn(f.stranger(10), s, WEB_PORT)
                .tcp(tcp_flags::ACK | tcp_flags::PSH, 1000, 2000)
                .with_payload(b"GET / HTTP/1.1\r\n")
                .build();
            #[rustfmt::skip]
            let cases = [
                ("live session, SYN",                      syn(f.stranger(10), WEB_PORT),   PASS, WEB,   AllowSession),
                ("live session, established segment",      established,                     PASS, WEB,   AllowSession),
                ("live session, UDP",                      udp(f.stranger(10), DNS_PORT),   PASS, DNS,   AllowSession),
                ("session for another service only",       syn(f.stranger(11), WEB_PORT),   DROP, WEB,   NoSession),
                ("that session opens its own service",     syn(f.stranger(11), OTHER_PORT), PASS, OTHER, AllowSession),
                ("no session (another address has one)",   syn(f.stranger(12), WEB_PORT),   DROP, WEB,   NoSession),
                ("no session, UDP",                        udp(f.stranger(12), DNS_PORT),   DROP, DNS,   NoSession),
                ("session expired at boot",                syn(f.stranger(13), WEB_PORT),   DROP, WEB,   Expired),
                ("session expired just now",               syn(f.stranger(14), WEB_PORT),   DROP, WEB,   Expired),
                ("CIDR deny beats a live session",         syn(f.banned(5), WEB_PORT),      DROP, WEB,   DeniedCidr),
                ("CIDR deny is per service",               udp(f.banned(5), DNS_PORT),      PASS, DNS,   AllowSession),
                ("CIDR allow without a session",           syn(f.client(7), WEB_PORT),      PASS, WEB,   AllowCidr),
                ("CIDR allow, last address of the prefix", syn(last, WEB_PORT),             PASS, WEB,   AllowCidr),
                ("just below the allowed prefix",          syn(below, WEB_PORT),            DROP, WEB,   NoSession),
                ("just above the allowed prefix",          syn(above, WEB_PORT),            DROP, WEB,   NoSession),
                ("CIDR allow does not open a UDP service", udp(f.client(7), DNS_PORT),      DROP, DNS,   NoSession),
                ("CIDR allow does not open a TCP service", syn(f.client(7), OTHER_PORT),    DROP, OTHER, NoSession),
                ("a host denied inside an allowed prefix", syn(f.client(99), WEB_PORT),     DROP, WEB,   DeniedCidr),
            ];
            for (what, frame, want, service, reason) in cases {
                let what = format!("{f:?} {what}");
                check(&dp, hook, &frame, want, Some((service, reason)), &what);
            }
        }
    }
}

/// An IPv6 CIDR rule covers IPv6 sources: "allow ::/0" opens a service to every IPv6 client, not
/// to every IPv4 client as well, and "deny ::/0" does not shut IPv4 out (the kernel keys IPv4 as
/// ::ffff:a.b.c.d, inside ::/0, so the rule's family must be kept apart).
#[test]
fn ipv6_cidr_rules_do_not_match_ipv4_sources() {
    let mut dp = protected();
    let any_v6: ipnet::IpNet = "::/0".parse().unwrap();
    dp.set_cidr_rules(&[
        cidr(WEB, any_v6, CidrAction::Allow, 1),
        cidr(DNS, any_v6, CidrAction::Deny, 2),
    ])
    .unwrap();
    let (v4, v6) = (Family::V4.stranger(9), Family::V6.stranger(9));
    dp.upsert_session(&session(v4, DNS, 1, 1)).unwrap();
    let (s4, s6) = (Family::V4.server(), Family::V6.server());
    for hook in HOOKS {
        let syn = Spec::syn(v6, s6, WEB_PORT).build();
        check(
            &dp,
            hook,
            &syn,
            PASS,
            Some((WEB, AllowCidr)),
            "IPv6, allow ::/0",
        );
        let syn = Spec::syn(v4, s4, WEB_PORT).build();
        check(
            &dp,
            hook,
            &syn,
            DROP,
            Some((WEB, NoSession)),
            "IPv4, allow ::/0",
        );
        let udp = Spec::udp(v4, s4, DNS_PORT).build();
        let what = "IPv4 with a session, deny ::/0";
        check(&dp, hook, &udp, PASS, Some((DNS, AllowSession)), what);
    }
}

// --- RSTs ------------------------------------------------------------------------------------

/// A reset service answers a refused TCP segment with the RST RFC 9293 prescribes: MACs, addresses
/// and ports swapped, sequence numbers right, checksums valid, VLAN tags kept, IP options and
/// IPv6 extension headers removed, trimmed to exactly the headers; counted as a RST sent.
#[test]
fn reset_service_answers_refused_tcp_with_a_correct_rst() {
    let mut dp = protected();
    for f in FAMILIES {
        let expired = expired_session(f.stranger(21), SSH, Expiry::from_ns(1));
        dp.upsert_session(&expired).unwrap();
    }
    let (syn_flag, ack, psh, fin) = (
        tcp_flags::SYN,
        tcp_flags::ACK,
        tcp_flags::PSH,
        tcp_flags::FIN,
    );
    for hook in HOOKS {
        for f in FAMILIES {
            let syn = Spec::syn(f.stranger(20), f.server(), SSH_PORT);
            let (options, with_options) = match f {
                Family::V4 => (
                    "SYN with IPv4 options",
                    syn.clone().with_ipv4_options(&[1, 1, 1, 1, 0x94, 4, 0, 0]),
                ),
                Family::V6 => (
                    "SYN behind extension headers",
                    syn.clone().with_ext(vec![
                        Ext::HopByHop,
                        Ext::Routing,
                        Ext::DestOpts(1),
                        Ext::Auth,
                    ]),
                ),
            };
            let expired = Spec::syn(f.stranger(21), f.server(), SSH_PORT);
            #[rustfmt::skip]
            let cases = [
                ("SYN",                          syn.clone(),                                   0,  NoSession),
                ("SYN with payload",             syn.clone().with_payload(&[0xab; 11]),         0,  NoSession),
                ("segment with ACK",             syn.clone().tcp(ack | psh, 0x0102_0304, 0xa0b0_c0d0).with_payload(b"data"), 0, NoSession),
                ("FIN without ACK, seq wraps",   syn.clone().tcp(fin, u32::MAX - 1, 0).with_payload(b"xyz"), 0, NoSession),
                ("SYN at sequence 2^32-1",       syn.clone().tcp(syn_flag, u32::MAX, 0),        0,  NoSession),
                ("802.1Q-tagged SYN",            syn.clone().vlan(0x8100, 42),                  0,  NoSession),
                ("802.1ad + 802.1Q-tagged SYN",  syn.clone().vlan(0x88a8, 7).vlan(0x8100, 42),  0,  NoSession),
                (options,                        with_options,                                  0,  NoSession),
                ("SYN with 18 bytes of padding", syn.clone(),                                   18, NoSession),
                ("SYN from an expired session",  expired,                                       0,  Expired),
            ];
            for (what, spec, padding, reason) in cases {
                let what = format!("{f:?} {what}");
                let mut frame = spec.build();
                frame.resize(frame.len() + padding, 0);
                let counted = once(SSH, reason, &frame).with_rst(SSH, rst_len(&spec));
                let ran = expect_counted(&dp, hook, &frame, BOUNCE, &counted, &what);
                if let Err(e) = check_rst(&Answered::from_spec(&spec, &frame), &ran.data) {
                    let (i, o) = (hex(&frame), hex(&ran.data));
                    panic!("{what} [{hook:?}]: bad RST: {e}\nin  {i}\nout {o}");
                }
            }
        }
    }
}

/// A reset service never answers a RST, UDP, a fragment or a CIDR-denied source: those are
/// dropped silently, and no RST is counted.
#[test]
fn reset_service_drops_what_it_must_not_answer() {
    let mut dp = protected();
    let rules: Vec<_> = FAMILIES
        .iter()
        .map(|f| cidr(SSH, f.banned_net(), CidrAction::Deny, 1))
        .collect();
    dp.set_cidr_rules(&rules).unwrap();
    let mut next_id = frag_ids();
    let (rst, ack) = (tcp_flags::RST, tcp_flags::ACK);
    for hook in HOOKS {
        for f in FAMILIES {
            let (c, s) = (f.stranger(22), f.server());
            let syn = Spec::syn(c, s, SSH_PORT);
            let id = next_id();
            #[rustfmt::skip]
            let cases = [
                ("incoming RST",               syn.clone().tcp(rst, 5, 0),                             SSH,    NoSession),
                ("incoming RST|ACK",           syn.clone().tcp(rst | ack, 5, 6),                       SSH,    NoSession),
                ("UDP to a reset service",     Spec::udp(c, s, SYSLOG_PORT),                           SYSLOG, NoSession),
                ("first fragment of a SYN",    syn.clone().fragment(0, true, id),                      SSH,    NoSession),
                ("later fragment of that SYN", syn.clone().with_payload(&[0; 16]).fragment(3, false, id), SSH, NoSession),
                ("SYN from a denied network",  Spec::syn(f.banned(1), s, SSH_PORT),                    SSH,    DeniedCidr),
            ];
            for (what, spec, service, reason) in cases {
                let what = format!("{f:?} {what}");
                check(
                    &dp,
                    hook,
                    &spec.build(),
                    DROP,
                    Some((service, reason)),
                    &what,
                );
            }
        }
    }
}

// --- VLAN ------------------------------------------------------------------------------------

/// Frames with one 802.1Q tag, or an 802.1ad tag over an 802.1Q tag, are judged on the packet
/// inside exactly like untagged frames.
#[test]
fn vlan_tagged_frames_are_judged_on_the_inner_packet() {
    let mut dp = protected();
    for f in FAMILIES {
        dp.upsert_session(&session(f.stranger(30), WEB, 1, 1))
            .unwrap();
    }
    let stacks: [&[(u16, u16)]; 2] = [&[(0x8100, 100)], &[(0x88a8, 200), (0x8100, 100)]];
    for hook in HOOKS {
        for f in FAMILIES {
            for tags in stacks {
                let tagged = |src, port| {
                    let mut spec = Spec::syn(src, f.server(), port);
                    spec.vlans = tags.to_vec();
                    spec.build()
                };
                #[rustfmt::skip]
                let cases = [
                    ("no session",       tagged(f.stranger(31), WEB_PORT),    DROP, Some((WEB, NoSession))),
                    ("live session",     tagged(f.stranger(30), WEB_PORT),    PASS, Some((WEB, AllowSession))),
                    ("unprotected port", tagged(f.stranger(31), UNPROTECTED), PASS, None),
                ];
                for (what, frame, want, counted) in cases {
                    let what = format!("{f:?} {} tag(s), {what}", tags.len());
                    check(&dp, hook, &frame, want, counted, &what);
                }
            }
        }
    }
}

/// Three VLAN tags are more than the parser looks through: dropped as malformed (service 0) while
/// anything is protected, even with a session or to an unprotected port, and passed when nothing
/// is protected.
#[test]
fn three_vlan_tags_are_malformed() {
    let mut dp = protected();
    let bare = load();
    for f in FAMILIES {
        dp.upsert_session(&session(f.stranger(30), WEB, 1, 1))
            .unwrap();
    }
    for hook in HOOKS {
        for f in FAMILIES {
            let tagged = |src, port| {
                Spec::syn(src, f.server(), port)
                    .vlan(0x88a8, 1)
                    .vlan(0x8100, 2)
                    .vlan(0x8100, 3)
                    .build()
            };
            for (what, frame) in [
                ("live session", tagged(f.stranger(30), WEB_PORT)),
                ("unprotected port", tagged(f.stranger(31), UNPROTECTED)),
            ] {
                let what = format!("{f:?} three tags, {what}");
                check(&dp, hook, &frame, DROP, Some((0, Malformed)), &what);
                check(&bare, hook, &frame, PASS, None, &what);
            }
        }
    }
}

// --- Malformed and truncated -----------------------------------------------------------------

/// Rewrites the IPv4 total length / IPv6 payload length to match the frame (after a truncation).
fn fit_ip_length(frame: &mut [u8], spec: &Spec) {
    let l3 = spec.l3_offset();
    if spec.src.is_ipv4() {
        let total = (frame.len() - l3) as u16;
        frame[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
        fix_ipv4_checksum(frame, l3);
    } else {
        let payload = (frame.len() - l3 - 40) as u16;
        frame[l3 + 4..l3 + 6].copy_from_slice(&payload.to_be_bytes());
    }
}

/// The frame of `spec` cut at `at` bytes, its IP length fitted to the cut.
fn cut(spec: &Spec, at: usize) -> Vec<u8> {
    let mut frame = spec.build();
    frame.truncate(at);
    fit_ip_length(&mut frame, spec);
    frame
}

/// A SYN from `spec` cut to 10 bytes of TCP header (the IP header stays whole).
fn truncated_tcp(spec: &Spec) -> Vec<u8> {
    cut(spec, spec.l4_offset() + 10)
}

/// The frame of `spec` changed by `change(frame, l3 offset, l4 offset)`.
fn edited(spec: &Spec, change: impl FnOnce(&mut Vec<u8>, usize, usize)) -> Vec<u8> {
    let mut frame = spec.build();
    change(&mut frame, spec.l3_offset(), spec.l4_offset());
    frame
}

/// Frames that claim IP but cannot be read far enough to rule out a protected port.
fn malformed_frames(f: Family) -> Vec<(String, Vec<u8>)> {
    let (c, s) = (f.stranger(40), f.server());
    // A TCP header without options, so its 20 bytes are easy to cut and to break.
    let tcp = Spec::syn(c, s, WEB_PORT).tcp(tcp_flags::SYN, 1, 0);
    let udp = Spec::udp(c, s, DNS_PORT);
    let l3 = tcp.l3_offset();
    let set_u16 = |p: &mut Vec<u8>, at: usize, v: usize| {
        p[at..at + 2].copy_from_slice(&(v as u16).to_be_bytes());
    };
    let mut out: Vec<(&str, Vec<u8>)> = vec![
        (
            "nothing after the Ethernet header",
            tcp.build()[..14].to_vec(),
        ),
        ("TCP header cut at 10 bytes", truncated_tcp(&tcp)),
        (
            "TCP data offset 4",
            edited(&tcp, |p, _, l4| p[l4 + 12] = 4 << 4),
        ),
        (
            "TCP data offset past the datagram",
            edited(&tcp, |p, _, l4| p[l4 + 12] = 15 << 4),
        ),
        ("UDP header cut at 4 bytes", cut(&udp, udp.l4_offset() + 4)),
    ];
    match f {
        Family::V4 => out.extend([
            (
                "IPv4 header cut at 10 bytes",
                tcp.build()[..l3 + 10].to_vec(),
            ),
            (
                "IPv4 ihl 4",
                edited(&tcp, |p, l3, _| {
                    p[l3] = 0x44;
                    fix_ipv4_checksum(p, l3);
                }),
            ),
            (
                "IPv4 version 6 under EtherType IPv4",
                edited(&tcp, |p, l3, _| p[l3] = 0x65),
            ),
            (
                "IPv4 total length past the frame",
                edited(&tcp, |p, l3, _| {
                    set_u16(p, l3 + 2, p.len() - l3 + 1);
                    fix_ipv4_checksum(p, l3);
                }),
            ),
            (
                "IPv4 total length below the header length",
                edited(&tcp, |p, l3, _| {
                    set_u16(p, l3 + 2, 16);
                    fix_ipv4_checksum(p, l3);
                }),
            ),
            (
                "IPv4 options cut short",
                tcp.clone().with_ipv4_options(&[1, 1, 1, 1]).build()[..l3 + 22].to_vec(),
            ),
        ]),
        Family::V6 => {
            let behind_ext = tcp.clone().with_ext(vec![Ext::DestOpts(0)]);
            let udp_behind_ext = udp.clone().with_ext(vec![Ext::HopByHop]);
            let mapped: IpAddr = "::ffff:203.0.113.40".parse().unwrap();
            out.extend([
                (
                    "IPv6 header cut at 30 bytes",
                    tcp.build()[..l3 + 30].to_vec(),
                ),
                (
                    "IPv6 version 4 under EtherType IPv6",
                    edited(&tcp, |p, l3, _| p[l3] = 0x40),
                ),
                (
                    "IPv6 payload length past the frame",
                    edited(&tcp, |p, l3, _| set_u16(p, l3 + 4, p.len() - l3 - 40 + 1)),
                ),
                (
                    "IPv6 with nine extension headers",
                    tcp.clone().with_ext(vec![Ext::DestOpts(0); 9]).build(),
                ),
                (
                    "IPv6 with twenty extension headers",
                    tcp.clone().with_ext(vec![Ext::DestOpts(0); 20]).build(),
                ),
                (
                    "IPv6 extension header longer than the datagram",
                    edited(&behind_ext, |p, l3, _| p[l3 + 41] = 10),
                ),
                (
                    "TCP cut at 10 bytes behind an extension header",
                    truncated_tcp(&behind_ext),
                ),
                (
                    "UDP cut at 4 bytes behind an extension header",
                    cut(&udp_behind_ext, udp_behind_ext.l4_offset() + 4),
                ),
                (
                    "IPv4-mapped IPv6 source",
                    Spec::syn(mapped, s, WEB_PORT).build(),
                ),
            ]);
        }
    }
    // The TC test run refuses untagged frames with a partial IP header (see `test_run_refuses`);
    // behind a VLAN tag the same truncations reach the TC program too.
    let tagged = tcp.clone().vlan(0x8100, 5);
    let tl3 = tagged.l3_offset();
    let partial = if f == Family::V4 { 10 } else { 30 };
    out.extend([
        (
            "802.1Q, nothing after the tag",
            tagged.build()[..tl3].to_vec(),
        ),
        (
            "802.1Q, IP header cut short",
            tagged.build()[..tl3 + partial].to_vec(),
        ),
        ("802.1Q, only half a tag", tagged.build()[..16].to_vec()),
    ]);
    out.into_iter()
        .map(|(what, frame)| (format!("{f:?} {what}"), frame))
        .collect()
}

/// While anything is protected, frames that claim IP but cannot be read to the ports are dropped
/// and counted as malformed under service 0 (even from a source with sessions everywhere).
#[test]
fn malformed_frames_are_dropped_while_anything_is_protected() {
    let mut dp = protected();
    for f in FAMILIES {
        let everything: Vec<_> = services()
            .iter()
            .map(|s| session(f.stranger(40), s.id.get(), 1, 1))
            .collect();
        dp.upsert_sessions(&everything).unwrap();
    }
    for hook in HOOKS {
        for f in FAMILIES {
            for (what, frame) in malformed_frames(f) {
                let counted = once(0, Malformed, &frame);
                expect_counted_or_refused(&dp, hook, &frame, DROP, &counted, &what);
            }
        }
    }
}

/// With no service configured there is nothing to protect: the same malformed frames pass.
#[test]
fn malformed_frames_pass_when_nothing_is_protected() {
    let dp = load();
    for hook in HOOKS {
        for f in FAMILIES {
            for (what, frame) in malformed_frames(f) {
                expect_counted_or_refused(&dp, hook, &frame, PASS, &Tally::new(), &what);
            }
        }
    }
}

/// BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header for both program types
/// (EINVAL), so the programs' "shorter than Ethernet: pass" branch cannot be reached here; a bare
/// 14-byte header is judged on its EtherType (and, for TC, an IP EtherType with no IP header is
/// refused by the kernel as well).
#[test]
fn frames_shorter_than_ethernet_never_reach_the_programs() {
    let dp = protected();
    for hook in HOOKS {
        for len in 0..14 {
            expect_refused(&dp, hook, &vec![0x08; len], &format!("{len}-byte frame"));
        }
        let header = |ether_type: u16| {
            let mut h = vec![0x02; 12];
            h.extend_from_slice(&ether_type.to_be_bytes());
            h
        };
        check(&dp, hook, &header(0x0806), PASS, None, "bare ARP header");
        for ether_type in [0x0800, 0x86dd] {
            let frame = header(ether_type);
            let counted = once(0, Malformed, &frame);
            let what = format!("bare EtherType {ether_type:#06x}");
            expect_counted_or_refused(&dp, hook, &frame, DROP, &counted, &what);
        }
    }
}

// --- IPv6 extension headers and IPsec ---------------------------------------------------------

/// Ports are read behind IPv6 extension-header chains (hop-by-hop, routing, destination options,
/// AH, an atomic fragment header; up to seven headers), for TCP and UDP.
#[test]
fn ipv6_extension_headers_are_walked_to_the_ports() {
    let mut dp = protected();
    let f = Family::V6;
    let (member, stranger, s) = (f.stranger(41), f.stranger(42), f.server());
    dp.upsert_sessions(&[session(member, WEB, 1, 1), session(member, DNS, 1, 1)])
        .unwrap();
    let chains: Vec<Vec<Ext>> = vec![
        vec![Ext::HopByHop],
        vec![Ext::Routing],
        vec![Ext::DestOpts(0)],
        vec![Ext::DestOpts(3)],
        vec![Ext::Auth],
        vec![Ext::Fragment(0, false, 7)],
        vec![Ext::HopByHop, Ext::Routing, Ext::DestOpts(1), Ext::Auth],
        vec![Ext::DestOpts(0); 7],
    ];
    for hook in HOOKS {
        for chain in &chains {
            let tcp = |src| Spec::syn(src, s, WEB_PORT).with_ext(chain.clone()).build();
            let udp = |src| Spec::udp(src, s, DNS_PORT).with_ext(chain.clone()).build();
            #[rustfmt::skip]
            let cases = [
                ("TCP, session",    tcp(member),   PASS, WEB, AllowSession),
                ("TCP, no session", tcp(stranger), DROP, WEB, NoSession),
                ("UDP, session",    udp(member),   PASS, DNS, AllowSession),
                ("UDP, no session", udp(stranger), DROP, DNS, NoSession),
            ];
            for (what, frame, want, service, reason) in cases {
                let what = format!("{what} behind {chain:?}");
                check(&dp, hook, &frame, want, Some((service, reason)), &what);
            }
        }
    }
}

/// MAX_IPV6_EXT_HEADERS is 8 ("extension headers walked before giving up"), so a packet with
/// exactly eight extension headers is within the limit and must be judged on its ports.
#[test]
fn eight_ipv6_extension_headers_are_within_the_limit() {
    let mut dp = protected();
    let f = Family::V6;
    dp.upsert_session(&session(f.stranger(43), WEB, 1, 1))
        .unwrap();
    let eight = |src| {
        Spec::syn(src, f.server(), WEB_PORT)
            .with_ext(vec![Ext::DestOpts(0); 8])
            .build()
    };
    for hook in HOOKS {
        let what = "8 extension headers, session";
        check(
            &dp,
            hook,
            &eight(f.stranger(43)),
            PASS,
            Some((WEB, AllowSession)),
            what,
        );
        let what = "8 extension headers, no session";
        check(
            &dp,
            hook,
            &eight(f.stranger(44)),
            DROP,
            Some((WEB, NoSession)),
            what,
        );
    }
}

/// AH authenticates but hides nothing, and the IPv6 parser looks through it; TCP carried inside
/// an IPv4 AH header must likewise be judged on its ports, not passed as "not TCP or UDP" (a peer
/// with an IPsec SA would otherwise reach protected ports without a session).
#[test]
fn tcp_inside_an_authentication_header_is_judged_in_both_families() {
    let dp = protected();
    for hook in HOOKS {
        for f in FAMILIES {
            let syn = Spec::syn(f.stranger(71), f.server(), WEB_PORT);
            let frame = match f {
                Family::V4 => {
                    let plain = syn.build();
                    // Next header TCP, length 4 (24 bytes), SPI 1, sequence 1, 12 bytes of ICV.
                    let mut body = vec![6, 4, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1];
                    body.extend_from_slice(&[0; 12]);
                    body.extend_from_slice(&plain[syn.l4_offset()..]);
                    Spec::other(syn.src, syn.dst, 51, &body).build()
                }
                Family::V6 => syn.with_ext(vec![Ext::Auth]).build(),
            };
            let what = format!("{f:?} SYN inside AH, no session");
            check(&dp, hook, &frame, DROP, Some((WEB, NoSession)), &what);
        }
    }
}

// --- Fragments -------------------------------------------------------------------------------

/// A first fragment is judged on its ports, and the middle and last fragments of the same
/// datagram get the same verdict, counted under the same service and reason; fragments are never
/// answered with a RST.
#[test]
fn later_fragments_follow_their_first_fragment() {
    let mut dp = protected();
    for f in FAMILIES {
        dp.upsert_sessions(&[
            session(f.stranger(50), WEB, 1, 1),
            session(f.stranger(50), DNS, 1, 1),
        ])
        .unwrap();
    }
    let mut next_id = frag_ids();
    for hook in HOOKS {
        for f in FAMILIES {
            let (member, stranger, s) = (f.stranger(50), f.stranger(51), f.server());
            #[rustfmt::skip]
            let cases = [
                ("TCP, no session",        Spec::syn(stranger, s, WEB_PORT),    DROP, Some((WEB, NoSession))),
                ("TCP, session",           Spec::syn(member, s, WEB_PORT),      PASS, Some((WEB, AllowSession))),
                ("TCP, unprotected port",  Spec::syn(stranger, s, UNPROTECTED), PASS, None),
                ("UDP, no session",        Spec::udp(stranger, s, DNS_PORT),    DROP, Some((DNS, NoSession))),
                ("UDP, session",           Spec::udp(member, s, DNS_PORT),      PASS, Some((DNS, AllowSession))),
                ("UDP, unprotected port",  Spec::udp(stranger, s, UNPROTECTED), PASS, None),
                ("TCP to a reset service", Spec::syn(stranger, s, SSH_PORT),    DROP, Some((SSH, NoSession))),
            ];
            for (what, base, want, counted) in cases {
                let id = next_id();
                let pieces = [
                    ("first", base.clone().fragment(0, true, id)),
                    (
                        "middle",
                        base.clone().with_payload(&[0x5a; 24]).fragment(3, true, id),
                    ),
                    (
                        "last",
                        base.clone().with_payload(&[0xa5; 9]).fragment(6, false, id),
                    ),
                ];
                for (piece, spec) in pieces {
                    let what = format!("{f:?} {what}: {piece} fragment");
                    check(&dp, hook, &spec.build(), want, counted, &what);
                }
            }
        }
    }
}

/// A later fragment whose first fragment was never seen is dropped as an unknown fragment
/// (service 0) when its protocol has a protected service and passes when it has none; a first
/// fragment only vouches for fragments with its own source, destination, id and protocol.
#[test]
fn orphan_later_fragments_fail_closed_for_protected_protocols() {
    let all = protected();
    let mut tcp_only = load();
    tcp_only
        .set_services(&[tcp_service(WEB, WEB_PORT, ServiceAction::Drop)])
        .unwrap();
    let unknown = Some((0, UnknownFragment));
    let mut next_id = frag_ids();
    for hook in HOOKS {
        for f in FAMILIES {
            let s = f.server();
            let id = next_id();
            let udp = Spec::udp(f.stranger(60), s, DNS_PORT)
                .fragment(5, false, id)
                .build();
            let tcp = Spec::syn(f.stranger(60), s, WEB_PORT)
                .fragment(5, true, id)
                .build();
            check(
                &all,
                hook,
                &udp,
                DROP,
                unknown,
                &format!("{f:?} orphan UDP"),
            );
            check(
                &all,
                hook,
                &tcp,
                DROP,
                unknown,
                &format!("{f:?} orphan TCP"),
            );
            let what = format!("{f:?} orphan, only TCP protected");
            check(&tcp_only, hook, &udp, PASS, None, &format!("{what}, UDP"));
            check(
                &tcp_only,
                hook,
                &tcp,
                DROP,
                unknown,
                &format!("{what}, TCP"),
            );

            // A first fragment to an unprotected UDP port passes and vouches for its own datagram
            // only.
            let id = next_id();
            let (a, b) = (f.stranger(61), f.stranger(62));
            let first = Spec::udp(a, s, UNPROTECTED).fragment(0, true, id).build();
            check(
                &all,
                hook,
                &first,
                PASS,
                None,
                "first fragment, unprotected port",
            );
            let later = |spec: Spec, id| spec.with_payload(&[1; 8]).fragment(2, false, id).build();
            #[rustfmt::skip]
            let others = [
                ("another source",      later(Spec::udp(b, s, UNPROTECTED), id)),
                ("another destination", later(Spec::udp(a, b, UNPROTECTED), id)),
                ("another protocol",    later(Spec::syn(a, s, UNPROTECTED), id)),
                ("another id",          later(Spec::udp(a, s, UNPROTECTED), id + 0x100)),
            ];
            for (what, frame) in others {
                let what = format!("{f:?} later fragment with {what}");
                check(&all, hook, &frame, DROP, unknown, &what);
            }
            let own = later(Spec::udp(a, s, UNPROTECTED), id);
            check(&all, hook, &own, PASS, None, "its own later fragment");
        }
    }
}

/// In a later IPv6 fragment the fragment header names the first header of the fragmentable part,
/// which may be a destination-options header rather than TCP; such a fragment still belongs to a
/// datagram whose first fragment was refused, and must be refused too.
#[test]
fn ipv6_later_fragments_behind_destination_options_follow_their_first_fragment() {
    let dp = protected();
    let f = Family::V6;
    let mut next_id = frag_ids();
    for hook in HOOKS {
        let id = next_id();
        let base = Spec::syn(f.stranger(70), f.server(), WEB_PORT).with_ext(vec![Ext::DestOpts(0)]);
        let first = base.clone().fragment(0, true, id).build();
        let what = "first fragment: fragment header, destination options, TCP";
        check(&dp, hook, &first, DROP, Some((WEB, NoSession)), what);
        let later = base.with_payload(&[0; 16]).fragment(2, false, id).build();
        expect(
            &dp,
            hook,
            &later,
            DROP,
            "its later fragment (fragment header next = 60)",
        );
    }
}

// --- Counters and events ---------------------------------------------------------------------

/// After a known sequence of packets through both hooks, every counter (per service and reason,
/// service 0 for what cannot be attributed, RSTs sent) holds exactly the packets and bytes sent.
#[test]
fn counters_add_up_exactly() {
    let mut dp = protected();
    let mut rules = Vec::new();
    for f in FAMILIES {
        dp.upsert_sessions(&[
            session(f.stranger(80), WEB, 1, 1),
            expired_session(f.stranger(82), WEB, Expiry::from_ns(1)),
        ])
        .unwrap();
        rules.push(cidr(WEB, f.client_net(), CidrAction::Allow, 1));
        rules.push(cidr(WEB, f.banned_net(), CidrAction::Deny, 2));
    }
    dp.set_cidr_rules(&rules).unwrap();
    let mut next_id = frag_ids();
    let mut want = Tally::new();
    for hook in HOOKS {
        for f in FAMILIES {
            let (member, stranger, s) = (f.stranger(80), f.stranger(81), f.server());
            let syn = |src, port| Spec::syn(src, s, port).build();
            let udp = |src, port| Spec::udp(src, s, port).build();
            let ack = Spec::syn(member, s, WEB_PORT)
                .tcp(tcp_flags::ACK, 1, 1)
                .with_payload(&[7; 100])
                .build();
            let reset = Spec::syn(stranger, s, SSH_PORT).with_payload(&[1; 3]);
            let orphan = Spec::udp(stranger, s, DNS_PORT).fragment(9, false, next_id());
            // (frame, outcome, counted as, length of the RST sent)
            #[rustfmt::skip]
            let sequence = [
                (syn(member, WEB_PORT),                       PASS,   Some((WEB, AllowSession)), 0),
                (ack.clone(),                                 PASS,   Some((WEB, AllowSession)), 0),
                (ack,                                         PASS,   Some((WEB, AllowSession)), 0),
                (syn(f.client(3), WEB_PORT),                  PASS,   Some((WEB, AllowCidr)),    0),
                (syn(stranger, WEB_PORT),                     DROP,   Some((WEB, NoSession)),    0),
                (syn(f.stranger(82), WEB_PORT),               DROP,   Some((WEB, Expired)),      0),
                (syn(f.banned(1), WEB_PORT),                  DROP,   Some((WEB, DeniedCidr)),   0),
                (reset.build(),                               BOUNCE, Some((SSH, NoSession)),    rst_len(&reset)),
                (udp(stranger, DNS_PORT),                     DROP,   Some((DNS, NoSession)),    0),
                (udp(stranger, SYSLOG_PORT),                  DROP,   Some((SYSLOG, NoSession)), 0),
                (truncated_tcp(&Spec::syn(stranger, s, WEB_PORT)), DROP, Some((0, Malformed)),   0),
                (orphan.build(),                              DROP,   Some((0, UnknownFragment)), 0),
                (syn(stranger, UNPROTECTED),                  PASS,   None,                      0),
            ];
            for (frame, outcome, counted, rst) in sequence {
                expect(
                    &dp,
                    hook,
                    &frame,
                    outcome,
                    &format!("{f:?} counted sequence"),
                );
                if let Some((svc, r)) = counted {
                    want = want.with(svc, r, frame.len());
                }
                if rst > 0 {
                    want = want.with_rst(SSH, rst);
                }
            }
        }
    }
    assert_eq!(Tally::read(&dp), want);
    let ids: Vec<u32> = dp
        .counters()
        .unwrap()
        .iter()
        .map(|c| c.service_id)
        .collect();
    assert_eq!(
        ids,
        vec![0, WEB, DNS, SSH, SYSLOG, OTHER],
        "id 0 and every service"
    );
}

/// The fields of an event a test can predict.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    kind: EventKind,
    service_id: u32,
    identity_id: u32,
    rule_id: u32,
    protocol: u8,
    source: SocketAddr,
    destination: SocketAddr,
    tcp_flags: u8,
    len: u32,
}

impl Seen {
    fn of(e: &DataplaneEvent) -> Seen {
        Seen {
            kind: e.kind,
            service_id: e.service_id,
            identity_id: e.identity_id,
            rule_id: e.rule_id,
            protocol: e.protocol,
            source: e.source,
            destination: e.destination,
            tcp_flags: e.tcp_flags,
            len: e.len,
        }
    }

    /// What an event about `spec`'s frame (`len` bytes) must hold.
    fn expected(spec: &Spec, len: usize, kind: EventKind, ids: (u32, u32, u32)) -> Seen {
        let (protocol, tcp_flags) = match spec.transport {
            Transport::Tcp { flags, .. } => (6, flags),
            Transport::Udp => (17, 0),
            Transport::Other(p) => (p, 0),
        };
        Seen {
            kind,
            service_id: ids.0,
            identity_id: ids.1,
            rule_id: ids.2,
            protocol,
            source: SocketAddr::new(spec.src, spec.sport),
            destination: SocketAddr::new(spec.dst, spec.dport),
            tcp_flags,
            len: len as u32,
        }
    }
}

/// Refusals raise Denied events and allowed SYNs raise NewConnection events, with the right
/// addresses, ports, service, identity and rule; allowed non-SYN traffic and unprotected traffic
/// raise none.
#[test]
fn events_describe_refusals_and_new_connections() {
    let mut dp = protected();
    let mut reader = dp.take_events().unwrap();
    assert!(
        dp.take_events().is_err(),
        "the event reader can only be taken once"
    );
    let mut rules = Vec::new();
    for f in FAMILIES {
        dp.upsert_sessions(&[
            session(f.stranger(90), WEB, 4242, 77),
            Session {
                expires: Expiry::from_ns(1),
                ..session(f.stranger(91), WEB, 5151, 88)
            },
        ])
        .unwrap();
        rules.push(cidr(WEB, f.client_net(), CidrAction::Allow, 31));
        rules.push(cidr(WEB, f.banned_net(), CidrAction::Deny, 32));
    }
    dp.set_cidr_rules(&rules).unwrap();

    let denied = |reason, reset| EventKind::Denied { reason, reset };
    let new = |reason| EventKind::NewConnection { reason };
    let mut want = Vec::new();
    for hook in HOOKS {
        for f in FAMILIES {
            let s = f.server();
            let syn = |src, port| Spec::syn(src, s, port);
            let ack = |src| Spec::syn(src, s, WEB_PORT).tcp(tcp_flags::ACK, 9, 9);
            let (member, expired, stranger) = (f.stranger(90), f.stranger(91), f.stranger(92));
            // (packet, outcome, expected event: kind, (service, identity, rule))
            #[rustfmt::skip]
            let cases = [
                (syn(member, WEB_PORT),        PASS,   Some((new(AllowSession),             (WEB, 4242, 77)))),
                (ack(member),                  PASS,   None),
                (Spec::udp(member, s, DNS_PORT), DROP, Some((denied(NoSession, false),      (DNS, 0, 0)))),
                (syn(expired, WEB_PORT),       DROP,   Some((denied(Expired, false),        (WEB, 5151, 88)))),
                (syn(f.banned(3), WEB_PORT),   DROP,   Some((denied(DeniedCidr, false),     (WEB, 0, 32)))),
                (syn(f.client(4), WEB_PORT),   PASS,   Some((new(AllowCidr),                (WEB, 0, 31)))),
                (ack(f.client(4)),             PASS,   None),
                (syn(stranger, SSH_PORT),      BOUNCE, Some((denied(NoSession, true),       (SSH, 0, 0)))),
                (syn(stranger, UNPROTECTED),   PASS,   None),
            ];
            for (spec, outcome, event) in cases {
                let frame = spec.build();
                expect(&dp, hook, &frame, outcome, &format!("{f:?} event sequence"));
                if let Some((kind, ids)) = event {
                    want.push(Seen::expected(&spec, frame.len(), kind, ids));
                }
            }
            // A malformed frame is reported against service 0, its ports unknown.
            let cut = truncated_tcp(&syn(f.stranger(93), WEB_PORT));
            expect(&dp, hook, &cut, DROP, "truncated TCP");
            let mut unknown_ports = syn(f.stranger(93), WEB_PORT).tcp(0, 0, 0);
            (unknown_ports.sport, unknown_ports.dport) = (0, 0);
            want.push(Seen::expected(
                &unknown_ports,
                cut.len(),
                denied(Malformed, false),
                (0, 0, 0),
            ));
        }
    }
    let events = reader.drain();
    let seen: Vec<Seen> = events.iter().map(Seen::of).collect();
    assert_eq!(seen, want);
    assert!(
        events.windows(2).all(|w| w[0].at <= w[1].at) && events[0].at > Duration::ZERO,
        "event timestamps are monotonic-clock times in order"
    );
    assert_eq!(dp.event_stats().unwrap().suppressed, 0);
    assert_eq!(reader.drain(), vec![], "drain empties the ring");
}

/// Pins the calling thread to one CPU (the per-CPU event bucket then sees every run).
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity only read
    // and write the set we own, and pid 0 means the calling thread.
    let ok = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set)
    };
    let err = std::io::Error::last_os_error();
    assert_eq!(ok, 0, "pinning to CPU {cpu}: {err}");
}

/// The CPUs this thread may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: as in `pin_to_cpu`; the kernel fills the set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let size = size_of::<libc::cpu_set_t>();
        assert_eq!(libc::sched_getaffinity(0, size, &mut set), 0);
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// A data plane with the given event rate and burst, protecting [`services`], and its reader.
fn rate_limited(
    events_per_sec: u64,
    events_burst: u64,
) -> (Dataplane, idgate::dataplane::EventReader) {
    require_root();
    let mut dp = Dataplane::load(LoadOptions {
        events_per_sec,
        events_burst,
        ..Default::default()
    })
    .unwrap();
    dp.set_services(&services()).unwrap();
    let reader = dp.take_events().unwrap();
    (dp, reader)
}

/// The in-kernel token bucket lets a burst of events through, then suppresses the rest and counts
/// them: on one CPU, 50 quick refusals with burst 5 at 1/s yield 5 events (plus at most one per
/// elapsed second), and events + suppressed = 50; another CPU has its own bucket.
#[test]
fn events_are_rate_limited_per_cpu() {
    let (dp, mut reader) = rate_limited(1, 5);
    let frame = Spec::syn(Family::V4.stranger(95), Family::V4.server(), WEB_PORT).build();
    let (mut total, mut emitted) = (0, 0);
    for (round, &cpu) in allowed_cpus().iter().take(2).enumerate() {
        pin_to_cpu(cpu);
        let start = Instant::now();
        for i in 0..50 {
            expect(&dp, HOOKS[i % 2], &frame, DROP, "refused SYN");
        }
        let elapsed = start.elapsed();
        total += 50;
        let events = reader.drain().len() as u64;
        emitted += events;
        let stats = dp.event_stats().unwrap();
        assert!(
            (5..=5 + elapsed.as_secs()).contains(&events),
            "round {round} on CPU {cpu}: {events} events in {elapsed:?} with burst 5 at 1/s"
        );
        assert_eq!(stats.ring_full, 0);
        assert_eq!(
            emitted + stats.suppressed,
            total,
            "reported or counted as suppressed"
        );
    }
}

/// `events_burst` is the burst each CPU may emit after a quiet period, whatever the rate: with
/// burst 20 at 1 event/s, 30 quick refusals on one CPU yield 20 events (plus at most one per
/// elapsed second), not the 10 that ten seconds of refill would give.
#[test]
fn the_whole_event_burst_is_available_at_a_slow_rate() {
    let (dp, mut reader) = rate_limited(1, 20);
    pin_to_cpu(allowed_cpus()[0]);
    let frame = Spec::syn(Family::V6.stranger(96), Family::V6.server(), WEB_PORT).build();
    let start = Instant::now();
    for _ in 0..30 {
        expect(&dp, Hook::Xdp, &frame, DROP, "refused SYN");
    }
    let elapsed = start.elapsed();
    let events = reader.drain().len() as u64;
    assert!(
        (20..=20 + elapsed.as_secs()).contains(&events),
        "{events} events in {elapsed:?} with burst 20 at 1/s"
    );
    assert_eq!(events + dp.event_stats().unwrap().suppressed, 30);
}

// --- The data-plane API ----------------------------------------------------------------------

/// `set_services` refuses two services with one id or one (protocol, port), and then nothing
/// changes: the same services are listed and enforced, the refused ones are not.
#[test]
fn set_services_refuses_duplicates_and_changes_nothing() {
    let mut dp = load();
    let web = tcp_service(WEB, WEB_PORT, ServiceAction::Drop);
    dp.set_services(&[web]).unwrap();
    let refused = [
        vec![web, udp_service(WEB, DNS_PORT, ServiceAction::Drop)],
        vec![web, tcp_service(DNS, WEB_PORT, ServiceAction::Drop)],
        vec![
            udp_service(DNS, DNS_PORT, ServiceAction::Drop),
            tcp_service(OTHER, DNS_PORT, ServiceAction::Drop),
            udp_service(SSH, DNS_PORT, ServiceAction::Drop),
        ],
    ];
    for set in refused {
        let err = dp
            .set_services(&set)
            .expect_err("duplicates must be refused");
        assert!(matches!(err, DataplaneError::Invalid(_)), "{err}");
        assert_eq!(dp.services(), vec![web]);
        for hook in HOOKS {
            for f in FAMILIES {
                let (c, s) = (f.stranger(1), f.server());
                let syn = Spec::syn(c, s, WEB_PORT).build();
                check(
                    &dp,
                    hook,
                    &syn,
                    DROP,
                    Some((WEB, NoSession)),
                    "still protected",
                );
                let udp = Spec::udp(c, s, DNS_PORT).build();
                check(&dp, hook, &udp, PASS, None, "never protected");
                // UDP is still unprotected as a protocol: an orphan UDP fragment passes.
                let frag = Spec::udp(c, s, DNS_PORT).fragment(1, false, 1).build();
                check(&dp, hook, &frag, PASS, None, "orphan UDP fragment");
            }
        }
    }
}

/// `set_services` replaces the whole set: a moved port opens its old port and closes the new one,
/// an emptied set protects nothing (malformed frames pass again), and a service still named by a
/// CIDR rule cannot be removed.
#[test]
fn set_services_replaces_the_protected_set() {
    let mut dp = load();
    dp.set_services(&[tcp_service(WEB, WEB_PORT, ServiceAction::Drop)])
        .unwrap();
    dp.set_services(&[tcp_service(WEB, 8001, ServiceAction::Reset)])
        .unwrap();
    let (c4, s4) = (Family::V4.stranger(1), Family::V4.server());
    let malformed = truncated_tcp(&Spec::syn(c4, s4, WEB_PORT));
    for hook in HOOKS {
        for f in FAMILIES {
            let (c, s) = (f.stranger(1), f.server());
            expect(
                &dp,
                hook,
                &Spec::syn(c, s, WEB_PORT).build(),
                PASS,
                "old port",
            );
            expect(
                &dp,
                hook,
                &Spec::syn(c, s, 8001).build(),
                BOUNCE,
                "new port and action",
            );
        }
        expect(&dp, hook, &malformed, DROP, "malformed while protected");
    }
    let rule = cidr(WEB, Family::V4.client_net(), CidrAction::Allow, 1);
    dp.set_cidr_rules(&[rule]).unwrap();
    let err = dp
        .set_services(&[])
        .expect_err("a CIDR rule still names the service");
    assert!(matches!(err, DataplaneError::Invalid(_)), "{err}");
    assert_eq!(dp.services().len(), 1);
    dp.set_cidr_rules(&[]).unwrap();
    dp.set_services(&[]).unwrap();
    assert_eq!(dp.services(), vec![]);
    for hook in HOOKS {
        for f in FAMILIES {
            let (c, s) = (f.stranger(1), f.server());
            expect(
                &dp,
                hook,
                &Spec::syn(c, s, 8001).build(),
                PASS,
                "nothing protected",
            );
        }
        expect(&dp, hook, &malformed, PASS, "malformed, nothing protected");
    }
}

/// `set_cidr_rules` refuses a rule for an unknown service (and a network twice with one action)
/// without applying any rule of the set; a later call replaces the rules whole.
#[test]
fn cidr_rules_are_validated_and_replaced_whole() {
    let mut dp = protected();
    let f = Family::V4;
    let (c, s) = (f.client(5), f.server());
    let syn = Spec::syn(c, s, WEB_PORT).build();
    let neighbour = Spec::syn(f.client(6), s, WEB_PORT).build();
    let allow = cidr(WEB, f.client_net(), CidrAction::Allow, 1);
    let same_net = cidr(
        WEB,
        "198.51.100.9/24".parse().unwrap(),
        CidrAction::Allow,
        3,
    );
    let bad = [
        vec![allow, cidr(77, f.client_net(), CidrAction::Allow, 2)],
        vec![allow, same_net],
    ];
    for rules in bad {
        let err = dp.set_cidr_rules(&rules).expect_err("refused");
        assert!(matches!(err, DataplaneError::Invalid(_)), "{err}");
        for hook in HOOKS {
            expect(&dp, hook, &syn, DROP, "no rule was applied");
        }
    }
    dp.set_cidr_rules(&[allow]).unwrap();
    for hook in HOOKS {
        check(&dp, hook, &syn, PASS, Some((WEB, AllowCidr)), "allowed");
    }
    dp.upsert_session(&session(c, WEB, 1, 1)).unwrap();
    dp.set_cidr_rules(&[cidr(WEB, host_net(c), CidrAction::Deny, 4)])
        .unwrap();
    for hook in HOOKS {
        check(&dp, hook, &syn, DROP, Some((WEB, DeniedCidr)), "now denied");
        expect(&dp, hook, &neighbour, DROP, "the old allow rule is gone");
    }
    dp.set_cidr_rules(&[]).unwrap();
    for hook in HOOKS {
        check(
            &dp,
            hook,
            &syn,
            PASS,
            Some((WEB, AllowSession)),
            "rules cleared",
        );
    }
}

/// Sessions naming an unknown service are refused, one at a time or in a batch (validated whole:
/// nothing of the batch is written).
#[test]
fn sessions_for_unknown_services_are_refused() {
    let mut dp = protected();
    let f = Family::V6;
    let err = dp
        .upsert_session(&session(f.stranger(1), 77, 1, 1))
        .expect_err("unknown service");
    assert!(matches!(err, DataplaneError::Invalid(_)), "{err}");
    let batch = [
        session(f.stranger(2), WEB, 1, 1),
        session(f.stranger(3), 77, 1, 1),
    ];
    let err = dp
        .upsert_sessions(&batch)
        .expect_err("unknown service in a batch");
    assert!(matches!(err, DataplaneError::Invalid(_)), "{err}");
    assert_eq!(dp.sessions().unwrap(), vec![]);
    let syn = Spec::syn(f.stranger(2), f.server(), WEB_PORT).build();
    for hook in HOOKS {
        expect(
            &dp,
            hook,
            &syn,
            DROP,
            "the valid half of the batch was not written",
        );
    }
}

/// Ten thousand sessions written in one batch are all in the map and all let their source in;
/// an address outside the batch is still refused.
#[test]
fn batched_sessions_all_take_effect() {
    let mut dp = protected();
    let source = |i: u32| -> IpAddr {
        if i.is_multiple_of(2) {
            IpAddr::V4(Ipv4Addr::from(0x0a40_0000 + i))
        } else {
            IpAddr::V6(Ipv6Addr::from((0x2001_0db8_0005u128 << 80) | u128::from(i)))
        }
    };
    let sessions: Vec<Session> = (0..10_000).map(|i| session(source(i), WEB, i, 1)).collect();
    dp.upsert_sessions(&sessions).unwrap();
    assert_eq!(dp.sessions().unwrap().len(), 10_000);
    let server = |src: IpAddr| {
        let f = if src.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        };
        f.server()
    };
    for i in (0..10_000).step_by(97).chain([9_998, 9_999]) {
        let syn = Spec::syn(source(i), server(source(i)), WEB_PORT).build();
        for hook in HOOKS {
            expect(&dp, hook, &syn, PASS, &format!("session {i} of the batch"));
        }
    }
    for i in [10_000, 10_001] {
        let syn = Spec::syn(source(i), server(source(i)), WEB_PORT).build();
        for hook in HOOKS {
            expect(&dp, hook, &syn, DROP, "not in the batch");
        }
    }
}

/// `remove_sessions` removes the listed sessions, skips keys that are not there (wherever they
/// are in the list) and returns how many it removed.
#[test]
fn remove_sessions_skips_missing_keys() {
    let mut dp = protected();
    let f = Family::V4;
    let [a, b, c, x, y] = [1, 2, 3, 4, 5].map(|n| f.stranger(n));
    dp.upsert_sessions(&[
        session(a, WEB, 1, 1),
        session(b, WEB, 1, 1),
        session(c, WEB, 1, 1),
    ])
    .unwrap();
    let web = sid(WEB);
    let keys = [(x, web), (a, web), (y, web), (c, web), (a, web)];
    assert_eq!(dp.remove_sessions(&keys).unwrap(), 2);
    assert_eq!(dp.remove_sessions(&[(x, web), (y, web)]).unwrap(), 0);
    assert_eq!(dp.remove_sessions(&[]).unwrap(), 0);
    let left: Vec<IpAddr> = dp.sessions().unwrap().iter().map(|s| s.source).collect();
    assert_eq!(left, vec![b]);
    for hook in HOOKS {
        for (who, want) in [(a, DROP), (b, PASS), (c, DROP)] {
            let syn = Spec::syn(who, f.server(), WEB_PORT).build();
            expect(&dp, hook, &syn, want, &format!("{who}"));
        }
    }
    assert!(dp.remove_session(b, web).unwrap());
    assert!(!dp.remove_session(b, web).unwrap());
}

/// `remove_source` removes an address's sessions for every service and leaves other addresses'.
#[test]
fn remove_source_removes_every_service_of_an_address() {
    let mut dp = protected();
    let f = Family::V6;
    let (a, b, s) = (f.stranger(1), f.stranger(2), f.server());
    dp.upsert_sessions(&[
        session(a, WEB, 1, 1),
        session(a, DNS, 1, 1),
        session(a, OTHER, 1, 1),
        session(b, WEB, 1, 1),
    ])
    .unwrap();
    assert_eq!(dp.remove_source(a).unwrap(), 3);
    assert_eq!(dp.remove_source(a).unwrap(), 0);
    for hook in HOOKS {
        expect(
            &dp,
            hook,
            &Spec::syn(a, s, WEB_PORT).build(),
            DROP,
            "a, TCP",
        );
        expect(
            &dp,
            hook,
            &Spec::udp(a, s, DNS_PORT).build(),
            DROP,
            "a, UDP",
        );
        expect(
            &dp,
            hook,
            &Spec::syn(a, s, OTHER_PORT).build(),
            DROP,
            "a, other",
        );
        expect(&dp, hook, &Spec::syn(b, s, WEB_PORT).build(), PASS, "b");
    }
}

/// `remove_expired` removes exactly the expired sessions and returns them; live ones stay and
/// still work, and the removed ones are now refused as no-session rather than expired.
#[test]
fn remove_expired_removes_only_expired_sessions() {
    let mut dp = protected();
    let f = Family::V4;
    let [a, b, c] = [1, 2, 3].map(|n| f.stranger(n));
    dp.upsert_sessions(&[
        expired_session(a, WEB, Expiry::from_ns(1)),
        expired_session(b, WEB, Expiry::after(Duration::ZERO)),
        session(c, WEB, 1, 1),
    ])
    .unwrap();
    let removed: BTreeSet<IpAddr> = dp
        .remove_expired()
        .unwrap()
        .iter()
        .map(|s| s.source)
        .collect();
    assert_eq!(removed, BTreeSet::from([a, b]));
    let left: Vec<IpAddr> = dp.sessions().unwrap().iter().map(|s| s.source).collect();
    assert_eq!(left, vec![c]);
    assert_eq!(dp.remove_expired().unwrap(), vec![]);
    for hook in HOOKS {
        for who in [a, b] {
            let syn = Spec::syn(who, f.server(), WEB_PORT).build();
            check(&dp, hook, &syn, DROP, Some((WEB, NoSession)), "removed");
        }
        let syn = Spec::syn(c, f.server(), WEB_PORT).build();
        check(&dp, hook, &syn, PASS, Some((WEB, AllowSession)), "live");
    }
}

/// The sessions map has the capacity the load options ask for: a batch that overflows it fails
/// with a count of what was written, and exactly that many sessions are in the map; zero
/// capacity is refused.
#[test]
fn a_full_session_map_reports_what_was_written() {
    require_root();
    let options = |max_sessions| LoadOptions {
        max_sessions,
        ..Default::default()
    };
    assert!(matches!(
        Dataplane::load(options(0)),
        Err(DataplaneError::Invalid(_))
    ));
    let mut dp = Dataplane::load(options(64)).unwrap();
    assert_eq!(dp.max_sessions(), 64);
    dp.set_services(&services()).unwrap();
    let sessions: Vec<Session> = (0..100u32)
        .map(|i| session(IpAddr::V4(Ipv4Addr::from(0x0a50_0000 + i)), WEB, i, 1))
        .collect();
    match dp.upsert_sessions(&sessions) {
        Err(DataplaneError::Batch { written, total, .. }) => {
            assert_eq!(total, 100);
            assert!(
                written > 0 && written <= 64,
                "{written} written into 64 slots"
            );
            assert_eq!(dp.sessions().unwrap().len(), written);
        }
        other => panic!("expected a partial batch, got {other:?}"),
    }
}
