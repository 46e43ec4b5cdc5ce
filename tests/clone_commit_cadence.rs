//! How often a live clone commits its metadata: background hydration alone waits the long
//! background interval (a destination flush in the middle of a copy stream stalls the disk),
//! while a guest write is committed within dm-clone's one second, even when the commit
//! thread was sleeping out the long interval.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::client::Client;
use common::daemon::{scratch, zero_file, Daemon};
use common::util::counts;

const SIZE: u64 = 1 << 30;
const REGION: u64 = 4096;

/// `vhost_clone_metadata_commits_total` scraped from the daemon's metrics socket.
fn commits(metrics: &Path) -> u64 {
    let mut s = UnixStream::connect(metrics).expect("connect to the metrics socket");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .expect("send the scrape");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read the scrape");
    body.lines()
        .find_map(|l| l.strip_prefix("vhost_clone_metadata_commits_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no commit counter in the scrape:\n{body}"))
}

#[test]
fn background_progress_waits_the_long_interval_and_a_guest_write_commits_within_a_second() {
    let dir = scratch("commit-cadence");
    let (src, dest, meta) = (
        dir.path().join("src"),
        dir.path().join("dest"),
        dir.path().join("meta"),
    );
    // A sparse 1 GiB source copied one 4 KiB region at a time (dm-clone's default
    // threshold and batch of one region): hydration runs far longer than this test looks.
    zero_file(&src, SIZE);
    zero_file(&dest, SIZE);
    zero_file(&meta, 4 << 20);
    let metrics = dir.path().join("metrics.sock");
    let table = format!(
        "clone {} {} {} 8 1 no_hydration",
        meta.display(),
        dest.display(),
        src.display()
    );
    let metrics_arg = format!("unix:{}", metrics.display());
    let d = Daemon::start(dir.path(), &table, &["--metrics", &metrics_arg]);
    let t0 = Instant::now();
    while !metrics.exists() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no metrics socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = commits(&metrics);

    d.ctl_ok(&["message", "enable_hydration"]);
    std::thread::sleep(Duration::from_millis(2500));
    let (hydrated, nr, _) = counts(&d.ctl_ok(&["status"]));
    assert!(hydrated > 0, "background hydration made no progress");
    assert!(
        hydrated < nr,
        "hydration finished within the window: the test needs a slower copy"
    );
    assert_eq!(
        commits(&metrics),
        before,
        "background progress alone was committed within 2.5 s ({hydrated} regions hydrated)"
    );

    // A full-region write near the end, where the copy has not reached yet, and no flush.
    let mut c = Client::connect(&d.socket, 1);
    let written = Instant::now();
    assert_eq!(c.write(0, SIZE - REGION, &[0x5a; REGION as usize]), 0);
    while commits(&metrics) == before {
        assert!(
            written.elapsed() < Duration::from_secs(4),
            "a guest write was not committed within 4 s (dm-clone commits every second)"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let waited = written.elapsed();
    eprintln!("MEASURED guest write committed after {waited:?}");
    drop(c);
    assert!(d.stop().success());
}
