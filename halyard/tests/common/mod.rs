//! Brokers as processes for the binary's tests: Halyard (this crate's binary) and
//! Mosquitto (Debian's `mosquitto`), each on free loopback ports, with one listener that
//! admits anonymous clients and one that needs a password (alice / secret).
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub use halyard_testkit::procs::{free_port, free_ports, mosquitto_path};

pub const WAIT: Duration = Duration::from_secs(20);

pub fn halyard_bin() -> &'static str {
    env!("CARGO_BIN_EXE_halyard")
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "halyard-bin-test-{tag}-{}-{}",
        std::process::id(),
        free_port()
    ));
    halyard_testkit::procs::shared_dir(&d);
    d
}

fn wait_port(port: u16, child: &mut Child, what: &str, log_hint: &Path) {
    halyard_testkit::procs::wait_port(port, child, what, log_hint, WAIT);
}

/// A broker process, killed on drop.
#[derive(Debug)]
pub struct BrokerProc {
    pub name: &'static str,
    /// Anonymous clients allowed.
    pub port: u16,
    /// Password needed (alice / secret).
    pub auth_port: u16,
    pub dir: PathBuf,
    pub child: Option<Child>,
}

impl BrokerProc {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }
    /// SIGKILL, then start Halyard again on the same data directory and ports.
    pub fn restart_halyard(&mut self) {
        self.kill9();
        let mut new = start_halyard_in(self.dir.clone(), self.port, self.auth_port);
        self.child = new.child.take();
        // `new` owns nothing now; its drop must not remove our directory.
        new.dir = PathBuf::new();
    }
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for BrokerProc {
    fn drop(&mut self) {
        self.kill9();
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub fn start_mosquitto() -> BrokerProc {
    let dir = temp_dir("mosq");
    let pw = dir.join("pw");
    // mosquitto_passwd writes the hash; our own `halyard passwd -H sha512-pbkdf2` output is
    // also accepted by mosquitto, but the reference tool keeps this independent.
    let st = Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(&pw)
        .args(["alice", "secret"])
        .status()
        .expect("mosquitto_passwd");
    assert!(st.success());
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    let [port, auth_port] = free_ports();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "per_listener_settings true\nlog_dest none\nlistener {port} 127.0.0.1\nallow_anonymous true\nlistener {auth_port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n",
            pw.display()
        ),
    )
    .expect("conf");
    let mut child = Command::new(mosquitto_path())
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mosquitto");
    wait_port(port, &mut child, "mosquitto", Path::new(""));
    wait_port(auth_port, &mut child, "mosquitto", Path::new(""));
    BrokerProc {
        name: "mosquitto",
        port,
        auth_port,
        dir,
        child: Some(child),
    }
}

pub fn start_halyard() -> BrokerProc {
    let dir = temp_dir("halyard");
    let [port, auth_port] = free_ports();
    start_halyard_in(dir, port, auth_port)
}

/// Starts (or restarts, with the same data directory and ports) a Halyard broker.
pub fn start_halyard_in(dir: PathBuf, port: u16, auth_port: u16) -> BrokerProc {
    let pw = dir.join("pw");
    if !pw.exists() {
        let st = Command::new(halyard_bin())
            .args(["passwd", "-c", "-b"])
            .arg(&pw)
            .args(["alice", "secret"])
            .status()
            .expect("halyard passwd");
        assert!(st.success());
    }
    let conf = dir.join("halyard.toml");
    std::fs::write(
        &conf,
        format!(
            "listen = []\ndata_dir = \"{}\"\npassword_file = \"{}\"\nlog_level = \"warn\"\n\n[[listener]]\nurl = \"tcp://127.0.0.1:{port}\"\nallow_anonymous = true\n\n[[listener]]\nurl = \"tcp://127.0.0.1:{auth_port}\"\nallow_anonymous = false\n\n[admin]\nenabled = false\n",
            dir.join("data").display(),
            pw.display()
        ),
    )
    .expect("conf");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("halyard.log"))
        .expect("log file");
    let mut child = Command::new(halyard_bin())
        .args(["serve", "-c"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start halyard");
    wait_port(port, &mut child, "halyard", &dir.join("halyard.log"));
    wait_port(auth_port, &mut child, "halyard", &dir.join("halyard.log"));
    BrokerProc {
        name: "halyard",
        port,
        auth_port,
        dir,
        child: Some(child),
    }
}

/// Runs a command with TZ=UTC; its stdout, stderr and exit code.
pub fn run(cmd: &str, args: &[&str]) -> (String, String, i32) {
    run_with_stdin(cmd, args, None)
}

pub fn run_with_stdin(cmd: &str, args: &[&str], stdin: Option<&[u8]>) -> (String, String, i32) {
    let mut c = Command::new(cmd);
    c.args(args)
        .env("TZ", "UTC")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = c.spawn().unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    if let Some(input) = stdin {
        use std::io::Write;
        let mut s = child.stdin.take().expect("stdin");
        s.write_all(input).expect("write stdin");
    }
    let out: Output = child.wait_with_output().expect("wait");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}
