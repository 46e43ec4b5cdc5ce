//! The linear target driven directly through its BlockWorker, with our own buffers as
//! "guest memory".

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use vhost_clone::io::AlignedBuf;
use vhost_clone::target::linear::{LinearError, LinearOptions, LinearTarget, LinearWorker};
use vhost_user_blk::{BlockBackend, BlockError, BlockOp, BlockWorker, Completion, GuestBuf};

const SECTORS: u64 = 2048; // 1 MiB

fn temp_file(len: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(len).unwrap();
    (dir, path)
}

fn target(opts: LinearOptions) -> (tempfile::TempDir, PathBuf, LinearTarget, LinearWorker) {
    let (d, path) = temp_file(SECTORS * 512);
    let t = LinearTarget::open(&path, &opts).unwrap();
    let w = t.new_worker(0).unwrap();
    (d, path, t, w)
}

fn wait_one(w: &mut LinearWorker, tag: u64) -> Result<(), BlockError> {
    w.kick();
    let mut done: Vec<Completion> = Vec::new();
    for _ in 0..10_000 {
        let mut pfd = libc::pollfd {
            fd: w.event_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: pfd is a valid pollfd array of length 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert!(rc >= 0);
        w.reap(&mut done);
        if let Some(i) = done.iter().position(|c| c.tag == tag) {
            assert_eq!(done.len(), 1, "only one request was in flight");
            return done.swap_remove(i).result;
        }
    }
    panic!("request {tag} never completed");
}

fn gb(buf: &mut [u8]) -> GuestBuf {
    GuestBuf {
        ptr: buf.as_mut_ptr(),
        len: buf.len(),
    }
}

fn run(w: &mut LinearWorker, op: BlockOp, bufs: &mut [&mut [u8]]) -> Result<(), BlockError> {
    let g: Vec<GuestBuf> = bufs.iter_mut().map(|b| gb(b)).collect();
    w.submit(42, op, &g);
    wait_one(w, 42)
}

fn fill(buf: &mut [u8], seed: u8) {
    for (i, x) in buf.iter_mut().enumerate() {
        *x = seed ^ (i % 253) as u8;
    }
}

#[test]
fn io_linear_first_and_last_sector_round_trip() {
    let (_d, path, t, mut w) = target(LinearOptions::default());
    let g = t.geometry();
    assert_eq!(g.capacity_sectors, SECTORS);
    assert!(!g.read_only && g.discard && g.write_zeroes);
    assert_eq!(g.discard_granularity_sectors, 8);
    for sector in [0, SECTORS - 1] {
        let mut wbuf = AlignedBuf::new(512).unwrap();
        fill(wbuf.as_mut_slice(), (sector as u8).wrapping_add(1));
        run(
            &mut w,
            BlockOp::Write { sector },
            &mut [wbuf.as_mut_slice()],
        )
        .unwrap();
        let mut rbuf = AlignedBuf::new(512).unwrap();
        run(&mut w, BlockOp::Read { sector }, &mut [rbuf.as_mut_slice()]).unwrap();
        assert_eq!(rbuf.as_slice(), wbuf.as_slice());
    }
    run(&mut w, BlockOp::Flush, &mut []).unwrap();
    let on_disk = std::fs::read(&path).unwrap();
    let mut expect = vec![0u8; 512];
    fill(&mut expect, SECTORS as u8);
    assert_eq!(&on_disk[on_disk.len() - 512..], &expect[..]);
}

#[test]
fn io_linear_offset_is_honoured() {
    let opts = LinearOptions {
        offset_sectors: 16,
        ..Default::default()
    };
    let (_d, path, t, mut w) = target(opts);
    assert_eq!(t.length_sectors(), SECTORS - 16);
    let mut wbuf = AlignedBuf::new(4096).unwrap();
    fill(wbuf.as_mut_slice(), 0x5a);
    run(
        &mut w,
        BlockOp::Write { sector: 0 },
        &mut [wbuf.as_mut_slice()],
    )
    .unwrap();
    let f = std::fs::File::open(&path).unwrap();
    let mut raw = vec![0u8; 4096];
    f.read_exact_at(&mut raw, 16 * 512).unwrap();
    assert_eq!(&raw[..], wbuf.as_slice());
    f.read_exact_at(&mut raw, 0).unwrap();
    assert!(
        raw.iter().all(|&x| x == 0),
        "bytes before the offset untouched"
    );
    // The last sector of the window is the last sector of the file.
    let last = t.length_sectors() - 1;
    run(
        &mut w,
        BlockOp::Write { sector: last },
        &mut [&mut wbuf.as_mut_slice()[..512]],
    )
    .unwrap();
    f.read_exact_at(&mut raw[..512], (SECTORS - 1) * 512)
        .unwrap();
    assert_eq!(&raw[..512], &wbuf.as_slice()[..512]);
}

#[test]
fn io_linear_out_of_range() {
    let (_d, _p, _t, mut w) = target(LinearOptions::default());
    let mut b = AlignedBuf::new(1024).unwrap();
    let r = run(
        &mut w,
        BlockOp::Read { sector: SECTORS },
        &mut [&mut b.as_mut_slice()[..512]],
    );
    assert!(
        matches!(
            r,
            Err(BlockError::OutOfRange {
                sector: SECTORS,
                nr_sectors: 1,
                capacity: SECTORS
            })
        ),
        "{r:?}"
    );
    let r = run(
        &mut w,
        BlockOp::Write {
            sector: SECTORS - 1,
        },
        &mut [b.as_mut_slice()],
    );
    assert!(matches!(r, Err(BlockError::OutOfRange { .. })), "{r:?}");
    let r = run(
        &mut w,
        BlockOp::Discard {
            sector: u64::MAX,
            nr_sectors: 2,
        },
        &mut [],
    );
    assert!(matches!(r, Err(BlockError::OutOfRange { .. })), "{r:?}");
    let r = run(
        &mut w,
        BlockOp::WriteZeroes {
            sector: 8,
            nr_sectors: SECTORS,
            unmap: false,
        },
        &mut [],
    );
    assert!(matches!(r, Err(BlockError::OutOfRange { .. })), "{r:?}");
    // Length not a multiple of 512: refused, not panicking.
    let r = run(
        &mut w,
        BlockOp::Read { sector: 0 },
        &mut [&mut b.as_mut_slice()[..100]],
    );
    assert!(matches!(r, Err(BlockError::Io(_))), "{r:?}");
}

#[test]
fn io_linear_construction_errors() {
    let (_d, path) = temp_file(SECTORS * 512);
    let e = LinearTarget::open(
        &path,
        &LinearOptions {
            offset_sectors: 8,
            length_sectors: Some(SECTORS),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, LinearError::RangeBeyondDevice { .. }), "{e}");
    let e = LinearTarget::open(
        &path,
        &LinearOptions {
            logical_block_size: 1024,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, LinearError::BadLogicalBlockSize(1024)), "{e}");
    let e = LinearTarget::open(
        &path,
        &LinearOptions {
            offset_sectors: SECTORS,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, LinearError::Empty { .. }), "{e}");
    let t = LinearTarget::open(
        &path,
        &LinearOptions {
            logical_block_size: 4096,
            offset_sectors: 3,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        t.length_sectors(),
        SECTORS - 8,
        "default length rounded down to 4 KiB blocks"
    );
    assert_eq!(t.geometry().logical_block_size, 4096);
}

#[test]
fn io_linear_read_only_refuses_writes() {
    let opts = LinearOptions {
        read_only: true,
        ..Default::default()
    };
    let (_d, _p, t, mut w) = target(opts);
    let g = t.geometry();
    assert!(g.read_only && !g.discard && !g.write_zeroes);
    let mut b = AlignedBuf::new(512).unwrap();
    let r = run(
        &mut w,
        BlockOp::Write { sector: 0 },
        &mut [b.as_mut_slice()],
    );
    assert!(matches!(r, Err(BlockError::ReadOnly)), "{r:?}");
    let r = run(
        &mut w,
        BlockOp::Discard {
            sector: 0,
            nr_sectors: 8,
        },
        &mut [],
    );
    assert!(matches!(r, Err(BlockError::ReadOnly)), "{r:?}");
    let r = run(
        &mut w,
        BlockOp::WriteZeroes {
            sector: 0,
            nr_sectors: 8,
            unmap: true,
        },
        &mut [],
    );
    assert!(matches!(r, Err(BlockError::ReadOnly)), "{r:?}");
    run(&mut w, BlockOp::Read { sector: 0 }, &mut [b.as_mut_slice()]).unwrap();
    run(&mut w, BlockOp::Flush, &mut []).unwrap();
}

#[test]
fn io_linear_unaligned_buffers_bounce() {
    let (_d, path, _t, mut w) = target(LinearOptions::default());
    // Misaligned addresses and odd segment lengths: 3 segments totalling 2 sectors.
    let mut backing = vec![0u8; 1024 + 1];
    fill(&mut backing[1..], 0x33);
    let expect = backing[1..].to_vec();
    {
        let (a, rest) = backing[1..].split_at_mut(100);
        let (b, c) = rest.split_at_mut(700);
        run(&mut w, BlockOp::Write { sector: 10 }, &mut [a, b, c]).unwrap();
    }
    let f = std::fs::File::open(&path).unwrap();
    let mut raw = vec![0u8; 1024];
    f.read_exact_at(&mut raw, 10 * 512).unwrap();
    assert_eq!(raw, expect);

    let mut rback = vec![0u8; 1024 + 3];
    {
        let (a, b) = rback[3..].split_at_mut(333);
        run(&mut w, BlockOp::Read { sector: 10 }, &mut [a, b]).unwrap();
    }
    assert_eq!(&rback[3..], &expect[..]);
}

#[test]
fn io_linear_discard_and_write_zeroes_read_zero() {
    let (_d, _p, _t, mut w) = target(LinearOptions::default());
    let mut data = AlignedBuf::new(65536).unwrap();
    fill(data.as_mut_slice(), 0x77);
    run(
        &mut w,
        BlockOp::Write { sector: 0 },
        &mut [data.as_mut_slice()],
    )
    .unwrap();
    run(
        &mut w,
        BlockOp::Discard {
            sector: 8,
            nr_sectors: 8,
        },
        &mut [],
    )
    .unwrap();
    run(
        &mut w,
        BlockOp::WriteZeroes {
            sector: 32,
            nr_sectors: 8,
            unmap: false,
        },
        &mut [],
    )
    .unwrap();
    run(
        &mut w,
        BlockOp::WriteZeroes {
            sector: 64,
            nr_sectors: 16,
            unmap: true,
        },
        &mut [],
    )
    .unwrap();
    let mut r = AlignedBuf::new(65536).unwrap();
    run(&mut w, BlockOp::Read { sector: 0 }, &mut [r.as_mut_slice()]).unwrap();
    let s = r.as_slice();
    let zero = |a: usize, b: usize| s[a * 512..b * 512].iter().all(|&x| x == 0);
    assert!(zero(8, 16), "discarded range reads zero on a file");
    assert!(zero(32, 40), "write-zeroes");
    assert!(zero(64, 80), "write-zeroes with unmap");
    assert_eq!(&s[..8 * 512], &data.as_slice()[..8 * 512]);
    assert_eq!(&s[16 * 512..32 * 512], &data.as_slice()[16 * 512..32 * 512]);
    assert_eq!(&s[80 * 512..], &data.as_slice()[80 * 512..]);
}

#[test]
fn io_linear_many_in_flight_and_drain() {
    let (_d, _p, _t, mut w) = target(LinearOptions::default());
    let mut bufs: Vec<AlignedBuf> = (0..200)
        .map(|i| {
            let mut b = AlignedBuf::new(4096).unwrap();
            fill(b.as_mut_slice(), i as u8);
            b
        })
        .collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        let g = gb(b.as_mut_slice());
        w.submit(
            i as u64,
            BlockOp::Write {
                sector: (i as u64 % 256) * 8,
            },
            &[g],
        );
    }
    w.kick();
    w.drain();
    assert_eq!(w.in_flight(), 200, "completions stay available after drain");
    let mut done = Vec::new();
    w.reap(&mut done);
    assert_eq!(done.len(), 200);
    assert!(done.iter().all(|c| c.result.is_ok()));
    assert_eq!(w.in_flight(), 0);
    let mut r = AlignedBuf::new(4096).unwrap();
    run(
        &mut w,
        BlockOp::Read { sector: 199 * 8 },
        &mut [r.as_mut_slice()],
    )
    .unwrap();
    assert_eq!(r.as_slice(), bufs[199].as_slice());
}

/// tmpfs: O_DIRECT may be refused (buffered fallback) and FALLOC_FL_ZERO_RANGE is not
/// supported (write-zeroes falls back to writing zeroes).
#[test]
fn io_linear_tmpfs_fallbacks() {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("no /dev/shm, skipping");
        return;
    }
    let dir = tempfile::tempdir_in(shm).unwrap();
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(SECTORS * 512)
        .unwrap();
    let t = LinearTarget::open(&path, &LinearOptions::default()).unwrap();
    eprintln!("tmpfs direct I/O: {}", t.file_info().direct);
    let mut w = t.new_worker(0).unwrap();
    let mut data = AlignedBuf::new(16384).unwrap();
    fill(data.as_mut_slice(), 0x11);
    run(
        &mut w,
        BlockOp::Write { sector: 0 },
        &mut [data.as_mut_slice()],
    )
    .unwrap();
    for _ in 0..2 {
        // Second time round the worker remembers ZERO_RANGE is unsupported.
        run(
            &mut w,
            BlockOp::WriteZeroes {
                sector: 8,
                nr_sectors: 8,
                unmap: false,
            },
            &mut [],
        )
        .unwrap();
    }
    run(
        &mut w,
        BlockOp::Discard {
            sector: 24,
            nr_sectors: 8,
        },
        &mut [],
    )
    .unwrap();
    let mut r = AlignedBuf::new(16384).unwrap();
    run(&mut w, BlockOp::Read { sector: 0 }, &mut [r.as_mut_slice()]).unwrap();
    let s = r.as_slice();
    assert_eq!(&s[..4096], &data.as_slice()[..4096]);
    assert!(s[4096..8192].iter().all(|&x| x == 0));
    assert_eq!(&s[8192..12288], &data.as_slice()[8192..12288]);
    assert!(s[12288..].iter().all(|&x| x == 0));
}

/// Detaches the loop device on drop.
struct Loop(String);
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

/// Block-device paths (BLKGETSIZE64, BLKSSZGET, BLKDISCARD, BLKZEROOUT) on a loop device;
/// skipped when loop devices cannot be set up (no root, no /dev/loop-control).
#[test]
fn io_linear_block_device_via_loop() {
    let (_d, img) = temp_file(4 << 20);
    let out = std::process::Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&img)
        .output();
    let dev = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        _ => {
            eprintln!("cannot set up a loop device, skipping");
            return;
        }
    };
    let _guard = Loop(dev.clone());
    let opts = LinearOptions {
        offset_sectors: 8,
        ..Default::default()
    };
    let t = LinearTarget::open(&dev, &opts).unwrap();
    let info = t.file_info().clone();
    eprintln!("loop device info: {info:?}");
    assert_eq!(info.kind, vhost_clone::io::FileKind::BlockDevice);
    assert_eq!(info.size, 4 << 20);
    assert_eq!(t.length_sectors(), (4 << 20) / 512 - 8);
    let mut w = t.new_worker(0).unwrap();
    let mut data = AlignedBuf::new(32768).unwrap();
    fill(data.as_mut_slice(), 0x42);
    run(
        &mut w,
        BlockOp::Write { sector: 0 },
        &mut [data.as_mut_slice()],
    )
    .unwrap();
    run(&mut w, BlockOp::Flush, &mut []).unwrap();
    run(
        &mut w,
        BlockOp::WriteZeroes {
            sector: 8,
            nr_sectors: 8,
            unmap: false,
        },
        &mut [],
    )
    .unwrap();
    run(
        &mut w,
        BlockOp::Discard {
            sector: 32,
            nr_sectors: 8,
        },
        &mut [],
    )
    .unwrap();
    let mut r = AlignedBuf::new(32768).unwrap();
    run(&mut w, BlockOp::Read { sector: 0 }, &mut [r.as_mut_slice()]).unwrap();
    let s = r.as_slice();
    assert_eq!(&s[..4096], &data.as_slice()[..4096]);
    assert!(s[4096..8192].iter().all(|&x| x == 0), "BLKZEROOUT");
    assert_eq!(&s[8192..16384], &data.as_slice()[8192..16384]);
    // Offset honoured on the device too.
    let f = std::fs::File::open(&dev).unwrap();
    let mut raw = vec![0u8; 4096];
    f.read_exact_at(&mut raw, 8 * 512).unwrap();
    assert_eq!(&raw[..], &data.as_slice()[..4096]);
    let r = run(
        &mut w,
        BlockOp::Read {
            sector: t.length_sectors(),
        },
        &mut [&mut r.as_mut_slice()[..512]],
    );
    assert!(matches!(r, Err(BlockError::OutOfRange { .. })));
}

/// A buffered handle (what the O_DIRECT fallback produces) has no alignment requirement:
/// misaligned guest buffers go straight to readv/writev.
#[test]
fn io_linear_buffered_handle() {
    use vhost_clone::io::{DioAlign, ReadWriteFile};
    use vhost_clone::target::linear::LinearFile;
    let (_d, path) = temp_file(SECTORS * 512);
    let f = ReadWriteFile::open_buffered(&path).unwrap();
    assert!(!f.is_direct());
    assert_eq!(f.align(), DioAlign::NONE);
    let t = LinearTarget::new(LinearFile::ReadWrite(f), &LinearOptions::default()).unwrap();
    let mut w = t.new_worker(0).unwrap();
    let mut backing = vec![0u8; 1024 + 7];
    fill(&mut backing[7..], 0x99);
    let expect = backing[7..].to_vec();
    run(
        &mut w,
        BlockOp::Write { sector: 3 },
        &mut [&mut backing[7..]],
    )
    .unwrap();
    run(&mut w, BlockOp::Flush, &mut []).unwrap();
    let mut back = vec![0u8; 1024 + 5];
    {
        let (a, b) = back[5..].split_at_mut(17);
        run(&mut w, BlockOp::Read { sector: 3 }, &mut [a, b]).unwrap();
    }
    assert_eq!(&back[5..], &expect[..]);
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[3 * 512..5 * 512], &expect[..]);
}

/// More guest buffers than one readv/writev accepts: served through the bounce buffer.
#[test]
fn io_linear_more_than_uio_maxiov_buffers() {
    let (_d, _p, _t, mut w) = target(LinearOptions::default());
    let n = 1100usize;
    let mut data = AlignedBuf::new(n * 512).unwrap();
    fill(data.as_mut_slice(), 0x21);
    let expect = data.as_slice().to_vec();
    {
        let mut chunks: Vec<&mut [u8]> = data.as_mut_slice().chunks_mut(512).collect();
        run(&mut w, BlockOp::Write { sector: 1 }, &mut chunks).unwrap();
    }
    let mut back = AlignedBuf::new(n * 512).unwrap();
    {
        let mut chunks: Vec<&mut [u8]> = back.as_mut_slice().chunks_mut(512).collect();
        run(&mut w, BlockOp::Read { sector: 1 }, &mut chunks).unwrap();
    }
    assert_eq!(back.as_slice(), &expect[..]);
}
