use super::*;

const LIM: Limits = Limits {
    capacity_sectors: 1000,
    seg_max: 4,
    size_max: 1 << 20,
    read_only: false,
    discard: true,
    write_zeroes: true,
    max_write_zeroes_sectors: 1000,
};

fn hdr(t: u32, sector: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&t.to_le_bytes());
    h[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

fn r(len: u32) -> Desc {
    Desc {
        addr: 0x1000,
        len,
        writable: false,
    }
}
fn w(len: u32) -> Desc {
    Desc {
        addr: 0x2000,
        len,
        writable: true,
    }
}

fn seg(sector: u64, n: u32, flags: u32) -> [u8; SEGMENT_LEN] {
    let mut s = [0u8; SEGMENT_LEN];
    s[..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&n.to_le_bytes());
    s[12..].copy_from_slice(&flags.to_le_bytes());
    s
}

#[test]
fn read_ok_and_first_last_sector() {
    let d = [r(16), w(512), w(1024), w(1)];
    assert_eq!(
        parse(&hdr(T_IN, 0), &d, &LIM),
        Ok(Request::Read {
            sector: 0,
            data: &d[1..3],
            len: 1536
        })
    );
    let d = [r(16), w(512), w(1)];
    assert!(matches!(
        parse(&hdr(T_IN, 999), &d, &LIM),
        Ok(Request::Read { sector: 999, .. })
    ));
}

#[test]
fn write_ok() {
    let d = [r(16), r(4096), w(1)];
    assert_eq!(
        parse(&hdr(T_OUT, 10), &d, &LIM),
        Ok(Request::Write {
            sector: 10,
            data: &d[1..2],
            len: 4096
        })
    );
}

#[test]
fn out_of_range() {
    let d = [r(16), w(1024), w(1)];
    assert!(matches!(
        parse(&hdr(T_IN, 999), &d, &LIM),
        Err(ParseError::OutOfRange { .. })
    ));
    assert!(matches!(
        parse(&hdr(T_IN, 1000), &d, &LIM),
        Err(ParseError::OutOfRange { .. })
    ));
    assert!(matches!(
        parse(&hdr(T_IN, u64::MAX), &d, &LIM),
        Err(ParseError::OutOfRange { .. })
    ));
    assert_eq!(
        parse(&hdr(T_IN, 1000), &d, &LIM).unwrap_err().status(),
        Some(VIRTIO_BLK_S_IOERR)
    );
}

#[test]
fn bad_data_length() {
    let d = [r(16), w(513), w(1)];
    assert_eq!(
        parse(&hdr(T_IN, 0), &d, &LIM),
        Err(ParseError::BadDataLength(513))
    );
    let d = [r(16), w(1)];
    assert_eq!(
        parse(&hdr(T_IN, 0), &d, &LIM),
        Err(ParseError::BadDataLength(0))
    );
}

#[test]
fn wrong_direction() {
    let d = [r(16), r(512), w(1)];
    assert!(matches!(
        parse(&hdr(T_IN, 0), &d, &LIM),
        Err(ParseError::WrongDirection { .. })
    ));
    let d = [r(16), w(512), w(1)];
    assert!(matches!(
        parse(&hdr(T_OUT, 0), &d, &LIM),
        Err(ParseError::WrongDirection { .. })
    ));
    let d = [r(16), r(20), w(1)];
    assert!(matches!(
        parse(&hdr(T_GET_ID, 0), &d, &LIM),
        Err(ParseError::WrongDirection { .. })
    ));
    let d = [r(16), w(16), w(1)];
    assert!(matches!(
        parse(&hdr(T_DISCARD, 0), &d, &LIM),
        Err(ParseError::WrongDirection { .. })
    ));
}

#[test]
fn status_checks() {
    assert_eq!(parse(&hdr(T_IN, 0), &[], &LIM), Err(ParseError::NoStatus));
    assert_eq!(
        parse(&hdr(T_IN, 0), &[r(16), w(512), r(1)], &LIM),
        Err(ParseError::NoStatus)
    );
    assert_eq!(
        parse(&hdr(T_IN, 0), &[r(16), w(512), w(0)], &LIM),
        Err(ParseError::NoStatus)
    );
    assert_eq!(ParseError::NoStatus.status(), None);
}

#[test]
fn chain_too_short() {
    assert_eq!(
        parse(&hdr(T_FLUSH, 0), &[w(1)], &LIM),
        Err(ParseError::TooShort(1))
    );
}

#[test]
fn bad_header() {
    assert_eq!(
        parse(&hdr(T_FLUSH, 0), &[r(15), w(1)], &LIM),
        Err(ParseError::BadHeader)
    );
    assert_eq!(
        parse(&hdr(T_FLUSH, 0), &[w(16), w(1)], &LIM),
        Err(ParseError::BadHeader)
    );
}

#[test]
fn chain_too_long_and_segment_too_large() {
    let d = [r(16), w(512), w(512), w(512), w(512), w(512), w(1)];
    assert_eq!(
        parse(&hdr(T_IN, 0), &d, &LIM),
        Err(ParseError::TooManySegments { count: 5, max: 4 })
    );
    let d = [r(16), w(2 << 20), w(1)];
    assert!(matches!(
        parse(&hdr(T_IN, 0), &d, &LIM),
        Err(ParseError::SegmentTooLarge { .. })
    ));
}

#[test]
fn read_only() {
    let lim = Limits {
        read_only: true,
        ..LIM
    };
    let d = [r(16), r(512), w(1)];
    assert_eq!(
        parse(&hdr(T_OUT, 0), &d, &lim),
        Err(ParseError::ReadOnly(T_OUT))
    );
    let d = [r(16), r(16), w(1)];
    assert_eq!(
        parse(&hdr(T_DISCARD, 0), &d, &lim),
        Err(ParseError::ReadOnly(T_DISCARD))
    );
    assert_eq!(
        parse(&hdr(T_WRITE_ZEROES, 0), &d, &lim),
        Err(ParseError::ReadOnly(T_WRITE_ZEROES))
    );
    let d = [r(16), w(512), w(1)];
    assert!(parse(&hdr(T_IN, 0), &d, &lim).is_ok());
}

#[test]
fn flush_and_get_id() {
    assert_eq!(
        parse(&hdr(T_FLUSH, 77), &[r(16), w(1)], &LIM),
        Ok(Request::Flush)
    );
    let d = [r(16), w(20), w(1)];
    assert_eq!(
        parse(&hdr(T_GET_ID, 0), &d, &LIM),
        Ok(Request::GetId { data: &d[1..2] })
    );
}

#[test]
fn unsupported() {
    let d = [r(16), w(1)];
    assert_eq!(parse(&hdr(2, 0), &d, &LIM), Err(ParseError::Unsupported(2)));
    assert_eq!(
        parse(&hdr(0xffff, 0), &d, &LIM).unwrap_err().status(),
        Some(VIRTIO_BLK_S_UNSUPP)
    );
    let lim = Limits {
        discard: false,
        write_zeroes: false,
        ..LIM
    };
    let d = [r(16), r(16), w(1)];
    assert_eq!(
        parse(&hdr(T_DISCARD, 0), &d, &lim),
        Err(ParseError::Unsupported(T_DISCARD))
    );
    assert_eq!(
        parse(&hdr(T_WRITE_ZEROES, 0), &d, &lim),
        Err(ParseError::Unsupported(T_WRITE_ZEROES))
    );
}

#[test]
fn discard_and_write_zeroes() {
    let d = [r(16), r(16), w(1)];
    let req = parse(&hdr(T_DISCARD, 0), &d, &LIM).unwrap();
    assert_eq!(req, Request::Discard { segment: d[1] });
    assert_eq!(
        parse_segment(&req, &seg(10, 20, 0), &LIM),
        Ok(BlockOp::Discard {
            sector: 10,
            nr_sectors: 20
        })
    );
    assert_eq!(
        parse_segment(&req, &seg(10, 20, FLAG_UNMAP), &LIM),
        Err(ParseError::BadFlags(1))
    );
    assert_eq!(
        parse_segment(&req, &seg(10, 20, 2), &LIM),
        Err(ParseError::BadFlags(2))
    );
    assert!(matches!(
        parse_segment(&req, &seg(990, 20, 0), &LIM),
        Err(ParseError::OutOfRange { .. })
    ));
    assert!(matches!(
        parse_segment(&req, &seg(u64::MAX, 1, 0), &LIM),
        Err(ParseError::OutOfRange { .. })
    ));

    let req = parse(&hdr(T_WRITE_ZEROES, 0), &d, &LIM).unwrap();
    assert_eq!(
        parse_segment(&req, &seg(0, 1000, FLAG_UNMAP), &LIM),
        Ok(BlockOp::WriteZeroes {
            sector: 0,
            nr_sectors: 1000,
            unmap: true
        })
    );
    assert_eq!(
        parse_segment(&req, &seg(5, 5, 0), &LIM),
        Ok(BlockOp::WriteZeroes {
            sector: 5,
            nr_sectors: 5,
            unmap: false
        })
    );
    assert_eq!(
        parse_segment(&req, &seg(5, 5, 0x10), &LIM),
        Err(ParseError::BadFlags(0x10))
    );
    let small = Limits {
        max_write_zeroes_sectors: 64,
        ..LIM
    };
    assert!(parse_segment(&req, &seg(0, 64, 0), &small).is_ok());
    let too_big = parse_segment(&req, &seg(0, 65, FLAG_UNMAP), &small);
    assert_eq!(
        too_big,
        Err(ParseError::WriteZeroesTooLarge {
            nr_sectors: 65,
            max: 64
        })
    );
    assert_eq!(too_big.unwrap_err().status(), Some(VIRTIO_BLK_S_IOERR));
    assert_eq!(
        parse_segment(&Request::Flush, &seg(5, 5, 0), &LIM),
        Err(ParseError::Unsupported(u32::MAX))
    );
}

#[test]
fn discard_segment_count() {
    // Two segments: more than max_discard_seg = 1.
    let d = [r(16), r(32), w(1)];
    assert_eq!(
        parse(&hdr(T_DISCARD, 0), &d, &LIM),
        Err(ParseError::BadSegmentList(32))
    );
    let d = [r(16), r(16), r(16), w(1)];
    assert_eq!(
        parse(&hdr(T_WRITE_ZEROES, 0), &d, &LIM),
        Err(ParseError::BadSegmentList(32))
    );
    let d = [r(16), r(15), w(1)];
    assert_eq!(
        parse(&hdr(T_DISCARD, 0), &d, &LIM),
        Err(ParseError::BadSegmentList(15))
    );
    let d = [r(16), w(1)];
    assert_eq!(
        parse(&hdr(T_DISCARD, 0), &d, &LIM),
        Err(ParseError::BadSegmentList(0))
    );
}

#[test]
fn fuzz_parse_pseudo_random() {
    // xorshift64*: deterministic, no dependency.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = Vec::new();
    for i in 0..5000usize {
        buf.clear();
        let len = i % 200;
        for _ in 0..len {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            buf.push((state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8);
        }
        fuzz_parse(&buf);
    }
    fuzz_parse(&[]);
    fuzz_parse(&[0xff; 300]);
}
