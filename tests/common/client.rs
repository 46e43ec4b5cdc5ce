//! A synchronous libblkio (`blkio` crate) client for tests: the VM-less vhost-user-blk
//! frontend. Every call waits for its completion.
#![allow(dead_code)]

use std::mem::MaybeUninit;
use std::path::Path;

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};

/// Size of the client's shared buffer region.
pub const REGION: usize = 8 << 20;

pub struct Client {
    pub blkio: Blkio,
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
}

fn wait_one(q: &mut Blkioq) -> i32 {
    let mut c = [MaybeUninit::<blkio::Completion>::uninit()];
    match q.do_io(&mut c, 1, None, None) {
        // SAFETY: do_io initialised the first `n` (= 1) completions.
        Ok(1) => unsafe { c[0].assume_init_read() }.ret,
        other => panic!("do_io: {other:?}"),
    }
}

impl Client {
    pub fn connect(path: &Path, num_queues: i32) -> Client {
        Self::connect_opts(path, num_queues, false)
    }

    pub fn connect_opts(path: &Path, num_queues: i32, read_only: bool) -> Client {
        let mut blkio = Blkio::new("virtio-blk-vhost-user").expect("blkio new");
        blkio
            .set_str("path", path.to_str().expect("utf-8 path"))
            .expect("path");
        blkio.set_bool("read-only", read_only).expect("read-only");
        blkio.connect().expect("connect");
        blkio.set_i32("num-queues", num_queues).expect("num-queues");
        let queues = blkio.start().expect("start").queues;
        let region = blkio.alloc_mem_region(REGION).expect("alloc");
        blkio.map_mem_region(&region).expect("map");
        Client {
            blkio,
            queues,
            region,
        }
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").expect("capacity")
    }

    fn buf(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(off + len <= self.region.len);
        // SAFETY: the region is mapped for the client's life and `off + len` is inside it;
        // callers use it for one request at a time.
        unsafe { std::slice::from_raw_parts_mut((self.region.addr + off) as *mut u8, len) }
    }

    /// Write `data` at byte `offset` through queue `q`; returns the request's `ret`.
    pub fn write(&mut self, q: usize, offset: u64, data: &[u8]) -> i32 {
        self.buf(0, data.len()).copy_from_slice(data);
        let ptr = self.region.addr as *const u8;
        self.queues[q].write(offset, ptr, data.len(), 0, ReqFlags::empty());
        wait_one(&mut self.queues[q])
    }

    /// Read `len` bytes at byte `offset`.
    pub fn read(&mut self, q: usize, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        let ptr = self.region.addr as *mut u8;
        self.buf(0, len).fill(0xEE);
        self.queues[q].read(offset, ptr, len, 0, ReqFlags::empty());
        match wait_one(&mut self.queues[q]) {
            0 => Ok(self.buf(0, len).to_vec()),
            e => Err(e),
        }
    }

    pub fn flush(&mut self, q: usize) -> i32 {
        self.queues[q].flush(0, ReqFlags::empty());
        wait_one(&mut self.queues[q])
    }

    pub fn discard(&mut self, q: usize, offset: u64, len: u64) -> i32 {
        self.queues[q].discard(offset, len, 0, ReqFlags::empty());
        wait_one(&mut self.queues[q])
    }

    pub fn write_zeroes(&mut self, q: usize, offset: u64, len: u64) -> i32 {
        self.queues[q].write_zeroes(offset, len, 0, ReqFlags::empty());
        wait_one(&mut self.queues[q])
    }
}
