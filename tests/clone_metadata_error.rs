//! A metadata device that fails: the mode becomes `ro` (status says so, an event is
//! sent), writes that need a metadata change fail cleanly, the rest keeps working.
//! The failure is real: the metadata file lives on a tiny tmpfs that fills up.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::client::Client;
use common::daemon::{random_file, scratch, zero_file, Daemon};
use common::util::metadata_check;

struct Mount(std::path::PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn metadata_write_error_turns_read_only() {
    let dir = scratch("clone-mderr");
    let p = |n: &str| dir.path().join(n);
    let mnt = p("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    // Room for the format (6 blocks) and a few commits, then ENOSPC.
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&mnt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root and must be able to mount a tmpfs"
        );
        eprintln!("skipping: cannot mount a tmpfs (not root?)");
        return;
    }
    let _mount = Mount(mnt.clone());
    let size = 4 << 20;
    let src = random_file(&p("src"), size, 3);
    zero_file(&p("dest"), size as u64);
    zero_file(&mnt.join("meta"), 4 << 20);
    let table = format!(
        "clone {} {} {} 8 1 no_hydration",
        mnt.join("meta").display(),
        p("dest").display(),
        p("src").display()
    );
    let d = Daemon::start(dir.path(), &table, &[]);
    let mut events = Command::new(common::daemon::bin())
        .args(["events", "--control"])
        .arg(&d.control)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut c = Client::connect(&d.socket, 1);
    // Whole-region writes in different array words, each followed by a flush (a commit),
    // until a commit fails.
    let mut failed_at = None;
    let mut written = Vec::new();
    for i in 0..64u64 {
        let off = i * 64 * 4096;
        if off + 4096 > size as u64 {
            break;
        }
        assert_eq!(c.write(0, off, &[i as u8 + 1; 4096]), 0, "write {i}");
        written.push(off);
        if c.flush(0) != 0 {
            failed_at = Some(i);
            break;
        }
    }
    let failed_at = failed_at.expect("the tmpfs never filled up");
    eprintln!("metadata commit failed after {failed_at} successful commits");
    let status = d.ctl_ok(&["status"]);
    assert!(status.ends_with(" ro"), "status: {status}");
    // A write that needs a metadata change (an unhydrated region) fails cleanly...
    let unhydrated = 4096 * 3;
    assert!(
        c.write(0, unhydrated, &[9u8; 512]) != 0,
        "write to an unhydrated region must fail in ro mode"
    );
    // ... a write to a hydrated region and reads still work, with the right data.
    assert_eq!(c.write(0, written[0], &[0xAB; 4096]), 0);
    assert_eq!(c.read(0, written[0], 4096).unwrap(), vec![0xAB; 4096]);
    assert_eq!(
        c.read(0, unhydrated, 4096).unwrap(),
        src[unhydrated as usize..unhydrated as usize + 4096].to_vec()
    );
    // Flushes report the failure.
    assert!(c.flush(0) != 0);
    drop(c);
    assert!(d.stop().success());
    let t0 = Instant::now();
    while events.try_wait().unwrap().is_none() && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = events.kill();
    let out = events.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"mode_change\"") && text.contains("\"ro\""),
        "events: {text}"
    );
    // What was committed before the failure is intact.
    metadata_check(&mnt.join("meta"));
}
