//! Authentication backends for the broker's [`halyard_broker::auth`] traits: the password
//! file (mosquitto-compatible: reads `$6$` and `$7$` entries, writes argon2id), with the
//! helpers `halyard passwd` uses to edit it.
#![forbid(unsafe_code)]

pub mod passwd;

pub use passwd::{PasswordFile, Scheme};
