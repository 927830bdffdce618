//! Outbound HTTP for destination plugins: only to hosts on the destination's allow-list,
//! never to loopback, private, link-local, CGNAT, IPv4-mapped or NAT64 IPv6, or metadata
//! addresses (unless the operator passes `--allow-private-destinations`). The check is made on
//! the addresses the connection is actually made to — every DNS answer goes through
//! [`FilteringResolver`], so a name that re-binds to a private address fails — redirects are
//! not followed, and response bodies are read up to a cap.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Largest response body a plugin gets (the rest is dropped).
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// Longest any single HTTP request may take, whatever the plugin asks for.
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Connect timeout.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an address may not be reached, or `None` when it may.
pub fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip == Ipv4Addr::new(169, 254, 169, 254) {
        return Some("a cloud metadata address");
    }
    if ip.is_loopback() {
        return Some("a loopback address");
    }
    if ip.is_private() {
        return Some("a private address");
    }
    if ip.is_link_local() {
        return Some("a link-local address");
    }
    if o[0] == 100 && (o[1] & 0xc0) == 64 {
        return Some("a carrier-grade NAT address (100.64.0.0/10)");
    }
    if o[0] == 0 || ip.is_broadcast() || ip.is_multicast() || o[0] >= 240 {
        return Some("a reserved, broadcast or multicast address");
    }
    if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        return Some("an IETF protocol address (192.0.0.0/24)");
    }
    if o[0] == 198 && (o[1] & 0xfe) == 18 {
        return Some("a benchmarking address (198.18.0.0/15)");
    }
    None
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_loopback() || ip.is_unspecified() {
        return Some("a loopback or unspecified address");
    }
    if ip.to_ipv4_mapped().is_some() {
        return Some("an IPv4-mapped IPv6 address");
    }
    if s[0] == 0 && s[1] == 0 && s[2] == 0 && s[3] == 0 && s[4] == 0 && s[5] == 0 {
        return Some("an IPv4-compatible IPv6 address");
    }
    if s[0] == 0x64 && s[1] == 0xff9b {
        return Some("a NAT64 address (64:ff9b::/96, 64:ff9b:1::/48)");
    }
    if (s[0] & 0xfe00) == 0xfc00 {
        return Some("a unique local (private) IPv6 address");
    }
    if (s[0] & 0xffc0) == 0xfe80 || (s[0] & 0xffc0) == 0xfec0 {
        return Some("a link-local or site-local IPv6 address");
    }
    if (s[0] & 0xff00) == 0xff00 {
        return Some("a multicast address");
    }
    if s[0] == 0x2002 || (s[0] == 0x2001 && s[1] == 0) {
        return Some("a 6to4 or Teredo address (it embeds an IPv4 address)");
    }
    None
}

/// Resolves names and keeps only the addresses a destination may reach.
pub struct FilteringResolver {
    pub allow_private: bool,
}

impl reqwest::dns::Resolve for FilteringResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> {
                    format!("cannot resolve {host}: {e}").into()
                })?
                .collect();
            let mut refused = None;
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| match forbidden(a.ip()) {
                    Some(why) if !allow_private => {
                        refused = Some((a.ip(), why));
                        false
                    }
                    _ => true,
                })
                .collect();
            if allowed.is_empty() {
                let msg = match refused {
                    Some((ip, why)) => format!(
                        "{host} resolves to {ip}, {why}; destinations may not reach it (an operator can allow it with --allow-private-destinations)"
                    ),
                    None => format!("{host} has no addresses"),
                };
                return Err(msg.into());
            }
            let iter: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(iter)
        })
    }
}

/// The HTTP client destinations use: no redirects, no proxies, filtered DNS.
pub fn client(allow_private: bool) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .connect_timeout(CONNECT_TIMEOUT)
        .dns_resolver(Arc::new(FilteringResolver { allow_private }))
        .user_agent(concat!("rewind/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("static HTTP client configuration")
}

/// Does `host` match an allow-list entry (`example.com`, or `*.example.com` for its
/// subdomains)? Comparison is ASCII case-insensitive.
pub fn host_allowed(host: &str, allow: &[String]) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let host_ip = host.parse::<IpAddr>().ok();
    allow.iter().any(|entry| {
        let entry = entry.trim_end_matches('.').to_ascii_lowercase();
        // Addresses compare as addresses (`::ffff:127.0.0.1` is `::ffff:7f00:1`).
        let entry_ip = entry
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok();
        if let (Some(a), Some(b)) = (host_ip, entry_ip) {
            return a == b;
        }
        if let Some(suffix) = entry.strip_prefix("*.") {
            host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}"))
        } else {
            host == entry
        }
    })
}

/// Checks a URL against the allow-list and, for literal IPs, the address rules. Names are
/// checked again when they resolve.
pub fn check_url(url: &str, allow: &[String], allow_private: bool) -> Result<reqwest::Url, String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("invalid URL {url:?}: {e}"))?;
    if u.scheme() != "http" && u.scheme() != "https" {
        return Err(format!("{url}: only http and https URLs may be called"));
    }
    let host = u
        .host_str()
        .ok_or_else(|| format!("{url} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if !host_allowed(&host, allow) {
        return Err(format!(
            "{host} is not on this destination's allow-list ({}); add it to `allow_hosts` in the destination's config",
            if allow.is_empty() {
                "empty".to_string()
            } else {
                allow.join(", ")
            }
        ));
    }
    if let Ok(ip) = host.parse::<IpAddr>()
        && let Some(why) = forbidden(ip)
        && !allow_private
    {
        return Err(format!(
            "{ip} is {why}; destinations may not reach it (an operator can allow it with --allow-private-destinations)"
        ));
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_special_addresses_are_refused() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "169.254.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:8.8.8.8",
            "64:ff9b::a9fe:a9fe",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "2002:7f00:1::",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(forbidden(ip).is_some(), "{ip} must be refused");
        }
        for ip in ["8.8.8.8", "100.128.0.1", "2606:4700::1111", "93.184.216.34"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(forbidden(ip).is_none(), "{ip} is public");
        }
    }

    #[test]
    fn allow_lists_match_hosts_and_subdomains() {
        let allow = vec!["api.example.com".to_string(), "*.hooks.io".to_string()];
        assert!(host_allowed("api.example.com", &allow));
        assert!(host_allowed("API.Example.com.", &allow));
        assert!(host_allowed("a.hooks.io", &allow));
        assert!(!host_allowed("hooks.io", &allow));
        assert!(!host_allowed("evilhooks.io", &allow));
        assert!(!host_allowed("example.com", &allow));
        assert!(
            check_url(
                "http://169.254.169.254/latest",
                &["169.254.169.254".into()],
                false
            )
            .unwrap_err()
            .contains("metadata")
        );
        assert!(check_url("http://127.0.0.1:8080/", &["127.0.0.1".into()], true).is_ok());
        assert!(
            check_url("http://[::1]/", &["::1".into()], false)
                .unwrap_err()
                .contains("loopback")
        );
        assert!(
            check_url("http://other.com/", &allow, false)
                .unwrap_err()
                .contains("allow-list")
        );
        assert!(
            check_url("file:///etc/passwd", &allow, false)
                .unwrap_err()
                .contains("http")
        );
    }

    #[tokio::test]
    async fn names_resolving_to_private_addresses_fail_at_connect() {
        let client = client(false);
        let err = client.get("http://localhost:9/").send().await.unwrap_err();
        let text = format!("{err:?}");
        assert!(text.contains("loopback"), "{text}");
    }
}
