//! Admin API keys: a name and a random secret, sent as HTTP Basic credentials. The keys
//! file has mosquitto password-file lines (`name:hash`, PBKDF2-SHA512 here: a random
//! 256-bit secret needs no slow hash, and every API call checks one), so the same parser
//! and hash code serve both. `halyard apikey create|delete|list` manages it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::SystemTime;

use base64::Engine as _;
use halyard_auth::passwd::{PasswordFile, Scheme};
use hyper::{HeaderMap, StatusCode, header};

use super::ApiError;

/// PBKDF2 rounds for API key hashes: the secrets are random, so rounds add nothing but
/// latency to every call.
const KEY_HASH_ROUNDS: u32 = 1;

#[derive(Debug, clap::Args)]
pub(crate) struct ApikeyArgs {
    #[command(subcommand)]
    command: ApikeyCommand,
    /// The keys file (default: `api_keys` in the data directory).
    #[arg(long, global = true)]
    file: Option<PathBuf>,
    /// The broker's data directory (where the default keys file lives).
    #[arg(long, global = true, default_value = "./halyard-data")]
    data_dir: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
enum ApikeyCommand {
    /// Make a key and print its secret (shown once; only a hash is stored).
    Create {
        /// The key's name (the Basic user name).
        name: String,
    },
    /// Remove a key.
    Delete { name: String },
    /// List key names.
    List,
}

pub(crate) fn run(a: &ApikeyArgs) -> ExitCode {
    let path = a
        .file
        .clone()
        .unwrap_or_else(|| a.data_dir.join("api_keys"));
    let mut file = match std::fs::read_to_string(&path) {
        Ok(text) => match PasswordFile::parse(&text, &path.display().to_string()) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("halyard apikey: {e}");
                return ExitCode::FAILURE;
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => PasswordFile::default(),
        Err(e) => {
            eprintln!("halyard apikey: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    match &a.command {
        ApikeyCommand::List => {
            for u in file.users() {
                println!("{u}");
            }
            return ExitCode::SUCCESS;
        }
        ApikeyCommand::Delete { name } => {
            if !file.remove(name) {
                eprintln!("halyard apikey: no key named {name} in {}", path.display());
                return ExitCode::FAILURE;
            }
        }
        ApikeyCommand::Create { name } => {
            if name.is_empty() || name.contains(':') || name.chars().any(char::is_control) {
                eprintln!(
                    "halyard apikey: a key name must be non-empty, without ':' or control characters"
                );
                return ExitCode::from(2);
            }
            if file.users().any(|u| u == name) {
                eprintln!("halyard apikey: a key named {name} exists; delete it first");
                return ExitCode::FAILURE;
            }
            let mut raw = [0u8; 24];
            if aws_lc_rs::rand::fill(&mut raw).is_err() {
                eprintln!("halyard apikey: no randomness from the system");
                return ExitCode::FAILURE;
            }
            let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
            if let Err(e) = file.set(
                name,
                secret.as_bytes(),
                Scheme::Pbkdf2Sha512(KEY_HASH_ROUNDS),
            ) {
                eprintln!("halyard apikey: {e}");
                return ExitCode::FAILURE;
            }
            if let Err(e) = write_private(&path, &file.render()) {
                eprintln!("halyard apikey: {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            println!("{name}:{secret}");
            eprintln!(
                "key {name} added to {}; use it as HTTP Basic credentials, e.g. curl -u {name}:{secret} http://127.0.0.1:18083/api/v1/stats",
                path.display()
            );
            return ExitCode::SUCCESS;
        }
    }
    match write_private(&path, &file.render()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("halyard apikey: {}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}

/// Writes the keys file (owner-only, atomically), creating its directory if needed.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    crate::passwd::write_atomically(path, text)
}

/// A file's length and modification time: it changed when they did.
type Stamp = Option<(u64, SystemTime)>;

/// The keys file, re-read when it changes (checked on each request by its stamp).
pub(crate) struct KeyCache {
    path: PathBuf,
    state: Mutex<(Stamp, Option<PasswordFile>)>,
}

impl KeyCache {
    pub(crate) fn new(path: PathBuf) -> KeyCache {
        let c = KeyCache {
            path,
            state: Mutex::new((None, None)),
        };
        c.current();
        c
    }

    fn current(&self) -> Option<PasswordFile> {
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| Some((m.len(), m.modified().ok()?)));
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.0 != stamp || (stamp.is_some() && st.1.is_none()) {
            st.0 = stamp;
            st.1 = match PasswordFile::load(&self.path) {
                Ok(f) => Some(f),
                Err(e) => {
                    if stamp.is_some() {
                        tracing::warn!("admin API keys file refused: {e}");
                    }
                    None
                }
            };
        }
        st.1.clone()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.current().is_none_or(|f| f.users().next().is_none())
    }

    /// Checks the request's Basic credentials; returns the key's name.
    pub(crate) async fn check(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", m);
        let Some(file) = self.current().filter(|f| f.users().next().is_some()) else {
            return Err(unauthorized(
                "no API keys exist: make one with `halyard apikey create NAME`",
            ));
        };
        let creds = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            // The scheme is case-insensitive (RFC 9110, 11.1).
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
            .map(|(_, b)| b)
            .and_then(|b| {
                base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .ok()
            })
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| {
                unauthorized("send an API key as HTTP Basic credentials (name:secret)")
            })?;
        let (name, secret) = creds
            .split_once(':')
            .ok_or_else(|| unauthorized("credentials must be name:secret"))?;
        let (name, secret) = (name.to_string(), secret.to_string());
        let ok = tokio::task::spawn_blocking(move || {
            file.verify(&name, secret.as_bytes()).then_some(name)
        })
        .await
        .ok()
        .flatten();
        ok.ok_or_else(|| unauthorized("unknown API key or wrong secret"))
    }
}
