//! Events of the `clone` target (serde JSON, one object per line) and a small broadcast hub.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;

/// Metadata mode, as in the status line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetadataMode {
    Rw,
    Ro,
    Fail,
}

impl MetadataMode {
    /// The status-line word (`rw`, `ro`, `Fail`).
    pub fn as_status_str(self) -> &'static str {
        match self {
            MetadataMode::Rw => "rw",
            MetadataMode::Ro => "ro",
            MetadataMode::Fail => "Fail",
        }
    }
}

/// An event. Serialised as `{"event":"<name>", ...fields}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Every region is hydrated.
    HydrationComplete,
    /// Background hydration stopped after `failures` consecutive copy failures.
    HydrationStopped { failures: u64, last_error: String },
    /// The metadata mode changed.
    ModeChange {
        from: MetadataMode,
        to: MetadataMode,
    },
    /// A copy of `region` failed.
    RegionError { region: u64, error: String },
}

impl Event {
    /// One JSON object, without a newline.
    pub fn to_json(&self) -> String {
        // Serialising these plain enums cannot fail; fall back to a fixed object rather than panic.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{\"event\":\"unknown\"}"))
    }

    /// One JSON object followed by `\n`.
    pub fn to_json_line(&self) -> String {
        let mut s = self.to_json();
        s.push('\n');
        s
    }
}

/// Broadcast hub: every subscriber receives every event published after it subscribed. Subscribers whose
/// receiver was dropped are pruned on the next publish.
#[derive(Debug, Default)]
pub struct EventHub {
    subscribers: Mutex<Vec<Sender<Event>>>,
}

impl EventHub {
    /// New hub without subscribers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Subscribe.
    pub fn subscribe(&self) -> Receiver<Event> {
        let (tx, rx) = channel();
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tx);
        rx
    }

    /// Send `event` to every live subscriber; returns how many received it.
    pub fn publish(&self, event: &Event) -> usize {
        let mut subs = self.subscribers.lock().unwrap_or_else(|e| e.into_inner());
        subs.retain(|tx| tx.send(event.clone()).is_ok());
        subs.len()
    }

    /// Number of subscribers (including dropped ones not yet pruned).
    pub fn subscriber_count(&self) -> usize {
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines() {
        assert_eq!(
            Event::HydrationComplete.to_json_line(),
            "{\"event\":\"hydration_complete\"}\n"
        );
        assert_eq!(
            Event::HydrationStopped {
                failures: 16,
                last_error: "EIO".into()
            }
            .to_json(),
            r#"{"event":"hydration_stopped","failures":16,"last_error":"EIO"}"#
        );
        assert_eq!(
            Event::ModeChange {
                from: MetadataMode::Rw,
                to: MetadataMode::Ro
            }
            .to_json(),
            r#"{"event":"mode_change","from":"rw","to":"ro"}"#
        );
        let e = Event::RegionError {
            region: 7,
            error: "short read".into(),
        };
        assert_eq!(
            e.to_json(),
            r#"{"event":"region_error","region":7,"error":"short read"}"#
        );
        assert_eq!(serde_json::from_str::<Event>(&e.to_json()).unwrap(), e);
    }

    #[test]
    fn hub_prunes_dropped_subscribers() {
        let hub = EventHub::new();
        let a = hub.subscribe();
        let b = hub.subscribe();
        assert_eq!(hub.publish(&Event::HydrationComplete), 2);
        drop(b);
        assert_eq!(hub.publish(&Event::HydrationComplete), 1);
        assert_eq!(hub.subscriber_count(), 1);
        assert_eq!(a.try_iter().count(), 2);
    }
}
