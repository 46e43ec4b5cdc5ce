//! Issue 2: our daemon serving `linear IMG 0` to a real QEMU guest (TCG) through
//! `vhost-user-blk-pci` with 2 queues. The guest sees the right size, reads exactly the host's
//! bytes, and its O_DIRECT writes land in the host file - and nothing else changes.
//!
//! Needs `ci/install-deps.sh` and `ci/build-guest.sh`; skips with a notice without them, fails under `CI`.

mod common;

use std::time::{Duration, Instant};

use common::daemon::{random_file, scratch, Daemon};
use common::guest::{self, GuestRun};
use sha2::{Digest, Sha256};

const MIB: usize = 1 << 20;

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What `yes TAG | head -c LEN` prints.
fn yes_pattern(tag: &str, len: usize) -> Vec<u8> {
    format!("{tag}\n").bytes().cycle().take(len).collect()
}

#[test]
fn guest_reads_and_writes_linear_over_vhost_user_two_queues() {
    if !guest::require_guest("guest_reads_and_writes_linear_over_vhost_user_two_queues") {
        return;
    }
    let t0 = Instant::now();
    let dir = scratch("guest-linear");
    let image = dir.path().join("disk.img");
    let size = 24 * MIB;
    let original = random_file(&image, size, 0x11ae_a201);
    let host_sha = sha256_hex(&original);

    let table = format!("linear {} 0", image.display());
    let daemon = Daemon::start(dir.path(), &table, &["--num-queues", "2"]);

    // Two O_DIRECT writes: 512 B at an odd sector, 192 KiB straddling a MiB boundary.
    let writes: [(usize, usize, &str); 2] = [
        (5 * MIB + 512 * 3, 512, "LINEARSMALL"),
        (11 * MIB - 64 * 1024, 192 * 1024, "LINEAR-BIG-WRITE"),
    ];
    let mut dd = String::new();
    for (off, len, tag) in writes {
        dd.push_str(&format!(
            "yes {tag} | head -c {len} | dd of=$D bs={len} count=1 seek={off} \
             oflag=seek_bytes,direct iflag=fullblock conv=notrunc 2>/dev/null\n"
        ));
    }
    let script = format!(
        r#"
set -e
D=$DISK_vhost0
N=${{D#/dev/}}
echo "RESULT sectors=$(cat /sys/block/$N/size)"
echo "RESULT lbs=$(cat /sys/block/$N/queue/logical_block_size)"
echo "RESULT mq=$(ls /sys/block/$N/mq | wc -l)"
echo "RESULT sha256=$(sha256sum < $D | cut -d' ' -f1)"
{dd}sync
echo "RESULT written=yes"
grep -- '-req\.' /proc/interrupts | tr -s ' ' | sed 's/^/IRQ /' || true
"#
    );
    let out = GuestRun::new(script)
        .vhost_user_queues(&daemon.socket, 2)
        // virtio-blk uses min(num-queues, nr_cpus) queues: 2 vCPUs so both virtqueues are driven
        .arg("--smp")
        .arg("2")
        .timeout(Duration::from_secs(240))
        .run()
        .expect("run-guest");
    let status = daemon.stop();
    eprintln!("{}", out.log);
    out.assert_success();
    assert!(status.success(), "daemon exit after SIGTERM: {status}");
    eprintln!(
        "MEASURED guest_linear: guest wall {:?} s, sectors={:?} lbs={:?} blk-mq queues={:?}, guest sha256={:?} host sha256={host_sha}",
        out.wall_secs(),
        out.result("sectors"),
        out.result("lbs"),
        out.result("mq"),
        out.result("sha256")
    );
    assert_eq!(
        out.result("sectors"),
        Some((size / 512).to_string()),
        "guest size (sectors)"
    );
    assert_eq!(
        out.result("mq").as_deref(),
        Some("2"),
        "the guest should drive 2 virtqueues (blk-mq hw queues; guest has 2 vCPUs)"
    );
    assert_eq!(
        out.result("sha256"),
        Some(host_sha),
        "guest's whole-disk sha256 differs from the host file's"
    );
    assert_eq!(out.result("written").as_deref(), Some("yes"));

    let mut expected = original;
    for (off, len, tag) in writes {
        expected[off..off + len].copy_from_slice(&yes_pattern(tag, len));
    }
    let now = std::fs::read(&image).expect("read image");
    assert_eq!(now.len(), size, "image size changed");
    if now != expected {
        let first = now.iter().zip(&expected).position(|(a, b)| a != b).unwrap();
        panic!("host file differs from original+guest writes; first difference at byte {first}");
    }
    eprintln!(
        "MEASURED guest_linear: host file == original + 2 guest writes ({} bytes changed region), total {:.1} s",
        512 + 192 * 1024,
        t0.elapsed().as_secs_f64()
    );
}
