//! Which address a request came from, behind trusted proxies.
//!
//! When the peer is a trusted proxy, `X-Forwarded-For` is read from the
//! right: each proxy appends the address it received the request from, so
//! the rightmost address that is not itself a trusted proxy is the client.
//! Entries to the left of it were written by the client and are never taken.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

/// The proxies whose `X-Forwarded-For` is believed.
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies {
    any: bool,
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    /// `*` trusts every peer; otherwise each entry is an address or a network
    /// (`10.0.0.0/8`). An entry that is neither is an error naming it.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let mut trusted = Self::default();
        for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            if entry == "*" {
                trusted.any = true;
            } else if let Ok(net) = entry.parse::<IpNet>() {
                trusted.nets.push(net);
            } else if let Ok(ip) = entry.parse::<IpAddr>() {
                trusted.nets.push(IpNet::from(ip));
            } else {
                return Err(format!(
                    "{entry:?} is not an IP address, a network (10.0.0.0/8) or *"
                ));
            }
        }
        Ok(trusted)
    }

    pub fn is_empty(&self) -> bool {
        !self.any && self.nets.is_empty()
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.any || self.nets.iter().any(|n| n.contains(&ip))
    }

    /// The client of a request from `peer`: the peer itself unless it is a
    /// trusted proxy that says otherwise. A forwarded client has port 0.
    pub fn client(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Option<SocketAddr> {
        let proxy = peer?;
        if self.is_empty() || !self.trusts(proxy.ip()) {
            return peer;
        }
        let mut chain: Vec<&str> = Vec::new();
        for value in headers.get_all("x-forwarded-for") {
            let Ok(text) = value.to_str() else {
                return peer;
            };
            chain.extend(text.split(',').map(str::trim));
        }
        let mut client = None;
        for entry in chain.iter().rev() {
            let Some(ip) = parse_entry(entry) else {
                // Garbage where an address should be: nothing left of it can
                // be believed, and what is right of it was all proxies.
                break;
            };
            client = Some(ip);
            if !self.trusts(ip) {
                break;
            }
        }
        client.map(|ip| SocketAddr::new(ip, 0)).or(peer)
    }
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`
/// or `[2001:db8::1]:5678`.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    entry.parse::<SocketAddr>().ok().map(|a| canonical(a.ip()))
}

/// An IPv4 address mapped into IPv6 (a dual-stack socket's peer) as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(entries: &[&str]) -> TrustedProxies {
        let entries: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
        TrustedProxies::parse(&entries).unwrap()
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append("x-forwarded-for", v.parse().unwrap());
        }
        map
    }

    fn peer(text: &str) -> Option<SocketAddr> {
        Some(text.parse().unwrap())
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_says() {
        let proxies = trusted(&["10.0.0.1"]);
        let h = headers(&["203.0.113.7"]);
        assert_eq!(
            proxies.client(peer("198.51.100.2:4000"), &h),
            peer("198.51.100.2:4000")
        );
        assert_eq!(
            TrustedProxies::default().client(peer("10.0.0.1:1"), &h),
            peer("10.0.0.1:1")
        );
    }

    #[test]
    fn the_rightmost_untrusted_address_is_the_client() {
        let proxies = trusted(&["10.0.0.0/8"]);
        // The client forged the first entry; the proxies appended the rest.
        let h = headers(&["6.6.6.6, 203.0.113.7", "10.1.2.3"]);
        assert_eq!(
            proxies.client(peer("10.0.0.1:80"), &h),
            peer("203.0.113.7:0")
        );
        // Trusting every peer believes the whole chain: its first entry.
        let everyone = trusted(&["*"]);
        assert_eq!(everyone.client(peer("10.0.0.1:80"), &h), peer("6.6.6.6:0"));
    }

    #[test]
    fn ports_ipv6_and_mapped_addresses_are_read() {
        let proxies = trusted(&["127.0.0.1", "::1"]);
        let h = headers(&["[2001:db8::5]:1234"]);
        assert_eq!(
            proxies.client(peer("[::ffff:127.0.0.1]:9"), &h),
            peer("[2001:db8::5]:0")
        );
        let h = headers(&["192.0.2.1:5555"]);
        assert_eq!(proxies.client(peer("[::1]:9"), &h), peer("192.0.2.1:0"));
    }

    #[test]
    fn all_trusted_takes_the_leftmost_and_garbage_stops_the_walk() {
        let proxies = trusted(&["10.0.0.0/8"]);
        let h = headers(&["10.0.0.9, 10.0.0.8"]);
        assert_eq!(proxies.client(peer("10.0.0.1:1"), &h), peer("10.0.0.9:0"));
        let h = headers(&["unknown, 10.0.0.8"]);
        assert_eq!(proxies.client(peer("10.0.0.1:1"), &h), peer("10.0.0.8:0"));
        let h = headers(&["nonsense"]);
        assert_eq!(proxies.client(peer("10.0.0.1:1"), &h), peer("10.0.0.1:1"));
        assert_eq!(
            proxies.client(peer("10.0.0.1:1"), &HeaderMap::new()),
            peer("10.0.0.1:1")
        );
    }

    #[test]
    fn bad_entries_are_named() {
        let err = TrustedProxies::parse(&["10.0.0.1".into(), "proxy.local".into()]).unwrap_err();
        assert!(err.contains("\"proxy.local\""), "{err}");
        assert!(TrustedProxies::parse(&[" ".into()]).unwrap().is_empty());
    }
}
