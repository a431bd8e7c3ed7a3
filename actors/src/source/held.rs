//! [`Held`]: partitions that may have records this instance has not processed yet, so
//! their silence says nothing about event time. Idleness (`docs/event-time.md`) is for partitions
//! with nothing to read. A partition is *held*, and never turns idle, while
//! - its reader has input it has not finished (it may be blocked on a slow sink),
//! - the source paused it because that reader is full, or because it has read
//!   `pipeline.max_uncommitted_records` (or its budget share) beyond its Redis fence,
//! - the broker holds records it has not delivered yet (it is behind), or
//! - its broker does not answer (nothing is known about its records).
//!
//! Without this, a Redis stall, or a busy reader, longer than `idle_timeout` made
//! partitions look idle, the watermark ran on with processing time or with the other
//! partitions, and windows and `_SUCCESS` came before the data still queued.
//!
//! The source marks partitions (pause and resume, its readers, and what librdkafka's
//! statistics and error events say); the timer treats a held partition as active.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

/// Answers whether a partition's reader has unfinished input.
type Busy = Box<dyn Fn() -> bool + Send>;

#[derive(Default)]
struct HeldState {
    paused: BTreeSet<i32>,
    unreachable: BTreeSet<i32>,
    behind: BTreeSet<i32>,
    readers: std::collections::BTreeMap<i32, Busy>,
}

impl std::fmt::Debug for HeldState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldState")
            .field("paused", &self.paused)
            .field("unreachable", &self.unreachable)
            .field("behind", &self.behind)
            .field("readers", &self.readers.keys())
            .finish()
    }
}

/// Shared between the source, which marks, and the timer, which asks.
#[derive(Clone, Debug, Default)]
pub struct Held {
    inner: Arc<Mutex<HeldState>>,
}

impl Held {
    fn lock(&self) -> MutexGuard<'_, HeldState> {
        // Nothing here can leave the sets half-changed; a poisoned lock is still valid.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The source paused (or resumed) the partition (its reader is full, or it is at
    /// the uncommitted bound).
    pub fn set_paused(&self, partition: i32, paused: bool) {
        let mut state = self.lock();
        if paused {
            state.paused.insert(partition);
        } else {
            state.paused.remove(&partition);
        }
    }

    /// The partitions whose leader does not answer now (replaces the earlier set).
    pub fn set_unreachable(&self, partitions: BTreeSet<i32>) {
        self.lock().unreachable = partitions;
    }

    /// What librdkafka's statistics say: partitions behind the broker, and partitions
    /// whose leader is silent.
    pub fn update(&self, statistics: &rdkafka::statistics::Statistics) {
        let (unreachable, behind) = (unreachable(statistics), behind(statistics));
        let mut state = self.lock();
        state.unreachable = unreachable;
        state.behind = behind;
    }

    /// The partition's reader; `busy` says whether it has unfinished input.
    pub fn track_reader(&self, partition: i32, busy: impl Fn() -> bool + Send + 'static) {
        self.lock().readers.insert(partition, Box::new(busy));
    }

    /// The partition left this instance: it is held no more.
    pub fn forget(&self, partition: i32) {
        let mut state = self.lock();
        state.paused.remove(&partition);
        state.unreachable.remove(&partition);
        state.behind.remove(&partition);
        state.readers.remove(&partition);
    }

    /// Whether the partition's leader does not answer now.
    pub fn unreachable(&self, partition: i32) -> bool {
        self.lock().unreachable.contains(&partition)
    }

    /// How many readers have unfinished input.
    pub fn busy_readers(&self) -> usize {
        self.lock().readers.values().filter(|busy| busy()).count()
    }

    /// Every held partition.
    pub fn partitions(&self) -> BTreeSet<i32> {
        let state = self.lock();
        let busy = state
            .readers
            .iter()
            .filter(|(_, busy)| busy())
            .map(|(p, _)| *p);
        state
            .paused
            .iter()
            .chain(&state.unreachable)
            .chain(&state.behind)
            .copied()
            .chain(busy)
            .collect()
    }
}

/// How long a broker may stay silent before its partitions count as unreachable. A
/// healthy broker answers every fetch within `fetch.wait.max.ms` (500 ms by default).
pub const BROKER_SILENCE_US: i64 = 5_000_000;

/// The partitions whose leader is not up or has been silent too long, from
/// librdkafka's statistics.
pub fn unreachable(statistics: &rdkafka::statistics::Statistics) -> BTreeSet<i32> {
    let silent: BTreeSet<i32> = statistics
        .brokers
        .values()
        .filter(|b| b.nodeid >= 0)
        .filter(|b| b.state != "UP" || b.rxidle < 0 || b.rxidle > BROKER_SILENCE_US)
        .map(|b| b.nodeid)
        .collect();
    statistics
        .topics
        .values()
        .flat_map(|t| t.partitions.values())
        .filter(|p| p.partition >= 0 && p.desired && (p.leader < 0 || silent.contains(&p.leader)))
        .map(|p| p.partition)
        .collect()
}

/// The partitions whose broker holds records not yet delivered to this instance.
pub fn behind(statistics: &rdkafka::statistics::Statistics) -> BTreeSet<i32> {
    statistics
        .topics
        .values()
        .flat_map(|t| t.partitions.values())
        .filter(|p| p.partition >= 0 && p.desired)
        .filter(|p| {
            let position = if p.app_offset >= 0 {
                p.app_offset
            } else {
                p.next_offset
            };
            p.fetchq_cnt > 0 || (p.hi_offset >= 0 && position >= 0 && p.hi_offset > position)
        })
        .map(|p| p.partition)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paused_and_unreachable_partitions_are_held_until_released() {
        let held = Held::default();
        held.set_paused(1, true);
        held.set_unreachable([2, 3].into());
        assert_eq!(held.partitions(), [1, 2, 3].into());
        held.set_paused(1, false);
        held.set_unreachable(BTreeSet::new());
        held.set_paused(4, true);
        held.forget(4);
        assert!(held.partitions().is_empty());
        let busy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let probe = busy.clone();
        held.track_reader(5, move || probe.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(
            held.partitions(),
            [5].into(),
            "a reader with unfinished input"
        );
        assert_eq!(held.busy_readers(), 1);
        busy.store(false, std::sync::atomic::Ordering::SeqCst);
        assert!(held.partitions().is_empty());
        assert_eq!(held.busy_readers(), 0);
    }
}
