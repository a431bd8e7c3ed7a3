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

use crate::aggregator::Aggregator;
use crate::config::DecodeConfig;
use crate::decode::{decode, is_known_state};
use crate::fences::{Claim, StoredWindows};
use crate::messages::{
    Barrier, DetailBatch, EventBatch, PartitionInput, RecordBatch, ShardInput, Table, TableRows,
    WarehouseInput,
};
use crate::metrics::{send_metered, MailboxMeter, Metrics, ReasonLabel, StateLabel};
use crate::tables::{DeadLetterRows, Folders, OdsRows};
use crate::timer::WatermarkUpdate;
use crate::warehouse_sink::WarehouseSink;
use crate::window::{Counts, WindowKey, WindowSpec};
use rustc_hash::FxHashMap;

/// Mailbox capacity of a reader, in record batches. The source pauses the partition
/// as soon as this is full, so this times `source.batch_max_bytes` bounds the memory a
/// partition can hold between Kafka and its reader. Two keeps one batch queued while
/// one is processed: enough to hide the handoff, small enough for prompt backpressure.
pub const READER_MAILBOX: usize = 2;

/// Where a reader sends its output.
#[derive(Clone)]
pub struct ReaderLinks {
    pub shards: Arc<[Addr<Aggregator>]>,
    pub warehouse: Addr<WarehouseSink>,
    /// Event-time reports (`try_send`: a dropped report is superseded by the next).
    pub timer: Recipient<WatermarkUpdate>,
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

pub struct PartitionReader {
    restart: crate::backoff::RestartBackoff,
    topic: Arc<str>,
    partition: i32,
    limits: DecodeConfig,
    tz: chrono_tz::Tz,
    windows: WindowSpec,
    claim: Claim,
    /// The claim's stored windows until they are handed over (once, even if the
    /// supervisor restarts this actor: the struct survives a restart).
    restore: Option<StoredWindows>,
    links: ReaderLinks,
    metrics: Metrics,
    shard_meter: MailboxMeter,
    warehouse_meter: MailboxMeter,
    own_meter: MailboxMeter,
    counters: ReaderCounters,
}

impl PartitionReader {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        topic: Arc<str>,
        partition: i32,
        limits: DecodeConfig,
        tz: chrono_tz::Tz,
        windows: WindowSpec,
        claim: Claim,
        restored: StoredWindows,
        links: ReaderLinks,
        metrics: Metrics,
    ) -> Self {
        PartitionReader {
            windows,
            restore: Some(restored),
            restart: Default::default(),
            shard_meter: metrics.mailbox("aggregator"),
            warehouse_meter: metrics.mailbox("warehouse_sink"),
            own_meter: metrics.mailbox("partition_reader"),
            topic,
            partition,
            limits,
            tz,
            claim,
            links,
            metrics,
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
        let shards = self.links.shards.len();
        let mut routed: Vec<EventBatch> = (0..shards)
            .map(|_| EventBatch::new(self.partition))
            .collect();
        let mut ods: Vec<(String, OdsRows)> = Vec::new();
        let mut dead: Vec<(String, DeadLetterRows)> = Vec::new();
        let mut folders = Folders::new(self.tz);
        let mut windows: FxHashMap<WindowKey, Counts> = FxHashMap::default();
        let ingest_ms = chrono::Utc::now().timestamp_millis();
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
            let decoded = decode(payload, &self.limits).and_then(|event| {
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
                        self.metrics
                            .unknown_state_events
                            .get_or_create(&StateLabel { state: event.state })
                            .inc();
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
                            &self.topic,
                            self.partition,
                            record.offset,
                            ingest_ms,
                        );
                        let start = self.windows.start_of(event.log_timestamp);
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
                    self.metrics
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
                        &self.topic,
                        self.partition,
                        record.offset,
                        ingest_ms,
                    );
                }
            }
        }
        // Off the data path: a report that finds the timer busy is dropped; the next
        // batch's maximum supersedes it.
        let _ = self.links.timer.try_send(WatermarkUpdate::Observed {
            partition: self.partition,
            max_event_ms,
        });
        self.metrics.records_read.inc_by(batch.records.len() as u64);
        self.metrics
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
        ctx.set_mailbox_capacity(READER_MAILBOX);
        // Control messages, rare: one per assignment. `do_send` so none is lost.
        self.links.timer.do_send(WatermarkUpdate::Assigned {
            partition: self.partition,
        });
        if let Some(stored) = self.restore.take() {
            // `wait` holds the mailbox: no batch is handled before the state is handed on.
            let links = self.links.clone();
            let partition = self.partition;
            let shard_meter = self.shard_meter.clone();
            let warehouse_meter = self.warehouse_meter.clone();
            ctx.wait(
                async move {
                    if let Err(error) =
                        forward_restore(&links, partition, stored, &shard_meter, &warehouse_meter)
                            .await
                    {
                        warn!(partition, %error, "downstream actor is gone; open windows not restored during shutdown");
                    }
                }
                .into_actor(self),
            );
        }
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        // Off the data path, once per revocation; `do_send` so the timer always learns it.
        self.links.timer.do_send(WatermarkUpdate::Revoked {
            partition: self.partition,
        });
    }
}

impl Supervised for PartitionReader {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.restart.restarting();
        // A reader holds no state between batches; a restart only needs counting.
        self.metrics
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
        self.own_meter.received();
        let links = self.links.clone();
        let shard_meter = self.shard_meter.clone();
        let warehouse_meter = self.warehouse_meter.clone();
        let partition = self.partition;
        let work = match input {
            PartitionInput::Records(batch) => {
                let (routed, detail) = self.process(&batch);
                Work::Data(routed, detail)
            }
            PartitionInput::Barrier(barrier) => {
                self.counters.barriers += 1;
                Work::Barrier(barrier)
            }
        };
        AtomicResponse::new(Box::pin(
            async move {
                let result = match work {
                    Work::Data(routed, detail) => {
                        forward_data(&links, routed, detail, &shard_meter, &warehouse_meter).await
                    }
                    Work::Barrier(barrier) => forward_barrier(&links, barrier, &shard_meter, &warehouse_meter).await,
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
    shard_meter: &MailboxMeter,
    warehouse_meter: &MailboxMeter,
) -> Result<(), MailboxError> {
    for (shard, events) in routed.into_iter().enumerate() {
        if !events.events.is_empty() {
            send_metered(
                &links.shards[shard],
                ShardInput::Events(events),
                shard_meter,
            )
            .await?;
        }
    }
    if !detail.parts.is_empty() {
        send_metered(
            &links.warehouse,
            WarehouseInput::Rows(detail),
            warehouse_meter,
        )
        .await?;
    }
    Ok(())
}

/// Hands a claimed partition's stored open windows to their owners (every shard gets
/// its part, possibly empty, which also drops whatever it held from an earlier claim).
async fn forward_restore(
    links: &ReaderLinks,
    partition: i32,
    stored: StoredWindows,
    shard_meter: &MailboxMeter,
    warehouse_meter: &MailboxMeter,
) -> Result<(), MailboxError> {
    let shards = links.shards.len();
    for (index, shard) in links.shards.iter().enumerate() {
        let mut windows = stored.series.clone();
        windows.retain(|business_id| shard_of(business_id, shards) == index);
        send_metered(
            shard,
            ShardInput::Restore { partition, windows },
            shard_meter,
        )
        .await?;
    }
    send_metered(
        &links.warehouse,
        WarehouseInput::Restore {
            partition,
            windows: stored.dws,
        },
        warehouse_meter,
    )
    .await
}

async fn forward_barrier(
    links: &ReaderLinks,
    barrier: Barrier,
    shard_meter: &MailboxMeter,
    warehouse_meter: &MailboxMeter,
) -> Result<(), MailboxError> {
    for shard in links.shards.iter() {
        send_metered(shard, ShardInput::Barrier(barrier.clone()), shard_meter).await?;
    }
    send_metered(
        &links.warehouse,
        WarehouseInput::Barrier(barrier),
        warehouse_meter,
    )
    .await
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
