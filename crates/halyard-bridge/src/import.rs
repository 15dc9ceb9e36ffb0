//! `halyard bridge import mosquitto.conf`: Mosquitto's bridge blocks (`connection <name>`
//! and the options after it) as `[[bridge]]` tables, naming every option that cannot be
//! carried over and why.

use std::fmt::Write as _;

/// The result of an import: TOML text and one note per option not carried over.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Imported {
    /// `[[bridge]]` tables.
    pub toml: String,
    /// `N: option ...: why` (N: the line) for what the TOML does not say.
    pub notes: Vec<String>,
    /// How many bridges were found.
    pub bridges: usize,
}

/// Options of a bridge block Halyard has no equivalent for, with the reason given to
/// the user.
const NOT_CARRIED: &[(&str, &str)] = &[
    (
        "bridge_capath",
        "a CA directory: give the CA file as cafile",
    ),
    (
        "bridge_psk",
        "TLS-PSK is not supported (rustls has no PSK cipher suites)",
    ),
    (
        "bridge_identity",
        "TLS-PSK is not supported (rustls has no PSK cipher suites)",
    ),
    (
        "bridge_tls_version",
        "TLS 1.2 and 1.3 are both offered, the remote chooses",
    ),
    (
        "bridge_ciphers",
        "rustls' safe default cipher suites are used",
    ),
    ("bridge_alpn", "no ALPN is sent"),
    ("bridge_require_ocsp", "OCSP stapling is not checked"),
    (
        "bridge_bind_address",
        "the system chooses the source address",
    ),
    (
        "bridge_max_packet_size",
        "the remote's own Maximum Packet Size is respected",
    ),
    (
        "bridge_attempt_unsubscribe",
        "removed filters are always unsubscribed",
    ),
    (
        "bridge_reload_type",
        "a changed bridge is always restarted alone on reload",
    ),
    (
        "round_robin",
        "addresses are tried in order, back to the first after a stable link",
    ),
    (
        "start_type",
        "bridges always start with the broker (pause one with the admin API)",
    ),
    ("threshold", "lazy start is not supported"),
    ("idle_timeout", "lazy start is not supported"),
    (
        "local_clientid",
        "the local session is always $bridge/<name>",
    ),
    (
        "local_username",
        "the local side is trusted in-process, no credentials",
    ),
    (
        "local_password",
        "the local side is trusted in-process, no credentials",
    ),
    (
        "local_cleansession",
        "the local session is always persistent (it is the queue)",
    ),
    ("notifications_local_only", "notifications go to both sides"),
    (
        "notification_topic_local",
        "one notification_topic for both sides",
    ),
];

/// Reads Mosquitto configuration text.
pub fn mosquitto(text: &str) -> Imported {
    let mut out = Imported::default();
    let mut block: Option<Block> = None;
    let mut blocks = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = match line.split_once(char::is_whitespace) {
            Some((k, v)) => (k, v.trim()),
            None => (line, ""),
        };
        if key == "connection" {
            if let Some(b) = block.take() {
                blocks.push(b);
            }
            block = Some(Block::new(value));
            continue;
        }
        let Some(b) = block.as_mut() else { continue };
        let n = i + 1;
        let mut set = |k: &str, v: String| b.keys.push((k.to_string(), v));
        match key {
            "address" | "addresses" => b.addresses.extend(value.split_whitespace().map(str::to_string)),
            "topic" => b.topics.push(value.to_string()),
            "bridge_protocol_version" => match value {
                "mqttv50" | "mqttv311" => set("protocol_version", q(value)),
                other => out.notes.push(format!("{n}: bridge_protocol_version {other}: only mqttv50 and mqttv311; left to negotiate")),
            },
            "remote_clientid" | "clientid" => set("remote_clientid", q(value)),
            "remote_username" | "username" => set("remote_username", q(value)),
            "remote_password" | "password" => set("remote_password", q(value)),
            "bridge_cafile" => {
                b.tls = true;
                set("cafile", q(value));
            }
            "bridge_certfile" => {
                b.tls = true;
                set("certfile", q(value));
            }
            "bridge_keyfile" => {
                b.tls = true;
                set("keyfile", q(value));
            }
            "bridge_insecure" => set("insecure", boolean(value)),
            "cleansession" => set("cleansession", boolean(value)),
            "bridge_session_expiry_interval" => set("session_expiry_interval", value.to_string()),
            "keepalive_interval" => set("keepalive_interval", value.to_string()),
            "restart_timeout" => {
                let v: Vec<&str> = value.split_whitespace().collect();
                match v.as_slice() {
                    [c] => set("restart_timeout", format!("[{c}, {c}]")),
                    [a, c, ..] => set("restart_timeout", format!("[{a}, {c}]")),
                    [] => {}
                }
            }
            "notifications" => set("notifications", boolean(value)),
            "notification_topic" => set("notification_topic", q(value)),
            "bridge_outgoing_retain" => set("outgoing_retain", boolean(value)),
            "try_private" => set("try_private", boolean(value)),
            "bridge_receive_maximum" => set("receive_maximum", value.to_string()),
            other => {
                if let Some((_, why)) = NOT_CARRIED.iter().find(|(k, _)| *k == other) {
                    out.notes
                        .push(format!("{n}: {other} not carried over: {why}"));
                } else if other.starts_with("bridge_") {
                    out.notes.push(format!("{n}: {other} not carried over: unknown bridge option"));
                } else {
                    // A broker-wide option after the block: not the bridge's.
                    blocks.push(block.take().expect("in a block"));
                }
            }
        }
    }
    if let Some(b) = block.take() {
        blocks.push(b);
    }
    out.bridges = blocks.len();
    for b in blocks {
        b.write(&mut out.toml);
    }
    out
}

struct Block {
    name: String,
    addresses: Vec<String>,
    topics: Vec<String>,
    keys: Vec<(String, String)>,
    tls: bool,
}

impl Block {
    fn new(name: &str) -> Block {
        Block {
            name: name.to_string(),
            addresses: Vec::new(),
            topics: Vec::new(),
            keys: Vec::new(),
            tls: false,
        }
    }

    fn write(&self, t: &mut String) {
        let scheme = if self.tls { "tls" } else { "tcp" };
        let urls: Vec<String> = self
            .addresses
            .iter()
            .map(|a| {
                let has_port = a
                    .rsplit_once(':')
                    .is_some_and(|(_, p)| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
                let hostport = if has_port {
                    a.clone()
                } else {
                    format!("{a}:1883")
                };
                q(&format!("{scheme}://{hostport}"))
            })
            .collect();
        let topics: Vec<String> = self.topics.iter().map(|x| q(x)).collect();
        let _ = writeln!(t, "[[bridge]]");
        let _ = writeln!(t, "name = {}", q(&self.name));
        let _ = writeln!(t, "address = [{}]", urls.join(", "));
        let _ = writeln!(t, "topic = [{}]", topics.join(", "));
        if !self.keys.iter().any(|(k, _)| k == "protocol_version") {
            // Mosquitto's default; Halyard's own default would try 5.0 first.
            let _ = writeln!(t, "protocol_version = \"mqttv311\"");
        }
        for (k, v) in &self.keys {
            let _ = writeln!(t, "{k} = {v}");
        }
        t.push('\n');
    }
}

/// A TOML basic string (JSON's escapes are TOML's).
fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

fn boolean(v: &str) -> String {
    matches!(v, "true" | "1" | "yes" | "on").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = r#"
listener 1883
allow_anonymous true

connection cloud
address cloud.example.com:8883 backup.example.com
bridge_cafile /etc/ca.pem
topic sensors/# out 1 site1/ edge/
topic cmd/# in 2
topic "" both 0 local/status remote/status
remote_clientid site1
remote_username u
remote_password "p"
cleansession false
restart_timeout 10 60
bridge_protocol_version mqttv50
bridge_psk deadbeef
round_robin true
try_private false

connection second
address 10.0.0.2
topic # out
"#;

    #[test]
    fn mosquitto_bridge_blocks_become_bridge_tables() {
        let r = mosquitto(CONF);
        assert_eq!(r.bridges, 2);
        #[derive(serde::Deserialize)]
        struct File {
            bridge: Vec<crate::BridgeConfig>,
        }
        let f: File = toml_like(&r.toml);
        let a = &f.bridge[0];
        assert_eq!(a.name, "cloud");
        assert_eq!(
            a.address,
            [
                "tls://cloud.example.com:8883",
                "tls://backup.example.com:1883"
            ]
        );
        assert_eq!(a.topic[2], "\"\" both 0 local/status remote/status");
        assert_eq!(a.restart_timeout, [10, 60]);
        assert_eq!(a.protocol_version.as_deref(), Some("mqttv50"));
        assert_eq!(a.cafile.as_deref(), Some("/etc/ca.pem"));
        assert!(!a.try_private);
        a.validate().expect("valid");
        let b = &f.bridge[1];
        assert_eq!(b.address, ["tcp://10.0.0.2:1883"]);
        assert_eq!(
            b.protocol_version.as_deref(),
            Some("mqttv311"),
            "Mosquitto's default"
        );
        b.validate().expect("valid");
        assert_eq!(r.notes.len(), 2, "{:?}", r.notes);
        assert!(r.notes[0].starts_with("17: bridge_psk not carried over"));
        assert!(r.notes[1].starts_with("18: round_robin not carried over"));
    }

    /// The tables parsed back (serde_json over a line-wise TOML subset is enough here:
    /// what `write` produces is `key = value` lines with JSON-compatible values).
    fn toml_like<T: serde::de::DeserializeOwned>(t: &str) -> T {
        let mut tables = Vec::new();
        for line in t.lines() {
            if line == "[[bridge]]" {
                tables.push(serde_json::Map::new());
            } else if let Some((k, v)) = line.split_once(" = ") {
                let v: serde_json::Value = serde_json::from_str(v).expect(v);
                tables.last_mut().expect("a table").insert(k.into(), v);
            }
        }
        serde_json::from_value(serde_json::json!({ "bridge": tables })).expect("parses")
    }
}
