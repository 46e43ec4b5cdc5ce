//! Serving the control socket.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// What the daemon answers on its control socket.
pub trait ControlHandler: Send + Sync + 'static {
    /// Run one command; `Ok` carries the payload (without a trailing newline).
    fn command(&self, words: &[&str]) -> Result<String, String>;
    /// A new event stream (one JSON object per item), if this daemon has events.
    fn subscribe(&self) -> Option<Receiver<String>>;
}

/// Failures setting up the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlServerError {
    #[error("cannot bind control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set mode 0600 on control socket {path}: {source}")]
    Chmod {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the control thread: {0}")]
    Thread(std::io::Error),
}

/// A listening control socket; the file is removed when this is dropped.
pub struct ControlServer {
    path: PathBuf,
}

impl ControlServer {
    /// Bind `path` (mode 0600; a stale socket file is replaced) and serve it from a
    /// background thread.
    pub fn start(
        path: &Path,
        handler: Arc<dyn ControlHandler>,
    ) -> Result<Self, ControlServerError> {
        if let Ok(meta) = fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                let _ = fs::remove_file(path);
            }
        }
        let listener = UnixListener::bind(path).map_err(|source| ControlServerError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|source| {
            ControlServerError::Chmod {
                path: path.to_path_buf(),
                source,
            }
        })?;
        thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(stream) => {
                            let handler = handler.clone();
                            let spawned = thread::Builder::new()
                                .name("control-conn".into())
                                .spawn(move || serve_connection(stream, handler.as_ref()));
                            if let Err(e) = spawned {
                                log::warn!("control: cannot start a connection thread: {e}");
                            }
                        }
                        Err(e) => {
                            log::warn!("control: accept failed: {e}");
                            thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            })
            .map_err(ControlServerError::Thread)?;
        Ok(ControlServer {
            path: path.to_path_buf(),
        })
    }

    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn serve_connection(stream: UnixStream, handler: &dyn ControlHandler) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut line = String::new();
    let read = match stream.try_clone() {
        Ok(s) => BufReader::new(s).take(MAX_REQUEST).read_line(&mut line),
        Err(e) => Err(e),
    };
    let mut out = stream;
    if let Err(e) = read {
        let _ = writeln!(out, "error cannot read request: {e}");
        return;
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    if words.first() == Some(&"events") {
        let Some(rx) = handler.subscribe() else {
            let _ = writeln!(out, "error this daemon has no events");
            return;
        };
        if writeln!(out, "ok").and_then(|_| out.flush()).is_err() {
            return;
        }
        for event in rx {
            if writeln!(out, "{event}").and_then(|_| out.flush()).is_err() {
                break;
            }
        }
        return;
    }
    let reply = match handler.command(&words) {
        Ok(payload) if payload.is_empty() => "ok\n".to_string(),
        Ok(payload) => format!("ok\n{payload}\n"),
        Err(reason) => format!("error {}\n", reason.replace('\n', " ")),
    };
    let _ = out.write_all(reply.as_bytes());
}
