//! The configuration file: TOML, every key optional, defaults in `default.toml` (which is
//! also what `--print-default-config` prints, and a test keeps the two in step).

use std::path::Path;
use std::time::Duration;

use halyard_broker::BrokerConfig;
use halyard_codec::QoS;
use halyard_transport::ListenerConfig;
use serde::Deserialize;

/// The documented default configuration.
pub(crate) const DEFAULT_TOML: &str = include_str!("default.toml");

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Config {
    #[serde(deserialize_with = "one_or_many")]
    pub(crate) listen: Vec<String>,
    pub(crate) data_dir: String,
    pub(crate) log_level: String,
    pub(crate) log_format: String,
    pub(crate) sys_interval: u64,
    pub(crate) max_keepalive: u16,
    pub(crate) connect_timeout: u64,
    pub(crate) max_inflight_messages: u16,
    pub(crate) max_queued_messages: usize,
    pub(crate) max_queued_bytes: usize,
    pub(crate) queue_qos0_messages: bool,
    pub(crate) message_size_limit: u32,
    pub(crate) max_connections: usize,
    pub(crate) retain_available: bool,
    pub(crate) max_qos: u8,
    pub(crate) allow_anonymous: Option<bool>,
    pub(crate) password_file: Option<String>,
    pub(crate) acl_file: Option<String>,
    pub(crate) subscribe_denied: String,
    pub(crate) topic_alias_maximum: u16,
    pub(crate) topic_alias_maximum_outbound: u16,
    pub(crate) persistent_client_expiration: u64,
    pub(crate) max_session_expiry_interval: u32,
    pub(crate) shared_subscriptions: bool,
    pub(crate) shutdown_timeout: u64,
    pub(crate) max_connections_per_ip: usize,
    pub(crate) connection_rate_per_ip: u32,
    pub(crate) max_client_id_length: usize,
    pub(crate) max_subscriptions_per_client: usize,
    pub(crate) max_topic_levels: usize,
    pub(crate) max_topic_length: usize,
    pub(crate) publish_rate_messages: u32,
    pub(crate) publish_rate_bytes: u64,
    pub(crate) max_retained_messages: usize,
    pub(crate) max_retained_bytes: usize,
    pub(crate) max_memory_bytes: usize,
    pub(crate) max_user_properties: usize,
    pub(crate) max_user_properties_bytes: usize,
    pub(crate) max_sessions: usize,
    pub(crate) max_sessions_per_user: u32,
    pub(crate) persistence: Persistence,
    pub(crate) admin: Admin,
    /// `[[listener]]` tables: listeners with options.
    pub(crate) listener: Vec<ListenerTable>,
    /// This broker's name among bridged (and clustered) brokers; empty: a random one kept
    /// in the data directory (`node-id`).
    pub(crate) node_id: String,
    /// `[[bridge]]` tables.
    pub(crate) bridge: Vec<halyard_bridge::BridgeConfig>,
}

/// One `[[listener]]` table: a URL and the options of [`halyard_transport::ListenerConfig`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListenerTable {
    url: String,
    max_connections: Option<u64>,
    proxy_protocol: Option<bool>,
    trusted_proxies: Option<Vec<String>>,
    handshake_timeout: Option<u64>,
    certfile: Option<String>,
    keyfile: Option<String>,
    cafile: Option<String>,
    require_certificate: Option<bool>,
    use_identity_as_username: Option<bool>,
    tls_reload_interval: Option<u64>,
    allowed_origins: Option<Vec<String>>,
    socket_mode: Option<String>,
    allow_anonymous: Option<bool>,
}

impl ListenerTable {
    fn build(&self, handshake_timeout: u64) -> Result<ListenerConfig, String> {
        let mut c = ListenerConfig::from_url(&self.url)?;
        c.set("handshake_timeout", &handshake_timeout.to_string())?;
        let s = |v: &Option<String>| v.clone();
        let n = |v: Option<u64>| v.map(|x| x.to_string());
        let b = |v: Option<bool>| v.map(|x| x.to_string());
        for (k, v) in [
            ("max_connections", n(self.max_connections)),
            ("proxy_protocol", b(self.proxy_protocol)),
            (
                "trusted_proxies",
                self.trusted_proxies.as_ref().map(|o| o.join(",")),
            ),
            ("handshake_timeout", n(self.handshake_timeout)),
            ("certfile", s(&self.certfile)),
            ("keyfile", s(&self.keyfile)),
            ("cafile", s(&self.cafile)),
            ("require_certificate", b(self.require_certificate)),
            ("use_identity_as_username", b(self.use_identity_as_username)),
            ("tls_reload_interval", n(self.tls_reload_interval)),
            (
                "allowed_origins",
                self.allowed_origins.as_ref().map(|o| o.join(",")),
            ),
            ("socket_mode", s(&self.socket_mode)),
            ("allow_anonymous", b(self.allow_anonymous)),
        ] {
            if let Some(v) = v {
                c.set(k, &v)?;
            }
        }
        known_scheme(&c)?;
        c.validate()?;
        Ok(c)
    }
}

/// A string or a list of strings (`listen = "tcp://..."` as well as `listen = [...]`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d) {
        Ok(OneOrMany::One(s)) => vec![s],
        Ok(OneOrMany::Many(v)) => v,
        Err(_) => {
            return Err(serde::de::Error::custom("expected a URL or a list of URLs"));
        }
    })
}

/// The 1-based line of `key` in the `n`-th `[[bridge]]` table of `text` (that table's
/// header line when the key is not written there).
fn bridge_key_line(text: &str, n: usize, key: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.trim() == "[[bridge]]")
        .nth(n)?
        .0;
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.trim_start().starts_with('['))
        .map_or(lines.len(), |p| start + 1 + p);
    let at = lines[start + 1..end]
        .iter()
        .position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|r| r.trim_start().starts_with('='))
        })
        .map_or(start, |p| start + 1 + p);
    Some(at + 1)
}

/// The binary serves the built-in schemes of the transport registry.
fn known_scheme(c: &ListenerConfig) -> Result<(), String> {
    halyard_transport::Registry::default()
        .get(&c.parsed.scheme)
        .map(|_| ())
}

/// The `[admin]` table: the HTTP listener for metrics, the REST API and the dashboard.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Admin {
    pub(crate) enabled: bool,
    pub(crate) listen: String,
    pub(crate) api_keys_file: String,
    pub(crate) metrics_auth: bool,
    /// Host names the admin listener answers to, besides IP addresses and `localhost`.
    pub(crate) hosts: Vec<String>,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            enabled: true,
            listen: "http://127.0.0.1:18083".into(),
            api_keys_file: String::new(),
            metrics_auth: false,
            hosts: Vec::new(),
        }
    }
}

impl Config {
    /// The API keys file: `admin.api_keys_file`, or `api_keys` in the data directory.
    pub(crate) fn api_keys_path(&self) -> std::path::PathBuf {
        if self.admin.api_keys_file.is_empty() {
            Path::new(&self.data_dir).join("api_keys")
        } else {
            self.admin.api_keys_file.clone().into()
        }
    }

    /// The admin listener's socket address, from `admin.listen` (`http://host:port`).
    pub(crate) fn admin_addr(&self) -> Result<std::net::SocketAddr, String> {
        let rest = self
            .admin
            .listen
            .strip_prefix("http://")
            .ok_or("must start with http:// (serve it behind a TLS proxy for https)")?;
        let hostport = rest.trim_end_matches('/');
        use std::net::ToSocketAddrs;
        hostport
            .to_socket_addrs()
            .map_err(|e| format!("`{hostport}`: {e}"))?
            .next()
            .ok_or_else(|| format!("`{hostport}`: no address"))
    }
}

/// The `[persistence]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Persistence {
    pub(crate) sync: String,
    pub(crate) interval_ms: u64,
    pub(crate) compact_min_bytes: u64,
}

impl Default for Persistence {
    fn default() -> Self {
        Persistence {
            sync: "batch".into(),
            interval_ms: 1000,
            compact_min_bytes: 64 * 1024 * 1024,
        }
    }
}

impl Persistence {
    /// The store's sync mode; `None` for "off".
    pub(crate) fn mode(&self) -> Option<halyard_store::SyncMode> {
        use halyard_store::SyncMode;
        match self.sync.as_str() {
            "always" => Some(SyncMode::Always),
            "interval" => Some(SyncMode::Interval(Duration::from_millis(
                self.interval_ms.max(1),
            ))),
            "off" => None,
            _ => Some(SyncMode::Batch),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        let b = BrokerConfig::default();
        Config {
            listen: vec!["tcp://127.0.0.1:1883".into()],
            data_dir: "./halyard-data".into(),
            log_level: "info".into(),
            log_format: "text".into(),
            sys_interval: 10,
            max_keepalive: b.max_keepalive,
            connect_timeout: b.connect_timeout.as_secs(),
            max_inflight_messages: b.max_inflight_messages,
            max_queued_messages: b.max_queued_messages,
            max_queued_bytes: b.max_queued_bytes,
            queue_qos0_messages: b.queue_qos0_messages,
            message_size_limit: b.message_size_limit,
            max_connections: b.max_connections,
            retain_available: b.retain_available,
            max_qos: b.max_qos as u8,
            allow_anonymous: None,
            password_file: None,
            acl_file: None,
            subscribe_denied: "not_authorized".into(),
            topic_alias_maximum: b.topic_alias_maximum,
            topic_alias_maximum_outbound: b.topic_alias_maximum_outbound,
            persistent_client_expiration: b.persistent_client_expiration.map_or(0, |d| d.as_secs()),
            max_session_expiry_interval: b.max_session_expiry_interval,
            shared_subscriptions: b.shared_subscriptions,
            shutdown_timeout: b.shutdown_timeout.as_secs(),
            max_connections_per_ip: 0,
            connection_rate_per_ip: 0,
            max_client_id_length: b.max_client_id_length,
            max_subscriptions_per_client: b.max_subscriptions_per_client,
            max_topic_levels: b.max_topic_levels,
            max_topic_length: b.max_topic_length,
            publish_rate_messages: b.publish_rate_messages,
            publish_rate_bytes: b.publish_rate_bytes,
            max_retained_messages: b.max_retained_messages,
            max_retained_bytes: b.max_retained_bytes,
            max_memory_bytes: b.max_memory_bytes,
            max_user_properties: b.max_user_properties,
            max_sessions: b.max_sessions,
            max_sessions_per_user: b.max_sessions_per_user,
            max_user_properties_bytes: b.max_user_properties_bytes,
            persistence: Persistence::default(),
            admin: Admin::default(),
            listener: Vec::new(),
            node_id: String::new(),
            bridge: Vec::new(),
        }
    }
}

/// A configuration error, already worded for the operator: file, line and key.
#[derive(Debug)]
pub(crate) struct ConfigError(pub(crate) String);

impl Config {
    /// Parses `text`; `origin` names the file in errors.
    pub(crate) fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text[..s.start].bytes().filter(|&b| b == b'\n').count() + 1);
            let key = e.span().and_then(|s| key_at(text, s.start));
            let mut msg = origin.to_string();
            if let Some(l) = line {
                msg.push_str(&format!(":{l}"));
            }
            if let Some(k) = key {
                msg.push_str(&format!(": key `{k}`"));
            }
            msg.push_str(&format!(": {}", e.message()));
            ConfigError(msg)
        })?;
        cfg.validate(origin, text)?;
        Ok(cfg)
    }

    /// Reads and parses a file.
    pub(crate) fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read: {e}", path.display())))?;
        Config::parse(&text, &path.display().to_string())
    }

    fn validate(&self, origin: &str, text: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| {
            let line = text
                .lines()
                .position(|l| l.trim_start().starts_with(key))
                .map_or(String::new(), |i| format!(":{}", i + 1));
            Err(ConfigError(format!("{origin}{line}: key `{key}`: {why}")))
        };
        if self.max_qos > 2 {
            return bad("max_qos", "must be 0, 1 or 2");
        }
        if self.max_inflight_messages == 0 {
            return bad("max_inflight_messages", "must be at least 1");
        }
        if self.message_size_limit < 64 {
            return bad("message_size_limit", "must be at least 64 bytes");
        }
        if self.max_connections == 0 {
            return bad("max_connections", "must be at least 1");
        }
        if self.listen.is_empty() && self.listener.is_empty() {
            return bad("listen", "needs at least one URL (or a [[listener]] table)");
        }
        for url in &self.listen {
            if let Err(why) = listener_from_url(url, self.connect_timeout) {
                return bad("listen", &why);
            }
        }
        for t in &self.listener {
            if let Err(why) = t.build(self.connect_timeout) {
                // Point at the table's `url = "..."` line.
                let line = text
                    .lines()
                    .position(|l| {
                        l.contains(&format!("\"{}\"", t.url)) && l.trim_start().starts_with("url")
                    })
                    .map_or(String::new(), |i| format!(":{}", i + 1));
                return Err(ConfigError(format!(
                    "{origin}{line}: [[listener]] `{}`: {why}",
                    t.url
                )));
            }
        }
        if !["not_authorized", "unspecified_error"].contains(&self.subscribe_denied.as_str()) {
            return bad(
                "subscribe_denied",
                "must be not_authorized or unspecified_error",
            );
        }
        if !["always", "batch", "interval", "off"].contains(&self.persistence.sync.as_str()) {
            return bad("sync", "must be always, batch, interval or off");
        }
        if !["text", "json"].contains(&self.log_format.as_str()) {
            return bad("log_format", "must be text or json");
        }
        if self.admin.enabled
            && let Err(why) = self.admin_addr()
        {
            return bad("listen", &format!("[admin] {why}"));
        }
        if !["error", "warn", "info", "debug", "trace"].contains(&self.log_level.as_str()) {
            return bad("log_level", "must be error, warn, info, debug or trace");
        }
        if self.node_id.contains(['/', '+', '#']) || self.node_id.chars().any(char::is_whitespace) {
            return bad("node_id", "must not contain `/`, `+`, `#` or spaces");
        }
        let mut names = std::collections::HashSet::new();
        for (i, b) in self.bridge.iter().enumerate() {
            let why = match b.validate() {
                Err(why) => why,
                Ok(_) if !names.insert(b.name.as_str()) => format!("name `{}`: used twice", b.name),
                Ok(_) => continue,
            };
            // The key is the message's first word; its line within the i-th table.
            let key: String = why
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let line = bridge_key_line(text, i, &key).map_or(String::new(), |l| format!(":{l}"));
            return Err(ConfigError(format!(
                "{origin}{line}: [[bridge]] `{}`: key `{key}`: {why}",
                b.name
            )));
        }
        Ok(())
    }

    /// The `[[bridge]]` tables, validated.
    pub(crate) fn bridges(&self) -> Result<Vec<halyard_bridge::Bridge>, String> {
        self.bridge
            .iter()
            .map(|b| {
                b.validate()
                    .map_err(|e| format!("[[bridge]] `{}`: {e}", b.name))
            })
            .collect()
    }

    /// Every listener: the `listen` URLs, then the `[[listener]]` tables.
    pub(crate) fn listeners(&self) -> Result<Vec<ListenerConfig>, String> {
        let mut v = Vec::new();
        for url in &self.listen {
            v.push(listener_from_url(url, self.connect_timeout)?);
        }
        for t in &self.listener {
            v.push(
                t.build(self.connect_timeout)
                    .map_err(|e| format!("{}: {e}", t.url))?,
            );
        }
        Ok(v)
    }

    /// Authentication as configured: the password file is read now, so a broken one is
    /// reported with its file and line (at start-up and on reload alike).
    pub(crate) fn security(&self) -> Result<halyard_broker::auth::Security, String> {
        use halyard_broker::auth::{Anonymous, Authenticator, Security};
        use std::sync::Arc;
        let passwords = match &self.password_file {
            Some(p) => Some(Arc::new(halyard_auth::PasswordFile::load(Path::new(p))?)),
            None => None,
        };
        let authenticator = passwords.clone().map(|p| p as Arc<dyn Authenticator>);
        // SCRAM over the same file, for users whose entries are SCRAM verifiers.
        let enhanced = passwords.map_or_else(Vec::new, |p| {
            [
                halyard_auth::ScramHash::Sha256,
                halyard_auth::ScramHash::Sha512,
            ]
            .into_iter()
            .map(|h| {
                Arc::new(halyard_auth::ScramAuth::new(h, p.clone()))
                    as Arc<dyn halyard_broker::auth::EnhancedAuth>
            })
            .collect()
        });
        let authorizer = match &self.acl_file {
            Some(p) => Some(
                std::sync::Arc::new(halyard_auth::AclFile::load(Path::new(p))?)
                    as std::sync::Arc<dyn halyard_broker::auth::Authorizer>,
            ),
            None => None,
        };
        let anonymous = match (self.allow_anonymous, authenticator.is_some()) {
            (Some(true), _) => Anonymous::Allow,
            (Some(false), _) | (None, true) => Anonymous::Deny,
            (None, false) => Anonymous::LoopbackOnly,
        };
        Ok(Security {
            authenticator,
            authorizer,
            enhanced,
            anonymous,
            subscribe_denied_not_authorized: self.subscribe_denied != "unspecified_error",
        })
    }

    /// `node_id`, or the random one kept in the data directory (made on first use).
    pub(crate) fn node_id(&self) -> String {
        if !self.node_id.is_empty() {
            return self.node_id.clone();
        }
        let path = Path::new(&self.data_dir).join("node-id");
        if let Ok(s) = std::fs::read_to_string(&path)
            && !s.trim().is_empty()
        {
            return s.trim().to_string();
        }
        let id = format!("halyard-{:016x}", halyard_client::random_seed());
        if let Err(e) = std::fs::write(&path, &id) {
            tracing::warn!(path = %path.display(), error = %e, "cannot keep the node id; a restart will pick another");
        }
        id
    }

    pub(crate) fn broker(&self) -> BrokerConfig {
        BrokerConfig {
            // Resolved at start (`node_id()`), kept across reloads by the server.
            node_id: (!self.node_id.is_empty()).then(|| self.node_id.clone()),
            max_keepalive: self.max_keepalive,
            connect_timeout: Duration::from_secs(self.connect_timeout),
            max_inflight_messages: self.max_inflight_messages,
            max_queued_messages: self.max_queued_messages,
            max_queued_bytes: self.max_queued_bytes,
            queue_qos0_messages: self.queue_qos0_messages,
            message_size_limit: self.message_size_limit,
            max_connections: self.max_connections,
            retain_available: self.retain_available,
            max_qos: QoS::from_u8(self.max_qos).unwrap_or(QoS::ExactlyOnce),
            allow_anonymous: self.allow_anonymous.unwrap_or(true),
            topic_alias_maximum: self.topic_alias_maximum,
            topic_alias_maximum_outbound: self.topic_alias_maximum_outbound,
            persistent_client_expiration: (self.persistent_client_expiration > 0)
                .then(|| Duration::from_secs(self.persistent_client_expiration)),
            max_session_expiry_interval: self.max_session_expiry_interval,
            shared_subscriptions: self.shared_subscriptions,
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout),
            max_client_id_length: self.max_client_id_length,
            max_subscriptions_per_client: self.max_subscriptions_per_client,
            max_topic_levels: self.max_topic_levels,
            max_topic_length: self.max_topic_length,
            publish_rate_messages: self.publish_rate_messages,
            publish_rate_bytes: self.publish_rate_bytes,
            max_retained_messages: self.max_retained_messages,
            max_retained_bytes: self.max_retained_bytes,
            max_memory_bytes: self.max_memory_bytes,
            max_user_properties: self.max_user_properties,
            max_sessions: self.max_sessions,
            max_sessions_per_user: self.max_sessions_per_user,
            max_user_properties_bytes: self.max_user_properties_bytes,
        }
    }
}

/// A listener from a URL (options as query parameters); handshakes get the CONNECT timeout
/// unless the URL says otherwise.
pub(crate) fn listener_from_url(url: &str, connect_timeout: u64) -> Result<ListenerConfig, String> {
    let mut c = ListenerConfig::from_url(url)?;
    if !c.parsed.query.iter().any(|(k, _)| k == "handshake_timeout") {
        c.set("handshake_timeout", &connect_timeout.to_string())?;
    }
    known_scheme(&c)?;
    c.validate()?;
    Ok(c)
}

/// The key on the line containing byte offset `at`, if that line is `key = ...`.
fn key_at(text: &str, at: usize) -> Option<String> {
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    (!key.is_empty() && !key.starts_with('#')).then(|| key.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configuration shipped in the Docker image loads.
    #[test]
    fn docker_config_parses() {
        let c = Config::parse(
            include_str!("../../contrib/halyard-docker.toml"),
            "halyard-docker.toml",
        )
        .unwrap();
        assert_eq!(c.admin_addr().unwrap().port(), 18083);
        assert_eq!(c.log_format, "json");
    }

    #[test]
    fn listen_is_a_url_or_a_list() {
        let one = Config::parse("listen = \"tcp://127.0.0.1:1884\"\n", "t.toml").unwrap();
        assert_eq!(one.listen, ["tcp://127.0.0.1:1884"]);
        let many = Config::parse(
            "listen = [\"tcp://127.0.0.1:1884\", \"ws://127.0.0.1:8080/mqtt\"]\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(many.listen.len(), 2);
        let e = Config::parse("listen = 1883\n", "t.toml").unwrap_err();
        assert!(
            e.0.contains("t.toml:1") && e.0.contains("listen"),
            "{}",
            e.0
        );
    }

    #[test]
    fn default_file_matches_built_in_defaults() {
        assert_eq!(
            Config::parse(DEFAULT_TOML, "default.toml").unwrap(),
            Config::default()
        );
        assert_eq!(Config::default().broker(), BrokerConfig::default());
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let e = Config::parse("max_qos = 1\nmax_keepalive = \"x\"\n", "/etc/h.toml").unwrap_err();
        assert!(
            e.0.starts_with("/etc/h.toml:2: key `max_keepalive`"),
            "{}",
            e.0
        );
        let e = Config::parse("\n\nmax_qos = 3\n", "h.toml").unwrap_err();
        assert_eq!(e.0, "h.toml:3: key `max_qos`: must be 0, 1 or 2");
        let e = Config::parse("retian_available = true\n", "h.toml").unwrap_err();
        assert!(
            e.0.starts_with("h.toml:1: key `retian_available`: unknown field"),
            "{}",
            e.0
        );
        let e = Config::parse("listen = [\"udp://x:1\"]\n", "h.toml").unwrap_err();
        assert!(e.0.contains("key `listen`"), "{}", e.0);
        let e = Config::parse(
            "listen = []\n\n[[listener]]\nurl = \"tls://0.0.0.0:8883\"\ncertfile = \"c.pem\"\n",
            "h.toml",
        )
        .unwrap_err();
        assert_eq!(
            e.0,
            "h.toml:4: [[listener]] `tls://0.0.0.0:8883`: tls:// needs both `certfile` and `keyfile`"
        );
        let e =
            Config::parse("[[listener]]\nurl = \"ws://h:1\"\nport = 3\n", "h.toml").unwrap_err();
        assert!(
            e.0.starts_with("h.toml:3: key `port`: unknown field"),
            "{}",
            e.0
        );
        let e = Config::parse("[persistence]\nsync = \"sometimes\"\n", "h.toml").unwrap_err();
        assert_eq!(
            e.0,
            "h.toml:2: key `sync`: must be always, batch, interval or off"
        );
    }
}
