//! Test-bed helper: boot the tiny QEMU/TCG guest built by `ci/build-guest.sh` and run one shell script in it.
//!
//! std only. Use from an integration test with `mod common;` (where `common/mod.rs` has `pub mod guest;`) or
//! directly with `#[path = "common/guest.rs"] mod guest;`.
//!
//! The guest names its disks: a plain disk attached with serial `NAME` is `$DISK_NAME` and
//! `/dev/disk/by-serial/NAME`; the i-th vhost-user-blk socket is `$DISK_vhost<i>` and `/dev/disk/vhost<i>`.
//! The script runs under busybox `sh`; lines it prints as `RESULT key=value` are collected by
//! [`GuestOutput::results`]. [`GuestOutput::status`] is the script's exit status (124: timeout, 125: the
//! guest died before the script finished).
#![allow(dead_code)]

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Default time after which `ci/run-guest.sh` kills QEMU.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// One guest at a time per test binary: TCG is CPU-bound and the CI machine has 2 cores.
static GUEST_LOCK: Mutex<()> = Mutex::new(());

/// The repository root (where `ci/` lives).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Directory with `vmlinuz` and `initramfs.cpio.gz`: `$CARGO_TARGET_DIR/guest`, else `<repo>/target/guest`.
pub fn guest_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir.join("guest")
            } else {
                repo_root().join(dir).join("guest")
            }
        }
        _ => repo_root().join("target").join("guest"),
    }
}

/// Whether `program` is an executable file in `$PATH`.
pub fn in_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            let candidate = dir.join(program);
            fs::metadata(&candidate).is_ok_and(|m| m.is_file())
        })
    })
}

/// Guest artifacts built and `qemu-system-x86_64` installed.
pub fn guest_available() -> bool {
    let dir = guest_dir();
    dir.join("vmlinuz").is_file()
        && dir.join("initramfs.cpio.gz").is_file()
        && repo_root().join("ci").join("run-guest.sh").is_file()
        && in_path("qemu-system-x86_64")
}

/// Whether the `CI` environment variable asks for strictness (set, non-empty, not `0`/`false`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// Call first in a test that needs the guest: `if !guest::require_guest("name") { return; }`.
/// Returns `true` when the guest is available; otherwise panics under `CI`, or prints a notice and returns
/// `false` (the test then skips).
pub fn require_guest(test: &str) -> bool {
    if guest_available() {
        return true;
    }
    let hint = format!(
        "guest test bed not available (need {}/{{vmlinuz,initramfs.cpio.gz}} and qemu-system-x86_64): \
         run ci/install-deps.sh && ci/build-guest.sh",
        guest_dir().display()
    );
    if in_ci() {
        panic!("{test}: {hint}");
    }
    eprintln!("SKIPPED {test}: {hint}");
    false
}

/// A plain raw disk for the guest.
#[derive(Clone, Debug)]
pub struct GuestDisk {
    pub path: PathBuf,
    pub serial: String,
    pub read_only: bool,
    /// QEMU `cache=` mode (`writeback` unless set; `none` needs O_DIRECT support on the file system).
    pub cache: Option<String>,
}

/// A vhost-user-blk socket for the guest.
#[derive(Clone, Debug)]
pub struct VhostUserDisk {
    pub socket: PathBuf,
    pub num_queues: u32,
}

/// One guest boot: disks, vhost-user-blk sockets, the script to run, a timeout.
#[derive(Clone, Debug)]
pub struct GuestRun {
    pub disks: Vec<GuestDisk>,
    pub vhost_user_sockets: Vec<VhostUserDisk>,
    pub script: String,
    pub timeout: Duration,
    /// Extra arguments for `ci/run-guest.sh` (e.g. `--mem`, `--smp`, `--append`).
    pub extra_args: Vec<String>,
}

impl GuestRun {
    /// A run of `script` (busybox sh source) with no disks and the default timeout.
    pub fn new(script: impl Into<String>) -> Self {
        GuestRun {
            disks: Vec::new(),
            vhost_user_sockets: Vec::new(),
            script: script.into(),
            timeout: DEFAULT_TIMEOUT,
            extra_args: Vec::new(),
        }
    }

    /// Attach a writable raw disk; in the guest `$DISK_<serial>`.
    pub fn disk(mut self, path: impl AsRef<Path>, serial: &str) -> Self {
        self.disks.push(GuestDisk {
            path: path.as_ref().to_path_buf(),
            serial: serial.to_string(),
            read_only: false,
            cache: None,
        });
        self
    }

    /// Attach a read-only raw disk; in the guest `$DISK_<serial>`.
    pub fn disk_ro(mut self, path: impl AsRef<Path>, serial: &str) -> Self {
        self.disks.push(GuestDisk {
            path: path.as_ref().to_path_buf(),
            serial: serial.to_string(),
            read_only: true,
            cache: None,
        });
        self
    }

    /// Attach a fully specified raw disk.
    pub fn guest_disk(mut self, disk: GuestDisk) -> Self {
        self.disks.push(disk);
        self
    }

    /// Attach a vhost-user-blk socket with 2 queues; the i-th is `$DISK_vhost<i>` in the guest.
    pub fn vhost_user(self, socket: impl AsRef<Path>) -> Self {
        self.vhost_user_queues(socket, 2)
    }

    /// Attach a vhost-user-blk socket with `num_queues` queues (the backend must offer at least that many).
    pub fn vhost_user_queues(mut self, socket: impl AsRef<Path>, num_queues: u32) -> Self {
        self.vhost_user_sockets.push(VhostUserDisk {
            socket: socket.as_ref().to_path_buf(),
            num_queues,
        });
        self
    }

    /// The three devices of a clone as plain disks: `$DISK_meta`, `$DISK_dest`, and the
    /// source read-only as `$DISK_src`.
    pub fn clone_devices(self, meta: &Path, dest: &Path, src: &Path) -> Self {
        self.disk(meta, "meta")
            .disk(dest, "dest")
            .disk_ro(src, "src")
    }

    /// Run, print the log, and require a clean exit of the script.
    pub fn run_ok(&self) -> GuestOutput {
        let out = self.run().expect("run-guest");
        eprintln!("{}", out.log);
        out.assert_success();
        out
    }

    /// Kill QEMU after `timeout` (whole seconds, at least 1).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Pass an extra argument to `ci/run-guest.sh`.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// The `ci/run-guest.sh` arguments for this run, with the script at `script_path`.
    pub fn args(&self, script_path: &Path) -> Vec<String> {
        let mut args = vec![
            "--guest-dir".to_string(),
            guest_dir().display().to_string(),
            "--timeout".to_string(),
            self.timeout.as_secs().max(1).to_string(),
            "--script".to_string(),
            script_path.display().to_string(),
        ];
        for d in &self.disks {
            let mut spec = format!("{},serial={}", d.path.display(), d.serial);
            if d.read_only {
                spec.push_str(",ro");
            }
            if let Some(cache) = &d.cache {
                spec.push_str(",cache=");
                spec.push_str(cache);
            }
            args.push("--disk".to_string());
            args.push(spec);
        }
        for v in &self.vhost_user_sockets {
            args.push("--vhost-user".to_string());
            args.push(format!(
                "{},num-queues={}",
                v.socket.display(),
                v.num_queues
            ));
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    /// Boot the guest, run the script, wait for poweroff (or the timeout). `Err` only when the run could
    /// not be started; a failing script is `Ok` with a non-zero `status`.
    pub fn run(&self) -> io::Result<GuestOutput> {
        let dir = TestDir::new("guest-run")?;
        let script_path = dir.path().join("script.sh");
        fs::write(&script_path, &self.script)?;
        let _one_at_a_time = GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let out = Command::new("bash")
            .arg(repo_root().join("ci").join("run-guest.sh"))
            .args(self.args(&script_path))
            .stdin(Stdio::null())
            .output()?;
        let mut log = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !stderr.is_empty() {
            if !log.ends_with('\n') {
                log.push('\n');
            }
            log.push_str(&stderr);
        }
        Ok(GuestOutput {
            status: out.status.code().unwrap_or(-1),
            log,
        })
    }
}

/// What a guest run printed and how its script ended.
#[derive(Clone, Debug)]
pub struct GuestOutput {
    /// The script's exit status; 124 timeout, 125 no `GUEST_EXIT` line (guest crashed), 2 bad arguments.
    pub status: i32,
    /// The guest console (CR-stripped) followed by `ci/run-guest.sh`'s own stderr.
    pub log: String,
}

impl GuestOutput {
    /// All `RESULT key=value` lines, in order (value: the rest of the line after the first `=`).
    pub fn results(&self) -> Vec<(String, String)> {
        self.log
            .lines()
            .filter_map(|line| line.trim_end().strip_prefix("RESULT "))
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.to_string()))
            .collect()
    }

    /// The last `RESULT key=...` value for `key`.
    pub fn result(&self, key: &str) -> Option<String> {
        self.results()
            .into_iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// Panic with the log unless the script exited 0.
    pub fn assert_success(&self) -> &Self {
        assert_eq!(
            self.status, 0,
            "guest script failed (status {}); log:\n{}",
            self.status, self.log
        );
        self
    }

    /// Host wall time of the boot as reported by `ci/run-guest.sh` (`wall=SECONDS`), if present.
    pub fn wall_secs(&self) -> Option<f64> {
        self.log
            .lines()
            .filter(|l| l.starts_with("RUN_GUEST "))
            .flat_map(|l| l.split_whitespace())
            .find_map(|w| w.strip_prefix("wall=")?.strip_suffix('s')?.parse().ok())
    }
}

/// A temporary directory removed on drop (std only).
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// A fresh directory under `$TMPDIR` (or `/tmp`), named after `label`.
    pub fn new(label: &str) -> io::Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "vhost-clone-{label}-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path)?;
        Ok(TestDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Create `path` as `size` zero bytes, fully written (not sparse) and synced.
pub fn write_zero_file(path: &Path, size: u64) -> io::Result<()> {
    write_file_with(path, size, |_| 0)
}

/// Create `path` as `size` pseudo-random bytes (xorshift64* from `seed`), synced.
pub fn write_random_file(path: &Path, size: u64, seed: u64) -> io::Result<()> {
    let mut state = seed | 1;
    write_file_with(path, size, move |_| {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

fn write_file_with(path: &Path, size: u64, mut word: impl FnMut(u64) -> u64) -> io::Result<()> {
    use std::io::Write;
    let mut file = fs::File::create(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    let mut n = 0u64;
    while written < size {
        for chunk in buf.chunks_exact_mut(8) {
            chunk.copy_from_slice(&word(n).to_le_bytes());
            n += 1;
        }
        let len = usize::try_from((size - written).min(buf.len() as u64)).unwrap_or(buf.len());
        file.write_all(&buf[..len])?;
        written += len as u64;
    }
    file.sync_all()
}

/// sha256 of a file, hex, via coreutils `sha256sum` (the guest uses busybox `sha256sum`).
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "sha256sum {} failed",
            path.display()
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| io::Error::other("sha256sum printed nothing"))
}

/// Read `len` bytes of `path` at byte `offset`.
pub fn read_at(path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    use std::io::{Seek, SeekFrom};
    let mut file = fs::File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; len];
    file.read_exact(&mut buf)?;
    Ok(buf)
}
