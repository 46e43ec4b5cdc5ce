//! The operator's QEMU launch script (`cloud-hypervisor-configs/qemu.sh`) boots a guest
//! under TCG on a clone served by our daemon, and the guest reads the source's data.

mod common;

use std::process::{Command, Stdio};

use common::daemon::{random_file, scratch, zero_file, Daemon};
use common::guest::{guest_dir, repo_root, require_guest, sha256_file};

#[test]
fn qemu_config_boots_a_clone_under_tcg() {
    if !require_guest("qemu_config_boots_a_clone_under_tcg") {
        return;
    }
    let dir = scratch("qemu-config");
    let p = |n: &str| dir.path().join(n);
    let size = 16 << 20;
    random_file(&p("src"), size, 21);
    zero_file(&p("dest"), size as u64);
    zero_file(&p("meta"), 4 << 20);
    let table = format!(
        "clone {} {} {} 8 1 no_hydration",
        p("meta").display(),
        p("dest").display(),
        p("src").display()
    );
    let d = Daemon::start(
        dir.path(),
        &table,
        &["--num-queues", "2", "--serial", "vhc-config"],
    );
    // The guest's script, on a small "plan" disk the test bed's init runs.
    let script = "for b in /sys/block/vd*; do\n\
                  [ \"$(cat $b/serial 2>/dev/null)\" = vhc-config ] && dev=/dev/${b##*/}\n\
                  done\n\
                  echo \"RESULT size=$(cat /sys/block/${dev##*/}/size)\"\n\
                  echo \"RESULT sha=$(sha256sum $dev | cut -d' ' -f1)\"\n";
    let mut plan = script.as_bytes().to_vec();
    plan.resize(64 * 1024, b'\n');
    std::fs::write(p("plan"), &plan).unwrap();
    let guest = guest_dir();
    let out = Command::new("timeout")
        .arg("180")
        .arg(repo_root().join("cloud-hypervisor-configs/qemu.sh"))
        .arg("--kernel")
        .arg(guest.join("vmlinux"))
        .arg("--initrd")
        .arg(guest.join("initramfs.cpio.gz"))
        .args(["--append", "console=ttyS0 quiet panic=-1 vhc.ndisks=2"])
        .arg("--socket")
        .arg(&d.socket)
        .args(["--queues", "2", "--"])
        .arg("-drive")
        .arg(format!(
            "file={},if=none,format=raw,id=plan0",
            p("plan").display()
        ))
        .args([
            "-device",
            "virtio-blk-pci,drive=plan0,serial=plan",
            "-no-reboot",
        ])
        .env("ACCEL", "tcg")
        .stdin(Stdio::null())
        .output()
        .expect("run qemu.sh");
    let log = String::from_utf8_lossy(&out.stdout);
    let result = |k: &str| {
        log.lines().find_map(|l| {
            l.trim()
                .strip_prefix(&format!("RESULT {k}="))
                .map(str::to_string)
        })
    };
    assert!(
        log.contains("GUEST_EXIT=0"),
        "guest did not finish cleanly ({}):\n{log}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        result("size").as_deref(),
        Some((size / 512).to_string().as_str()),
        "{log}"
    );
    assert_eq!(
        result("sha"),
        Some(sha256_file(&p("src")).unwrap()),
        "guest sha256 of the clone"
    );
    assert!(d.stop().success());
}
