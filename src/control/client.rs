//! Talking to a daemon's control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Failures of a control request.
#[derive(Debug, thiserror::Error)]
pub enum ControlClientError {
    #[error(
        "cannot connect to control socket {path}: {source} (is the daemon running with --control?)"
    )]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("daemon refused: {0}")]
    Refused(String),
    #[error("daemon sent a malformed reply: {0:?}")]
    Malformed(String),
}

fn send(path: &Path, words: &[String]) -> Result<BufReader<UnixStream>, ControlClientError> {
    let mut stream = UnixStream::connect(path).map_err(|source| ControlClientError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    stream.write_all(format!("{}\n", words.join(" ")).as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    let first = first.trim_end();
    if first == "ok" {
        Ok(reader)
    } else if let Some(reason) = first.strip_prefix("error ") {
        Err(ControlClientError::Refused(reason.to_string()))
    } else {
        Err(ControlClientError::Malformed(first.to_string()))
    }
}

/// Send one command and return its payload.
pub fn request(path: &Path, words: &[String]) -> Result<String, ControlClientError> {
    let mut reader = send(path, words)?;
    let mut payload = String::new();
    std::io::Read::read_to_string(&mut reader, &mut payload)?;
    Ok(payload.trim_end_matches('\n').to_string())
}

/// Send a streaming command (`events`) and call `each` for every line until the
/// daemon hangs up or `each` returns false.
pub fn stream(
    path: &Path,
    words: &[String],
    mut each: impl FnMut(&str) -> bool,
) -> Result<(), ControlClientError> {
    let reader = send(path, words)?;
    for line in reader.lines() {
        if !each(&line?) {
            break;
        }
    }
    Ok(())
}
