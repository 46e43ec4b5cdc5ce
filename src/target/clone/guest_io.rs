//! Guest-buffer I/O for the clone target: slicing a request's guest buffers by byte
//! range, and choosing the direct or the buffered descriptor of a file for one transfer.
//!
//! Guest buffers go straight to the kernel (no copy). When a transfer does not meet the
//! file's O_DIRECT alignment (a 512-byte guest I/O on a 4 KiB-aligned file, an odd buffer
//! address), it goes through the buffered descriptor of the same file instead; the kernel
//! keeps the two coherent (direct I/O writes back and invalidates the page cache range).

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};

use vhost_user_blk::GuestBuf;

use crate::io::DioAlign;

/// The iovecs covering bytes `[start, start + len)` of the concatenation of `bufs`.
/// Returns `None` if the range is not inside the buffers.
pub fn slice_iovecs(bufs: &[GuestBuf], start: usize, len: usize) -> Option<Vec<libc::iovec>> {
    let end = start.checked_add(len)?;
    let mut out = Vec::new();
    let mut pos = 0usize;
    for b in bufs {
        let b_end = pos.checked_add(b.len)?;
        if b_end > start && pos < end {
            let from = start.max(pos) - pos;
            let to = end.min(b_end) - pos;
            out.push(libc::iovec {
                // Pointer arithmetic inside one guest buffer: `from < b.len`.
                iov_base: b.ptr.wrapping_add(from).cast(),
                iov_len: to - from,
            });
        }
        pos = b_end;
        if pos >= end {
            break;
        }
    }
    (pos >= end).then_some(out)
}

/// Total length of the guest buffers.
pub fn total_len(bufs: &[GuestBuf]) -> Option<usize> {
    bufs.iter()
        .try_fold(0usize, |acc, b| acc.checked_add(b.len))
}

/// A file with its direct and buffered descriptors.
pub struct DualFd<'a> {
    /// The O_DIRECT descriptor (or buffered, if the filesystem refused O_DIRECT).
    pub direct: RawFd,
    /// Its alignment requirement.
    pub align: DioAlign,
    /// A buffered descriptor of the same file.
    pub buffered: &'a File,
}

impl DualFd<'_> {
    /// The descriptor to use for `iov` at `offset`.
    pub fn pick(&self, iov: &[libc::iovec], offset: u64) -> RawFd {
        let fits = iov
            .iter()
            .all(|v| self.align.fits(v.iov_base as usize, v.iov_len, offset));
        if fits {
            self.direct
        } else {
            self.buffered.as_raw_fd()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_across_buffers() {
        let mut a = [0u8; 1024];
        let mut b = [0u8; 512];
        let bufs = [
            GuestBuf {
                ptr: a.as_mut_ptr(),
                len: a.len(),
            },
            GuestBuf {
                ptr: b.as_mut_ptr(),
                len: b.len(),
            },
        ];
        let v = slice_iovecs(&bufs, 512, 1024).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].iov_len, 512);
        assert_eq!(v[0].iov_base as usize, a.as_ptr() as usize + 512);
        assert_eq!(v[1].iov_len, 512);
        assert_eq!(v[1].iov_base as usize, b.as_ptr() as usize);
        assert!(slice_iovecs(&bufs, 1024, 1024).is_none());
        assert_eq!(slice_iovecs(&bufs, 0, 1536).unwrap().len(), 2);
        assert_eq!(total_len(&bufs), Some(1536));
    }
}
