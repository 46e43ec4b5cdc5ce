//! Live table swaps with a libblkio client doing verified I/O all the time: by hand
//! (load, suspend, resume) and by itself when the clone is complete (`--on-hydrated
//! linear`); `table --dmsetup` parses back with our table parser.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::client::Client;
use common::daemon::{random_file, scratch, zero_file, Daemon};
use vhost_clone::table::{Table, TargetSpec};

const SIZE: usize = 8 << 20;
const BLOCK: usize = 4096;

/// Writes and read-backs of random 4 KiB blocks, checked against a model, until `stop`.
fn verified_io(
    mut c: Client,
    mut model: Vec<u8>,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        while !stop.load(Ordering::SeqCst) {
            let b = (next() % (SIZE / BLOCK) as u64) as usize;
            let off = b * BLOCK;
            if next() % 2 == 0 {
                let fill = next() as u8;
                let data = vec![fill; BLOCK];
                assert_eq!(c.write(0, off as u64, &data), 0, "write at {off}");
                model[off..off + BLOCK].copy_from_slice(&data);
            } else {
                let got = c.read(0, off as u64, BLOCK).expect("read");
                assert!(got == model[off..off + BLOCK], "data changed at {off}");
            }
            ops.fetch_add(1, Ordering::SeqCst);
        }
        // Whole disk at the end.
        for off in (0..SIZE).step_by(1 << 20) {
            let got = c.read(0, off as u64, 1 << 20).expect("final read");
            assert!(got == model[off..off + (1 << 20)], "final check at {off}");
        }
    })
}

fn wait_ops(ops: &AtomicU64, more: u64) {
    let start = ops.load(Ordering::SeqCst);
    let t0 = Instant::now();
    while ops.load(Ordering::SeqCst) < start + more {
        assert!(t0.elapsed() < Duration::from_secs(60), "client I/O stalled");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn open_fds(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|p| p.display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn swaps_under_verified_io() {
    let dir = scratch("swap");
    let p = |n: &str| dir.path().join(n);
    let src = random_file(&p("src"), SIZE, 5);
    zero_file(&p("dest"), SIZE as u64);
    zero_file(&p("meta"), 4 << 20);
    let (meta, dest, srcp) = (
        p("meta").display().to_string(),
        p("dest").display().to_string(),
        p("src").display().to_string(),
    );
    let table = format!("clone {meta} {dest} {srcp} 8 1 no_hydration 4 hydration_threshold 8 hydration_batch_size 8");
    let d = Daemon::start(
        dir.path(),
        &table,
        &["--on-hydrated", "linear", "--num-queues", "1"],
    );
    let len = SIZE / 512;

    // The dmsetup hand-over line parses back and names the same devices.
    let line = d.ctl_ok(&["table", "--dmsetup"]);
    assert_eq!(
        line,
        format!("0 {len} clone {meta} {dest} {srcp} 8 1 no_hydration 4 hydration_threshold 8 hydration_batch_size 8")
    );
    let parsed = Table::parse(&line).expect("dmsetup line parses");
    assert_eq!(parsed.len, Some(len as u64));
    assert!(matches!(parsed.target, TargetSpec::Clone(_)));

    let events = std::process::Command::new(common::daemon::bin())
        .args(["events", "--control"])
        .arg(&d.control)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let c = Client::connect(&d.socket, 1);
    let io = verified_io(c, src.clone(), stop.clone(), ops.clone());
    wait_ops(&ops, 200);

    // Hydrate while the client runs; the daemon switches to linear by itself.
    d.ctl_ok(&["message", "enable_hydration"]);
    let t0 = Instant::now();
    loop {
        let t = d.ctl_ok(&["table"]);
        if t.contains(" linear ") {
            assert_eq!(t, format!("0 {len} linear {dest} 0"));
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no automatic switch to linear"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_ops(&ops, 200);
    assert_eq!(
        d.ctl_ok(&["table", "--dmsetup"]),
        format!("0 {len} linear {dest} 0")
    );
    // The metadata device is no longer open once every queue moved to the new table.
    let t0 = Instant::now();
    while open_fds(d.child.id()).iter().any(|f| f == &meta) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "metadata still open after the switch"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // By hand: load, suspend (client requests wait), resume.
    // (While a clone is live, a second clone on its metadata device is refused; checked in
    // `second_clone_on_live_metadata_is_refused`.)
    d.ctl_ok(&["load", "--table", &format!("linear {dest} 0")]);
    assert_eq!(
        d.ctl_ok(&["table", "--loaded"]),
        format!("0 {len} linear {dest} 0")
    );
    d.ctl_ok(&["suspend"]);
    let before = ops.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    let during = ops.load(Ordering::SeqCst);
    assert!(
        during <= before + 1,
        "requests completed while suspended ({before} -> {during})"
    );
    d.ctl_ok(&["resume"]);
    wait_ops(&ops, 200);
    // Resume without suspend is refused; a table of another size is refused.
    assert!(!d.ctl(&["resume"]).status.success());
    zero_file(&p("other"), (SIZE * 2) as u64);
    assert!(!d
        .ctl(&[
            "load",
            "--table",
            &format!("linear {} 0", p("other").display())
        ])
        .status
        .success());

    stop.store(true, Ordering::SeqCst);
    io.join().expect("client saw no error and no data change");
    assert!(d.stop().success());
    let out = events.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"hydration_complete\""), "events: {text}");
    assert!(text.contains("\"table_swapped\""), "events: {text}");
    for l in text.lines() {
        serde_json::from_str::<serde_json::Value>(l).expect("one JSON object per line");
    }
}

#[test]
fn second_clone_on_live_metadata_is_refused() {
    let dir = scratch("swap-same-meta");
    let p = |n: &str| dir.path().join(n);
    random_file(&p("src"), 1 << 20, 2);
    zero_file(&p("dest"), 1 << 20);
    zero_file(&p("meta"), 4 << 20);
    let table = format!(
        "clone {} {} {} 8 1 no_hydration",
        p("meta").display(),
        p("dest").display(),
        p("src").display()
    );
    let d = Daemon::start(dir.path(), &table, &[]);
    let out = d.ctl(&[
        "load",
        "--table",
        &format!("{table} 2 hydration_threshold 4"),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("metadata device"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.ctl_ok(&["table", "--loaded"]), "");
    assert!(d.stop().success());
}

#[test]
fn loaded_clone_copies_nothing_until_resumed() {
    let dir = scratch("swap-loaded-clone");
    let p = |n: &str| dir.path().join(n);
    let size = 2 << 20;
    let src = random_file(&p("src"), size, 4);
    random_file(&p("live"), size, 6);
    zero_file(&p("dest"), size as u64);
    zero_file(&p("meta"), 4 << 20);
    let d = Daemon::start(
        dir.path(),
        &format!("linear {} 0", p("live").display()),
        &[],
    );
    let clone = format!(
        "clone {} {} {} 8 0 4 hydration_threshold 16 hydration_batch_size 16",
        p("meta").display(),
        p("dest").display(),
        p("src").display()
    );
    d.ctl_ok(&["load", "--table", &clone]);
    std::thread::sleep(Duration::from_millis(500));
    let dest = std::fs::read(p("dest")).unwrap();
    assert!(
        dest.iter().all(|&b| b == 0),
        "a loaded (not live) clone must not copy"
    );
    d.ctl_ok(&["suspend"]);
    d.ctl_ok(&["resume"]);
    let t0 = Instant::now();
    loop {
        let status = d.ctl_ok(&["status"]);
        if status.contains(&format!(" {n}/{n} ", n = size / 4096)) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no hydration after resume: {status}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = Client::connect(&d.socket, 1);
    assert_eq!(
        c.read(0, 0, size).unwrap(),
        src,
        "the live clone serves the source"
    );
    drop(c);
    assert!(d.stop().success());
    assert_eq!(std::fs::read(p("dest")).unwrap(), src);
}
