//! A clone whose source is a remote export over NBD: qemu-nbd (and nbdkit with its error
//! filter for a failing source) on a unix socket, read by the daemon's NBD client pool.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::client::Client;
use common::daemon::{CloneFiles, Daemon};
use common::util::status_fields;

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_socket(path: &Path) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "NBD server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn have(program: &str) -> bool {
    let ok = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{program} must be installed in CI"
        );
        eprintln!("skipping: {program} not installed");
    }
    ok
}

/// qemu-nbd exporting `src` read-only on the unix socket `sock` (up to 8 clients).
fn qemu_nbd(src: &Path, sock: &Path) -> Server {
    let _ = std::fs::remove_file(sock);
    let server = Server(
        Command::new("qemu-nbd")
            .args(["--read-only", "--format=raw", "--persistent", "--shared=8"])
            .arg(format!("--socket={}", sock.display()))
            .arg(src)
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-nbd"),
    );
    wait_socket(sock);
    server
}

/// The NBD URI of the default export on a unix socket.
fn nbd_uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

fn wait_hydrated(d: &Daemon) {
    let t0 = Instant::now();
    loop {
        let s = status_fields(&d.ctl_ok(&["status"]));
        if s.hydrated == s.nr_regions {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "stalled at {s:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn clone_of_a_qemu_nbd_export() {
    if !have("qemu-nbd") {
        return;
    }
    let size = 8 << 20;
    let f = CloneFiles::new("clone-nbd", size, 31, 4 << 20);
    let p = |n: &str| f.path(n);
    let mut model = f.data.clone();
    let sock = p("nbd.sock");
    let _server = qemu_nbd(&f.src, &sock);
    let table = f.table_with_source(
        &nbd_uri(&sock),
        "8 1 no_hydration 4 hydration_threshold 8 hydration_batch_size 8",
    );
    let d = Daemon::start(f.dir.path(), &table, &["--num-queues", "2"]);
    let s = status_fields(&d.ctl_ok(&["status"]));
    assert_eq!(
        s.nr_regions,
        (size / 4096) as u64,
        "length taken from the export's size"
    );
    let mut c = Client::connect(&d.socket, 2);
    // Reads of the unhydrated clone come from the NBD export, including unaligned pieces.
    for off in (0..size).step_by(1 << 20) {
        assert!(
            c.read(0, off as u64, 1 << 20).unwrap() == model[off..off + (1 << 20)],
            "at {off}"
        );
    }
    assert!(c.read(1, 4096 * 7 + 512, 1536).unwrap() == model[4096 * 7 + 512..4096 * 7 + 2048]);
    // A partial write hydrates its region from the export first.
    assert_eq!(c.write(0, 4096 * 100 + 512, &[7u8; 1024]), 0);
    model[4096 * 100 + 512..4096 * 100 + 1536].fill(7);
    assert!(c.read(0, 4096 * 100, 4096).unwrap() == model[4096 * 100..4096 * 101]);
    // Background hydration over NBD.
    d.ctl_ok(&["message", "enable_hydration"]);
    wait_hydrated(&d);
    assert_eq!(c.flush(0), 0);
    drop(c);
    assert!(d.stop().success());
    assert!(
        std::fs::read(p("dest")).unwrap() == model,
        "destination = export + writes"
    );
}

#[test]
fn failing_nbd_source_stops_hydration() {
    if !have("nbdkit") {
        return;
    }
    let size = 4 << 20;
    let f = CloneFiles::new("clone-nbd-err", size, 32, 4 << 20);
    let p = |n: &str| f.path(n);
    let model = f.data.clone();
    let sock = p("nbd.sock");
    let trigger = p("errors-on");
    let _server = Server(
        Command::new("nbdkit")
            .args(["--foreground", "--readonly", "--filter=error"])
            .arg(format!("--unix={}", sock.display()))
            .arg("file")
            .arg(p("src"))
            .args(["error-pread-rate=100%", "error-pread=EIO"])
            .arg(format!("error-file={}", trigger.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("nbdkit"),
    );
    wait_socket(&sock);
    let table = f.table_with_source(&nbd_uri(&sock), "8 1 no_hydration");
    let d = Daemon::start(f.dir.path(), &table, &[]);
    let mut c = Client::connect(&d.socket, 1);
    assert!(c.read(0, 0, 4096).unwrap() == model[..4096]);
    // The server starts failing every read.
    std::fs::write(&trigger, b"").unwrap();
    assert!(
        c.read(0, 8192, 4096).is_err(),
        "a failing source read reaches the guest as an error"
    );
    d.ctl_ok(&["message", "enable_hydration"]);
    let t0 = Instant::now();
    loop {
        let j: serde_json::Value = serde_json::from_str(&d.ctl_ok(&["status", "--json"])).unwrap();
        if j["state"] == "stopped" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "hydration never stopped: {j}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The server recovers; enable_hydration starts again and finishes.
    std::fs::remove_file(&trigger).unwrap();
    d.ctl_ok(&["message", "enable_hydration"]);
    wait_hydrated(&d);
    assert!(c.read(0, 8192, 4096).unwrap() == model[8192..12288]);
    drop(c);
    assert!(d.stop().success());
    assert!(
        std::fs::read(p("dest")).unwrap() == model,
        "destination = export"
    );
}

#[test]
fn nbd_server_restart_is_survived() {
    if !have("qemu-nbd") {
        return;
    }
    let size = 4 << 20;
    let f = CloneFiles::new("clone-nbd-restart", size, 33, 4 << 20);
    let p = |n: &str| f.path(n);
    let model = f.data.clone();
    let sock = p("nbd.sock");
    let start = || qemu_nbd(&f.src, &sock);
    let server = start();
    let table = f.table_with_source(&nbd_uri(&sock), "8 1 no_hydration");
    let d = Daemon::start(f.dir.path(), &table, &[]);
    let mut c = Client::connect(&d.socket, 1);
    assert!(c.read(0, 0, 65536).unwrap() == model[..65536]);
    // The server goes away: reads of the source fail cleanly...
    drop(server);
    assert!(
        c.read(0, 65536, 4096).is_err(),
        "a read from a dead source must fail"
    );
    // ... and work again once it is back (each connection reconnects on its next read).
    let _server = start();
    for i in 0..8u64 {
        let off = (i * 131_072) as usize;
        assert!(
            c.read(0, off as u64, 4096).unwrap() == model[off..off + 4096],
            "read {i} after the server came back"
        );
    }
    drop(c);
    assert!(d.stop().success());
}
