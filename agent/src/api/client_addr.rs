//! The client address of a session-endpoint request: the TCP peer, or, when the peer is a
//! trusted proxy, the right-most address in `X-Forwarded-For` that is not itself a trusted proxy.
//!
//! Right-most, because each proxy appends the address it received the request from: everything
//! left of the last untrusted hop was written by the client and proves nothing.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use thiserror::Error;

/// Longest `X-Forwarded-For` chain read; a longer one is refused rather than walked.
pub const MAX_HOPS: usize = 32;

/// Why `X-Forwarded-For` from a trusted proxy could not be used (the request is refused: the
/// proxy is misconfigured or not what it claims to be).
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ForwardedError {
    /// An element that had to be read is not an IP address.
    #[error("X-Forwarded-For element {0:?} is not an IP address")]
    NotAnAddress(String),
    /// The chain is longer than [`MAX_HOPS`].
    #[error("X-Forwarded-For has more than {MAX_HOPS} elements")]
    TooLong,
}

/// The client's address, given the TCP `peer`, the trusted proxy networks and every
/// `X-Forwarded-For` header value in order. Addresses come back canonical (IPv4-mapped IPv6 as
/// IPv4).
pub fn client_address(
    peer: IpAddr,
    trusted: &[IpNet],
    forwarded_for: &[&str],
) -> Result<IpAddr, ForwardedError> {
    let peer = peer.to_canonical();
    if !is_trusted(peer, trusted) {
        return Ok(peer);
    }
    let hops: Vec<&str> = forwarded_for
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .collect();
    if hops.len() > MAX_HOPS {
        return Err(ForwardedError::TooLong);
    }
    let mut client = peer;
    for hop in hops.iter().rev() {
        client = parse_hop(hop).ok_or_else(|| ForwardedError::NotAnAddress((*hop).to_owned()))?;
        if !is_trusted(client, trusted) {
            return Ok(client);
        }
    }
    // Every hop is a trusted proxy (e.g. a health check from the proxy itself): the left-most.
    Ok(client)
}

fn is_trusted(addr: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|n| n.contains(&addr))
}

/// An address as proxies write it: `192.0.2.1`, `2001:db8::1`, and with a port
/// `192.0.2.1:4711` or `[2001:db8::1]:4711` (some add one), or `[2001:db8::1]`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let addr = hop
        .parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            hop.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .and_then(|h| h.parse::<IpAddr>().ok())
        })?;
    Some(addr.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_it_claims() {
        let trusted = nets(&["10.0.0.0/24"]);
        assert_eq!(
            client_address(ip("192.0.2.7"), &trusted, &["198.51.100.1"]),
            Ok(ip("192.0.2.7"))
        );
        assert_eq!(
            client_address(ip("192.0.2.7"), &trusted, &["garbage"]),
            Ok(ip("192.0.2.7")),
            "an untrusted peer's header is not even read"
        );
        assert_eq!(
            client_address(ip("::ffff:192.0.2.7"), &[], &[]),
            Ok(ip("192.0.2.7"))
        );
    }

    #[test]
    fn trusted_peer_gives_the_right_most_untrusted_hop() {
        let trusted = nets(&["10.0.0.0/24", "2001:db8:ffff::/48"]);
        // The client forged the first element; the proxy appended the real one.
        assert_eq!(
            client_address(ip("10.0.0.5"), &trusted, &["203.0.113.66, 192.0.2.7"]),
            Ok(ip("192.0.2.7"))
        );
        // Two proxies in a row, and several header lines (joined in order).
        assert_eq!(
            client_address(
                ip("10.0.0.5"),
                &trusted,
                &["203.0.113.66", "192.0.2.7, 10.0.0.9"]
            ),
            Ok(ip("192.0.2.7"))
        );
        assert_eq!(
            client_address(
                ip("2001:db8:ffff::1"),
                &trusted,
                &["[2001:db8::7]:4711, 10.0.0.1:80"]
            ),
            Ok(ip("2001:db8::7"))
        );
        assert_eq!(
            client_address(ip("10.0.0.5"), &trusted, &["::ffff:192.0.2.7"]),
            Ok(ip("192.0.2.7"))
        );
        assert_eq!(
            client_address(ip("10.0.0.5"), &trusted, &["[2001:db8::7]"]),
            Ok(ip("2001:db8::7"))
        );
    }

    #[test]
    fn trusted_peer_without_header_or_only_proxies() {
        let trusted = nets(&["10.0.0.0/24"]);
        assert_eq!(
            client_address(ip("10.0.0.5"), &trusted, &[]),
            Ok(ip("10.0.0.5"))
        );
        assert_eq!(
            client_address(ip("10.0.0.5"), &trusted, &["10.0.0.1, 10.0.0.2"]),
            Ok(ip("10.0.0.1"))
        );
    }

    #[test]
    fn garbage_where_it_matters_is_refused() {
        let trusted = nets(&["10.0.0.0/24"]);
        assert_eq!(
            client_address(ip("10.0.0.5"), &trusted, &["192.0.2.7, unknown"]),
            Err(ForwardedError::NotAnAddress("unknown".into()))
        );
        // Left of the chosen hop, garbage is the client's own and ignored.
        assert_eq!(
            client_address(ip("10.0.0.5"), &trusted, &["<script>, 192.0.2.7"]),
            Ok(ip("192.0.2.7"))
        );
        let long = vec!["10.0.0.1"; MAX_HOPS + 1].join(",");
        assert_eq!(
            client_address(ip("10.0.0.5"), &trusted, &[&long]),
            Err(ForwardedError::TooLong)
        );
    }
}
