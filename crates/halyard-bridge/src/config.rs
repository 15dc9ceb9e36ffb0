//! One `[[bridge]]` table: its keys (Mosquitto's names where Mosquitto has one), the
//! defaults, and the validation that turns it into a [`Bridge`] the link runs.

use std::time::Duration;

use halyard_broker::QueuePolicy;
use halyard_codec::{ProtocolVersion, QoS, TopicFilter};
use serde::{Deserialize, Serialize};

/// A `[[bridge]]` table as written (TOML in the config file, JSON in the admin API).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// Unique name (Mosquitto: `connection <name>`); the local session is `$bridge/<name>`.
    pub name: String,
    /// Remote broker URLs (any registered scheme), tried in order.
    pub address: Vec<String>,
    /// Mosquitto topic lines: `pattern [in|out|both [qos [local-prefix remote-prefix]]]`.
    pub topic: Vec<String>,
    /// `mqttv50` or `mqttv311`; unset: 5.0, falling back to 3.1.1 when the remote refuses
    /// 5.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<String>,
    /// Client id at the remote; default `<hostname>.<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_clientid: Option<String>,
    /// User name at the remote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_username: Option<String>,
    /// Password at the remote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_password: Option<String>,
    /// CA certificates (PEM) for `tls://` and `wss://` remotes; a self-signed server
    /// certificate may be given here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cafile: Option<String>,
    /// Client certificate chain (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certfile: Option<String>,
    /// Its key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyfile: Option<String>,
    /// Skip the host name check of the remote's certificate (the chain is still verified).
    #[serde(default)]
    pub insecure: bool,
    /// Start a clean session at the remote on every connect (Mosquitto's default: false).
    #[serde(default)]
    pub cleansession: bool,
    /// Session Expiry Interval asked of a 5.0 remote, seconds (default one day).
    #[serde(default = "defaults::session_expiry_interval")]
    pub session_expiry_interval: u32,
    /// Keep alive with the remote, seconds.
    #[serde(default = "defaults::keepalive_interval")]
    pub keepalive_interval: u16,
    /// Reconnect backoff: `[base, cap]` seconds, full jitter; reset once a link has
    /// stayed up for `cap` seconds.
    #[serde(default = "defaults::restart_timeout")]
    pub restart_timeout: Vec<u64>,
    /// Publish the link state, `1` or `0`, retained, on `notification_topic` (locally and
    /// at the remote, with a will there).
    #[serde(default = "defaults::yes")]
    pub notifications: bool,
    /// Default `$SYS/broker/connection/<remote_clientid>/state`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification_topic: Option<String>,
    /// Most messages the bridge's queue holds (on disk with the broker's log).
    #[serde(default = "defaults::queue_max_messages")]
    pub queue_max_messages: usize,
    /// Most bytes it holds (0: no byte limit).
    #[serde(default = "defaults::queue_max_bytes")]
    pub queue_max_bytes: usize,
    /// `drop_oldest`, `drop_new` or `block`.
    #[serde(default = "defaults::queue_policy")]
    pub queue_policy: String,
    /// Messages in flight each way at once (bounded by the remote's Receive Maximum too;
    /// a 3.1.1 remote has none to tell, so this is its limit: default 20, Mosquitto's).
    #[serde(default = "defaults::receive_maximum")]
    pub receive_maximum: u16,
    /// Forward the RETAIN flag of outgoing messages (Mosquitto: `bridge_outgoing_retain`).
    #[serde(default = "defaults::yes")]
    pub outgoing_retain: bool,
    /// 3.1.1 remotes: set Mosquitto's bridge bit in CONNECT so the remote does not send
    /// our own messages back (Mosquitto: `try_private`).
    #[serde(default = "defaults::yes")]
    pub try_private: bool,
    /// Paused: no connection to the remote; the queue keeps filling.
    #[serde(default)]
    pub paused: bool,
}

mod defaults {
    pub(super) fn session_expiry_interval() -> u32 {
        86_400
    }
    pub(super) fn keepalive_interval() -> u16 {
        60
    }
    pub(super) fn restart_timeout() -> Vec<u64> {
        vec![5, 30]
    }
    pub(super) fn yes() -> bool {
        true
    }
    pub(super) fn queue_max_messages() -> usize {
        100_000
    }
    pub(super) fn queue_max_bytes() -> usize {
        256 * 1024 * 1024
    }
    pub(super) fn queue_policy() -> String {
        "drop_oldest".into()
    }
    /// Mosquitto's `max_inflight_messages`: a 3.1.1 remote cannot say its limit, and
    /// Mosquitto drops a 3.1.1 client that has more QoS 2 messages unreleased.
    pub(super) fn receive_maximum() -> u16 {
        20
    }
}

/// Which way a topic rule carries messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Local to remote.
    Out,
    /// Remote to local.
    In,
    /// Both.
    Both,
}

impl Direction {
    pub(crate) fn out(self) -> bool {
        matches!(self, Direction::Out | Direction::Both)
    }
    pub(crate) fn inward(self) -> bool {
        matches!(self, Direction::In | Direction::Both)
    }
}

/// One parsed topic line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRule {
    /// The pattern, without prefixes (may be empty: then the prefixes are whole topics).
    pub pattern: String,
    /// Which way.
    pub direction: Direction,
    /// Highest QoS this rule forwards at.
    pub qos: QoS,
    /// Prefix on this broker.
    pub local_prefix: String,
    /// Prefix at the remote.
    pub remote_prefix: String,
}

impl TopicRule {
    /// Parses a Mosquitto topic line: `pattern [in|out|both [qos [local remote]]]`, `""`
    /// for an empty field.
    pub fn parse(line: &str) -> Result<TopicRule, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let field = |w: &str| {
            if w == "\"\"" {
                String::new()
            } else {
                w.to_string()
            }
        };
        let (pattern, rest) = match words.split_first() {
            Some((p, rest)) => (field(p), rest),
            None => return Err("empty topic line".into()),
        };
        if rest.len() > 4 || rest.len() == 3 {
            return Err(format!(
                "`{line}`: expected `pattern [in|out|both [qos [local-prefix remote-prefix]]]`"
            ));
        }
        let direction = match rest.first().copied() {
            None | Some("out") => Direction::Out,
            Some("in") => Direction::In,
            Some("both") => Direction::Both,
            Some(other) => {
                return Err(format!(
                    "`{line}`: direction `{other}` is not in, out or both"
                ));
            }
        };
        let qos = match rest.get(1) {
            None => QoS::AtMostOnce,
            Some(q) => q
                .parse::<u8>()
                .ok()
                .and_then(QoS::from_u8)
                .ok_or_else(|| format!("`{line}`: QoS `{q}` is not 0, 1 or 2"))?,
        };
        let (local_prefix, remote_prefix) = match rest.get(2..4) {
            Some([l, r]) => (field(l), field(r)),
            _ => (String::new(), String::new()),
        };
        for (what, p) in [("local", &local_prefix), ("remote", &remote_prefix)] {
            if p.contains(['#', '+']) {
                return Err(format!(
                    "`{line}`: the {what} prefix `{p}` contains a wildcard"
                ));
            }
        }
        if pattern.is_empty() && local_prefix.is_empty() && remote_prefix.is_empty() {
            return Err(format!("`{line}`: an empty pattern needs prefixes"));
        }
        let rule = TopicRule {
            pattern,
            direction,
            qos,
            local_prefix,
            remote_prefix,
        };
        for f in [rule.local_filter(), rule.remote_filter()] {
            TopicFilter::new(f.as_str()).map_err(|e| format!("`{line}`: `{f}`: {e}"))?;
        }
        Ok(rule)
    }

    /// The filter this rule covers on this broker.
    pub fn local_filter(&self) -> String {
        format!("{}{}", self.local_prefix, self.pattern)
    }

    /// The filter this rule covers at the remote.
    pub fn remote_filter(&self) -> String {
        format!("{}{}", self.remote_prefix, self.pattern)
    }

    /// `topic` (local) at the remote, if this rule carries it out.
    pub fn to_remote(&self, topic: &str) -> Option<String> {
        map(
            topic,
            &self.local_filter(),
            &self.local_prefix,
            &self.remote_prefix,
        )
    }

    /// `topic` (remote) here, if this rule carries it in.
    pub fn to_local(&self, topic: &str) -> Option<String> {
        map(
            topic,
            &self.remote_filter(),
            &self.remote_prefix,
            &self.local_prefix,
        )
    }
}

fn map(topic: &str, filter: &str, from: &str, to: &str) -> Option<String> {
    let f = TopicFilter::new(filter).ok()?;
    if !f.matches(topic) {
        return None;
    }
    Some(format!("{to}{}", topic.strip_prefix(from)?))
}

/// What a full bridge queue does.
fn policy(s: &str) -> Result<QueuePolicy, String> {
    match s {
        "drop_oldest" => Ok(QueuePolicy::DropOldest),
        "drop_new" => Ok(QueuePolicy::DropNew),
        "block" => Ok(QueuePolicy::Block),
        other => Err(format!(
            "queue_policy `{other}` is not drop_oldest, drop_new or block"
        )),
    }
}

/// A validated bridge: what the link runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Bridge {
    /// As configured.
    pub config: BridgeConfig,
    /// Parsed topic lines.
    pub rules: Vec<TopicRule>,
    /// `None`: 5.0 with a fallback to 3.1.1.
    pub protocol: Option<ProtocolVersion>,
    /// Client id at the remote.
    pub remote_clientid: String,
    /// Where the state goes, if `notifications`.
    pub notification_topic: String,
    /// Queue overflow policy.
    pub policy: QueuePolicy,
    /// Reconnect delays.
    pub restart_base: Duration,
    /// Their cap, and how long a link must last to reset them.
    pub restart_cap: Duration,
}

impl Bridge {
    /// The local session's client id.
    pub fn local_clientid(&self) -> String {
        format!("$bridge/{}", self.config.name)
    }
}

impl BridgeConfig {
    /// Checks every key and parses the topic lines. Errors name the key.
    pub fn validate(&self) -> Result<Bridge, String> {
        let name = &self.name;
        if name.is_empty()
            || name.contains(['/', '#', '+'])
            || name.chars().any(char::is_whitespace)
        {
            return Err(format!(
                "name `{name}`: must be non-empty, without `/`, `#`, `+` or spaces"
            ));
        }
        if self.address.is_empty() {
            return Err("address: at least one URL is needed".into());
        }
        let registry = halyard_transport::Registry::default();
        for a in &self.address {
            let url =
                halyard_transport::Url::parse(a).map_err(|e| format!("address `{a}`: {e}"))?;
            registry
                .get(&url.scheme)
                .map_err(|e| format!("address `{a}`: {e}"))?;
        }
        if self.topic.is_empty() {
            return Err("topic: at least one topic line is needed".into());
        }
        let rules = self
            .topic
            .iter()
            .map(|t| TopicRule::parse(t).map_err(|e| format!("topic {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let protocol = match self.protocol_version.as_deref() {
            None => None,
            Some("mqttv50" | "mqttv5") => Some(ProtocolVersion::V5),
            Some("mqttv311") => Some(ProtocolVersion::V3_1_1),
            Some(other) => {
                return Err(format!(
                    "protocol_version `{other}` is not mqttv50 or mqttv311"
                ));
            }
        };
        let (base, cap) = match self.restart_timeout.as_slice() {
            [cap] => (1.min(*cap), *cap),
            [base, cap] if base <= cap => (*base, *cap),
            _ => {
                return Err(
                    "restart_timeout: `[base, cap]` seconds with base <= cap (or `[cap]`)".into(),
                );
            }
        };
        if cap == 0 {
            return Err("restart_timeout: the cap must be at least 1 second".into());
        }
        if self.queue_max_messages == 0 {
            return Err("queue_max_messages: must be at least 1".into());
        }
        if self.receive_maximum == 0 {
            return Err("receive_maximum: must be at least 1".into());
        }
        if self.certfile.is_some() != self.keyfile.is_some() {
            return Err("certfile and keyfile go together".into());
        }
        if self.remote_password.is_some() && self.remote_username.is_none() {
            return Err("remote_password needs remote_username".into());
        }
        let remote_clientid = match &self.remote_clientid {
            Some(id) if id.is_empty() => return Err("remote_clientid: empty".into()),
            Some(id) => id.clone(),
            None => format!("{}.{}", hostname(), name),
        };
        let notification_topic = match &self.notification_topic {
            Some(t) => {
                halyard_codec::TopicName::new(t.as_str())
                    .map_err(|e| format!("notification_topic `{t}`: {e}"))?;
                t.clone()
            }
            None => format!("$SYS/broker/connection/{remote_clientid}/state"),
        };
        Ok(Bridge {
            rules,
            protocol,
            remote_clientid,
            notification_topic,
            policy: policy(&self.queue_policy)?,
            restart_base: Duration::from_secs(base),
            restart_cap: Duration::from_secs(cap),
            config: self.clone(),
        })
    }
}

/// This machine's name, for default remote client ids.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "halyard".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_lines_parse_as_mosquitto_reads_them() {
        let r = TopicRule::parse("sensors/# out 1 site1/ edge/").unwrap();
        assert_eq!(r.direction, Direction::Out);
        assert_eq!(r.qos, QoS::AtLeastOnce);
        assert_eq!(r.local_filter(), "site1/sensors/#");
        assert_eq!(r.remote_filter(), "edge/sensors/#");
        assert_eq!(
            r.to_remote("site1/sensors/a/b").as_deref(),
            Some("edge/sensors/a/b")
        );
        assert_eq!(r.to_remote("sensors/a"), None);
        let r = TopicRule::parse("cmd/# in 1").unwrap();
        assert_eq!(r.direction, Direction::In);
        assert_eq!(r.to_local("cmd/x").as_deref(), Some("cmd/x"));
        let r = TopicRule::parse("#").unwrap();
        assert_eq!((r.direction, r.qos), (Direction::Out, QoS::AtMostOnce));
        // An empty pattern: the prefixes are the topics.
        let r = TopicRule::parse("\"\" both 2 local/status remote/status").unwrap();
        assert_eq!(
            r.to_remote("local/status").as_deref(),
            Some("remote/status")
        );
        assert_eq!(r.to_local("remote/status").as_deref(), Some("local/status"));
        assert_eq!(r.to_local("remote/status/x"), None);
    }

    #[test]
    fn bad_topic_lines_say_what_is_wrong() {
        for (line, says) in [
            ("a/# sideways", "direction `sideways`"),
            ("a/# out 3", "QoS `3`"),
            ("a/# out 1 pre/", "expected"),
            ("a/# out 1 pre/+/ x/", "wildcard"),
            ("a/#/b out", "a/#/b"),
            ("", "empty"),
        ] {
            let e = TopicRule::parse(line).unwrap_err();
            assert!(e.contains(says), "{line}: {e}");
        }
    }

    fn cfg() -> BridgeConfig {
        serde_json::from_str(
            r##"{"name":"cloud","address":["tcp://127.0.0.1:1883"],"topic":["# both 1"]}"##,
        )
        .unwrap()
    }

    #[test]
    fn defaults_are_mosquittos_where_it_has_one() {
        let b = cfg().validate().unwrap();
        assert!(!b.config.cleansession);
        assert!(b.config.notifications && b.config.try_private && b.config.outgoing_retain);
        assert_eq!(
            (b.restart_base, b.restart_cap),
            (Duration::from_secs(5), Duration::from_secs(30))
        );
        assert_eq!(b.policy, QueuePolicy::DropOldest);
        assert!(b.remote_clientid.ends_with(".cloud"));
        assert_eq!(
            b.notification_topic,
            format!("$SYS/broker/connection/{}/state", b.remote_clientid)
        );
        assert_eq!(b.local_clientid(), "$bridge/cloud");
    }

    #[test]
    fn bad_keys_are_named() {
        let mut c = cfg();
        c.queue_policy = "drop_random".into();
        assert!(c.validate().unwrap_err().contains("queue_policy"));
        let mut c = cfg();
        c.address = vec!["gopher://x:1".into()];
        assert!(c.validate().unwrap_err().contains("address"));
        let mut c = cfg();
        c.protocol_version = Some("mqttv4".into());
        assert!(c.validate().unwrap_err().contains("protocol_version"));
        let mut c = cfg();
        c.restart_timeout = vec![30, 5];
        assert!(c.validate().unwrap_err().contains("restart_timeout"));
        let mut c = cfg();
        c.name = "a/b".into();
        assert!(c.validate().unwrap_err().contains("name"));
        let e = serde_json::from_str::<BridgeConfig>(
            r##"{"name":"x","address":["tcp://h:1"],"topic":["#"],"adress":[]}"##,
        )
        .unwrap_err();
        assert!(e.to_string().contains("adress"), "{e}");
    }
}
