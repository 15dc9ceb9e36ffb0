//! The admin listener over real HTTP, against a Halyard process: REST API endpoints,
//! Server-Sent Events, Prometheus output (parsed by the `prometheus_client` Python parser),
//! `$SYS` names compared with what a real Mosquitto publishes, hot reload (API and SIGHUP),
//! sd_notify readiness, JSON logs with per-connection spans. MQTT clients are
//! mosquitto_sub/mosquitto_pub (3.1.1 and 5.0).

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{WAIT, free_ports, halyard_bin, run, temp_dir};
use serde_json::Value;

struct Halyard {
    child: Child,
    dir: PathBuf,
    conf: PathBuf,
    mqtt: u16,
    admin: u16,
    key: String,
}

impl Drop for Halyard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Kept after a failure: its halyard.log says what happened.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A test's scratch directory, removed when the test passes (kept when it fails).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn config(dir: &Path, mqtt: &[u16], admin: u16, extra: &str) -> String {
    let listen: Vec<String> = mqtt
        .iter()
        .map(|p| format!("\"tcp://127.0.0.1:{p}\""))
        .collect();
    format!(
        "listen = [{}]\ndata_dir = \"{}\"\nsys_interval = 1\n{extra}\n[admin]\nlisten = \"http://127.0.0.1:{admin}\"\n",
        listen.join(", "),
        dir.join("data").display()
    )
}

fn start(tag: &str, extra: &str, envs: &[(&str, &str)]) -> Halyard {
    let dir = temp_dir(tag);
    let [mqtt, admin] = free_ports();
    let conf = dir.join("halyard.toml");
    std::fs::write(&conf, config(&dir, &[mqtt], admin, extra)).expect("conf");
    let (key, err, code) = run(
        halyard_bin(),
        &[
            "apikey",
            "create",
            "tester",
            "--data-dir",
            &dir.join("data").display().to_string(),
        ],
    );
    assert_eq!(code, 0, "apikey create: {err}");
    let log = std::fs::File::create(dir.join("halyard.log")).expect("log");
    let mut cmd = Command::new(halyard_bin());
    cmd.args(["serve", "-c"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(log);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("start halyard");
    let h = Halyard {
        child,
        dir,
        conf,
        mqtt,
        admin,
        key: key.trim().to_string(),
    };
    wait_until("admin listener up", || {
        TcpStream::connect(("127.0.0.1", admin)).is_ok()
    });
    wait_until("mqtt listener up", || {
        TcpStream::connect(("127.0.0.1", mqtt)).is_ok()
    });
    h
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn basic(key: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// One HTTP/1.1 request; (status, headers, body).
fn http(
    port: u16,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect admin");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    if let Some(k) = key {
        req.push_str(&format!("Authorization: {}\r\n", basic(k)));
    }
    let body = body.unwrap_or("");
    req.push_str(&format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("a response");
    let status = head[9..12].parse().expect("status");
    (status, head.to_string(), body.to_string())
}

fn json(port: u16, method: &str, path: &str, key: &str, body: Option<&str>) -> (u16, Value) {
    let (status, head, b) = http(port, method, path, Some(key), body);
    assert!(
        head.to_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    (
        status,
        serde_json::from_str(&b).unwrap_or_else(|e| panic!("{b}: {e}")),
    )
}

/// Opens an SSE stream; returns a line reader.
fn sse(port: u16, path: &str, key: &str) -> BufReader<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect admin");
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {}\r\n\r\n",
        basic(key)
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("200"), "{line}");
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
    }
    r
}

/// Reads SSE lines until an `event: kind` whose data satisfies `f`.
fn next_event(r: &mut BufReader<TcpStream>, kind: &str, f: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    let mut current = String::new();
    loop {
        assert!(t.elapsed() < WAIT, "no {kind} event");
        let mut line = String::new();
        r.read_line(&mut line).expect("sse read");
        // Chunked transfer: skip chunk-size lines.
        if let Some(ev) = line.trim_end().strip_prefix("event: ") {
            current = ev.to_string();
        } else if let Some(data) = line.trim_end().strip_prefix("data: ")
            && current == kind
        {
            let v: Value = serde_json::from_str(data).expect("event data is JSON");
            if f(&v) {
                return v;
            }
        }
    }
}

fn mosquitto_sub(port: u16, id: &str, topic: &str, v5: bool) -> Child {
    let mut c = Command::new("mosquitto_sub");
    c.args([
        "-p",
        &port.to_string(),
        "-i",
        id,
        "-t",
        topic,
        "-q",
        "1",
        "-v",
    ]);
    if v5 {
        c.args(["-V", "mqttv5"]);
    }
    c.stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_sub")
}

fn exited_within(c: &mut Child, d: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < d {
        if c.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// One request with exactly these extra header lines; (status, body).
fn raw_http(port: u16, method: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect admin");
    s.set_read_timeout(Some(WAIT)).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("a response");
    (head[9..12].parse().expect("status"), body.to_string())
}

/// Cross-site request forgery: what a hostile page can make a browser send with the
/// credentials it holds for the admin API (an HTML form: text/plain, url-encoded or
/// multipart bodies; any request marked cross-site or from another origin) changes
/// nothing; the API's own clients (JSON bodies, the dashboard's header) still work, and
/// the Basic scheme is read case-insensitively.
#[test]
fn forged_admin_requests_are_refused() {
    let h = start("admin-csrf", "", &[]);
    let (a, k) = (h.admin, h.key.as_str());
    let auth = format!("Authorization: {}\r\n", basic(k));
    let body = r#"{"topic":"ha/test","payload":"x","retain":true}"#;
    let port = a;
    for (headers, status) in [
        (format!("{auth}Content-Type: text/plain\r\n"), 415),
        (
            format!("{auth}Content-Type: application/x-www-form-urlencoded\r\n"),
            415,
        ),
        (
            format!("{auth}Content-Type: multipart/form-data; boundary=x\r\n"),
            415,
        ),
        (auth.clone(), 415),
        (
            format!("{auth}Content-Type: application/json\r\nOrigin: http://evil.example\r\n"),
            403,
        ),
        (
            format!("{auth}Content-Type: application/json\r\nSec-Fetch-Site: cross-site\r\n"),
            403,
        ),
    ] {
        let (st, b) = raw_http(a, "POST", "/api/v1/publish", &headers, body);
        assert_eq!(st, status, "{headers}: {b}");
    }
    let (_, r) = json(a, "GET", "/api/v1/retained", k, None);
    assert!(
        !r.to_string().contains("ha/test"),
        "a forged request published: {r}"
    );
    // The API's own clients.
    let lower = format!(
        "Authorization: basic {}\r\nContent-Type: application/json; charset=utf-8\r\nOrigin: http://127.0.0.1:{port}\r\n",
        basic(k).trim_start_matches("Basic ")
    );
    let (st, b) = raw_http(a, "POST", "/api/v1/publish", &lower, body);
    assert_eq!(st, 200, "{b}");
    let ui = format!("{auth}X-Halyard-UI: 1\r\nSec-Fetch-Site: same-origin\r\n");
    let (st, b) = raw_http(a, "POST", "/api/v1/publish", &ui, body);
    assert_eq!(st, 200, "{b}");
}

/// The admin listener under hostile use: idle sockets from one address cannot take all
/// its connections; a Host that is not the listener's (DNS rebinding) gets 421; wrong API
/// keys are counted per address and past ten the address gets 429, right key or not.
#[test]
fn admin_listener_limits_per_address_hosts_and_wrong_keys() {
    let h = start("admin-hostile", "", &[]);
    let (a, k) = (h.admin, h.key.as_str());
    // 16 idle sockets (MAX_CONNECTIONS_PER_IP) are held; the 17th is closed at once.
    let idle: Vec<TcpStream> = (0..16)
        .map(|_| TcpStream::connect(("127.0.0.1", a)).unwrap())
        .collect();
    let closed_at_once = || {
        let mut s = TcpStream::connect(("127.0.0.1", a)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    };
    wait_until("the 17th socket refused", closed_at_once);
    drop(idle);
    // Until the broker has seen them close, a new connection may still be refused (and
    // reset mid-request): any I/O error means "not yet".
    let healthz = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect(("127.0.0.1", a))?;
        s.set_read_timeout(Some(WAIT))?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out.starts_with("HTTP/1.1 200"))
    };
    wait_until("served again once the idle sockets close", || {
        healthz().unwrap_or(false)
    });
    // DNS rebinding: the browser sends the attacker's name as Host.
    let with_host = |host: &str| {
        let mut s = TcpStream::connect(("127.0.0.1", a)).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out[9..12].parse::<u16>().unwrap()
    };
    assert_eq!(with_host("rebind.evil.example"), 421);
    assert_eq!(with_host(&format!("rebind.evil.example:{a}")), 421);
    assert_eq!(with_host(&format!("127.0.0.1:{a}")), 200);
    assert_eq!(with_host(&format!("localhost:{a}")), 200);
    assert_eq!(with_host(&format!("[::1]:{a}")), 200);
    // Wrong keys: ten answered 401, then 429 for that address, the right key included.
    for _ in 0..10 {
        let (st, e) = json(a, "GET", "/api/v1/stats", "tester:wrong", None);
        assert_eq!((st, e["code"].as_str()), (401, Some("UNAUTHORIZED")));
    }
    let (st, e) = json(a, "GET", "/api/v1/stats", k, None);
    assert_eq!(
        (st, e["code"].as_str()),
        (429, Some("TOO_MANY_REQUESTS")),
        "{e}"
    );
    let log = std::fs::read_to_string(h.dir.join("halyard.log")).unwrap();
    assert!(log.contains("wrong API key"), "{log}");
}

#[test]
fn rest_api_endpoints_with_api_keys() {
    let h = start("admin-api", "", &[]);
    let (a, k) = (h.admin, h.key.as_str());

    // Authentication: none, wrong, right. Errors are JSON with code and message.
    let (st, head, body) = http(a, "GET", "/api/v1/stats", None, None);
    assert_eq!(st, 401);
    // No browser prompt: a browser that answered it would send the key with requests
    // other sites forge.
    assert!(!head.to_lowercase().contains("www-authenticate"), "{head}");
    assert!(head.contains("x-frame-options: DENY"), "{head}");
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["code"], "UNAUTHORIZED");
    assert!(e["message"].as_str().unwrap().contains("Basic"));
    let (st, e) = json(a, "GET", "/api/v1/stats", "tester:wrong", None);
    assert_eq!((st, e["code"].as_str()), (401, Some("UNAUTHORIZED")));
    let (st, stats) = json(a, "GET", "/api/v1/stats", k, None);
    assert_eq!(st, 200);
    assert_eq!(stats["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(stats["listeners"][0]["state"], "listening");
    let (st, e) = json(a, "GET", "/api/v1/nope", k, None);
    assert_eq!((st, e["code"].as_str()), (404, Some("NOT_FOUND")));
    let (st, e) = json(a, "PUT", "/api/v1/stats", k, None);
    assert_eq!((st, e["code"].as_str()), (405, Some("METHOD_NOT_ALLOWED")));
    // The OpenAPI document needs no key and is JSON.
    let (st, _, doc) = http(a, "GET", "/api/v1/openapi.json", None, None);
    assert_eq!(st, 200);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    assert!(doc["paths"]["/api/v1/clients/{client_id}"]["delete"].is_object());

    // Clients over 3.1.1 and 5.0.
    let mut s311 = mosquitto_sub(h.mqtt, "sub-311", "t/#", false);
    let mut s5 = mosquitto_sub(h.mqtt, "sub-v5", "t/+/x", true);
    wait_until("two clients", || {
        json(a, "GET", "/api/v1/clients?connected=true", k, None).1["meta"]["count"] == 2
    });
    let (_, page) = json(a, "GET", "/api/v1/clients?limit=1&page=2", k, None);
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    assert_eq!(
        page["data"][0]["client_id"], "sub-v5",
        "sorted by client id, page 2 of 1-item pages"
    );
    assert_eq!(page["meta"]["count"], 2);
    let (_, like) = json(a, "GET", "/api/v1/clients?like=311", k, None);
    assert_eq!(like["data"][0]["client_id"], "sub-311");
    assert_eq!(like["data"][0]["protocol"], "3.1.1");
    let (st, e) = json(a, "GET", "/api/v1/clients?limit=0", k, None);
    assert_eq!((st, e["code"].as_str()), (400, Some("BAD_REQUEST")));
    // Pages start at 1: page=0 is refused, not read as page 1.
    let (st, e) = json(a, "GET", "/api/v1/clients?page=0", k, None);
    assert_eq!(st, 400, "{e}");
    let (st, one) = json(a, "GET", "/api/v1/clients/sub-v5", k, None);
    assert_eq!(st, 200);
    assert_eq!(one["protocol"], "5.0");
    assert_eq!(one["subscriptions"][0]["filter"], "t/+/x");
    assert_eq!(one["subscriptions"][0]["qos"], 1);
    let (st, _) = json(a, "GET", "/api/v1/clients/nobody", k, None);
    assert_eq!(st, 404);
    let (_, subs) = json(a, "GET", "/api/v1/subscriptions?client_id=sub-311", k, None);
    assert_eq!(subs["data"].as_array().unwrap().len(), 1);
    assert_eq!(subs["data"][0]["filter"], "t/#");

    // Publish through the API: QoS 1, retained, with properties; both clients get it.
    let (st, r) = json(
        a,
        "POST",
        "/api/v1/publish",
        k,
        Some(
            r#"{"topic":"t/a/x","payload":"from-api","qos":1,"retain":true,"properties":{"content_type":"text/plain","user_properties":{"k":"v"}}}"#,
        ),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["matched_subscriptions"], 2);
    for (name, c) in [("3.1.1", &mut s311), ("5.0", &mut s5)] {
        let mut line = String::new();
        BufReader::new(c.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "t/a/x from-api\n", "{name} subscriber");
    }
    for (body, code) in [
        (r#"{"topic":"t/#","payload":"x"}"#, "BAD_REQUEST"),
        (r#"{"topic":"$SYS/x","payload":"x"}"#, "BAD_REQUEST"),
        (r#"{"topic":"t","qos":3}"#, "BAD_REQUEST"),
        (
            r#"{"topic":"t","payload":"%%","payload_encoding":"base64"}"#,
            "BAD_REQUEST",
        ),
        (r#"{"topic":"t","properties":{"bogus":1}}"#, "BAD_REQUEST"),
        (r#"{not json"#, "BAD_REQUEST"),
        (r#"{"payload":"no topic"}"#, "BAD_REQUEST"),
        // A misspelt field is refused, not ignored: `paylod` with `retain` would have
        // deleted the retained message.
        (r#"{"topic":"t","paylod":"x","retain":true}"#, "BAD_REQUEST"),
        (r#"{"topic":"t","retain":true}"#, "BAD_REQUEST"),
    ] {
        let (st, e) = json(a, "POST", "/api/v1/publish", k, Some(body));
        assert_eq!((st, e["code"].as_str()), (400, Some(code)), "{body}: {e}");
    }

    // Retained: list, read (levels in the path), delete (nothing published), 404 after.
    let (_, list) = json(a, "GET", "/api/v1/retained?filter=t/%23", k, None);
    assert_eq!(list["meta"]["count"], 1);
    assert_eq!(list["data"][0]["payload"], "from-api");
    assert_eq!(list["data"][0]["properties"]["content_type"], "text/plain");
    assert_eq!(list["data"][0]["properties"]["user_properties"][0][0], "k");
    let (st, m) = json(a, "GET", "/api/v1/retained/t/a/x", k, None);
    assert_eq!((st, m["qos"].as_u64()), (200, Some(1)));
    let (st, _) = json(a, "DELETE", "/api/v1/retained/t/a/x", k, None);
    assert_eq!(st, 200);
    let (st, _) = json(a, "GET", "/api/v1/retained/t/a/x", k, None);
    assert_eq!(st, 404);
    let (_, out, _) = run(
        "mosquitto_sub",
        &[
            "-p",
            &h.mqtt.to_string(),
            "-t",
            "t/#",
            "--retained-only",
            "-W",
            "1",
        ],
    );
    assert!(
        !out.contains("t/a/x"),
        "a deleted retained message is not delivered: {out}"
    );

    // Kick: the v5 client gets DISCONNECT 0x98 and mosquitto_sub exits; 3.1.1 too (its
    // connection is closed). Kicking an offline client is a 404.
    let (st, r) = json(a, "DELETE", "/api/v1/clients/sub-v5", k, None);
    assert_eq!((st, r["kicked"].as_bool()), (200, Some(true)));
    assert!(exited_within(&mut s5, WAIT), "kicked v5 client exits");
    let (st, _) = json(a, "DELETE", "/api/v1/clients/sub-v5", k, None);
    assert_eq!(st, 404);
    let _ = s311.kill();
    let _ = s311.wait();

    // Listeners: stop (connections refused), start again.
    let (_, ls) = json(a, "GET", "/api/v1/listeners", k, None);
    let name = ls["data"][0]["name"].as_str().unwrap().to_string();
    assert_eq!(ls["data"][0]["state"], "listening");
    assert!(ls["data"][0]["accepted"].as_u64().unwrap() >= 2);
    let enc = name.replace(':', "%3A").replace('/', "%2F");
    let (st, r) = json(a, "POST", &format!("/api/v1/listeners/{enc}/stop"), k, None);
    assert_eq!((st, r["changed"].as_bool()), (200, Some(true)));
    assert!(
        TcpStream::connect(("127.0.0.1", h.mqtt)).is_err(),
        "stopped listener refuses"
    );
    let (_, ls) = json(a, "GET", "/api/v1/listeners", k, None);
    assert_eq!(ls["data"][0]["state"], "stopped");
    let (st, _) = json(
        a,
        "POST",
        &format!("/api/v1/listeners/{enc}/start"),
        k,
        None,
    );
    assert_eq!(st, 200);
    let (_, _, code) = run(
        "mosquitto_pub",
        &["-p", &h.mqtt.to_string(), "-t", "x", "-m", "y"],
    );
    assert_eq!(code, 0, "started listener accepts");
    let (st, _) = json(
        a,
        "POST",
        "/api/v1/listeners/tcp%3A%2F%2Fnope/stop",
        k,
        None,
    );
    assert_eq!(st, 404);
}

#[test]
fn events_and_topic_tap_stream_as_server_sent_events() {
    let h = start("admin-sse", "max_client_id_length = 12\n", &[]);
    let mut events = sse(h.admin, "/api/v1/events", &h.key);
    next_event(&mut events, "hello", |_| true);
    let mut tap = sse(h.admin, "/api/v1/tap?filter=tap/%23", &h.key);
    next_event(&mut tap, "hello", |v| v["filter"] == "tap/#");
    let port = h.mqtt.to_string();
    for v in ["mqttv311", "mqttv5"] {
        let (_, err, code) = run(
            "mosquitto_pub",
            &[
                "-p",
                &port,
                "-V",
                v,
                "-i",
                &format!("pub-{v}"),
                "-t",
                &format!("tap/{v}"),
                "-m",
                "seen",
                "-q",
                "1",
            ],
        );
        assert_eq!(code, 0, "{err}");
        let c = next_event(&mut events, "connected", |e| {
            e["client_id"] == format!("pub-{v}")
        });
        assert!(c["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
        next_event(&mut events, "disconnected", |e| {
            e["client_id"] == format!("pub-{v}")
        });
        let m = next_event(&mut tap, "message", |m| m["topic"] == format!("tap/{v}"));
        assert_eq!(m["payload"], "seen");
        assert_eq!(m["from_client_id"], format!("pub-{v}"));
    }
    // A refused login shows up too.
    let (_, _, code) = run(
        "mosquitto_pub",
        &[
            "-p",
            &port,
            "-i",
            "a-much-too-long-id",
            "-t",
            "x",
            "-m",
            "y",
        ],
    );
    assert_ne!(code, 0);
    next_event(&mut events, "auth_failed", |e| {
        e["client_id"] == "a-much-too-long-id"
    });
    let (st, e) = json(h.admin, "GET", "/api/v1/tap?filter=a/%23/b", &h.key, None);
    assert_eq!((st, e["code"].as_str()), (400, Some("BAD_REQUEST")));
}

#[test]
fn prometheus_metrics_parse_with_the_reference_parser() {
    let h = start("admin-metrics", "", &[]);
    let port = h.mqtt.to_string();
    // Retained, so the QoS 1/2 messages are stored (and synced) though nobody subscribes.
    for q in ["0", "1", "2"] {
        let (_, err, code) = run(
            "mosquitto_pub",
            &["-p", &port, "-t", "m/x", "-m", "p", "-q", q, "-r"],
        );
        assert_eq!(code, 0, "{err}");
    }
    let (st, head, text) = http(h.admin, "GET", "/metrics", None, None);
    assert_eq!(st, 200);
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    // The prometheus_client package's text parser must accept all of it.
    let script = r#"
import sys, json
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
        out[key] = s.value
    out["type:" + fam.name] = fam.type
print(json.dumps(out))
"#;
    let (out, err, code) =
        common::run_with_stdin("python3", &["-c", script], Some(text.as_bytes()));
    assert_eq!(code, 0, "prometheus_client parser failed: {err}");
    let m: Value = serde_json::from_str(&out).unwrap();
    // The parser names counter samples `<family>_total`.
    assert_eq!(m["halyard_messages_qos0_received_total"], 1.0);
    assert_eq!(m["halyard_messages_qos1_received_total"], 1.0);
    assert_eq!(m["halyard_messages_qos2_received_total"], 1.0);
    assert_eq!(m["halyard_messages_received_total"], 3.0);
    assert_eq!(m["type:halyard_messages_received"], "counter");
    assert_eq!(m["halyard_connections_total"], 3.0);
    assert_eq!(m["type:halyard_store_sync_seconds"], "histogram");
    assert_eq!(m["type:halyard_connections_count"], "gauge");
    assert_eq!(
        m[format!("halyard_listener_up{{listener=tcp://127.0.0.1:{port}}}")],
        1.0
    );
    assert!(
        m["halyard_store_sync_seconds_count"].as_f64().unwrap() >= 1.0,
        "QoS 1/2 publishes were synced"
    );
    assert_eq!(
        m["halyard_messages_dropped_by_reason_total{reason=no_subscribers}"],
        3.0
    );
}

/// Every `$SYS/broker/...` topic a real Mosquitto publishes, Halyard publishes too, except
/// `heap/*` (Mosquitto's allocator statistics).
#[test]
fn sys_topics_cover_mosquittos_names() {
    let collect = |port: u16| -> BTreeSet<String> {
        // Two intervals, so periodic topics show up at least once.
        let (out, _, _) = run(
            "mosquitto_sub",
            &["-p", &port.to_string(), "-t", "$SYS/#", "-v", "-W", "3"],
        );
        out.lines()
            .filter_map(|l| l.split_once(' ').map(|(t, _)| t.to_string()))
            .collect()
    };
    let dir = temp_dir("sys-mosq");
    let _scratch = Scratch(dir.clone());
    let [mport] = free_ports();
    let conf = dir.join("m.conf");
    std::fs::write(
        &conf,
        format!("listener {mport} 127.0.0.1\nallow_anonymous true\nsys_interval 1\n"),
    )
    .unwrap();
    let mut mosq = Command::new(common::mosquitto_path())
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto");
    wait_until("mosquitto up", || {
        TcpStream::connect(("127.0.0.1", mport)).is_ok()
    });
    let theirs = collect(mport);
    let _ = mosq.kill();
    let _ = mosq.wait();
    assert!(theirs.len() > 30, "mosquitto published {theirs:?}");

    let h = start("sys-halyard", "", &[]);
    let ours = collect(h.mqtt);
    let missing: Vec<&String> = theirs
        .iter()
        .filter(|t| !t.starts_with("$SYS/broker/heap/"))
        .filter(|t| !ours.contains(*t))
        .collect();
    assert!(
        missing.is_empty(),
        "$SYS topics Mosquitto has and we lack: {missing:?}"
    );
    assert!(ours.contains("$SYS/halyard/queue/overflows"));
    assert!(
        ours.iter()
            .any(|t| t.starts_with("$SYS/halyard/listeners/"))
    );
    let (out, _, _) = run(
        "mosquitto_sub",
        &[
            "-p",
            &h.mqtt.to_string(),
            "-t",
            "$SYS/broker/version",
            "-C",
            "1",
        ],
    );
    assert!(out.starts_with("halyard version "), "{out}");
}

/// Hot reload through the API and SIGHUP: a listener added and one removed, a limit and the
/// log level changed, TLS-free here; a client on a listener that stays keeps its
/// connection; a broken configuration changes nothing and says why.
#[test]
fn reload_adds_and_removes_listeners_and_applies_limits() {
    let h = start("admin-reload", "", &[]);
    let (a, k) = (h.admin, h.key.as_str());
    let mut sub = mosquitto_sub(h.mqtt, "stays", "r/#", true);
    wait_until("subscriber", || {
        json(a, "GET", "/api/v1/clients?connected=true", k, None).1["meta"]["count"] == 1
    });
    let [p2] = free_ports();
    std::fs::write(
        &h.conf,
        config(
            &h.dir,
            &[h.mqtt, p2],
            a,
            "max_client_id_length = 5\nlog_level = \"debug\"\n",
        ),
    )
    .unwrap();
    let (st, r) = json(a, "POST", "/api/v1/reload", k, None);
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["listeners_added"][0], format!("tcp://127.0.0.1:{p2}"));
    assert_eq!(r["log_level"], "debug");
    let (_, _, code) = run(
        "mosquitto_pub",
        &[
            "-p",
            &p2.to_string(),
            "-i",
            "ok",
            "-t",
            "r/1",
            "-m",
            "via-new-listener",
            "-q",
            "1",
        ],
    );
    assert_eq!(code, 0, "the added listener serves");
    let mut line = String::new();
    BufReader::new(sub.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        line, "r/1 via-new-listener\n",
        "the client on the kept listener is still connected"
    );
    // The new limit applies to new connections: a 6-byte client id is refused (3.1.1: 2).
    let (_, err, code) = run(
        "mosquitto_pub",
        &["-p", &p2.to_string(), "-i", "sixsix", "-t", "r", "-m", "x"],
    );
    assert_ne!(
        code, 0,
        "client id over the reloaded max_client_id_length: {err}"
    );
    // Remove the first listener (the subscriber's): it stops accepting.
    std::fs::write(&h.conf, config(&h.dir, &[p2], a, "")).unwrap();
    let (st, r) = json(a, "POST", "/api/v1/reload", k, None);
    assert_eq!(st, 200, "{r}");
    assert_eq!(
        r["listeners_removed"][0],
        format!("tcp://127.0.0.1:{}", h.mqtt)
    );
    assert!(TcpStream::connect(("127.0.0.1", h.mqtt)).is_err());

    // A broken file: 422 with file, line and key; nothing changes.
    std::fs::write(&h.conf, config(&h.dir, &[p2], a, "max_qos = 7\n")).unwrap();
    let (st, e) = json(a, "POST", "/api/v1/reload", k, None);
    assert_eq!((st, e["code"].as_str()), (422, Some("RELOAD_FAILED")));
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("halyard.toml:") && msg.contains("max_qos"),
        "{msg}"
    );
    // A listener that cannot bind (port taken) is refused the same way.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap().port();
    std::fs::write(&h.conf, config(&h.dir, &[p2, taken], a, "")).unwrap();
    let (st, e) = json(a, "POST", "/api/v1/reload", k, None);
    assert_eq!(st, 422, "{e}");
    let (_, ls) = json(a, "GET", "/api/v1/listeners", k, None);
    assert_eq!(
        ls["data"].as_array().unwrap().len(),
        1,
        "nothing changed: {ls}"
    );

    // SIGHUP (halyard ctl reload) with a broken file: still serving, the log says why.
    std::fs::write(&h.conf, "max_qos = \"two\"\n").unwrap();
    let data = h.dir.join("data").display().to_string();
    let (_, err, code) = run(halyard_bin(), &["ctl", "reload", "--data-dir", &data]);
    assert_eq!(code, 0, "{err}");
    wait_until("reload refusal logged", || {
        std::fs::read_to_string(h.dir.join("halyard.log"))
            .unwrap_or_default()
            .contains("reload refused, nothing changed")
    });
    let (_, _, code) = run(
        "mosquitto_pub",
        &["-p", &p2.to_string(), "-i", "ok2", "-t", "r", "-m", "x"],
    );
    assert_eq!(code, 0, "still serving after a refused SIGHUP reload");
    let _ = sub.kill();
    let _ = sub.wait();
}

/// systemd `Type=notify`: READY=1 once listening, RELOADING=1/READY=1 around a SIGHUP,
/// STOPPING=1 on SIGTERM. JSON logs carry the per-connection span with the client id (at
/// debug level; connection lines at info name the peer and client id themselves).
#[test]
fn sd_notify_readiness_and_json_logs_with_connection_spans() {
    let sock_dir = temp_dir("notify");
    let _scratch = Scratch(sock_dir.clone());
    let sock_path = sock_dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut h = start(
        "admin-notify",
        "log_format = \"json\"\nlog_level = \"debug\"\n",
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    let recv = || {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    assert_eq!(recv(), "READY=1");
    let (_, _, code) = run(
        "mosquitto_pub",
        &[
            "-p",
            &h.mqtt.to_string(),
            "-i",
            "span-me",
            "-t",
            "s",
            "-m",
            "x",
        ],
    );
    assert_eq!(code, 0);
    let pid = h.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(recv(), "RELOADING=1");
    assert_eq!(recv(), "READY=1");
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(recv(), "STOPPING=1");
    assert!(h.child.wait().unwrap().success());

    // JSON logs: every line an object; the disconnect line carries the connection span.
    let log = std::fs::read_to_string(h.dir.join("halyard.log")).unwrap();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "halyard started")
    );
    let disconnect = lines
        .iter()
        .find(|l| {
            l["fields"]["message"] == "client disconnected" && l["span"]["client_id"] == "span-me"
        })
        .unwrap_or_else(|| panic!("no disconnect line with the span in {log}"));
    assert!(
        disconnect["span"]["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    assert_eq!(disconnect["fields"]["client_id"], "span-me");
}

/// Lowering `max_connections` by reload closes nobody, refuses new clients while more than
/// the new limit are open, and admits them again once enough have left.
#[test]
fn reload_lowering_max_connections_refuses_new_clients_until_below() {
    let h = start("admin-maxconn", "", &[]);
    let (a, k) = (h.admin, h.key.as_str());
    let mut subs: Vec<Child> = (0..2)
        .map(|i| mosquitto_sub(h.mqtt, &format!("held-{i}"), "h/#", i == 1))
        .collect();
    wait_until("two subscribers", || {
        json(a, "GET", "/api/v1/clients?connected=true", k, None).1["meta"]["count"] == 2
    });
    std::fs::write(
        &h.conf,
        config(&h.dir, &[h.mqtt], a, "max_connections = 1\n"),
    )
    .unwrap();
    let (st, r) = json(a, "POST", "/api/v1/reload", k, None);
    assert_eq!(st, 200, "{r}");
    let port = h.mqtt.to_string();
    let (_, err, code) = run(
        "mosquitto_pub",
        &["-p", &port, "-t", "h/x", "-m", "refused"],
    );
    assert_ne!(code, 0, "over the lowered limit: {err}");
    assert_eq!(
        json(a, "GET", "/api/v1/clients?connected=true", k, None).1["meta"]["count"],
        2,
        "nobody was disconnected"
    );
    for mut s in subs.drain(..) {
        let _ = s.kill();
        let _ = s.wait();
    }
    wait_until("a client admitted again", || {
        run(
            "mosquitto_pub",
            &["-p", &port, "-t", "h/x", "-m", "admitted"],
        )
        .2 == 0
    });
}

/// Bridges through the admin API and `/metrics`, with a Mosquitto configuration's bridge
/// block imported by `halyard bridge import` (options it cannot carry named on stderr):
/// listed, added (201) and replaced (200), refused with 400 naming a wrong key, paused
/// and resumed, deleted; per-bridge metrics; the file's bridge survives a reload, the
/// API's bridge too.
#[test]
fn bridges_imported_from_mosquitto_and_managed_over_the_api() {
    let remote = halyard_testkit::procs::Mosquitto::start();
    let scratch = Scratch(temp_dir("bridge-import"));
    let mconf = scratch.0.join("mosquitto.conf");
    std::fs::write(
        &mconf,
        format!(
            "listener 1883\nconnection cloud\naddress 127.0.0.1:{}\ntopic up/# out 1\ntopic down/# in 1\nremote_clientid edge1\nround_robin true\n",
            remote.port
        ),
    )
    .unwrap();
    let (toml, notes, code) = run(
        halyard_bin(),
        &["bridge", "import", &mconf.display().to_string()],
    );
    assert_eq!(code, 0, "{notes}");
    assert!(
        notes.contains(":7: round_robin not carried over"),
        "{notes}"
    );
    let h = start("bridge-api", &toml, &[]);
    let port = h.admin;
    let k = &h.key;
    wait_until("the imported bridge connects", || {
        let (_, v) = json(port, "GET", "/api/v1/bridges/cloud", k, None);
        v["state"] == "connected"
    });
    let (st, v) = json(port, "GET", "/api/v1/bridges", k, None);
    assert_eq!(st, 200);
    assert_eq!(v["data"][0]["remote_clientid"], "edge1");
    assert_eq!(v["data"][0]["config"]["protocol_version"], "mqttv311");
    // Added through the API, then replaced.
    let body = format!(
        r#"{{"name":"api","address":["tcp://127.0.0.1:{}"],"topic":["x/# out 1"]}}"#,
        remote.port
    );
    let (st, v) = json(port, "POST", "/api/v1/bridges", k, Some(&body));
    assert_eq!(st, 201, "{v}");
    let body2 = body.replace("x/#", "y/#");
    let (st, v) = json(port, "POST", "/api/v1/bridges", k, Some(&body2));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["config"]["topic"][0], "y/# out 1");
    // Refused: an unknown key, a bad value, the file's own bridge.
    let (st, v) = json(
        port,
        "POST",
        "/api/v1/bridges",
        k,
        Some(&body.replace("\"topic\"", "\"topics\"")),
    );
    assert_eq!(st, 400);
    assert!(v["message"].as_str().unwrap().contains("topics"), "{v}");
    let (st, v) = json(
        port,
        "POST",
        "/api/v1/bridges",
        k,
        Some(&body.replace("x/# out 1", "x/# sideways")),
    );
    assert_eq!(st, 400);
    assert!(v["message"].as_str().unwrap().contains("sideways"), "{v}");
    let (st, _) = json(
        port,
        "POST",
        "/api/v1/bridges",
        k,
        Some(&body.replace("\"api\"", "\"cloud\"")),
    );
    assert_eq!(st, 409);
    // Pause and resume.
    let (st, _) = json(port, "POST", "/api/v1/bridges/api/pause", k, None);
    assert_eq!(st, 200);
    wait_until("paused", || {
        json(port, "GET", "/api/v1/bridges/api", k, None).1["state"] == "paused"
    });
    let (st, _) = json(port, "POST", "/api/v1/bridges/api/resume", k, None);
    assert_eq!(st, 200);
    wait_until("resumed", || {
        json(port, "GET", "/api/v1/bridges/api", k, None).1["state"] == "connected"
    });
    let (_, _, metrics) = http(port, "GET", "/metrics", Some(k), None);
    assert!(
        metrics.contains("halyard_bridge_up{bridge=\"cloud\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "halyard_bridge_dropped_total{bridge=\"api\",reason=\"queue_full_oldest\"} 0"
        )
    );
    // A reload keeps both (the file's unchanged, the API's untouched).
    let (st, v) = json(port, "POST", "/api/v1/reload", k, None);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["bridges_removed"], serde_json::json!([]));
    assert_eq!(
        json(port, "GET", "/api/v1/bridges", k, None).1["data"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let (st, _) = json(port, "DELETE", "/api/v1/bridges/api", k, None);
    assert_eq!(st, 200);
    let (st, _) = json(port, "DELETE", "/api/v1/bridges/api", k, None);
    assert_eq!(st, 404);
}
