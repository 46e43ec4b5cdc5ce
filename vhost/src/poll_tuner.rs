//! Whether busy-polling pays at all, found out by trying both ways.
//!
//! Polling saves the wake-ups of a sleeping queue thread, but what it costs depends on the
//! machine and on the load, and can outweigh what it saves. Measured on a two-vCPU VM
//! (benches/README.md): with one frontend thread at queue depth 1, a polling queue thread
//! keeps its vCPU busy, so the scheduler wakes the frontend on the other, halted vCPU, and
//! each completion then waits ~40 µs for that vCPU to come back: 0.6-0.75x the requests of
//! not polling. With four frontend threads at depth 1 polling was 1.37x; at depth 32 the two
//! were equal. No fixed window is right for all of these, so the tuner measures.
//!
//! It alternates phases with polling allowed and forbidden, counts the requests each
//! completes, and keeps polling only if it completed measurably more (a closed-loop frontend
//! issues its next request when the last one completes, so more requests means lower
//! latency). Equal rates choose not polling: it costs CPU for nothing. A probe that saw too
//! few requests to tell (an idle device) changes nothing; before the first conclusive probe
//! the thread polls, and the adaptive window ([`crate::poll`]) keeps that cheap while idle.
//! The choice is held for a while, longer each time a probe confirms it, then probed again,
//! so a change of load or machine is followed within seconds.
//!
//! Phases are long (100 ms, the first 40 ms not counted) because the scheduler takes tens of
//! milliseconds to move the frontend's and the queue thread's threads after the mode
//! changes; shorter phases measured that move rather than the mode.

use std::time::{Duration, Instant};

/// One probe phase: the first [`SETTLE`] of it is not counted (threads migrate between CPUs
/// after the mode changes), the rest is.
const PHASE: Duration = Duration::from_millis(100);
/// Start of a phase that is not counted.
const SETTLE: Duration = Duration::from_millis(40);
/// Phases per probe, alternating polling and not (even: as many of each).
const PHASES: u32 = 4;
/// Polling must complete this much more than not polling to be kept (in 1/100).
const MARGIN_PERCENT: u64 = 5;
/// Fewer requests than this in either mode's measured time: too few to tell.
const MIN_REQUESTS: u64 = 32;
/// How long a choice is held before the next probe, doubled each time a probe confirms it.
const HOLD_MIN: Duration = Duration::from_secs(1);
const HOLD_MAX: Duration = Duration::from_secs(8);

/// Requests counted and time measured in one mode during a probe.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    requests: u64,
    time: Duration,
}

impl Tally {
    /// Requests per second, in requests per nanosecond scaled to compare without floats:
    /// `a.requests * b.time` against `b.requests * a.time`.
    fn scaled(&self, other_time: Duration) -> u128 {
        u128::from(self.requests) * other_time.as_nanos()
    }
}

#[derive(Debug)]
enum Stage {
    /// Trying both modes: `phase` counts up to [`PHASES`].
    Probe { phase: u32, started: Instant },
    /// Keeping the last decision until `until`.
    Hold { until: Instant },
}

/// The outcome of one probe, for observers (metrics, logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeResult {
    /// Polling was chosen.
    pub polling: bool,
    /// Both modes completed enough requests to compare; if not, the choice did not change.
    pub conclusive: bool,
    /// Requests per second measured with polling allowed, and without.
    pub rate_polling: u64,
    pub rate_not_polling: u64,
}

/// A queue thread's polling tuner; see the module documentation.
#[derive(Debug)]
pub struct PollTuner {
    stage: Stage,
    /// The mode now (during a probe, the phase's).
    polling: bool,
    /// The last conclusive probe's choice (polling before the first).
    choice: bool,
    /// A probe was conclusive.
    decided: bool,
    /// Which mode the next probe starts with (alternates, so neither always goes first).
    first_polls: bool,
    hold: Duration,
    /// Requests completed since the current phase's counting began (0 while settling).
    counted: u64,
    settled: bool,
    on: Tally,
    off: Tally,
    last: Option<ProbeResult>,
}

impl PollTuner {
    /// A tuner that starts probing at `now`.
    pub fn new(now: Instant) -> Self {
        PollTuner {
            stage: Stage::Probe {
                phase: 0,
                started: now,
            },
            polling: true,
            choice: true,
            decided: false,
            first_polls: true,
            hold: HOLD_MIN,
            counted: 0,
            settled: false,
            on: Tally::default(),
            off: Tally::default(),
            last: None,
        }
    }

    /// `n` more requests completed.
    pub fn completed(&mut self, n: usize) {
        if self.settled {
            self.counted = self.counted.saturating_add(n as u64);
        }
    }

    /// The result of the last finished probe.
    pub fn last_probe(&self) -> Option<ProbeResult> {
        self.last
    }

    /// When the current hold ends (none while probing).
    #[cfg(test)]
    fn holding_until(&self) -> Option<Instant> {
        match self.stage {
            Stage::Hold { until } => Some(until),
            Stage::Probe { .. } => None,
        }
    }

    /// Whether the thread should poll now; advances the probe. Returns a probe's result in
    /// `finished` when one ended at this call.
    pub fn should_poll(&mut self, now: Instant) -> (bool, Option<ProbeResult>) {
        let mut finished = None;
        match self.stage {
            Stage::Hold { until } => {
                if now >= until {
                    self.start_probe(now);
                }
            }
            Stage::Probe { phase, started } => {
                let since = now.saturating_duration_since(started);
                if !self.settled && since >= SETTLE {
                    self.settled = true;
                    self.counted = 0;
                }
                if since >= PHASE {
                    // A phase that ended long after its time was slept through (an idle
                    // device, or the daemon waiting for its frontend): its rate says nothing
                    // of the mode, so it is not counted.
                    if since < PHASE * 2 {
                        let t = if self.polling {
                            &mut self.on
                        } else {
                            &mut self.off
                        };
                        t.requests += self.counted;
                        t.time += since.saturating_sub(SETTLE);
                    }
                    let phase = phase + 1;
                    if phase >= PHASES {
                        let r = self.decide();
                        self.stage = Stage::Hold {
                            until: now + self.hold,
                        };
                        finished = Some(r);
                    } else {
                        self.polling = !self.polling;
                        self.stage = Stage::Probe {
                            phase,
                            started: now,
                        };
                        self.settled = false;
                        self.counted = 0;
                    }
                }
            }
        }
        (self.polling, finished)
    }

    fn start_probe(&mut self, now: Instant) {
        self.first_polls = !self.first_polls;
        self.polling = self.first_polls;
        self.on = Tally::default();
        self.off = Tally::default();
        self.settled = false;
        self.counted = 0;
        self.stage = Stage::Probe {
            phase: 0,
            started: now,
        };
    }

    /// Pick the mode from the probe's tallies and set how long to hold it.
    fn decide(&mut self) -> ProbeResult {
        let conclusive = self.on.requests >= MIN_REQUESTS && self.off.requests >= MIN_REQUESTS;
        if conclusive {
            // on/on_time >= off/off_time * (1 + margin), without division.
            let polling = self.on.scaled(self.off.time) * 100
                >= self.off.scaled(self.on.time) * u128::from(100 + MARGIN_PERCENT);
            let confirmed = self.decided && polling == self.choice;
            self.decided = true;
            self.hold = if confirmed {
                (self.hold * 2).min(HOLD_MAX)
            } else {
                HOLD_MIN
            };
            self.choice = polling;
        }
        self.polling = self.choice;
        let r = ProbeResult {
            polling: self.choice,
            conclusive,
            rate_polling: rate(self.on),
            rate_not_polling: rate(self.off),
        };
        self.last = Some(r);
        r
    }
}

fn rate(t: Tally) -> u64 {
    let ns = t.time.as_nanos();
    if ns == 0 {
        return 0;
    }
    u64::try_from(u128::from(t.requests) * 1_000_000_000 / ns).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drive a tuner through one probe from `t0`, completing requests at `per_ms_on` and
    /// `per_ms_off` per millisecond, in 1 ms steps. Returns the probe's result and the time
    /// it ended.
    fn probe(
        tuner: &mut PollTuner,
        t0: Instant,
        per_ms_on: usize,
        per_ms_off: usize,
    ) -> (ProbeResult, Instant) {
        let mut t = t0;
        for _ in 0..10_000 {
            let (polling, done) = tuner.should_poll(t);
            if let Some(r) = done {
                return (r, t);
            }
            tuner.completed(if polling { per_ms_on } else { per_ms_off });
            t += Duration::from_millis(1);
        }
        panic!("probe never ended");
    }

    #[test]
    fn keeps_polling_only_when_it_completes_measurably_more() {
        let t0 = Instant::now();
        let mut tuner = PollTuner::new(t0);
        let (r, _) = probe(&mut tuner, t0, 20, 10);
        assert!(r.polling, "{r:?}");
        assert_eq!(r.rate_polling, 20_000);
        assert_eq!(r.rate_not_polling, 10_000);

        let mut tuner = PollTuner::new(t0);
        let (r, _) = probe(&mut tuner, t0, 10, 15);
        assert!(!r.polling, "{r:?}");

        // Within the margin: the cheaper mode wins.
        let mut tuner = PollTuner::new(t0);
        let (r, t) = probe(&mut tuner, t0, 102, 100);
        assert!(!r.polling, "{r:?}");
        assert!(!tuner.should_poll(t).0);
    }

    #[test]
    fn too_few_requests_change_nothing() {
        let t0 = Instant::now();
        let mut tuner = PollTuner::new(t0);
        // Plenty while polling, none without: not enough to compare. Before any conclusive
        // probe the thread polls.
        let (r, t) = probe(&mut tuner, t0, 10, 0);
        assert!(r.polling && !r.conclusive, "{r:?}");
        // A conclusive choice of sleeping survives an idle probe, and so does its hold.
        let (r, t) = probe(&mut tuner, t + HOLD_MAX, 10, 20);
        assert!(!r.polling && r.conclusive, "{r:?}");
        let (r, t) = probe(&mut tuner, t + HOLD_MAX, 0, 0);
        assert!(!r.polling && !r.conclusive, "{r:?}");
        assert_eq!(tuner.holding_until(), Some(t + HOLD_MIN));
        assert!(!tuner.should_poll(t).0);
        let (r, t) = probe(&mut tuner, t + HOLD_MAX, 10, 20);
        assert!(!r.polling && r.conclusive);
        assert_eq!(tuner.holding_until(), Some(t + HOLD_MIN * 2), "confirmed");
    }

    #[test]
    fn both_modes_are_measured_alternately_and_settling_is_not_counted() {
        let t0 = Instant::now();
        let mut tuner = PollTuner::new(t0);
        let mut modes = Vec::new();
        let mut t = t0;
        while tuner.last_probe().is_none() {
            let (polling, _) = tuner.should_poll(t);
            if modes.last() != Some(&polling) {
                modes.push(polling);
            }
            // A burst right after each switch (the settling time) must not count.
            let in_phase = t.saturating_duration_since(t0).as_millis() % PHASE.as_millis();
            tuner.completed(if in_phase < 2 && polling { 1000 } else { 5 });
            t += Duration::from_millis(1);
        }
        assert_eq!(modes, [true, false, true, false]);
        let r = tuner.last_probe().unwrap();
        assert!(!r.polling, "settling bursts were counted: {r:?}");
    }

    #[test]
    fn a_phase_slept_through_is_not_counted() {
        // The daemon starts probing before its frontend connects: the first (polling) phase
        // ends only at the first request, seconds later. Counted, its 5 s would make polling
        // look ~80 times slower than it is.
        let t0 = Instant::now();
        let mut tuner = PollTuner::new(t0);
        assert!(tuner.should_poll(t0).0);
        let t1 = t0 + Duration::from_secs(5);
        let (r, _) = probe(&mut tuner, t1, 20, 10);
        assert!(r.polling && r.conclusive, "{r:?}");
        assert_eq!(r.rate_polling, 20_000);

        // The device goes idle 60 ms into each polling phase and the thread sleeps for a
        // second. Counted, the polling phases would say 200 requests a second against 10000
        // without polling; not counted, nothing is known of polling and nothing changes.
        let mut tuner = PollTuner::new(t0);
        let (mut t, mut phase_start, mut mode) = (t0, t0, None);
        while tuner.last_probe().is_none() {
            let (polling, _) = tuner.should_poll(t);
            if mode != Some(polling) {
                (mode, phase_start) = (Some(polling), t);
            }
            tuner.completed(10);
            let idle = polling && t - phase_start >= Duration::from_millis(60);
            t += Duration::from_millis(if idle { 1000 } else { 1 });
        }
        let r = tuner.last_probe().unwrap();
        assert!(!r.conclusive && r.rate_polling == 0, "{r:?}");
        assert!(
            r.polling,
            "an inconclusive first probe keeps polling: {r:?}"
        );
    }

    #[test]
    fn holds_the_choice_longer_each_time_a_probe_confirms_it() {
        let t0 = Instant::now();
        let mut tuner = PollTuner::new(t0);
        let mut t = t0;
        let mut holds = Vec::new();
        for _ in 0..5 {
            let (r, end) = probe(&mut tuner, t, 20, 10);
            assert!(r.polling);
            let until = tuner.holding_until().expect("holds after a probe");
            holds.push((until - end).as_secs());
            // Held: polls throughout.
            assert!(tuner.should_poll(end).0 && tuner.should_poll(until - PHASE).0);
            t = until;
        }
        assert_eq!(holds, [1, 2, 4, 8, 8]);

        // Probes start with each mode in turn.
        let (first, _) = tuner.should_poll(t);
        let (r, end) = probe(&mut tuner, t, 20, 10);
        assert!(r.polling);
        let t = tuner.holding_until().unwrap();
        assert_ne!(tuner.should_poll(t).0, first);

        // A changed result goes back to the shortest hold.
        let (r, end2) = probe(&mut tuner, t, 10, 20);
        assert!(!r.polling);
        assert!(end2 > end);
        assert_eq!(tuner.holding_until().unwrap() - end2, HOLD_MIN);
        assert!(!tuner.should_poll(end2).0);
    }
}
