//! The transport registry: which `Transport` serves each URL scheme.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use crate::peer::*;
use crate::tcp::TcpStack;
use crate::unix::Unix;
use crate::url::Url;

use crate::transport::*;

/// Transports keyed by URL scheme. `Registry::default()` has `tcp`, `tls`, `ws`, `wss`
/// and `unix`; embedders may register more. Listeners started through one registry share
/// its per-address limits.
#[derive(Debug, Clone)]
pub struct Registry {
    pub(crate) map: HashMap<String, Arc<dyn Transport>>,
    pub(crate) ip_limits: Option<Arc<IpLimits>>,
}

impl Default for Registry {
    fn default() -> Self {
        let mut r = Registry::empty();
        r.register(
            "tcp",
            Arc::new(TcpStack {
                tls: false,
                ws: false,
            }),
        );
        r.register(
            "tls",
            Arc::new(TcpStack {
                tls: true,
                ws: false,
            }),
        );
        r.register(
            "ws",
            Arc::new(TcpStack {
                tls: false,
                ws: true,
            }),
        );
        r.register(
            "wss",
            Arc::new(TcpStack {
                tls: true,
                ws: true,
            }),
        );
        r.register("unix", Arc::new(Unix));
        r
    }
}

impl Registry {
    /// A registry with no transports.
    pub fn empty() -> Registry {
        Registry {
            map: HashMap::new(),
            ip_limits: None,
        }
    }

    /// Applies per-address limits to every listener started through this registry.
    pub fn with_ip_limits(mut self, limits: Arc<IpLimits>) -> Registry {
        self.ip_limits = Some(limits);
        self
    }

    /// Adds or replaces the transport for `scheme`.
    pub fn register(&mut self, scheme: &str, t: Arc<dyn Transport>) {
        self.map.insert(scheme.to_ascii_lowercase(), t);
    }

    /// The known schemes, sorted.
    pub fn schemes(&self) -> Vec<String> {
        let mut v: Vec<String> = self.map.keys().cloned().collect();
        v.sort();
        v
    }

    /// The transport for `scheme`, or an error listing the known ones.
    pub fn get(&self, scheme: &str) -> Result<Arc<dyn Transport>, String> {
        self.map.get(scheme).cloned().ok_or_else(|| {
            format!(
                "unknown scheme `{scheme}://` (known: {})",
                self.schemes().join(", ")
            )
        })
    }

    /// Connects to `url` (any registered scheme) within `opts.connect_timeout`.
    pub async fn dial(&self, url: &str, opts: &DialOptions) -> io::Result<BoxStream> {
        let u = Url::parse(url).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let t = self
            .get(&u.scheme)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        tokio::time::timeout(opts.connect_timeout, t.dial(&u, opts))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting to {url} timed out"),
                )
            })?
    }
}
