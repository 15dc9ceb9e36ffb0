//! Listener and dialer URLs: `scheme://authority/path?key=value&...`.

use std::path::PathBuf;
use std::time::Duration;

use crate::supervisor::RestartPolicy;
use crate::tls::TlsFiles;

/// A URL split into its parts (no percent-decoding but in query values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// `tcp`, `tls`, `ws`, `wss`, `unix`, or a scheme an embedder registered.
    pub scheme: String,
    /// `host:port`, `[v6]:port`, `@abstract-name`, or empty for `unix:///path`.
    pub authority: String,
    /// The path, with its leading `/`, or empty.
    pub path: String,
    /// Query parameters, in order.
    pub query: Vec<(String, String)>,
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .map_err(|_| format!("bad escape in `{s}`"))?;
                out.push(
                    u8::from_str_radix(hex, 16)
                        .map_err(|_| format!("bad escape `%{hex}` in `{s}`"))?,
                );
                i += 3;
            }
            b'%' => return Err(format!("bad escape at the end of `{s}`")),
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("`{s}` is not UTF-8 once decoded"))
}

impl Url {
    /// Parses `url`; the error says what a URL should look like.
    pub fn parse(url: &str) -> Result<Url, String> {
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(format!("`{url}` is not a URL like tcp://127.0.0.1:1883"));
        };
        if scheme.is_empty()
            || !scheme
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'-')
        {
            return Err(format!("`{url}` has a bad scheme"));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, q),
            None => (rest, ""),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let mut params = Vec::new();
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, "true"));
            params.push((percent_decode(k)?, percent_decode(v)?));
        }
        Ok(Url {
            scheme: scheme.to_ascii_lowercase(),
            authority: authority.to_string(),
            path: path.to_string(),
            query: params,
        })
    }

    /// `host:port` validated, for TCP-based schemes.
    pub fn host_port(&self) -> Result<(&str, u16), String> {
        let (host, port) = self.authority.rsplit_once(':').ok_or_else(|| {
            format!(
                "`{}://{}` needs host:port, e.g. {}://0.0.0.0:1883",
                self.scheme, self.authority, self.scheme
            )
        })?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("`{port}` is not a port number"))?;
        if host.is_empty() {
            return Err(format!(
                "`{}://{}` needs a host, e.g. 0.0.0.0",
                self.scheme, self.authority
            ));
        }
        Ok((host, port))
    }

    /// The socket path of a `unix://` URL (`@name` for a Linux abstract socket).
    pub fn unix_path(&self) -> Result<String, String> {
        let p = format!("{}{}", self.authority, self.path);
        if p.is_empty() {
            return Err(
                "unix:// needs a path, e.g. unix:///run/halyard/mqtt.sock or unix://@halyard"
                    .into(),
            );
        }
        Ok(p)
    }
}

/// Everything about one listener. Built from a URL (`--listen`, query parameters for the
/// options) or from a `[[listener]]` table in the configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// The URL, as written: it names the listener in logs, events and the admin API.
    pub url: String,
    /// The parsed URL.
    pub parsed: Url,
    /// Most connections open at once on this listener; 0 = no per-listener limit.
    pub max_connections: usize,
    /// Expect a PROXY protocol v1/v2 header on every connection.
    pub proxy_protocol: bool,
    /// With `proxy_protocol`: the proxies whose headers are believed (empty: any peer).
    /// A TCP connection from elsewhere is closed before its header is read.
    pub trusted_proxies: Vec<Cidr>,
    /// Time allowed for the PROXY/TLS/WebSocket handshakes.
    pub handshake_timeout: Duration,
    /// TLS files (`tls://`, `wss://`).
    pub tls: Option<TlsFiles>,
    /// Use the client certificate's identity (CN, else first SAN) as the user name.
    pub use_identity_as_username: bool,
    /// How often TLS files are checked for changes; zero turns the check off (SIGHUP
    /// still reloads).
    pub tls_reload_interval: Duration,
    /// `ws://`/`wss://`: allowed `Origin` headers (empty: any).
    pub allowed_origins: Vec<String>,
    /// `unix://`: the socket file's mode (e.g. 0o660).
    pub socket_mode: Option<u32>,
    /// Whether clients without credentials are served on this listener; `None` follows
    /// the broker's `allow_anonymous`.
    pub allow_anonymous: Option<bool>,
    /// Listener supervision.
    pub restart: RestartPolicy,
}

/// The option keys a listener accepts (URL query and configuration file alike).
pub const LISTENER_KEYS: &[&str] = &[
    "max_connections",
    "proxy_protocol",
    "trusted_proxies",
    "handshake_timeout",
    "certfile",
    "keyfile",
    "cafile",
    "require_certificate",
    "use_identity_as_username",
    "tls_reload_interval",
    "allowed_origins",
    "socket_mode",
    "allow_anonymous",
];

/// An address range: `10.0.0.0/8`, `2001:db8::/32`, or one address (`127.0.0.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the range (an IPv4-mapped IPv6 address as its IPv4 address).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let (a, b, bits) = match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                (u128::from(u32::from(a)), u128::from(u32::from(b)), 32)
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
            _ => return false,
        };
        let host_bits = bits - u32::from(self.prefix);
        host_bits >= 128 || (a >> host_bits) == (b >> host_bits)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let addr: std::net::IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an address or address/prefix"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(|| format!("`{s}`: the prefix must be 0 to {max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

fn parse_bool(k: &str, v: &str) -> Result<bool, String> {
    match v {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("`{k}` must be true or false, not `{v}`")),
    }
}

impl ListenerConfig {
    /// A listener for `url` with default options, then the URL's query options applied.
    pub fn from_url(url: &str) -> Result<ListenerConfig, String> {
        let parsed = Url::parse(url)?;
        let mut cfg = ListenerConfig {
            url: url.split('?').next().unwrap_or(url).to_string(),
            parsed: parsed.clone(),
            max_connections: 0,
            proxy_protocol: false,
            trusted_proxies: Vec::new(),
            handshake_timeout: Duration::from_secs(10),
            tls: None,
            use_identity_as_username: false,
            tls_reload_interval: Duration::from_secs(10),
            allowed_origins: Vec::new(),
            socket_mode: None,
            allow_anonymous: None,
            restart: RestartPolicy::default(),
        };
        for (k, v) in &parsed.query {
            cfg.set(k, v)?;
        }
        Ok(cfg)
    }

    fn tls_mut(&mut self) -> &mut TlsFiles {
        self.tls.get_or_insert_with(|| TlsFiles {
            certfile: PathBuf::new(),
            keyfile: PathBuf::new(),
            cafile: None,
            require_certificate: false,
        })
    }

    /// Sets option `key` from its text form.
    pub fn set(&mut self, key: &str, v: &str) -> Result<(), String> {
        let num = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("`{key}` must be a whole number, not `{v}`"))
        };
        match key {
            "max_connections" => self.max_connections = num(v)? as usize,
            "proxy_protocol" => self.proxy_protocol = parse_bool(key, v)?,
            "trusted_proxies" => {
                self.trusted_proxies = v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| s.parse().map_err(|e| format!("`{key}`: {e}")))
                    .collect::<Result<_, String>>()?;
            }
            "handshake_timeout" => self.handshake_timeout = Duration::from_secs(num(v)?.max(1)),
            "certfile" => self.tls_mut().certfile = PathBuf::from(v),
            "keyfile" => self.tls_mut().keyfile = PathBuf::from(v),
            "cafile" => self.tls_mut().cafile = Some(PathBuf::from(v)),
            "require_certificate" => self.tls_mut().require_certificate = parse_bool(key, v)?,
            "use_identity_as_username" => self.use_identity_as_username = parse_bool(key, v)?,
            "allow_anonymous" => self.allow_anonymous = Some(parse_bool(key, v)?),
            "tls_reload_interval" => self.tls_reload_interval = Duration::from_secs(num(v)?),
            "allowed_origins" => {
                self.allowed_origins = v
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
            }
            "socket_mode" => {
                let m = u32::from_str_radix(v.trim_start_matches("0o"), 8)
                    .map_err(|_| format!("`socket_mode` must be octal like 0660, not `{v}`"))?;
                if m > 0o777 {
                    return Err(format!("`socket_mode` {v} is not a file mode"));
                }
                self.socket_mode = Some(m);
            }
            other => {
                return Err(format!(
                    "unknown listener option `{other}` (known: {})",
                    LISTENER_KEYS.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// Checks that the options fit the scheme.
    pub fn validate(&self) -> Result<(), String> {
        let s = self.parsed.scheme.as_str();
        let tls_scheme = matches!(s, "tls" | "wss");
        match (&self.tls, tls_scheme) {
            (None, true) => return Err(format!("{s}:// needs `certfile` and `keyfile`")),
            (Some(t), true) => {
                if t.certfile.as_os_str().is_empty() || t.keyfile.as_os_str().is_empty() {
                    return Err(format!("{s}:// needs both `certfile` and `keyfile`"));
                }
                if t.require_certificate && t.cafile.is_none() {
                    return Err("`require_certificate` needs a `cafile`".into());
                }
            }
            (Some(_), false) => {
                return Err(format!(
                    "TLS options given for a {s}:// listener (use tls:// or wss://)"
                ));
            }
            (None, false) => {}
        }
        if !self.trusted_proxies.is_empty() && !self.proxy_protocol {
            return Err("`trusted_proxies` needs `proxy_protocol = true`".into());
        }
        if self.use_identity_as_username
            && !self.tls.as_ref().is_some_and(|t| t.require_certificate)
        {
            return Err(
                "`use_identity_as_username` needs `require_certificate = true` (and a cafile)"
                    .into(),
            );
        }
        if !self.allowed_origins.is_empty() && !matches!(s, "ws" | "wss") {
            return Err(format!(
                "`allowed_origins` applies to ws:// and wss:// only, not {s}://"
            ));
        }
        if self.socket_mode.is_some() && s != "unix" {
            return Err(format!("`socket_mode` applies to unix:// only, not {s}://"));
        }
        match s {
            "tcp" | "tls" | "ws" | "wss" => {
                self.parsed.host_port()?;
            }
            "unix" => {
                self.parsed.unix_path()?;
                if self.proxy_protocol {
                    return Err(
                        "`proxy_protocol` applies to TCP-based listeners, not unix://".into(),
                    );
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The WebSocket path (`/mqtt` when the URL has none).
    pub fn ws_path(&self) -> String {
        if self.parsed.path.is_empty() {
            "/mqtt".into()
        } else {
            self.parsed.path.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_options() {
        let c = ListenerConfig::from_url(
            "tls://0.0.0.0:8883?certfile=/a%20b.pem&keyfile=k.pem&max_connections=5",
        )
        .unwrap();
        assert_eq!(c.url, "tls://0.0.0.0:8883");
        assert_eq!(c.tls.as_ref().unwrap().certfile, PathBuf::from("/a b.pem"));
        assert_eq!(c.max_connections, 5);
        c.validate().unwrap();
        let w =
            ListenerConfig::from_url("ws://[::1]:8080/mqtt?allowed_origins=https://a,https://b")
                .unwrap();
        assert_eq!(w.parsed.host_port().unwrap(), ("[::1]", 8080));
        assert_eq!(w.ws_path(), "/mqtt");
        assert_eq!(w.allowed_origins, vec!["https://a", "https://b"]);
        assert_eq!(
            ListenerConfig::from_url("ws://h:1").unwrap().ws_path(),
            "/mqtt"
        );
        let u = ListenerConfig::from_url("unix:///run/h.sock?socket_mode=0660").unwrap();
        assert_eq!(u.parsed.unix_path().unwrap(), "/run/h.sock");
        assert_eq!(u.socket_mode, Some(0o660));
        assert_eq!(
            ListenerConfig::from_url("unix://@halyard")
                .unwrap()
                .parsed
                .unix_path()
                .unwrap(),
            "@halyard"
        );
    }

    #[test]
    fn bad_listeners_are_named() {
        for (url, want) in [
            ("127.0.0.1:1883", "not a URL"),
            ("tcp://127.0.0.1", "host:port"),
            ("tcp://127.0.0.1:99999", "port"),
            ("tls://0.0.0.0:8883", "certfile"),
            ("tcp://0.0.0.0:1883?certfile=x", "TLS options"),
            (
                "tcp://0.0.0.0:1883?colour=red",
                "unknown listener option `colour`",
            ),
            ("tcp://0.0.0.0:1883?max_connections=many", "whole number"),
            (
                "tls://h:1?certfile=c&keyfile=k&require_certificate=true",
                "cafile",
            ),
            ("tcp://h:1?socket_mode=0660", "unix:// only"),
            ("unix://", "needs a path"),
            ("unix:///x?socket_mode=999", "octal"),
            ("tcp://h:1?allowed_origins=x", "ws:// and wss://"),
            (
                "tcp://h:1?trusted_proxies=10.0.0.0/8",
                "needs `proxy_protocol",
            ),
            (
                "tcp://h:1?proxy_protocol=true&trusted_proxies=10.0.0.0/33",
                "prefix must be 0 to 32",
            ),
            (
                "tcp://h:1?proxy_protocol=true&trusted_proxies=proxy.local",
                "not an address",
            ),
        ] {
            let err = ListenerConfig::from_url(url)
                .and_then(|c| c.validate().map(|_| c))
                .unwrap_err();
            assert!(err.contains(want), "{url}: {err}");
        }
    }

    #[test]
    fn trusted_proxy_ranges() {
        let c = |s: &str| s.parse::<Cidr>().unwrap();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert!(c("10.0.0.0/8").contains(ip("10.200.1.2")));
        assert!(!c("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(c("127.0.0.1").contains(ip("127.0.0.1")));
        assert!(!c("127.0.0.1").contains(ip("127.0.0.2")));
        assert!(c("0.0.0.0/0").contains(ip("203.0.113.7")));
        assert!(
            c("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")),
            "IPv4-mapped"
        );
        assert!(c("2001:db8::/32").contains(ip("2001:db8:1::1")));
        assert!(!c("2001:db8::/32").contains(ip("2001:db9::1")));
        assert!(!c("2001:db8::/32").contains(ip("10.0.0.1")));
        assert!(c("::/0").contains(ip("2001:db9::1")));
    }
}
