//! Brokers for the client tests: Halyard in process, and the real Mosquitto (Debian's
//! `mosquitto`) started on a free loopback port — the client must work with a broker we
//! did not write.
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use halyard_testkit::TestBroker;
pub use halyard_testkit::procs::{free_port, mosquitto_path};

pub const WAIT: Duration = Duration::from_secs(10);

/// A Mosquitto broker process on 127.0.0.1:port, killed on drop.
#[derive(Debug)]
pub struct Mosquitto {
    pub port: u16,
    child: Option<Child>,
    dir: PathBuf,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Self::start_with(free_port(), "")
    }

    /// Starts on `port` with extra configuration lines; persistence goes to a directory of
    /// its own, so a restart on the same port resumes sessions.
    pub fn start_with(port: u16, extra: &str) -> Mosquitto {
        let dir =
            std::env::temp_dir().join(format!("halyard-client-mosq-{}-{port}", std::process::id()));
        halyard_testkit::procs::shared_dir(&dir);
        let mut m = Mosquitto {
            port,
            child: None,
            dir,
        };
        m.spawn(extra);
        m
    }

    fn spawn(&mut self, extra: &str) {
        let conf = self.dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nlog_dest none\n{extra}\n",
                self.port,
                self.dir.display()
            ),
        )
        .expect("write mosquitto.conf");
        let child = Command::new(mosquitto_path())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        // Owned by `self` before waiting, so a failed start still kills it on drop.
        let child = self.child.insert(child);
        halyard_testkit::procs::wait_port(
            self.port,
            child,
            "mosquitto",
            std::path::Path::new(""),
            WAIT,
        );
    }

    /// Stops it with SIGTERM (Mosquitto saves its persistence file) and waits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port with the same persistence.
    pub fn restart(&mut self, extra: &str) {
        self.stop();
        self.spawn(extra);
    }

    pub fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Either broker, by name, for tests that run against both.
pub enum AnyBroker {
    Halyard(TestBroker),
    Mosquitto(Mosquitto),
}

impl AnyBroker {
    pub async fn start(name: &str) -> AnyBroker {
        match name {
            "halyard" => AnyBroker::Halyard(TestBroker::start().await),
            "mosquitto" => AnyBroker::Mosquitto(Mosquitto::start()),
            other => panic!("unknown broker {other}"),
        }
    }
    pub fn url(&self) -> String {
        match self {
            AnyBroker::Halyard(b) => format!("tcp://{}", b.addr),
            AnyBroker::Mosquitto(m) => m.url(),
        }
    }
}
