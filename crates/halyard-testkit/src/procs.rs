//! For tests that run brokers as processes (Halyard's binary, Debian's Mosquitto) on free
//! loopback ports.

use std::net::TcpListener;
use std::path::Path;
use std::process::Child;
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
