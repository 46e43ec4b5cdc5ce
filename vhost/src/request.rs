//! Pure virtio-blk request parser (VIRTIO 1.2 §5.2.6). No guest memory access here:
//! the caller reads the 16-byte header (and later the discard/write-zeroes segment)
//! and passes the descriptor list; the parser checks only what the spec requires.

use crate::block::{BlockOp, SECTOR_SIZE};

/// Request completed successfully.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Request failed.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Request type not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// `VIRTIO_BLK_T_IN`.
pub const T_IN: u32 = 0;
/// `VIRTIO_BLK_T_OUT`.
pub const T_OUT: u32 = 1;
/// `VIRTIO_BLK_T_FLUSH`.
pub const T_FLUSH: u32 = 4;
/// `VIRTIO_BLK_T_GET_ID`.
pub const T_GET_ID: u32 = 8;
/// `VIRTIO_BLK_T_DISCARD`.
pub const T_DISCARD: u32 = 11;
/// `VIRTIO_BLK_T_WRITE_ZEROES`.
pub const T_WRITE_ZEROES: u32 = 13;

/// `struct virtio_blk_outhdr`: le32 type, le32 ioprio, le64 sector.
pub const HEADER_LEN: usize = 16;
/// `struct virtio_blk_discard_write_zeroes`: le64 sector, le32 num_sectors, le32 flags.
pub const SEGMENT_LEN: usize = 16;
/// Length of the GET_ID string.
pub const ID_LEN: usize = 20;
/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
pub const FLAG_UNMAP: u32 = 1;

/// One descriptor of a chain, as seen after following indirect tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// VIRTQ_DESC_F_WRITE: the device may write it.
    pub writable: bool,
}

/// What the device offers; requests are checked against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Most data descriptors per request (`seg_max`).
    pub seg_max: u32,
    /// Largest data descriptor (`size_max`); 0 = unlimited.
    pub size_max: u32,
    /// VIRTIO_BLK_F_RO offered.
    pub read_only: bool,
    /// VIRTIO_BLK_F_DISCARD offered.
    pub discard: bool,
    /// VIRTIO_BLK_F_WRITE_ZEROES offered.
    pub write_zeroes: bool,
    /// Largest write-zeroes request in sectors (`max_write_zeroes_sectors`).
    pub max_write_zeroes_sectors: u32,
}

/// A validated request; data descriptors are borrowed from the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// Read `len` bytes at `sector` into `data` (all device-writable).
    Read {
        sector: u64,
        data: &'a [Desc],
        len: u64,
    },
    /// Write `len` bytes from `data` (all device-readable) at `sector`.
    Write {
        sector: u64,
        data: &'a [Desc],
        len: u64,
    },
    /// Flush the write cache.
    Flush,
    /// Write the device ID (up to 20 bytes) into `data` (all device-writable).
    GetId { data: &'a [Desc] },
    /// Discard; the single 16-byte segment is in `segment` (device-readable).
    Discard { segment: Desc },
    /// Write zeroes; the single 16-byte segment is in `segment` (device-readable).
    WriteZeroes { segment: Desc },
}

/// Why a chain or request is rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// No usable status descriptor: nothing can be reported to the driver.
    #[error("descriptor chain has no device-writable status byte at its end")]
    NoStatus,
    /// The chain holds only a status descriptor.
    #[error("descriptor chain too short: {0} descriptor(s)")]
    TooShort(usize),
    /// More data descriptors than `seg_max`.
    #[error("{count} data descriptors exceed seg_max {max}")]
    TooManySegments { count: usize, max: u32 },
    /// A data descriptor is larger than `size_max`.
    #[error("data descriptor of {len} bytes exceeds size_max {max}")]
    SegmentTooLarge { len: u32, max: u32 },
    /// The header is device-writable or shorter than 16 bytes.
    #[error("request header descriptor is writable or shorter than 16 bytes")]
    BadHeader,
    /// A data descriptor has the wrong direction for the request type.
    #[error("data descriptor {index} has the wrong direction for request type {req_type}")]
    WrongDirection { index: usize, req_type: u32 },
    /// IN/OUT without data, or data not a multiple of 512 bytes.
    #[error("data length {0} is zero or not a multiple of 512")]
    BadDataLength(u64),
    /// The sector range is (partly) beyond the capacity.
    #[error("sectors {sector}+{nr_sectors} beyond capacity {capacity}")]
    OutOfRange {
        sector: u64,
        nr_sectors: u64,
        capacity: u64,
    },
    /// A modifying request on a read-only device.
    #[error("write-type request {0} on a read-only device")]
    ReadOnly(u32),
    /// Unknown or not offered request type.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// Discard/write-zeroes segment list of the wrong size (max_*_seg = 1).
    #[error("discard/write-zeroes payload of {0} bytes is not exactly one 16-byte segment")]
    BadSegmentList(u64),
    /// A write-zeroes request above `max_write_zeroes_sectors`.
    #[error("write-zeroes of {nr_sectors} sectors exceeds max_write_zeroes_sectors {max}")]
    WriteZeroesTooLarge { nr_sectors: u64, max: u32 },
    /// Unknown flag, or UNMAP on a discard.
    #[error("discard/write-zeroes flags {0:#x} not supported")]
    BadFlags(u32),
}

impl ParseError {
    /// The virtio status reported for a rejected request; `None` if there is no status byte.
    pub fn status(&self) -> Option<u8> {
        match self {
            ParseError::NoStatus => None,
            ParseError::Unsupported(_) | ParseError::BadFlags(_) => Some(VIRTIO_BLK_S_UNSUPP),
            ParseError::BadSegmentList(_) => Some(VIRTIO_BLK_S_UNSUPP),
            _ => Some(VIRTIO_BLK_S_IOERR),
        }
    }
}

/// The fixed part of a request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// `type`.
    pub req_type: u32,
    /// `sector` (512-byte units).
    pub sector: u64,
}

impl Header {
    /// Decode `struct virtio_blk_outhdr` (little-endian).
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Self {
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = *b;
        Header {
            req_type: u32::from_le_bytes([t0, t1, t2, t3]),
            sector: u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
        }
    }
}

/// The status descriptor of a chain: its last descriptor.
pub fn status_desc(descs: &[Desc]) -> Result<Desc, ParseError> {
    match descs.last() {
        // §5.2.6: "u8 status" is the final, device-writable byte of every request.
        Some(d) if d.writable && d.len >= 1 => Ok(*d),
        _ => Err(ParseError::NoStatus),
    }
}

/// Check the chain's shape; the header descriptor is `descs[0]`. Returns the data descriptors.
pub fn check_chain<'a>(descs: &'a [Desc], limits: &Limits) -> Result<&'a [Desc], ParseError> {
    status_desc(descs)?;
    let (header, rest) = match descs.split_first() {
        Some((h, rest)) if !rest.is_empty() => (h, rest),
        _ => return Err(ParseError::TooShort(descs.len())),
    };
    // §5.2.6: the header (type, reserved, sector) is device-readable and 16 bytes long.
    if header.writable || (header.len as usize) < HEADER_LEN {
        return Err(ParseError::BadHeader);
    }
    let data = rest.split_last().map(|(_, d)| d).unwrap_or(&[]);
    // §5.2.4: seg_max is the maximum number of segments in a request.
    if data.len() > limits.seg_max as usize {
        return Err(ParseError::TooManySegments {
            count: data.len(),
            max: limits.seg_max,
        });
    }
    // §5.2.4: size_max is the maximum size of any single segment.
    if limits.size_max != 0 {
        if let Some(d) = data.iter().find(|d| d.len > limits.size_max) {
            return Err(ParseError::SegmentTooLarge {
                len: d.len,
                max: limits.size_max,
            });
        }
    }
    Ok(data)
}

fn check_direction(data: &[Desc], writable: bool, req_type: u32) -> Result<u64, ParseError> {
    let mut total = 0u64;
    for (index, d) in data.iter().enumerate() {
        // §2.7.4.2: device-writable elements follow device-readable ones; §5.2.6 fixes each
        // request type's data direction (IN, GET_ID: writable; OUT, DISCARD, WRITE_ZEROES: readable).
        if d.writable != writable {
            return Err(ParseError::WrongDirection { index, req_type });
        }
        total = total.saturating_add(u64::from(d.len));
    }
    Ok(total)
}

fn check_range(sector: u64, nr_sectors: u64, limits: &Limits) -> Result<(), ParseError> {
    // §5.2.6.1: a driver MUST NOT submit a request beyond capacity.
    match sector.checked_add(nr_sectors) {
        Some(end) if end <= limits.capacity_sectors => Ok(()),
        _ => Err(ParseError::OutOfRange {
            sector,
            nr_sectors,
            capacity: limits.capacity_sectors,
        }),
    }
}

/// Parse a request from its header bytes and descriptor list (`descs[0]` holds the header,
/// the last descriptor the status byte).
pub fn parse<'a>(
    header: &[u8; HEADER_LEN],
    descs: &'a [Desc],
    limits: &Limits,
) -> Result<Request<'a>, ParseError> {
    let data = check_chain(descs, limits)?;
    let h = Header::from_bytes(header);
    match h.req_type {
        T_IN | T_OUT => {
            let is_in = h.req_type == T_IN;
            let len = check_direction(data, is_in, h.req_type)?;
            // §5.2.6.1: the length of data MUST be a multiple of 512 bytes for IN and OUT.
            if len == 0 || len % SECTOR_SIZE != 0 {
                return Err(ParseError::BadDataLength(len));
            }
            // §5.2.6.2: the device MUST set IOERR for a write request if F_RO is offered.
            if !is_in && limits.read_only {
                return Err(ParseError::ReadOnly(h.req_type));
            }
            check_range(h.sector, len / SECTOR_SIZE, limits)?;
            Ok(if is_in {
                Request::Read {
                    sector: h.sector,
                    data,
                    len,
                }
            } else {
                Request::Write {
                    sector: h.sector,
                    data,
                    len,
                }
            })
        }
        // §5.2.6: a flush carries no data; the sector field is ignored.
        T_FLUSH => Ok(Request::Flush),
        T_GET_ID => {
            check_direction(data, true, h.req_type)?;
            Ok(Request::GetId { data })
        }
        T_DISCARD | T_WRITE_ZEROES => {
            let offered = if h.req_type == T_DISCARD {
                limits.discard
            } else {
                limits.write_zeroes
            };
            // §5.2.6.2: unsupported (not negotiated) request types get VIRTIO_BLK_S_UNSUPP.
            if !offered {
                return Err(ParseError::Unsupported(h.req_type));
            }
            // §5.2.6.2: IOERR for any modifying request when F_RO is offered.
            if limits.read_only {
                return Err(ParseError::ReadOnly(h.req_type));
            }
            let len = check_direction(data, false, h.req_type)?;
            // §5.2.6.1: data is a multiple of the segment size, at most max_*_seg (= 1) segments.
            match data {
                [segment] if segment.len as usize == SEGMENT_LEN => {
                    Ok(if h.req_type == T_DISCARD {
                        Request::Discard { segment: *segment }
                    } else {
                        Request::WriteZeroes { segment: *segment }
                    })
                }
                _ => Err(ParseError::BadSegmentList(len)),
            }
        }
        // §5.2.6.2: the device MUST set VIRTIO_BLK_S_UNSUPP for unsupported request types.
        other => Err(ParseError::Unsupported(other)),
    }
}

/// Decode the single discard/write-zeroes segment of `req` into a [`BlockOp`].
pub fn parse_segment(
    req: &Request<'_>,
    seg: &[u8; SEGMENT_LEN],
    limits: &Limits,
) -> Result<BlockOp, ParseError> {
    let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = *seg;
    let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
    let nr_sectors = u64::from(u32::from_le_bytes([n0, n1, n2, n3]));
    let flags = u32::from_le_bytes([f0, f1, f2, f3]);
    // §5.2.6.2: UNSUPP if any unknown flag is set.
    if flags & !FLAG_UNMAP != 0 {
        return Err(ParseError::BadFlags(flags));
    }
    check_range(sector, nr_sectors, limits)?;
    match req {
        Request::Discard { .. } => {
            // §5.2.6.2: UNSUPP for discard commands with the unmap flag set.
            if flags & FLAG_UNMAP != 0 {
                return Err(ParseError::BadFlags(flags));
            }
            Ok(BlockOp::Discard { sector, nr_sectors })
        }
        // §5.2.6.1: a driver MUST NOT exceed max_write_zeroes_sectors. The limit bounds
        // what one request can make a backend hold (the clone target tracks every region).
        Request::WriteZeroes { .. } if nr_sectors > u64::from(limits.max_write_zeroes_sectors) => {
            Err(ParseError::WriteZeroesTooLarge {
                nr_sectors,
                max: limits.max_write_zeroes_sectors,
            })
        }
        Request::WriteZeroes { .. } => Ok(BlockOp::WriteZeroes {
            sector,
            nr_sectors,
            unmap: flags & FLAG_UNMAP != 0,
        }),
        _ => Err(ParseError::Unsupported(u32::MAX)),
    }
}

/// Fuzzing entry point: decode limits, a header, a segment and a descriptor list from
/// arbitrary bytes, run the parser and check its invariants (panics only if the parser
/// breaks one, which is a bug).
pub fn fuzz_parse(data: &[u8]) {
    let mut it = data.iter().copied();
    let mut next = || it.next().unwrap_or(0);
    let flags = next();
    let limits = Limits {
        capacity_sectors: u64::from_le_bytes([next(), next(), next(), 0, 0, 0, 0, 0])
            | if flags & 0x80 != 0 {
                u64::MAX - 0xffff
            } else {
                0
            },
        seg_max: u32::from(next() % 8),
        size_max: u32::from(next()) * 512,
        read_only: flags & 1 != 0,
        discard: flags & 2 != 0,
        write_zeroes: flags & 4 != 0,
        max_write_zeroes_sectors: u32::from(next()) << 4,
    };
    let mut header = [0u8; HEADER_LEN];
    header.iter_mut().for_each(|b| *b = next());
    // Make common request types likely.
    if let Some(t) = header.first_mut() {
        *t %= 16;
    }
    let mut seg = [0u8; SEGMENT_LEN];
    seg.iter_mut().for_each(|b| *b = next());
    let n = usize::from(next() % 12);
    let descs: Vec<Desc> = (0..n)
        .map(|_| {
            let len_sel = next();
            let len = match len_sel % 4 {
                0 => u32::from(len_sel) * 512 / 4,
                1 => 16,
                2 => 1,
                _ => u32::from_le_bytes([next(), next(), next(), 0]),
            };
            Desc {
                addr: u64::from_le_bytes([next(), next(), 0, 0, 0, 0, 0, 0]),
                len,
                writable: next() & 1 != 0,
            }
        })
        .collect();
    let result = parse(&header, &descs, &limits);
    match &result {
        Ok(Request::Read { sector, data, len }) | Ok(Request::Write { sector, data, len }) => {
            let want_writable = matches!(result, Ok(Request::Read { .. }));
            assert!(data.iter().all(|d| d.writable == want_writable));
            assert_eq!(*len, data.iter().map(|d| u64::from(d.len)).sum::<u64>());
            assert!(*len > 0 && len % SECTOR_SIZE == 0);
            assert!(sector + len / SECTOR_SIZE <= limits.capacity_sectors);
            assert!(data.len() <= limits.seg_max as usize);
            assert!(want_writable || !limits.read_only);
        }
        Ok(r @ (Request::Discard { .. } | Request::WriteZeroes { .. })) => {
            assert!(!limits.read_only);
            if let Ok(op) = parse_segment(r, &seg, &limits) {
                match op {
                    BlockOp::Discard { sector, nr_sectors }
                    | BlockOp::WriteZeroes {
                        sector, nr_sectors, ..
                    } => {
                        assert!(sector + nr_sectors <= limits.capacity_sectors)
                    }
                    _ => unreachable!("segment parser returned a non-range op"),
                }
            }
        }
        Ok(Request::GetId { data }) => assert!(data.iter().all(|d| d.writable)),
        Ok(Request::Flush) => {}
        Err(e) => {
            if e.status().is_some() {
                assert!(status_desc(&descs).is_ok());
            }
        }
    }
}

#[cfg(test)]
mod tests;
