//! The hydration thread: an epoll-style loop (poll on the ring's eventfd and a wake
//! eventfd) that copies regions from the source to the destination with O_DIRECT
//! through aligned buffers, up to `hydration_threshold` regions in flight in batches of
//! up to `hydration_batch_size` contiguous regions. Commits run on their own thread
//! ([`super::committer`]), so copying goes on while the destination flushes.

use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_blk::SECTOR_SIZE;

use super::engine::{lock, MailItem, Shared, SourceIo};
use super::{BatchKind, Event, MetadataMode};
use crate::io::{AlignedBuf, EofPolicy, Ring, RingCompletion};
use crate::source::ReadDst;

/// Largest single read/write of a copy; bigger batches are copied in pieces.
const CHUNK_BYTES: u64 = 4 << 20;
const RING_ENTRIES: u32 = 128;
/// How soon to look again when background copies yield to guest I/O.
const BACKOFF_POLL_MS: i32 = 5;
/// With background hydration disabled, copy buffers are freed after this long without a copy.
const RELEASE_BUFFERS_AFTER: Duration = Duration::from_secs(1);

enum Phase {
    Reading,
    Writing,
}

struct CopyJob {
    regions: Range<u64>,
    kind: BatchKind,
    /// Next byte to copy and the end of the batch, on both devices.
    pos: u64,
    end: u64,
    chunk: u64,
    phase: Phase,
}

struct Hydrator {
    s: Arc<Shared>,
    ring: Ring,
    jobs: Vec<Option<CopyJob>>,
    spare: Vec<AlignedBuf>,
    /// When a copy was last in flight.
    last_copy: Instant,
}

/// Entry point of the thread.
pub fn run(s: Arc<Shared>) {
    let ring = match Ring::new(RING_ENTRIES) {
        Ok(r) => r,
        Err(e) => {
            log::error!("hydration thread: cannot create an io_uring: {e}; hydration disabled");
            s.set_mode(MetadataMode::Ro);
            return;
        }
    };
    let mut h = Hydrator {
        s,
        ring,
        jobs: Vec::new(),
        spare: Vec::new(),
        last_copy: Instant::now(),
    };
    h.run();
}

impl Hydrator {
    fn active(&self) -> usize {
        self.jobs.iter().filter(|j| j.is_some()).count()
    }

    fn run(&mut self) {
        let mut completions: Vec<RingCompletion> = Vec::new();
        loop {
            let stopping = self.s.stop.load(Ordering::SeqCst);
            if stopping && self.active() == 0 {
                break;
            }
            if !self.s.active.load(Ordering::SeqCst) {
                // Loaded beside a live target: wait to be made live (or stopped).
                self.wait();
                continue;
            }
            if !stopping && self.s.mode() == MetadataMode::Rw {
                while let Some(batch) = self.s.sched.next_batch(&self.s.map, &self.s.locks) {
                    self.start_job(batch.regions, batch.kind);
                }
            }
            if let Err(e) = self.ring.kick() {
                log::error!("hydration: submitting copies: {e}");
            }
            self.release_buffers_when_done();
            self.wait();
            self.ring.reap(&mut completions);
            let remote = std::mem::take(&mut *lock(&self.s.remote_copies));
            completions.extend(
                remote
                    .into_iter()
                    .map(|(slot, result, buf)| RingCompletion {
                        token: slot as u64,
                        result: result.map(|()| 0),
                        buf: Some(buf),
                    }),
            );
            for c in completions.drain(..) {
                self.on_completion(c);
            }
            if self.s.map.all_hydrated() && !self.s.complete_announced.load(Ordering::SeqCst) {
                // The commit thread announces completion after its commit.
                self.s.wake_committer();
            }
        }
    }

    /// Give the copy buffers back once no copy is in flight and none will start on its own:
    /// every region hydrated, or background hydration disabled and no copy (a guest's
    /// urgent one, say) for [`RELEASE_BUFFERS_AFTER`]. A busy pause keeps them, and so does
    /// on-demand copying, which would otherwise allocate and trim per copy.
    fn release_buffers_when_done(&mut self) {
        if self.active() > 0 {
            self.last_copy = Instant::now();
            return;
        }
        let done = self.s.map.all_hydrated()
            || (!self.s.sched.is_enabled() && self.last_copy.elapsed() >= RELEASE_BUFFERS_AFTER);
        if self.spare.is_empty() || !done {
            return;
        }
        let bytes: usize = self.spare.iter().map(AlignedBuf::len).sum();
        self.spare = Vec::new();
        // glibc keeps large freed blocks for reuse; hand them to the kernel.
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
        unsafe {
            libc::malloc_trim(0);
        }
        log::debug!("hydration: released {bytes} bytes of copy buffers");
    }

    fn wait(&self) {
        let mut fds = [
            libc::pollfd {
                fd: self.ring.event_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.s.hydrator_wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let backing_off = self.active() == 0
            && self.s.active.load(Ordering::SeqCst)
            && self.s.sched.is_enabled()
            && !self.s.sched.is_halted()
            && !self.s.map.all_hydrated()
            && self.s.mode() == MetadataMode::Rw;
        let timeout_ms = if backing_off {
            // Background copies wait while guest I/O is in flight: look again soon.
            BACKOFF_POLL_MS
        } else {
            1000
        };
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
        let _ = self.s.hydrator_wake.read();
    }

    fn byte_range(&self, regions: &Range<u64>) -> (u64, u64) {
        let rs = self.s.geo.region_sectors();
        let start = regions.start.saturating_mul(rs).saturating_mul(SECTOR_SIZE);
        let end = regions
            .end
            .saturating_mul(rs)
            .min(self.s.len)
            .saturating_mul(SECTOR_SIZE);
        (start, end)
    }

    fn start_job(&mut self, regions: Range<u64>, kind: BatchKind) {
        let (pos, end) = self.byte_range(&regions);
        let job = CopyJob {
            regions,
            kind,
            pos,
            end,
            chunk: 0,
            phase: Phase::Reading,
        };
        let slot = match self.jobs.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.jobs.push(None);
                self.jobs.len() - 1
            }
        };
        if let Some(s) = self.jobs.get_mut(slot) {
            *s = Some(job);
        }
        self.read_chunk(slot);
    }

    fn buffer(&mut self, len: usize) -> Result<AlignedBuf, String> {
        match self.spare.pop() {
            Some(b) if b.len() >= len => Ok(b),
            _ => {
                AlignedBuf::with_min_len(len).map_err(|e| format!("allocating a copy buffer: {e}"))
            }
        }
    }

    fn read_chunk(&mut self, slot: usize) {
        let Some(Some(job)) = self.jobs.get_mut(slot) else {
            return;
        };
        job.chunk = (job.end - job.pos).min(CHUNK_BYTES);
        job.phase = Phase::Reading;
        let (pos, chunk) = (job.pos, job.chunk);
        let len = chunk as usize;
        let buf = match self.buffer(len) {
            Ok(b) => b,
            Err(e) => return self.finish(slot, Err(e)),
        };
        let s = self.s.clone();
        let result = match &s.source {
            SourceIo::File { direct, buffered } => {
                if direct.align().fits(buf.as_ptr() as usize, len, pos) {
                    self.ring
                        .submit_read_buf(direct, pos, buf, len, EofPolicy::Error, slot as u64)
                } else {
                    self.ring.submit_read_buf(
                        buffered,
                        pos,
                        buf,
                        len,
                        EofPolicy::Error,
                        slot as u64,
                    )
                }
            }
            SourceIo::Nbd(pool) => {
                let done = s.clone();
                pool.read(
                    pos,
                    ReadDst::Buf(buf, len),
                    Box::new(move |dst, result| {
                        if let ReadDst::Buf(buf, _) = dst {
                            lock(&done.remote_copies).push((slot, result, buf));
                        }
                        done.wake_hydrator();
                    }),
                );
                Ok(())
            }
        };
        if let Err(e) = result {
            self.finish(slot, Err(format!("reading the source: {e}")));
        }
    }

    fn write_chunk(&mut self, slot: usize, buf: AlignedBuf) {
        let Some(Some(job)) = self.jobs.get_mut(slot) else {
            return;
        };
        job.phase = Phase::Writing;
        let (pos, len) = (job.pos, job.chunk as usize);
        let s = self.s.clone();
        let direct = s.dest.align().fits(buf.as_ptr() as usize, len, pos);
        let result = if direct {
            self.ring
                .submit_write_buf(&s.dest, pos, buf, len, slot as u64)
        } else {
            self.ring
                .submit_write_buf(&BufferedDest(&s.dest_buffered), pos, buf, len, slot as u64)
        };
        if let Err(e) = result {
            self.finish(slot, Err(format!("writing the destination: {e}")));
        }
    }

    fn on_completion(&mut self, c: RingCompletion) {
        let slot = usize::try_from(c.token).unwrap_or(usize::MAX);
        let Some(Some(job)) = self.jobs.get_mut(slot) else {
            log::error!("hydration: completion for unknown copy {}", c.token);
            return;
        };
        let reading = matches!(job.phase, Phase::Reading);
        let what = if reading {
            "reading the source"
        } else {
            "writing the destination"
        };
        match (c.result, c.buf) {
            (Ok(_), Some(buf)) if reading => self.write_chunk(slot, buf),
            (Ok(_), buf) => {
                self.spare.extend(buf);
                job.pos += job.chunk;
                self.s.copied_bytes.fetch_add(job.chunk, Ordering::Relaxed);
                if job.pos >= job.end {
                    self.finish(slot, Ok(()));
                } else {
                    self.read_chunk(slot);
                }
            }
            (Err(e), buf) => {
                self.spare.extend(buf);
                self.finish(slot, Err(format!("{what}: {e}")));
            }
        }
    }

    fn finish(&mut self, slot: usize, result: Result<(), String>) {
        let Some(job) = self.jobs.get_mut(slot).and_then(Option::take) else {
            return;
        };
        let s = &self.s;
        let n = job.regions.end - job.regions.start;
        match &result {
            Ok(()) => {
                s.map.mark_range(job.regions.clone());
                s.copied_regions.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                log::warn!(
                    "hydration: copy of regions {}..{} ({:?}) failed: {e}",
                    job.regions.start,
                    job.regions.end,
                    job.kind
                );
                s.events.publish(&Event::RegionError {
                    region: job.regions.start,
                    error: e.clone(),
                });
            }
        }
        let mut waited_on = false;
        for r in job.regions.clone() {
            for w in s.locks.finish_copy(r) {
                waited_on = true;
                let item = match &result {
                    Ok(()) => MailItem::Resume(w.req),
                    Err(e) => MailItem::Fail(w.req, format!("hydrating region {r}: {e}")),
                };
                w.mailbox.post(item);
            }
        }
        if waited_on && result.is_ok() {
            // a guest write may follow into these regions: commit on dm-clone's period
            s.note_guest_change();
        }
        s.sched.copy_done(n);
        match result {
            Ok(()) => s.sched.copy_succeeded(),
            Err(e) => {
                if let Some(event) = s.sched.copy_failed(&e) {
                    log::error!("hydration stopped: {event:?}");
                    s.events.publish(&event);
                }
            }
        }
    }
}

/// The destination's buffered descriptor, writable by the ring.
struct BufferedDest<'a>(&'a std::fs::File);

impl AsRawFd for BufferedDest<'_> {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl crate::io::WritableFd for BufferedDest<'_> {}
