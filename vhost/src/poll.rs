//! How long a queue thread busy-polls before it sleeps in epoll.
//!
//! At queue depth 1 every request otherwise costs three sleeping-thread wake-ups: the
//! frontend's kick wakes the queue thread, the io_uring completion wakes it again, and the
//! used-ring call wakes the frontend. A thread that keeps looking at its avail rings and its
//! completion queue for a few microseconds after the last piece of work saves the first two.
//!
//! The window adapts the way QEMU's `AioContext` polling does: after the thread slept, the
//! length of that idle period decides. An event that came within the maximum window means a
//! longer window would have caught it (grow); one that came later means polling only burns
//! CPU (shrink). An idle device therefore polls a few microseconds per wake-up at most.

use std::time::{Duration, Instant};

/// First non-zero window.
const GROW_FROM: Duration = Duration::from_micros(4);

/// One queue thread's polling window.
#[derive(Debug)]
pub struct AdaptivePoll {
    max: Duration,
    window: Duration,
    idle_since: Option<Instant>,
}

impl AdaptivePoll {
    /// Poll at most `max` after the last piece of work; zero turns polling off.
    pub fn new(max: Duration) -> Self {
        AdaptivePoll {
            max,
            window: Duration::ZERO,
            idle_since: None,
        }
    }

    /// Polling is on at all.
    pub fn enabled(&self) -> bool {
        !self.max.is_zero()
    }

    /// How long to poll now after the last piece of work.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The thread stops polling and sleeps; its last work was at `last_work`.
    pub fn went_idle(&mut self, last_work: Instant) {
        self.idle_since = Some(last_work);
    }

    /// An event woke the thread at `now`: adapt the window to how long it was idle.
    pub fn woke(&mut self, now: Instant) {
        let Some(since) = self.idle_since.take() else {
            return;
        };
        let idle = now.saturating_duration_since(since);
        if idle <= self.window {
            // Polling was long enough (the event came right as it gave up).
        } else if idle > self.max {
            self.window /= 2;
            if self.window < GROW_FROM {
                self.window = Duration::ZERO;
            }
        } else {
            self.window = (self.window * 2).max(GROW_FROM).min(self.max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(poll: &mut AdaptivePoll, idle_us: u64) -> Duration {
        let t0 = Instant::now();
        poll.went_idle(t0);
        poll.woke(t0 + Duration::from_micros(idle_us));
        poll.window()
    }

    #[test]
    fn grows_to_the_maximum_while_events_come_soon() {
        let mut p = AdaptivePoll::new(Duration::from_micros(50));
        assert_eq!(p.window(), Duration::ZERO);
        assert_eq!(after(&mut p, 20), Duration::from_micros(4));
        assert_eq!(after(&mut p, 20), Duration::from_micros(8));
        assert_eq!(after(&mut p, 20), Duration::from_micros(16));
        assert_eq!(after(&mut p, 20), Duration::from_micros(32));
        assert_eq!(
            after(&mut p, 20),
            Duration::from_micros(32),
            "caught: no change"
        );
        assert_eq!(after(&mut p, 40), Duration::from_micros(50));
        assert_eq!(after(&mut p, 45), Duration::from_micros(50));
    }

    #[test]
    fn shrinks_to_zero_when_the_device_is_idle() {
        let mut p = AdaptivePoll::new(Duration::from_micros(32));
        for _ in 0..5 {
            after(&mut p, 20);
        }
        assert_eq!(p.window(), Duration::from_micros(32));
        assert_eq!(after(&mut p, 10_000), Duration::from_micros(16));
        assert_eq!(after(&mut p, 10_000), Duration::from_micros(8));
        assert_eq!(after(&mut p, 10_000), Duration::from_micros(4));
        assert_eq!(after(&mut p, 10_000), Duration::ZERO);
        assert_eq!(after(&mut p, 10_000), Duration::ZERO);
    }

    #[test]
    fn a_wake_without_a_recorded_idle_period_changes_nothing() {
        let mut p = AdaptivePoll::new(Duration::from_micros(32));
        p.woke(Instant::now());
        assert_eq!(p.window(), Duration::ZERO);
        assert!(p.enabled());
        assert!(!AdaptivePoll::new(Duration::ZERO).enabled());
    }
}
