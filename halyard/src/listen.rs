//! Listener URLs. This version serves `tcp://host:port`; the transport registry (TLS,
//! WebSocket, Unix sockets) extends the same parse.

/// A listener endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Tcp(String),
}

pub(crate) fn parse(url: &str) -> Result<Endpoint, String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!("`{url}` is not a URL like tcp://127.0.0.1:1883"));
    };
    match scheme {
        "tcp" => {
            if rest
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(format!("`{url}` needs host:port, e.g. tcp://0.0.0.0:1883"));
            }
            Ok(Endpoint::Tcp(rest.to_string()))
        }
        "tls" | "ws" | "wss" | "unix" => Err(format!(
            "scheme `{scheme}://` is not supported by this build yet"
        )),
        other => Err(format!("unknown scheme `{other}://` in `{url}`")),
    }
}
