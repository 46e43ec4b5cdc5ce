//! Metadata devices: 4 KiB block I/O over a file, memory, or a fault-injecting wrapper.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::error::PdataError;

/// Metadata block size in bytes (fixed by the format, spec §1).
pub const BLOCK_SIZE: usize = 4096;
/// One metadata block.
pub type Block = [u8; BLOCK_SIZE];

/// Byte offset of block `b`, checked.
fn offset_of(b: u64) -> Option<u64> {
    b.checked_mul(BLOCK_SIZE as u64)
}

/// A device holding 4 KiB metadata blocks.
pub trait MetaDevice: Send {
    /// Reads block `b`.
    fn read_block(&self, b: u64, buf: &mut Block) -> Result<(), PdataError>;
    /// Reads consecutive blocks `start..start+bufs.len()`; implementations may batch.
    fn read_run(&self, start: u64, bufs: &mut [Block]) -> Result<(), PdataError> {
        let mut b = start;
        for buf in bufs.iter_mut() {
            self.read_block(b, buf)?;
            b = b.saturating_add(1);
        }
        Ok(())
    }
    /// Writes block `b`.
    fn write_block(&mut self, b: u64, buf: &Block) -> Result<(), PdataError>;
    /// Makes all previous writes durable.
    fn flush(&mut self) -> Result<(), PdataError>;
    /// Number of whole blocks on the device.
    fn nr_blocks(&self) -> u64;
}

impl<D: MetaDevice + ?Sized> MetaDevice for Box<D> {
    fn read_block(&self, b: u64, buf: &mut Block) -> Result<(), PdataError> {
        (**self).read_block(b, buf)
    }
    fn read_run(&self, start: u64, bufs: &mut [Block]) -> Result<(), PdataError> {
        (**self).read_run(start, bufs)
    }
    fn write_block(&mut self, b: u64, buf: &Block) -> Result<(), PdataError> {
        (**self).write_block(b, buf)
    }
    fn flush(&mut self) -> Result<(), PdataError> {
        (**self).flush()
    }
    fn nr_blocks(&self) -> u64 {
        (**self).nr_blocks()
    }
}

fn out_of_range(b: u64, nr_blocks: u64) -> PdataError {
    PdataError::OutOfRange {
        what: "device access",
        block: b,
        nr_blocks,
    }
}

/// A file or block device accessed with pread/pwrite/fdatasync.
pub struct FileDevice {
    file: File,
    nr_blocks: u64,
}

impl FileDevice {
    /// Opens `path` (read-write when `writable`).
    pub fn open(path: &Path, writable: bool) -> Result<Self, PdataError> {
        let io = |source| PdataError::Io {
            step: "open metadata device",
            block: 0,
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(io)?;
        let len = file.seek(SeekFrom::End(0)).map_err(io)?;
        Ok(FileDevice {
            file,
            nr_blocks: len / BLOCK_SIZE as u64,
        })
    }
}

impl MetaDevice for FileDevice {
    fn read_block(&self, b: u64, buf: &mut Block) -> Result<(), PdataError> {
        self.read_run(b, std::slice::from_mut(buf))
    }
    fn read_run(&self, start: u64, bufs: &mut [Block]) -> Result<(), PdataError> {
        let end = start.checked_add(bufs.len() as u64);
        match (offset_of(start), end) {
            (Some(off), Some(end)) if end <= self.nr_blocks => self
                .file
                .read_exact_at(bufs.as_flattened_mut(), off)
                .map_err(|source| PdataError::Io {
                    step: "read metadata block",
                    block: start,
                    source,
                }),
            _ => Err(out_of_range(start, self.nr_blocks)),
        }
    }
    fn write_block(&mut self, b: u64, buf: &Block) -> Result<(), PdataError> {
        match offset_of(b) {
            Some(off) if b < self.nr_blocks => {
                self.file
                    .write_all_at(buf, off)
                    .map_err(|source| PdataError::Io {
                        step: "write metadata block",
                        block: b,
                        source,
                    })
            }
            _ => Err(out_of_range(b, self.nr_blocks)),
        }
    }
    fn flush(&mut self) -> Result<(), PdataError> {
        self.file.sync_data().map_err(|source| PdataError::Io {
            step: "flush metadata device",
            block: 0,
            source,
        })
    }
    fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }
}

/// An in-memory device. Clones share the same storage, so a test can keep a handle and
/// inspect the bytes after giving a clone to the metadata.
#[derive(Clone, Default)]
pub struct MemDevice {
    data: Arc<Mutex<Vec<u8>>>,
}

impl MemDevice {
    /// A zeroed device of `nr_blocks` blocks.
    pub fn zeroed(nr_blocks: u64) -> Self {
        let len = usize::try_from(nr_blocks)
            .unwrap_or(0)
            .saturating_mul(BLOCK_SIZE);
        Self::from_bytes(vec![0; len])
    }
    /// A device over `bytes` (a trailing partial block is ignored).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        MemDevice {
            data: Arc::new(Mutex::new(bytes)),
        }
    }
    /// A copy of the current contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn range(b: u64, len: usize, nr_blocks: u64) -> Result<std::ops::Range<usize>, PdataError> {
        let start = usize::try_from(b)
            .ok()
            .and_then(|b| b.checked_mul(BLOCK_SIZE));
        match start.and_then(|s| s.checked_add(len).map(|e| s..e)) {
            Some(r) if r.end <= usize::try_from(nr_blocks).unwrap_or(0) * BLOCK_SIZE => Ok(r),
            _ => Err(out_of_range(b, nr_blocks)),
        }
    }
}

impl MetaDevice for MemDevice {
    fn read_block(&self, b: u64, buf: &mut Block) -> Result<(), PdataError> {
        self.read_run(b, std::slice::from_mut(buf))
    }
    fn read_run(&self, start: u64, bufs: &mut [Block]) -> Result<(), PdataError> {
        let out = bufs.as_flattened_mut();
        let r = Self::range(start, out.len(), self.nr_blocks())?;
        let data = self.lock();
        match data.get(r) {
            Some(src) => {
                out.copy_from_slice(src);
                Ok(())
            }
            None => Err(out_of_range(start, self.nr_blocks())),
        }
    }
    fn write_block(&mut self, b: u64, buf: &Block) -> Result<(), PdataError> {
        let r = Self::range(b, BLOCK_SIZE, self.nr_blocks())?;
        let mut data = self.lock();
        match data.get_mut(r) {
            Some(dst) => {
                dst.copy_from_slice(buf);
                Ok(())
            }
            None => Err(out_of_range(b, self.nr_blocks())),
        }
    }
    fn flush(&mut self) -> Result<(), PdataError> {
        Ok(())
    }
    fn nr_blocks(&self) -> u64 {
        (self.lock().len() / BLOCK_SIZE) as u64
    }
}

/// Wraps a device and lets only the first `allowed_writes` block writes through. Later writes
/// (and flushes after a dropped write) are silently dropped, simulating a power cut, or fail
/// with an I/O error when `fail_instead` is set.
pub struct FaultyDevice<D> {
    inner: D,
    allowed_writes: u64,
    writes_seen: Arc<Mutex<u64>>,
    fail_instead: bool,
}

impl<D: MetaDevice> FaultyDevice<D> {
    /// Wraps `inner`, allowing `allowed_writes` writes.
    pub fn new(inner: D, allowed_writes: u64, fail_instead: bool) -> Self {
        FaultyDevice {
            inner,
            allowed_writes,
            writes_seen: Arc::new(Mutex::new(0)),
            fail_instead,
        }
    }
    /// A shared counter of attempted writes.
    pub fn counter(&self) -> Arc<Mutex<u64>> {
        Arc::clone(&self.writes_seen)
    }
}

impl<D: MetaDevice> MetaDevice for FaultyDevice<D> {
    fn read_block(&self, b: u64, buf: &mut Block) -> Result<(), PdataError> {
        self.inner.read_block(b, buf)
    }
    fn read_run(&self, start: u64, bufs: &mut [Block]) -> Result<(), PdataError> {
        self.inner.read_run(start, bufs)
    }
    fn write_block(&mut self, b: u64, buf: &Block) -> Result<(), PdataError> {
        let mut seen = self.writes_seen.lock().unwrap_or_else(|e| e.into_inner());
        *seen = seen.saturating_add(1);
        if *seen <= self.allowed_writes {
            self.inner.write_block(b, buf)
        } else if self.fail_instead {
            Err(PdataError::Io {
                step: "write metadata block (injected fault)",
                block: b,
                source: std::io::Error::other("injected write failure"),
            })
        } else {
            Ok(())
        }
    }
    fn flush(&mut self) -> Result<(), PdataError> {
        self.inner.flush()
    }
    fn nr_blocks(&self) -> u64 {
        self.inner.nr_blocks()
    }
}
