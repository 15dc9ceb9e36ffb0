//! Connection flags shared by `halyard pub`, `sub` and `rpc`, with mosquitto's names and
//! meanings, and the mapping of failures to mosquitto's messages and exit codes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{ArgAction, Args};
use halyard_client::{
    ByteString, Bytes, Client, ClientOptions, ClientTls, Error, Message, PacketTrace,
    ProtocolVersion, PublishProperties, QoS, Reconnect, reason_text,
};

/// Exit code for "timed out" (mosquitto's MOSQ_ERR_TIMEOUT).
pub(crate) const EXIT_TIMEOUT: u8 = 27;

#[derive(Debug, Args, Clone)]
pub(crate) struct ConnArgs {
    /// Broker host.
    #[arg(short = 'h', long = "host", default_value = "localhost")]
    pub host: String,
    /// Broker port (default 1883, or 8883 with TLS).
    #[arg(short = 'p', long = "port")]
    pub port: Option<u16>,
    /// mqtt(s)://[username[:password]@]host[:port]/topic, or any broker URL Halyard dials
    /// (tcp://, tls://, ws://, wss://, unix://).
    #[arg(short = 'L', long = "url")]
    pub url: Option<String>,
    /// Connect through this Unix socket.
    #[arg(long = "unix")]
    pub unix: Option<PathBuf>,
    /// Client id (default: halyard_<tool>_<pid>).
    #[arg(short = 'i', long = "id")]
    pub id: Option<String>,
    /// Client id prefix; the process id is appended.
    #[arg(short = 'I', long = "id-prefix")]
    pub id_prefix: Option<String>,
    /// Keep alive in seconds.
    #[arg(short = 'k', long = "keepalive", default_value_t = 60)]
    pub keepalive: u16,
    /// User name.
    #[arg(short = 'u', long = "username")]
    pub username: Option<String>,
    /// Password.
    #[arg(short = 'P', long = "pw")]
    pub password: Option<String>,
    /// Protocol version: mqttv5 (5), mqttv311 (311) or mqttv31 (31).
    #[arg(short = 'V', long = "protocol-version")]
    pub version: Option<String>,
    /// MQTT 5 property: -D command identifier value [value] (e.g. -D publish user-property k v).
    #[arg(short = 'D', long = "property", num_args = 3..=4, action = ArgAction::Append, value_names = ["COMMAND", "IDENTIFIER", "VALUE"])]
    pub properties: Vec<String>,
    /// Disable clean session / clean start: the broker keeps the session.
    #[arg(short = 'c', long = "disable-clean-session")]
    pub persistent: bool,
    /// Session expiry interval in seconds (MQTT 5); -1 or ∞ for never.
    #[arg(
        short = 'x',
        long = "session-expiry-interval",
        allow_hyphen_values = true
    )]
    pub session_expiry: Option<String>,
    /// Will topic.
    #[arg(long = "will-topic")]
    pub will_topic: Option<String>,
    /// Will payload.
    #[arg(long = "will-payload")]
    pub will_payload: Option<String>,
    /// Will QoS.
    #[arg(long = "will-qos", default_value_t = 0)]
    pub will_qos: u8,
    /// Retain the will.
    #[arg(long = "will-retain")]
    pub will_retain: bool,
    /// CA certificates to trust (enables TLS).
    #[arg(long = "cafile")]
    pub cafile: Option<PathBuf>,
    /// Client certificate (enables TLS).
    #[arg(long = "cert")]
    pub cert: Option<PathBuf>,
    /// Client private key.
    #[arg(long = "key")]
    pub key: Option<PathBuf>,
    /// Do not check that the certificate's name matches the host.
    #[arg(long = "insecure")]
    pub insecure: bool,
    /// Use TLS with the operating system's CA bundle.
    #[arg(long = "tls-use-os-certs")]
    pub os_certs: bool,
    /// Print every packet sent and received.
    #[arg(short = 'd', long = "debug")]
    pub debug: bool,
    /// Print no error messages.
    #[arg(long = "quiet")]
    pub quiet: bool,
    /// Print help.
    #[arg(long = "help", action = ArgAction::Help)]
    pub help: Option<bool>,
}

/// MQTT 5 properties from `-D`, by the packet they go into.
#[derive(Debug, Default)]
pub(crate) struct Props {
    pub publish: PublishProperties,
    pub will: PublishProperties,
    pub will_delay: Option<u32>,
    pub subscribe_user: Vec<(ByteString, ByteString)>,
}

/// A usage error: printed as mosquitto does, exit code 1.
pub(crate) fn usage_error(tool: &str, msg: &str) -> ExitCode {
    eprintln!("Error: {msg}\n\nUse 'halyard {tool} --help' to see usage.");
    ExitCode::from(1)
}

pub(crate) fn parse_version(v: &str) -> Option<ProtocolVersion> {
    match v {
        "mqttv5" | "5" => Some(ProtocolVersion::V5),
        "mqttv311" | "311" => Some(ProtocolVersion::V3_1_1),
        "mqttv31" | "31" => Some(ProtocolVersion::V3_1),
        _ => None,
    }
}

/// What `-L mqtt://user:pw@host:port/topic` contributes.
#[derive(Debug, Default)]
pub(crate) struct FromUrl {
    pub broker: Option<String>,
    pub topic: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// Runs one tool invocation on a current-thread runtime.
pub(crate) fn block_on(f: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(f),
        Err(e) => {
            eprintln!("Error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What `-L` contributes (nothing without it).
pub(crate) fn url_parts(a: &ConnArgs) -> Result<FromUrl, String> {
    a.url
        .as_deref()
        .map(parse_url)
        .transpose()
        .map(Option::unwrap_or_default)
}

pub(crate) fn parse_url(url: &str) -> Result<FromUrl, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("Unsupported URL scheme in '{url}'."))?;
    match scheme {
        "mqtt" | "mqtts" => {
            let (authority, topic) = rest.split_once('/').unwrap_or((rest, ""));
            let (userinfo, hostport) = match authority.rsplit_once('@') {
                Some((u, h)) => (Some(u), h),
                None => (None, authority),
            };
            let (username, password) = match userinfo {
                Some(u) => match u.split_once(':') {
                    Some((a, b)) => (Some(a.to_string()), Some(b.to_string())),
                    None => (Some(u.to_string()), None),
                },
                None => (None, None),
            };
            let default_port = if scheme == "mqtts" { 8883 } else { 1883 };
            let has_port = if hostport.starts_with('[') {
                hostport.contains("]:")
            } else {
                hostport.contains(':')
            };
            let hostport = if has_port {
                hostport.to_string()
            } else {
                format!("{hostport}:{default_port}")
            };
            if hostport.starts_with(':') {
                return Err(format!("No host in URL '{url}'."));
            }
            let t = if scheme == "mqtts" { "tls" } else { "tcp" };
            Ok(FromUrl {
                broker: Some(format!("{t}://{hostport}")),
                topic: (!topic.is_empty()).then(|| topic.to_string()),
                username,
                password,
            })
        }
        "tcp" | "tls" | "ws" | "wss" | "unix" => Ok(FromUrl {
            broker: Some(url.to_string()),
            ..FromUrl::default()
        }),
        _ => Err(format!("Unsupported URL scheme '{scheme}'.")),
    }
}

/// Client options from the flags; `tool` names the default client id.
pub(crate) fn client_options(
    a: &ConnArgs,
    tool: &str,
    from_url: &FromUrl,
    default_version: ProtocolVersion,
) -> Result<ClientOptions, String> {
    let version = match &a.version {
        None => default_version,
        Some(v) => parse_version(v)
            .ok_or_else(|| format!("Invalid protocol version argument given: '{v}'."))?,
    };
    let tls = a.cafile.is_some() || a.cert.is_some() || a.os_certs;
    let url = if let Some(u) = &from_url.broker {
        u.clone()
    } else if let Some(path) = &a.unix {
        format!("unix://{}", path.display())
    } else {
        let port = a.port.unwrap_or(if tls { 8883 } else { 1883 });
        let host = if a.host.contains(':') && !a.host.starts_with('[') {
            format!("[{}]", a.host)
        } else {
            a.host.clone()
        };
        format!("{}://{host}:{port}", if tls { "tls" } else { "tcp" })
    };
    let client_id = match (&a.id, &a.id_prefix) {
        (Some(id), _) => id.clone(),
        (None, Some(prefix)) => format!("{prefix}{}", std::process::id()),
        (None, None) => {
            if a.persistent {
                return Err("You must provide a client id if you are using the -c option.".into());
            }
            format!("halyard_{tool}_{}", std::process::id())
        }
    };
    let mut o = ClientOptions::new(url)
        .protocol(version)
        .client_id(client_id);
    o.clean_start = !a.persistent;
    o.keep_alive = Duration::from_secs(u64::from(a.keepalive));
    o.username = a.username.clone().or_else(|| from_url.username.clone());
    o.password = a
        .password
        .clone()
        .or_else(|| from_url.password.clone())
        .map(Bytes::from);
    if o.password.is_some() && o.username.is_none() {
        return Err("A password was given without a username.".into());
    }
    o.session_expiry = match a.session_expiry.as_deref() {
        None => {
            if a.persistent {
                u32::MAX
            } else {
                0
            }
        }
        Some("-1") | Some("∞") => u32::MAX,
        Some(s) => s
            .parse()
            .map_err(|_| format!("Invalid session-expiry-interval '{s}'."))?,
    };
    if let Some(t) = &a.will_topic {
        let qos = QoS::from_u8(a.will_qos).ok_or("Invalid will QoS given: must be 0, 1 or 2.")?;
        let w = Message::new(t.as_str(), a.will_payload.clone().unwrap_or_default())
            .qos(qos)
            .retain(a.will_retain);
        o.will = Some(w);
    } else if a.will_payload.is_some() || a.will_retain {
        return Err("Will payload or retain given, but no will topic given.".into());
    }
    o.dial.tls = ClientTls {
        cafile: a.cafile.clone(),
        certfile: a.cert.clone(),
        keyfile: a.key.clone(),
        server_name: None,
        insecure: a.insecure,
    };
    // Tools do not retry a first connection that fails (wrong address, refused
    // credentials); once connected they ride out broker restarts like mosquitto's.
    o.reconnect = Reconnect {
        retry_first_connect: false,
        ..Reconnect::default()
    };
    if a.debug {
        let id = o.client_id.clone();
        o.trace = Some(PacketTrace(Arc::new(move |line: &str| {
            eprintln!("Client {id} {line}");
        })));
    }
    Ok(o)
}

/// Applies `-D` properties: connect and will properties go into the options, the others
/// are returned for the tool's packets.
pub(crate) fn apply_properties(a: &ConnArgs, o: &mut ClientOptions) -> Result<Props, String> {
    let mut props = Props::default();
    apply(a, o, &mut props)?;
    if let Some(w) = &mut o.will {
        w.properties = props.will.clone();
        o.will_delay = props.will_delay;
    }
    Ok(props)
}

fn apply(a: &ConnArgs, o: &mut ClientOptions, props: &mut Props) -> Result<(), String> {
    if a.properties.is_empty() {
        return Ok(());
    }
    if !o.protocol.is_v5() {
        return Err("-D/--property is only valid for MQTT v5 (use -V mqttv5).".into());
    }
    // clap hands us the values of every -D in one list; a user-property takes a name and
    // a value, every other property one value.
    let mut groups = Vec::new();
    let mut rest = a.properties.as_slice();
    while !rest.is_empty() {
        let n = if rest.get(1).is_some_and(|i| i == "user-property") {
            4
        } else {
            3
        };
        if rest.len() < n {
            return Err(format!("Incomplete property: -D {}.", rest.join(" ")));
        }
        groups.push(&rest[..n]);
        rest = &rest[n..];
    }
    for p in groups {
        let (cmd, ident, value) = (p[0].as_str(), p[1].as_str(), p[2].as_str());
        let extra = p.get(3).map(String::as_str);
        let num = |v: &str| -> Result<u32, String> {
            v.parse()
                .map_err(|_| format!("Invalid value '{v}' for property {ident}."))
        };
        let pair = || -> Result<(ByteString, ByteString), String> {
            let v2 = extra.ok_or_else(|| format!("Property {ident} needs a name and a value."))?;
            Ok((value.into(), v2.into()))
        };
        match (cmd, ident) {
            ("connect", "session-expiry-interval") => o.session_expiry = num(value)?,
            ("connect", "receive-maximum") => {
                o.receive_maximum = u16::try_from(num(value)?).map_err(|e| e.to_string())?
            }
            ("connect", "maximum-packet-size") => o.maximum_packet_size = Some(num(value)?),
            ("connect", "topic-alias-maximum") => {
                o.topic_alias_maximum = u16::try_from(num(value)?).map_err(|e| e.to_string())?
            }
            ("connect", "request-response-information") => {
                o.request_response_information = num(value)? != 0
            }
            ("connect", "request-problem-information") => {
                o.request_problem_information = Some(num(value)? != 0)
            }
            ("connect", "user-property") => {
                let (k, v) = pair()?;
                o.user_properties.push((k.to_string(), v.to_string()));
            }
            ("publish" | "will", "content-type") => {
                target(props, cmd).content_type = Some(value.into())
            }
            ("publish" | "will", "correlation-data") => {
                target(props, cmd).correlation_data = Some(Bytes::from(value.to_string()))
            }
            ("publish" | "will", "message-expiry-interval") => {
                target(props, cmd).message_expiry_interval = Some(num(value)?)
            }
            ("publish" | "will", "payload-format-indicator") => {
                target(props, cmd).payload_format_indicator = Some(num(value)? != 0)
            }
            ("publish" | "will", "response-topic") => {
                target(props, cmd).response_topic = Some(
                    halyard_codec::TopicName::new(value)
                        .map_err(|e| format!("Invalid response-topic '{value}': {e}."))?,
                )
            }
            ("publish" | "will", "user-property") => {
                let kv = pair()?;
                target(props, cmd).user_properties.push(kv);
            }
            ("will", "will-delay-interval") => props.will_delay = Some(num(value)?),
            ("subscribe", "user-property") => {
                let kv = pair()?;
                props.subscribe_user.push(kv);
            }
            ("publish", "topic-alias") => {
                o.outgoing_topic_aliases = true;
            }
            _ => {
                return Err(format!(
                    "Property '{ident}' is not supported for command '{cmd}'."
                ));
            }
        }
    }
    Ok(())
}

fn target<'a>(props: &'a mut Props, cmd: &str) -> &'a mut PublishProperties {
    if cmd == "will" {
        &mut props.will
    } else {
        &mut props.publish
    }
}

/// Connects and waits for CONNACK; on failure prints what mosquitto's tools print and
/// returns their exit code (the CONNACK code on refusal, 1 otherwise).
pub(crate) async fn connect(o: ClientOptions, quiet: bool) -> Result<Client, ExitCode> {
    let v = o.protocol;
    let client = Client::connect(o);
    match client.connected().await {
        Ok(_) => Ok(client),
        Err(e) => Err(report(&e, v, quiet)),
    }
}

/// Prints an error as mosquitto's clients do and returns their exit code.
pub(crate) fn report(e: &Error, v: ProtocolVersion, quiet: bool) -> ExitCode {
    let (msg, code) = match e {
        Error::Refused { reason, .. } => {
            if v.is_v5() {
                (
                    format!("Connection error: {}", reason_text(*reason)),
                    *reason as u8,
                )
            } else {
                let rc = reason.to_v3_connack();
                (format!("Connection error: {}", v3_connack_text(rc)), rc)
            }
        }
        Error::Connect(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            ("Error: Connection refused".to_string(), 1)
        }
        Error::Connect(io) => (format!("Error: {io}"), 1),
        Error::Timeout => ("Error: timed out connecting to the broker".to_string(), 1),
        other => (format!("Error: {other}"), 1),
    };
    if !quiet {
        eprintln!("{msg}");
    }
    ExitCode::from(code)
}

fn v3_connack_text(rc: u8) -> &'static str {
    match rc {
        1 => "Connection Refused: unacceptable protocol version.",
        2 => "Connection Refused: identifier rejected.",
        3 => "Connection Refused: broker unavailable.",
        4 => "Connection Refused: bad user name or password.",
        5 => "Connection Refused: not authorised.",
        _ => "Connection Refused: unknown reason.",
    }
}

/// A failed publish/subscribe acknowledgement in mosquitto's words.
pub(crate) fn rejected_text(e: &Error) -> String {
    match e {
        Error::Rejected { reason, .. } => reason_text(*reason).to_string(),
        other => other.to_string(),
    }
}
