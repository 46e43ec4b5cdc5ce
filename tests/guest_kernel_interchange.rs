//! Issue 4: the kernel's dm-clone and our daemon take over each other's three devices.
//! (a) ours -> kernel: our daemon serves a clone, a libblkio client writes (partial and whole regions),
//!     some regions are hydrated in the background, the daemon stops (SIGTERM: final commit); then the
//!     kernel's dm-clone in a QEMU guest loads the same files: same hydrated count, same used/total
//!     metadata blocks, and the same bytes (sha256 of /dev/mapper/clone) as our daemon served.
//! (b) kernel -> ours: the kernel's dm-clone on a zeroed metadata device takes O_DIRECT writes and a
//!     burst of hydration, then `dmsetup remove`; our daemon serves the same files: a libblkio client
//!     reads the same bytes, `status` shows the kernel's last hydrated count, `metadata check` is clean.
//!
//! Needs `ci/install-deps.sh` and `ci/build-guest.sh`; skips with a notice without them, fails under `CI`.

mod common;

use std::time::{Duration, Instant};

use common::client::Client;
use common::daemon::{random_file, scratch, zero_file, Daemon};
use common::guest::{self, GuestRun};
use common::util::{fields, metadata_check, sha256_hex, yes_pattern};
use vhost_clone::metadata::CloneMetadata;

const MIB: usize = 1 << 20;
const REGION: usize = 4096; // 8 sectors
const SIZE: usize = 32 * MIB;

/// The whole disk read through our daemon with libblkio (4 MiB requests).
fn read_all(client: &mut Client, size: usize) -> Vec<u8> {
    let mut all = Vec::with_capacity(size);
    let chunk = 4 * MIB;
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off);
        let part = client
            .read(0, off as u64, n)
            .unwrap_or_else(|e| panic!("read at {off}: {e}"));
        all.extend_from_slice(&part);
        off += n;
    }
    all
}

fn kernel_script(writes: &str, hydrate: &str) -> String {
    format!(
        r#"
set -e
dmsetup create clone --table "0 {sectors} clone $DISK_meta $DISK_dest $DISK_src 8 1 no_hydration"
echo "RESULT status_load=$(dmsetup status clone)"
C=/dev/mapper/clone
{writes}{hydrate}
i=0
while :; do
    set -- $(dmsetup status clone)
    [ "$8" = 0 ] && break
    i=$((i + 1)); [ $i -lt 600 ] || {{ echo "hydrating never reached 0: $*"; exit 3; }}
    sleep 0.1
done
echo "RESULT status=$(dmsetup status clone)"
echo "RESULT sha256=$(sha256sum < $C | cut -d' ' -f1)"
dmsetup remove clone
echo "RESULT removed=yes"
"#,
        sectors = SIZE / 512
    )
}

#[test]
fn ours_to_kernel() {
    if !guest::require_guest("ours_to_kernel") {
        return;
    }
    let t0 = Instant::now();
    let dir = scratch("guest-ours2kernel");
    let (meta, dest, src) = (
        dir.path().join("meta.img"),
        dir.path().join("dest.img"),
        dir.path().join("src.img"),
    );
    let source = random_file(&src, SIZE, 0x0a2c_e01a);
    zero_file(&dest, SIZE as u64);
    zero_file(&meta, 4 * MIB as u64);
    let table = format!(
        "clone {} {} {} 8 1 no_hydration",
        meta.display(),
        dest.display(),
        src.display()
    );
    let daemon = Daemon::start(dir.path(), &table, &[]);
    let mut client = Client::connect(&daemon.socket, 1);
    assert_eq!(client.capacity(), SIZE as u64);

    let writes: [(usize, usize, &str); 4] = [
        (5 * REGION + 512, 1024, "OURS-PARTIAL5"),
        (50 * REGION, 4 * REGION, "OURS-WHOLE50-53"),
        (300 * REGION + 3584, 1024, "OURS-STRADDLE300"),
        (SIZE - 512, 512, "OURS-LASTSECTOR"),
    ];
    let mut expected = source;
    for (off, len, tag) in writes {
        let data = yes_pattern(tag, len);
        assert_eq!(client.write(0, off as u64, &data), 0, "write at {off}");
        expected[off..off + len].copy_from_slice(&data);
    }
    assert_eq!(client.flush(0), 0, "flush");
    // a short burst of background hydration
    daemon.ctl_ok(&["message", "hydration_threshold", "16"]);
    daemon.ctl_ok(&["message", "hydration_batch_size", "8"]);
    daemon.ctl_ok(&["message", "enable_hydration"]);
    std::thread::sleep(Duration::from_millis(100));
    daemon.ctl_ok(&["message", "disable_hydration"]);
    let tw = Instant::now();
    let ours = loop {
        let st = daemon.ctl_ok(&["status"]);
        if fields(&st).4 == 0 {
            break st;
        }
        assert!(
            tw.elapsed() < Duration::from_secs(30),
            "hydrating stuck: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let served = read_all(&mut client, SIZE);
    let served_sha = sha256_hex(&served);
    assert!(
        served == expected,
        "our daemon does not serve source+writes (first diff at byte {:?})",
        served.iter().zip(&expected).position(|(a, b)| a != b)
    );
    let ours_after_read = daemon.ctl_ok(&["status"]);
    assert_eq!(
        fields(&ours_after_read).2,
        fields(&ours).2,
        "reads hydrated: {ours_after_read}"
    );
    assert_eq!(client.flush(0), 0, "flush");
    drop(client);
    let stop = daemon.stop();
    assert!(stop.success(), "daemon exit after SIGTERM: {stop}");
    let (_, _, our_hydrated, nr, _) = fields(&ours);
    // the writes alone hydrate 8 regions; the burst adds some (how many depends on the machine)
    assert!(our_hydrated >= 8 && our_hydrated <= nr, "{ours}");
    let md = CloneMetadata::open(&meta, Some((8, (SIZE / 512) as u64))).expect("open our metadata");
    let (md_h, md_used, md_total) = (md.hydrated_count(), md.used_blocks(), md.total_blocks());
    drop(md);
    assert_eq!(
        md_h, our_hydrated,
        "committed metadata vs last status {ours}"
    );
    let check = metadata_check(&meta);
    eprintln!(
        "MEASURED ours_to_kernel: our status {ours}; committed: hydrated {md_h}, used/total {md_used}/{md_total}; served sha256 {served_sha}; check: {check}"
    );

    let out = GuestRun::new(kernel_script("", ""))
        .clone_devices(&meta, &dest, &src)
        .timeout(Duration::from_secs(240))
        .run_ok();
    let kload = out.result("status_load").expect("status_load");
    let kst = out.result("status").expect("status");
    eprintln!(
        "MEASURED ours_to_kernel: kernel status after load: {kload}; kernel sha256 {:?}; guest wall {:?} s",
        out.result("sha256"),
        out.wall_secs()
    );
    let (ku, kt, kh, kn, _) = fields(&kload);
    assert_eq!(kn, nr, "nr_regions");
    assert_eq!(kh, our_hydrated, "kernel's hydrated count != ours");
    assert_eq!((ku, kt), (md_used, md_total), "kernel's used/total != ours");
    assert_eq!(
        fields(&kst).2,
        our_hydrated,
        "kernel hydrated more though no_hydration and only reads: {kst}"
    );
    assert_eq!(
        out.result("sha256"),
        Some(served_sha),
        "kernel's /dev/mapper/clone differs from what our daemon served"
    );
    assert_eq!(out.result("removed").as_deref(), Some("yes"));
    metadata_check(&meta);
    eprintln!(
        "MEASURED ours_to_kernel: total {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn kernel_to_ours() {
    if !guest::require_guest("kernel_to_ours") {
        return;
    }
    let t0 = Instant::now();
    let dir = scratch("guest-kernel2ours");
    let (meta, dest, src) = (
        dir.path().join("meta.img"),
        dir.path().join("dest.img"),
        dir.path().join("src.img"),
    );
    let source = random_file(&src, SIZE, 0x0b2c_e01b);
    zero_file(&dest, SIZE as u64);
    zero_file(&meta, 4 * MIB as u64);

    let writes: [(usize, usize, &str); 4] = [
        (7 * REGION + 1536, 512, "KERNEL-PARTIAL7"),
        (64 * REGION, 8 * REGION, "KERNEL-WHOLE64-71"),
        (777 * REGION + 2048, 4096, "KERNEL-STRADDLE777"),
        (SIZE - REGION, REGION, "KERNEL-LASTREGION"),
    ];
    let mut expected = source;
    let mut dd = String::new();
    for (off, len, tag) in writes {
        expected[off..off + len].copy_from_slice(&yes_pattern(tag, len));
        dd.push_str(&format!(
            "yes {tag} | head -c {len} | dd of=$C bs={len} count=1 seek={off} \
             oflag=seek_bytes,direct iflag=fullblock conv=notrunc 2>/dev/null\n"
        ));
    }
    dd.push_str("sync\n");
    let expected_sha = sha256_hex(&expected);
    let hydrate = "dmsetup message clone 0 hydration_threshold 16\n\
                   dmsetup message clone 0 hydration_batch_size 8\n\
                   dmsetup message clone 0 enable_hydration\n\
                   sleep 0.3\n\
                   dmsetup message clone 0 disable_hydration\n";
    let out = GuestRun::new(kernel_script(&dd, hydrate))
        .clone_devices(&meta, &dest, &src)
        .timeout(Duration::from_secs(240))
        .run_ok();
    assert_eq!(out.result("removed").as_deref(), Some("yes"));
    let kst = out.result("status").expect("status");
    let ksha = out.result("sha256").expect("sha256");
    let (_, _, kh, kn, _) = fields(&kst);
    eprintln!(
        "MEASURED kernel_to_ours: kernel status at load {:?}, last {kst}; kernel sha256 {ksha}; guest wall {:?} s",
        out.result("status_load"),
        out.wall_secs()
    );
    assert_eq!(kn, (SIZE / REGION) as u64);
    assert_eq!(
        ksha, expected_sha,
        "the kernel itself does not read source+writes (test model?)"
    );
    assert!(kh >= 16, "writes alone hydrate 16 regions: {kst}");

    let check = metadata_check(&meta);
    let table = format!(
        "clone {} {} {} 8 1 no_hydration",
        meta.display(),
        dest.display(),
        src.display()
    );
    let daemon = Daemon::start(dir.path(), &table, &[]);
    let ours = daemon.ctl_ok(&["status"]);
    let mut client = Client::connect(&daemon.socket, 1);
    assert_eq!(client.capacity(), SIZE as u64);
    let served = read_all(&mut client, SIZE);
    let served_sha = sha256_hex(&served);
    drop(client);
    let ours_after = daemon.ctl_ok(&["status"]);
    let stop = daemon.stop();
    eprintln!(
        "MEASURED kernel_to_ours: our status on the kernel's files: {ours}; after reading all: {ours_after}; served sha256 {served_sha}; check before: {check}"
    );
    assert!(stop.success(), "daemon exit after SIGTERM: {stop}");
    assert_eq!(
        fields(&ours).2,
        kh,
        "our hydrated count != kernel's last: ours {ours}, kernel {kst}"
    );
    assert_eq!(
        fields(&ours_after).2,
        kh,
        "reads hydrated with no_hydration: {ours_after}"
    );
    assert_eq!(
        served_sha,
        ksha,
        "our daemon serves different bytes than the kernel did (first diff at byte {:?})",
        served.iter().zip(&expected).position(|(a, b)| a != b)
    );
    metadata_check(&meta);
    eprintln!(
        "MEASURED kernel_to_ours: total {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
