//! The one verdict routine, shared by the XDP and TC programs.
//!
//! Order, for a packet to a protected (protocol, port): CIDR deny → drop; CIDR allow → pass;
//! valid session, neither expired nor idle past its idle timeout → pass (refreshing its last
//! activity at most once a second); otherwise the service's default action. Traffic to any other
//! port passes untouched and uncounted. Whatever cannot be parsed far enough to rule out a
//! protected port is dropped (fail closed).

use aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns;
use idgate_common::{
    ACTION_DROP, ACTION_PASS, ACTION_RESET, ACTIVITY_GRANULARITY_NS, CIDR_SERVICE_BITS,
    COUNTER_SLOT_RST_SENT, CidrData, DefaultAction, EVENT_DENIED, EVENT_NEW_CONNECTION, Event,
    FragKey, FragValue, GlobalConfig, MAX_EVENT_BURST, MAX_EVENTS_PER_SEC, Reason,
    SERVICE_HAS_ALLOW, SERVICE_HAS_DENY, ServiceValue, SessionKey, TOKEN_SCALE, counter_index,
    port_index, protects_bit,
};

use aya_ebpf::maps::lpm_trie::Key;

use crate::{
    maps::{
        CIDR_ALLOW, CIDR_DENY, CONFIG, COUNTERS, EVENT_BUCKET, EVENTS, FRAGMENTS, PORTS, SERVICES,
        SESSIONS,
    },
    parse::{Flow, Frag, L4, PROTO_UNKNOWN, Parsed, TCP_RST, addr_bytes},
};

/// What the attach point must do with the packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pass,
    Drop,
    /// Answer with a TCP RST built from the flow (drop if that fails).
    Reset,
}

/// The verdict and the service it was counted against.
pub struct Verdict {
    pub action: Action,
    pub service_id: u32,
}

/// Facts about the packet that are not in its headers.
pub struct Meta {
    pub len: u32,
    pub ifindex: u32,
}

const PASS: Verdict = Verdict {
    action: Action::Pass,
    service_id: 0,
};

/// `CLOCK_MONOTONIC_COARSE`: tick resolution, but read without touching the clock source, which
/// measured 15–20 ns cheaper per packet than the precise clocks. The agent computes expiries on
/// the same clock.
#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a helper with no arguments and no preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
fn config() -> GlobalConfig {
    match CONFIG.get(0) {
        Some(c) => *c,
        // Unreachable for an array map; if it ever happened, assume everything is protected.
        None => GlobalConfig {
            events_per_sec: 0,
            events_burst: 0,
            protects: u32::MAX,
            layout_version: 0,
        },
    }
}

/// Decides what happens to a parsed packet, counting it and reporting it as it goes.
#[inline(always)]
pub fn judge(parsed: Parsed, flow: &mut Flow, meta: &Meta) -> Verdict {
    match parsed {
        Parsed::Unprotected => PASS,
        Parsed::BadL3 => {
            if config().protects == 0 {
                return PASS;
            }
            refuse_unattributed(Reason::Malformed, flow, meta)
        }
        Parsed::Ip => {
            let protects = config().protects;
            // A later fragment of unknown transport may be for anything protected.
            let protected_proto = if flow.proto == PROTO_UNKNOWN {
                protects != 0
            } else {
                protects & protects_bit(flow.proto) != 0
            };
            if !protected_proto {
                return PASS;
            }
            match flow.l4 {
                L4::Malformed => refuse_unattributed(Reason::Malformed, flow, meta),
                L4::Fragment => {
                    let key = frag_key(flow);
                    match FRAGMENTS.get_ptr(key) {
                        Some(ports) => {
                            // SAFETY: a value pointer from a successful lookup.
                            let ports = unsafe { *ports };
                            flow.sport = ports.sport;
                            flow.dport = ports.dport;
                            flow.proto = ports.proto;
                            judge_service(flow, meta)
                        }
                        None => refuse_unattributed(Reason::UnknownFragment, flow, meta),
                    }
                }
                L4::Complete => {
                    if flow.frag == Frag::First {
                        let ports = FragValue {
                            sport: flow.sport,
                            dport: flow.dport,
                            proto: flow.proto,
                            pad: [0; 3],
                        };
                        // If the LRU cannot take it, later fragments are refused: fail closed.
                        let _ = FRAGMENTS.insert(frag_key(flow), ports, 0);
                    }
                    judge_service(flow, meta)
                }
            }
        }
    }
}

#[inline(always)]
fn frag_key(flow: &Flow) -> FragKey {
    FragKey {
        src: addr_bytes(flow.src),
        dst: addr_bytes(flow.dst),
        id: flow.frag_id,
        proto: flow.frag_proto,
        pad: [0; 3],
    }
}

#[inline(always)]
fn cidr_key(service_id: u32, flow: &Flow) -> Key<CidrData> {
    Key::new(
        CIDR_SERVICE_BITS + 128,
        CidrData {
            service_id_be: service_id.to_be_bytes(),
            family: flow.ip_version,
            addr: addr_bytes(flow.src),
        },
    )
}

#[inline(always)]
fn judge_service(flow: &Flow, meta: &Meta) -> Verdict {
    let Some(index) = port_index(flow.proto, flow.dport) else {
        return PASS;
    };
    let id = match PORTS.get(index) {
        Some(&id) if id != 0 => id,
        _ => return PASS,
    };
    // A port naming a service with no entry (impossible when the agent writes the service first)
    // gets a zeroed value: action drop, no CIDR rules. Fail closed.
    let svc: ServiceValue = match SERVICES.get(id) {
        Some(v) => *v,
        None => ServiceValue::default(),
    };

    if svc.flags & SERVICE_HAS_DENY != 0
        && let Some(hit) = CIDR_DENY.get(cidr_key(id, flow))
    {
        let rule = hit.rule_id;
        count(id, Reason::DeniedCidr as u32, meta.len);
        report(
            EVENT_DENIED,
            Reason::DeniedCidr,
            ACTION_DROP,
            id,
            0,
            rule,
            flow,
            meta,
        );
        return Verdict {
            action: Action::Drop,
            service_id: id,
        };
    }
    if svc.flags & SERVICE_HAS_ALLOW != 0
        && let Some(hit) = CIDR_ALLOW.get(cidr_key(id, flow))
    {
        let rule = hit.rule_id;
        return allow(Reason::AllowCidr, id, 0, rule, flow, meta);
    }

    let session_key = SessionKey {
        addr: addr_bytes(flow.src),
        service_id: id,
    };
    let (reason, identity, rule) = match SESSIONS.get_ptr_mut(session_key) {
        Some(p) => {
            // SAFETY: a value pointer from a successful lookup, valid for this program run.
            let s = unsafe { *p };
            let now = now_ns();
            let idle_for = now.saturating_sub(s.last_seen_ns);
            // Past its expiry, or idle too long: the session's time is up either way (the agent
            // tells the two apart in its audit record).
            if now < s.expires_ns && (s.idle_ns == 0 || idle_for < s.idle_ns) {
                if idle_for >= ACTIVITY_GRANULARITY_NS {
                    // SAFETY: as above; an aligned 8-byte store, which another CPU doing the same
                    // can only overwrite with an equally fresh time.
                    unsafe { (*p).last_seen_ns = now };
                }
                return allow(
                    Reason::AllowSession,
                    id,
                    s.identity_id,
                    s.rule_id,
                    flow,
                    meta,
                );
            }
            (Reason::Expired, s.identity_id, s.rule_id)
        }
        None => (Reason::NoSession, 0, 0),
    };

    count(id, reason as u32, meta.len);
    let reset = svc.action == DefaultAction::Reset as u32
        && flow.proto == idgate_common::IPPROTO_TCP
        && flow.frag == Frag::None
        && flow.tcp_flags & TCP_RST == 0;
    let (action, event_action) = if reset {
        (Action::Reset, ACTION_RESET)
    } else {
        (Action::Drop, ACTION_DROP)
    };
    report(
        EVENT_DENIED,
        reason,
        event_action,
        id,
        identity,
        rule,
        flow,
        meta,
    );
    Verdict {
        action,
        service_id: id,
    }
}

#[inline(always)]
fn allow(reason: Reason, id: u32, identity: u32, rule: u32, flow: &Flow, meta: &Meta) -> Verdict {
    count(id, reason as u32, meta.len);
    if flow.is_syn() {
        report(
            EVENT_NEW_CONNECTION,
            reason,
            ACTION_PASS,
            id,
            identity,
            rule,
            flow,
            meta,
        );
    }
    Verdict {
        action: Action::Pass,
        service_id: id,
    }
}

/// Refuses a packet that may be for a protected port but cannot be tied to a service.
#[inline(always)]
fn refuse_unattributed(reason: Reason, flow: &Flow, meta: &Meta) -> Verdict {
    count(0, reason as u32, meta.len);
    report(EVENT_DENIED, reason, ACTION_DROP, 0, 0, 0, flow, meta);
    Verdict {
        action: Action::Drop,
        service_id: 0,
    }
}

/// Counts a RST the attach point managed to send.
#[inline(always)]
pub fn count_rst(service_id: u32, len: u32) {
    count(service_id, COUNTER_SLOT_RST_SENT, len);
}

#[inline(always)]
fn count(service_id: u32, slot: u32, len: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(counter_index(service_id, slot)) {
        // SAFETY: a per-CPU slot; nothing else on this CPU runs concurrently with us.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len as u64;
        }
    }
}

/// Emits an event if the per-CPU token bucket allows it; counts the ones it does not.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "all fields of one event, inlined"
)]
fn report(
    kind: u32,
    reason: Reason,
    action: u32,
    service_id: u32,
    identity_id: u32,
    rule_id: u32,
    flow: &Flow,
    meta: &Meta,
) {
    let Some(bucket) = EVENT_BUCKET.get_ptr_mut(0) else {
        return;
    };
    let cfg = config();
    let now = now_ns();
    // SAFETY: a per-CPU slot; nothing else on this CPU runs concurrently with us.
    let bucket = unsafe { &mut *bucket };
    // Refill: `rate` events/s is rate * TOKEN_SCALE / 1e9 = rate / 1000 units per ns. An idle
    // spell long enough to fill the bucket fills it; shorter ones are multiplied out, which cannot
    // overflow (elapsed * rate < cap * 1000 ≤ 1e15). Plain arithmetic on capped operands: BPF has
    // no 128-bit multiply for saturating_mul.
    let elapsed = now.saturating_sub(bucket.last_ns);
    bucket.last_ns = now;
    let cap = cfg.events_burst.min(MAX_EVENT_BURST) * TOKEN_SCALE;
    let rate = cfg.events_per_sec.min(MAX_EVENTS_PER_SEC);
    let tokens = if rate == 0 {
        0
    } else if elapsed >= cap * 1000 / rate {
        cap
    } else {
        (bucket.tokens + elapsed * rate / 1000).min(cap)
    };
    if tokens < TOKEN_SCALE {
        bucket.tokens = tokens;
        bucket.suppressed += 1;
        return;
    }
    bucket.tokens = tokens - TOKEN_SCALE;

    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        bucket.ring_full += 1;
        return;
    };
    entry.write(Event {
        ts_ns: now,
        kind,
        reason: reason as u32,
        action,
        service_id,
        identity_id,
        rule_id,
        src: addr_bytes(flow.src),
        dst: addr_bytes(flow.dst),
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        ip_version: flow.ip_version,
        tcp_flags: flow.tcp_flags,
        pad: 0,
        ifindex: meta.ifindex,
        len: meta.len,
    });
    entry.submit(0);
}
