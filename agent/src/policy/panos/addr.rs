//! Address sets as sorted, disjoint ranges per family: what PAN-OS address objects, groups and
//! negation resolve to, and what becomes `source_cidrs`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Inclusive ranges, sorted and merged.
type Ranges = Vec<(u128, u128)>;

/// A set of IPv4 and IPv6 addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct AddrSet {
    v4: Ranges,
    v6: Ranges,
}

const V4_MAX: u128 = u32::MAX as u128;

impl AddrSet {
    /// Every address of both families.
    pub(super) fn any() -> AddrSet {
        AddrSet {
            v4: vec![(0, V4_MAX)],
            v6: vec![(0, u128::MAX)],
        }
    }

    /// Adds a network (IPv4-mapped IPv6 networks count as IPv4, as the kernel sees them).
    pub(super) fn insert_net(&mut self, net: IpNet) {
        match canonical_net(net.trunc()) {
            IpNet::V4(n) => insert(
                &mut self.v4,
                u128::from(u32::from(n.network())),
                u128::from(u32::from(n.broadcast())),
            ),
            IpNet::V6(n) => insert(
                &mut self.v6,
                u128::from(n.network()),
                u128::from(n.broadcast()),
            ),
        }
    }

    /// Adds the addresses from `a` to `b` inclusive; `None` if the ends differ in family or are
    /// out of order.
    pub(super) fn insert_range(&mut self, a: IpAddr, b: IpAddr) -> Option<()> {
        match (a.to_canonical(), b.to_canonical()) {
            (IpAddr::V4(a), IpAddr::V4(b)) if a <= b => {
                insert(
                    &mut self.v4,
                    u128::from(u32::from(a)),
                    u128::from(u32::from(b)),
                );
            }
            (IpAddr::V6(a), IpAddr::V6(b)) if a <= b => {
                insert(&mut self.v6, u128::from(a), u128::from(b));
            }
            _ => return None,
        }
        Some(())
    }

    /// Every address not in the set.
    pub(super) fn complement(&self) -> AddrSet {
        AddrSet {
            v4: complement(&self.v4, V4_MAX),
            v6: complement(&self.v6, u128::MAX),
        }
    }

    /// Whether the address is in the set.
    pub(super) fn contains(&self, addr: IpAddr) -> bool {
        let (ranges, x) = match addr.to_canonical() {
            IpAddr::V4(a) => (&self.v4, u128::from(u32::from(a))),
            IpAddr::V6(a) => (&self.v6, u128::from(a)),
        };
        ranges.iter().any(|&(a, b)| a <= x && x <= b)
    }

    /// Whether the two sets share an address.
    pub(super) fn overlaps(&self, other: &AddrSet) -> bool {
        let meet = |x: &Ranges, y: &Ranges| {
            x.iter()
                .any(|&(a, b)| y.iter().any(|&(c, d)| a <= d && c <= b))
        };
        meet(&self.v4, &other.v4) || meet(&self.v6, &other.v6)
    }

    /// Whether the set holds no address.
    pub(super) fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// Whether the set holds every address.
    pub(super) fn is_any(&self) -> bool {
        *self == AddrSet::any()
    }

    /// The fewest networks covering exactly the set, IPv4 first.
    pub(super) fn to_cidrs(&self) -> Vec<IpNet> {
        let mut out = Vec::new();
        for &(a, b) in &self.v4 {
            for (base, prefix) in blocks(a, b, 32) {
                let addr = Ipv4Addr::from(u32::try_from(base).unwrap_or(u32::MAX));
                out.extend(Ipv4Net::new(addr, prefix).ok().map(IpNet::V4));
            }
        }
        for &(a, b) in &self.v6 {
            for (base, prefix) in blocks(a, b, 128) {
                out.extend(
                    Ipv6Net::new(Ipv6Addr::from(base), prefix)
                        .ok()
                        .map(IpNet::V6),
                );
            }
        }
        out
    }
}

/// IPv4-mapped IPv6 networks (`::ffff:10.0.0.0/104`) as the IPv4 networks they are.
pub(super) fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(n) = net
        && n.prefix_len() >= 96
        && let Some(v4) = n.network().to_ipv4_mapped()
        && let Ok(v4) = Ipv4Net::new(v4, n.prefix_len() - 96)
    {
        return IpNet::V4(v4);
    }
    net
}

fn insert(ranges: &mut Ranges, a: u128, b: u128) {
    ranges.push((a, b));
    ranges.sort_unstable();
    let mut merged: Ranges = Vec::with_capacity(ranges.len());
    for &(a, b) in ranges.iter() {
        match merged.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    *ranges = merged;
}

fn complement(ranges: &Ranges, max: u128) -> Ranges {
    let mut out = Vec::new();
    let mut next = Some(0u128);
    for &(a, b) in ranges {
        if let Some(n) = next
            && n < a
        {
            out.push((n, a - 1));
        }
        next = b.checked_add(1).filter(|&x| x <= max);
    }
    if let Some(n) = next {
        out.push((n, max));
    }
    out
}

/// The aligned blocks `(base, prefix)` that tile `[a, b]` in an address space of `bits` bits,
/// largest first at each step.
fn blocks(mut a: u128, b: u128, bits: u8) -> Vec<(u128, u8)> {
    let mut out = Vec::new();
    loop {
        let prefix = (0..=bits)
            .find(|&p| {
                let host = u32::from(bits - p);
                let mask = if host == 128 {
                    u128::MAX
                } else {
                    (1u128 << host) - 1
                };
                a & mask == 0 && a.checked_add(mask).is_some_and(|end| end <= b)
            })
            .unwrap_or(bits);
        out.push((a, prefix));
        let host = u32::from(bits - prefix);
        let size_minus_one = if host == 128 {
            u128::MAX
        } else {
            (1u128 << host) - 1
        };
        match a.checked_add(size_minus_one).and_then(|e| e.checked_add(1)) {
            Some(n) if n <= b => a = n,
            _ => return out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &AddrSet) -> Vec<String> {
        s.to_cidrs().iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_range_becomes_the_fewest_networks() {
        let mut s = AddrSet::default();
        s.insert_range("10.0.0.1".parse().unwrap(), "10.0.0.9".parse().unwrap())
            .unwrap();
        assert_eq!(
            nets(&s),
            ["10.0.0.1/32", "10.0.0.2/31", "10.0.0.4/30", "10.0.0.8/31"]
        );
        assert!(s.contains("10.0.0.9".parse().unwrap()));
        assert!(!s.contains("10.0.0.10".parse().unwrap()));
    }

    #[test]
    fn complement_of_a_network_tiles_the_rest_of_both_families() {
        let mut s = AddrSet::default();
        s.insert_net("128.0.0.0/1".parse().unwrap());
        s.insert_net("8000::/1".parse().unwrap());
        assert_eq!(nets(&s.complement()), ["0.0.0.0/1", "::/1"]);
        assert_eq!(
            nets(&AddrSet::default().complement()),
            ["0.0.0.0/0", "::/0"]
        );
        assert!(AddrSet::any().complement().is_empty());
        let mut t = AddrSet::default();
        t.insert_net("10.0.0.0/8".parse().unwrap());
        let c = t.complement();
        assert!(!c.contains("10.1.2.3".parse().unwrap()));
        assert!(c.contains("11.0.0.0".parse().unwrap()));
        assert!(c.contains("2001:db8::1".parse().unwrap()));
        assert!(!c.overlaps(&t));
        assert_eq!(c.complement(), t);
    }

    #[test]
    fn adjacent_networks_merge_and_mapped_addresses_are_ipv4() {
        let mut s = AddrSet::default();
        s.insert_net("10.0.0.0/25".parse().unwrap());
        s.insert_net("10.0.0.128/25".parse().unwrap());
        s.insert_net("::ffff:192.0.2.0/120".parse().unwrap());
        assert_eq!(nets(&s), ["10.0.0.0/24", "192.0.2.0/24"]);
        assert!(s.contains("::ffff:10.0.0.7".parse().unwrap()));
    }
}
