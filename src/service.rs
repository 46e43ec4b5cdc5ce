//! Daemon conventions of the vhost-user world: `--print-capabilities` JSON (vhost-user spec,
//! "Backend program conventions"), systemd readiness notification (`sd_notify`), a locked pid
//! file, and adopting an inherited listening socket (`--fd N`).

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// --print-capabilities
// ---------------------------------------------------------------------------------------------

/// Block-backend features of QEMU's `docs/interop/vhost-user.json` (`VHostUserBackendBlockFeature`,
/// since QEMU 5.0). Each one promises that a command line option exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFeature {
    /// `--read-only` is supported.
    ReadOnly,
    /// `--blk-file=PATH` is supported.
    BlkFile,
}

impl BlockFeature {
    /// The schema's name.
    pub fn as_str(self) -> &'static str {
        match self {
            BlockFeature::ReadOnly => "read-only",
            BlockFeature::BlkFile => "blk-file",
        }
    }
}

/// Features `vhost-clone` advertises by default. `read-only` only: `serve --read-only` exists.
/// Add [`BlockFeature::BlkFile`] once a top-level `--blk-file=PATH` (meaning `linear PATH 0`) exists.
pub const DEFAULT_FEATURES: &[BlockFeature] = &[BlockFeature::ReadOnly];

/// `--print-capabilities` output for the default features:
/// `{"type":"block","features":["read-only"]}` (`VHostUserBackendCapabilities`, type `block`).
pub fn capabilities_json() -> String {
    capabilities_json_for(DEFAULT_FEATURES)
}

/// `--print-capabilities` output for exactly `features`.
pub fn capabilities_json_for(features: &[BlockFeature]) -> String {
    // Written by hand to keep the spec's key order ("type" first); the names are fixed ASCII.
    let features: Vec<String> = features
        .iter()
        .map(|f| format!("\"{}\"", f.as_str()))
        .collect();
    format!(
        "{{\"type\":\"block\",\"features\":[{}]}}",
        features.join(",")
    )
}

/// The discovery file management tools look for (`VhostUserBackend` in vhost-user.json), to install
/// as e.g. `/usr/share/qemu/vhost-user/50-vhost-clone.json`.
pub fn backend_description_json(binary: &Path) -> String {
    let v = serde_json::json!({
        "description": "vhost-clone: dm-clone compatible vhost-user-blk backend",
        "type": "block",
        "binary": binary.to_string_lossy(),
    });
    serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
}

// ---------------------------------------------------------------------------------------------
// sd_notify
// ---------------------------------------------------------------------------------------------

/// Failures sending a notification. The daemon logs them and carries on.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET '{0}' is neither an absolute path nor an @abstract name")]
    BadSocket(String),
    #[error("cannot create a datagram socket for sd_notify: {0}")]
    Socket(io::Error),
    #[error("cannot send to NOTIFY_SOCKET {socket}: {source}")]
    Send { socket: String, source: io::Error },
    #[error("sd_notify sent {sent} of {len} bytes to {socket}")]
    Short {
        socket: String,
        sent: usize,
        len: usize,
    },
}

/// Tell the service manager we are serving (`READY=1`). `Ok(false)` when not run by one.
pub fn notify_ready() -> Result<bool, NotifyError> {
    notify(&format!("READY=1\nMAINPID={}", std::process::id()))
}

/// Free-form status line shown by `systemctl status` (`STATUS=...`, newlines flattened).
pub fn notify_status(msg: &str) -> Result<bool, NotifyError> {
    notify(&format!("STATUS={}", msg.replace('\n', " ")))
}

/// We are shutting down (`STOPPING=1`).
pub fn notify_stopping() -> Result<bool, NotifyError> {
    notify("STOPPING=1")
}

/// Send `state` to `$NOTIFY_SOCKET`; `Ok(false)` (nothing sent) when the variable is unset or empty.
pub fn notify(state: &str) -> Result<bool, NotifyError> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(s) if !s.is_empty() => {
            notify_to(&s.to_string_lossy(), state)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Send `state` to the notify socket `socket`: an absolute path, or `@name` for the abstract namespace.
pub fn notify_to(socket: &str, state: &str) -> Result<(), NotifyError> {
    let addr = if let Some(name) = socket.strip_prefix('@') {
        SocketAddr::from_abstract_name(name.as_bytes())
    } else if socket.starts_with('/') {
        SocketAddr::from_pathname(socket)
    } else {
        return Err(NotifyError::BadSocket(socket.to_string()));
    }
    .map_err(|_| NotifyError::BadSocket(socket.to_string()))?;
    let sock = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
    let sent = sock
        .send_to_addr(state.as_bytes(), &addr)
        .map_err(|source| NotifyError::Send {
            socket: socket.to_string(),
            source,
        })?;
    if sent != state.len() {
        return Err(NotifyError::Short {
            socket: socket.to_string(),
            sent,
            len: state.len(),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Pid file
// ---------------------------------------------------------------------------------------------

/// Failures creating a pid file.
#[derive(Debug, thiserror::Error)]
pub enum PidFileError {
    #[error("cannot open pid file {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error(
        "pid file {path} is held by running process {pid}; stop it first or use another --pid-file"
    )]
    Held { path: PathBuf, pid: String },
    #[error("cannot lock pid file {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("cannot write pid file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// A pid file holding an exclusive `flock` for the life of the daemon; removed on drop. A file left
/// by a dead process is taken over (its lock died with it).
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    file: File,
}

impl PidFile {
    /// Create (or take over) `path`, lock it and write our pid.
    pub fn create(path: &Path) -> Result<PidFile, PidFileError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)
            .map_err(|source| PidFileError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(PidFileError::Held {
                    path: path.to_path_buf(),
                    pid: if pid.is_empty() {
                        "?".into()
                    } else {
                        pid.into()
                    },
                });
            }
            Err(TryLockError::Error(source)) => {
                return Err(PidFileError::Lock {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
        let write = |f: &mut File| -> io::Result<()> {
            f.set_len(0)?;
            f.seek(SeekFrom::Start(0))?;
            writeln!(f, "{}", std::process::id())?;
            f.sync_all()
        };
        write(&mut file).map_err(|source| PidFileError::Write {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(PidFile {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Remove while still holding the lock, so no one else's fresh file is removed.
        let _ = fs::remove_file(&self.path);
        let _ = self.file.unlock();
    }
}

// ---------------------------------------------------------------------------------------------
// Inherited listening socket
// ---------------------------------------------------------------------------------------------

/// Why an inherited fd cannot be the vhost-user listener.
#[derive(Debug, thiserror::Error)]
pub enum ListenFdError {
    #[error("--fd {0}: not a valid file descriptor number")]
    Negative(RawFd),
    #[error("--fd {fd}: not an open file descriptor ({source}); was it inherited (not CLOEXEC)?")]
    NotOpen { fd: RawFd, source: io::Error },
    #[error("--fd {fd}: is a {kind}, not a socket; pass a bound, listening unix stream socket")]
    NotSocket { fd: RawFd, kind: &'static str },
    #[error("--fd {fd}: {what} failed: {source}")]
    Query {
        fd: RawFd,
        what: &'static str,
        source: io::Error,
    },
    #[error("--fd {fd}: socket family is {family}, not AF_UNIX")]
    NotUnix { fd: RawFd, family: i32 },
    #[error("--fd {fd}: socket type is {ty}, not SOCK_STREAM")]
    NotStream { fd: RawFd, ty: i32 },
    #[error("--fd {fd}: socket is not listening; call listen() on it before passing it")]
    NotListening { fd: RawFd },
}

fn sockopt_int(fd: RawFd, opt: libc::c_int, what: &'static str) -> Result<i32, ListenFdError> {
    let mut val: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: `val` and `len` are valid for writes of the sizes given; the kernel checks `fd`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            std::ptr::addr_of_mut!(val).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(ListenFdError::Query {
            fd,
            what,
            source: io::Error::last_os_error(),
        });
    }
    Ok(val)
}

/// Adopt an inherited fd (`--fd N`, socket activation) as the vhost-user listener after checking it
/// is a listening `AF_UNIX` `SOCK_STREAM` socket; sets `FD_CLOEXEC`. On success the returned listener
/// owns the fd (call this once per fd); on error the fd is left open and untouched except CLOEXEC.
pub fn listener_from_fd(fd: RawFd) -> Result<UnixListener, ListenFdError> {
    if fd < 0 {
        return Err(ListenFdError::Negative(fd));
    }
    // SAFETY: F_GETFD only reads the descriptor flags; an invalid fd yields EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(ListenFdError::NotOpen {
            fd,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is valid for writes; `fd` is open (checked above).
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(ListenFdError::Query {
            fd,
            what: "fstat",
            source: io::Error::last_os_error(),
        });
    }
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFSOCK => None,
        libc::S_IFREG => Some("regular file"),
        libc::S_IFDIR => Some("directory"),
        libc::S_IFIFO => Some("pipe"),
        libc::S_IFCHR => Some("character device"),
        libc::S_IFBLK => Some("block device"),
        _ => Some("non-socket file"),
    };
    if let Some(kind) = kind {
        return Err(ListenFdError::NotSocket { fd, kind });
    }
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len =
        libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_storage>()).unwrap_or(128);
    // SAFETY: `ss` is valid for `len` bytes of writes.
    let rc = unsafe { libc::getsockname(fd, std::ptr::addr_of_mut!(ss).cast(), &mut len) };
    if rc != 0 {
        return Err(ListenFdError::Query {
            fd,
            what: "getsockname",
            source: io::Error::last_os_error(),
        });
    }
    let family = i32::from(ss.ss_family);
    if family != libc::AF_UNIX {
        return Err(ListenFdError::NotUnix { fd, family });
    }
    let ty = sockopt_int(fd, libc::SO_TYPE, "getsockopt(SO_TYPE)")?;
    if ty != libc::SOCK_STREAM {
        return Err(ListenFdError::NotStream { fd, ty });
    }
    if sockopt_int(fd, libc::SO_ACCEPTCONN, "getsockopt(SO_ACCEPTCONN)")? == 0 {
        return Err(ListenFdError::NotListening { fd });
    }
    if flags & libc::FD_CLOEXEC == 0 {
        // SAFETY: F_SETFD on an open fd with valid flags.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } != 0 {
            return Err(ListenFdError::Query {
                fd,
                what: "fcntl(F_SETFD, FD_CLOEXEC)",
                source: io::Error::last_os_error(),
            });
        }
    }
    // SAFETY: `fd` is open and is a listening unix stream socket (checked above); it was inherited
    // for exactly this purpose and, per this function's contract, nothing else in the process owns it.
    Ok(unsafe { UnixListener::from_raw_fd(fd) })
}
