//! Heap buffers aligned for direct I/O.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Alignment of every [`AlignedBuf`]: a page, enough for any direct-I/O memory requirement.
pub const BUF_ALIGN: usize = 4096;

/// The length of an [`AlignedBuf`] is a multiple of this.
pub const BUF_LEN_MULTIPLE: usize = 512;

/// Why an [`AlignedBuf`] could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AlignedBufError {
    /// The length is zero or not a multiple of 512.
    #[error("aligned buffer length {0} must be a non-zero multiple of 512")]
    BadLength(usize),
    /// The allocator refused.
    #[error("out of memory allocating an aligned buffer of {0} bytes")]
    OutOfMemory(usize),
}

/// A zeroed heap buffer whose start is aligned to [`BUF_ALIGN`] and whose length is a
/// non-zero multiple of [`BUF_LEN_MULTIPLE`]. Its address never changes while it lives, so
/// it can be handed to the kernel for asynchronous I/O by whoever owns it.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf uniquely owns its allocation (like a Box<[u8]>); nothing is shared.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads through `as_slice`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocate a zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> Result<Self, AlignedBufError> {
        if len == 0 || !len.is_multiple_of(BUF_LEN_MULTIPLE) {
            return Err(AlignedBufError::BadLength(len));
        }
        let layout = Self::layout(len)?;
        // SAFETY: the layout has a non-zero size (checked above).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or(AlignedBufError::OutOfMemory(len))?;
        Ok(Self { ptr, len })
    }

    /// Allocate a zeroed buffer of at least `len` bytes, rounded up to a multiple of 512.
    pub fn with_min_len(len: usize) -> Result<Self, AlignedBufError> {
        let rounded = len
            .max(1)
            .checked_next_multiple_of(BUF_LEN_MULTIPLE)
            .ok_or(AlignedBufError::BadLength(len))?;
        Self::new(rounded)
    }

    fn layout(len: usize) -> Result<Layout, AlignedBufError> {
        Layout::from_size_align(len, BUF_ALIGN).map_err(|_| AlignedBufError::BadLength(len))
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: an `AlignedBuf` is never empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The contents.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to `len` initialised (zeroed at allocation) bytes that we own;
        // the returned borrow ties the slice to `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The contents, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Start address, for handing to the kernel.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Start address, mutable, for handing to the kernel.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Set every byte to zero.
    pub fn zero(&mut self) {
        self.as_mut_slice().fill(0);
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Ok(layout) = Self::layout(self.len) {
            // SAFETY: ptr was allocated in `new` with exactly this layout and is freed once.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_writable() {
        let mut b = AlignedBuf::new(8192).unwrap();
        assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice()[8191] = 7;
        assert_eq!(b.as_slice()[8191], 7);
        b.zero();
        assert_eq!(b.as_slice()[8191], 0);
    }

    #[test]
    fn bad_lengths_refused() {
        assert_eq!(
            AlignedBuf::new(0).unwrap_err(),
            AlignedBufError::BadLength(0)
        );
        assert_eq!(
            AlignedBuf::new(513).unwrap_err(),
            AlignedBufError::BadLength(513)
        );
        assert_eq!(AlignedBuf::with_min_len(1).unwrap().len(), 512);
        assert_eq!(AlignedBuf::with_min_len(0).unwrap().len(), 512);
        assert_eq!(AlignedBuf::with_min_len(1025).unwrap().len(), 1536);
    }
}
