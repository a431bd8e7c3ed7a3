//! Readiness and checkpoint progress, shared by the actors and read by `/readyz`, the
//! demo, the benchmark and tests. Metrics (`metrics.rs`) say how much; this says
//! whether the pipeline can keep its promises right now.
//!
//! Ready means: the last checkpoint committed, Redis still holds anchorflow's fences,
//! no supervised actor is restarting after a failure, no partition is stalled, and
//! Redis's eviction policy cannot drop anchorflow's keys. Any failure turns it false
//! at once; the next completed checkpoint turns it true again. `/readyz` says why it
//! is not ([`Health::not_ready_because`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How many checkpoint durations [`Health::recent_checkpoints`] keeps.
pub const RECENT_CHECKPOINTS: usize = 4096;

#[derive(Default)]
struct State {
    /// The last checkpoint completed (and nothing failed since).
    committed: AtomicBool,
    /// Redis has lost anchorflow's fences; an operator must recover them.
    state_lost: AtomicBool,
    /// Supervised actors between a failure and their next success.
    restarting: Mutex<BTreeSet<&'static str>>,
    /// Offsets committed to Kafka per partition (the next offset to read).
    committed_offsets: Mutex<BTreeMap<i32, i64>>,
    /// Durations of the most recent checkpoints.
    recent: Mutex<VecDeque<Duration>>,
    /// Stalled partitions and why (`source/progress.rs`).
    stalled: Mutex<BTreeMap<i32, String>>,
    /// Why Redis may drop anchorflow's keys, while it may (`sinks/redis/client.rs`).
    evicting: Mutex<Option<String>>,
    /// The actor system runs: a stop request is a graceful stop from here on; before,
    /// nothing is in flight and the process may simply end.
    running: AtomicBool,
}

/// Cheap to clone; every clone sees the same state.
#[derive(Clone, Default)]
pub struct Health(Arc<State>);

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values stay consistent whatever a panicking holder did.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_ready(&self) -> bool {
        self.not_ready_because().is_empty()
    }

    /// Why the process is not ready, one reason per line; empty when it is.
    pub fn not_ready_because(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if !self.0.committed.load(Ordering::Relaxed) {
            reasons.push(
                "no checkpoint has completed since the start or the last failure".to_string(),
            );
        }
        if self.0.state_lost.load(Ordering::Relaxed) {
            reasons.push(
                "Redis has lost anchorflow's fences: run `anchorflow fences recover` (docs/exactly-once.md)"
                    .into(),
            );
        }
        for actor in locked(&self.0.restarting).iter() {
            reasons.push(format!("{actor} is restarting after a failure"));
        }
        for (partition, why) in locked(&self.0.stalled).iter() {
            reasons.push(format!("partition {partition} is stalled: {why}"));
        }
        if let Some(why) = locked(&self.0.evicting).as_ref() {
            reasons.push(why.clone());
        }
        reasons
    }

    /// The actor system runs (`pipeline.rs`).
    pub fn set_running(&self) {
        self.0.running.store(true, Ordering::Relaxed);
    }

    pub fn running(&self) -> bool {
        self.0.running.load(Ordering::Relaxed)
    }

    /// The stalled partitions now, with why (replaces the earlier set).
    pub fn set_stalled(&self, stalled: BTreeMap<i32, String>) {
        *locked(&self.0.stalled) = stalled;
    }

    /// Redis may evict anchorflow's keys (`Some`, with why), or may not.
    pub fn set_evicting(&self, why: Option<String>) {
        *locked(&self.0.evicting) = why;
    }

    /// Something failed: not ready until the next checkpoint completes.
    pub fn failed(&self) {
        self.0.committed.store(false, Ordering::Relaxed);
    }

    pub fn set_state_lost(&self, lost: bool) {
        self.0.state_lost.store(lost, Ordering::Relaxed);
    }

    pub fn state_lost(&self) -> bool {
        self.0.state_lost.load(Ordering::Relaxed)
    }

    /// An actor failed and is restarting (`true`), or did its work again (`false`).
    pub fn set_restarting(&self, actor: &'static str, restarting: bool) {
        let mut set = locked(&self.0.restarting);
        if restarting {
            set.insert(actor);
        } else {
            set.remove(actor);
        }
    }

    /// The actors restarting now.
    pub fn restarting(&self) -> Vec<&'static str> {
        locked(&self.0.restarting).iter().copied().collect()
    }

    /// A checkpoint completed in `took`; `offsets` were committed to Kafka.
    pub fn checkpoint_completed(&self, took: Duration, offsets: &BTreeMap<i32, i64>) {
        self.0.committed.store(true, Ordering::Relaxed);
        locked(&self.0.committed_offsets).extend(offsets);
        let mut recent = locked(&self.0.recent);
        if recent.len() == RECENT_CHECKPOINTS {
            recent.pop_front();
        }
        recent.push_back(took);
    }

    pub fn committed_offsets(&self) -> BTreeMap<i32, i64> {
        locked(&self.0.committed_offsets).clone()
    }

    /// Sum over partitions of the committed offsets: records durably processed when
    /// every partition started at offset 0.
    pub fn committed_total(&self) -> i64 {
        locked(&self.0.committed_offsets).values().sum()
    }

    pub fn recent_checkpoints(&self) -> Vec<Duration> {
        locked(&self.0.recent).iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_a_checkpoint_the_fences_and_no_restart() {
        let health = Health::new();
        assert!(!health.is_ready(), "no checkpoint yet");
        health.checkpoint_completed(Duration::from_millis(5), &[(0, 10)].into());
        assert!(health.is_ready());
        health.set_restarting("redis_sink", true);
        assert!(!health.is_ready());
        health.set_restarting("redis_sink", false);
        assert!(health.is_ready());
        health.set_state_lost(true);
        assert!(!health.is_ready());
        health.set_state_lost(false);
        health.set_stalled([(3, "waiting for Redis commits".to_string())].into());
        assert_eq!(
            health.not_ready_because(),
            ["partition 3 is stalled: waiting for Redis commits"]
        );
        health.set_stalled(BTreeMap::new());
        health.set_evicting(Some("Redis evicts".into()));
        assert!(!health.is_ready());
        health.set_evicting(None);
        assert!(health.is_ready());
        health.failed();
        assert!(!health.is_ready());
        health.checkpoint_completed(Duration::from_millis(7), &[(1, 5)].into());
        assert_eq!(health.committed_total(), 15);
        assert_eq!(health.recent_checkpoints().len(), 2);
    }
}
