//! Start the real `vhost-clone` binary for a test and stop it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vhost-clone")
}

/// A scratch directory on a real filesystem (under target/), removed on drop.
pub fn scratch(name: &str) -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-scratch");
    std::fs::create_dir_all(&base).expect("scratch base");
    tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir_in(base)
        .expect("scratch dir")
}

pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub control: PathBuf,
}

impl Daemon {
    /// `vhost-clone serve --socket DIR/vhost.sock --control DIR/ctl.sock --table TABLE ARGS...`,
    /// waiting until both sockets exist.
    pub fn start(dir: &Path, table: &str, extra: &[&str]) -> Daemon {
        let socket = dir.join("vhost.sock");
        let control = dir.join("ctl.sock");
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&control);
        let child = Command::new(bin())
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--control")
            .arg(&control)
            .arg("--table")
            .arg(table)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn vhost-clone");
        let mut d = Daemon {
            child,
            socket,
            control,
        };
        let t0 = Instant::now();
        while !(d.socket.exists() && d.control.exists()) {
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("vhost-clone exited early: {status}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// Run `vhost-clone <args> --control CTRL`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        let (cmd, rest) = args.split_first().expect("a command");
        Command::new(bin())
            .arg(cmd)
            .arg("--control")
            .arg(&self.control)
            .args(rest)
            .output()
            .expect("run vhost-clone client")
    }

    /// stdout of a successful control command.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "vhost-clone {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("wait");
        std::mem::forget(self);
        status
    }

    /// SIGKILL and wait (a crash).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::forget(self);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Write `len` bytes of deterministic pseudo-random data to `path`.
pub fn random_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut data = vec![0u8; len];
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    std::fs::write(path, &data).expect("write image");
    data
}

pub fn zero_file(path: &Path, len: u64) {
    let f = std::fs::File::create(path).expect("create");
    f.set_len(len).expect("set_len");
}

/// The three files of a clone in a scratch directory: a random source (`data` holds its
/// bytes), a zeroed destination of the same size, and a zeroed metadata device.
pub struct CloneFiles {
    pub dir: tempfile::TempDir,
    pub src: PathBuf,
    pub dest: PathBuf,
    pub meta: PathBuf,
    pub data: Vec<u8>,
}

impl CloneFiles {
    pub fn new(name: &str, size: usize, seed: u64, meta_bytes: u64) -> Self {
        let dir = scratch(name);
        let (src, dest, meta) = (
            dir.path().join("src"),
            dir.path().join("dest"),
            dir.path().join("meta"),
        );
        let data = random_file(&src, size, seed);
        zero_file(&dest, size as u64);
        zero_file(&meta, meta_bytes);
        CloneFiles {
            dir,
            src,
            dest,
            meta,
            data,
        }
    }

    /// A file in the scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `clone META DEST SRC ARGS` (ARGS: region size, features, core args).
    pub fn table(&self, args: &str) -> String {
        self.table_with_source(&self.src.display().to_string(), args)
    }

    /// The same with another source (an NBD URI, say).
    pub fn table_with_source(&self, source: &str, args: &str) -> String {
        format!(
            "clone {} {} {source} {args}",
            self.meta.display(),
            self.dest.display()
        )
    }
}
