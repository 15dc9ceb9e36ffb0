//! `halyard ctl`, `halyard rpc`, and halyard-client against a Halyard process that is
//! killed with SIGKILL and restarted.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{BrokerProc, halyard_bin, run, start_halyard, start_mosquitto};
use halyard_client::{
    Client, ClientOptions, ClientState, ConnectionEvent, Message, ProtocolVersion, QoS, Reconnect,
};

fn ctl(data_dir: &std::path::Path, args: &[&str]) -> (String, String, i32) {
    let mut a = vec!["ctl", "--data-dir", data_dir.to_str().expect("utf8")];
    a.extend_from_slice(args);
    run(halyard_bin(), &a)
}

#[test]
fn ctl_status_reload_stop() {
    let mut b = start_halyard();
    let data = b.dir.join("data");
    let pid = b.pid();
    let (out, err, code) = ctl(&data, &["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("running (pid {pid}")), "{out}");
    // SIGHUP reloads; the broker keeps serving.
    let (out, err, code) = ctl(&data, &["reload"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("SIGHUP"), "{out}");
    let (_, err, code) = run(
        halyard_bin(),
        &[
            "pub",
            "-p",
            &b.port.to_string(),
            "-t",
            "ctl/alive",
            "-m",
            "x",
        ],
    );
    assert_eq!(code, 0, "still serving after reload: {err}");
    // stop: SIGTERM, graceful exit well within the timeout.
    let (out, err, code) = ctl(&data, &["stop", "--timeout", "20"]);
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.contains("stopped"), "{out}");
    let status = b.child.take().expect("child").wait().expect("wait");
    assert!(status.success(), "graceful exit: {status}");
    assert!(
        !data.join("halyard.pid").exists(),
        "pid file removed on exit"
    );
    // Not running: status 3, stop and reload 1, each with a message.
    let (_, err, code) = ctl(&data, &["status"]);
    assert_eq!(code, 3);
    assert!(err.contains("not running"), "{err}");
    let (_, err, code) = ctl(&data, &["stop"]);
    assert_eq!(code, 1);
    assert!(err.contains("not running"), "{err}");
    // A stale pid file (a process that is gone) is recognised as such.
    std::fs::write(data.join("halyard.pid"), format!("{pid}\n")).expect("write");
    let (_, err, code) = ctl(&data, &["status"]);
    assert_eq!(code, 3);
    assert!(err.contains("stale pid file"), "{err}");
}

/// `ctl stop` escalates to SIGKILL when the process ignores SIGTERM past the timeout.
#[test]
fn ctl_stop_kills_after_the_timeout() {
    let dir = common::temp_dir("ctl-kill");
    // A "halyard" that ignores SIGTERM: a shell named by a symlink called halyard.
    let fake = dir.join("halyard");
    std::os::unix::fs::symlink("/bin/sh", &fake).expect("symlink");
    // It says when SIGTERM is ignored: under load, `ctl` could otherwise signal the shell
    // before it ran `trap`, and it would stop gracefully (seen once in a full test run).
    let ready = dir.join("trapped");
    let script = format!(
        "trap '' TERM; : > '{}'; while true; do sleep 0.1; done",
        ready.display()
    );
    let child = Command::new(&fake)
        .args(["-c", &script])
        .spawn()
        .expect("spawn");
    // Killed if an assertion fails first: a left-over child keeps the test harness's
    // output pipe open.
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Reap(child);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !ready.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the fake never set its trap"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // A pid file no one holds locked is not believed: the process it names (alive, and
    // called halyard) gets no signal.
    std::fs::write(dir.join("halyard.pid"), format!("{}\n", child.0.id())).expect("pid");
    let (_, err, code) = ctl(&dir, &["stop", "--timeout", "1"]);
    assert_eq!(code, 1);
    assert!(err.contains("no running halyard holds it"), "{err}");
    assert!(child.0.try_wait().expect("try_wait").is_none(), "signalled");
    // Held locked as `serve` holds it (here by the test, for the fake).
    let held = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("halyard.pid"))
        .expect("open");
    held.try_lock().expect("lock");
    let (out, err, code) = ctl(&dir, &["stop", "--timeout", "1"]);
    assert_eq!(code, 1, "not a graceful stop: {out} {err}");
    assert!(err.contains("SIGKILL"), "{err}");
    assert!(out.contains("killed"), "{out}");
    let status = child.0.wait().expect("wait");
    assert!(!status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts `halyard rpc serve` and waits (on its -d output) until it has subscribed.
fn serve(b: &BrokerProc, args: &[&str]) -> std::process::Child {
    let port = b.port.to_string();
    let mut a = vec!["rpc", "serve", "-p", port.as_str(), "-d"];
    a.extend_from_slice(args);
    let mut child = Command::new(halyard_bin())
        .args(&a)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rpc serve");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    loop {
        let line = lines
            .next()
            .expect("rpc serve ended before subscribing")
            .expect("read");
        if line.contains("received SUBACK") {
            break;
        }
    }
    // Keep draining its stderr so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    child
}

/// `halyard rpc` against a responder, on Halyard and on Mosquitto: echo, a command's
/// output as the reply, and the timeout exit code when nobody answers.
#[test]
fn rpc_request_and_serve_against_both_brokers() {
    for b in [start_mosquitto(), start_halyard()] {
        let port = b.port.to_string();
        let mut echo = serve(&b, &["-t", "svc/echo", "--echo", "-C", "1"]);
        let (out, err, code) = run(
            halyard_bin(),
            &[
                "rpc", "-p", &port, "-t", "svc/echo", "-m", "hello", "-W", "10",
            ],
        );
        assert_eq!((out.as_str(), code), ("hello\n", 0), "{}: {err}", b.name);
        assert!(echo.wait().expect("wait").success(), "serve -C 1 exits 0");

        let mut upper = serve(
            &b,
            &["-t", "svc/upper", "-C", "1", "--", "tr", "a-z", "A-Z"],
        );
        let (out, err, code) = run(
            halyard_bin(),
            &[
                "rpc",
                "-p",
                &port,
                "-t",
                "svc/upper",
                "-m",
                "shout",
                "-W",
                "10",
                "-v",
            ],
        );
        assert_eq!(code, 0, "{}: {err}", b.name);
        assert!(out.ends_with(" SHOUT\n"), "{}: {out}", b.name);
        assert!(upper.wait().expect("wait").success());

        let (_, err, code) = run(
            halyard_bin(),
            &["rpc", "-p", &port, "-t", "svc/nobody", "-m", "x", "-W", "1"],
        );
        assert_eq!(code, 27, "{}: {err}", b.name);
        assert_eq!(err.trim(), "Timed out");
    }
}

/// The client under SIGKILL of a durable Halyard: publishers keep publishing QoS 1 and 2,
/// the broker is killed and restarted on the same data directory, the clients reconnect by
/// themselves (backoff reset after each good connection), and every message the publisher
/// had handed to the client is delivered — QoS 2 exactly once — for 3.1.1 and 5.0.
#[test]
fn client_survives_broker_kill_minus_9() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut b = start_halyard();
    for v in [ProtocolVersion::V3_1_1, ProtocolVersion::V5] {
        let url = format!("tcp://127.0.0.1:{}", b.port);
        let opts = |id: &str| {
            ClientOptions::new(url.as_str())
                .protocol(v)
                .client_id(format!("{id}-{v:?}"))
                .clean_start(false)
                .session_expiry(3600)
                .reconnect(Reconnect {
                    enabled: true,
                    initial: Duration::from_millis(100),
                    max: Duration::from_millis(500),
                    retry_first_connect: true,
                })
        };
        let (sub_c, pub_c, mut sub, mut events) = rt.block_on(async {
            let sub_c = Client::connect(opts("k9-sub"));
            let pub_c = Client::connect(opts("k9-pub"));
            let events = pub_c.events();
            sub_c.connected().await.expect("subscriber connects");
            pub_c.connected().await.expect("publisher connects");
            let sub = sub_c
                .subscribe("k9/#", QoS::ExactlyOnce)
                .await
                .expect("subscribe");
            (sub_c, pub_c, sub, events)
        });
        const N: u32 = 300;
        let mut deliveries = Vec::new();
        for i in 0..N {
            let qos = if i % 2 == 0 {
                QoS::AtLeastOnce
            } else {
                QoS::ExactlyOnce
            };
            let d = rt
                .block_on(pub_c.publish_nowait(Message::new("k9/t", i.to_string()).qos(qos)))
                .expect("queued");
            deliveries.push(d);
            if i == 100 {
                // Let some be acknowledged first, then pull the plug.
                rt.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
                b.restart_halyard();
            }
        }
        rt.block_on(async {
            for d in deliveries {
                tokio::time::timeout(Duration::from_secs(30), d)
                    .await
                    .expect("acknowledged in time")
                    .expect("acknowledged");
            }
            let mut got = std::collections::BTreeMap::new();
            while got.len() < N as usize {
                let m = tokio::time::timeout(Duration::from_secs(30), sub.recv())
                    .await
                    .unwrap_or_else(|_| {
                        let missing: Vec<u32> = (0..N).filter(|i| !got.contains_key(i)).collect();
                        panic!("{v:?}: missing {missing:?}")
                    })
                    .expect("stream open");
                let i: u32 = std::str::from_utf8(&m.payload)
                    .expect("utf8")
                    .parse()
                    .expect("number");
                *got.entry(i).or_insert(0u32) += 1;
            }
            for (i, n) in &got {
                if i % 2 == 1 {
                    assert_eq!(*n, 1, "{v:?}: QoS 2 message {i} delivered {n} times");
                }
            }
            // The loss was seen, and the first retry came after at most the initial
            // delay: the backoff starts over after a good connection.
            let mut lost = false;
            let mut first_retry = None;
            while let Ok(e) = events.try_recv() {
                match e {
                    ConnectionEvent::ConnectionLost { .. } => lost = true,
                    ConnectionEvent::Reconnecting { attempt, delay }
                        if lost && first_retry.is_none() =>
                    {
                        first_retry = Some((attempt, delay));
                    }
                    _ => {}
                }
            }
            assert!(lost, "{v:?}: the publisher saw the connection drop");
            let (attempt, delay) = first_retry.expect("a reconnect attempt");
            assert_eq!(attempt, 1, "{v:?}");
            assert!(delay <= Duration::from_millis(100), "{v:?}: {delay:?}");
            assert!(matches!(pub_c.state(), ClientState::Connected { .. }));
            sub_c.disconnect().await.expect("disconnect");
            pub_c.disconnect().await.expect("disconnect");
        });
    }
}

fn bench_json(args: &[&str]) -> serde_json::Value {
    let mut a = vec!["bench"];
    a.extend_from_slice(args);
    a.push("--json");
    let (out, err, code) = run(halyard_bin(), &a);
    assert_eq!(code, 0, "bench {args:?}: {err}\n{out}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bench JSON: {e}: {out}"))
}

/// `halyard bench` counts exactly, against both brokers: QoS 1 pairs and QoS 2 fan-in
/// deliver everything that was acknowledged, once; `conn` holds what it opened. (A
/// functional check of the generator; speed is measured by bench/, never asserted here.)
#[test]
fn bench_counts_exactly_against_both_brokers() {
    for b in [start_mosquitto(), start_halyard()] {
        let port = b.port.to_string();
        for v in ["5", "311"] {
            let r = bench_json(&[
                "pubsub", "-p", &port, "-V", v, "-d", "1", "--pubs", "4", "--subs", "4", "-q", "1",
                "--window", "20",
            ]);
            let (exp, got) = (
                r["expected"].as_u64().unwrap_or(0),
                r["received"].as_u64().unwrap_or(0),
            );
            assert!(exp > 0, "{} v{v}: {r}", b.name);
            assert_eq!(
                (got, r["lost"].as_u64(), r["duplicates"].as_u64()),
                (exp, Some(0), Some(0)),
                "{} v{v}: {r}",
                b.name
            );
            assert!(r["latency_us"]["count"].as_u64().unwrap_or(0) > 0, "{r}");
        }
        // Fan-in: 4 publishers, one wildcard subscriber, QoS 2.
        let r = bench_json(&[
            "pubsub",
            "-p",
            &port,
            "-d",
            "1",
            "--pubs",
            "4",
            "--subs",
            "1",
            "-q",
            "2",
            "--filter",
            "bench/%r/#",
            "--window",
            "20",
        ]);
        assert_eq!(r["received"], r["expected"], "{} fan-in: {r}", b.name);
        assert_eq!(r["duplicates"].as_u64(), Some(0));
        // Fan-out: one publisher, 8 subscribers on its topic: each message 8 times.
        let r = bench_json(&[
            "pubsub",
            "-p",
            &port,
            "-d",
            "1",
            "--pubs",
            "1",
            "--subs",
            "8",
            "-q",
            "1",
            "--topic",
            "bench/%r/x",
            "--filter",
            "bench/%r/x",
            "--window",
            "20",
        ]);
        assert_eq!(
            r["expected"].as_u64(),
            r["acknowledged"].as_u64().map(|a| a * 8),
            "{r}"
        );
        assert_eq!(r["received"], r["expected"], "{} fan-out: {r}", b.name);
        let r = bench_json(&["conn", "-p", &port, "-c", "200", "-d", "1"]);
        assert_eq!(r["connected"].as_u64(), Some(200), "{} conn: {r}", b.name);
        assert_eq!(
            r["alive_at_end"].as_u64(),
            Some(200),
            "{} conn: {r}",
            b.name
        );
    }
}
