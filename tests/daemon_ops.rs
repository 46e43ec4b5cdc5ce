//! Daemon conventions of the vhost-user world, on the real binary: --print-capabilities,
//! --fd (a socket passed by the test), --pid-file, --metrics scraped and parsed, and
//! readiness notification over NOTIFY_SOCKET.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::client::Client;
use common::daemon::{bin, random_file, scratch, zero_file};

#[test]
fn print_capabilities_is_json() {
    let out = Command::new(bin())
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(v["type"], "block");
    assert!(v["features"].is_array());
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn scrape(path: &std::path::Path) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

#[test]
fn inherited_fd_pid_file_metrics_and_readiness() {
    let dir = scratch("ops");
    let p = |n: &str| dir.path().join(n);
    let size = 4 << 20;
    random_file(&p("src"), size, 8);
    zero_file(&p("dest"), size as u64);
    zero_file(&p("meta"), 4 << 20);
    // The listening socket is made by the test and inherited by the daemon.
    let listener = UnixListener::bind(p("vhost.sock")).unwrap();
    let fd = listener.as_raw_fd();
    // SAFETY: clearing FD_CLOEXEC on a descriptor this test owns, so the child inherits it.
    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    let notify = UnixDatagram::bind(p("notify.sock")).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let table = format!(
        "clone {} {} {} 8 1 no_hydration",
        p("meta").display(),
        p("dest").display(),
        p("src").display()
    );
    let mut child = Command::new(bin())
        .args([
            "serve",
            "--fd",
            &fd.to_string(),
            "--table",
            &table,
            "--num-queues",
            "2",
        ])
        .arg("--control")
        .arg(p("ctl.sock"))
        .arg("--pid-file")
        .arg(p("daemon.pid"))
        .arg("--metrics")
        .arg(format!("unix:{}", p("metrics.sock").display()))
        .env("NOTIFY_SOCKET", p("notify.sock"))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    drop(listener);
    // systemd readiness.
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 from the daemon");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    wait_for("pid file", || p("daemon.pid").exists());
    let pid: u32 = std::fs::read_to_string(p("daemon.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, child.id());
    // A second daemon with the same pid file is refused.
    let second = Command::new(bin())
        .args(["serve", "--socket"])
        .arg(p("other.sock"))
        .args([
            "--table",
            &format!("linear {} 0", p("src").display()),
            "--read-only",
        ])
        .arg("--pid-file")
        .arg(p("daemon.pid"))
        .output()
        .unwrap();
    assert!(!second.status.success(), "a held pid file must be refused");

    // I/O through the inherited socket, then scrape.
    let mut c = Client::connect(&p("vhost.sock"), 2);
    for i in 0..10u64 {
        assert_eq!(c.write(1, i * 4096, &[i as u8; 4096]), 0);
        assert_eq!(c.read(0, i * 4096, 4096).unwrap(), vec![i as u8; 4096]);
    }
    assert_eq!(c.flush(0), 0);
    let text = scrape(&p("metrics.sock"));
    // Every sample line parses as `series value`.
    for l in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (_, v) = l.rsplit_once(' ').expect("series value");
        assert!(v.parse::<f64>().is_ok(), "bad sample line: {l}");
    }
    let hydrated = text
        .lines()
        .find(|l| l.starts_with("vhost_clone_hydrated_regions"))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse::<f64>().ok());
    assert_eq!(hydrated, Some(10.0), "metrics:\n{text}");
    let total_req: f64 = text
        .lines()
        .filter(|l| l.starts_with("vhost_clone_requests_total{"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum();
    assert!(total_req >= 21.0, "requests counted: {total_req}\n{text}");
    drop(c);
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(!p("daemon.pid").exists(), "pid file removed at exit");
}

#[test]
fn fd_that_is_not_a_listening_socket_is_refused() {
    let dir = scratch("ops-badfd");
    let f = std::fs::File::create(dir.path().join("plain")).unwrap();
    let fd = f.as_raw_fd();
    // SAFETY: clearing FD_CLOEXEC on our own descriptor.
    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    random_file(&dir.path().join("img"), 1 << 20, 1);
    let out = Command::new(bin())
        .args(["serve", "--fd", &fd.to_string(), "--table"])
        .arg(format!("linear {} 0", dir.path().join("img").display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--fd"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
