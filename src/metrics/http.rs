//! The `GET /metrics` endpoint: a std-only HTTP/1.1 server, one request per connection, on a
//! loopback TCP port or a unix socket.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::MetricsRegistry;

/// Longest request head accepted.
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Per-connection read/write timeout.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Failures starting the metrics server.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics address '{addr}' is not HOST:PORT (127.0.0.1:9100, [::1]:9100, localhost:9100) or unix:/path")]
    BadAddress { addr: String },
    #[error("metrics address '{addr}' is not a loopback address; pass allow_non_loopback (CLI: --metrics-allow-remote) to expose metrics beyond this host")]
    NonLoopback { addr: String },
    #[error("cannot bind metrics address {addr}: {source}")]
    Bind { addr: String, source: io::Error },
    #[error("cannot set mode 0600 on metrics socket {path}: {source}")]
    Chmod { path: PathBuf, source: io::Error },
    #[error("cannot start the metrics thread: {0}")]
    Thread(io::Error),
}

/// Where to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl MetricsAddr {
    /// Parse `127.0.0.1:PORT`, `[::1]:PORT`, `localhost:PORT` (= 127.0.0.1, no DNS), any other IP
    /// literal with a port, or `unix:/path`. Loopback is enforced by the server, not here.
    pub fn parse(addr: &str) -> Result<Self, MetricsError> {
        let bad = || MetricsError::BadAddress {
            addr: addr.to_string(),
        };
        if let Some(path) = addr.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(MetricsAddr::Unix(PathBuf::from(path)));
        }
        if let Some(port) = addr.strip_prefix("localhost:") {
            let port: u16 = port.parse().map_err(|_| bad())?;
            return Ok(MetricsAddr::Tcp(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                port,
            )));
        }
        addr.parse::<SocketAddr>()
            .map(MetricsAddr::Tcp)
            .map_err(|_| bad())
    }
}

/// Options of [`MetricsServer::start_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct MetricsServerOptions {
    /// Allow a TCP address that is not loopback (e.g. `0.0.0.0:9100`). Off by default.
    pub allow_non_loopback: bool,
}

enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A running metrics endpoint. Dropping it stops the thread (and removes the unix socket file).
pub struct MetricsServer {
    addr: MetricsAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl MetricsServer {
    /// Serve `GET /metrics` on a loopback TCP address or a unix socket (see [`MetricsAddr::parse`]).
    pub fn start(addr: &str, registry: Arc<MetricsRegistry>) -> Result<Self, MetricsError> {
        Self::start_with(addr, registry, MetricsServerOptions::default())
    }

    /// As [`start`](Self::start), with options.
    pub fn start_with(
        addr: &str,
        registry: Arc<MetricsRegistry>,
        opts: MetricsServerOptions,
    ) -> Result<Self, MetricsError> {
        let parsed = MetricsAddr::parse(addr)?;
        let (bound, actual) = match parsed {
            MetricsAddr::Tcp(sa) => {
                if !sa.ip().is_loopback() && !opts.allow_non_loopback {
                    return Err(MetricsError::NonLoopback {
                        addr: addr.to_string(),
                    });
                }
                let l = TcpListener::bind(sa).map_err(|source| MetricsError::Bind {
                    addr: addr.to_string(),
                    source,
                })?;
                let local = l.local_addr().map_err(|source| MetricsError::Bind {
                    addr: addr.to_string(),
                    source,
                })?;
                (Bound::Tcp(l), MetricsAddr::Tcp(local))
            }
            MetricsAddr::Unix(path) => {
                if let Ok(meta) = fs::symlink_metadata(&path) {
                    use std::os::unix::fs::FileTypeExt;
                    if meta.file_type().is_socket() {
                        let _ = fs::remove_file(&path);
                    }
                }
                let l = UnixListener::bind(&path).map_err(|source| MetricsError::Bind {
                    addr: addr.to_string(),
                    source,
                })?;
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(
                    |source| MetricsError::Chmod {
                        path: path.clone(),
                        source,
                    },
                )?;
                (Bound::Unix(l), MetricsAddr::Unix(path))
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = thread::Builder::new()
            .name("metrics".into())
            .spawn(move || accept_loop(bound, &registry, &stop2))
            .map_err(MetricsError::Thread)?;
        Ok(Self {
            addr: actual,
            stop,
            thread: Some(thread),
        })
    }

    /// The bound address (with the real port when `:0` was asked).
    pub fn addr(&self) -> &MetricsAddr {
        &self.addr
    }

    /// The bound TCP address, if TCP.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.addr {
            MetricsAddr::Tcp(sa) => Some(*sa),
            MetricsAddr::Unix(_) => None,
        }
    }

    /// For logs: `http://127.0.0.1:9100/metrics` or `unix:/path`.
    pub fn endpoint(&self) -> String {
        match &self.addr {
            MetricsAddr::Tcp(sa) => format!("http://{sa}/metrics"),
            MetricsAddr::Unix(p) => format!("unix:{}", p.display()),
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept() with a throw-away connection.
        let woke = match &self.addr {
            MetricsAddr::Tcp(sa) => TcpStream::connect_timeout(sa, Duration::from_secs(1)).is_ok(),
            MetricsAddr::Unix(p) => UnixStream::connect(p).is_ok(),
        };
        if let Some(t) = self.thread.take() {
            if woke {
                let _ = t.join();
            }
        }
        if let MetricsAddr::Unix(p) = &self.addr {
            let _ = fs::remove_file(p);
        }
    }
}

fn accept_loop(bound: Bound, registry: &MetricsRegistry, stop: &AtomicBool) {
    loop {
        let res = match &bound {
            Bound::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_read_timeout(Some(IO_TIMEOUT));
                let _ = s.set_write_timeout(Some(IO_TIMEOUT));
                Conn::Tcp(s)
            }),
            Bound::Unix(l) => l.accept().map(|(s, _)| {
                let _ = s.set_read_timeout(Some(IO_TIMEOUT));
                let _ = s.set_write_timeout(Some(IO_TIMEOUT));
                Conn::Unix(s)
            }),
        };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match res {
            Ok(mut conn) => {
                if let Err(e) = serve_connection(&mut conn, registry) {
                    log::debug!("metrics: connection: {e}");
                }
            }
            Err(e) => {
                log::warn!("metrics: accept failed: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
        }
    }
}

/// An HTTP response decided from the request head alone (pure; unit-tested).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Metrics { head_only: bool },
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// Route a request head (`METHOD SP TARGET SP VERSION` on its first line).
pub fn route(head: &[u8]) -> Route {
    let first = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let Ok(first) = std::str::from_utf8(first) else {
        return Route::BadRequest;
    };
    let mut parts = first.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !target.starts_with('/') {
        return Route::BadRequest;
    }
    let path = target.split('?').next().unwrap_or(target);
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ if path == "/metrics" => return Route::MethodNotAllowed,
        _ => return Route::NotFound,
    };
    if path == "/metrics" {
        Route::Metrics { head_only }
    } else {
        Route::NotFound
    }
}

fn serve_connection(conn: &mut Conn, registry: &MetricsRegistry) -> io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let complete = loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        if head.len() > MAX_REQUEST_HEAD {
            break false;
        }
        let n = conn.read(&mut buf)?;
        if n == 0 {
            // Peer closed: answer what we have if it has a request line, else nothing to do.
            break head.contains(&b'\n');
        }
        head.extend_from_slice(buf.get(..n).unwrap_or_default());
    };
    if head.is_empty() {
        return Ok(());
    }
    let route = if complete {
        route(&head)
    } else {
        Route::BadRequest
    };
    let (status, ctype, body, head_only, extra) = match route {
        Route::Metrics { head_only } => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            registry.render_prometheus(),
            head_only,
            "",
        ),
        Route::NotFound => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found; try /metrics\n".to_string(),
            false,
            "",
        ),
        Route::MethodNotAllowed => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "method not allowed\n".to_string(),
            false,
            "Allow: GET, HEAD\r\n",
        ),
        Route::BadRequest => (
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "bad request\n".to_string(),
            false,
            "",
        ),
    };
    let mut resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        resp.push_str(&body);
    }
    conn.write_all(resp.as_bytes())?;
    conn.flush()
}

/// Scrape helper for tests and `vhost-clone` tooling: GET `/metrics` from `addr` (same syntax as
/// [`MetricsAddr::parse`]) and return `(status code, body)`.
pub fn scrape(addr: &str) -> io::Result<(u16, String)> {
    let req = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let mut raw = Vec::new();
    match MetricsAddr::parse(addr).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))? {
        MetricsAddr::Tcp(sa) => {
            let mut s = TcpStream::connect_timeout(&sa, IO_TIMEOUT)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.write_all(req)?;
            s.read_to_end(&mut raw)?;
        }
        MetricsAddr::Unix(p) => {
            let mut s = UnixStream::connect(&p)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.write_all(req)?;
            s.read_to_end(&mut raw)?;
        }
    }
    parse_response(&raw)
}

/// Split a raw HTTP/1.1 response into status code and body.
pub fn parse_response(raw: &[u8]) -> io::Result<(u16, String)> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let text = std::str::from_utf8(raw).map_err(|_| bad("response is not UTF-8"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| bad("no status code"))?;
    Ok((code, body.to_string()))
}

/// Path of a unix metrics socket, if `addr` names one.
pub fn unix_path(addr: &str) -> Option<&Path> {
    addr.strip_prefix("unix:").map(Path::new)
}
