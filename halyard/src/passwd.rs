//! `halyard passwd`: mosquitto_passwd's command line over Halyard's password file.
//!
//! ```text
//! halyard passwd [-H hash] [-c | -D | -U] [-b] passwordfile [username [password]]
//! ```
//! `-c` creates (overwrites) the file, `-b` takes the password from the command line,
//! `-D` deletes a user, `-U` converts a plain-text `username:password` file in place.
//! Without `-b` the password is read from the terminal twice (not echoed), or once from
//! standard input when that is not a terminal. Files are written atomically, mode 0600.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use halyard_auth::{PasswordFile, Scheme, ScramHash};

#[derive(Debug, Args)]
pub(crate) struct PasswdArgs {
    /// Create a new password file, replacing any existing one.
    #[arg(short = 'c', conflicts_with_all = ["delete", "upgrade"])]
    create: bool,
    /// Take the password from the command line (visible in the process list).
    #[arg(short = 'b')]
    batch: bool,
    /// Delete the user.
    #[arg(short = 'D', conflicts_with = "upgrade")]
    delete: bool,
    /// Convert a plain-text `username:password` file to hashes, in place.
    #[arg(short = 'U')]
    upgrade: bool,
    /// Hash for new entries: argon2id (default), scram-sha-256 / scram-sha-512 (SCRAM
    /// verifiers: MQTT 5 enhanced authentication and plain passwords), sha512-pbkdf2
    /// (mosquitto 2's `$7$`), sha512.
    #[arg(short = 'H', value_name = "HASH", default_value = "argon2id")]
    hash: String,
    /// Iterations for sha512-pbkdf2 (default 1000; mosquitto 2.0 uses 101) and SCRAM
    /// (default 4096, RFC 7677's minimum).
    #[arg(short = 'I', value_name = "N")]
    iterations: Option<u32>,
    /// The password file.
    file: PathBuf,
    /// The user name.
    username: Option<String>,
    /// The password (with -b).
    password: Option<String>,
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("Error: {msg}");
    ExitCode::FAILURE
}

/// Writes `text` readable by its owner only, atomically (temp file, fsync, rename).
pub(crate) fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp-halyard");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Reads a password: twice without echo from a terminal, once from a pipe.
fn read_password() -> Result<String, String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let pw = line.trim_end_matches(['\n', '\r']).to_string();
        return if pw.is_empty() {
            Err("empty password on standard input".into())
        } else {
            Ok(pw)
        };
    }
    let echo = |on: bool| {
        let _ = std::process::Command::new("stty")
            .arg(if on { "echo" } else { "-echo" })
            .stdin(std::process::Stdio::inherit())
            .status();
    };
    let ask = |prompt: &str| -> Result<String, String> {
        eprint!("{prompt}");
        let _ = std::io::stderr().flush();
        echo(false);
        let mut line = String::new();
        let r = std::io::stdin().lock().read_line(&mut line);
        echo(true);
        eprintln!();
        r.map_err(|e| e.to_string())?;
        Ok(line.trim_end_matches(['\n', '\r']).to_string())
    };
    let a = ask("Password: ")?;
    let b = ask("Reenter password: ")?;
    if a != b {
        return Err("Passwords do not match.".into());
    }
    if a.is_empty() {
        return Err("empty password".into());
    }
    Ok(a)
}

pub(crate) fn run(a: &PasswdArgs) -> ExitCode {
    let scheme = match a.hash.as_str() {
        "argon2id" => Scheme::Argon2id,
        "sha512-pbkdf2" => Scheme::Pbkdf2Sha512(a.iterations.unwrap_or(1000).max(1)),
        "sha512" => Scheme::Sha512,
        "scram-sha-256" => Scheme::Scram(ScramHash::Sha256, a.iterations.unwrap_or(4096).max(1)),
        "scram-sha-512" => Scheme::Scram(ScramHash::Sha512, a.iterations.unwrap_or(4096).max(1)),
        other => {
            return fail(format!(
                "unknown hash `{other}` (argon2id, scram-sha-256, scram-sha-512, sha512-pbkdf2, sha512)"
            ));
        }
    };
    if a.upgrade {
        let text = match std::fs::read_to_string(&a.file) {
            Ok(t) => t,
            Err(e) => return fail(format!("{}: {e}", a.file.display())),
        };
        return match PasswordFile::from_plain_text(&text, &a.file.display().to_string(), scheme) {
            Ok(f) => match write_atomically(&a.file, &f.render()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(format!("{}: {e}", a.file.display())),
            },
            Err(e) => fail(e),
        };
    }
    let Some(user) = &a.username else {
        return fail(
            "a user name is needed (usage: halyard passwd [-c|-D] [-b] FILE USER [PASSWORD])",
        );
    };
    let mut file = if a.create {
        PasswordFile::default()
    } else {
        match PasswordFile::load(&a.file) {
            Ok(f) => f,
            Err(e) => return fail(e),
        }
    };
    if a.delete {
        if !file.remove(user) {
            return fail(format!("user `{user}` is not in {}", a.file.display()));
        }
    } else {
        let pw = match (&a.password, a.batch) {
            (Some(p), true) => p.clone(),
            (None, true) => return fail("-b needs the password on the command line"),
            (Some(_), false) => return fail("a password on the command line needs -b"),
            (None, false) => match read_password() {
                Ok(p) => p,
                Err(e) => return fail(e),
            },
        };
        if let Err(e) = file.set(user, pw.as_bytes(), scheme) {
            return fail(e);
        }
    }
    match write_atomically(&a.file, &file.render()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("{}: {e}", a.file.display())),
    }
}
