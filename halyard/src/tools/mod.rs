//! The client-side command-line tools: `pub`, `sub`, `rpc`, `ctl`.

pub(crate) mod conn;
pub(crate) mod ctl;
pub(crate) mod format;
pub(crate) mod publish;
pub(crate) mod rpc;
pub(crate) mod subscribe;
