//! io_uring engine round trips on a real file (under target/tmp, not a tmpfs /tmp).

use std::collections::HashSet;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use vhost_clone::io::{AlignedBuf, EofPolicy, ReadOnlyFile, ReadWriteFile, Ring, RingCompletion};

fn temp_file(len: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("disk.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(len).unwrap();
    (dir, path)
}

/// Wait (poll on the eventfd) and reap until `n` completions arrived.
fn collect(ring: &mut Ring, n: usize) -> Vec<RingCompletion> {
    ring.kick().unwrap();
    let mut out = Vec::new();
    let mut spins = 0;
    while out.len() < n {
        let mut pfd = libc::pollfd {
            fd: ring.event_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: pfd is a valid pollfd array of length 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert!(rc >= 0, "poll failed");
        ring.reap(&mut out);
        spins += 1;
        assert!(spins < 10_000, "completions never arrived");
    }
    out
}

fn pattern(seed: u8, len: usize) -> AlignedBuf {
    let mut b = AlignedBuf::new(len).unwrap();
    for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
        *x = seed.wrapping_add((i % 251) as u8);
    }
    b
}

#[test]
fn io_ring_write_then_readv_round_trip() {
    let (_d, path) = temp_file(1 << 20);
    let f = ReadWriteFile::open(&path).unwrap();
    assert!(
        f.is_direct(),
        "expected O_DIRECT to work on the build filesystem"
    );
    assert_eq!(f.size(), 1 << 20);
    let mut ring = Ring::new(16).unwrap();
    let w = pattern(3, 8192);
    let expect = w.as_slice().to_vec();
    ring.submit_write_buf(&f, 4096, w, 8192, 7).unwrap();
    let c = collect(&mut ring, 1);
    assert_eq!(c[0].token, 7);
    assert_eq!(c[0].result.as_ref().unwrap(), &8192);
    assert!(c[0].buf.is_some(), "buffer handed back");

    // Two-iovec read into our own aligned buffers.
    let mut a = AlignedBuf::new(4096).unwrap();
    let mut b = AlignedBuf::new(4096).unwrap();
    let iov = [
        libc::iovec {
            iov_base: a.as_mut_ptr().cast(),
            iov_len: 4096,
        },
        libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: 4096,
        },
    ];
    // SAFETY: a and b outlive the completion, which `collect` waits for.
    unsafe { ring.submit_readv(&f, 4096, &iov, EofPolicy::Error, 9) }.unwrap();
    let c = collect(&mut ring, 1);
    assert_eq!(c[0].result.as_ref().unwrap(), &8192);
    assert_eq!(a.as_slice(), &expect[..4096]);
    assert_eq!(b.as_slice(), &expect[4096..]);
    assert_eq!(ring.in_flight(), 0);
}

#[test]
fn io_ring_fsync_fallocate_and_write_zeroes() {
    let (_d, path) = temp_file(1 << 20);
    let f = ReadWriteFile::open(&path).unwrap();
    let mut ring = Ring::new(8).unwrap();
    ring.submit_write_buf(&f, 0, pattern(1, 65536), 65536, 1)
        .unwrap();
    collect(&mut ring, 1);
    ring.submit_fsync(&f, true, 2).unwrap();
    ring.submit_fsync(&f, false, 3).unwrap();
    for c in collect(&mut ring, 2) {
        c.result.unwrap();
    }
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    ring.submit_fallocate(&f, punch, 0, 4096, 4).unwrap();
    ring.submit_write_zeroes(&f, 8192, 8192, 5).unwrap();
    for c in collect(&mut ring, 2) {
        assert_eq!(
            c.result.as_ref().map_err(|e| e.to_string()),
            Ok(&if c.token == 4 { 0 } else { 8192 })
        );
    }
    let data = std::fs::read(&path).unwrap();
    assert!(
        data[..4096].iter().all(|&x| x == 0),
        "punched range reads zero"
    );
    assert!(
        data[8192..16384].iter().all(|&x| x == 0),
        "zeroed range reads zero"
    );
    assert_eq!(&data[4096..8192], &pattern(1, 65536).as_slice()[4096..8192]);
    assert_eq!(&data[16384..65536], &pattern(1, 65536).as_slice()[16384..]);
    assert_eq!(data.len(), 1 << 20, "KEEP_SIZE kept the size");
}

#[test]
fn io_ring_many_in_flight_with_small_sq() {
    // 64 ops through an 8-entry SQ: exercises "SQ full -> kick and retry" and the backlog.
    let (_d, path) = temp_file(64 * 4096);
    let f = ReadWriteFile::open(&path).unwrap();
    let mut ring = Ring::new(8).unwrap();
    for i in 0..64u64 {
        ring.submit_write_buf(&f, i * 4096, pattern(i as u8, 4096), 4096, 1000 + i)
            .unwrap();
    }
    assert_eq!(ring.in_flight(), 64);
    let done = collect(&mut ring, 64);
    let tokens: HashSet<u64> = done.iter().map(|c| c.token).collect();
    assert_eq!(tokens, (1000..1064).collect());
    assert!(done
        .iter()
        .all(|c| c.result.as_ref().is_ok_and(|&n| n == 4096)));

    let ro = ReadOnlyFile::open(&path).unwrap();
    for i in (0..64u64).rev() {
        ring.submit_read_buf(
            &ro,
            i * 4096,
            AlignedBuf::new(4096).unwrap(),
            4096,
            EofPolicy::Error,
            i,
        )
        .unwrap();
    }
    let done = collect(&mut ring, 64);
    assert_eq!(done.len(), 64);
    for c in done {
        assert_eq!(c.result.unwrap(), 4096);
        let buf = c.buf.unwrap();
        assert_eq!(
            buf.as_slice(),
            pattern(c.token as u8, 4096).as_slice(),
            "token {}",
            c.token
        );
    }
}

#[test]
fn io_ring_eof_policies() {
    // 6000 bytes: the last O_DIRECT-readable block is short.
    let (_d, path) = temp_file(0);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all(&[0xabu8; 6000])
        .unwrap();
    let f = ReadOnlyFile::open(&path).unwrap();
    let mut ring = Ring::new(4).unwrap();
    ring.submit_read_buf(
        &f,
        4096,
        AlignedBuf::new(4096).unwrap(),
        4096,
        EofPolicy::ZeroFill,
        1,
    )
    .unwrap();
    ring.submit_read_buf(
        &f,
        4096,
        AlignedBuf::new(4096).unwrap(),
        4096,
        EofPolicy::Error,
        2,
    )
    .unwrap();
    let mut done = collect(&mut ring, 2);
    done.sort_by_key(|c| c.token);
    let zf = &done[0];
    assert_eq!(*zf.result.as_ref().unwrap(), 4096);
    let b = zf.buf.as_ref().unwrap().as_slice();
    assert!(b[..6000 - 4096].iter().all(|&x| x == 0xab));
    assert!(b[6000 - 4096..].iter().all(|&x| x == 0));
    let err = done[1].result.as_ref().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
}

#[test]
fn io_ring_errors_are_completions() {
    let (_d, path) = temp_file(8192);
    let f = ReadWriteFile::open(&path).unwrap();
    let mut ring = Ring::new(4).unwrap();
    // Misaligned O_DIRECT offset: the kernel says EINVAL, reported as a completion.
    ring.submit_write_buf(&f, 1, AlignedBuf::new(512).unwrap(), 512, 5)
        .unwrap();
    let c = collect(&mut ring, 1);
    assert_eq!(
        c[0].result.as_ref().unwrap_err().raw_os_error(),
        Some(libc::EINVAL)
    );
    assert!(ring
        .submit_read_buf(
            &f,
            0,
            AlignedBuf::new(512).unwrap(),
            1024,
            EofPolicy::Error,
            6
        )
        .is_err());
    assert_eq!(ring.in_flight(), 0);
    assert!(f.as_raw_fd() >= 0);
}

#[test]
fn io_ring_drop_waits_for_in_flight() {
    let (_d, path) = temp_file(1 << 20);
    let f = ReadWriteFile::open(&path).unwrap();
    let mut ring = Ring::new(4).unwrap();
    for i in 0..16u64 {
        ring.submit_write_buf(&f, i * 65536, pattern(9, 65536), 65536, i)
            .unwrap();
    }
    ring.kick().unwrap();
    drop(ring); // must not free buffers the kernel still writes from
    let data = std::fs::read(&path).unwrap();
    assert_eq!(&data[..65536], pattern(9, 65536).as_slice());
}

#[test]
fn io_ring_write_zeroes_spans_several_rounds() {
    // 72 MiB: more than one 64 MiB round of the shared zero buffer.
    let len: u64 = 72 << 20;
    let (_d, path) = temp_file(len + 8192);
    let f = ReadWriteFile::open(&path).unwrap();
    let mut ring = Ring::new(4).unwrap();
    ring.submit_write_buf(&f, len, pattern(5, 8192), 8192, 1)
        .unwrap();
    let first = pattern(6, 4096);
    ring.submit_write_buf(&f, 0, pattern(6, 4096), 4096, 2)
        .unwrap();
    collect(&mut ring, 2);
    ring.submit_write_zeroes(&f, 0, len, 3).unwrap();
    let c = collect(&mut ring, 1);
    assert_eq!(*c[0].result.as_ref().unwrap(), len as usize);
    let raw = std::fs::File::open(&path).unwrap();
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; 4096];
    raw.read_exact_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 0), "{:?}", &first.as_slice()[..4]);
    let mut tail = vec![0u8; 8192];
    raw.read_exact_at(&mut tail, len).unwrap();
    assert_eq!(
        tail,
        pattern(5, 8192).as_slice(),
        "bytes after the range untouched"
    );
}
