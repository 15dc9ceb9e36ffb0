//! Bridges in the binary: store-and-forward to Debian's Mosquitto while it is down and
//! Halyard is SIGKILLed, and configuration errors naming file, line and key.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{WAIT, free_port, halyard_bin, run, temp_dir};
use halyard_client::{Client, ClientOptions, Message, ProtocolVersion, QoS, Reconnect};
use halyard_testkit::procs::Mosquitto;

/// QoS 1 messages sent: 2,000 in CI; `tests/bridge/sigkill.sh 10000` sets
/// `HALYARD_BRIDGE_KILL_MESSAGES` for the long run. QoS 2: a tenth of that.
fn counts() -> (usize, usize) {
    let n = std::env::var("HALYARD_BRIDGE_KILL_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000usize);
    (n, n / 10)
}

fn opts(url: &str, id: &str) -> ClientOptions {
    ClientOptions::new(url)
        .protocol(ProtocolVersion::V5)
        .client_id(id)
        .reconnect(Reconnect {
            enabled: true,
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
            retry_first_connect: true,
        })
}

struct Halyard {
    child: std::process::Child,
}

impl Halyard {
    fn start(conf: &std::path::Path, port: u16, log: &std::path::Path) -> Halyard {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut child = Command::new(halyard_bin())
            .args(["serve", "-c"])
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start halyard");
        halyard_testkit::procs::wait_port(
            port,
            &mut child,
            "halyard",
            std::path::Path::new(""),
            WAIT,
        );
        Halyard { child }
    }
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Halyard {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The remote (Mosquitto) stopped; 2,000 QoS 1 and 200 QoS 2 messages (CI) published here and
/// acknowledged; Halyard SIGKILLed and started again; the remote back: all of them reach
/// the remote's subscriber, in order per topic, each once (QoS 2 exactly once
/// [MQTT-4.3.3]; a PUBACK here means the message is in the bridge's queue on disk).
/// For a 3.1.1 and a 5.0 link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_down_and_halyard_sigkilled_nothing_acknowledged_is_lost() {
    let (qos1, qos2) = counts();
    for version in ["mqttv311", "mqttv50"] {
        let dir = temp_dir(&format!("bridge-kill-{version}"));
        let mut remote = Mosquitto::start_with(free_port(), "max_queued_messages 0");
        // The remote's persistent subscriber, there before the outage.
        let there = Client::connect(
            opts(&remote.url(), &format!("there-{version}"))
                .clean_start(false)
                .session_expiry(3600),
        );
        there.connected().await.unwrap();
        let mut sub = there.subscribe("load/#", QoS::ExactlyOnce).await.unwrap();

        let port = free_port();
        let conf = dir.join("halyard.toml");
        std::fs::write(
            &conf,
            format!(
                "listen = [\"tcp://127.0.0.1:{port}\"]\ndata_dir = \"{}\"\nlog_level = \"info\"\n[admin]\nenabled = false\n\n[[bridge]]\nname = \"cloud\"\naddress = [\"{}\"]\ntopic = [\"load/# out 2\"]\nprotocol_version = \"{version}\"\nrestart_timeout = [1, 1]\n",
                dir.join("data").display(),
                remote.url()
            ),
        )
        .unwrap();
        let log = dir.join("halyard.log");
        let mut h = Halyard::start(&conf, port, &log);
        remote.stop();

        let here = Client::connect(opts(&format!("tcp://127.0.0.1:{port}"), "here"));
        here.connected().await.unwrap();
        let mut pending = Vec::new();
        for i in 0..qos1 {
            pending.push(
                here.publish_nowait(Message::new("load/q1", i.to_string()).qos(QoS::AtLeastOnce))
                    .await
                    .unwrap(),
            );
            if pending.len() == 100 {
                for d in pending.drain(..) {
                    assert!(!d.await.unwrap().reason.is_error());
                }
            }
        }
        for i in 0..qos2 {
            pending.push(
                here.publish_nowait(Message::new("load/q2", i.to_string()).qos(QoS::ExactlyOnce))
                    .await
                    .unwrap(),
            );
        }
        for d in pending.drain(..) {
            assert!(!d.await.unwrap().reason.is_error(), "acknowledged");
        }
        drop(here);
        h.kill9();
        let _h = Halyard::start(&conf, port, &log);
        remote.restart("max_queued_messages 0");

        let mut q1 = Vec::with_capacity(qos1);
        let mut q2 = Vec::with_capacity(qos2);
        while q1.len() < qos1 || q2.len() < qos2 {
            let m = tokio::time::timeout(Duration::from_secs(60), sub.recv())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{version}: stalled at {} + {}; log:\n{}",
                        q1.len(),
                        q2.len(),
                        std::fs::read_to_string(&log).unwrap_or_default()
                    )
                })
                .expect("open");
            let n: usize = String::from_utf8_lossy(&m.payload).parse().unwrap();
            if m.topic == "load/q1" {
                q1.push(n)
            } else {
                q2.push(n)
            }
        }
        assert_eq!(
            q1,
            (0..qos1).collect::<Vec<_>>(),
            "{version}: QoS 1 all, in order, once"
        );
        assert_eq!(
            q2,
            (0..qos2).collect::<Vec<_>>(),
            "{version}: QoS 2 all, in order, exactly once"
        );
        // Nothing more (a duplicate would come before this marker, sent after them).
        let here = Client::connect(opts(&format!("tcp://127.0.0.1:{port}"), "here2"));
        here.publish(Message::new("load/q2", "end").qos(QoS::ExactlyOnce))
            .await
            .unwrap();
        let m = tokio::time::timeout(WAIT, sub.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.payload, "end", "{version}: no duplicate");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A bad `[[bridge]]` value stops the start with the file, the line and the key.
#[test]
fn a_bad_bridge_key_is_named_with_file_and_line() {
    let dir = temp_dir("bridge-badconf");
    let conf = dir.join("h.toml");
    std::fs::write(
        &conf,
        "listen = [\"tcp://127.0.0.1:0\"]\n\n[[bridge]]\nname = \"a\"\naddress = [\"tcp://127.0.0.1:1\"]\ntopic = [\"# out\"]\n\n[[bridge]]\nname = \"b\"\naddress = [\"tcp://127.0.0.1:1\"]\ntopic = [\"# out\"]\nqueue_policy = \"drop_random\"\n",
    )
    .unwrap();
    let (_, err, code) = run(halyard_bin(), &["serve", "-c", &conf.display().to_string()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!(
            "{}:12: [[bridge]] `b`: key `queue_policy`",
            conf.display()
        )),
        "{err}"
    );
    std::fs::write(&conf, "[[bridge]]\nname = \"a\"\nadress = []\n").unwrap();
    let (_, err, code) = run(halyard_bin(), &["serve", "-c", &conf.display().to_string()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(":3") && err.contains("adress"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
