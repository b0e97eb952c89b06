//! IP allowlists and the client address.
//!
//! The client address is the one Envoy computed (`source.address`, which already honours the
//! listener's trusted-hops settings); keygate never reads `X-Forwarded-For` itself. IPv4-mapped
//! IPv6 addresses are matched as IPv4. Lists that would match everything by accident are refused
//! when the config is compiled.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// A compiled allowlist (never empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpAllowlist(Vec<IpNet>);

impl IpAllowlist {
    /// Compiles a CIDR list; errors carry the index of the bad entry.
    pub fn parse(entries: &[String]) -> Result<IpAllowlist, (Option<usize>, String)> {
        if entries.is_empty() {
            return Err((
                None,
                "must not be empty; omit the field to allow any address".to_owned(),
            ));
        }
        let mut nets = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            nets.push(parse_cidr(e).map_err(|m| (Some(i), m))?);
        }
        Ok(IpAllowlist(nets))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// The list's networks, as compiled.
    pub fn nets(&self) -> &[IpNet] {
        &self.0
    }

    /// Whether every address `other` admits, this list admits too (each of `other`'s networks
    /// lies inside one of ours). The control plane's rule for a restricted principal's new keys.
    pub fn covers(&self, other: &IpAllowlist) -> bool {
        other
            .0
            .iter()
            .all(|theirs| self.0.iter().any(|ours| ours.contains(theirs)))
    }
}

/// Parses one entry: a CIDR with no host bits set, or a bare address (a /32 or /128).
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let net = if s.contains('/') {
        let net: IpNet = s.parse().map_err(|_| format!("invalid CIDR {s:?}"))?;
        if net.network() != net.addr() {
            return Err(format!(
                "host bits set in {s:?}; did you mean \"{}\"?",
                net.trunc()
            ));
        }
        net
    } else {
        let ip: IpAddr = s.parse().map_err(|_| format!("invalid IP address {s:?}"))?;
        IpNet::from(ip)
    };
    if net.prefix_len() == 0 {
        return Err(format!(
            "{s:?} allows every address; omit the field to allow any address"
        ));
    }
    if let IpNet::V6(v6) = net {
        // ::ffff:0:0/96 and anything inside it is IPv4 space written as IPv6: we match mapped
        // peers as IPv4, so such an entry would silently match nothing, or everything.
        let mapped: IpNet = IpNet::V6(
            ipnet::Ipv6Net::new(std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96)
                .map_err(|e| e.to_string())?,
        );
        if mapped.contains(&IpNet::V6(v6)) || IpNet::V6(v6).contains(&mapped) {
            return Err(format!("{s:?} covers IPv4-mapped IPv6 addresses (::ffff:0:0/96); write IPv4 CIDRs for IPv4 clients"));
        }
    }
    Ok(net)
}

/// Parses Envoy's `source.address` property (`1.2.3.4:5678`, `[::1]:5678`, or a bare address).
pub fn parse_client_address(bytes: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(bytes).ok()?;
    let ip = match s.parse::<SocketAddr>() {
        Ok(sa) => sa.ip(),
        Err(_) => s.parse::<IpAddr>().ok()?,
    };
    Some(ip.to_canonical())
}

/// The client address of a request that reached a service directly (the control plane, which
/// has no Envoy in front to compute `source.address`): the TCP `peer`, unless the peer is one of
/// the `trusted` proxies; then the right-most `X-Forwarded-For` entry that is not a trusted
/// proxy (entries left of it were written by the client and prove nothing). Every
/// `X-Forwarded-For` value is read, in order, as one comma-separated list.
///
/// `None` when the peer is trusted but the list has an entry that is not an IP address before
/// an untrusted one is found: the address cannot be known, so an allowlist refuses it. When
/// every entry is a trusted proxy (or there is none), the left-most one (or the peer) is the
/// client.
pub fn forwarded_client(
    peer: IpAddr,
    forwarded_for: &[&[u8]],
    trusted: Option<&IpAllowlist>,
) -> Option<IpAddr> {
    let peer = peer.to_canonical();
    let Some(trusted) = trusted.filter(|t| t.contains(peer)) else {
        return Some(peer);
    };
    let mut client = peer;
    for value in forwarded_for.iter().rev() {
        for entry in value.rsplit(|&b| b == b',') {
            let entry = entry.trim_ascii();
            let ip = std::str::from_utf8(entry)
                .ok()
                .and_then(|s| s.parse::<IpAddr>().ok())?
                .to_canonical();
            if !trusted.contains(ip) {
                return Some(ip);
            }
            client = ip;
        }
    }
    Some(client)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn list(v: &[&str]) -> IpAllowlist {
        IpAllowlist::parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv4_and_ipv6_membership() {
        let l = list(&["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]);
        assert!(l.contains(ip("10.255.0.1")));
        assert!(!l.contains(ip("11.0.0.1")));
        assert!(l.contains(ip("192.0.2.7")));
        assert!(!l.contains(ip("192.0.2.8")));
        assert!(l.contains(ip("2001:db8::1")));
        assert!(!l.contains(ip("2001:db9::1")));
    }

    #[test]
    fn ipv4_mapped_peers_match_as_ipv4() {
        let l = list(&["10.0.0.0/8"]);
        assert!(l.contains(ip("::ffff:10.1.2.3")));
        assert!(!l.contains(ip("::ffff:11.1.2.3")));
        // An IPv6 list does not accidentally admit a mapped IPv4 peer.
        let v6 = list(&["2001:db8::/32"]);
        assert!(!v6.contains(ip("::ffff:10.1.2.3")));
    }

    #[test]
    fn dangerous_or_wrong_entries_are_refused_with_a_reason() {
        let cases = [
            ("10.0.0.1/8", "host bits set in \"10.0.0.1/8\"; did you mean \"10.0.0.0/8\"?"),
            ("::ffff:0:0/96", "\"::ffff:0:0/96\" covers IPv4-mapped IPv6 addresses (::ffff:0:0/96); write IPv4 CIDRs for IPv4 clients"),
            ("::ffff:10.0.0.0/104", "\"::ffff:10.0.0.0/104\" covers IPv4-mapped IPv6 addresses (::ffff:0:0/96); write IPv4 CIDRs for IPv4 clients"),
            ("::/64", "\"::/64\" covers IPv4-mapped IPv6 addresses (::ffff:0:0/96); write IPv4 CIDRs for IPv4 clients"),
            ("0.0.0.0/0", "\"0.0.0.0/0\" allows every address; omit the field to allow any address"),
            ("::/0", "\"::/0\" allows every address; omit the field to allow any address"),
            ("10.0.0/8", "invalid CIDR \"10.0.0/8\""),
            ("10.0.0.0/33", "invalid CIDR \"10.0.0.0/33\""),
            ("example.com", "invalid IP address \"example.com\""),
        ];
        for (entry, want) in cases {
            assert_eq!(parse_cidr(entry).unwrap_err(), want, "{entry}");
        }
        assert!(parse_cidr("2001:db8::/64").is_ok());
        assert!(
            parse_cidr("::ffff:0:0/95").is_err(),
            "a supernet of the mapped range is refused"
        );
        let err = IpAllowlist::parse(&[]).unwrap_err();
        assert_eq!(
            err,
            (
                None,
                "must not be empty; omit the field to allow any address".to_owned()
            )
        );
        let err = IpAllowlist::parse(&["10.0.0.0/8".into(), "nope".into()]).unwrap_err();
        assert_eq!(err.0, Some(1));
    }

    #[test]
    fn client_address_forms() {
        assert_eq!(
            parse_client_address(b"127.0.0.1:5555"),
            Some(ip("127.0.0.1"))
        );
        assert_eq!(parse_client_address(b"[::1]:5555"), Some(ip("::1")));
        assert_eq!(
            parse_client_address(b"[::ffff:10.0.0.1]:80"),
            Some(ip("10.0.0.1"))
        );
        assert_eq!(parse_client_address(b"10.0.0.1"), Some(ip("10.0.0.1")));
        assert_eq!(parse_client_address(b""), None);
        assert_eq!(parse_client_address(b"\xff"), None);
        assert_eq!(parse_client_address(b"/tmp/envoy.sock"), None);
    }

    #[test]
    fn a_list_covers_another_only_when_each_of_its_networks_lies_inside_one_of_ours() {
        let ours = list(&["10.0.0.0/8", "2001:db8::/32"]);
        assert!(ours.covers(&list(&["10.1.0.0/16", "10.2.3.4"])));
        assert!(ours.covers(&list(&["2001:db8:1::/48"])));
        assert!(ours.covers(&ours));
        assert!(!ours.covers(&list(&["10.0.0.0/7"])));
        assert!(!ours.covers(&list(&["10.1.0.0/16", "192.0.2.1"])));
        assert!(!list(&["192.0.2.0/24"]).covers(&list(&["192.0.2.0/23"])));
    }

    #[test]
    fn forwarded_for_is_read_only_from_a_trusted_peer_and_from_the_right() {
        let proxies = list(&["10.0.0.0/8"]);
        let peer = ip("10.0.0.5");
        let xff = |vals: &[&'static str]| vals.iter().map(|v| v.as_bytes()).collect::<Vec<_>>();
        // No trusted proxies configured, or a peer that is not one: the peer, whatever XFF says.
        assert_eq!(
            forwarded_client(peer, &xff(&["203.0.113.9"]), None),
            Some(peer)
        );
        assert_eq!(
            forwarded_client(ip("198.51.100.1"), &xff(&["203.0.113.9"]), Some(&proxies)),
            Some(ip("198.51.100.1"))
        );
        // A trusted peer: the right-most untrusted entry; a forged entry to its left is ignored.
        assert_eq!(
            forwarded_client(peer, &xff(&["192.0.2.1, 203.0.113.9"]), Some(&proxies)),
            Some(ip("203.0.113.9"))
        );
        assert_eq!(
            forwarded_client(
                peer,
                &xff(&["192.0.2.1", "203.0.113.9, 10.0.0.7"]),
                Some(&proxies)
            ),
            Some(ip("203.0.113.9"))
        );
        assert_eq!(
            forwarded_client(peer, &xff(&["::ffff:203.0.113.9"]), Some(&proxies)),
            Some(ip("203.0.113.9"))
        );
        // Garbage before an untrusted entry: unknown; garbage left of it: ignored.
        assert_eq!(
            forwarded_client(peer, &xff(&["203.0.113.9, nonsense"]), Some(&proxies)),
            None
        );
        assert_eq!(
            forwarded_client(peer, &xff(&["nonsense, 203.0.113.9"]), Some(&proxies)),
            Some(ip("203.0.113.9"))
        );
        // Only proxies (or nothing): the left-most proxy, or the peer.
        assert_eq!(
            forwarded_client(peer, &xff(&["10.0.0.9, 10.0.0.7"]), Some(&proxies)),
            Some(ip("10.0.0.9"))
        );
        assert_eq!(forwarded_client(peer, &[], Some(&proxies)), Some(peer));
    }
}
