//! The serving loop: one frontend at a time on a unix listener, until stopped.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use log::{info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::block::BlockBackend;
use crate::device::VhostUserBlk;

/// Default `max_write_zeroes_sectors`: 4 MiB per request (guests split larger ranges). A
/// backend may hold state per block of an in-flight write-zeroes (the clone target holds a
/// region lock per region until the zeroes land): with every queue slot full of maximal
/// requests, 4 MiB keeps that in the low hundreds of MiB.
pub const DEFAULT_MAX_WRITE_ZEROES_SECTORS: u32 = 8192;

/// How the device presents itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceOptions {
    /// Number of virtqueues (1..=64).
    pub num_queues: u16,
    /// Maximum size of each virtqueue.
    pub queue_size: u16,
    /// Number of vring worker threads; queues are spread over them.
    pub threads: usize,
    /// Serial returned by GET_ID (truncated to 20 bytes).
    pub serial: String,
    /// Most data segments per request.
    pub seg_max: u32,
    /// Largest data segment in bytes (0 = no limit, SIZE_MAX not offered).
    pub size_max: u32,
    /// Longest a queue thread busy-polls its rings after the last piece of work, in
    /// microseconds (adaptive, see [`crate::poll`]); 0 = always sleep in epoll.
    pub poll_us: u32,
    /// Poll whenever the window says so, without checking that polling completes more
    /// requests than sleeping (see [`crate::poll_tuner`]).
    pub poll_always: bool,
    /// Largest write-zeroes request in 512-byte sectors, offered and enforced.
    pub max_write_zeroes_sectors: u32,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            num_queues: 1,
            queue_size: 256,
            threads: 1,
            serial: String::new(),
            seg_max: 126,
            size_max: 1 << 20,
            poll_us: 0,
            poll_always: false,
            max_write_zeroes_sectors: DEFAULT_MAX_WRITE_ZEROES_SECTORS,
        }
    }
}

/// Failure of the serving loop.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Creating a queue worker of the backend failed.
    #[error("cannot create the block backend workers: {0}")]
    Workers(#[source] io::Error),
    /// Waiting for a connection or a stop request failed.
    #[error("waiting for a vhost-user connection failed: {0}")]
    Poll(#[source] io::Error),
    /// vhost-user-backend could not set up the daemon.
    #[error("cannot start the vhost-user daemon: {0}")]
    Daemon(String),
    /// Registering the worker eventfd in a vring thread's epoll failed.
    #[error("cannot register the worker eventfd of thread {thread}: {source}")]
    Register { thread: usize, source: io::Error },
}

struct StopInner {
    stopped: AtomicBool,
    event: EventFd,
    conn: Mutex<Option<ShutdownHandle>>,
}

/// Stops [`serve`] from any thread (e.g. a signal-handling thread). Idempotent.
#[derive(Clone)]
pub struct StopHandle {
    inner: Arc<StopInner>,
}

impl StopHandle {
    /// A new, not yet fired, stop handle.
    pub fn new() -> io::Result<Self> {
        Ok(StopHandle {
            inner: Arc::new(StopInner {
                stopped: AtomicBool::new(false),
                event: EventFd::new(EFD_NONBLOCK)?,
                conn: Mutex::new(None),
            }),
        })
    }

    /// Ask `serve` to shut the current connection down, drain and return.
    pub fn stop(&self) {
        if !self.inner.stopped.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.inner.event.write(1) {
                warn!("cannot signal the stop eventfd: {e}");
            }
        }
        let conn = self.inner.conn.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = conn.as_ref() {
            h.shutdown();
        }
    }

    /// Whether `stop` has been called.
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::Acquire)
    }

    fn set_conn(&self, h: Option<ShutdownHandle>) {
        *self.inner.conn.lock().unwrap_or_else(|e| e.into_inner()) = h;
    }
}

/// Wait until the listener is readable (`Ok(true)`) or stop fires (`Ok(false)`).
fn wait_for_client(listener: RawFd, stop: &StopHandle) -> io::Result<bool> {
    loop {
        if stop.is_stopped() {
            return Ok(false);
        }
        let mut fds = [
            libc::pollfd {
                fd: listener,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.inner.event.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid, writable array of two pollfd structs that outlives the call,
        // and the length passed matches it.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let [l, s] = fds;
        if s.revents != 0 || stop.is_stopped() {
            return Ok(false);
        }
        if l.revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            return Err(io::Error::other("listening socket failed"));
        }
        if l.revents != 0 {
            return Ok(true);
        }
    }
}

/// Serve one frontend from accept to disconnect (or stop).
fn serve_one<B: BlockBackend>(
    dev: &Arc<VhostUserBlk<B>>,
    listener: &mut Listener,
    stop: &StopHandle,
) -> Result<(), ServeError> {
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    dev.begin_connection(mem.clone());
    let mut daemon = VhostUserDaemon::new("vhost-user-blk".to_string(), dev.clone(), mem)
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
    let result = run_daemon(dev, &mut daemon, listener, stop);
    stop.set_conn(None);
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
    // Dropping the daemon joins its vring threads; then nobody else touches the workers.
    drop(daemon);
    dev.end_connection();
    result
}

fn run_daemon<B: BlockBackend>(
    dev: &Arc<VhostUserBlk<B>>,
    daemon: &mut VhostUserDaemon<Arc<VhostUserBlk<B>>>,
    listener: &mut Listener,
    stop: &StopHandle,
) -> Result<(), ServeError> {
    for (thread, h) in daemon.get_epoll_handlers().iter().enumerate() {
        let fd = dev.worker_fd(thread).ok_or(ServeError::Register {
            thread,
            source: io::Error::from(io::ErrorKind::NotFound),
        })?;
        h.register_listener(fd, EventSet::IN, dev.worker_event_id())
            .map_err(|source| ServeError::Register { thread, source })?;
    }
    daemon
        .start(listener)
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
    info!("vhost-user frontend connected");
    stop.set_conn(daemon.shutdown_handle());
    if stop.is_stopped() {
        daemon.request_shutdown();
    }
    match daemon.wait() {
        Ok(()) => info!("vhost-user frontend disconnected"),
        Err(DaemonError::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage,
        )) => info!("vhost-user frontend disconnected"),
        // A misbehaving frontend ends its own connection, not the daemon.
        Err(e) => warn!("vhost-user connection ended with an error: {e}"),
    }
    Ok(())
}

/// Serve frontends one after another on `listener` until `stop` fires; after the last
/// connection ends, every worker is drained. Returns Ok on orderly stop.
pub fn serve<B: BlockBackend>(
    backend: Arc<B>,
    opts: &DeviceOptions,
    listener: UnixListener,
    stop: &StopHandle,
) -> Result<(), ServeError> {
    serve_observed(backend, opts, listener, stop, None)
}

/// [`serve`], reporting every completed request to `observer`.
pub fn serve_observed<B: BlockBackend>(
    backend: Arc<B>,
    opts: &DeviceOptions,
    listener: UnixListener,
    stop: &StopHandle,
    observer: Option<Arc<dyn crate::block::RequestObserver>>,
) -> Result<(), ServeError> {
    let dev = Arc::new(
        VhostUserBlk::new(backend, opts)
            .map_err(ServeError::Workers)?
            .with_observer(observer),
    );
    let mut listener = Listener::from(listener);
    let result = loop {
        match wait_for_client(listener.as_raw_fd(), stop) {
            Ok(true) => {}
            Ok(false) => break Ok(()),
            Err(e) => break Err(ServeError::Poll(e)),
        }
        if let Err(e) = serve_one(&dev, &mut listener, stop) {
            break Err(e);
        }
    };
    dev.end_connection();
    result
}
