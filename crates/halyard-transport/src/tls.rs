//! TLS for listeners and dialers: rustls with the aws-lc-rs provider, TLS 1.2 and 1.3, PEM
//! files, optional client certificates, and certificate rotation without dropping anyone
//! (a new `ServerConfig` is swapped in for new handshakes; live connections keep theirs).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The files of a TLS listener (mosquitto's option names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub certfile: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub keyfile: PathBuf,
    /// PEM CA certificates that client certificates must chain to.
    pub cafile: Option<PathBuf>,
    /// Refuse clients without a valid certificate (needs `cafile`).
    pub require_certificate: bool,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read_certs(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{what} {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no PEM certificates in it",
            path.display()
        ));
    }
    Ok(certs)
}

fn read_roots(what: &str, path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for c in read_certs(what, path)? {
        roots
            .add(c)
            .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    }
    Ok(roots)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("keyfile {}: {e}", path.display()))
}

/// Builds a server configuration from `files`, naming the file at fault in errors.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, String> {
    let certs = read_certs("certfile", &files.certfile)?;
    let key = read_key(&files.keyfile)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let builder = match &files.cafile {
        Some(ca) => {
            let v = WebPkiClientVerifier::builder_with_provider(
                Arc::new(read_roots("cafile", ca)?),
                provider(),
            );
            let v = if files.require_certificate {
                v
            } else {
                v.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                v.build()
                    .map_err(|e| format!("cafile {}: {e}", ca.display()))?,
            )
        }
        None if files.require_certificate => {
            return Err(
                "require_certificate needs a cafile to verify client certificates against".into(),
            );
        }
        None => builder.with_no_client_auth(),
    };
    let cfg = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "certfile {} / keyfile {}: {e}",
            files.certfile.display(),
            files.keyfile.display()
        )
    })?;
    Ok(Arc::new(cfg))
}

/// What identifies a file's version: length, modification time and inode (an atomic
/// rename or a Kubernetes secret's symlink swap changes the inode).
type Stamp = Option<(u64, SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?, m.ino()))
}

/// A listener's TLS configuration that can be replaced while it runs.
#[derive(Debug)]
pub struct ReloadableTls {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
    stamps: Mutex<Vec<Stamp>>,
}

impl ReloadableTls {
    /// Loads `files`; an error names the file.
    pub fn load(files: TlsFiles) -> Result<ReloadableTls, String> {
        let stamps = Self::stamps_of(&files);
        let cfg = server_config(&files)?;
        Ok(ReloadableTls {
            files,
            current: RwLock::new(cfg),
            stamps: Mutex::new(stamps),
        })
    }

    fn stamps_of(files: &TlsFiles) -> Vec<Stamp> {
        let mut v = vec![stamp(&files.certfile), stamp(&files.keyfile)];
        if let Some(ca) = &files.cafile {
            v.push(stamp(ca));
        }
        v
    }

    /// The files this configuration comes from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The configuration for the next handshake.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reloads if any file changed since the last look. `Ok(true)`: new files in use;
    /// `Err`: the new files were refused and the previous configuration stays.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let now = Self::stamps_of(&self.files);
        {
            let mut seen = self.stamps.lock().unwrap_or_else(|e| e.into_inner());
            if *seen == now {
                return Ok(false);
            }
            // Remember the attempt even if it fails: a bad file is reported once, and
            // retried when it changes again (e.g. when the writer finishes it).
            *seen = now;
        }
        self.reload().map(|()| true)
    }

    /// Reloads unconditionally (SIGHUP). On error the previous configuration stays.
    pub fn reload(&self) -> Result<(), String> {
        let cfg = server_config(&self.files)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = cfg;
        Ok(())
    }
}

/// The identity of the peer's certificate (CN, else first SAN), if it sent one.
pub fn peer_identity(conn: &rustls::ServerConnection) -> Option<String> {
    conn.peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| crate::x509::identity(c))
}

/// Client-side TLS settings (the flags mosquitto_pub users know).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// CA certificates to trust; without it, the system bundle (`SSL_CERT_FILE`, or the
    /// usual distribution paths).
    pub cafile: Option<PathBuf>,
    /// Client certificate chain (PEM), for brokers that require one.
    pub certfile: Option<PathBuf>,
    /// Its private key (PEM).
    pub keyfile: Option<PathBuf>,
    /// The name to verify instead of the URL's host.
    pub server_name: Option<String>,
    /// Accept a certificate issued for another host name (mosquitto's `--insecure`). The
    /// chain is still verified against the trusted CAs; only the name check is skipped.
    pub insecure: bool,
}

/// Where distributions keep the CA bundle.
const SYSTEM_BUNDLES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Builds a client configuration.
pub fn client_config(c: &ClientTls) -> Result<Arc<ClientConfig>, String> {
    let roots = match &c.cafile {
        Some(ca) => read_roots("cafile", ca)?,
        None => {
            let env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
            let path = env
                .into_iter()
                .chain(SYSTEM_BUNDLES.iter().map(PathBuf::from))
                .find(|p| p.exists())
                .ok_or("no CA file given and no system CA bundle found; pass a cafile")?;
            read_roots("system CA bundle", &path)?
        }
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let builder = if c.insecure {
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| e.to_string())?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyName(inner)))
    } else {
        builder.with_root_certificates(roots)
    };
    let cfg = match (&c.certfile, &c.keyfile) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(read_certs("certfile", cert)?, read_key(key)?)
            .map_err(|e| format!("client certificate: {e}"))?,
        (None, None) => builder.with_no_client_auth(),
        _ => return Err("a client certificate needs both certfile and keyfile".into()),
    };
    Ok(Arc::new(cfg))
}

/// Full WebPKI verification except the host-name check (`--insecure`).
#[derive(Debug)]
struct AnyName(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::CertificateError as C;
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                C::NotValidForName | C::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The server name to verify for `host`.
pub fn server_name(host: &str, c: &ClientTls) -> Result<ServerName<'static>, String> {
    let name = c.server_name.as_deref().unwrap_or(host);
    let name = name.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(name.to_string()).map_err(|e| format!("bad TLS server name `{name}`: {e}"))
}
