//! A failing source (dm-clone's known issue 3, fixed): copies that fail are counted, and
//! after a bounded number of consecutive failures background hydration stops with an
//! event and a status change instead of retrying forever. Guest requests that need the
//! broken part fail cleanly; everything else keeps working. The failure is real: the
//! source file shrinks under the daemon, so reads past its new end fail.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::client::Client;
use common::daemon::{bin, CloneFiles, Daemon};
use common::util::status_fields;

#[test]
fn hydration_stops_after_repeated_source_failures() {
    let size = 8 << 20;
    let f = CloneFiles::new("clone-srcfail", size, 17, 4 << 20);
    let p = |n: &str| f.path(n);
    let src = f.data.clone();
    let table = f.table("8 1 no_hydration");
    let d = Daemon::start(f.dir.path(), &table, &[]);
    let mut events = Command::new(bin())
        .args(["events", "--control"])
        .arg(&d.control)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut c = Client::connect(&d.socket, 1);
    // The first half of the source is still there; the second half goes away.
    let half = size / 2;
    std::fs::OpenOptions::new()
        .write(true)
        .open(p("src"))
        .unwrap()
        .set_len(half as u64)
        .unwrap();
    d.ctl_ok(&["message", "enable_hydration"]);
    let t0 = Instant::now();
    let json = loop {
        let j: serde_json::Value = serde_json::from_str(&d.ctl_ok(&["status", "--json"])).unwrap();
        if j["state"] == "stopped" {
            break j;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "hydration never stopped: {j}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("status --json after the stop: {json}");
    assert!(json["failures_total"].as_u64().unwrap() >= 16);
    assert!(
        json["last_error"].as_str().unwrap_or("").contains("source"),
        "{json}"
    );
    // The first half hydrated; nothing past the end did; the daemon is still serving.
    let s = status_fields(&d.ctl_ok(&["status"]));
    assert!(
        s.hydrated >= (half / 4096) as u64 - 1 && s.hydrated < s.nr_regions,
        "{s:?}"
    );
    let stable = s.hydrated;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        status_fields(&d.ctl_ok(&["status"])).hydrated,
        stable,
        "no retry loop"
    );
    // Guest reads of the broken part fail cleanly; reads of the rest are right.
    assert!(
        c.read(0, (size - 4096) as u64, 4096).is_err(),
        "read past the source's end must fail"
    );
    assert_eq!(c.read(0, 0, 4096).unwrap(), src[..4096].to_vec());
    // A partial write needing a copy from the broken part fails; a whole-region one works.
    assert!(c.write(0, (size - 8192) as u64, &[1u8; 512]) != 0);
    assert_eq!(c.write(0, (size - 4096) as u64, &[2u8; 4096]), 0);
    assert_eq!(
        c.read(0, (size - 4096) as u64, 4096).unwrap(),
        vec![2u8; 4096]
    );
    assert_eq!(c.flush(0), 0);
    drop(c);
    assert!(d.stop().success());
    let t0 = Instant::now();
    while events.try_wait().unwrap().is_none() && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = events.kill();
    let text = String::from_utf8_lossy(&events.wait_with_output().unwrap().stdout).to_string();
    assert_eq!(
        text.matches("\"hydration_stopped\"").count(),
        1,
        "exactly one stop event: {text}"
    );
    assert!(text.contains("\"region_error\""), "{text}");
}
