//! `halyard ctl status|reload|stop`: control a running broker through its pid file and
//! signals (the admin API will add more). `stop` is made for systemd's ExecStop: SIGTERM
//! (the broker drains and exits), wait, SIGKILL after the timeout.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use rustix::process::{Pid, Signal, kill_process, test_kill_process};

/// Exit code of `status` when the broker is not running (LSB: "program is not running").
const EXIT_NOT_RUNNING: u8 = 3;

#[derive(Debug, Args)]
pub(crate) struct CtlArgs {
    /// The broker's data directory (its pid file is `halyard.pid` in it).
    #[arg(long, global = true, default_value = "./halyard-data")]
    data_dir: PathBuf,
    /// The pid file (instead of the one in --data-dir).
    #[arg(long, global = true)]
    pid_file: Option<PathBuf>,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// Is the broker running? (exit 0 if so, 3 if not)
    Status,
    /// Reload passwords, ACLs and TLS files (SIGHUP).
    Reload,
    /// Stop the broker: SIGTERM, then SIGKILL after the timeout.
    Stop {
        /// Seconds to wait for a graceful exit before SIGKILL.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
}

pub(crate) fn run(a: &CtlArgs) -> ExitCode {
    let pid_file = a
        .pid_file
        .clone()
        .unwrap_or_else(|| a.data_dir.join(PID_FILE));
    let pid = match running_pid(&pid_file) {
        Ok(p) => p,
        Err(why) => {
            eprintln!("halyard ctl: the broker is not running: {why}");
            return ExitCode::from(match a.command {
                CtlCommand::Status => EXIT_NOT_RUNNING,
                _ => 1,
            });
        }
    };
    match &a.command {
        CtlCommand::Status => {
            let rss = std::fs::read_to_string(format!("/proc/{}/status", pid.as_raw_pid()))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .map(|l| l.trim_start_matches("VmRSS:").trim().to_string())
                });
            match rss {
                Some(rss) => println!("halyard is running (pid {}, RSS {rss})", pid.as_raw_pid()),
                None => println!("halyard is running (pid {})", pid.as_raw_pid()),
            }
            ExitCode::SUCCESS
        }
        CtlCommand::Reload => match kill_process(pid, Signal::HUP) {
            Ok(()) => {
                println!("reload requested (SIGHUP sent to pid {})", pid.as_raw_pid());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("halyard ctl: cannot signal pid {}: {e}", pid.as_raw_pid());
                ExitCode::from(1)
            }
        },
        CtlCommand::Stop { timeout } => stop(pid, Duration::from_secs(*timeout)),
    }
}

/// The pid file's name inside the data directory.
pub(crate) const PID_FILE: &str = "halyard.pid";

/// Writes this process's pid to `path` and holds an exclusive lock on the file while the
/// returned handle lives. `ctl` believes only a pid file a live process holds locked, so
/// it never signals a recycled pid or a process that merely looks like halyard; a second
/// `serve` for the same data directory finds the lock taken.
pub(crate) fn hold_pid_file(path: &Path) -> Result<std::fs::File, String> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| format!("cannot open the pid file {}: {e}", path.display()))?;
    f.try_lock().map_err(|_| {
        format!(
            "the pid file {} is held by another running halyard serve",
            path.display()
        )
    })?;
    f.set_len(0)
        .and_then(|()| writeln!(f, "{}", std::process::id()))
        .map_err(|e| format!("cannot write the pid file {}: {e}", path.display()))?;
    Ok(f)
}

/// The pid in `path`, if a live broker holds the file locked (see [`hold_pid_file`]).
fn running_pid(path: &Path) -> Result<Pid, String> {
    let file = std::fs::File::open(path)
        .map_err(|e| format!("cannot read the pid file {}: {e}", path.display()))?;
    match file.try_lock_shared() {
        // Nobody holds it: whatever pid it names is not a broker serving this directory.
        Ok(()) => {
            return Err(format!(
                "stale pid file {} (no running halyard holds it)",
                path.display()
            ));
        }
        Err(std::fs::TryLockError::WouldBlock) => {}
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(format!("cannot lock the pid file {}: {e}", path.display()));
        }
    }
    let text = std::io::read_to_string(&file)
        .map_err(|e| format!("cannot read the pid file {}: {e}", path.display()))?;
    let raw: i32 = text
        .trim()
        .parse()
        .map_err(|_| format!("the pid file {} does not hold a pid", path.display()))?;
    let pid = Pid::from_raw(raw)
        .ok_or_else(|| format!("the pid file {} holds pid {raw}", path.display()))?;
    if test_kill_process(pid).is_err() {
        return Err(format!(
            "stale pid file {} (process {raw} is gone)",
            path.display()
        ));
    }
    Ok(pid)
}

fn stop(pid: Pid, timeout: Duration) -> ExitCode {
    let raw = pid.as_raw_pid();
    if let Err(e) = kill_process(pid, Signal::TERM) {
        eprintln!("halyard ctl: cannot signal pid {raw}: {e}");
        return ExitCode::from(1);
    }
    let started = Instant::now();
    while started.elapsed() < timeout {
        if test_kill_process(pid).is_err() || is_zombie(raw) {
            println!(
                "halyard stopped (pid {raw}, {:.1} s)",
                started.elapsed().as_secs_f64()
            );
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "halyard ctl: pid {raw} still running after {} s; sending SIGKILL",
        timeout.as_secs()
    );
    let _ = kill_process(pid, Signal::KILL);
    let killed = Instant::now();
    while killed.elapsed() < Duration::from_secs(5) {
        if test_kill_process(pid).is_err() || is_zombie(raw) {
            println!("halyard killed (pid {raw})");
            // Stopped, but not gracefully: say so in the exit code.
            return ExitCode::from(1);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("halyard ctl: pid {raw} survived SIGKILL");
    ExitCode::from(1)
}

/// An exited process whose parent has not reaped it yet still answers signal 0.
fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(false)
}
