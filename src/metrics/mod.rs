//! Prometheus metrics: per-queue request counters and latency histograms (atomics, one cache-line
//! aligned block per queue), gauges supplied by the live target through [`MetricsSource`], and a
//! tiny std-only HTTP/1.1 server for `GET /metrics` on a loopback TCP port or a unix socket.
//!
//! Hot path: a queue worker calls [`QueueMetrics::record`] once per completed request; that is a few
//! relaxed atomic adds on a block no other queue touches. Rendering (a scrape) reads the atomics
//! and takes one uncontended lock for the target's source.
//!
//! Output is the Prometheus text exposition format 0.0.4.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use vhost_user_blk::poll_tuner::ProbeResult;

mod http;

pub use http::{
    parse_response, route, scrape, unix_path, MetricsAddr, MetricsError, MetricsServer,
    MetricsServerOptions, Route,
};

/// Number of finite latency buckets: upper bounds 1 µs, 2 µs, 4 µs, ... 2^(N-1) µs (~8.4 s).
pub const LATENCY_BUCKETS: usize = 24;

/// The kind of a completed virtio-blk request, for the per-queue counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    /// GET_ID and anything else that moves no data.
    Other,
}

impl RequestKind {
    const ALL: [RequestKind; 6] = [
        RequestKind::Read,
        RequestKind::Write,
        RequestKind::Flush,
        RequestKind::Discard,
        RequestKind::WriteZeroes,
        RequestKind::Other,
    ];

    /// The `op` label value.
    pub fn label(self) -> &'static str {
        match self {
            RequestKind::Read => "read",
            RequestKind::Write => "write",
            RequestKind::Flush => "flush",
            RequestKind::Discard => "discard",
            RequestKind::WriteZeroes => "write_zeroes",
            RequestKind::Other => "other",
        }
    }

    fn index(self) -> usize {
        match self {
            RequestKind::Read => 0,
            RequestKind::Write => 1,
            RequestKind::Flush => 2,
            RequestKind::Discard => 3,
            RequestKind::WriteZeroes => 4,
            RequestKind::Other => 5,
        }
    }
}

impl From<&vhost_user_blk::BlockOp> for RequestKind {
    fn from(op: &vhost_user_blk::BlockOp) -> Self {
        use vhost_user_blk::BlockOp;
        match op {
            BlockOp::Read { .. } => RequestKind::Read,
            BlockOp::Write { .. } => RequestKind::Write,
            BlockOp::Flush => RequestKind::Flush,
            BlockOp::Discard { .. } => RequestKind::Discard,
            BlockOp::WriteZeroes { .. } => RequestKind::WriteZeroes,
        }
    }
}

/// Counters and latency histogram of one virtqueue. Aligned to a cache line so that two queues'
/// workers never write the same line.
#[repr(align(64))]
#[derive(Debug, Default)]
pub struct QueueMetrics {
    requests: [AtomicU64; 6],
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
    /// Non-cumulative counts; index `LATENCY_BUCKETS` is the overflow (`+Inf` only) bucket.
    latency: [AtomicU64; LATENCY_BUCKETS + 1],
    latency_sum_us: AtomicU64,
}

/// Index of the bucket for `us` microseconds: the smallest `i` with `us <= 2^i`, or the overflow.
fn bucket_index(us: u64) -> usize {
    if us <= 1 {
        return 0;
    }
    let i = 64 - (us - 1).leading_zeros();
    usize::try_from(i).map_or(LATENCY_BUCKETS, |i| i.min(LATENCY_BUCKETS))
}

/// Upper bound of finite bucket `i`, in microseconds.
fn bucket_bound_us(i: usize) -> u64 {
    1u64 << i.min(63)
}

impl QueueMetrics {
    /// Record one completed request: its kind, the data bytes it moved (0 for flush/discard/...),
    /// how long it took from pop to completion, and whether it completed with `VIRTIO_BLK_S_OK`.
    /// Bytes are counted only for successful reads and writes.
    pub fn record(&self, kind: RequestKind, bytes: u64, latency: Duration, ok: bool) {
        if let Some(c) = self.requests.get(kind.index()) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if ok {
            match kind {
                RequestKind::Read => {
                    self.bytes_read.fetch_add(bytes, Ordering::Relaxed);
                }
                RequestKind::Write => {
                    self.bytes_written.fetch_add(bytes, Ordering::Relaxed);
                }
                _ => {}
            }
        } else {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.observe_latency(latency);
    }

    /// Add one latency observation to the histogram only.
    pub fn observe_latency(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        if let Some(b) = self.latency.get(bucket_index(us)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Count one failed request that never reached [`record`](Self::record) (e.g. a malformed
    /// descriptor chain answered with `VIRTIO_BLK_S_IOERR`/`UNSUPP` by the parser).
    pub fn record_error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests of `kind` seen so far.
    pub fn requests(&self, kind: RequestKind) -> u64 {
        self.requests
            .get(kind.index())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Bytes read by successful READ requests.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Bytes written by successful WRITE requests.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written.load(Ordering::Relaxed)
    }

    /// Failed requests.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// A consistent-enough copy of the histogram: cumulative counts per finite bucket, total count
    /// (equal to the `+Inf` bucket by construction) and sum in microseconds.
    pub fn latency_snapshot(&self) -> LatencySnapshot {
        let mut cumulative = [0u64; LATENCY_BUCKETS];
        let mut acc = 0u64;
        for (i, slot) in cumulative.iter_mut().enumerate() {
            acc = acc.saturating_add(self.latency.get(i).map_or(0, |b| b.load(Ordering::Relaxed)));
            *slot = acc;
        }
        let overflow = self
            .latency
            .get(LATENCY_BUCKETS)
            .map_or(0, |b| b.load(Ordering::Relaxed));
        LatencySnapshot {
            cumulative,
            count: acc.saturating_add(overflow),
            sum_us: self.latency_sum_us.load(Ordering::Relaxed),
        }
    }
}

/// See [`QueueMetrics::latency_snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencySnapshot {
    /// `cumulative[i]` = observations `<= 2^i` µs.
    pub cumulative: [u64; LATENCY_BUCKETS],
    pub count: u64,
    pub sum_us: u64,
}

/// Name, help, getter of a per-queue counter family.
type PerQueueFamily = (&'static str, &'static str, fn(&QueueMetrics) -> u64);

/// Something that appends its own metric families (with `# HELP`/`# TYPE`) to a scrape, e.g. the
/// clone target's hydration gauges. Implemented by the integrator; called on the scraping thread,
/// so it must not block on guest I/O.
pub trait MetricsSource: Send + Sync {
    fn render(&self, out: &mut String);
}

/// The daemon's metrics: one [`QueueMetrics`] per virtqueue plus an optional target source that can
/// be swapped when the table is.
pub struct MetricsRegistry {
    queues: Box<[QueueMetrics]>,
    source: RwLock<Option<Arc<dyn MetricsSource>>>,
    /// Per queue thread: probes done and the last one's result (written once per probe).
    poll_probes: Mutex<Vec<(u64, Option<ProbeResult>)>>,
}

impl std::fmt::Debug for MetricsRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsRegistry")
            .field("queues", &self.queues.len())
            .finish_non_exhaustive()
    }
}

impl MetricsRegistry {
    /// A registry for `num_queues` virtqueues.
    pub fn new(num_queues: usize) -> Self {
        let queues = (0..num_queues).map(|_| QueueMetrics::default()).collect();
        Self {
            queues,
            source: RwLock::new(None),
            poll_probes: Mutex::new(Vec::new()),
        }
    }

    /// Metrics block of queue `idx` (`None` when out of range). Hand each worker its own `&QueueMetrics`
    /// (or the `Arc<MetricsRegistry>` plus its index) once, at setup.
    pub fn queue(&self, idx: usize) -> Option<&QueueMetrics> {
        self.queues.get(idx)
    }

    /// Record a completed request on queue `queue` (ignored when out of range). Same meaning as
    /// [`QueueMetrics::record`]; for callers that hold the registry rather than the queue's block.
    pub fn observe(
        &self,
        queue: usize,
        kind: RequestKind,
        bytes: u64,
        latency: Duration,
        ok: bool,
    ) {
        if let Some(q) = self.queues.get(queue) {
            q.record(kind, bytes, latency, ok);
        }
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Install (or, with `None`, remove) the target's metrics source. Call on every table swap.
    pub fn set_source(&self, source: Option<Arc<dyn MetricsSource>>) {
        *self.source.write().unwrap_or_else(|e| e.into_inner()) = source;
    }

    /// The whole scrape in Prometheus text format 0.0.4.
    pub fn render_prometheus(&self) -> String {
        let mut out = String::with_capacity(4096 + self.queues.len() * 4096);
        write_family(
            &mut out,
            "vhost_clone_requests_total",
            "Completed virtio-blk requests by queue and operation.",
            "counter",
        );
        for (q, m) in self.queues.iter().enumerate() {
            for kind in RequestKind::ALL {
                let _ = writeln!(
                    out,
                    "vhost_clone_requests_total{{queue=\"{q}\",op=\"{}\"}} {}",
                    kind.label(),
                    m.requests(kind)
                );
            }
        }
        let per_queue: [PerQueueFamily; 3] = [
            (
                "vhost_clone_read_bytes_total",
                "Bytes read by successful READ requests.",
                QueueMetrics::bytes_read,
            ),
            (
                "vhost_clone_written_bytes_total",
                "Bytes written by successful WRITE requests.",
                QueueMetrics::bytes_written,
            ),
            (
                "vhost_clone_request_errors_total",
                "Requests completed with an error status.",
                QueueMetrics::errors,
            ),
        ];
        for (name, help, get) in per_queue {
            write_family(&mut out, name, help, "counter");
            for (q, m) in self.queues.iter().enumerate() {
                let _ = writeln!(out, "{name}{{queue=\"{q}\"}} {}", get(m));
            }
        }
        let hist = "vhost_clone_request_duration_seconds";
        write_family(
            &mut out,
            hist,
            "Request latency from pop to completion (log2 buckets from 1us).",
            "histogram",
        );
        for (q, m) in self.queues.iter().enumerate() {
            let snap = m.latency_snapshot();
            for (i, c) in snap.cumulative.iter().enumerate() {
                let le = micros_to_seconds(bucket_bound_us(i));
                let _ = writeln!(out, "{hist}_bucket{{queue=\"{q}\",le=\"{le}\"}} {c}");
            }
            let _ = writeln!(
                out,
                "{hist}_bucket{{queue=\"{q}\",le=\"+Inf\"}} {}",
                snap.count
            );
            let _ = writeln!(
                out,
                "{hist}_sum{{queue=\"{q}\"}} {}",
                micros_to_seconds(snap.sum_us)
            );
            let _ = writeln!(out, "{hist}_count{{queue=\"{q}\"}} {}", snap.count);
        }
        self.render_poll_probes(&mut out);
        let source = self
            .source
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(src) = source {
            src.render(&mut out);
        }
        out
    }
}

impl MetricsRegistry {
    /// Record a finished polling probe of queue thread `thread`.
    pub fn poll_probed(&self, thread: usize, result: ProbeResult) {
        let mut v = self.poll_probes.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() <= thread {
            v.resize(thread + 1, (0, None));
        }
        if let Some(slot) = v.get_mut(thread) {
            slot.0 += 1;
            slot.1 = Some(result);
        }
    }

    fn render_poll_probes(&self, out: &mut String) {
        let v = self
            .poll_probes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        write_family(
            out,
            "vhost_clone_poll_probes_total",
            "Probes of whether busy-polling completes more requests than sleeping, by queue thread.",
            "counter",
        );
        for (t, (n, _)) in v.iter().enumerate() {
            let _ = writeln!(out, "vhost_clone_poll_probes_total{{thread=\"{t}\"}} {n}");
        }
        write_family(
            out,
            "vhost_clone_polling",
            "1 if the last probe chose busy-polling for this queue thread, 0 if it chose sleeping.",
            "gauge",
        );
        for (t, (_, r)) in v.iter().enumerate() {
            if let Some(r) = r {
                let _ = writeln!(
                    out,
                    "vhost_clone_polling{{thread=\"{t}\"}} {}",
                    u8::from(r.polling)
                );
            }
        }
        write_family(
            out,
            "vhost_clone_poll_probe_requests_per_second",
            "Requests per second the last probe measured with polling allowed and without.",
            "gauge",
        );
        for (t, (_, r)) in v.iter().enumerate() {
            if let Some(r) = r {
                for (mode, rate) in [
                    ("polling", r.rate_polling),
                    ("sleeping", r.rate_not_polling),
                ] {
                    let _ = writeln!(
                        out,
                        "vhost_clone_poll_probe_requests_per_second{{thread=\"{t}\",mode=\"{mode}\"}} {rate}"
                    );
                }
            }
        }
    }
}

fn micros_to_seconds(us: u64) -> f64 {
    // Exact for bucket bounds; sums beyond 2^53 µs (285 years) lose precision, which is fine.
    let secs = us / 1_000_000;
    let frac = us % 1_000_000;
    let secs = u32::try_from(secs).map_or(f64::from(u32::MAX), f64::from);
    let frac = u32::try_from(frac).map_or(0.0, f64::from);
    secs + frac / 1_000_000.0
}

/// Append `# HELP` and `# TYPE` lines.
pub fn write_family(out: &mut String, name: &str, help: &str, kind: &str) {
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Append one unlabelled gauge family.
pub fn write_gauge(out: &mut String, name: &str, help: &str, value: f64) {
    write_family(out, name, help, "gauge");
    let _ = writeln!(out, "{name} {}", fmt_value(value));
}

/// Append one unlabelled counter family (`name` should end in `_total`).
pub fn write_counter(out: &mut String, name: &str, help: &str, value: u64) {
    write_family(out, name, help, "counter");
    let _ = writeln!(out, "{name} {value}");
}

fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{v}")
    }
}

/// The clone target's figures, as the integrator reads them from `Shared` (status + failure stats +
/// commit counter). `render` writes them with fixed names; implement [`MetricsSource`] by filling
/// this struct and calling [`CloneGauges::render`].
#[derive(Debug, Clone, PartialEq)]
pub struct CloneGauges {
    pub hydrated_regions: u64,
    pub total_regions: u64,
    pub hydrating_regions: u64,
    pub region_bytes: u64,
    pub copied_bytes: u64,
    pub copy_failures: u64,
    pub commits: u64,
    /// `"rw"`, `"ro"` or `"Fail"` (`MetadataMode::as_status_str`).
    pub metadata_mode: &'static str,
    /// Background hydration enabled (not `no_hydration`).
    pub hydration_enabled: bool,
}

impl CloneGauges {
    /// Append the clone families.
    pub fn render(&self, out: &mut String) {
        let g = |v: u64| u32::try_from(v).map_or(f64::MAX, f64::from);
        write_gauge(
            out,
            "vhost_clone_hydrated_regions",
            "Regions whose data is on the destination.",
            g(self.hydrated_regions),
        );
        write_gauge(
            out,
            "vhost_clone_regions",
            "Regions of the clone target.",
            g(self.total_regions),
        );
        write_gauge(
            out,
            "vhost_clone_hydrating_regions",
            "Regions being copied right now.",
            g(self.hydrating_regions),
        );
        write_gauge(
            out,
            "vhost_clone_region_bytes",
            "Region size in bytes.",
            g(self.region_bytes),
        );
        write_gauge(
            out,
            "vhost_clone_hydration_enabled",
            "1 while background hydration is enabled.",
            if self.hydration_enabled { 1.0 } else { 0.0 },
        );
        write_counter(
            out,
            "vhost_clone_copied_bytes_total",
            "Bytes copied from the source to the destination.",
            self.copied_bytes,
        );
        write_counter(
            out,
            "vhost_clone_copy_failures_total",
            "Region copies that failed.",
            self.copy_failures,
        );
        write_counter(
            out,
            "vhost_clone_metadata_commits_total",
            "Metadata commits.",
            self.commits,
        );
        write_family(
            out,
            "vhost_clone_metadata_mode",
            "Metadata mode: 1 for the current one (rw, ro, fail).",
            "gauge",
        );
        for mode in ["rw", "ro", "fail"] {
            let on = self.metadata_mode.eq_ignore_ascii_case(mode);
            let _ = writeln!(
                out,
                "vhost_clone_metadata_mode{{mode=\"{mode}\"}} {}",
                u8::from(on)
            );
        }
    }
}

impl vhost_user_blk::RequestObserver for MetricsRegistry {
    fn completed(
        &self,
        queue: usize,
        op: &vhost_user_blk::BlockOp,
        bytes: u64,
        latency: Duration,
        ok: bool,
    ) {
        self.observe(queue, op.into(), bytes, latency, ok);
    }

    fn poll_probe(&self, thread: usize, result: &ProbeResult) {
        self.poll_probed(thread, *result);
    }
}

/// [`MetricsSource`] for a live `clone` target: reads its shared state (atomics and short locks;
/// never the metadata lock). Install with `registry.set_source(Some(Arc::new(CloneSource::new(
/// target.shared().clone()))))`; on a swap to `linear`, `set_source(None)`.
pub struct CloneSource {
    shared: Arc<crate::target::clone::engine::Shared>,
}

impl CloneSource {
    pub fn new(shared: Arc<crate::target::clone::engine::Shared>) -> Self {
        Self { shared }
    }

    /// The figures rendered.
    pub fn gauges(&self) -> CloneGauges {
        let s = &self.shared;
        CloneGauges {
            hydrated_regions: s.map.hydrated_count(),
            total_regions: s.geo.nr_regions(),
            hydrating_regions: s.locks.hydrating(),
            region_bytes: s.geo.region_sectors().saturating_mul(512),
            copied_bytes: s.copied_bytes.load(Ordering::Relaxed),
            copy_failures: s.sched.failures().stats().total,
            commits: s.commits.load(Ordering::Relaxed),
            metadata_mode: s.mode().as_status_str(),
            hydration_enabled: s.sched.is_enabled(),
        }
    }
}

impl MetricsSource for CloneSource {
    fn render(&self, out: &mut String) {
        self.gauges().render(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets() {
        assert_eq!(bucket_index(0), 0);
        assert_eq!(bucket_index(1), 0);
        assert_eq!(bucket_index(2), 1);
        assert_eq!(bucket_index(3), 2);
        assert_eq!(bucket_index(4), 2);
        assert_eq!(bucket_index(5), 3);
        assert_eq!(bucket_index(1 << 23), 23);
        assert_eq!(bucket_index((1 << 23) + 1), LATENCY_BUCKETS);
        assert_eq!(bucket_index(u64::MAX), LATENCY_BUCKETS);
        assert_eq!(micros_to_seconds(1), 0.000001);
        assert_eq!(micros_to_seconds(4_194_304), 4.194304);
    }

    #[test]
    fn ops_and_observe() {
        use vhost_user_blk::BlockOp;
        assert_eq!(
            RequestKind::from(&BlockOp::Read { sector: 0 }),
            RequestKind::Read
        );
        assert_eq!(RequestKind::from(&BlockOp::Flush), RequestKind::Flush);
        let op = BlockOp::WriteZeroes {
            sector: 0,
            nr_sectors: 8,
            unmap: true,
        };
        assert_eq!(RequestKind::from(&op), RequestKind::WriteZeroes);
        let reg = MetricsRegistry::new(2);
        reg.observe(1, RequestKind::Write, 4096, Duration::from_micros(10), true);
        reg.observe(7, RequestKind::Write, 4096, Duration::from_micros(10), true);
        let q = reg
            .queue(1)
            .map(|q| (q.requests(RequestKind::Write), q.bytes_written()));
        assert_eq!(q, Some((1, 4096)));
    }

    #[test]
    fn poll_probes_render_per_thread() {
        let r = MetricsRegistry::new(2);
        let probe = |polling, on, off| ProbeResult {
            polling,
            conclusive: true,
            rate_polling: on,
            rate_not_polling: off,
        };
        r.poll_probed(1, probe(true, 9000, 6000));
        r.poll_probed(1, probe(false, 5000, 7000));
        let text = r.render_prometheus();
        assert!(text.contains("vhost_clone_poll_probes_total{thread=\"0\"} 0\n"));
        assert!(text.contains("vhost_clone_poll_probes_total{thread=\"1\"} 2\n"));
        assert!(text.contains("vhost_clone_polling{thread=\"1\"} 0\n"));
        assert!(!text.contains("vhost_clone_polling{thread=\"0\"}"));
        assert!(text.contains(
            "vhost_clone_poll_probe_requests_per_second{thread=\"1\",mode=\"sleeping\"} 7000\n"
        ));
    }

    #[test]
    fn queue_is_cache_line_aligned() {
        assert_eq!(std::mem::align_of::<QueueMetrics>(), 64);
        assert_eq!(std::mem::size_of::<QueueMetrics>() % 64, 0);
    }

    #[test]
    fn routes() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\n\r\n"),
            Route::Metrics { head_only: false }
        );
        assert_eq!(
            route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Route::Metrics { head_only: false }
        );
        assert_eq!(
            route(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            Route::Metrics { head_only: true }
        );
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(route(b"garbage\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"GET metrics HTTP/1.1\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(&[0xff, 0xfe, b'\n']), Route::BadRequest);
        assert_eq!(route(b""), Route::BadRequest);
    }

    #[test]
    fn addresses() {
        assert_eq!(
            MetricsAddr::parse("localhost:9100").ok(),
            Some(MetricsAddr::Tcp("127.0.0.1:9100".parse().unwrap()))
        );
        assert!(MetricsAddr::parse("[::1]:0").is_ok());
        assert!(MetricsAddr::parse("unix:").is_err());
        assert!(MetricsAddr::parse("example.com:80").is_err());
        assert!(MetricsAddr::parse("127.0.0.1").is_err());
    }
}
