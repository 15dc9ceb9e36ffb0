//! A throwaway PKI for TLS tests: CAs, server and client certificates written as PEM files
//! into a temporary directory that is removed on drop.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A directory of PEM files.
#[derive(Debug)]
pub struct TestPki {
    /// Where the files are.
    pub dir: PathBuf,
}

/// A certificate authority.
#[derive(Debug)]
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    /// Its certificate (PEM).
    pub cert: PathBuf,
}

/// A certificate and its key.
#[derive(Debug, Clone)]
pub struct Pair {
    /// Certificate (PEM).
    pub cert: PathBuf,
    /// Private key (PEM, PKCS#8).
    pub key: PathBuf,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl TestPki {
    /// A fresh, empty directory.
    pub fn new() -> TestPki {
        let dir = std::env::temp_dir().join(format!(
            "halyard-pki-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create pki dir");
        TestPki { dir }
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).expect("write pem");
        p
    }

    /// A self-signed CA named `name`.
    pub fn ca(&self, name: &str) -> Ca {
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, format!("Halyard test {name}"));
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer =
            CertifiedIssuer::self_signed(p, KeyPair::generate().expect("key")).expect("ca");
        let cert = self.write(&format!("{name}.pem"), &issuer.pem());
        Ca { issuer, cert }
    }

    fn leaf(&self, ca: &Ca, name: &str, cn: Option<&str>, sans: &[&str], server: bool) -> Pair {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(sans).expect("params");
        if let Some(cn) = cn {
            p.distinguished_name.push(DnType::CommonName, cn);
        }
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &ca.issuer).expect("sign");
        Pair {
            cert: self.write(&format!("{name}.pem"), &cert.pem()),
            key: self.write(&format!("{name}.key"), &key.serialize_pem()),
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1, signed by `ca`.
    pub fn server(&self, ca: &Ca, name: &str) -> Pair {
        self.leaf(
            ca,
            name,
            Some("localhost"),
            &["localhost", "127.0.0.1"],
            true,
        )
    }

    /// A client certificate with common name `cn` (or only a DNS SAN when `cn` is None).
    pub fn client(&self, ca: &Ca, name: &str, cn: Option<&str>, sans: &[&str]) -> Pair {
        self.leaf(ca, name, cn, sans, false)
    }

    /// Copies `from` over `to` (atomically, by rename, as deployment tools do).
    pub fn replace(&self, from: &Path, to: &Path) {
        let tmp = to.with_extension("tmp");
        std::fs::copy(from, &tmp).expect("copy");
        std::fs::rename(&tmp, to).expect("rename");
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
