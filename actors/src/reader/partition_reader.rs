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
//!
//! **Supervised:** a batch is processed whole before any of it is handed on, so a
//! panic while processing it leaves nothing half-sent. The reader then restarts (after
//! a backoff) and processes that batch again record by record; a record that panics
//! again is dead-lettered (`processing_panic`) instead of stopping the partition.
//! Other partitions carry on meanwhile.

use actix::prelude::*;
use tracing::{debug, error, warn};

use crate::checkpoint::barrier::Barrier;
use crate::checkpoint::claim::Claim;
use crate::logic::decode::{decode, is_known_state, DecodeError, TraceEvent};
use crate::logic::route::shard_of;
use crate::logic::tables::Folders;
use crate::logic::window::Counts;
use crate::messages::{
    DetailBatch, EventBatch, PartitionInput, RawRecord, RecordBatch, WatermarkUpdate,
};
use crate::metrics::ReasonLabel;
use crate::protocol::fences::StoredWindows;
use crate::reader::links::{forward_barrier, forward_data, forward_restore, ReaderContext};
use crate::reader::output::{ingest_day, Output};
use crate::runtime::fault;
use crate::runtime::mailbox::actix_capacity;
use crate::runtime::supervision::{self, Failure, Restarts};

/// Mailbox capacity of a reader, in record batches. The source pauses the partition
/// as soon as this is full, so this times `source.batch_max_bytes` bounds the memory a
/// partition can hold between Kafka and its reader. Two keeps one batch queued while
/// one is processed: enough to hide the handoff, small enough for prompt backpressure.
pub const READER_MAILBOX: usize = 2;

enum Work {
    Data(Vec<EventBatch>, DetailBatch),
    Barrier(Barrier),
}

pub struct PartitionReader {
    restarts: Restarts,
    context: ReaderContext,
    partition: i32,
    claim: Claim,
    /// The claim's stored windows until they are handed over (once, even if the
    /// supervisor restarts this actor: the struct survives a restart).
    restore: Option<StoredWindows>,
    /// The largest event time seen, starting from the stored state's; barriers carry it
    /// to the sinks, which store it with the windows.
    max_event_ms: Option<i64>,
    /// A batch whose processing panicked, processed again after the restart.
    retry: Option<RecordBatch>,
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
            restarts: Restarts::new("partition_reader", &context.metrics, &context.health),
            context,
            partition,
            claim,
            restore: Some(restored),
            max_event_ms,
            retry: None,
        }
    }

    /// Decodes one batch into per-shard event batches and folder-split warehouse rows,
    /// and reports the batch's largest event time to the timer.
    fn process(&mut self, batch: &RecordBatch) -> (Vec<EventBatch>, DetailBatch) {
        fault::panic_point(fault::READER_BATCH);
        let mut out = Output::new(self.partition, self.context.links.shards.len());
        let mut folders = Folders::new(self.context.tz);
        let now_ms = self.context.clock.now_ms();
        for record in &batch.records {
            self.process_record(batch, record, now_ms, &mut folders, &mut out);
        }
        self.observed(out.max_event_ms, batch.records.len());
        let decoded = out.ods.iter().map(|(_, r)| r.len() as u64).sum();
        self.context.metrics.events_decoded.inc_by(decoded);
        let ingest_day = ingest_day(&folders, now_ms);
        out.finish(self.partition, ingest_day)
    }

    fn process_record(
        &mut self,
        batch: &RecordBatch,
        record: &RawRecord,
        now_ms: i64,
        folders: &mut Folders,
        out: &mut Output,
    ) {
        let to_redis = record.offset >= self.claim.redis;
        let to_warehouse = record.offset >= self.claim.warehouse;
        if !to_redis && !to_warehouse {
            return;
        }
        let payload = batch.payload(record);
        fault::poison(payload);
        let decoded = decode(payload, &self.context.limits).and_then(|event| {
            self.context.bounds.check(event.log_timestamp, now_ms)?;
            match folders.hour_folder(event.log_timestamp) {
                Some(folder) => Ok((event, folder.to_string())),
                None => Err(DecodeError::WrongType(format!(
                    "logTimestamp {} is outside the representable date range",
                    event.log_timestamp
                ))),
            }
        });
        match decoded {
            Ok((event, folder)) => self.accept(
                &event,
                folder,
                record.offset,
                (to_redis, to_warehouse),
                now_ms,
                out,
            ),
            Err(_) if !to_warehouse => {}
            Err(error) => self.dead_letter(payload, record.offset, &error, now_ms, out),
        }
    }

    /// An event: `ods_anchor_log` row and window counts for the warehouse, a routed
    /// event for the aggregator shard of its template.
    fn accept(
        &mut self,
        event: &TraceEvent,
        folder: String,
        offset: i64,
        (to_redis, to_warehouse): (bool, bool),
        ingest_ms: i64,
        out: &mut Output,
    ) {
        let ts = event.log_timestamp;
        out.max_event_ms = Some(out.max_event_ms.map_or(ts, |m| m.max(ts)));
        if !is_known_state(event.state) {
            self.context.metrics.unknown_state(event.state);
        }
        if to_warehouse {
            let (topic, partition) = (&self.context.topic, self.partition);
            out.ods_rows(folder)
                .append(event, topic, partition, offset, ingest_ms);
            let start = self.context.windows.start_of(ts);
            out.windows
                .entry((start, event.business_id, event.state))
                .or_default()
                .add(Counts {
                    events: 1,
                    receivers: event.ids.len() as i64,
                });
        }
        if to_redis {
            let shard = shard_of(event.business_id, out.routed.len());
            out.routed[shard].push(
                offset,
                event.state,
                event.business_id,
                ts,
                event.ids.iter().map(|id| id.as_ref()),
                event.message_id.as_deref(),
            );
        }
    }

    fn dead_letter(
        &mut self,
        payload: Option<&[u8]>,
        offset: i64,
        error: &DecodeError,
        ingest_ms: i64,
        out: &mut Output,
    ) {
        let reason = error.reason();
        self.context
            .metrics
            .dead_letters
            .get_or_create(&ReasonLabel { reason })
            .inc();
        debug!(partition = self.partition, offset, reason, %error, "dead-lettered record");
        let (topic, partition) = (&self.context.topic, self.partition);
        out.dead.append(
            payload,
            reason,
            &error.to_string(),
            topic,
            partition,
            offset,
            ingest_ms,
        );
    }

    /// Counts a batch and reports its largest event time to the timer.
    fn observed(&mut self, max_event_ms: Option<i64>, records: usize) {
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
        self.context.metrics.records_read.inc_by(records as u64);
    }

    /// Processes a batch that panicked once, record by record: a record that panics
    /// again is dead-lettered with the panic's message.
    fn process_isolated(&mut self, batch: &RecordBatch) -> Vec<(Vec<EventBatch>, DetailBatch)> {
        let mut outputs = Vec::with_capacity(batch.records.len());
        for record in &batch.records {
            let mut single = RecordBatch::new(batch.partition);
            single.push(record.offset, batch.payload(record));
            match supervision::catch(|| self.process(&single)) {
                Ok(output) => outputs.push(output),
                Err(panic) => {
                    error!(
                        partition = self.partition,
                        offset = record.offset,
                        panic,
                        "a record made processing panic; it goes to the dead-letter table"
                    );
                    let now_ms = self.context.clock.now_ms();
                    let mut out = Output::new(self.partition, self.context.links.shards.len());
                    let error = DecodeError::Panicked(panic);
                    self.dead_letter(
                        batch.payload(record),
                        record.offset,
                        &error,
                        now_ms,
                        &mut out,
                    );
                    let day = ingest_day(&Folders::new(self.context.tz), now_ms);
                    outputs.push(out.finish(self.partition, day));
                }
            }
        }
        outputs
    }
}

impl Actor for PartitionReader {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(actix_capacity(READER_MAILBOX));
        if let Some(restore) = self.restore.take() {
            self.announce(ctx, restore);
        }
        // After a restart: wait out the backoff, then the batch that panicked goes
        // first (`wait` holds the mailbox), record by record.
        self.restarts
            .started_then(ctx, |reader: &mut Self, _| reader.retry_isolated());
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        if self.restarts.recovering() {
            return; // stopped to be restarted, not revoked
        }
        // Off the data path, once per revocation: delivered by a task of its own,
        // since the actor's context is gone.
        let timer = self.context.links.timer.clone();
        let partition = self.partition;
        actix::spawn(async move {
            let _ = timer.send(WatermarkUpdate::Revoked { partition }).await;
        });
    }
}

impl PartitionReader {
    /// Processes the batch that panicked record by record, and hands the results on.
    fn retry_isolated(&mut self) -> ResponseActFuture<Self, ()> {
        let Some(batch) = self.retry.take() else {
            return Box::pin(actix::fut::ready(()));
        };
        let outputs = self.process_isolated(&batch);
        let links = self.context.links.clone();
        Box::pin(
            async move {
                for (routed, detail) in outputs {
                    forward_data(&links, routed, detail).await?;
                }
                Ok::<(), MailboxError>(())
            }
            .into_actor(self)
            .map(|result, reader, _| {
                reader.restarts.succeeded();
                if let Err(error) = result {
                    warn!(partition = reader.partition, %error, "downstream actor is gone; output dropped during shutdown");
                }
            }),
        )
    }

    /// Tells the timer about the partition and hands its stored state on, before any
    /// batch is handled (`wait` holds the mailbox).
    fn announce(&mut self, ctx: &mut Context<Self>, restore: StoredWindows) {
        let links = self.context.links.clone();
        let partition = self.partition;
        let restored = self.max_event_ms;
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
                let restored = forward_restore(&links, partition, restore).await;
                if let Err(error) = assigned.and(restored) {
                    warn!(partition, %error, "downstream actor is gone; state not handed on during shutdown");
                }
            }
            .into_actor(self),
        );
    }
}

impl Supervised for PartitionReader {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.restarts.restarting();
    }
}

impl Handler<PartitionInput> for PartitionReader {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, input: PartitionInput, ctx: &mut Self::Context) -> Self::Result {
        let links = self.context.links.clone();
        let partition = self.partition;
        let work = match input {
            PartitionInput::Records(batch) => match supervision::catch(|| self.process(&batch)) {
                Ok((routed, detail)) => Work::Data(routed, detail),
                Err(panic) => {
                    self.retry = Some(batch);
                    self.restarts.fail(ctx, Failure::Panic(panic));
                    return AtomicResponse::new(Box::pin(actix::fut::ready(())));
                }
            },
            PartitionInput::Barrier(mut barrier) => {
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
