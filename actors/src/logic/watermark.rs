//! Event-time watermarks (`docs/event-time.md`), as pure logic on injected instants so that tests
//! drive time by hand.
//!
//! Per partition the watermark is the largest event time seen minus
//! `max_out_of_orderness`, but never ahead of processing time minus the same bound: a
//! record timestamped in the future (a producer's clock running ahead, within
//! `time.max_future_ms`) cannot drag the watermark, and with it window closes and
//! `_SUCCESS`, ahead of the data still to come. A partition that delivered no record for `idle_timeout`
//! (processing time) is idle and does not hold the instance watermark back: the
//! instance watermark is the minimum over the non-idle assigned partitions. When every
//! partition is idle, the stream is quiet and the watermark moves on with processing
//! time from the most advanced partition, so nothing waits forever for data that never
//! comes. The [`Timer`](crate::timer::Timer) owns one [`Watermarks`] and exports it as
//! metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

/// An instance watermark and the partitions it was taken over. It says nothing of any
/// other partition: one assigned after it was taken has records it never saw, and a
/// window of that partition closed by it would close before its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceMark {
    pub ms: i64,
    pub partitions: BTreeSet<i32>,
}

impl InstanceMark {
    /// Whether it holds for every one of `partitions`.
    pub fn covers(&self, partitions: &[i32]) -> bool {
        partitions.iter().all(|p| self.partitions.contains(p))
    }
}

#[derive(Clone, Copy, Debug)]
struct Mark {
    /// Largest event time seen (Unix ms); `None` until a record arrives.
    max_event_ms: Option<i64>,
    /// When the last record arrived, or when the partition was assigned.
    last_activity: Instant,
}

/// Watermarks of the partitions assigned to this instance.
#[derive(Debug)]
pub struct Watermarks {
    out_of_orderness_ms: i64,
    idle_timeout: Duration,
    marks: BTreeMap<i32, Mark>,
}

impl Watermarks {
    pub fn new(out_of_orderness: Duration, idle_timeout: Duration) -> Self {
        Watermarks {
            out_of_orderness_ms: out_of_orderness.as_millis() as i64,
            idle_timeout,
            marks: BTreeMap::new(),
        }
    }

    /// A partition was assigned. `restored` is the largest event time its stored state
    /// had seen (it resumes from there); without one it holds the watermark back until
    /// its first record arrives or it turns idle.
    pub fn assign(&mut self, partition: i32, now: Instant, restored: Option<i64>) {
        self.marks.insert(
            partition,
            Mark {
                max_event_ms: restored,
                last_activity: now,
            },
        );
    }

    pub fn revoke(&mut self, partition: i32) {
        self.marks.remove(&partition);
    }

    /// Records of `partition` arrived; `max_event_ms` is the largest event time among
    /// them (`None` when none decoded: still activity, no event time).
    pub fn observe(&mut self, partition: i32, max_event_ms: Option<i64>, now: Instant) {
        let mark = self.marks.entry(partition).or_insert(Mark {
            max_event_ms: None,
            last_activity: now,
        });
        mark.last_activity = now;
        if let Some(ts) = max_event_ms {
            mark.max_event_ms = Some(mark.max_event_ms.map_or(ts, |m| m.max(ts)));
        }
    }

    /// The partition has records this instance cannot read yet (see [`crate::source::held`]):
    /// activity, without an event time.
    pub fn touch(&mut self, partition: i32, now: Instant) {
        if let Some(mark) = self.marks.get_mut(&partition) {
            mark.last_activity = now;
        }
    }

    /// The partition's own watermark, once it has seen a record; `wall_ms` is
    /// processing time, which it never passes.
    pub fn partition(&self, partition: i32, wall_ms: i64) -> Option<i64> {
        let mark = self.marks.get(&partition)?;
        mark.max_event_ms
            .map(|m| m.min(wall_ms) - self.out_of_orderness_ms)
    }

    pub fn is_idle(&self, partition: i32, now: Instant) -> bool {
        self.marks
            .get(&partition)
            .is_some_and(|m| now.saturating_duration_since(m.last_activity) >= self.idle_timeout)
    }

    /// The assigned partitions.
    pub fn partitions(&self) -> Vec<i32> {
        self.marks.keys().copied().collect()
    }

    pub fn idle_partitions(&self, now: Instant) -> usize {
        self.marks.keys().filter(|p| self.is_idle(**p, now)).count()
    }

    /// [`Self::instance`] with the partitions it was taken over.
    pub fn instance_mark(&self, now: Instant, wall_ms: i64) -> Option<InstanceMark> {
        let ms = self.instance(now, wall_ms)?;
        Some(InstanceMark {
            ms,
            partitions: self.marks.keys().copied().collect(),
        })
    }

    /// The instance watermark: the minimum over non-idle partitions; `None` while a
    /// non-idle partition has seen no record yet, or nothing is assigned. `wall_ms` is
    /// processing time (ms since the epoch), which no watermark passes.
    pub fn instance(&self, now: Instant, wall_ms: i64) -> Option<i64> {
        let ceiling = wall_ms - self.out_of_orderness_ms;
        let active: Vec<i32> = self
            .marks
            .keys()
            .copied()
            .filter(|p| !self.is_idle(*p, now))
            .collect();
        if active.is_empty() {
            // A quiet stream: advance with processing time from the furthest partition.
            return self
                .marks
                .iter()
                .filter_map(|(p, m)| {
                    let quiet = now.saturating_duration_since(m.last_activity);
                    Some(self.partition(*p, wall_ms)? + quiet.as_millis() as i64)
                })
                .max()
                .map(|mark| mark.min(ceiling));
        }
        active
            .iter()
            .map(|p| self.partition(*p, wall_ms))
            .collect::<Option<Vec<i64>>>()?
            .into_iter()
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    /// Processing time far ahead of the tests' event times (the year 2100).
    const WALL: i64 = 4_102_444_800_000;

    fn marks() -> (Watermarks, Instant) {
        (Watermarks::new(5 * S, 30 * S), Instant::now())
    }

    #[test]
    fn a_partition_watermark_trails_its_largest_event_time() {
        let (mut w, t0) = marks();
        w.assign(0, t0, None);
        assert_eq!(w.partition(0, WALL), None);
        w.observe(0, Some(100_000), t0);
        // Out of order but within the bound: the watermark does not go back.
        w.observe(0, Some(97_000), t0 + S);
        assert_eq!(w.partition(0, WALL), Some(95_000));
        assert_eq!(w.instance(t0 + S, WALL), Some(95_000));
    }

    #[test]
    fn the_instance_watermark_is_the_minimum_over_active_partitions() {
        let (mut w, t0) = marks();
        w.assign(0, t0, None);
        w.assign(1, t0, None);
        w.observe(0, Some(200_000), t0);
        assert_eq!(w.instance(t0, WALL), None, "partition 1 has not spoken yet");
        w.observe(1, Some(150_000), t0);
        assert_eq!(w.instance(t0, WALL), Some(145_000));
        w.revoke(1);
        assert_eq!(w.instance(t0, WALL), Some(195_000));
    }

    #[test]
    fn an_empty_partition_stops_holding_the_watermark_after_the_idle_timeout() {
        let (mut w, t0) = marks();
        w.assign(0, t0, None);
        w.assign(1, t0, None); // never receives anything
        for s in 0..40 {
            w.observe(0, Some(1_000_000 + s * 1000), t0 + s as u32 * S);
        }
        assert!(!w.is_idle(1, t0 + 29 * S));
        assert_eq!(
            w.instance(t0 + 29 * S, WALL),
            None,
            "held back just before the timeout"
        );
        assert!(w.is_idle(1, t0 + 30 * S));
        assert_eq!(w.idle_partitions(t0 + 30 * S), 1);
        assert_eq!(w.instance(t0 + 39 * S, WALL), Some(1_039_000 - 5_000));
        // A record makes it active again.
        w.observe(1, Some(900_000), t0 + 39 * S);
        assert_eq!(w.instance(t0 + 39 * S, WALL), Some(895_000));
    }

    /// A record from the future (within `time.max_future_ms`) moves the watermark only
    /// as far as processing time allows; a restored partition starts from its stored
    /// event time and closes windows once quiet, as an uninterrupted one does.
    #[test]
    fn watermarks_never_pass_processing_time_and_resume_from_stored_state() {
        let (mut w, t0) = marks();
        let wall = 1_000_000_000;
        w.assign(0, t0, None);
        w.observe(0, Some(wall - 10_000), t0);
        assert_eq!(w.instance(t0, wall), Some(wall - 15_000));
        w.observe(0, Some(wall + 3_000_000), t0);
        assert_eq!(w.partition(0, wall), Some(wall - 5_000));
        assert_eq!(
            w.instance(t0 + 60 * S, wall),
            Some(wall - 5_000),
            "quiet, still capped"
        );
        let (mut restored, t0) = marks();
        restored.assign(1, t0, Some(50_000));
        assert_eq!(restored.instance(t0, WALL), Some(45_000));
        assert_eq!(
            restored.instance(t0 + 40 * S, WALL),
            Some(85_000),
            "quiet: it moves on"
        );
    }

    #[test]
    fn a_quiet_stream_advances_with_processing_time() {
        let (mut w, t0) = marks();
        w.assign(0, t0, None);
        w.assign(1, t0, None);
        w.observe(0, Some(60_000), t0);
        w.observe(1, Some(50_000), t0);
        assert_eq!(w.instance(t0 + 29 * S, WALL), Some(45_000));
        // Both idle from 30 s on: the furthest partition moves on with the clock.
        assert_eq!(w.instance(t0 + 30 * S, WALL), Some(55_000 + 30_000));
        assert_eq!(w.instance(t0 + 90 * S, WALL), Some(55_000 + 90_000));
    }
}
