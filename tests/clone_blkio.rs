//! The real daemon serving a `clone` table, driven by libblkio and checked against an
//! in-memory model of the disk.

mod common;

use std::time::{Duration, Instant};

use common::client::Client;
use common::daemon::{bin, random_file, scratch, zero_file, CloneFiles, Daemon};
use common::rng::Rng;
use common::util::metadata_check;

const SECTOR: usize = 512;
const REGION: usize = 4096; // region size 8 sectors

/// The disk as the guest must see it; `known[s]` is false where the content is
/// unspecified (discarded).
struct Model {
    data: Vec<u8>,
    known: Vec<bool>,
}

impl Model {
    fn write(&mut self, off: usize, bytes: &[u8]) {
        self.data[off..off + bytes.len()].copy_from_slice(bytes);
        self.known[off / SECTOR..(off + bytes.len()) / SECTOR].fill(true);
    }
    fn forget(&mut self, off: usize, len: usize) {
        self.known[off / SECTOR..(off + len) / SECTOR].fill(false);
    }
    fn check(&self, off: usize, got: &[u8], what: &str) {
        for (i, chunk) in got.chunks(SECTOR).enumerate() {
            let s = off / SECTOR + i;
            if self.known[s] {
                assert!(
                    chunk == &self.data[s * SECTOR..(s + 1) * SECTOR],
                    "{what}: sector {s} differs from the model"
                );
            }
        }
    }
}

fn status_counts(d: &Daemon) -> (u64, u64) {
    let line = d.ctl_ok(&["status"]);
    // 0 LEN clone 8 USED/TOTAL REGION HYDRATED/NR ...
    let f: Vec<&str> = line.split_whitespace().collect();
    let (h, n) = f[6].split_once('/').expect("hydrated/nr");
    (h.parse().unwrap(), n.parse().unwrap())
}

fn wait_hydrated(d: &Daemon) {
    let t0 = Instant::now();
    loop {
        let (h, n) = status_counts(d);
        if h == n {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "hydration stalled at {h}/{n}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Random guest I/O against the model.
fn random_io(c: &mut Client, m: &mut Model, rng: &mut Rng, ops: usize, size: usize) {
    for i in 0..ops {
        let q = i % c.queues.len();
        let kind = rng.below(100);
        // Mostly small, sometimes region-aligned, sometimes multi-region.
        let (off, len) = match rng.below(4) {
            0 => {
                let r = rng.below(size / REGION);
                let n = 1 + rng.below(4);
                let len = (n * REGION).min(size - r * REGION);
                (r * REGION, len)
            }
            _ => {
                let s = rng.below(size / SECTOR);
                let n = 1 + rng.below(24);
                let len = (n * SECTOR).min(size - s * SECTOR);
                (s * SECTOR, len)
            }
        };
        match kind {
            0..=39 => {
                let got = c.read(q, off as u64, len).expect("read");
                m.check(off, &got, &format!("op {i} read {off}+{len}"));
            }
            40..=79 => {
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                assert_eq!(c.write(q, off as u64, &data), 0, "op {i} write {off}+{len}");
                m.write(off, &data);
            }
            80..=87 => {
                assert_eq!(c.discard(q, off as u64, len as u64), 0, "op {i} discard");
                // Whole regions inside the range become unspecified; the rest keeps its data.
                let first = off.div_ceil(REGION) * REGION;
                let end = ((off + len) / REGION) * REGION;
                if end > first {
                    m.forget(first, end - first);
                }
            }
            88..=95 => {
                assert_eq!(
                    c.write_zeroes(q, off as u64, len as u64),
                    0,
                    "op {i} write-zeroes"
                );
                m.write(off, &vec![0u8; len]);
            }
            _ => assert_eq!(c.flush(q), 0, "op {i} flush"),
        }
    }
}

fn full_check(c: &mut Client, m: &Model, size: usize, what: &str) {
    let chunk = 1 << 20;
    for off in (0..size).step_by(chunk) {
        let len = chunk.min(size - off);
        let got = c.read(0, off as u64, len).expect("read");
        m.check(off, &got, what);
    }
}

#[test]
fn model_with_hydration_off_on_and_toggled() {
    // 8 MiB + 3 sectors: the last region is partial.
    let size = 8 * 1024 * 1024 + 3 * SECTOR;
    let f = CloneFiles::new("clone-model", size, 42, 4 << 20);
    let p = |n: &str| f.path(n);
    let src = f.data.clone();
    let table = f.table("8 1 no_hydration");
    let d = Daemon::start(f.dir.path(), &table, &["--num-queues", "2"]);
    let nr = size.div_ceil(REGION) as u64;
    assert_eq!(
        d.ctl_ok(&["status"]),
        format!(
            "0 {} clone 8 6/1024 8 0/{nr} 0 1 no_hydration 4 hydration_threshold 1 hydration_batch_size 1 rw",
            size / SECTOR
        )
    );
    let mut c = Client::connect(&d.socket, 2);
    let mut m = Model {
        data: src.clone(),
        known: vec![true; size / SECTOR],
    };
    // Nothing hydrated: the disk is the source.
    full_check(&mut c, &m, size, "fresh clone");
    let mut rng = Rng(0x5eed);
    random_io(&mut c, &mut m, &mut rng, 1500, size);
    full_check(&mut c, &m, size, "after hydration-off phase");
    let (h, _) = status_counts(&d);
    assert!(h > 0 && h < nr, "writes hydrated some regions ({h})");

    // Hydration on while I/O runs, then toggled.
    d.ctl_ok(&["message", "hydration_threshold", "4"]);
    d.ctl_ok(&["message", "hydration_batch_size", "4"]);
    d.ctl_ok(&["message", "enable_hydration"]);
    random_io(&mut c, &mut m, &mut rng, 700, size);
    d.ctl_ok(&["message", "disable_hydration"]);
    random_io(&mut c, &mut m, &mut rng, 300, size);
    d.ctl_ok(&["message", "enable_hydration"]);
    random_io(&mut c, &mut m, &mut rng, 300, size);
    wait_hydrated(&d);
    assert!(d.ctl_ok(&["status"]).contains(&format!(
        " {nr}/{nr} 0 0 4 hydration_threshold 4 hydration_batch_size 4 rw"
    )));
    full_check(&mut c, &m, size, "after hydration");
    assert_eq!(c.flush(0), 0);
    drop(c);
    assert!(d.stop().success());

    // The source was never written; the destination is the model.
    assert_eq!(std::fs::read(p("src")).unwrap(), src, "source changed");
    let dest = std::fs::read(p("dest")).unwrap();
    m.check(0, &dest, "destination file");
    // The metadata is consistent and says everything is hydrated.
    metadata_check(&p("meta"));
    let dump = std::process::Command::new(bin())
        .args(["metadata", "dump", "--json"])
        .arg(p("meta"))
        .output()
        .unwrap();
    let dump: serde_json::Value = serde_json::from_slice(&dump.stdout).expect("dump --json");
    assert_eq!(dump["hydrated"].as_u64(), Some(nr), "dump: {dump}");
    assert_eq!(dump["nr_regions"].as_u64(), Some(nr));
}

#[test]
fn restart_keeps_writes_and_hydration_state() {
    let size = 4 << 20;
    let f = CloneFiles::new("clone-restart", size, 9, 4 << 20);
    let src = f.data.clone();
    let table = f.table("8 1 no_hydration");
    let mut m = Model {
        data: src.clone(),
        known: vec![true; size / SECTOR],
    };
    let d = Daemon::start(f.dir.path(), &table, &[]);
    let mut c = Client::connect(&d.socket, 1);
    let mut rng = Rng(77);
    random_io(&mut c, &mut m, &mut rng, 400, size);
    assert_eq!(c.flush(0), 0);
    let before = status_counts(&d);
    drop(c);
    assert!(d.stop().success());
    let d = Daemon::start(f.dir.path(), &table, &[]);
    assert_eq!(
        status_counts(&d),
        before,
        "hydrated count survives a restart"
    );
    let mut c = Client::connect(&d.socket, 1);
    full_check(&mut c, &m, size, "after restart");
    drop(c);
    assert!(d.stop().success());
}

#[test]
fn bad_tables_are_refused_with_clear_errors() {
    let dir = scratch("clone-bad");
    let p = |n: &str| dir.path().join(n);
    random_file(&p("src"), 1 << 20, 1);
    zero_file(&p("small"), 512 * 1024);
    zero_file(&p("meta"), 1 << 20);
    let run = |table: String| {
        let out = std::process::Command::new(bin())
            .args(["serve", "--socket"])
            .arg(p("s.sock"))
            .arg("--table")
            .arg(table)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let m = p("meta").display().to_string();
    let s = p("src").display().to_string();
    let small = p("small").display().to_string();
    assert!(run(format!("clone {m} {small} {s} 8")).contains("destination"));
    assert!(run(format!("clone {m} {s} {s} 12")).contains("power of two"));
    assert!(run(format!("clone {m} {small} {s} 8 1 turbo")).contains("unknown feature"));
    assert!(run(format!("clone {m} {small} /nonexistent 8")).contains("/nonexistent"));
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM");
    kib * 1024
}

#[test]
fn whole_device_discard_hydrates_everything_and_write_zeroes_is_bounded() {
    // 64 GiB at 4 KiB regions: 16 Mi regions. One guest discard of the whole device marks
    // every region hydrated (dm-clone: discarded regions need no copy) without per-region
    // state piling up: the daemon stays within nr_regions/8 + 32 MiB (issue 6's bound).
    const SIZE: u64 = 64 << 30;
    let dir = scratch("clone-discard-all");
    let p = |n: &str| dir.path().join(n);
    for (name, len) in [("src", SIZE), ("dest", SIZE), ("meta", 32 << 20)] {
        std::fs::File::create(p(name))
            .and_then(|f| f.set_len(len))
            .expect("sparse file");
    }
    let table = format!(
        "clone {} {} {} 8 1 no_hydration",
        p("meta").display(),
        p("dest").display(),
        p("src").display()
    );
    let d = Daemon::start(dir.path(), &table, &["--num-queues", "1"]);
    let mut c = Client::connect(&d.socket, 1);
    assert_eq!(c.capacity(), SIZE);
    // Write-zeroes is bounded per request (max_write_zeroes_sectors, 4 MiB): a larger one
    // is refused, one at the limit works.
    assert_ne!(c.write_zeroes(0, 0, SIZE), 0, "whole-device write-zeroes");
    assert_ne!(
        c.write_zeroes(0, 0, (4 << 20) + 4096),
        0,
        "write-zeroes over the limit"
    );
    assert_eq!(c.write_zeroes(0, 0, 4 << 20), 0, "4 MiB write-zeroes");
    assert_eq!(c.discard(0, 0, SIZE), 0, "whole-device discard");
    let (h, n) = status_counts(&d);
    assert_eq!((h, n), (SIZE / REGION as u64, SIZE / REGION as u64));
    let peak = peak_rss(d.child.id());
    let bound = (n / 8) + (32 << 20);
    assert!(
        peak <= bound,
        "peak RSS {} MiB above the {} MiB bound",
        peak >> 20,
        bound >> 20
    );
    drop(c);
    assert!(d.stop().success());
    let check = metadata_check(&p("meta"));
    assert!(check.contains("16777216/16777216"), "{check}");
}
