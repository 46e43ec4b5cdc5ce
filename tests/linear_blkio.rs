//! The real daemon serving a `linear` table, driven by libblkio over its unix socket.

mod common;

use common::client::Client;
use common::daemon::{random_file, scratch, Daemon};

const MIB: usize = 1 << 20;

#[test]
fn whole_device_patterns_flush_discard_zeroes_and_reconnect() {
    let dir = scratch("linear");
    let img = dir.path().join("disk.img");
    let size = 16 * MIB;
    let mut model = random_file(&img, size, 7);
    // Offset 2048 sectors (1 MiB): the guest sees the rest of the file.
    let d = Daemon::start(
        dir.path(),
        &format!("linear {} 2048", img.display()),
        &["--num-queues", "2"],
    );
    let mut c = Client::connect(&d.socket, 2);
    let cap = c.capacity() as usize;
    assert_eq!(cap, size - MIB);
    let view = |m: &Vec<u8>, off: usize, len: usize| m[MIB + off..MIB + off + len].to_vec();

    // The whole device reads as the file (after the offset), in 1 MiB pieces.
    for off in (0..cap).step_by(MIB) {
        assert_eq!(
            c.read(0, off as u64, MIB).unwrap(),
            view(&model, off, MIB),
            "at {off}"
        );
    }
    // Patterned writes: first sector, last sector, unaligned-length multi-sector, big.
    for (i, (off, len)) in [
        (0, 512),
        (cap - 512, 512),
        (4096 + 512, 3 * 512),
        (5 * MIB, MIB + 4096),
    ]
    .into_iter()
    .enumerate()
    {
        let data: Vec<u8> = (0..len).map(|j| (j * 7 + i * 13) as u8).collect();
        assert_eq!(c.write(i % 2, off as u64, &data), 0);
        model[MIB + off..MIB + off + len].copy_from_slice(&data);
        assert_eq!(c.read((i + 1) % 2, off as u64, len).unwrap(), data);
    }
    assert_eq!(c.flush(0), 0);
    // The file itself holds the writes after the flush.
    assert_eq!(
        std::fs::read(&img).unwrap(),
        model,
        "file content after flush"
    );

    // Discard and write-zeroes read back as zeroes.
    assert_eq!(c.discard(0, 8 * MIB as u64, 64 * 1024), 0);
    assert_eq!(c.write_zeroes(1, 9 * MIB as u64, 128 * 1024), 0);
    assert_eq!(
        c.read(0, 8 * MIB as u64, 64 * 1024).unwrap(),
        vec![0u8; 64 * 1024]
    );
    assert_eq!(
        c.read(0, 9 * MIB as u64, 128 * 1024).unwrap(),
        vec![0u8; 128 * 1024]
    );
    model[9 * MIB..9 * MIB + 64 * 1024].fill(0);
    model[10 * MIB..10 * MIB + 128 * 1024].fill(0);

    // Out of range: fails cleanly, the device keeps working.
    assert!(c.read(0, (cap - 512) as u64, 1024).is_err());
    assert!(c.write(0, cap as u64, &[1u8; 512]) != 0);
    assert_eq!(c.read(0, 0, 512).unwrap(), view(&model, 0, 512));
    drop(c);

    // A second client after the first disconnected sees everything.
    let mut c = Client::connect(&d.socket, 1);
    for off in (0..cap).step_by(MIB) {
        assert_eq!(
            c.read(0, off as u64, MIB).unwrap(),
            view(&model, off, MIB),
            "reconnect at {off}"
        );
    }
    drop(c);
    assert!(d.stop().success(), "SIGTERM exits 0");
}

#[test]
fn four_queues_concurrent() {
    let dir = scratch("linear-mq");
    let img = dir.path().join("disk.img");
    random_file(&img, 8 * MIB, 11);
    let d = Daemon::start(
        dir.path(),
        &format!("0 16384 linear {} 0", img.display()),
        &["--num-queues", "4", "--threads", "2"],
    );
    let c = Client::connect(&d.socket, 4);
    let Client {
        blkio,
        queues,
        region,
    } = c;
    let base = region.addr;
    std::thread::scope(|s| {
        for (i, mut q) in queues.into_iter().enumerate() {
            s.spawn(move || {
                let slot = 256 * 1024;
                // SAFETY: each thread uses its own disjoint slice of the mapped region.
                let buf =
                    unsafe { std::slice::from_raw_parts_mut((base + i * slot) as *mut u8, slot) };
                let mut done = [const { std::mem::MaybeUninit::<blkio::Completion>::uninit() }; 16];
                for round in 0..50u64 {
                    // 16 writes in flight at once, then read them back.
                    for k in 0..16usize {
                        let off =
                            (i as u64 * 2 * 1024 * 1024) + ((round * 16 + k as u64) % 512) * 4096;
                        let b = &mut buf[k * 4096..(k + 1) * 4096];
                        b.fill((round as u8) ^ (k as u8) ^ (i as u8 * 40));
                        q.write(off, b.as_ptr(), 4096, k, blkio::ReqFlags::empty());
                    }
                    let mut got = 0;
                    while got < 16 {
                        let n = q.do_io(&mut done, 1, None, None).unwrap();
                        for c in &done[..n] {
                            // SAFETY: do_io initialised the first n completions.
                            assert_eq!(unsafe { c.assume_init_read() }.ret, 0);
                        }
                        got += n;
                    }
                    let k = (round % 16) as usize;
                    let off = (i as u64 * 2 * 1024 * 1024) + ((round * 16 + k as u64) % 512) * 4096;
                    let rb = &mut buf[128 * 1024..128 * 1024 + 4096];
                    q.read(off, rb.as_mut_ptr(), 4096, 0, blkio::ReqFlags::empty());
                    let n = q.do_io(&mut done, 1, None, None).unwrap();
                    assert_eq!(n, 1);
                    // SAFETY: as above.
                    assert_eq!(unsafe { done[0].assume_init_read() }.ret, 0);
                    assert!(rb
                        .iter()
                        .all(|&x| x == (round as u8) ^ (k as u8) ^ (i as u8 * 40)));
                }
            });
        }
    });
    drop(blkio);
    assert!(d.stop().success());
}

#[test]
fn read_only_refuses_writes_and_table_is_shown() {
    let dir = scratch("linear-ro");
    let img = dir.path().join("disk.img");
    let model = random_file(&img, 2 * MIB, 3);
    let d = Daemon::start(
        dir.path(),
        &format!("linear {} 0", img.display()),
        &["--read-only"],
    );
    assert_eq!(
        d.ctl_ok(&["table"]),
        format!("0 4096 linear {} 0", img.display())
    );
    let mut c = Client::connect_opts(&d.socket, 1, true);
    assert_eq!(c.read(0, 0, 4096).unwrap(), model[..4096].to_vec());
    assert!(
        c.write(0, 0, &[0u8; 512]) != 0,
        "write to a read-only disk must fail"
    );
    drop(c);
    assert_eq!(std::fs::read(&img).unwrap(), model, "file untouched");
    assert!(d.stop().success());
}
