//! The checkpoint coordinator, as plain code: it numbers checkpoints, lets one run at a
//! time, collects each sink's fences, and says when a checkpoint is complete — when
//! every sink ([`SinkKind::ALL`]) reported it — and which offsets are then durable in
//! both (the lowest fence over the sinks, per partition). The Kafka source drives it
//! (`source/flow.rs`) and commits those offsets to Kafka.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::checkpoint::barrier::{CheckpointKind, CheckpointSpec};
use crate::checkpoint::claim::SinkKind;

struct InFlight {
    spec: Arc<CheckpointSpec>,
    started: Instant,
    fences: BTreeMap<SinkKind, Vec<(i32, i64)>>,
}

/// A checkpoint every sink committed.
#[derive(Debug, PartialEq, Eq)]
pub struct Completed {
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

#[derive(Default)]
pub struct Coordinator {
    last_id: u64,
    in_flight: Option<InFlight>,
    /// The latest instance watermark the timer sent; every checkpoint carries it.
    watermark: Option<i64>,
}

impl Coordinator {
    pub fn in_flight(&self) -> Option<u64> {
        self.in_flight.as_ref().map(|f| f.spec.id)
    }

    /// Keeps the timer's latest watermark (an unknown one does not erase a known one).
    pub fn set_watermark(&mut self, watermark: Option<i64>) {
        if watermark.is_some() {
            self.watermark = watermark;
        }
    }

    /// Starts a checkpoint over `partitions` (sorted), unless one is in flight or there
    /// is nothing to checkpoint.
    pub fn start(
        &mut self,
        partitions: Vec<i32>,
        kind: CheckpointKind,
    ) -> Option<Arc<CheckpointSpec>> {
        if self.in_flight.is_some() || partitions.is_empty() {
            return None;
        }
        self.last_id += 1;
        let spec = Arc::new(CheckpointSpec {
            id: self.last_id,
            partitions,
            kind,
            watermark: self.watermark,
        });
        self.in_flight = Some(InFlight {
            spec: spec.clone(),
            started: Instant::now(),
            fences: BTreeMap::new(),
        });
        Some(spec)
    }

    /// A sink committed `checkpoint` with `fences`; returns the checkpoint once every
    /// sink has.
    pub fn sink_committed(
        &mut self,
        sink: SinkKind,
        checkpoint: u64,
        fences: Vec<(i32, i64)>,
    ) -> Result<Option<Completed>, Stale> {
        let current = self.in_flight();
        let Some(in_flight) = self.in_flight.as_mut().filter(|f| f.spec.id == checkpoint) else {
            return Err(Stale {
                checkpoint,
                current,
            });
        };
        in_flight.fences.insert(sink, fences);
        if SinkKind::ALL
            .iter()
            .any(|sink| !in_flight.fences.contains_key(sink))
        {
            return Ok(None);
        }
        let done = self.in_flight.take().expect("checked above");
        Ok(Some(Completed {
            id: done.spec.id,
            kind: done.spec.kind,
            took: done.started.elapsed(),
            durable: lowest(&done.spec.partitions, &done.fences, &SinkKind::ALL),
            released: lowest(&done.spec.partitions, &done.fences, &[SinkKind::Redis]),
        }))
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

    #[test]
    fn a_checkpoint_completes_when_every_sink_reported_at_the_lowest_fence() {
        let mut coordinator = Coordinator::default();
        coordinator.set_watermark(Some(5));
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
            Ok(None)
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
            .unwrap();
        assert_eq!(done.durable, [(0, 8), (1, 7)].into(), "nothing read on 2");
        assert_eq!(done.released, [(0, 10), (1, 7)].into(), "the Redis sink's");
        assert_eq!(coordinator.in_flight(), None);
        let next = coordinator.start(vec![0], CheckpointKind::Final).unwrap();
        assert_eq!(next.id, 2);
        assert!(coordinator.start(vec![], CheckpointKind::Final).is_none());
    }
}
