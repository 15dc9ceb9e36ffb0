//! The password file: one `username:hash` per line, as `mosquitto_passwd` writes it.
//!
//! | prefix | scheme | written by |
//! |---|---|---|
//! | `$6$salt$hash` | SHA-512 of password then salt (base64 fields) | mosquitto 1.x |
//! | `$7$iterations$salt$hash` | PBKDF2-HMAC-SHA512, 64-byte output | mosquitto 2.0 (101 iterations, 12-byte salt), 2.1 (1000, 64) |
//! | `$argon2id$...` | argon2id, PHC string | Halyard (default) |
//!
//! Iterations and salt length are read from each entry. Comparisons are constant-time, and
//! an unknown user costs the same hash as a known one, so timing does not reveal who exists.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use halyard_broker::auth::{AuthVerdict, Authenticator, Credentials};

/// A hashing scheme for new entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// argon2id with the crate's defaults (19 MiB, 2 passes): the default.
    Argon2id,
    /// mosquitto 2.x's `$7$` PBKDF2-HMAC-SHA512 with this many iterations, for files
    /// that mosquitto must also read.
    Pbkdf2Sha512(u32),
    /// mosquitto 1.x's `$6$` salted SHA-512 (weak; reading old files is what it is for).
    Sha512,
    /// A SCRAM verifier (RFC 5802) with this hash and iteration count: serves MQTT 5
    /// enhanced authentication as well as plain passwords.
    Scram(crate::scram::ScramHash, u32),
}

#[derive(Clone, PartialEq, Eq)]
enum Hash {
    Sha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Pbkdf2 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Argon2(String),
    Scram(crate::scram::Verifier),
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print hashes into logs.
        f.write_str(match self {
            Hash::Sha512 { .. } => "$6$...",
            Hash::Pbkdf2 { .. } => "$7$...",
            Hash::Argon2(_) => "$argon2id$...",
            Hash::Scram(_) => "$scram-...$...",
        })
    }
}

fn sha512(parts: &[&[u8]]) -> Vec<u8> {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA512);
    for p in parts {
        ctx.update(p);
    }
    ctx.finish().as_ref().to_vec()
}

fn pbkdf2(password: &[u8], salt: &[u8], iterations: u32, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let iters = std::num::NonZeroU32::new(iterations.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
    aws_lc_rs::pbkdf2::derive(
        aws_lc_rs::pbkdf2::PBKDF2_HMAC_SHA512,
        iters,
        salt,
        password,
        &mut out,
    );
    out
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

fn random(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    aws_lc_rs::rand::fill(&mut v).expect("system randomness");
    v
}

impl Hash {
    fn parse(s: &str) -> Result<Hash, String> {
        let b64 = |f: &str, what: &str| B64.decode(f).map_err(|_| format!("{what} is not base64"));
        if let Some(rest) = s.strip_prefix("$6$") {
            let (salt, hash) = rest
                .split_once('$')
                .ok_or("`$6$` entry needs `$6$salt$hash`")?;
            let hash = b64(hash, "hash")?;
            if hash.len() != 64 {
                return Err("`$6$` hash is not 64 bytes".into());
            }
            return Ok(Hash::Sha512 {
                salt: b64(salt, "salt")?,
                hash,
            });
        }
        if let Some(rest) = s.strip_prefix("$7$") {
            let mut f = rest.splitn(3, '$');
            let (Some(it), Some(salt), Some(hash)) = (f.next(), f.next(), f.next()) else {
                return Err("`$7$` entry needs `$7$iterations$salt$hash`".into());
            };
            let iterations: u32 = it
                .parse()
                .map_err(|_| format!("`{it}` is not an iteration count"))?;
            if iterations == 0 {
                return Err("`$7$` with 0 iterations".into());
            }
            let hash = b64(hash, "hash")?;
            if hash.is_empty() {
                return Err("`$7$` hash is empty".into());
            }
            return Ok(Hash::Pbkdf2 {
                iterations,
                salt: b64(salt, "salt")?,
                hash,
            });
        }
        if let Some(v) = crate::scram::Verifier::parse(s) {
            return v.map(Hash::Scram);
        }
        if s.starts_with("$argon2") {
            PasswordHash::new(s).map_err(|e| format!("bad argon2 hash: {e}"))?;
            return Ok(Hash::Argon2(s.to_string()));
        }
        Err("not a password hash ($6$, $7$ or $argon2id$); a plain-text file needs `halyard passwd -U` first".into())
    }

    fn new(password: &[u8], scheme: Scheme) -> Hash {
        match scheme {
            Scheme::Argon2id => {
                let salt = SaltString::encode_b64(&random(16)).expect("16-byte salt");
                let phc = Argon2::default()
                    .hash_password(password, &salt)
                    .expect("argon2 with default parameters")
                    .to_string();
                Hash::Argon2(phc)
            }
            Scheme::Pbkdf2Sha512(iterations) => {
                let salt = random(12);
                let hash = pbkdf2(password, &salt, iterations, 64);
                Hash::Pbkdf2 {
                    iterations,
                    salt,
                    hash,
                }
            }
            Scheme::Sha512 => {
                let salt = random(12);
                let hash = sha512(&[password, &salt]);
                Hash::Sha512 { salt, hash }
            }
            Scheme::Scram(h, iterations) => Hash::Scram(crate::scram::Verifier::new(
                h,
                password,
                &random(16),
                iterations,
            )),
        }
    }

    /// Orders schemes by what one check costs (argon2id, then PBKDF2 by iterations, then
    /// SCRAM's stored PBKDF2, then one SHA-512).
    fn cost_rank(&self) -> (u8, u32) {
        match self {
            Hash::Argon2(_) => (3, 0),
            Hash::Pbkdf2 { iterations, .. } => (2, *iterations),
            Hash::Scram(_) => (1, 0),
            Hash::Sha512 { .. } => (0, 0),
        }
    }

    fn verify(&self, password: &[u8]) -> bool {
        match self {
            Hash::Sha512 { salt, hash } => ct_eq(&sha512(&[password, salt]), hash),
            Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => ct_eq(&pbkdf2(password, salt, *iterations, hash.len()), hash),
            Hash::Argon2(phc) => PasswordHash::new(phc)
                .is_ok_and(|h| Argon2::default().verify_password(password, &h).is_ok()),
            Hash::Scram(v) => v.verify_password(password),
        }
    }

    fn render(&self) -> String {
        match self {
            Hash::Sha512 { salt, hash } => format!("$6${}${}", B64.encode(salt), B64.encode(hash)),
            Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => {
                format!("$7${iterations}${}${}", B64.encode(salt), B64.encode(hash))
            }
            Hash::Argon2(phc) => phc.clone(),
            Hash::Scram(v) => v.render(),
        }
    }
}

/// A parsed password file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PasswordFile {
    users: BTreeMap<String, Hash>,
    /// Where it was read from (for messages).
    pub path: Option<PathBuf>,
}

impl PasswordFile {
    /// Parses the text of a file; `origin` names it in errors (`origin:line: ...`).
    /// Blank lines and lines starting with `#` are skipped.
    pub fn parse(text: &str, origin: &str) -> Result<PasswordFile, String> {
        let mut users = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |why: String| format!("{origin}:{}: {why}", i + 1);
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| at("expected `username:hash`".into()))?;
            if user.is_empty() {
                return Err(at("empty user name".into()));
            }
            let hash = Hash::parse(hash).map_err(|e| at(format!("user `{user}`: {e}")))?;
            if users.insert(user.to_string(), hash).is_some() {
                return Err(at(format!("user `{user}` appears twice")));
            }
        }
        Ok(PasswordFile { users, path: None })
    }

    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<PasswordFile, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let mut f = PasswordFile::parse(&text, &path.display().to_string())?;
        f.path = Some(path.to_path_buf());
        Ok(f)
    }

    /// The users, sorted.
    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }

    /// Whether `user` has an entry and `password` matches it.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(h) => h.verify(password),
            None => {
                // A user name that is not in the file costs what the file's costliest
                // check costs (the check itself, against another entry's hash, its
                // result ignored), so the time taken does not tell whether it exists.
                if let Some(h) = self.dummy() {
                    let _ = h.verify(password);
                }
                false
            }
        }
    }

    /// The hash an unknown user name is checked against: the costliest in the file.
    fn dummy(&self) -> Option<&Hash> {
        self.users.values().max_by_key(|h| h.cost_rank())
    }

    /// Adds or replaces `user` with a new hash of `password`.
    pub fn set(&mut self, user: &str, password: &[u8], scheme: Scheme) -> Result<(), String> {
        if user.is_empty() || user.contains(':') || user.contains('\n') {
            return Err(format!(
                "user name `{user}` is empty or contains `:` or a newline"
            ));
        }
        self.users
            .insert(user.to_string(), Hash::new(password, scheme));
        Ok(())
    }

    /// The user's SCRAM verifier for `hash`, if the entry is one.
    pub fn scram_verifier(
        &self,
        user: &str,
        hash: crate::scram::ScramHash,
    ) -> Option<&crate::scram::Verifier> {
        match self.users.get(user) {
            Some(Hash::Scram(v)) if v.hash == hash => Some(v),
            _ => None,
        }
    }

    /// Adds or replaces `user` with a SCRAM verifier made elsewhere.
    pub fn set_verifier(&mut self, user: &str, v: crate::scram::Verifier) {
        self.users.insert(user.to_string(), Hash::Scram(v));
    }

    /// Removes `user`; false if it was not there.
    pub fn remove(&mut self, user: &str) -> bool {
        self.users.remove(user).is_some()
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for (u, h) in &self.users {
            s.push_str(u);
            s.push(':');
            s.push_str(&h.render());
            s.push('\n');
        }
        s
    }

    /// Turns a plain-text `username:password` file into a hashed one (`mosquitto_passwd -U`).
    /// Lines that already hold a hash are refused rather than hashed twice.
    pub fn from_plain_text(
        text: &str,
        origin: &str,
        scheme: Scheme,
    ) -> Result<PasswordFile, String> {
        let mut f = PasswordFile::default();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, pw) = line
                .split_once(':')
                .ok_or_else(|| format!("{origin}:{}: expected `username:password`", i + 1))?;
            if Hash::parse(pw).is_ok() {
                return Err(format!(
                    "{origin}:{}: user `{user}` already has a hashed password; the file looks converted already",
                    i + 1
                ));
            }
            f.set(user, pw.as_bytes(), scheme)
                .map_err(|e| format!("{origin}:{}: {e}", i + 1))?;
        }
        Ok(f)
    }
}

impl Authenticator for PasswordFile {
    fn authenticate(&self, c: &Credentials) -> AuthVerdict {
        let (Some(user), Some(pw)) = (&c.username, &c.password) else {
            // A user name without a password cannot match any entry.
            if let Some(u) = &c.username {
                let _ = self.verify(u, b"");
            }
            return AuthVerdict::BadCredentials;
        };
        if self.verify(user, pw) {
            AuthVerdict::Allow
        } else {
            AuthVerdict::BadCredentials
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wrong password for a user the file does not have costs the costliest check the
    /// file holds, so timing tells nothing (the dummy was a 101-iteration PBKDF2 while
    /// users were argon2id: 0.26 ms against 15-26 ms).
    #[test]
    fn unknown_users_cost_the_costliest_check() {
        let mut f = PasswordFile::default();
        f.set("cheap", b"x", Scheme::Sha512).unwrap();
        f.set("pbkdf2", b"x", Scheme::Pbkdf2Sha512(1_000)).unwrap();
        f.set("alice", b"x", Scheme::Argon2id).unwrap();
        assert!(matches!(f.dummy(), Some(Hash::Argon2(_))));
        assert!(
            !f.verify("mallory", b"x"),
            "the dummy's result is never used"
        );
        let mut g = PasswordFile::default();
        g.set("a", b"x", Scheme::Pbkdf2Sha512(101)).unwrap();
        g.set("b", b"x", Scheme::Pbkdf2Sha512(20_000)).unwrap();
        assert!(matches!(
            g.dummy(),
            Some(Hash::Pbkdf2 {
                iterations: 20_000,
                ..
            })
        ));
    }

    #[test]
    fn reads_mosquitto_formats_and_writes_argon2id() {
        // $6$: base64(salt) $ base64(sha512(password || salt)), built here independently.
        let salt = b"0123456789ab";
        let h6 = format!(
            "$6${}${}",
            B64.encode(salt),
            B64.encode(sha512(&[b"secret6", salt]))
        );
        // mosquitto 2.0 ($7$, 101 iterations, 12-byte salt) and 2.1 (1000, 64-byte salt).
        let h70 = format!(
            "$7$101${}${}",
            B64.encode(salt),
            B64.encode(pbkdf2(b"secret7", salt, 101, 64))
        );
        let salt64 = [7u8; 64];
        let h71 = format!(
            "$7$1000${}${}",
            B64.encode(salt64),
            B64.encode(pbkdf2(b"secret71", &salt64, 1000, 64))
        );
        let text = format!("# users\nold:{h6}\nmid:{h70}\n\nnew:{h71}\n");
        let mut f = PasswordFile::parse(&text, "pw").unwrap();
        assert!(f.verify("old", b"secret6") && !f.verify("old", b"secret7"));
        assert!(f.verify("mid", b"secret7") && !f.verify("mid", b"secret6"));
        assert!(f.verify("new", b"secret71") && !f.verify("new", b""));
        assert!(!f.verify("nobody", b"secret6"));
        f.set("fresh", b"pa:ss word", Scheme::Argon2id).unwrap();
        let text = f.render();
        assert!(text.contains("fresh:$argon2id$"), "{text}");
        let again = PasswordFile::parse(&text, "pw").unwrap();
        assert!(again.verify("fresh", b"pa:ss word") && !again.verify("fresh", b"pass word"));
        assert!(
            again.verify("old", b"secret6"),
            "round trip keeps old entries"
        );
        assert!(f.remove("old") && !f.remove("old"));
    }

    #[test]
    fn errors_name_the_file_and_line() {
        for (text, want) in [
            ("a:$6$x\n", "pw:1: user `a`: `$6$` entry needs"),
            (
                "\n\nb:$7$many$c2FsdA==$aGFzaA==\n",
                "pw:3: user `b`: `many` is not an iteration count",
            ),
            ("c:plaintext\n", "pw:1: user `c`: not a password hash"),
            ("nocolon\n", "pw:1: expected `username:hash`"),
            (":$6$x$y\n", "pw:1: empty user name"),
        ] {
            let e = PasswordFile::parse(text, "pw").unwrap_err();
            assert!(e.starts_with(want), "{e}");
        }
        let h = Hash::new(b"x", Scheme::Sha512).render();
        let e = PasswordFile::parse(&format!("d:{h}\nd:{h}\n"), "pw").unwrap_err();
        assert!(e.contains("pw:2: user `d` appears twice"), "{e}");
    }

    #[test]
    fn plain_text_conversion_and_schemes() {
        let f = PasswordFile::from_plain_text("u1:p1\nu2:p:2\n", "f", Scheme::Pbkdf2Sha512(101))
            .unwrap();
        assert!(f.verify("u1", b"p1") && f.verify("u2", b"p:2"));
        assert!(f.render().contains("u1:$7$101$"));
        let e = PasswordFile::from_plain_text(&f.render(), "f", Scheme::Argon2id).unwrap_err();
        assert!(e.contains("converted already"), "{e}");
        let mut g = PasswordFile::default();
        assert!(g.set("a:b", b"x", Scheme::Sha512).is_err());
    }
}
