//! Authentication and authorization, as traits the broker calls: the password file and ACL
//! file of `halyard-auth` implement them, and embedders can plug in their own.
//!
//! Authentication runs once per CONNECT on a blocking thread (password hashes such as
//! argon2id are deliberately slow). Authorization runs on every PUBLISH, SUBSCRIBE and
//! delivery; its answers are cached per session and dropped when the rules change
//! (`Broker::set_security` bumps a generation number).

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use halyard_transport::PeerInfo;

/// What a client presented in CONNECT.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// Client identifier (after assignment, for clients that sent none).
    pub client_id: String,
    /// User name, if any (the certificate identity on `use_identity_as_username` listeners).
    pub username: Option<String>,
    /// Password, if any.
    pub password: Option<Vec<u8>>,
    /// Where the client comes from.
    pub peer: PeerInfo,
}

/// An authenticator's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthVerdict {
    /// The credentials are good.
    Allow,
    /// Unknown user or wrong password (CONNACK 0x86 / 3.x 0x04).
    BadCredentials,
    /// Known, but not allowed to connect (CONNACK 0x87 / 3.x 0x05).
    NotAuthorized,
}

/// Checks CONNECT credentials. Called only for clients that sent a user name (anonymous
/// clients are governed by `allow_anonymous`).
pub trait Authenticator: Send + Sync + fmt::Debug {
    /// Decides; may block (it runs on a blocking thread).
    fn authenticate(&self, c: &Credentials) -> AuthVerdict;
}

/// What a client wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Publish to a topic name.
    Write = 0,
    /// Subscribe with a topic filter.
    Subscribe = 1,
    /// Receive a message on a topic name (checked on delivery, retained messages included).
    Read = 2,
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Client identifier.
    pub client_id: Arc<str>,
    /// Authenticated user name; `None` for anonymous clients.
    pub username: Option<Arc<str>>,
}

/// Decides topic access.
pub trait Authorizer: Send + Sync + fmt::Debug {
    /// Whether `who` may do `access` on `topic` (a filter for `Subscribe`, a name otherwise).
    fn check(&self, who: &Identity, access: Access, topic: &str) -> bool;
}

/// Whether `topic` is under `$SYS`, the broker's own topics: clients read them, only
/// the broker writes them.
pub(crate) fn is_sys(topic: &str) -> bool {
    topic
        .strip_prefix("$SYS")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Whether `client_id` may not write `topic` because it is the broker's own: every `$SYS`
/// topic except `$SYS/broker/connection/<client_id>/state`, where a bridge (Mosquitto's
/// `notifications`, Halyard's too) says whether its link is up; only the client with that
/// id writes it.
pub(crate) fn sys_denied(topic: &str, client_id: &str) -> bool {
    is_sys(topic)
        && topic
            .strip_prefix("$SYS/broker/connection/")
            .and_then(|rest| rest.strip_suffix("/state"))
            != Some(client_id)
}

/// Who may connect without a user name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anonymous {
    /// Anyone.
    Allow,
    /// No one.
    Deny,
    /// Clients on loopback addresses and Unix sockets only (the default when nothing about
    /// authentication is configured, as mosquitto 2 does).
    LoopbackOnly,
}

impl Anonymous {
    /// Whether an anonymous client from `peer` is let in.
    pub fn allows(self, peer: &PeerInfo) -> bool {
        match self {
            Anonymous::Allow => true,
            Anonymous::Deny => false,
            Anonymous::LoopbackOnly => match &peer.remote {
                halyard_transport::Remote::Ip(a) => is_loopback(a.ip()),
                halyard_transport::Remote::Unix(_) => true,
                // In-memory pipes of tests and embedders: local by construction.
                halyard_transport::Remote::Named(_) => true,
            },
        }
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// The broker's security settings; replaced as a whole on reload.
#[derive(Debug, Clone)]
pub struct Security {
    /// Password checks for clients with a user name; `None`: any user name is accepted.
    pub authenticator: Option<Arc<dyn Authenticator>>,
    /// Topic access; `None`: everything is allowed.
    pub authorizer: Option<Arc<dyn Authorizer>>,
    /// MQTT 5 enhanced authentication methods offered.
    pub enhanced: Vec<Arc<dyn EnhancedAuth>>,
    /// Anonymous clients (listeners may override with their own `allow_anonymous`).
    pub anonymous: Anonymous,
    /// The v5 reason code for a refused subscription: 0x87 Not authorized (default) or
    /// 0x80 Unspecified error (which tells a prober less). 3.x always gets 0x80.
    pub subscribe_denied_not_authorized: bool,
}

impl Default for Security {
    fn default() -> Self {
        Security {
            authenticator: None,
            authorizer: None,
            enhanced: Vec::new(),
            anonymous: Anonymous::LoopbackOnly,
            subscribe_denied_not_authorized: true,
        }
    }
}

/// MQTT 5 enhanced authentication (section 4.12): a method named in CONNECT's
/// Authentication Method, run as a challenge/response over AUTH packets, at connect time
/// and again on re-authentication.
pub trait EnhancedAuth: Send + Sync + fmt::Debug {
    /// The Authentication Method it answers to (e.g. `SCRAM-SHA-256`).
    fn method(&self) -> &str;
    /// Starts an exchange with the client's first Authentication Data.
    fn start(&self, data: Option<&[u8]>) -> AuthStep;
}

/// One exchange in progress.
pub trait AuthExchange: Send + fmt::Debug {
    /// The client's next Authentication Data.
    fn step(&mut self, data: Option<&[u8]>) -> AuthStep;
}

/// Where an exchange stands.
#[derive(Debug)]
pub enum AuthStep {
    /// Send this data in AUTH 0x18 and wait for the client's next AUTH.
    Continue(Vec<u8>, Box<dyn AuthExchange>),
    /// Authenticated as `username`; send `data` with the success (CONNACK or AUTH 0x00).
    Success {
        /// The authenticated user.
        username: String,
        /// Final server data (e.g. SCRAM's server signature).
        data: Option<Vec<u8>>,
    },
    /// Refused.
    Failure(AuthVerdict),
}
