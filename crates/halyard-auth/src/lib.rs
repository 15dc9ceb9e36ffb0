//! Backends for the broker's [`halyard_broker::auth`] traits: the password file
//! (mosquitto-compatible: reads `$6$` and `$7$` entries, writes argon2id), with the helpers
//! `halyard passwd` uses to edit it, and the ACL file (mosquitto's format).
#![forbid(unsafe_code)]

pub mod acl;
pub mod passwd;
pub mod scram;

pub use acl::AclFile;
pub use passwd::{PasswordFile, Scheme};
pub use scram::{ScramAuth, ScramHash, Verifier};
