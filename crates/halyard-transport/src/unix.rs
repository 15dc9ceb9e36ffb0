//! `unix://`: Unix-domain socket listeners (path or abstract) and dialers.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::{UnixListener, UnixStream};
use tracing::info;

use crate::peer::*;
use crate::transport::*;
use crate::url::{ListenerConfig, Url};

#[derive(Debug)]
pub(crate) struct UnixAcceptor {
    pub(crate) l: UnixListener,
    pub(crate) name: Arc<str>,
    /// The socket file, removed when the listener closes (None for abstract sockets).
    pub(crate) file: Option<PathBuf>,
}

impl Drop for UnixAcceptor {
    fn drop(&mut self) {
        if let Some(p) = &self.file {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Acceptor for UnixAcceptor {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<(BoxStream, Remote)>> {
        Box::pin(async move {
            let (s, _) = self.l.accept().await?;
            Ok((Box::new(s) as BoxStream, Remote::Unix(self.name.clone())))
        })
    }
    fn local_addr(&self) -> String {
        self.name.to_string()
    }
}

/// Removes a socket file left by a previous run, but only if nothing answers on it
/// and it is a socket: never delete a regular file or a live broker's socket.
pub(crate) fn remove_stale_socket(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if !m.file_type().is_socket() => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; not removing it",
                path.display()
            ),
        )),
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another process is listening on {}", path.display()),
            )),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                info!(path = %path.display(), "removing a stale socket file");
                std::fs::remove_file(path)
            }
            Err(e) => Err(e),
        },
    }
}

pub(crate) fn bind_unix(cfg: &ListenerConfig) -> io::Result<Box<dyn Acceptor>> {
    let p = cfg.parsed.unix_path().map_err(invalid)?;
    if let Some(name) = p.strip_prefix('@') {
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            let l = std::os::unix::net::UnixListener::bind_addr(&addr)?;
            l.set_nonblocking(true)?;
            return Ok(Box::new(UnixAcceptor {
                l: UnixListener::from_std(l)?,
                name: p.as_str().into(),
                file: None,
            }));
        }
        #[cfg(not(target_os = "linux"))]
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("abstract socket @{name} needs Linux"),
        ));
    }
    let path = PathBuf::from(&p);
    remove_stale_socket(&path)?;
    let l = UnixListener::bind(&path)?;
    let acceptor = UnixAcceptor {
        l,
        name: p.as_str().into(),
        file: Some(path.clone()),
    };
    if let Some(mode) = cfg.socket_mode {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(Box::new(acceptor))
}

#[derive(Debug)]
pub(crate) struct Unix;

impl Transport for Unix {
    fn bind<'a>(&'a self, cfg: &'a ListenerConfig) -> BoxFuture<'a, io::Result<Box<dyn Acceptor>>> {
        Box::pin(async move { bind_unix(cfg) })
    }
    fn upgrade(
        &self,
        s: BoxStream,
        _: Arc<ListenerCtx>,
    ) -> BoxFuture<'static, io::Result<(BoxStream, Option<String>)>> {
        Box::pin(async move { Ok((s, None)) })
    }
    fn has_handshake(&self) -> bool {
        false
    }
    fn dial<'a>(
        &'a self,
        url: &'a Url,
        _: &'a DialOptions,
    ) -> BoxFuture<'a, io::Result<BoxStream>> {
        Box::pin(async move {
            let p = url.unix_path().map_err(invalid)?;
            if let Some(name) = p.strip_prefix('@') {
                #[cfg(target_os = "linux")]
                {
                    use std::os::linux::net::SocketAddrExt;
                    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
                    let s = std::os::unix::net::UnixStream::connect_addr(&addr)?;
                    s.set_nonblocking(true)?;
                    return Ok(Box::new(UnixStream::from_std(s)?) as BoxStream);
                }
                #[cfg(not(target_os = "linux"))]
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("abstract socket @{name} needs Linux"),
                ));
            }
            Ok(Box::new(UnixStream::connect(p).await?) as BoxStream)
        })
    }
}
