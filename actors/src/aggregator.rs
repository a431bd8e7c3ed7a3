//! `Aggregator`: one shard of the pre-aggregated Redis state, owning the templates whose
//! `businessId` hashes to it (see `partition_reader::shard_of`).
//!
//! State is kept per source partition: template counts `(businessId, state) → receivers`
//! and the values to push onto receiver and message lists. A barrier for checkpoint *n*
//! on partition *p* moves *p*'s state into checkpoint *n*'s flush and *p* starts afresh,
//! so later records of *p* belong to *n + 1* while other partitions carry on untouched:
//! no partition ever waits for another's barrier. Once the barrier of every partition
//! in the checkpoint has arrived, the shard hands its flush to the Redis sink and waits
//! until the sink has taken it, which is how a slow Redis holds the readers back.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use actix::prelude::*;
use rustc_hash::FxHashMap;
use tracing::warn;

use crate::messages::{
    Barrier, CheckpointSpec, EventBatch, ListPush, PartitionDelta, ShardFlush, ShardInput,
    TraceValue,
};
use crate::metrics::{send_metered, ActorLabel, MailboxMeter, Metrics};
use crate::redis_sink::RedisSink;

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

/// Pre-aggregated state of one source partition in one shard.
#[derive(Default)]
pub struct PartitionState {
    counts: FxHashMap<(i64, i32), i64>,
    receivers: FxHashMap<Box<str>, Vec<TraceValue>>,
    messages: FxHashMap<Box<str>, Vec<TraceValue>>,
}

fn push_value(lists: &mut FxHashMap<Box<str>, Vec<TraceValue>>, key: &str, value: TraceValue) {
    match lists.get_mut(key) {
        Some(values) => values.push(value),
        None => {
            lists.insert(key.into(), vec![value]);
        }
    }
}

fn into_pushes(lists: FxHashMap<Box<str>, Vec<TraceValue>>) -> Vec<ListPush> {
    lists
        .into_iter()
        .map(|(key, values)| ListPush {
            key: key.into(),
            values,
        })
        .collect()
}

impl PartitionState {
    /// Folds a batch of events into the state.
    pub fn fold(&mut self, batch: &EventBatch) {
        for event in &batch.events {
            let receivers = (event.receivers.end - event.receivers.start) as i64;
            *self
                .counts
                .entry((event.business_id, event.state))
                .or_insert(0) += receivers;
            let value = TraceValue {
                state: event.state,
                business_id: event.business_id,
                timestamp: event.log_timestamp,
            };
            for receiver in batch.receivers_of(event) {
                push_value(&mut self.receivers, receiver, value);
            }
            if let Some(message_id) = &event.message_id {
                push_value(&mut self.messages, batch.text(message_id), value);
            }
        }
    }

    fn into_delta(self, barrier: &Barrier) -> PartitionDelta {
        PartitionDelta {
            partition: barrier.partition,
            next_offset: barrier.next_offset,
            claim: barrier.claim,
            template_counts: self
                .counts
                .into_iter()
                .map(|((b, s), n)| (b, s, n))
                .collect(),
            receiver_lists: into_pushes(self.receivers),
            message_lists: into_pushes(self.messages),
        }
    }
}

struct PendingCheckpoint {
    spec: Arc<CheckpointSpec>,
    seen: BTreeSet<i32>,
    deltas: Vec<PartitionDelta>,
}

pub struct Aggregator {
    restart: crate::backoff::RestartBackoff,
    shard: usize,
    redis: Addr<RedisSink>,
    metrics: Metrics,
    own_meter: MailboxMeter,
    redis_meter: MailboxMeter,
    partitions: FxHashMap<i32, PartitionState>,
    pending: BTreeMap<u64, PendingCheckpoint>,
    counters: AggregatorCounters,
}

impl Aggregator {
    pub fn new(shard: usize, redis: Addr<RedisSink>, metrics: Metrics) -> Self {
        Aggregator {
            restart: Default::default(),
            shard,
            redis,
            own_meter: metrics.mailbox("aggregator"),
            redis_meter: metrics.mailbox("redis_sink"),
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
            .fold(batch);
    }

    /// Moves the partition's state into the checkpoint; returns the shard's flush once
    /// every participating partition's barrier has arrived.
    fn on_barrier(&mut self, barrier: Barrier) -> Option<ShardFlush> {
        let state = self
            .partitions
            .remove(&barrier.partition)
            .unwrap_or_default();
        let id = barrier.spec.id;
        let pending = self.pending.entry(id).or_insert_with(|| PendingCheckpoint {
            spec: barrier.spec.clone(),
            seen: BTreeSet::new(),
            deltas: Vec::new(),
        });
        pending.seen.insert(barrier.partition);
        pending.deltas.push(state.into_delta(&barrier));
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

impl Actor for Aggregator {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.restart.started(ctx);
        ctx.set_mailbox_capacity(AGGREGATOR_MAILBOX);
    }
}

impl Supervised for Aggregator {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.restart.restarting();
        // The struct survives a restart with its state, so nothing is lost.
        self.metrics
            .actor_restarts
            .get_or_create(&ActorLabel {
                actor: "aggregator",
            })
            .inc();
        warn!(shard = self.shard, "aggregator restarting");
    }
}

impl Handler<ShardInput> for Aggregator {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, input: ShardInput, _ctx: &mut Self::Context) -> Self::Result {
        self.own_meter.received();
        let flush = match input {
            ShardInput::Events(batch) => {
                self.on_events(&batch);
                None
            }
            ShardInput::Barrier(barrier) => self.on_barrier(barrier),
        };
        let Some(flush) = flush else {
            return AtomicResponse::new(Box::pin(actix::fut::ready(())));
        };
        let redis = self.redis.clone();
        let meter = self.redis_meter.clone();
        let shard = self.shard;
        AtomicResponse::new(Box::pin(
            async move {
                if let Err(error) = send_metered(&redis, flush, &meter).await {
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
    use crate::messages::CheckpointKind;

    fn spec(id: u64, partitions: Vec<i32>) -> Arc<CheckpointSpec> {
        Arc::new(CheckpointSpec {
            id,
            partitions,
            kind: CheckpointKind::Periodic,
        })
    }

    fn state_with(events: &[(i32, i64, &[&str], Option<&str>)]) -> PartitionState {
        let mut batch = EventBatch::new(0);
        for (i, (state, business_id, ids, message_id)) in events.iter().enumerate() {
            batch.push(
                *state,
                *business_id,
                i as i64,
                ids.iter().copied(),
                *message_id,
            );
        }
        let mut partition = PartitionState::default();
        partition.fold(&batch);
        partition
    }

    #[test]
    fn counts_receivers_per_template_and_state() {
        let state = state_with(&[
            (10, 7, &["a", "b"], Some("m")),
            (10, 7, &["a"], Some("m")),
            (60, 7, &[], None),
        ]);
        assert_eq!(state.counts[&(7, 10)], 3);
        assert_eq!(state.counts[&(7, 60)], 0);
        assert_eq!(state.receivers["a"].len(), 2);
        assert_eq!(state.receivers["b"].len(), 1);
        assert_eq!(
            state.messages["m"]
                .iter()
                .map(|v| v.timestamp)
                .collect::<Vec<_>>(),
            vec![0, 1]
        );
    }

    const CLAIM: crate::fences::Claim = crate::fences::Claim {
        epoch: 1,
        redis: 0,
        warehouse: 0,
    };

    #[actix::test]
    async fn flushes_once_every_partition_sent_its_barrier() {
        let metrics = Metrics::new();
        // The sink is never sent to: the test calls the shard's methods directly.
        let (tx, _rx) = std::sync::mpsc::channel();
        let redis = RedisSink::new(
            Default::default(),
            chrono_tz::UTC,
            1,
            metrics.clone(),
            tx,
            crate::fences::FenceKeys::new("g", "t"),
        )
        .start();
        let mut shard = Aggregator::new(0, redis, metrics);
        let mut batch = EventBatch::new(1);
        batch.push(10, 7, 5, ["a"], None);
        shard.on_events(&batch);
        let s = spec(1, vec![1, 2]);
        assert!(shard
            .on_barrier(Barrier {
                spec: s.clone(),
                partition: 1,
                next_offset: 10,
                claim: CLAIM,
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
