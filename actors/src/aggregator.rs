//! `Aggregator`: one shard of the pre-aggregated Redis state, owning the templates whose
//! `businessId` hashes to it (see `logic::route::shard_of`).
//!
//! State is kept per source partition: template counts `(businessId, state) → receivers`
//! and the values to push onto receiver and message lists. A barrier for checkpoint *n*
//! on partition *p* moves *p*'s state into checkpoint *n*'s flush and *p* starts afresh
//! (empty, its tables' room kept: `logic/partition_state.rs`), so later records of *p* belong to
//! *n + 1* while other partitions carry on untouched:
//! no partition ever waits for another's barrier. Once the barrier of every partition
//! in the checkpoint has arrived, the shard hands its flush to the Redis sink and waits
//! until the sink has taken it (queued for planning, not yet in Redis: a slow Redis
//! holds the readers back through the source's uncommitted share).
//!
//! The shard also keeps each partition's open event-time windows for the series hash
//! ([`PartitionWindows`]). Unlike the deltas they outlive a barrier: at each barrier the
//! windows the checkpoint's watermark has passed are emitted (with any late
//! amendments) and the remaining open state travels in the flush, so the Redis sink
//! stores it with the same commit that moves the fence. A new claim hands the stored
//! state back ([`ShardInput::Restore`]) before the partition's first events.
//!
//! A panic in a shard stops the process (exit 70, `runtime/supervision.rs`): the shard
//! holds uncommitted state of every partition, which only a re-read from the fences
//! rebuilds, and a restart of the process does exactly that.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use actix::prelude::*;
use rustc_hash::FxHashMap;
use tracing::warn;

use crate::checkpoint::barrier::{Barrier, CheckpointSpec};
use crate::logic::partition_state::{PartitionState, UnitFilter};
use crate::logic::window::{Counts, PartitionWindows, WindowSpec};
use crate::messages::{EventBatch, PartitionDelta, ShardFlush, ShardInput};
use crate::metrics::Metrics;
use crate::protocol::keys::KeyLayout;
use crate::runtime::fault;
use crate::runtime::mailbox::{actix_capacity, Mailbox};
use crate::runtime::supervision;

/// Mailbox capacity of a shard, in event batches. Every reader can have one batch in
/// flight per shard; a small queue keeps backpressure prompt (a full queue is a sign the
/// Redis sink is behind, and more buffering would only hide it).
pub const AGGREGATOR_MAILBOX: usize = 8;

/// Counters of one shard, for tests and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AggregatorCounters {
    /// Events folded into state.
    pub events: u64,
    /// Flushes handed to the Redis sink.
    pub flushes: u64,
}

struct PendingCheckpoint {
    spec: Arc<CheckpointSpec>,
    seen: BTreeSet<i32>,
    deltas: Vec<PartitionDelta>,
}

pub struct Aggregator {
    shard: usize,
    redis: Mailbox<ShardFlush>,
    metrics: Metrics,
    partitions: FxHashMap<i32, PartitionState>,
    /// Open windows per source partition; they outlive barriers.
    windows: FxHashMap<i32, PartitionWindows>,
    window_spec: WindowSpec,
    layout: Arc<KeyLayout>,
    /// Per source partition, the unit fences its claim returned (rarely any).
    filters: FxHashMap<i32, UnitFilter>,
    pending: BTreeMap<u64, PendingCheckpoint>,
    counters: AggregatorCounters,
}

impl Aggregator {
    pub fn new(
        shard: usize,
        window_spec: WindowSpec,
        layout: KeyLayout,
        redis: Mailbox<ShardFlush>,
        metrics: Metrics,
    ) -> Self {
        Aggregator {
            layout: Arc::new(layout),
            filters: FxHashMap::default(),
            windows: FxHashMap::default(),
            window_spec,
            shard,
            redis,
            metrics,
            partitions: FxHashMap::default(),
            pending: BTreeMap::new(),
            counters: AggregatorCounters::default(),
        }
    }

    pub fn counters(&self) -> AggregatorCounters {
        self.counters
    }

    fn on_events(&mut self, batch: &EventBatch) {
        self.counters.events += batch.events.len() as u64;
        self.partitions
            .entry(batch.partition)
            .or_default()
            .fold(batch, self.filters.get(&batch.partition));
        let spec = self.window_spec;
        let windows = self.windows.entry(batch.partition).or_default();
        let mut late = 0;
        for event in &batch.events {
            let counts = Counts {
                events: 1,
                receivers: (event.receivers.end - event.receivers.start) as i64,
            };
            let start = spec.start_of(event.log_timestamp);
            if windows.add(&spec, start, event.business_id, event.state, counts) {
                late += 1;
            }
        }
        if late > 0 {
            self.metrics.late_events.inc_by(late);
        }
    }

    /// Moves the partition's state into the checkpoint; returns the shard's flush once
    /// every participating partition's barrier has arrived.
    fn on_barrier(&mut self, barrier: Barrier) -> Option<ShardFlush> {
        // Once this commit passes every unit fence, the final script drops them.
        if self
            .filters
            .get(&barrier.partition)
            .is_some_and(|f| f.passed_by(barrier.next_offset))
        {
            self.filters.remove(&barrier.partition);
        }
        let state = self.partitions.entry(barrier.partition).or_default();
        let id = barrier.spec.id;
        let pending = self.pending.entry(id).or_insert_with(|| PendingCheckpoint {
            spec: barrier.spec.clone(),
            seen: BTreeSet::new(),
            deltas: Vec::new(),
        });
        pending.seen.insert(barrier.partition);
        let windows = self.windows.entry(barrier.partition).or_default();
        windows.note_max_event(barrier.max_event_ms);
        let emitted = windows.close(&self.window_spec, barrier.spec.watermark);
        self.metrics
            .windows_closed
            .inc_by(emitted.closed.len() as u64);
        let open = windows.encode();
        pending
            .deltas
            .push(state.take_delta(&barrier, emitted, open));
        if pending.seen.len() < pending.spec.partitions.len() {
            return None;
        }
        let done = self.pending.remove(&id)?;
        self.counters.flushes += 1;
        Some(ShardFlush {
            shard: self.shard,
            spec: done.spec,
            partitions: done.deltas,
        })
    }
}

impl Aggregator {
    fn on_input(&mut self, input: ShardInput) -> Option<ShardFlush> {
        match input {
            ShardInput::Events(batch) => {
                fault::panic_point(fault::AGGREGATOR_INPUT);
                self.on_events(&batch);
                None
            }
            ShardInput::Barrier(barrier) => self.on_barrier(barrier),
            ShardInput::Restore {
                partition,
                windows,
                unit_fences,
            } => {
                self.windows.insert(partition, windows);
                match UnitFilter::new(self.layout.clone(), &unit_fences) {
                    Some(filter) => self.filters.insert(partition, filter),
                    None => self.filters.remove(&partition),
                };
                self.partitions.remove(&partition);
                None
            }
        }
    }
}

impl Actor for Aggregator {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(actix_capacity(AGGREGATOR_MAILBOX));
    }
}

impl Handler<ShardInput> for Aggregator {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, input: ShardInput, _ctx: &mut Self::Context) -> Self::Result {
        let flush = match supervision::catch(|| self.on_input(input)) {
            Ok(flush) => flush,
            Err(panic) => {
                supervision::stateful_panic("aggregator", &panic);
                None
            }
        };
        let Some(flush) = flush else {
            return AtomicResponse::new(Box::pin(actix::fut::ready(())));
        };
        let redis = self.redis.clone();
        let shard = self.shard;
        AtomicResponse::new(Box::pin(
            async move {
                if let Err(error) = redis.send(flush).await {
                    warn!(shard, %error, "redis sink is gone; flush dropped during shutdown");
                }
            }
            .into_actor(self),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::barrier::CheckpointKind;

    fn spec(id: u64, partitions: Vec<i32>) -> Arc<CheckpointSpec> {
        Arc::new(CheckpointSpec {
            id,
            partitions,
            kind: CheckpointKind::Periodic,
            watermark: None,
        })
    }

    fn windows() -> WindowSpec {
        WindowSpec::new(60_000, 0, chrono_tz::UTC)
    }

    /// Stands in for the Redis sink; the tests call the shard's methods directly, so
    /// nothing is ever sent to it.
    struct NoSink;
    impl Actor for NoSink {
        type Context = Context<Self>;
    }
    impl Handler<ShardFlush> for NoSink {
        type Result = ();
        fn handle(&mut self, _: ShardFlush, _: &mut Self::Context) {}
    }

    fn shard_with_metrics(metrics: &Metrics) -> Aggregator {
        let redis = Mailbox::new(NoSink.start(), 1, metrics.mailbox("redis_sink"));
        Aggregator::new(0, windows(), KeyLayout::default(), redis, metrics.clone())
    }

    fn barrier_at(id: u64, partition: i32, next_offset: i64, watermark: Option<i64>) -> Barrier {
        Barrier {
            spec: Arc::new(CheckpointSpec {
                id,
                partitions: vec![partition],
                kind: CheckpointKind::Periodic,
                watermark,
            }),
            partition,
            next_offset,
            claim: CLAIM,
            max_event_ms: None,
        }
    }

    fn events_at(partition: i32, times: &[i64]) -> EventBatch {
        let mut batch = EventBatch::new(partition);
        for (offset, &ts) in times.iter().enumerate() {
            batch.push(offset as i64, 10, 7, ts, ["a", "b"], None);
        }
        batch
    }

    fn series_of(flush: &ShardFlush) -> Vec<(crate::logic::window::WindowKey, Counts)> {
        flush
            .partitions
            .iter()
            .flat_map(|d| d.series.clone())
            .collect()
    }

    /// Out-of-order events within the bound count in their own window; the window is
    /// emitted exactly once, at the barrier whose watermark reaches its end.
    #[actix::test]
    async fn windows_close_once_when_the_watermark_passes_their_end() {
        let metrics = Metrics::new();
        let mut shard = shard_with_metrics(&metrics);
        shard.on_events(&events_at(0, &[59_000, 61_000, 58_000, 121_000]));
        let flush = shard.on_barrier(barrier_at(1, 0, 4, Some(59_999))).unwrap();
        assert!(series_of(&flush).is_empty(), "window [0, 60 s) still open");
        let flush = shard.on_barrier(barrier_at(2, 0, 4, Some(60_000))).unwrap();
        assert_eq!(
            series_of(&flush),
            vec![(
                (0, 7, 10),
                Counts {
                    events: 2,
                    receivers: 4
                }
            )]
        );
        let flush = shard
            .on_barrier(barrier_at(3, 0, 4, Some(119_000)))
            .unwrap();
        assert!(series_of(&flush).is_empty(), "emitted once");
        assert_eq!(metrics.windows_closed.get(), 1);
        assert_eq!(metrics.late_events.get(), 0);
    }

    /// A late event amends its closed window at the next barrier and is counted.
    #[actix::test]
    async fn late_events_amend_the_closed_window() {
        let metrics = Metrics::new();
        let mut shard = shard_with_metrics(&metrics);
        shard.on_events(&events_at(0, &[1_000]));
        shard.on_barrier(barrier_at(1, 0, 1, Some(60_000))).unwrap();
        shard.on_events(&events_at(0, &[2_000, 61_000]));
        assert_eq!(metrics.late_events.get(), 1);
        let flush = shard.on_barrier(barrier_at(2, 0, 3, Some(60_500))).unwrap();
        assert_eq!(
            series_of(&flush),
            vec![(
                (0, 7, 10),
                Counts {
                    events: 1,
                    receivers: 2
                }
            )]
        );
        // The open window's state travels in the flush.
        let state =
            crate::logic::window::PartitionWindows::decode(&flush.partitions[0].windows).unwrap();
        assert_eq!(state.open_entries(), 1);
        assert_eq!(state.closed_through(), Some(60_500));
    }

    /// A restart in the middle of an open window: the state stored with the last
    /// commit, restored into a new shard, plus the events after the fence, closes into
    /// exactly the counts one uninterrupted shard emits.
    #[actix::test]
    async fn a_restart_mid_window_loses_and_duplicates_nothing() {
        let before = [10_000, 20_000, 70_000];
        let after = [30_000, 80_000, 130_000];
        let metrics = Metrics::new();
        let mut uninterrupted = shard_with_metrics(&metrics);
        uninterrupted.on_events(&events_at(0, &before));
        uninterrupted
            .on_barrier(barrier_at(1, 0, 3, Some(5_000)))
            .unwrap();
        uninterrupted.on_events(&events_at(0, &after));
        let expected = series_of(
            &uninterrupted
                .on_barrier(barrier_at(2, 0, 6, Some(125_000)))
                .unwrap(),
        );

        let mut first = shard_with_metrics(&metrics);
        first.on_events(&events_at(0, &before));
        let committed = first.on_barrier(barrier_at(1, 0, 3, Some(5_000))).unwrap();
        // Events after the fence reach the first shard, which then dies uncommitted.
        first.on_events(&events_at(0, &after));
        drop(first);
        let mut second = shard_with_metrics(&metrics);
        let stored =
            crate::logic::window::PartitionWindows::decode(&committed.partitions[0].windows)
                .unwrap();
        assert_eq!(stored.open_entries(), 2);
        second.windows.insert(0, stored);
        second.on_events(&events_at(0, &after));
        let resumed = series_of(
            &second
                .on_barrier(barrier_at(2, 0, 6, Some(125_000)))
                .unwrap(),
        );
        assert_eq!(resumed, expected);
        assert_eq!(
            expected,
            vec![
                (
                    (0, 7, 10),
                    Counts {
                        events: 3,
                        receivers: 6
                    }
                ),
                (
                    (60_000, 7, 10),
                    Counts {
                        events: 2,
                        receivers: 4
                    }
                )
            ]
        );
    }

    const CLAIM: crate::checkpoint::claim::Claim = crate::checkpoint::claim::Claim {
        epoch: 1,
        redis: 0,
        warehouse: 0,
    };

    #[actix::test]
    async fn flushes_once_every_partition_sent_its_barrier() {
        let mut shard = shard_with_metrics(&Metrics::new());
        let mut batch = EventBatch::new(1);
        batch.push(0, 10, 7, 5, ["a"], None);
        shard.on_events(&batch);
        let s = spec(1, vec![1, 2]);
        assert!(shard
            .on_barrier(Barrier {
                spec: s.clone(),
                partition: 1,
                next_offset: 10,
                claim: CLAIM,
                max_event_ms: None,
            })
            .is_none());
        // Records of partition 1 after its barrier belong to the next checkpoint.
        shard.on_events(&batch);
        let flush = shard
            .on_barrier(Barrier {
                spec: s,
                partition: 2,
                next_offset: 4,
                claim: CLAIM,
                max_event_ms: None,
            })
            .expect("complete");
        assert_eq!(flush.partitions.len(), 2);
        let p1 = flush.partitions.iter().find(|d| d.partition == 1).unwrap();
        assert_eq!(p1.template_counts, vec![(7, 10, 1)]);
        assert_eq!(p1.next_offset, 10);
        let next = shard
            .on_barrier(Barrier {
                spec: spec(2, vec![1]),
                partition: 1,
                next_offset: 11,
                claim: CLAIM,
                max_event_ms: None,
            })
            .unwrap();
        assert_eq!(next.partitions[0].template_counts, vec![(7, 10, 1)]);
        assert_eq!(
            shard.counters(),
            AggregatorCounters {
                events: 2,
                flushes: 2
            }
        );
    }
}
