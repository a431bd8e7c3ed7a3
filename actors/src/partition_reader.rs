//! `PartitionReader`: one per assigned Kafka partition. Decodes and validates raw
//! records, builds the warehouse rows (columnar, split by Hive folder), routes events
//! to aggregator shards by a stable hash of `businessId`, and forwards barriers after
//! its last record.
//!
//! Records below a sink's fence (see [`Claim`]) were already made durable by that sink
//! before this assignment; they are read again only because the other sink needs them,
//! and are skipped for the sink that has them.
//!
//! Its handler waits (`send().await`) for every downstream actor in turn, so while a
//! sink is slow this reader's mailbox fills up and the source pauses the partition.
//!
//! Before its first batch the reader hands the partition's stored open windows (read
//! at the claim) to their owners, in band: each shard gets the templates it owns, the
//! warehouse sink the `dws_template_state_1m` part. Warehouse-bound events are also
//! pre-aggregated per (window, businessId, state) here, so the sink folds a few
//! counts per batch instead of re-reading its rows.

use std::sync::Arc;

use actix::prelude::*;
use tracing::{debug, warn};

use crate::clock::Clock;
use crate::config::DecodeConfig;
use crate::decode::{decode, is_known_state, TimeBounds};
use crate::fences::{Claim, StoredWindows};
use crate::mailbox::{actix_capacity, Mailbox};
use crate::messages::{
    Barrier, DetailBatch, EventBatch, PartitionInput, RecordBatch, ShardInput, Table, TableRows,
    WarehouseInput,
};
use crate::metrics::{Metrics, ReasonLabel};
use crate::tables::{DeadLetterRows, Folders, OdsRows};
use crate::timer::WatermarkUpdate;
use crate::window::{Counts, WindowKey, WindowSpec};
use rustc_hash::FxHashMap;

/// Mailbox capacity of a reader, in record batches. The source pauses the partition
/// as soon as this is full, so this times `source.batch_max_bytes` bounds the memory a
/// partition can hold between Kafka and its reader. Two keeps one batch queued while
/// one is processed: enough to hide the handoff, small enough for prompt backpressure.
pub const READER_MAILBOX: usize = 2;

/// Where a reader sends its output. Every reader holds clones of the same links, so
/// each bound is shared by all the readers that send to one actor.
#[derive(Clone)]
pub struct ReaderLinks {
    pub shards: Arc<[Mailbox<ShardInput>]>,
    pub warehouse: Mailbox<WarehouseInput>,
    /// Event-time reports (`try_send`: a dropped report is superseded by the next).
    pub timer: Mailbox<WatermarkUpdate>,
}

/// Counters of one reader, for tests and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReaderCounters {
    /// Records received from Kafka.
    pub records: u64,
    /// Records decoded into events.
    pub events: u64,
    /// Records sent to the dead-letter table.
    pub dead_letters: u64,
    /// Barriers forwarded.
    pub barriers: u64,
}

/// What every reader of this process shares: where output goes and how records are
/// read. Cheap to clone.
#[derive(Clone)]
pub struct ReaderContext {
    pub topic: Arc<str>,
    pub limits: DecodeConfig,
    pub bounds: TimeBounds,
    pub tz: chrono_tz::Tz,
    pub windows: WindowSpec,
    pub links: ReaderLinks,
    pub metrics: Metrics,
    /// Processing time, by Redis's clock.
    pub clock: Clock,
}

pub struct PartitionReader {
    restart: crate::backoff::RestartBackoff,
    context: ReaderContext,
    partition: i32,
    claim: Claim,
    /// The claim's stored windows until they are handed over (once, even if the
    /// supervisor restarts this actor: the struct survives a restart).
    restore: Option<StoredWindows>,
    /// The largest event time seen, starting from the stored state's; barriers carry it
    /// to the sinks, which store it with the windows.
    max_event_ms: Option<i64>,
    counters: ReaderCounters,
}

impl PartitionReader {
    pub fn new(
        context: ReaderContext,
        partition: i32,
        claim: Claim,
        restored: StoredWindows,
    ) -> Self {
        // Both sinks resume from their own state; the watermark from the one behind,
        // so that neither sees its re-read records as late.
        let max_event_ms = restored
            .series
            .max_event_ms()
            .zip(restored.dws.max_event_ms())
            .map(|(a, b)| a.min(b));
        PartitionReader {
            restart: Default::default(),
            context,
            partition,
            claim,
            restore: Some(restored),
            max_event_ms,
            counters: ReaderCounters::default(),
        }
    }

    pub fn counters(&self) -> ReaderCounters {
        self.counters
    }

    /// Decodes one batch into per-shard event batches and folder-split warehouse rows,
    /// and reports the batch's largest event time to the timer.
    fn process(&mut self, batch: &RecordBatch) -> (Vec<EventBatch>, DetailBatch) {
        let mut max_event_ms: Option<i64> = None;
        let shards = self.context.links.shards.len();
        let mut routed: Vec<EventBatch> = (0..shards)
            .map(|_| EventBatch::new(self.partition))
            .collect();
        let mut ods: Vec<(String, OdsRows)> = Vec::new();
        let mut dead: Vec<(String, DeadLetterRows)> = Vec::new();
        let mut folders = Folders::new(self.context.tz);
        let mut windows: FxHashMap<WindowKey, Counts> = FxHashMap::default();
        let now_ms = self.context.clock.now_ms();
        let ingest_ms = now_ms;
        let ingest_day = folders
            .day_folder(ingest_ms)
            .unwrap_or_else(|| "dt=1970-01-01".into());
        for record in &batch.records {
            self.counters.records += 1;
            let to_redis = record.offset >= self.claim.redis;
            let to_warehouse = record.offset >= self.claim.warehouse;
            if !to_redis && !to_warehouse {
                continue;
            }
            let payload = batch.payload(record);
            let decoded = decode(payload, &self.context.limits).and_then(|event| {
                self.context.bounds.check(event.log_timestamp, now_ms)?;
                match folders.hour_folder(event.log_timestamp) {
                    Some(folder) => Ok((event, folder.to_string())),
                    None => Err(crate::decode::DecodeError::WrongType(format!(
                        "logTimestamp {} is outside the representable date range",
                        event.log_timestamp
                    ))),
                }
            });
            match decoded {
                Ok((event, folder)) => {
                    self.counters.events += 1;
                    max_event_ms = Some(
                        max_event_ms.map_or(event.log_timestamp, |m| m.max(event.log_timestamp)),
                    );
                    if !is_known_state(event.state) {
                        self.context.metrics.unknown_state(event.state);
                    }
                    if to_warehouse {
                        let rows = match ods.iter_mut().position(|(f, _)| *f == folder) {
                            Some(i) => &mut ods[i].1,
                            None => {
                                ods.push((folder, OdsRows::default()));
                                &mut ods.last_mut().expect("just pushed").1
                            }
                        };
                        rows.append(
                            &event,
                            &self.context.topic,
                            self.partition,
                            record.offset,
                            ingest_ms,
                        );
                        let start = self.context.windows.start_of(event.log_timestamp);
                        windows
                            .entry((start, event.business_id, event.state))
                            .or_default()
                            .add(Counts {
                                events: 1,
                                receivers: event.ids.len() as i64,
                            });
                    }
                    if !to_redis {
                        continue;
                    }
                    let shard = shard_of(event.business_id, shards);
                    routed[shard].push(
                        record.offset,
                        event.state,
                        event.business_id,
                        event.log_timestamp,
                        event.ids.iter().map(|id| id.as_ref()),
                        event.message_id.as_deref(),
                    );
                }
                Err(_) if !to_warehouse => {}
                Err(error) => {
                    self.counters.dead_letters += 1;
                    let reason = error.reason();
                    self.context
                        .metrics
                        .dead_letters
                        .get_or_create(&ReasonLabel { reason })
                        .inc();
                    debug!(partition = self.partition, offset = record.offset, reason, %error, "dead-lettered record");
                    if dead.is_empty() {
                        dead.push((ingest_day.clone(), DeadLetterRows::default()));
                    }
                    dead[0].1.append(
                        payload,
                        reason,
                        &error.to_string(),
                        &self.context.topic,
                        self.partition,
                        record.offset,
                        ingest_ms,
                    );
                }
            }
        }
        if let Some(max) = max_event_ms {
            self.max_event_ms = Some(self.max_event_ms.map_or(max, |m| m.max(max)));
        }
        // Off the data path: a report that finds the timer busy is dropped; the next
        // batch's maximum supersedes it.
        let _ = self
            .context
            .links
            .timer
            .try_send(WatermarkUpdate::Observed {
                partition: self.partition,
                max_event_ms,
            });
        self.context
            .metrics
            .records_read
            .inc_by(batch.records.len() as u64);
        self.context
            .metrics
            .events_decoded
            .inc_by(ods.iter().map(|(_, r)| r.len() as u64).sum());
        let mut parts = Vec::with_capacity(ods.len() + dead.len());
        for (folder, mut rows) in ods {
            parts.push(TableRows {
                table: Table::OdsAnchorLog,
                folder,
                rows: rows.finish(),
            });
        }
        for (folder, mut rows) in dead {
            if !rows.is_empty() {
                parts.push(TableRows {
                    table: Table::DeadLetter,
                    folder,
                    rows: rows.finish(),
                });
            }
        }
        (
            routed,
            DetailBatch {
                partition: self.partition,
                parts,
                windows: windows.into_iter().collect(),
            },
        )
    }
}

/// The aggregator shard that owns `business_id`: FNV-1a over its bytes, so the choice
/// is stable across processes and releases.
pub fn shard_of(business_id: i64, shards: usize) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in business_id.to_le_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % shards.max(1) as u64) as usize
}

impl Actor for PartitionReader {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.restart.started(ctx);
        ctx.set_mailbox_capacity(actix_capacity(READER_MAILBOX));
        let links = self.context.links.clone();
        let partition = self.partition;
        let restored = self.max_event_ms;
        let restore = self.restore.take();
        // `wait` holds the mailbox: no batch is handled before the timer knows the
        // partition and its stored state is handed on.
        ctx.wait(
            async move {
                // Control message, one per assignment: waits for room so none is lost.
                let assigned = links
                    .timer
                    .send(WatermarkUpdate::Assigned {
                        partition,
                        restored,
                    })
                    .await;
                let restored = match restore {
                    Some(stored) => forward_restore(&links, partition, stored).await,
                    None => Ok(()),
                };
                if let Err(error) = assigned.and(restored) {
                    warn!(partition, %error, "downstream actor is gone; state not handed on during shutdown");
                }
            }
            .into_actor(self),
        );
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        // Off the data path, once per revocation: delivered by a task of its own,
        // since the actor's context is gone.
        let timer = self.context.links.timer.clone();
        let partition = self.partition;
        actix::spawn(async move {
            let _ = timer.send(WatermarkUpdate::Revoked { partition }).await;
        });
    }
}

impl Supervised for PartitionReader {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.restart.restarting();
        // A reader holds no state between batches; a restart only needs counting.
        self.context
            .metrics
            .actor_restarts
            .get_or_create(&crate::metrics::ActorLabel {
                actor: "partition_reader",
            })
            .inc();
        warn!(partition = self.partition, "partition reader restarting");
    }
}

impl Handler<PartitionInput> for PartitionReader {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, input: PartitionInput, _ctx: &mut Self::Context) -> Self::Result {
        let links = self.context.links.clone();
        let partition = self.partition;
        let work = match input {
            PartitionInput::Records(batch) => {
                let (routed, detail) = self.process(&batch);
                Work::Data(routed, detail)
            }
            PartitionInput::Barrier(mut barrier) => {
                self.counters.barriers += 1;
                barrier.max_event_ms = self.max_event_ms;
                Work::Barrier(barrier)
            }
        };
        AtomicResponse::new(Box::pin(
            async move {
                let result = match work {
                    Work::Data(routed, detail) => forward_data(&links, routed, detail).await,
                    Work::Barrier(barrier) => forward_barrier(&links, barrier).await,
                };
                if let Err(error) = result {
                    // Downstream actors are supervised and never stop while the pipeline
                    // runs; this only happens during teardown.
                    warn!(partition, %error, "downstream actor is gone; output dropped during shutdown");
                }
            }
            .into_actor(self),
        ))
    }
}

enum Work {
    Data(Vec<EventBatch>, DetailBatch),
    Barrier(Barrier),
}

async fn forward_data(
    links: &ReaderLinks,
    routed: Vec<EventBatch>,
    detail: DetailBatch,
) -> Result<(), MailboxError> {
    for (shard, events) in routed.into_iter().enumerate() {
        if !events.events.is_empty() {
            links.shards[shard].send(ShardInput::Events(events)).await?;
        }
    }
    if !detail.parts.is_empty() {
        links.warehouse.send(WarehouseInput::Rows(detail)).await?;
    }
    Ok(())
}

/// Hands a claimed partition's stored open windows to their owners (every shard gets
/// its part, possibly empty, which also drops whatever it held from an earlier claim).
async fn forward_restore(
    links: &ReaderLinks,
    partition: i32,
    stored: StoredWindows,
) -> Result<(), MailboxError> {
    let shards = links.shards.len();
    for (index, shard) in links.shards.iter().enumerate() {
        let mut windows = stored.series.clone();
        windows.retain(|business_id| shard_of(business_id, shards) == index);
        let unit_fences = stored.unit_fences.clone();
        shard
            .send(ShardInput::Restore {
                partition,
                windows,
                unit_fences,
            })
            .await?;
    }
    links
        .warehouse
        .send(WarehouseInput::Restore {
            partition,
            windows: stored.dws,
        })
        .await
}

async fn forward_barrier(links: &ReaderLinks, barrier: Barrier) -> Result<(), MailboxError> {
    for shard in links.shards.iter() {
        shard.send(ShardInput::Barrier(barrier.clone())).await?;
    }
    links.warehouse.send(WarehouseInput::Barrier(barrier)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_choice_is_stable_and_spread() {
        assert_eq!(shard_of(1000001220231120, 4), shard_of(1000001220231120, 4));
        let mut seen = [0usize; 4];
        for b in 0..1000 {
            seen[shard_of(1_000_000_220_231_120 + b * 100_000_000, 4)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 150), "{seen:?}");
        assert_eq!(shard_of(42, 1), 0);
    }
}
