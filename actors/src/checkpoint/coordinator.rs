//! The checkpoint coordinator, as plain code: it numbers checkpoints, decides when the
//! next may start, collects each sink's fences, and says when a checkpoint is complete
//! — when every sink ([`SinkKind::ALL`]) reported it — and which offsets are then
//! durable in both (the lowest fence over the sinks, per partition). The Kafka source
//! drives it through the checkpoint driver (`driver.rs`, which feeds it the sinks' acks)
//! and commits those offsets to Kafka (`source/flow.rs`).
//!
//! **Two checkpoints may be in flight, and only the Redis sink may be behind.** The
//! next checkpoint starts once every other sink has reported the one in flight: its
//! barriers, the shards' flushes and the Redis sink's plan then overlap the scripts of
//! the checkpoint before (Flink's `maxConcurrentCheckpoints = 2`), so Redis does not
//! sit idle while the next checkpoint's barriers travel and its plan is built. The
//! Redis sink applies its commits in checkpoint order, each planned from where the one
//! before ends, so checkpoints still complete in order. A final checkpoint (shutdown,
//! revocation) starts only when none is in flight.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::checkpoint::barrier::{CheckpointKind, CheckpointSpec};
use crate::checkpoint::claim::SinkKind;
use crate::logic::watermark::InstanceMark;

struct InFlight {
    spec: Arc<CheckpointSpec>,
    started: Instant,
    fences: BTreeMap<SinkKind, Vec<(i32, i64)>>,
}

/// A checkpoint every sink committed.
#[derive(Debug, PartialEq, Eq)]
pub struct CheckpointDone {
    pub id: u64,
    pub kind: CheckpointKind,
    pub took: Duration,
    /// Per partition, the offset below which everything is durable in every sink
    /// (partitions where nothing was read yet are left out).
    pub durable: BTreeMap<i32, i64>,
    /// Per partition, the offset below which the input holds no memory any more: the
    /// Redis sink's fence, since its aggregates and commit plans are what grow with
    /// uncommitted input. The warehouse holds rows it has not published in its files
    /// (on disk or in the bucket) and in row groups kept within a share of their own
    /// (`sinks/warehouse/writer.rs`), so a warehouse that publishes once a minute does
    /// not hold reading back.
    pub released: BTreeMap<i32, i64>,
}

/// A sink's report that does not belong to the checkpoint in flight.
#[derive(Debug, PartialEq, Eq)]
pub struct Stale {
    pub checkpoint: u64,
    pub current: Option<u64>,
}

/// Checkpoints in flight at most: one being committed by the Redis sink while the next
/// travels (see the module doc).
pub const MAX_IN_FLIGHT: usize = 2;

#[derive(Default)]
pub struct Coordinator {
    last_id: u64,
    /// Oldest first; they complete in this order.
    in_flight: VecDeque<InFlight>,
    /// The latest instance watermark the timer sent; a checkpoint carries it when it
    /// covers every partition of the checkpoint.
    watermark: Option<InstanceMark>,
}

impl Coordinator {
    /// The oldest checkpoint in flight.
    pub fn in_flight(&self) -> Option<u64> {
        self.in_flight.front().map(|f| f.spec.id)
    }

    /// The oldest checkpoint in flight and how long it has been running.
    pub fn running(&self) -> Option<(u64, Duration)> {
        self.in_flight
            .front()
            .map(|f| (f.spec.id, f.started.elapsed()))
    }

    /// Whether a checkpoint of `kind` may start now: when none is in flight, or (a
    /// periodic one) when every sink but Redis has reported the one in flight.
    pub fn may_start(&self, kind: CheckpointKind) -> bool {
        match (self.in_flight.len(), self.in_flight.back()) {
            (0, _) => true,
            (n, Some(last)) if n < MAX_IN_FLIGHT && kind == CheckpointKind::Periodic => {
                SinkKind::ALL
                    .iter()
                    .filter(|sink| **sink != SinkKind::Redis)
                    .all(|sink| last.fences.contains_key(sink))
            }
            _ => false,
        }
    }

    /// Keeps the timer's latest watermark (an unknown one does not erase a known one:
    /// a checkpoint over partitions it does not cover carries none).
    pub fn set_watermark(&mut self, watermark: Option<InstanceMark>) {
        if watermark.is_some() {
            self.watermark = watermark;
        }
    }

    /// Starts a checkpoint over `partitions` (sorted), unless it may not start yet
    /// ([`Self::may_start`]) or there is nothing to checkpoint.
    pub fn start(
        &mut self,
        partitions: Vec<i32>,
        kind: CheckpointKind,
    ) -> Option<Arc<CheckpointSpec>> {
        if !self.may_start(kind) || partitions.is_empty() {
            return None;
        }
        self.last_id += 1;
        let spec = Arc::new(CheckpointSpec {
            id: self.last_id,
            watermark: self
                .watermark
                .as_ref()
                .filter(|mark| mark.covers(&partitions))
                .map(|mark| mark.ms),
            partitions,
            kind,
        });
        self.in_flight.push_back(InFlight {
            spec: spec.clone(),
            started: Instant::now(),
            fences: BTreeMap::new(),
        });
        Some(spec)
    }

    /// A sink committed `checkpoint` with `fences`; returns the checkpoints that are
    /// complete now (every sink reported them), oldest first. A checkpoint completes
    /// only after every older one has.
    pub fn sink_committed(
        &mut self,
        sink: SinkKind,
        checkpoint: u64,
        fences: Vec<(i32, i64)>,
    ) -> Result<Vec<CheckpointDone>, Stale> {
        let current = self.in_flight();
        let Some(in_flight) = self.in_flight.iter_mut().find(|f| f.spec.id == checkpoint) else {
            return Err(Stale {
                checkpoint,
                current,
            });
        };
        in_flight.fences.insert(sink, fences);
        let mut completed = Vec::new();
        let reported = |f: &InFlight| SinkKind::ALL.iter().all(|s| f.fences.contains_key(s));
        while self.in_flight.front().is_some_and(reported) {
            let done = self.in_flight.pop_front().expect("checked above");
            completed.push(CheckpointDone {
                id: done.spec.id,
                kind: done.spec.kind,
                took: done.started.elapsed(),
                durable: lowest(&done.spec.partitions, &done.fences, &SinkKind::ALL),
                released: lowest(&done.spec.partitions, &done.fences, &[SinkKind::Redis]),
            });
        }
        Ok(completed)
    }
}

/// Per partition, the lowest fence over `sinks`; -1 (nothing read) is left out.
fn lowest(
    partitions: &[i32],
    fences: &BTreeMap<SinkKind, Vec<(i32, i64)>>,
    sinks: &[SinkKind],
) -> BTreeMap<i32, i64> {
    let fence = |sink: &SinkKind, partition: i32| {
        fences
            .get(sink)?
            .iter()
            .find(|(p, _)| *p == partition)
            .map(|(_, o)| *o)
    };
    partitions
        .iter()
        .filter_map(|&p| {
            let offsets: Option<Vec<i64>> = sinks.iter().map(|s| fence(s, p)).collect();
            let lowest = offsets?.into_iter().min()?;
            (lowest >= 0).then_some((p, lowest))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(coordinator: &mut Coordinator, checkpoint: u64) {
        for sink in SinkKind::ALL {
            coordinator
                .sink_committed(sink, checkpoint, vec![])
                .unwrap();
        }
    }

    fn mark(ms: i64, partitions: &[i32]) -> InstanceMark {
        InstanceMark {
            ms,
            partitions: partitions.iter().copied().collect(),
        }
    }

    /// A watermark taken before partitions 2 and 3 were assigned here says nothing of
    /// their records: a checkpoint over them carries none (it would close their windows
    /// before their data, which the nemesis saw as correction rows on in-order data),
    /// until the timer sends one taken over them too.
    #[test]
    fn a_watermark_is_carried_only_by_checkpoints_over_partitions_it_covers() {
        let mut coordinator = Coordinator::default();
        coordinator.set_watermark(Some(mark(9_000, &[0, 1])));
        let spec = coordinator
            .start(vec![0, 1], CheckpointKind::Periodic)
            .unwrap();
        assert_eq!(spec.watermark, Some(9_000));
        complete(&mut coordinator, spec.id);
        let spec = coordinator
            .start(vec![0, 1, 2, 3], CheckpointKind::Periodic)
            .unwrap();
        assert_eq!(spec.watermark, None, "2 and 3 were not under it");
        complete(&mut coordinator, spec.id);
        coordinator.set_watermark(Some(mark(4_000, &[0, 1, 2, 3])));
        let spec = coordinator
            .start(vec![0, 1, 2, 3], CheckpointKind::Periodic)
            .unwrap();
        assert_eq!(spec.watermark, Some(4_000));
    }

    #[test]
    fn a_checkpoint_completes_when_every_sink_reported_at_the_lowest_fence() {
        let mut coordinator = Coordinator::default();
        coordinator.set_watermark(Some(mark(5, &[0, 1, 2])));
        coordinator.set_watermark(None);
        let spec = coordinator
            .start(vec![0, 1, 2], CheckpointKind::Periodic)
            .unwrap();
        assert_eq!((spec.id, spec.watermark), (1, Some(5)));
        assert!(
            coordinator.start(vec![0], CheckpointKind::Final).is_none(),
            "one at a time"
        );
        let redis = vec![(0, 10), (1, 7), (2, -1)];
        let warehouse = vec![(0, 8), (1, 9), (2, -1)];
        assert_eq!(
            coordinator.sink_committed(SinkKind::Redis, 1, redis),
            Ok(vec![])
        );
        assert_eq!(
            coordinator.sink_committed(SinkKind::Warehouse, 7, vec![]),
            Err(Stale {
                checkpoint: 7,
                current: Some(1)
            })
        );
        let done = coordinator
            .sink_committed(SinkKind::Warehouse, 1, warehouse)
            .unwrap()
            .pop()
            .unwrap();
        assert_eq!(done.durable, [(0, 8), (1, 7)].into(), "nothing read on 2");
        assert_eq!(done.released, [(0, 10), (1, 7)].into(), "the Redis sink's");
        assert_eq!(coordinator.in_flight(), None);
        let next = coordinator.start(vec![0], CheckpointKind::Final).unwrap();
        assert_eq!(next.id, 2);
        assert!(coordinator.start(vec![], CheckpointKind::Final).is_none());
    }

    /// The next checkpoint overlaps only the Redis sink's commit of the one before;
    /// they still complete in order, and a final checkpoint waits for both.
    #[test]
    fn a_second_checkpoint_starts_once_only_redis_is_behind() {
        let mut coordinator = Coordinator::default();
        let periodic = CheckpointKind::Periodic;
        coordinator.start(vec![0], periodic).unwrap();
        assert!(
            coordinator.start(vec![0], periodic).is_none(),
            "the warehouse has not reported 1"
        );
        let redis_first = coordinator.sink_committed(SinkKind::Redis, 1, vec![(0, 5)]);
        assert_eq!(redis_first, Ok(vec![]));
        assert!(
            coordinator.start(vec![0], periodic).is_none(),
            "Redis ahead of the warehouse does not let a second start"
        );
        let done = coordinator.sink_committed(SinkKind::Warehouse, 1, vec![(0, 5)]);
        assert_eq!(done.unwrap().len(), 1);

        coordinator.start(vec![0], periodic).unwrap();
        let none = coordinator.sink_committed(SinkKind::Warehouse, 2, vec![(0, 9)]);
        assert_eq!(none, Ok(vec![]));
        assert!(!coordinator.may_start(CheckpointKind::Final), "2 in flight");
        let third = coordinator.start(vec![0], periodic).unwrap();
        assert_eq!(third.id, 3, "only Redis is behind on 2");
        assert!(
            coordinator.start(vec![0], periodic).is_none(),
            "at most two in flight"
        );
        let early = coordinator.sink_committed(SinkKind::Warehouse, 3, vec![(0, 12)]);
        assert_eq!(early, Ok(vec![]));
        let early = coordinator.sink_committed(SinkKind::Redis, 3, vec![(0, 12)]);
        assert_eq!(early, Ok(vec![]), "3 waits for 2");
        assert_eq!(coordinator.in_flight(), Some(2));
        let both = coordinator
            .sink_committed(SinkKind::Redis, 2, vec![(0, 9)])
            .unwrap();
        let ids: Vec<u64> = both.iter().map(|c| c.id).collect();
        assert_eq!(ids, [2, 3], "in order");
        assert_eq!(both[1].durable, [(0, 12)].into());
        assert!(coordinator.may_start(CheckpointKind::Final));
    }
}
