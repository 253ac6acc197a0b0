//! Events from the kernel's ring buffer: refused flows and new allowed connections.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use idgate_common::{self as common, Reason};
use tokio::io::unix::AsyncFd;

use super::{DataplaneError, types::addr_from_kernel};

/// What happened to the packet an event reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Refused; `reset` says whether a RST went back.
    Denied {
        /// Why.
        reason: Reason,
        /// A RST was sent instead of a silent drop.
        reset: bool,
    },
    /// A TCP SYN let through: a new allowed connection.
    NewConnection {
        /// Through a session or a CIDR allow rule.
        reason: Reason,
    },
}

/// One event, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataplaneEvent {
    /// Monotonic clock (coarse) when the packet was seen.
    pub at: Duration,
    /// What happened.
    pub kind: EventKind,
    /// Service id (0 when the packet could not be attributed to one).
    pub service_id: u32,
    /// Identity from the session, 0 when none.
    pub identity_id: u32,
    /// Rule from the session or CIDR entry, 0 when none.
    pub rule_id: u32,
    /// IP protocol (0 when unknown).
    pub protocol: u8,
    /// Source (port 0 when unknown).
    pub source: SocketAddr,
    /// Destination (port 0 when unknown).
    pub destination: SocketAddr,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    /// Ingress interface index.
    pub ifindex: u32,
    /// Packet length.
    pub len: u32,
}

impl DataplaneEvent {
    /// Decodes one ring-buffer record; `None` for records of the wrong size or unknown values.
    pub fn decode(bytes: &[u8]) -> Option<DataplaneEvent> {
        if bytes.len() < size_of::<common::Event>() {
            return None;
        }
        let raw = read_event(bytes);
        let reason = Reason::from_u32(raw.reason)?;
        let kind = match raw.kind {
            common::EVENT_DENIED => EventKind::Denied {
                reason,
                reset: raw.action == common::ACTION_RESET,
            },
            common::EVENT_NEW_CONNECTION => EventKind::NewConnection { reason },
            _ => return None,
        };
        let addr = |b: [u8; 16]| -> IpAddr { addr_from_kernel(b) };
        Some(DataplaneEvent {
            at: Duration::from_nanos(raw.ts_ns),
            kind,
            service_id: raw.service_id,
            identity_id: raw.identity_id,
            rule_id: raw.rule_id,
            protocol: raw.proto,
            source: SocketAddr::new(addr(raw.src), raw.sport),
            destination: SocketAddr::new(addr(raw.dst), raw.dport),
            tcp_flags: raw.tcp_flags,
            ifindex: raw.ifindex,
            len: raw.len,
        })
    }
}

/// Copies the record out field by field: ring-buffer records are only 8-byte aligned by
/// convention, and this keeps the decoding free of unsafe code.
fn read_event(b: &[u8]) -> common::Event {
    let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    let u32_at = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let u64_at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        u64::from_ne_bytes(a)
    };
    let arr16 = |i: usize| {
        let mut a = [0u8; 16];
        a.copy_from_slice(&b[i..i + 16]);
        a
    };
    common::Event {
        ts_ns: u64_at(0),
        kind: u32_at(8),
        reason: u32_at(12),
        action: u32_at(16),
        service_id: u32_at(20),
        identity_id: u32_at(24),
        rule_id: u32_at(28),
        src: arr16(32),
        dst: arr16(48),
        sport: u16_at(64),
        dport: u16_at(66),
        proto: b[68],
        ip_version: b[69],
        tcp_flags: b[70],
        pad: b[71],
        ifindex: u32_at(72),
        len: u32_at(76),
    }
}

/// Reads events from the kernel, synchronously or asynchronously.
pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl EventReader {
    pub(super) fn new(ring: RingBuf<MapData>) -> Self {
        EventReader { ring }
    }

    /// Every event waiting now, without blocking.
    pub fn drain(&mut self) -> Vec<DataplaneEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            match DataplaneEvent::decode(&item) {
                Some(e) => out.push(e),
                None => tracing::warn!(len = item.len(), "undecodable data-plane event skipped"),
            }
        }
        out
    }

    /// Turns the reader into an async stream (needs a tokio runtime).
    pub fn into_async(self) -> Result<AsyncEventReader, DataplaneError> {
        let fd = self.ring.as_raw_fd();
        Ok(AsyncEventReader {
            inner: super::sys::register_readable(self).map_err(|e| DataplaneError::Io {
                op: format!("registering ring buffer fd {fd} with tokio"),
                source: e,
            })?,
        })
    }
}

impl AsRawFd for EventReader {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}

/// Waits for events without polling.
pub struct AsyncEventReader {
    inner: AsyncFd<EventReader>,
}

impl AsyncEventReader {
    /// The next non-empty batch of events.
    pub async fn next_batch(&mut self) -> Result<Vec<DataplaneEvent>, DataplaneError> {
        loop {
            let mut guard = self
                .inner
                .readable_mut()
                .await
                .map_err(|e| DataplaneError::Io {
                    op: "waiting on the event ring buffer".into(),
                    source: e,
                })?;
            let batch = guard.get_inner_mut().drain();
            guard.clear_ready();
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_bytes(e: &common::Event) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&e.ts_ns.to_ne_bytes());
        for x in [
            e.kind,
            e.reason,
            e.action,
            e.service_id,
            e.identity_id,
            e.rule_id,
        ] {
            v.extend_from_slice(&x.to_ne_bytes());
        }
        v.extend_from_slice(&e.src);
        v.extend_from_slice(&e.dst);
        v.extend_from_slice(&e.sport.to_ne_bytes());
        v.extend_from_slice(&e.dport.to_ne_bytes());
        v.extend_from_slice(&[e.proto, e.ip_version, e.tcp_flags, e.pad]);
        v.extend_from_slice(&e.ifindex.to_ne_bytes());
        v.extend_from_slice(&e.len.to_ne_bytes());
        v
    }

    #[test]
    fn decodes_what_the_kernel_writes() {
        let mut src = [0u8; 16];
        src[10] = 0xff;
        src[11] = 0xff;
        src[12..].copy_from_slice(&[192, 0, 2, 9]);
        let raw = common::Event {
            ts_ns: 42,
            kind: common::EVENT_DENIED,
            reason: Reason::Expired as u32,
            action: common::ACTION_RESET,
            service_id: 3,
            identity_id: 77,
            rule_id: 5,
            src,
            dst: "2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
            sport: 40000,
            dport: 8000,
            proto: 6,
            ip_version: 4,
            tcp_flags: 2,
            pad: 0,
            ifindex: 9,
            len: 74,
        };
        let bytes = raw_bytes(&raw);
        assert_eq!(bytes.len(), size_of::<common::Event>());
        let e = DataplaneEvent::decode(&bytes).unwrap();
        assert_eq!(
            e.kind,
            EventKind::Denied {
                reason: Reason::Expired,
                reset: true
            }
        );
        assert_eq!(e.source, "192.0.2.9:40000".parse().unwrap());
        assert_eq!(e.destination, "[2001:db8::1]:8000".parse().unwrap());
        assert_eq!((e.service_id, e.identity_id, e.rule_id), (3, 77, 5));
        assert_eq!((e.ifindex, e.len, e.tcp_flags), (9, 74, 2));
    }

    #[test]
    fn refuses_short_or_unknown_records() {
        assert!(DataplaneEvent::decode(&[0u8; 10]).is_none());
        let raw = common::Event {
            kind: 99,
            ..Default::default()
        };
        assert!(DataplaneEvent::decode(&raw_bytes(&raw)).is_none());
    }
}
