//! dm-clone's known issue 1, fixed: a guest read of an unhydrated region is a hint that
//! makes the region hydrate next, ahead of the background sweep.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::client::Client;
use common::daemon::{bin, random_file, scratch, zero_file, Daemon};
use common::util::status_fields;

fn hydrated(ranges: &str, r: u64) -> bool {
    ranges
        .split(',')
        .filter(|s| !s.is_empty())
        .any(|s| match s.split_once('-') {
            Some((a, b)) => {
                a.parse::<u64>().is_ok_and(|a| a <= r) && b.parse::<u64>().is_ok_and(|b| r <= b)
            }
            None => s.parse::<u64>() == Ok(r),
        })
}

#[test]
fn a_read_hint_jumps_the_hydration_queue() {
    let dir = scratch("clone-hints");
    let p = |n: &str| dir.path().join(n);
    let size = 128 << 20;
    random_file(&p("src"), size, 41);
    zero_file(&p("dest"), size as u64);
    zero_file(&p("meta"), 8 << 20);
    // The slowest sweep dm-clone allows: one region at a time.
    let table = format!(
        "clone {} {} {} 8",
        p("meta").display(),
        p("dest").display(),
        p("src").display()
    );
    let d = Daemon::start(dir.path(), &table, &[]);
    let nr = (size / 4096) as u64;
    let far = nr - 100;
    let mut c = Client::connect(&d.socket, 1);
    c.read(0, far * 4096, 4096).expect("read");
    // Wait until the hinted region is hydrated (the sweep is nowhere near it).
    let t0 = Instant::now();
    loop {
        let s = status_fields(&d.ctl_ok(&["status"]));
        assert!(
            s.hydrated < far,
            "the sweep must not have reached region {far} ({s:?})"
        );
        // Commit what is hydrated, then look at the metadata.
        assert_eq!(c.flush(0), 0);
        let dump = Command::new(bin())
            .args(["metadata", "dump", "--json"])
            .arg(p("meta"))
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&dump.stdout).unwrap();
        if hydrated(v["ranges"].as_str().unwrap_or(""), far) {
            eprintln!(
                "region {far} hydrated after {:?}, sweep at {} regions",
                t0.elapsed(),
                s.hydrated
            );
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "hinted region {far} never hydrated"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(c);
    assert!(d.stop().success());
}
