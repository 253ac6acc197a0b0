//! The failed-attempt limiter of the session endpoint: a token bucket per source, holding only
//! failures, in bounded memory.
//!
//! IPv4 sources are keyed by address, IPv6 sources by their /64: one host usually owns a whole
//! /64, and per-address buckets would give it 2^64 fresh buckets to guess tokens with.

use std::{
    net::{IpAddr, Ipv6Addr},
    num::NonZeroUsize,
    time::{Duration, Instant},
};

use lru::LruCache;

/// How many sources the limiter remembers; the least recently failing one is forgotten first.
pub const DEFAULT_CAPACITY: usize = 64 * 1024;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets of failed attempts, per source.
#[derive(Debug)]
pub struct FailureLimiter {
    per_sec: f64,
    burst: f64,
    buckets: LruCache<IpAddr, Bucket>,
}

impl FailureLimiter {
    /// `per_minute` failures refill per minute, up to `burst`; at most `capacity` sources.
    pub fn new(per_minute: u32, burst: u32, capacity: usize) -> Self {
        Self {
            per_sec: f64::from(per_minute.max(1)) / 60.0,
            burst: f64::from(burst.max(1)),
            buckets: LruCache::new(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN)),
        }
    }

    /// `Ok` if `source` may try now; otherwise how long until it may.
    pub fn check(&mut self, source: IpAddr, now: Instant) -> Result<(), Duration> {
        let Some(b) = self.buckets.peek(&key(source)) else {
            return Ok(());
        };
        let tokens = self.refilled(b, now);
        if tokens >= 1.0 {
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - tokens) / self.per_sec))
        }
    }

    /// Counts one failed attempt of `source`.
    pub fn failure(&mut self, source: IpAddr, now: Instant) {
        let k = key(source);
        let tokens = match self.buckets.get(&k).copied() {
            Some(b) => self.refilled(&b, now),
            None => self.burst,
        };
        self.buckets.put(
            k,
            Bucket {
                tokens: (tokens - 1.0).max(0.0),
                updated: now,
            },
        );
    }

    /// Sources currently remembered.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no source is remembered.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    fn refilled(&self, b: &Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
        (b.tokens + elapsed * self.per_sec).min(self.burst)
    }
}

/// The bucket key: the IPv4 address, or the IPv6 /64.
fn key(source: IpAddr) -> IpAddr {
    match source.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn burst_then_rate() {
        let mut l = FailureLimiter::new(60, 3, 16);
        let t0 = Instant::now();
        let a = ip("192.0.2.7");
        for _ in 0..3 {
            assert!(l.check(a, t0).is_ok());
            l.failure(a, t0);
        }
        let wait = l.check(a, t0).unwrap_err();
        assert!(wait > Duration::from_millis(900) && wait <= Duration::from_secs(1));
        // Another source is not affected.
        assert!(l.check(ip("192.0.2.8"), t0).is_ok());
        // 60 per minute: one more attempt a second later, not two.
        let t1 = t0 + Duration::from_secs(1);
        assert!(l.check(a, t1).is_ok());
        l.failure(a, t1);
        assert!(l.check(a, t1).is_err());
        // Refills up to the burst, no further.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(l.check(a, t2).is_ok());
            l.failure(a, t2);
        }
        assert!(l.check(a, t2).is_err());
    }

    #[test]
    fn ipv6_sources_share_their_slash_64() {
        let mut l = FailureLimiter::new(1, 1, 16);
        let t = Instant::now();
        l.failure(ip("2001:db8:1:2::1"), t);
        assert!(l.check(ip("2001:db8:1:2:ffff::9"), t).is_err());
        assert!(l.check(ip("2001:db8:1:3::1"), t).is_ok());
        // IPv4-mapped IPv6 is the IPv4 source.
        l.failure(ip("192.0.2.1"), t);
        assert!(l.check(ip("::ffff:192.0.2.1"), t).is_err());
    }

    #[test]
    fn memory_is_bounded() {
        let mut l = FailureLimiter::new(1, 1, 4);
        let t = Instant::now();
        for i in 0..100u8 {
            l.failure(IpAddr::from([10, 0, 0, i]), t);
        }
        assert_eq!(l.len(), 4);
        // The most recent ones are remembered, the oldest forgotten.
        assert!(l.check(IpAddr::from([10, 0, 0, 99]), t).is_err());
        assert!(l.check(IpAddr::from([10, 0, 0, 0]), t).is_ok());
    }
}
