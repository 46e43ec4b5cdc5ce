//! A read-only NBD client (fixed newstyle handshake, `NBD_OPT_GO`, simple replies):
//! enough to read a remote archival image. Written from the NBD protocol document.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_FLAG_ERROR: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;
/// Largest read asked of the server in one request (servers must accept 32 MiB; keep well below).
pub const MAX_READ: usize = 8 << 20;
/// Longest option reply we accept.
const MAX_OPTION_REPLY: u32 = 64 * 1024;

/// Where the NBD server is: `nbd://HOST[:PORT][/EXPORT]` or
/// `nbd+unix:///[EXPORT]?socket=PATH` (the URI forms of the NBD URI specification).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NbdAddr {
    Tcp {
        host: String,
        port: u16,
        export: String,
    },
    Unix {
        socket: PathBuf,
        export: String,
    },
}

/// NBD failures.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("invalid NBD URI '{uri}': {why}")]
    Uri { uri: String, why: &'static str },
    #[error("cannot connect to the NBD server {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("NBD handshake with {addr} failed: {why}")]
    Handshake { addr: String, why: String },
    #[error("NBD I/O with {addr} failed: {source}")]
    Io { addr: String, source: io::Error },
}

impl NbdAddr {
    /// True if `s` looks like an NBD URI.
    pub fn is_uri(s: &str) -> bool {
        s.starts_with("nbd://") || s.starts_with("nbd+unix://")
    }

    /// Parse an NBD URI.
    pub fn parse(uri: &str) -> Result<Self, NbdError> {
        let bad = |why| NbdError::Uri {
            uri: uri.to_string(),
            why,
        };
        if let Some(rest) = uri.strip_prefix("nbd+unix://") {
            let (path, query) = rest.split_once('?').ok_or(bad("missing ?socket=PATH"))?;
            let export = path.trim_start_matches('/').to_string();
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .filter(|s| !s.is_empty())
                .ok_or(bad("missing socket=PATH"))?;
            return Ok(NbdAddr::Unix {
                socket: PathBuf::from(socket),
                export,
            });
        }
        let rest = uri
            .strip_prefix("nbd://")
            .ok_or(bad("expected nbd:// or nbd+unix://"))?;
        let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                (h, p.parse::<u16>().map_err(|_| bad("bad port"))?)
            }
            _ => (hostport, 10809),
        };
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        Ok(NbdAddr::Tcp {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            export: export.to_string(),
        })
    }

    fn export(&self) -> &str {
        match self {
            NbdAddr::Tcp { export, .. } | NbdAddr::Unix { export, .. } => export,
        }
    }
}

impl std::fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdAddr::Tcp { host, port, export } => write!(f, "nbd://{host}:{port}/{export}"),
            NbdAddr::Unix { socket, export } => {
                write!(f, "nbd+unix:///{export}?socket={}", socket.display())
            }
        }
    }
}

trait Stream: Read + Write + Send {}
impl Stream for TcpStream {}
impl Stream for UnixStream {}

/// One connection, in transmission phase.
pub struct NbdClient {
    stream: Box<dyn Stream>,
    addr: String,
    size: u64,
    cookie: u64,
    /// A transport or protocol error left the stream out of step: reconnect.
    poisoned: bool,
}

fn rd_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn rd_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn rd_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

impl NbdClient {
    /// Connect and negotiate the export (read-only use).
    pub fn connect(addr: &NbdAddr) -> Result<Self, NbdError> {
        let name = addr.to_string();
        let connect_err = |source| NbdError::Connect {
            addr: name.clone(),
            source,
        };
        let stream: Box<dyn Stream> = match addr {
            NbdAddr::Tcp { host, port, .. } => {
                let s = TcpStream::connect((host.as_str(), *port)).map_err(connect_err)?;
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(Some(READ_TIMEOUT));
                Box::new(s)
            }
            NbdAddr::Unix { socket, .. } => {
                let s = UnixStream::connect(socket).map_err(connect_err)?;
                let _ = s.set_read_timeout(Some(READ_TIMEOUT));
                Box::new(s)
            }
        };
        let mut c = NbdClient {
            stream,
            addr: name,
            size: 0,
            cookie: 0,
            poisoned: false,
        };
        c.handshake(addr.export())?;
        Ok(c)
    }

    fn hs_err(&self, why: impl Into<String>) -> NbdError {
        NbdError::Handshake {
            addr: self.addr.clone(),
            why: why.into(),
        }
    }

    fn handshake(&mut self, export: &str) -> Result<(), NbdError> {
        let io = |e: io::Error| e.to_string();
        let s = &mut self.stream;
        let magic = rd_u64(s).map_err(io);
        let opt = rd_u64(s).map_err(io);
        let flags = rd_u16(s).map_err(io);
        let (magic, opt, flags) = match (magic, opt, flags) {
            (Ok(m), Ok(o), Ok(f)) => (m, o, f),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                return Err(self.hs_err(format!("reading the greeting: {e}")))
            }
        };
        if magic != NBDMAGIC || opt != IHAVEOPT {
            return Err(self.hs_err("not a newstyle NBD server"));
        }
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.hs_err("the server does not speak fixed newstyle"));
        }
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES));
        let name = export.as_bytes();
        let name_len =
            u32::try_from(name.len()).map_err(|_| self.hs_err("export name too long"))?;
        let mut msg = Vec::with_capacity(32 + name.len());
        msg.extend_from_slice(&client_flags.to_be_bytes());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&OPT_GO.to_be_bytes());
        msg.extend_from_slice(&(name_len + 6).to_be_bytes());
        msg.extend_from_slice(&name_len.to_be_bytes());
        msg.extend_from_slice(name);
        msg.extend_from_slice(&0u16.to_be_bytes()); // no information requests
        self.stream
            .write_all(&msg)
            .map_err(|e| self.hs_err(format!("sending NBD_OPT_GO: {e}")))?;
        let mut size = None;
        loop {
            let s = &mut self.stream;
            let head = (|| -> io::Result<(u64, u32, u32, u32)> {
                Ok((rd_u64(s)?, rd_u32(s)?, rd_u32(s)?, rd_u32(s)?))
            })();
            let (magic, option, kind, len) =
                head.map_err(|e| self.hs_err(format!("reading an option reply: {e}")))?;
            if magic != REPLY_MAGIC || option != OPT_GO {
                return Err(self.hs_err("malformed option reply"));
            }
            if len > MAX_OPTION_REPLY {
                return Err(self.hs_err(format!("option reply of {len} bytes")));
            }
            let mut data = vec![0u8; len as usize];
            self.stream
                .read_exact(&mut data)
                .map_err(|e| self.hs_err(format!("reading an option reply: {e}")))?;
            match kind {
                REP_ACK => break,
                REP_INFO => {
                    if let (Some(t), Some(sz)) = (data.get(0..2), data.get(2..10)) {
                        if u16::from_be_bytes([t[0], t[1]]) == INFO_EXPORT {
                            let mut b = [0u8; 8];
                            b.copy_from_slice(sz);
                            size = Some(u64::from_be_bytes(b));
                        }
                    }
                }
                k if k & REP_FLAG_ERROR != 0 => {
                    let msg = String::from_utf8_lossy(&data).to_string();
                    return Err(self.hs_err(format!(
                        "the server refused export '{export}' (error {k:#x}): {msg}"
                    )));
                }
                _ => {}
            }
        }
        self.size = size.ok_or_else(|| self.hs_err("the server sent no export size"))?;
        Ok(())
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where this connection goes.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// True once the connection is out of step (a transport or protocol error).
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Read `buf.len()` bytes at `offset` (in requests of at most [`MAX_READ`]).
    pub fn read_at(&mut self, mut offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        for chunk in buf.chunks_mut(MAX_READ) {
            self.read_one(offset, chunk)
                .map_err(|source| NbdError::Io {
                    addr: self.addr.clone(),
                    source,
                })?;
            offset += chunk.len() as u64;
        }
        Ok(())
    }

    fn read_one(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = u32::try_from(buf.len()).map_err(|_| io::Error::other("read too large"))?;
        if offset
            .checked_add(u64::from(len))
            .is_none_or(|end| end > self.size)
        {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {len} bytes at {offset} is past the export's end ({})",
                    self.size
                ),
            ));
        }
        self.cookie = self.cookie.wrapping_add(1);
        let mut req = [0u8; 28];
        req[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req[6..8].copy_from_slice(&CMD_READ.to_be_bytes());
        req[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        req[16..24].copy_from_slice(&offset.to_be_bytes());
        req[24..28].copy_from_slice(&len.to_be_bytes());
        // Anything but a clean server-reported error leaves the stream out of step.
        self.poisoned = true;
        self.stream.write_all(&req)?;
        let magic = rd_u32(&mut self.stream)?;
        let error = rd_u32(&mut self.stream)?;
        let cookie = rd_u64(&mut self.stream)?;
        if magic != SIMPLE_REPLY_MAGIC || cookie != self.cookie {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "malformed NBD reply (connection no longer usable)",
            ));
        }
        if error != 0 {
            self.poisoned = false;
            return Err(io::Error::from_raw_os_error(
                i32::try_from(error).unwrap_or(libc::EIO),
            ));
        }
        self.stream.read_exact(buf)?;
        self.poisoned = false;
        Ok(())
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        let mut req = [0u8; 28];
        req[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req[6..8].copy_from_slice(&CMD_DISC.to_be_bytes());
        let _ = self.stream.write_all(&req);
    }
}

/// A read timeout for connections, so a dead server fails requests instead of hanging them.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_uris() {
        assert_eq!(
            NbdAddr::parse("nbd://127.0.0.1:10810/img").unwrap(),
            NbdAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 10810,
                export: "img".into()
            }
        );
        assert_eq!(
            NbdAddr::parse("nbd://localhost").unwrap(),
            NbdAddr::Tcp {
                host: "localhost".into(),
                port: 10809,
                export: "".into()
            }
        );
        assert_eq!(
            NbdAddr::parse("nbd+unix:///exp?socket=/run/x.sock").unwrap(),
            NbdAddr::Unix {
                socket: "/run/x.sock".into(),
                export: "exp".into()
            }
        );
        assert!(NbdAddr::parse("nbd+unix:///exp").is_err());
        assert!(NbdAddr::parse("nbd://:80/x").is_err());
        assert!(NbdAddr::parse("http://x").is_err());
        assert!(NbdAddr::parse("nbd://h:notaport/x").is_err());
    }
}
