//! The hydration thread's copy buffers (threshold x region size, 8 MiB here) are given back
//! once it has nothing left to copy: the daemon's resident memory falls within a few seconds
//! of background hydration being disabled (after a second without copies).

mod common;

use std::time::{Duration, Instant};

use common::daemon::{CloneFiles, Daemon};
use common::util::counts;

const SIZE: usize = 256 << 20;

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn copy_buffers_are_released_when_hydration_is_disabled() {
    let files = CloneFiles::new("copy-buffers", SIZE, 11, 4 << 20);
    let table =
        files.table("8 1 no_hydration 4 hydration_threshold 2048 hydration_batch_size 1024");
    let d = Daemon::start(files.dir.path(), &table, &[]);
    let pid = d.child.id();
    let before = vm_rss_kib(pid);
    d.ctl_ok(&["message", "enable_hydration"]);
    // Wait for several 4 MiB copies (every buffer in use at least once).
    let t0 = Instant::now();
    loop {
        let (hydrated, nr, _) = counts(&d.ctl_ok(&["status"]));
        assert!(
            hydrated < nr,
            "hydrated everything before the test could look"
        );
        if hydrated >= 8 * 1024 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no hydration progress"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let hydrating = vm_rss_kib(pid);
    d.ctl_ok(&["message", "disable_hydration"]);
    let t0 = Instant::now();
    let mut after = vm_rss_kib(pid);
    while after + 4096 > hydrating && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
        after = vm_rss_kib(pid);
    }
    eprintln!("MEASURED VmRSS KiB: {before} idle, {hydrating} hydrating, {after} after disable");
    assert!(
        hydrating >= before + 4096,
        "hydrating with 8 MiB in flight should hold buffers: {before} -> {hydrating} KiB"
    );
    assert!(
        after + 4096 <= hydrating,
        "copy buffers were not released: {hydrating} KiB hydrating, {after} KiB after disable"
    );
    assert!(d.stop().success());
}
