//! Copy-failure accounting (dm-clone known issue 3, fixed): after N consecutive failures without progress,
//! background hydration stops with an event instead of retrying forever.
//!
//! Urgent copies (a guest write waits for them) are still attempted while stopped; when any copy fails, the
//! writes parked on its regions are completed with EIO by the caller (as dm-clone does).

use std::sync::Mutex;

use super::events::Event;

/// Default number of consecutive failures before background hydration stops.
pub const DEFAULT_MAX_FAILURES: u64 = 16;

#[derive(Debug, Default, Clone)]
struct Inner {
    consecutive: u64,
    total: u64,
    last_error: Option<String>,
    stopped: bool,
}

/// Snapshot of the failure counters.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FailureStats {
    pub consecutive: u64,
    pub total: u64,
    pub last_error: Option<String>,
    pub stopped: bool,
    pub limit: u64,
}

/// Counts consecutive and total copy failures.
#[derive(Debug)]
pub struct FailureTracker {
    limit: Mutex<u64>,
    inner: Mutex<Inner>,
}

impl Default for FailureTracker {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FAILURES)
    }
}

impl FailureTracker {
    /// Stop after `limit` consecutive failures (`0` is treated as 1).
    pub fn new(limit: u64) -> Self {
        Self {
            limit: Mutex::new(limit.max(1)),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Change the limit at runtime.
    pub fn set_limit(&self, limit: u64) {
        *self.limit.lock().unwrap_or_else(|e| e.into_inner()) = limit.max(1);
    }

    fn limit(&self) -> u64 {
        *self.limit.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy succeeded: progress resets the consecutive count.
    pub fn record_success(&self) {
        self.inner().consecutive = 0;
    }

    /// A copy failed. Returns `Some(HydrationStopped)` exactly once, when the consecutive count reaches the
    /// limit; the caller then halts background hydration and publishes the event.
    pub fn record_failure(&self, error: &str) -> Option<Event> {
        let limit = self.limit();
        let mut g = self.inner();
        g.consecutive = g.consecutive.saturating_add(1);
        g.total = g.total.saturating_add(1);
        g.last_error = Some(error.to_owned());
        if !g.stopped && g.consecutive >= limit {
            g.stopped = true;
            return Some(Event::HydrationStopped {
                failures: g.consecutive,
                last_error: error.to_owned(),
            });
        }
        None
    }

    /// True once the limit was reached (until [`reset`](Self::reset)).
    pub fn is_stopped(&self) -> bool {
        self.inner().stopped
    }

    /// `enable_hydration`: clear the stop and the consecutive count (the total is kept).
    pub fn reset(&self) {
        let mut g = self.inner();
        g.stopped = false;
        g.consecutive = 0;
    }

    /// Human-readable reason while stopped: `hydration stopped after N failures: <last error>`.
    pub fn stop_reason(&self) -> Option<String> {
        let g = self.inner();
        g.stopped.then(|| {
            format!(
                "hydration stopped after {} failures: {}",
                g.consecutive,
                g.last_error.as_deref().unwrap_or("unknown error")
            )
        })
    }

    /// Counters.
    pub fn stats(&self) -> FailureStats {
        let limit = self.limit();
        let g = self.inner();
        FailureStats {
            consecutive: g.consecutive,
            total: g.total,
            last_error: g.last_error.clone(),
            stopped: g.stopped,
            limit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_once_after_limit_and_resets() {
        let t = FailureTracker::new(3);
        assert!(t.record_failure("a").is_none());
        t.record_success();
        assert!(t.record_failure("b").is_none());
        assert!(t.record_failure("c").is_none());
        assert_eq!(
            t.record_failure("EIO reading source"),
            Some(Event::HydrationStopped {
                failures: 3,
                last_error: "EIO reading source".into()
            })
        );
        assert!(t.is_stopped());
        assert!(t.record_failure("again").is_none(), "event only once");
        assert_eq!(
            t.stop_reason().unwrap(),
            "hydration stopped after 4 failures: again"
        );
        t.reset();
        assert!(!t.is_stopped());
        assert_eq!(t.stats().total, 5);
    }
}
