//! Whether every partition that has records to read keeps moving: the liveness half of
//! the promise. A partition whose Redis fence has not moved for
//! `pipeline.stall_timeout_secs`, or whose durable fence (the lower of the sinks') has
//! not moved for that plus `warehouse.roll_interval_secs` (the warehouse's fence moves
//! once per roll), while the broker holds records beyond it is **stalled**, whatever the
//! cause: a dependency out, a broker that does not deliver, a bug. A stall is reported
//! loudly (`anchorflow_stalled_partitions`, `/readyz`, an error naming the partition and
//! what it waits for), never left for an operator to notice in the lag graph.
//!
//! Plain data over an injected clock, so that its tests run on simulated time; the
//! source feeds it (`flow.rs`: assignments and completed checkpoints, `reading.rs`:
//! the check and the report).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How often a stall still going on is logged again.
pub const REPORT_AGAIN: Duration = Duration::from_secs(300);

/// The two fences a partition must keep moving.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fence {
    /// The Redis sink's fence: it moves at every checkpoint that read something.
    Redis,
    /// The lower of the sinks' fences: it moves once per warehouse roll.
    Durable,
}

impl Fence {
    pub fn name(self) -> &'static str {
        match self {
            Fence::Redis => "redis",
            Fence::Durable => "durable",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Tracked {
    /// The fence, and since when it stands there.
    fence: i64,
    since: Instant,
    /// When the stall was last logged (while it is one).
    reported: Option<Instant>,
}

/// One stalled partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stall {
    pub partition: i32,
    /// The fence that stood too long, and where.
    pub which: Fence,
    pub fence: i64,
    /// Where the broker's records for us end.
    pub high_watermark: i64,
    /// How long the fence has stood.
    pub stood: Duration,
    /// Whether this stall is to be logged now: it is new, or was last logged
    /// [`REPORT_AGAIN`] ago.
    pub log: bool,
}

/// How long each fence may stand while records wait.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub redis: Duration,
    pub durable: Duration,
}

#[derive(Debug, Default)]
pub struct Progress {
    fences: BTreeMap<(i32, Fence), Tracked>,
}

impl Progress {
    /// A partition was claimed: both fences start at the claim's.
    pub fn assigned(&mut self, partition: i32, fence: i64, now: Instant) {
        for which in [Fence::Redis, Fence::Durable] {
            self.fences.insert(
                (partition, which),
                Tracked {
                    fence,
                    since: now,
                    reported: None,
                },
            );
        }
    }

    pub fn forget(&mut self, partition: i32) {
        self.fences.retain(|(p, _), _| *p != partition);
    }

    /// A checkpoint moved `which` fence of `partition` to `fence`. Returns whether the
    /// partition was reported stalled on it (it moves again).
    pub fn advanced(&mut self, partition: i32, which: Fence, fence: i64, now: Instant) -> bool {
        let Some(tracked) = self.fences.get_mut(&(partition, which)) else {
            return false;
        };
        if fence <= tracked.fence {
            return false;
        }
        let was_reported = tracked.reported.is_some();
        *tracked = Tracked {
            fence,
            since: now,
            reported: None,
        };
        was_reported
    }

    /// The partitions stalled at `now` (at most one entry each, the Redis fence's
    /// first): records to read (`high_watermark` says where the broker's end, `None`
    /// or -1 while unknown) and a fence that has stood for its timeout. Marks the ones
    /// it says to log as logged.
    pub fn stalled(
        &mut self,
        now: Instant,
        timeouts: Timeouts,
        high_watermark: impl Fn(i32) -> Option<i64>,
    ) -> Vec<Stall> {
        let mut stalls: Vec<Stall> = Vec::new();
        for (&(partition, which), tracked) in &mut self.fences {
            if stalls.last().is_some_and(|s| s.partition == partition) {
                continue;
            }
            let Some(high) = high_watermark(partition).filter(|&h| h > tracked.fence) else {
                continue;
            };
            let timeout = match which {
                Fence::Redis => timeouts.redis,
                Fence::Durable => timeouts.durable,
            };
            let stood = now.saturating_duration_since(tracked.since);
            if stood < timeout {
                continue;
            }
            let log = tracked
                .reported
                .is_none_or(|at| now.saturating_duration_since(at) >= REPORT_AGAIN);
            if log {
                tracked.reported = Some(now);
            }
            stalls.push(Stall {
                partition,
                which,
                fence: tracked.fence,
                high_watermark: high,
                stood,
                log,
            });
        }
        stalls
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: Timeouts = Timeouts {
        redis: Duration::from_secs(60),
        durable: Duration::from_secs(120),
    };

    /// A partition with records beyond its fence stalls once the fence stood for the
    /// timeout; it is logged once, then again only after [`REPORT_AGAIN`]; a fence that
    /// moves ends the stall.
    #[test]
    fn a_fence_that_stands_while_records_wait_is_a_stall_reported_once() {
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut progress = Progress::default();
        progress.assigned(0, 100, start);
        progress.assigned(1, 100, start);
        let high = |p: i32| Some(if p == 0 { 500 } else { 100 });
        assert!(progress.stalled(at(59), TIMEOUTS, high).is_empty());
        let stalls = progress.stalled(at(61), TIMEOUTS, high);
        assert_eq!(
            stalls,
            vec![Stall {
                partition: 0,
                which: Fence::Redis,
                fence: 100,
                high_watermark: 500,
                stood: Duration::from_secs(61),
                log: true,
            }],
            "partition 1 has nothing to read: not stalled"
        );
        let again = progress.stalled(at(62), TIMEOUTS, high);
        assert_eq!((again.len(), again[0].log), (1, false), "logged once");
        let later = progress.stalled(at(61) + REPORT_AGAIN, TIMEOUTS, high);
        assert!(later[0].log, "and again after a while");
        assert!(progress.advanced(0, Fence::Redis, 200, at(400)));
        assert!(
            !progress.advanced(0, Fence::Redis, 200, at(402)),
            "no move, no news"
        );
        // The Redis fence moves; the durable one stood 400 s: the warehouse is stuck.
        let stalls = progress.stalled(at(401), TIMEOUTS, high);
        assert_eq!(
            (stalls.len(), stalls[0].which, stalls[0].fence),
            (1, Fence::Durable, 100)
        );
        assert!(progress.advanced(0, Fence::Durable, 200, at(402)));
        assert!(progress.stalled(at(403), TIMEOUTS, high).is_empty());
    }

    /// A warehouse that publishes once per roll moves the durable fence rarely: within
    /// its longer timeout that is no stall while the Redis fence moves.
    #[test]
    fn a_durable_fence_moving_once_per_roll_is_no_stall() {
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut progress = Progress::default();
        progress.assigned(0, 0, start);
        let high = |_| Some(10_000);
        for s in 1..100 {
            progress.advanced(0, Fence::Redis, s * 10, at(s as u64));
            assert!(progress.stalled(at(s as u64), TIMEOUTS, high).is_empty());
        }
    }

    #[test]
    fn an_unknown_high_watermark_or_a_forgotten_partition_is_no_stall() {
        let start = Instant::now();
        let mut progress = Progress::default();
        progress.assigned(0, 0, start);
        progress.assigned(1, 0, start);
        progress.forget(1);
        let later = start + Duration::from_secs(200);
        assert!(progress.stalled(later, TIMEOUTS, |_| None).is_empty());
        assert!(progress.stalled(later, TIMEOUTS, |_| Some(-1)).is_empty());
        assert_eq!(progress.stalled(later, TIMEOUTS, |_| Some(5)).len(), 1);
    }
}
