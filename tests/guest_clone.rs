//! Issue 4: a QEMU guest (TCG) whose vhost-user-blk disk is our daemon's `clone` target.
//! (a) with `no_hydration` and nothing hydrated, the guest reads exactly the source;
//! (b) partial- and whole-region O_DIRECT writes survive a daemon restart (SIGTERM, same files) and
//!     a second guest boot; everything else still reads as the source; guest reads hydrate nothing;
//! (c) background hydration (threshold 16, batch 8) completes and the destination file then equals
//!     source + writes, with clean metadata.
//!
//! Needs `ci/install-deps.sh` and `ci/build-guest.sh`; skips with a notice without them, fails under `CI`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::{bin, random_file, scratch, zero_file, Daemon};
use common::guest::{self, GuestRun};
use sha2::{Digest, Sha256};

const MIB: usize = 1 << 20;
const REGION: usize = 4096; // 8 sectors

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn yes_pattern(tag: &str, len: usize) -> Vec<u8> {
    format!("{tag}\n").bytes().cycle().take(len).collect()
}

/// (hydrated, nr_regions, hydrating) from a dm-clone status line.
fn counts(line: &str) -> (u64, u64, u64) {
    let f: Vec<&str> = line.split_whitespace().collect();
    assert!(
        f.len() > 7 && f[2] == "clone",
        "not a clone status line: {line:?}"
    );
    let (h, n) = f[6].split_once('/').expect("hydrated/nr");
    (
        h.parse().unwrap(),
        n.parse().unwrap(),
        f[7].parse().unwrap(),
    )
}

#[test]
fn guest_on_clone_reads_source_keeps_writes_across_restart_and_hydrates() {
    if !guest::require_guest("guest_on_clone_reads_source_keeps_writes_across_restart_and_hydrates")
    {
        return;
    }
    let t0 = Instant::now();
    let dir = scratch("guest-clone");
    let (meta, dest, src) = (
        dir.path().join("meta.img"),
        dir.path().join("dest.img"),
        dir.path().join("src.img"),
    );
    let size = 32 * MIB;
    let nr_regions = (size / REGION) as u64;
    let source = random_file(&src, size, 0xc10e_0004);
    zero_file(&dest, size as u64);
    zero_file(&meta, 4 * MIB as u64);
    let src_sha = sha256_hex(&source);
    let table = format!(
        "clone {} {} {} 8 1 no_hydration",
        meta.display(),
        dest.display(),
        src.display()
    );

    // (offset, len, tag): partial, whole (2 regions), straddling two partials, the last region
    // whole, and a 64 KiB write with partial regions at both ends and 15 whole ones inside.
    let writes: [(usize, usize, &str); 5] = [
        (10 * REGION + 1024, 1024, "PARTIAL10"),
        (100 * REGION, 2 * REGION, "WHOLE100-101"),
        (200 * REGION + 3072, 2048, "STRADDLE200"),
        (size - REGION, REGION, "LASTREGION"),
        (MIB + 512, 64 * 1024, "SPAN256-272"),
    ];
    let mut expected = source.clone();
    let mut touched = std::collections::BTreeSet::new();
    for (off, len, tag) in writes {
        expected[off..off + len].copy_from_slice(&yes_pattern(tag, len));
        for r in off / REGION..(off + len).div_ceil(REGION) {
            touched.insert(r);
        }
    }
    let expected_sha = sha256_hex(&expected);
    assert_eq!(touched.len(), 23);

    // ---- boot 1: read everything, then write
    let daemon = Daemon::start(dir.path(), &table, &[]);
    let st0 = daemon.ctl_ok(&["status"]);
    eprintln!("MEASURED guest_clone: status before boot 1: {st0}");
    assert_eq!(counts(&st0), (0, nr_regions, 0), "fresh clone: {st0}");

    let mut dd = String::new();
    for (off, len, tag) in writes {
        dd.push_str(&format!(
            "yes {tag} | head -c {len} | dd of=$D bs={len} count=1 seek={off} \
             oflag=seek_bytes,direct iflag=fullblock conv=notrunc 2>/dev/null\n"
        ));
    }
    let script1 = format!(
        r#"
set -e
D=$DISK_vhost0
echo "RESULT sectors=$(cat /sys/block/${{D#/dev/}}/size)"
echo "RESULT sha256=$(sha256sum < $D | cut -d' ' -f1)"
{dd}sync
echo "RESULT written=yes"
"#
    );
    let out1 = GuestRun::new(script1)
        .vhost_user(&daemon.socket)
        .timeout(Duration::from_secs(240))
        .run()
        .expect("run-guest 1");
    eprintln!("{}", out1.log);
    let st1 = daemon.ctl_ok(&["status"]);
    let stop1 = daemon.stop();
    out1.assert_success();
    assert!(stop1.success(), "daemon exit after SIGTERM: {stop1}");
    eprintln!(
        "MEASURED guest_clone: boot 1 wall {:?} s; guest sha256 {:?} (source {src_sha}); status after writes: {st1}",
        out1.wall_secs(),
        out1.result("sha256")
    );
    assert_eq!(out1.result("sectors"), Some((size / 512).to_string()));
    assert_eq!(
        out1.result("sha256"),
        Some(src_sha.clone()),
        "(a) guest read of the unhydrated clone differs from the source"
    );
    assert_eq!(out1.result("written").as_deref(), Some("yes"));
    assert_eq!(
        counts(&st1),
        (touched.len() as u64, nr_regions, 0),
        "exactly the written regions are hydrated (reads hydrate nothing with no_hydration): {st1}"
    );
    // the destination holds source+writes in exactly the touched regions, zeros elsewhere
    let dest_now = std::fs::read(&dest).expect("read dest");
    for r in 0..size / REGION {
        let got = &dest_now[r * REGION..(r + 1) * REGION];
        if touched.contains(&r) {
            assert!(
                got == &expected[r * REGION..(r + 1) * REGION],
                "dest region {r} (written) != source+writes"
            );
        } else {
            assert!(
                got.iter().all(|&b| b == 0),
                "dest region {r} was written though the guest only read it"
            );
        }
    }

    // ---- boot 2: a restarted daemon on the same files
    let daemon = Daemon::start(dir.path(), &table, &[]);
    let st2 = daemon.ctl_ok(&["status"]);
    assert_eq!(
        counts(&st2),
        (touched.len() as u64, nr_regions, 0),
        "after restart: {st2}"
    );
    let mut reads = String::new();
    for (i, (off, len, _)) in writes.iter().enumerate() {
        reads.push_str(&format!(
            "echo \"RESULT w{i}=$(dd if=$D bs={len} count=1 skip={off} iflag=skip_bytes,direct 2>/dev/null | sha256sum | cut -d' ' -f1)\"\n"
        ));
    }
    let script2 = format!(
        r#"
set -e
D=$DISK_vhost0
{reads}echo "RESULT sha256=$(sha256sum < $D | cut -d' ' -f1)"
"#
    );
    let out2 = GuestRun::new(script2)
        .vhost_user(&daemon.socket)
        .timeout(Duration::from_secs(240))
        .run()
        .expect("run-guest 2");
    eprintln!("{}", out2.log);
    out2.assert_success();
    for (i, (off, len, tag)) in writes.iter().enumerate() {
        assert_eq!(
            out2.result(&format!("w{i}")),
            Some(sha256_hex(&yes_pattern(tag, *len))),
            "(b) write {i} ({len} bytes at {off}) not read back after the restart"
        );
    }
    assert_eq!(
        out2.result("sha256"),
        Some(expected_sha.clone()),
        "(b) whole disk after restart != source + writes"
    );
    eprintln!(
        "MEASURED guest_clone: boot 2 wall {:?} s; 5 write ranges read back, whole-disk sha256 {expected_sha} == source+writes; status {st2}",
        out2.wall_secs()
    );

    // ---- (c) hydrate everything
    daemon.ctl_ok(&["message", "hydration_threshold", "16"]);
    daemon.ctl_ok(&["message", "hydration_batch_size", "8"]);
    daemon.ctl_ok(&["message", "enable_hydration"]);
    let th = Instant::now();
    let last = loop {
        let st = daemon.ctl_ok(&["status"]);
        let (h, n, hydrating) = counts(&st);
        if h == n && hydrating == 0 {
            break st;
        }
        assert!(
            th.elapsed() < Duration::from_secs(120),
            "(c) hydration not done after 120 s: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let hyd_secs = th.elapsed().as_secs_f64();
    eprintln!("MEASURED guest_clone: full hydration of {nr_regions} regions in {hyd_secs:.2} s; status: {last}");
    assert!(
        last.contains("hydration_threshold 16 hydration_batch_size 8"),
        "status should show the new core args: {last}"
    );
    let stop2 = daemon.stop();
    assert!(stop2.success(), "daemon exit after SIGTERM: {stop2}");
    let dest_now = std::fs::read(&dest).expect("read dest");
    if dest_now != expected {
        let first = dest_now
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap();
        panic!(
            "(c) destination != source+writes after full hydration; first difference at byte {first} (region {})",
            first / REGION
        );
    }
    let check = Command::new(bin())
        .args(["metadata", "check"])
        .arg(&meta)
        .output()
        .expect("metadata check");
    let check_out = String::from_utf8_lossy(&check.stdout);
    eprintln!("MEASURED guest_clone: metadata check: {}", check_out.trim());
    assert!(
        check.status.success(),
        "metadata check failed: {check_out} {}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        check_out.contains(&format!("{nr_regions}/{nr_regions} hydrated")),
        "metadata should record every region hydrated: {check_out}"
    );
    eprintln!(
        "MEASURED guest_clone: total {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
