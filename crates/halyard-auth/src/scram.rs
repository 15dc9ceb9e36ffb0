//! SCRAM-SHA-256 and SCRAM-SHA-512 (RFC 5802, RFC 7677) as MQTT 5 enhanced authentication:
//! client-first in CONNECT's Authentication Data, server-first in AUTH 0x18, client-final in
//! AUTH 0x18, server-final in CONNACK (or AUTH 0x00 on re-authentication).
//!
//! The password file stores verifiers (`$scram-sha-256$iterations$salt$StoredKey$ServerKey`),
//! never passwords; the same entry also checks a plain CONNECT password. No channel binding
//! (`p=` is refused). An unknown user gets a plausible challenge (salt derived from the name
//! with a per-process secret) and fails only at the end, so the exchange does not reveal
//! which users exist.

use std::sync::Arc;

use aws_lc_rs::{digest, hmac, pbkdf2};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use halyard_broker::auth::{AuthExchange, AuthStep, AuthVerdict, EnhancedAuth};

use crate::PasswordFile;

/// The hash of a SCRAM mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScramHash {
    /// SCRAM-SHA-256.
    Sha256,
    /// SCRAM-SHA-512.
    Sha512,
}

impl ScramHash {
    /// The mechanism name, also the MQTT Authentication Method.
    pub fn mechanism(self) -> &'static str {
        match self {
            ScramHash::Sha256 => "SCRAM-SHA-256",
            ScramHash::Sha512 => "SCRAM-SHA-512",
        }
    }
    fn tag(self) -> &'static str {
        match self {
            ScramHash::Sha256 => "scram-sha-256",
            ScramHash::Sha512 => "scram-sha-512",
        }
    }
    fn digest(self) -> &'static digest::Algorithm {
        match self {
            ScramHash::Sha256 => &digest::SHA256,
            ScramHash::Sha512 => &digest::SHA512,
        }
    }
    fn hmac(self) -> hmac::Algorithm {
        match self {
            ScramHash::Sha256 => hmac::HMAC_SHA256,
            ScramHash::Sha512 => hmac::HMAC_SHA512,
        }
    }
    fn pbkdf2(self) -> pbkdf2::Algorithm {
        match self {
            ScramHash::Sha256 => pbkdf2::PBKDF2_HMAC_SHA256,
            ScramHash::Sha512 => pbkdf2::PBKDF2_HMAC_SHA512,
        }
    }
    fn len(self) -> usize {
        self.digest().output_len()
    }
    fn mac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        hmac::sign(&hmac::Key::new(self.hmac(), key), data)
            .as_ref()
            .to_vec()
    }
    fn h(self, data: &[u8]) -> Vec<u8> {
        digest::digest(self.digest(), data).as_ref().to_vec()
    }
}

/// A stored SCRAM verifier.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    /// Which hash.
    pub hash: ScramHash,
    /// PBKDF2 iterations.
    pub iterations: u32,
    /// Salt.
    pub salt: Vec<u8>,
    /// H(ClientKey).
    pub stored_key: Vec<u8>,
    /// HMAC(SaltedPassword, "Server Key").
    pub server_key: Vec<u8>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "${}$...", self.hash.tag())
    }
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

impl Verifier {
    /// Derives a verifier from a password (RFC 5802 section 3).
    pub fn new(hash: ScramHash, password: &[u8], salt: &[u8], iterations: u32) -> Verifier {
        let mut salted = vec![0u8; hash.len()];
        let iters =
            std::num::NonZeroU32::new(iterations.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
        pbkdf2::derive(hash.pbkdf2(), iters, salt, password, &mut salted);
        let client_key = hash.mac(&salted, b"Client Key");
        Verifier {
            hash,
            iterations,
            salt: salt.to_vec(),
            stored_key: hash.h(&client_key),
            server_key: hash.mac(&salted, b"Server Key"),
        }
    }

    /// Checks a plain password against the verifier.
    pub fn verify_password(&self, password: &[u8]) -> bool {
        let v = Verifier::new(self.hash, password, &self.salt, self.iterations);
        ct_eq(&v.stored_key, &self.stored_key)
    }

    /// The password-file form.
    pub fn render(&self) -> String {
        format!(
            "${}${}${}${}${}",
            self.hash.tag(),
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(&self.stored_key),
            B64.encode(&self.server_key)
        )
    }

    /// Parses the password-file form.
    pub fn parse(s: &str) -> Option<Result<Verifier, String>> {
        let (hash, rest) = if let Some(r) = s.strip_prefix("$scram-sha-256$") {
            (ScramHash::Sha256, r)
        } else if let Some(r) = s.strip_prefix("$scram-sha-512$") {
            (ScramHash::Sha512, r)
        } else {
            return None;
        };
        let f: Vec<&str> = rest.split('$').collect();
        let parse = || -> Result<Verifier, String> {
            let [it, salt, stored, server] = f.as_slice() else {
                return Err(format!(
                    "`${}$` entry needs iterations$salt$StoredKey$ServerKey",
                    hash.tag()
                ));
            };
            let iterations: u32 = it
                .parse()
                .map_err(|_| format!("`{it}` is not an iteration count"))?;
            let b = |x: &str| {
                B64.decode(x)
                    .map_err(|_| "a field is not base64".to_string())
            };
            let (stored_key, server_key) = (b(stored)?, b(server)?);
            if stored_key.len() != hash.len() || server_key.len() != hash.len() || iterations == 0 {
                return Err("keys of the wrong length or 0 iterations".into());
            }
            Ok(Verifier {
                hash,
                iterations,
                salt: b(salt)?,
                stored_key,
                server_key,
            })
        };
        Some(parse())
    }
}

/// Decodes a SCRAM `saslname` (`=2C` is `,`, `=3D` is `=`).
fn sasl_name(s: &str) -> Option<String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return None,
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Some(out)
}

fn attr(msg: &str, key: char) -> Option<&str> {
    msg.split(',')
        .find_map(|f| f.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

/// The server side of one SCRAM mechanism over a password file.
#[derive(Debug)]
pub struct ScramAuth {
    hash: ScramHash,
    users: Arc<PasswordFile>,
    /// Keys the fake salts of unknown users (per process).
    secret: Vec<u8>,
    /// Fixed server nonce part, for the RFC test vector only.
    fixed_nonce: Option<String>,
}

impl ScramAuth {
    /// SCRAM with `hash` over the verifiers in `users`.
    pub fn new(hash: ScramHash, users: Arc<PasswordFile>) -> ScramAuth {
        let mut secret = vec![0u8; 32];
        aws_lc_rs::rand::fill(&mut secret).expect("system randomness");
        ScramAuth {
            hash,
            users,
            secret,
            fixed_nonce: None,
        }
    }

    /// Uses `nonce` as the server's nonce part (tests against RFC vectors only).
    pub fn with_fixed_nonce(mut self, nonce: &str) -> ScramAuth {
        self.fixed_nonce = Some(nonce.to_string());
        self
    }

    fn fail(v: AuthVerdict) -> AuthStep {
        AuthStep::Failure(v)
    }
}

impl EnhancedAuth for ScramAuth {
    fn method(&self) -> &str {
        self.hash.mechanism()
    }

    fn start(&self, data: Option<&[u8]>) -> AuthStep {
        let Some(Ok(first)) = data.map(std::str::from_utf8) else {
            return Self::fail(AuthVerdict::BadCredentials);
        };
        // gs2-header: "n,," or "y,," (no channel binding), optionally with "a=authzid".
        let mut parts = first.splitn(3, ',');
        let (Some(cb), Some(authzid), Some(bare)) = (parts.next(), parts.next(), parts.next())
        else {
            return Self::fail(AuthVerdict::BadCredentials);
        };
        if cb != "n" && cb != "y" {
            return Self::fail(AuthVerdict::NotAuthorized); // channel binding not offered
        }
        let (Some(user), Some(cnonce)) = (attr(bare, 'n').and_then(sasl_name), attr(bare, 'r'))
        else {
            return Self::fail(AuthVerdict::BadCredentials);
        };
        if !authzid.is_empty()
            && authzid.strip_prefix("a=").and_then(sasl_name).as_deref() != Some(&user)
        {
            return Self::fail(AuthVerdict::NotAuthorized);
        }
        if cnonce.is_empty()
            || !cnonce
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Self::fail(AuthVerdict::BadCredentials);
        }
        let (verifier, known) = match self.users.scram_verifier(&user, self.hash) {
            Some(v) => (v.clone(), true),
            None => {
                // A plausible, stable challenge for a user that does not exist.
                let salt = self.hash.mac(&self.secret, user.as_bytes())[..16].to_vec();
                let mut keys = vec![0u8; self.hash.len()];
                aws_lc_rs::rand::fill(&mut keys).expect("system randomness");
                (
                    Verifier {
                        hash: self.hash,
                        iterations: 4096,
                        salt,
                        stored_key: keys.clone(),
                        server_key: keys,
                    },
                    false,
                )
            }
        };
        let snonce = self.fixed_nonce.clone().unwrap_or_else(|| {
            let mut r = [0u8; 18];
            aws_lc_rs::rand::fill(&mut r).expect("system randomness");
            B64.encode(r)
        });
        let nonce = format!("{cnonce}{snonce}");
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        let gs2 = &first[..first.len() - bare.len()];
        AuthStep::Continue(
            server_first.clone().into_bytes(),
            Box::new(ScramExchange {
                user,
                known,
                verifier,
                nonce,
                auth_prefix: format!("{bare},{server_first}"),
                gs2: gs2.to_string(),
            }),
        )
    }
}

#[derive(Debug)]
struct ScramExchange {
    user: String,
    known: bool,
    verifier: Verifier,
    nonce: String,
    /// client-first-bare "," server-first
    auth_prefix: String,
    gs2: String,
}

impl AuthExchange for ScramExchange {
    fn step(&mut self, data: Option<&[u8]>) -> AuthStep {
        let Some(Ok(fin)) = data.map(std::str::from_utf8) else {
            return AuthStep::Failure(AuthVerdict::BadCredentials);
        };
        let Some((without_proof, proof)) = fin.rsplit_once(",p=") else {
            return AuthStep::Failure(AuthVerdict::BadCredentials);
        };
        let h = self.verifier.hash;
        if attr(without_proof, 'c') != Some(&B64.encode(&self.gs2))
            || attr(without_proof, 'r') != Some(&self.nonce)
        {
            return AuthStep::Failure(AuthVerdict::BadCredentials);
        }
        let Ok(proof) = B64.decode(proof) else {
            return AuthStep::Failure(AuthVerdict::BadCredentials);
        };
        let auth_message = format!("{},{without_proof}", self.auth_prefix);
        let signature = h.mac(&self.verifier.stored_key, auth_message.as_bytes());
        if proof.len() != signature.len() {
            return AuthStep::Failure(AuthVerdict::BadCredentials);
        }
        let client_key: Vec<u8> = proof.iter().zip(&signature).map(|(a, b)| a ^ b).collect();
        if !self.known || !ct_eq(&h.h(&client_key), &self.verifier.stored_key) {
            return AuthStep::Failure(AuthVerdict::BadCredentials);
        }
        let server_sig = h.mac(&self.verifier.server_key, auth_message.as_bytes());
        AuthStep::Success {
            username: self.user.clone(),
            data: Some(format!("v={}", B64.encode(server_sig)).into_bytes()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677 section 3: SCRAM-SHA-256, user "user", password "pencil".
    #[test]
    fn rfc7677_test_vector() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let mut f = PasswordFile::default();
        f.set_verifier(
            "user",
            Verifier::new(ScramHash::Sha256, b"pencil", &salt, 4096),
        );
        let auth = ScramAuth::new(ScramHash::Sha256, Arc::new(f))
            .with_fixed_nonce("%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0");
        let AuthStep::Continue(server_first, mut ex) =
            auth.start(Some(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"))
        else {
            panic!("no challenge");
        };
        assert_eq!(
            String::from_utf8(server_first).unwrap(),
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let fin = b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        match ex.step(Some(fin)) {
            AuthStep::Success { username, data } => {
                assert_eq!(username, "user");
                assert_eq!(
                    data.unwrap(),
                    b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn wrong_proof_unknown_user_and_channel_binding_fail() {
        let salt = b"0123456789abcdef";
        let mut f = PasswordFile::default();
        f.set_verifier(
            "user",
            Verifier::new(ScramHash::Sha512, b"pencil", salt, 4096),
        );
        let auth = ScramAuth::new(ScramHash::Sha512, Arc::new(f));
        for who in ["user", "nobody"] {
            let first = format!("n,,n={who},r=abc");
            let AuthStep::Continue(sf, mut ex) = auth.start(Some(first.as_bytes())) else {
                panic!()
            };
            let sf = String::from_utf8(sf).unwrap();
            let nonce = attr(&sf, 'r').unwrap();
            let fin = format!("c=biws,r={nonce},p={}", B64.encode([0u8; 64]));
            assert!(matches!(
                ex.step(Some(fin.as_bytes())),
                AuthStep::Failure(AuthVerdict::BadCredentials)
            ));
        }
        assert!(matches!(
            auth.start(Some(b"p=tls-unique,,n=user,r=abc")),
            AuthStep::Failure(_)
        ));
        assert!(matches!(auth.start(Some(b"garbage")), AuthStep::Failure(_)));
        // Verifiers also check plain passwords, and survive the file format.
        let v = Verifier::new(ScramHash::Sha256, b"pw", salt, 4096);
        assert!(v.verify_password(b"pw") && !v.verify_password(b"px"));
        assert_eq!(Verifier::parse(&v.render()).unwrap().unwrap(), v);
        assert_eq!(sasl_name("a=2Cb=3Dc").as_deref(), Some("a,b=c"));
        assert_eq!(sasl_name("bad=41"), None);
    }
}
