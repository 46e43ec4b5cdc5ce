//! Proves the guest test bed: the kernel's dm-clone over plain virtio-blk disks, and a vhost-user-blk disk
//! served by qemu-storage-daemon (the reference backend) - before our own daemon takes its place.
//!
//! Needs `ci/install-deps.sh` and `ci/build-guest.sh`; skips with a notice without them, fails under `CI`.

#[path = "common/guest.rs"]
mod guest;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use guest::{GuestRun, TestDir};

const MIB: u64 = 1 << 20;

#[test]
fn kernel_dm_clone_over_plain_disks() {
    if !guest::require_guest("kernel_dm_clone_over_plain_disks") {
        return;
    }
    let dir = TestDir::new("smoke-dm-clone").expect("tempdir");
    let (meta, dest, src) = (
        dir.join("meta.img"),
        dir.join("dest.img"),
        dir.join("src.img"),
    );
    guest::write_zero_file(&meta, 4 * MIB).expect("meta");
    guest::write_zero_file(&dest, 64 * MIB).expect("dest");
    guest::write_random_file(&src, 64 * MIB, 0x5eed_0001).expect("src");
    let src_sha = guest::sha256_file(&src).expect("sha256 src");

    let script = r#"
set -e
dmsetup create clone --table "0 131072 clone $DISK_meta $DISK_dest $DISK_src 8 1 no_hydration"
echo "RESULT status=$(dmsetup status clone)"
echo "RESULT sha256=$(sha256sum < /dev/mapper/clone | cut -d' ' -f1)"
dmsetup remove clone
echo "RESULT removed=yes"
"#;
    let out = GuestRun::new(script)
        .clone_devices(&meta, &dest, &src)
        .timeout(Duration::from_secs(300))
        .run()
        .expect("run-guest");
    out.assert_success();
    eprintln!("guest wall time: {:?} s", out.wall_secs());
    assert_eq!(
        out.result("status").as_deref(),
        Some(
            "0 131072 clone 8 6/1024 8 0/16384 0 1 no_hydration 4 hydration_threshold 1 \
             hydration_batch_size 1 rw"
        ),
        "log:\n{}",
        out.log
    );
    assert_eq!(out.result("sha256"), Some(src_sha), "log:\n{}", out.log);
    assert_eq!(out.result("removed").as_deref(), Some("yes"));
    // no_hydration and reads only: the destination stays all zero
    let dest_bytes = std::fs::read(&dest).expect("read dest");
    assert!(
        dest_bytes.iter().all(|&b| b == 0),
        "destination was written"
    );
}

/// Kills the export when the test ends, however it ends.
struct StorageDaemon {
    child: Child,
}

impl StorageDaemon {
    fn start(image: &Path, socket: &Path, num_queues: u32) -> StorageDaemon {
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f0,filename={},cache.direct=on,aio=io_uring",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,\
                 num-queues={num_queues}",
                socket.display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let mut daemon = StorageDaemon { child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("qemu-storage-daemon exited early: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "no socket {} after 10 s",
                socket.display()
            );
            thread::sleep(Duration::from_millis(20));
        }
        daemon
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn vhost_user_blk_from_qemu_storage_daemon() {
    if !guest::require_guest("vhost_user_blk_from_qemu_storage_daemon") {
        return;
    }
    if !guest::in_path("qemu-storage-daemon") {
        assert!(
            !guest::in_ci(),
            "qemu-storage-daemon missing (apt qemu-utils)"
        );
        eprintln!("SKIPPED vhost_user_blk_from_qemu_storage_daemon: no qemu-storage-daemon");
        return;
    }
    let dir = TestDir::new("smoke-vhost").expect("tempdir");
    let image: PathBuf = dir.join("disk.img");
    let socket = dir.join("vhost.sock");
    guest::write_random_file(&image, 16 * MIB, 0x5eed_0002).expect("image");
    let before = guest::sha256_file(&image).expect("sha256");
    let daemon = StorageDaemon::start(&image, &socket, 2);

    // 64 KiB of "VHOSTCLONE\n" at byte 1 MiB + 4 KiB, written with O_DIRECT
    let offset: u64 = MIB + 4096;
    let len: usize = 65536;
    let script = format!(
        r#"
set -e
D=$DISK_vhost0
echo "RESULT device=$D"
echo "RESULT sectors=$(cat /sys/block/${{D#/dev/}}/size)"
echo "RESULT sha256=$(sha256sum < $D | cut -d' ' -f1)"
yes VHOSTCLONE | head -c {len} | dd of=$D bs={len} count=1 seek={offset} oflag=seek_bytes,direct iflag=fullblock conv=notrunc 2>/dev/null
sync
echo "RESULT written=yes"
"#
    );
    let out = GuestRun::new(script)
        .vhost_user_queues(&socket, 2)
        .timeout(Duration::from_secs(300))
        .run()
        .expect("run-guest");
    drop(daemon);
    out.assert_success();
    eprintln!("guest wall time: {:?} s", out.wall_secs());
    assert_eq!(
        out.result("sectors").as_deref(),
        Some("32768"),
        "log:\n{}",
        out.log
    );
    assert_eq!(out.result("sha256"), Some(before), "log:\n{}", out.log);
    assert_eq!(out.result("written").as_deref(), Some("yes"));

    let expected: Vec<u8> = b"VHOSTCLONE\n".iter().copied().cycle().take(len).collect();
    let got = guest::read_at(&image, offset, len).expect("read back");
    assert!(
        got == expected,
        "guest write not visible in the host file at {offset}"
    );
    // bytes around the write are untouched
    let mut untouched = dir.join("check.img");
    untouched.set_extension("ref");
    guest::write_random_file(&untouched, 16 * MIB, 0x5eed_0002).expect("reference");
    let reference = std::fs::read(&untouched).expect("read reference");
    let now = std::fs::read(&image).expect("read image");
    let (start, end) = (
        usize::try_from(offset).unwrap(),
        usize::try_from(offset).unwrap() + len,
    );
    assert!(
        now[..start] == reference[..start] && now[end..] == reference[end..],
        "bytes outside the write changed"
    );
}
