//! The admin HTTP listener: Prometheus metrics (`/metrics`), the REST API (`/api/v1`, JSON,
//! API keys over HTTP Basic), Server-Sent Events (monitor events, topic tap) and the web
//! dashboard (`/`, one static page, no build step).
//!
//! HTTP/1.1 by hyper (a well-kept server made for the job; HTTP is not our core
//! competence). One task per admin connection; handlers only take the broker's short
//! introspection locks (see `halyard_broker::admin`), so the admin API cannot stall
//! message flow. Request bodies are limited to [`MAX_BODY_BYTES`], header reading to
//! [`HEADER_TIMEOUT`], admin connections to [`MAX_CONNECTIONS`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, info, warn};

use crate::server::Server;

mod api;
pub(crate) mod keys;
pub(crate) mod metrics;
pub(crate) mod sys;

/// Largest request body accepted (a publish with a big payload fits).
pub(crate) const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Time a client has to send its request headers.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin connections served at once (dashboards, scrapers, scripts).
pub(crate) const MAX_CONNECTIONS: usize = 256;
/// Admin connections from one address at once: idle sockets from a few addresses cannot
/// hold all of [`MAX_CONNECTIONS`] for their header timeout.
pub(crate) const MAX_CONNECTIONS_PER_IP: u32 = 16;
/// Wrong API keys from one address within [`KEY_FAILURE_WINDOW`] after which its requests
/// get 429 unchecked until the window ends.
pub(crate) const KEY_FAILURES_PER_WINDOW: u32 = 10;
pub(crate) const KEY_FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at once (for both tables above).
const TRACKED_ADDRESSES: usize = 4096;

pub(crate) type Body = BoxBody<Bytes, Infallible>;

/// The admin routes: method and path pattern. `{x}` matches one path segment
/// (percent-decoded); a trailing `{topic}` matches the rest of the path. The router
/// dispatches from this table and a test checks it against the OpenAPI document.
pub(crate) const ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/v1/stats"),
    ("GET", "/api/v1/clients"),
    ("GET", "/api/v1/clients/{client_id}"),
    ("DELETE", "/api/v1/clients/{client_id}"),
    ("GET", "/api/v1/subscriptions"),
    ("GET", "/api/v1/retained"),
    ("GET", "/api/v1/retained/{topic}"),
    ("DELETE", "/api/v1/retained/{topic}"),
    ("GET", "/api/v1/listeners"),
    ("POST", "/api/v1/listeners/{name}/stop"),
    ("POST", "/api/v1/listeners/{name}/start"),
    ("GET", "/api/v1/bridges"),
    ("POST", "/api/v1/bridges"),
    ("GET", "/api/v1/bridges/{name}"),
    ("DELETE", "/api/v1/bridges/{name}"),
    ("POST", "/api/v1/bridges/{name}/pause"),
    ("POST", "/api/v1/bridges/{name}/resume"),
    ("POST", "/api/v1/publish"),
    ("POST", "/api/v1/reload"),
    ("GET", "/api/v1/events"),
    ("GET", "/api/v1/tap"),
    ("GET", "/api/v1/openapi.json"),
];

/// The OpenAPI document served at `/api/v1/openapi.json`.
pub(crate) const OPENAPI: &str = include_str!("openapi.json");
const DASHBOARD: &str = include_str!("dashboard.html");

/// Where the admin listener runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdminAddr(pub(crate) SocketAddr);

impl std::fmt::Display for AdminAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}", self.0)
    }
}

pub(crate) struct State {
    pub(crate) server: Arc<Server>,
    pub(crate) keys: keys::KeyCache,
    /// Open admin connections per address.
    open: std::sync::Mutex<HashMap<IpAddr, u32>>,
    /// Wrong API keys per address: count and the window's start.
    key_failures: std::sync::Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl State {
    /// Counts a connection from `ip`; `None` when the address holds its share already.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<OpenGuard> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.len() >= TRACKED_ADDRESSES && !open.contains_key(&ip) {
            return None;
        }
        let n = open.entry(ip).or_default();
        if *n >= MAX_CONNECTIONS_PER_IP {
            return None;
        }
        *n += 1;
        Some(OpenGuard(self.clone(), ip))
    }

    fn key_blocked(&self, ip: IpAddr) -> bool {
        let f = self.key_failures.lock().unwrap_or_else(|e| e.into_inner());
        f.get(&ip).is_some_and(|&(n, since)| {
            n >= KEY_FAILURES_PER_WINDOW && since.elapsed() < KEY_FAILURE_WINDOW
        })
    }

    fn key_failed(&self, ip: IpAddr) {
        let mut f = self.key_failures.lock().unwrap_or_else(|e| e.into_inner());
        if f.len() >= TRACKED_ADDRESSES {
            f.retain(|_, (_, since)| since.elapsed() < KEY_FAILURE_WINDOW);
            if f.len() >= TRACKED_ADDRESSES {
                return;
            }
        }
        let e = f.entry(ip).or_insert((0, Instant::now()));
        if e.1.elapsed() >= KEY_FAILURE_WINDOW {
            *e = (0, Instant::now());
        }
        e.0 += 1;
    }
}

/// One admin connection counted against its address until dropped.
struct OpenGuard(Arc<State>, IpAddr);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        let mut open = self.0.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.1);
            }
        }
    }
}

/// Whether `host` (the Host header) names this listener: an IP address, `localhost`, or a
/// name in `admin.hosts`. A missing header (HTTP/1.0) passes: browsers always send it.
fn host_allowed(host: Option<&str>, names: &[String]) -> bool {
    let Some(host) = host else { return true };
    let name = if let Some(v6) = host.strip_prefix('[') {
        return v6
            .split(']')
            .next()
            .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
    } else {
        host.rsplit_once(':').map_or(host, |(n, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                n
            } else {
                host
            }
        })
    };
    name.parse::<IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || names.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Binds the admin listener and serves it until broker shutdown.
pub(crate) async fn start(server: Arc<Server>) -> Result<AdminAddr, String> {
    let cfg = server.config();
    let addr = cfg.admin_addr()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on admin {}: {e}", cfg.admin.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let state = Arc::new(State {
        keys: keys::KeyCache::new(cfg.api_keys_path()),
        server,
        open: Default::default(),
        key_failures: Default::default(),
    });
    if state.keys.is_empty() {
        warn!(
            file = %cfg.api_keys_path().display(),
            "no admin API keys: /api/v1 refuses every request until one is made with `halyard apikey create NAME`"
        );
    }
    let mut shutdown = state.server.broker.shutdown_signal();
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown_begins(&mut shutdown) => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: pause instead of spinning.
                        debug!(error = %e, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                debug!(%peer, "admin connection limit reached");
                continue; // dropped: closes the socket
            };
            let Some(counted) = state.admit(peer.ip()) else {
                debug!(%peer, "admin connections per address reached");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let state = state.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(state, req, peer).await) }
                });
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(64 * 1024);
                if let Err(e) = builder
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await
                {
                    debug!(%peer, error = %e, "admin connection ended");
                }
                drop(permit);
                drop(counted);
            });
        }
    });
    info!(url = %AdminAddr(local), "admin API, metrics and dashboard listening");
    Ok(AdminAddr(local))
}

/// Resolves once graceful shutdown has begun (the guard `wait_for` returns is not `Send`).
pub(crate) async fn shutdown_begins(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|&v| v).await;
}

/// An API error: HTTP status, a stable code, a message for people.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) code: &'static str,
    pub(crate) message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", message)
    }
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", message)
    }
}

pub(crate) fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

/// No `WWW-Authenticate` on a 401: a browser would prompt for the key, then send it
/// with every later request to this origin, including requests forged by other sites
/// (see [`refuse_forgery`]). API clients send Basic credentials unasked (`curl -u`); the
/// dashboard has its own form.
fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.status, &json!({"code": e.code, "message": e.message}))
}

/// Refuses a state-changing request a browser could have sent for another site (CSRF):
/// one marked cross-site (`Sec-Fetch-Site`) or from another `Origin`, and one whose body is
/// not declared JSON without the dashboard's header. HTML forms can send neither a JSON
/// content type nor a custom header, and `fetch` cannot send them cross-site without a
/// CORS preflight, which this API never grants.
fn refuse_forgery(headers: &header::HeaderMap) -> Result<(), ApiError> {
    let forbidden = |m: &str| ApiError::new(StatusCode::FORBIDDEN, "FORBIDDEN", m);
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text("sec-fetch-site")
        && !matches!(site, "same-origin" | "none")
    {
        return Err(forbidden("cross-site request refused"));
    }
    if let Some(origin) = text("origin") {
        let host = text("host").unwrap_or("");
        let same = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|o| o.eq_ignore_ascii_case(host));
        if !same {
            return Err(forbidden("request from another origin refused"));
        }
    }
    let json = text("content-type").is_some_and(|t| {
        t.split(';')
            .next()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
    });
    if !json && !headers.contains_key("x-halyard-ui") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
            "send Content-Type: application/json",
        ));
    }
    Ok(())
}

/// Headers on every admin response: no framing (clickjacking), no MIME sniffing, no
/// referrer, and a content policy that lets the dashboard load nothing from elsewhere.
fn harden(r: &mut Response<Body>) {
    let h = r.headers_mut();
    for (k, v) in [
        (
            "content-security-policy",
            "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
    ] {
        h.insert(k, header::HeaderValue::from_static(v));
    }
}

fn text_response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(body.into()).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

async fn handle(state: Arc<State>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let mut r = respond(state, req, peer).await;
    harden(&mut r);
    r
}

async fn respond(state: Arc<State>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    if !host_allowed(host, &state.server.config().admin.hosts) {
        return error_response(&ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "MISDIRECTED_REQUEST",
            "this Host is not the admin listener's: use its address, or list the name in admin.hosts",
        ));
    }
    let r = match (method.as_str(), path.as_str()) {
        ("GET", "/" | "/index.html") => Ok(text_response(
            StatusCode::OK,
            "text/html; charset=utf-8",
            DASHBOARD,
        )),
        ("GET", "/healthz") => Ok(text_response(StatusCode::OK, "text/plain", "ok\n")),
        ("GET", "/metrics") => {
            if state.server.config().admin.metrics_auth
                && let Err(e) = checked_key(&state, &req, peer).await
            {
                return error_response(&e);
            }
            Ok(text_response(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                metrics::render(&state.server).await,
            ))
        }
        (_, p) if p.starts_with("/api/v1/") => route(&state, req, peer).await,
        _ => Err(ApiError::not_found(format!("no such page: {path}"))),
    };
    r.unwrap_or_else(|e| {
        if e.status.is_server_error() {
            warn!(%peer, %method, path, code = e.code, message = %e.message, "admin request failed");
        }
        error_response(&e)
    })
}

/// Matches `path` against a route pattern; returns the decoded parameters.
pub(crate) fn match_route(pattern: &str, path: &str) -> Option<Vec<String>> {
    let pat: Vec<&str> = pattern.trim_start_matches('/').split('/').collect();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let mut params = Vec::new();
    for (i, p) in pat.iter().enumerate() {
        if *p == "{topic}" && i == pat.len() - 1 {
            // The rest of the path: a topic's levels.
            let rest = segs.get(i..)?;
            let decoded: Option<Vec<String>> = rest.iter().map(|s| percent_decode(s)).collect();
            params.push(decoded?.join("/"));
            return Some(params);
        }
        let s = segs.get(i)?;
        if p.starts_with('{') {
            if s.is_empty() {
                return None;
            }
            params.push(percent_decode(s)?);
        } else if p != s {
            return None;
        }
    }
    (segs.len() == pat.len()).then_some(params)
}

/// `%XX` decoding; None for bad escapes or non-UTF-8 results.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Query string parameters (`+` is a space, `%XX` decoded).
pub(crate) fn query(req: &Request<Incoming>) -> Vec<(String, String)> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((
                percent_decode(&k.replace('+', " "))?,
                percent_decode(&v.replace('+', " "))?,
            ))
        })
        .collect()
}

async fn route(
    state: &Arc<State>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let mut allowed = Vec::new();
    for (m, pattern) in ROUTES {
        let Some(params) = match_route(pattern, &path) else {
            continue;
        };
        if *m != method.as_str() {
            allowed.push(*m);
            continue;
        }
        if method != Method::GET {
            refuse_forgery(req.headers())?;
        }
        if *pattern != "/api/v1/openapi.json" {
            let key = checked_key(state, &req, peer).await?;
            if method != Method::GET {
                info!(%peer, key, %method, path, "admin API call");
            }
        }
        return api::dispatch(state, pattern, params, req).await;
    }
    if allowed.is_empty() {
        Err(ApiError::not_found(format!("no such endpoint: {path}")))
    } else {
        Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            format!("{path} allows {}", allowed.join(", ")),
        ))
    }
}

/// The API key of a request, with wrong keys counted per address: past
/// [`KEY_FAILURES_PER_WINDOW`] the address gets 429 without a check, so keys cannot be
/// guessed quickly nor the hash used to burn CPU. Each wrong key is logged (within the
/// shared log budget).
async fn checked_key(
    state: &Arc<State>,
    req: &Request<Incoming>,
    peer: SocketAddr,
) -> Result<String, ApiError> {
    if state.key_blocked(peer.ip()) {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "TOO_MANY_REQUESTS",
            "too many wrong API keys from this address; try later",
        ));
    }
    let r = state.keys.check(req.headers()).await;
    // A request without credentials is not a guess (a first dashboard load, curl
    // without -u); one with wrong credentials is.
    if r.is_err() && req.headers().contains_key(header::AUTHORIZATION) {
        state.key_failed(peer.ip());
        if let Some(suppressed) = KEY_LOG.admit() {
            warn!(%peer, path = req.uri().path(), suppressed, "admin API: wrong API key");
        }
    }
    r
}

static KEY_LOG: std::sync::LazyLock<halyard_transport::LogBudget> =
    std::sync::LazyLock::new(|| {
        halyard_transport::LogBudget::new(halyard_transport::LOG_LINES_PER_SECOND)
    });

/// Reads a JSON request body (at most [`MAX_BODY_BYTES`]).
pub(crate) async fn read_json(req: Request<Incoming>) -> Result<Value, ApiError> {
    let body = http_body_util::Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "BAD_REQUEST",
                format!("request body: {e} (limit {MAX_BODY_BYTES} bytes)"),
            )
        })?
        .to_bytes();
    if body.is_empty() {
        return Ok(Value::Object(Default::default()));
    }
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("request body is not valid JSON: {e}")))
}

/// A streamed body fed by a channel (Server-Sent Events).
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// A `text/event-stream` response and the sender that feeds it. The stream ends when the
/// sender is dropped; a send fails once the client has gone.
pub(crate) fn sse() -> (mpsc::Sender<Bytes>, Response<Body>) {
    let (tx, rx) = mpsc::channel(64);
    let resp = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-store")
        .body(BodyExt::boxed(ChannelBody { rx }))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()));
    (tx, resp)
}

/// One SSE event.
pub(crate) fn sse_event(event: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DNS rebinding: only the listener's own names are answered.
    #[test]
    fn hosts_are_addresses_localhost_or_listed() {
        let names = vec!["broker.example".to_string()];
        for (host, ok) in [
            (Some("127.0.0.1:18083"), true),
            (Some("[::1]:18083"), true),
            (Some("10.1.2.3"), true),
            (Some("localhost:18083"), true),
            (Some("Broker.Example:18083"), true),
            (Some("broker.example"), true),
            (Some("evil.example:18083"), false),
            (Some("[not-v6]:1"), false),
            (None, true),
        ] {
            assert_eq!(host_allowed(host, &names), ok, "{host:?}");
        }
        assert!(!host_allowed(Some("broker.example"), &[]));
    }

    #[test]
    fn routes_match_with_decoded_params() {
        assert_eq!(
            match_route("/api/v1/clients/{client_id}", "/api/v1/clients/a%2Fb"),
            Some(vec!["a/b".to_string()])
        );
        assert_eq!(
            match_route("/api/v1/retained/{topic}", "/api/v1/retained/a/b/%23x"),
            Some(vec!["a/b/#x".to_string()])
        );
        assert_eq!(
            match_route("/api/v1/clients/{client_id}", "/api/v1/clients/"),
            None
        );
        assert_eq!(match_route("/api/v1/stats", "/api/v1/stats/x"), None);
        assert_eq!(
            match_route(
                "/api/v1/listeners/{name}/stop",
                "/api/v1/listeners/tcp%3A%2F%2F127.0.0.1%3A1883/stop"
            ),
            Some(vec!["tcp://127.0.0.1:1883".to_string()])
        );
        assert_eq!(percent_decode("%zz"), None);
    }

    /// The OpenAPI document lists exactly the routes the router serves.
    #[test]
    fn openapi_document_matches_the_routes() {
        let doc: Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
        assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
        let mut documented = Vec::new();
        for (path, ops) in doc["paths"].as_object().expect("paths") {
            for (method, op) in ops.as_object().expect("operations") {
                assert!(op["responses"].is_object(), "{method} {path} has responses");
                documented.push((method.to_uppercase(), path.clone()));
            }
        }
        let mut routed: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        documented.sort();
        routed.sort();
        assert_eq!(documented, routed);
    }
}
