//! For tests that run brokers as processes (Halyard's binary, Debian's Mosquitto) on free
//! loopback ports.

use std::net::TcpListener;
use std::path::Path;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound and released; good enough for a test that binds it next).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `N` distinct free ports (all bound at once, so no two are the same).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    std::array::from_fn(|i| held[i].local_addr().expect("addr").port())
}

/// The Mosquitto broker binary; panics saying which package provides it.
pub fn mosquitto_path() -> &'static str {
    for p in [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ] {
        if Path::new(p).exists() {
            return p;
        }
    }
    panic!(
        "these tests need the Mosquitto broker and clients (Debian `mosquitto`, `mosquitto-clients`; .ci/run installs them)"
    );
}

/// Creates `dir`, writable by everyone: Mosquitto started as root drops to its own user
/// and must still read its files and write its database there.
pub fn shared_dir(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).expect("temp dir");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
}

/// Polls until `port` accepts connections; panics (with `log`'s content, if any) when
/// `child` exits first or `wait` passes.
pub fn wait_port(port: u16, child: &mut Child, what: &str, log: &Path, wait: Duration) {
    let deadline = Instant::now() + wait;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            panic!("{what} exited before listening on {port}: {status}\n{log}");
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long a broker process may take to listen.
pub const WAIT: Duration = Duration::from_secs(10);

/// A Mosquitto broker process on 127.0.0.1:port, killed on drop.
#[derive(Debug)]
pub struct Mosquitto {
    /// Its port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
    /// Its configuration and persistence directory.
    pub dir: PathBuf,
}

impl Mosquitto {
    /// Starts on a free port.
    pub fn start() -> Mosquitto {
        Self::start_with(free_port(), "")
    }

    /// Starts on `port` with extra configuration lines; persistence goes to a directory of
    /// its own, so a restart on the same port resumes sessions.
    pub fn start_with(port: u16, extra: &str) -> Mosquitto {
        let dir = std::env::temp_dir().join(format!("halyard-mosq-{}-{port}", std::process::id()));
        shared_dir(&dir);
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
        wait_port(
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

    /// `tcp://127.0.0.1:<port>`.
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
