//! A pool of NBD connections serving reads for the queue workers and the hydration thread.
//! Each connection has its own thread; a request's completion is a callback run on that
//! thread (the callers post it back to their own event loop).

use std::io;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost_user_blk::GuestBuf;

use super::nbd::{NbdAddr, NbdClient, NbdError};
use crate::io::AlignedBuf;

/// Where the bytes of a read go.
pub enum ReadDst {
    /// Guest buffers (kept mapped by the device until the request completes).
    Guest(Vec<GuestBuf>),
    /// An owned aligned buffer; the first `usize` bytes are filled.
    Buf(AlignedBuf, usize),
}

impl ReadDst {
    fn len(&self) -> usize {
        match self {
            ReadDst::Guest(bufs) => bufs.iter().map(|b| b.len).sum(),
            ReadDst::Buf(_, len) => *len,
        }
    }
}

type Done = Box<dyn FnOnce(ReadDst, io::Result<()>) + Send>;

struct Job {
    offset: u64,
    dst: ReadDst,
    done: Done,
}

/// Connections to one NBD export.
pub struct NbdPool {
    tx: Mutex<Option<Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    size: u64,
    addr: NbdAddr,
}

impl NbdPool {
    /// Open `connections` connections (at least one) to `addr`.
    pub fn connect(addr: &NbdAddr, connections: usize) -> Result<Arc<Self>, NbdError> {
        let mut clients = Vec::new();
        for _ in 0..connections.max(1) {
            clients.push(NbdClient::connect(addr)?);
        }
        let size = clients.first().map_or(0, NbdClient::size);
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::new();
        for (i, client) in clients.into_iter().enumerate() {
            let rx = rx.clone();
            let thread_addr = addr.clone();
            let t = std::thread::Builder::new()
                .name(format!("nbd-{i}"))
                .spawn(move || serve(client, &thread_addr, &rx))
                .map_err(|source| NbdError::Connect {
                    addr: addr.to_string(),
                    source,
                })?;
            threads.push(t);
        }
        Ok(Arc::new(NbdPool {
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
            size,
            addr: addr.clone(),
        }))
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The export's address.
    pub fn addr(&self) -> &NbdAddr {
        &self.addr
    }

    /// Read into `dst` at `offset`; `done` runs on a pool thread with the result.
    pub fn read(&self, offset: u64, dst: ReadDst, done: Done) {
        let job = Job { offset, dst, done };
        let sent = match &*self.tx.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(tx) => tx.send(job).map_err(|e| e.0),
            None => Err(job),
        };
        if let Err(job) = sent {
            (job.done)(job.dst, Err(io::Error::other("the NBD source is closed")));
        }
    }
}

impl Drop for NbdPool {
    fn drop(&mut self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        for t in self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = t.join();
        }
    }
}

fn serve(mut client: NbdClient, addr: &NbdAddr, rx: &Mutex<Receiver<Job>>) {
    let mut scratch = Vec::new();
    loop {
        if client.is_poisoned() {
            match NbdClient::connect(addr) {
                Ok(c) => client = c,
                Err(e) => log::warn!("NBD source: reconnecting: {e}"),
            }
        }
        let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        let Job {
            offset,
            mut dst,
            done,
        } = job;
        let len = dst.len();
        let result = match &mut dst {
            ReadDst::Buf(buf, n) => match buf.as_mut_slice().get_mut(..*n) {
                Some(slice) => read_retrying(&mut client, addr, offset, slice),
                None => Err(io::Error::other("read longer than its buffer")),
            },
            ReadDst::Guest(bufs) => {
                scratch.resize(len, 0);
                read_retrying(&mut client, addr, offset, &mut scratch).map(|()| {
                    let mut pos = 0;
                    for b in bufs.iter() {
                        let Some(src) = scratch.get(pos..pos + b.len) else {
                            break;
                        };
                        // SAFETY: `b` is a guest buffer of `b.len` bytes that the device keeps
                        // mapped and reserved for this request until it completes, which is
                        // after this callback's result has been posted back.
                        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), b.ptr, b.len) };
                        pos += b.len;
                    }
                })
            }
        };
        done(dst, result);
    }
}

/// Read; after a transport error (the connection is out of step, e.g. the server restarted)
/// reconnect and try once more. Errors the server reports are returned as they are.
fn read_retrying(
    client: &mut NbdClient,
    addr: &NbdAddr,
    offset: u64,
    buf: &mut [u8],
) -> io::Result<()> {
    match client.read_at(offset, buf) {
        Err(e) if client.is_poisoned() => match NbdClient::connect(addr) {
            Ok(fresh) => {
                *client = fresh;
                client.read_at(offset, buf).map_err(io::Error::other)
            }
            Err(_) => Err(io::Error::other(e)),
        },
        other => other.map_err(io::Error::other),
    }
}
