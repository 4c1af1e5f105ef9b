//! Who is asking, for query-attack detection: the API key when keys are configured
//! (only its keyed digest leaves this file), else the peer's address, or, when the
//! peer is a trusted proxy (`attack_detection.trusted_proxies`), the client address it
//! put in `X-Forwarded-For`.
//!
//! `X-Forwarded-For` is read from the right: each proxy appends the address it got
//! the request from, so the right-most entries were written by our own proxies and
//! everything left of the first untrusted one was written by the client, who can put
//! anything there. The client is therefore the right-most address that is not a
//! trusted proxy (the left-most untrusted hop in the chain of trust). Taking the
//! left-most entry instead would let an attacker pick a new identity per query.

use std::net::{IpAddr, SocketAddr};

use axum::http::{HeaderMap, header};

use super::auth::bearer_token;
use crate::config::Network;
use crate::detect::{ClientId, Detector};

/// The client's id for `detector`.
pub fn client_id(
    detector: &Detector,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
    keys_required: bool,
    trusted: &[Network],
) -> ClientId {
    if keys_required {
        let token = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer_token);
        if let Some(token) = token {
            return detector.client_id("key", token.as_bytes());
        }
    }
    match peer.map(|p| client_address(p.ip(), headers, trusted)) {
        Some(address) => detector.client_id("addr", address.to_string().as_bytes()),
        // Only a server started without connection info (none here) has no peer.
        None => detector.client_id("addr", b"unknown"),
    }
}

/// The address the client connected from, seen through trusted proxies.
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[Network]) -> IpAddr {
    let is_trusted = |address: IpAddr| trusted.iter().any(|n| n.contains(address));
    if !is_trusted(peer) {
        return peer;
    }
    let mut client = peer;
    // Several X-Forwarded-For headers count as one list, in order.
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for hop in hops.iter().rev() {
        // An entry that is not an address stops the walk at the last hop we trust.
        let Some(address) = parse_hop(hop) else { break };
        client = address;
        if !is_trusted(address) {
            break;
        }
    }
    client
}

/// `203.0.113.7`, `2001:db8::1`, `[2001:db8::1]:443` or `203.0.113.7:51234`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>().ok().or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in xff {
            headers.append("x-forwarded-for", HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn forwarded_addresses_count_only_behind_trusted_proxies() {
        let trusted = [Network::parse("10.0.0.0/8").unwrap()];
        // A direct client's header is its own invention.
        assert_eq!(client_address(ip("198.51.100.9"), &headers(&["1.2.3.4"]), &trusted), ip("198.51.100.9"));
        // Through nginx (10.0.0.5): the address nginx appended.
        assert_eq!(client_address(ip("10.0.0.5"), &headers(&["203.0.113.7"]), &trusted), ip("203.0.113.7"));
        // A spoofed entry on the left is ignored: the right-most untrusted one wins.
        let spoofed = headers(&["1.2.3.4, 203.0.113.7, 10.0.0.9"]);
        assert_eq!(client_address(ip("10.0.0.5"), &spoofed, &trusted), ip("203.0.113.7"));
        assert_eq!(client_address(ip("10.0.0.5"), &headers(&["1.2.3.4", "203.0.113.7"]), &trusted), ip("203.0.113.7"));
        // No header, or garbage where the client should be: the last trusted hop.
        assert_eq!(client_address(ip("10.0.0.5"), &HeaderMap::new(), &trusted), ip("10.0.0.5"));
        assert_eq!(client_address(ip("10.0.0.5"), &headers(&["nonsense, 10.0.0.7"]), &trusted), ip("10.0.0.7"));
        assert_eq!(client_address(ip("10.0.0.5"), &headers(&["[2001:db8::1]:443"]), &trusted), ip("2001:db8::1"));
    }
}
