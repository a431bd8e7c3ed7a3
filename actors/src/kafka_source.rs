//! `KafkaSource`: the consumer-group member. It runs alone on its own arbiter thread
//! because it blocks in librdkafka's `poll`, which is also where rebalance callbacks
//! run; blocking there (to checkpoint revoked partitions) must stall nothing else.
//!
//! Its jobs:
//! - poll records in bursts and cut them into per-partition [`RecordBatch`]es;
//! - create one supervised [`PartitionReader`] per assigned partition (on a pool of
//!   reader arbiters) and drop it on revocation;
//! - hand batches to readers with `try_send`; when a reader's mailbox is full, **pause**
//!   the partition, deliver the queued items with `send().await` from a drainer task on
//!   the reader's arbiter, and **resume** when the drainer reports back. The consumer
//!   keeps polling all the while (rebalances and other partitions carry on);
//! - **claim** every assigned partition in Redis before reading it (a new owner epoch,
//!   and the fences of both sinks, see [`crate::fences`]) and start reading at the
//!   lower fence; the claim travels with every barrier so the sinks know the epoch and
//!   where their ranges start;
//! - inject checkpoint barriers after each partition's last batch, collect the sinks'
//!   fences, and then commit the minimum to Kafka. That offset is only progress
//!   reporting (lag) and the cold-start position of a partition that has no fences.
//!
//! Revocation runs a final checkpoint inside the rebalance callback (bounded by
//! `pipeline.revoke_timeout_ms`) before the partitions go. A lost assignment (the group
//! moved on without us) commits nothing and stops the process with exit code 75; the
//! new owner's claim has already fenced anything this instance still had in flight.

use std::collections::{BTreeMap, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use actix::prelude::*;
use anyhow::Context as _;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::message::Message as _;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::fault;
use crate::fences::{self, Claim, ClaimError, FenceKeys, StoredWindows};
use crate::held::Held;
use crate::mailbox::Mailbox;
use crate::messages::{
    Barrier, CheckpointKind, CheckpointSpec, PartitionInput, RecordBatch, SinkKind, SourceNotice,
};
use crate::metrics::{Metrics, PartitionLabel};
use crate::partition_reader::{PartitionReader, ReaderContext};

/// Exit code when the group took our partitions away before we could checkpoint them,
/// or partitions could not be claimed in time (Redis unreachable).
pub const EXIT_ASSIGNMENT_LOST: i32 = crate::fences::EXIT_FENCED;

/// Exit code when Redis has lost anchorflow's fences; the next start waits, not ready,
/// until an operator recovers them (`docs/exactly-once.md`).
pub const EXIT_STATE_LOST: i32 = 76;

/// How long one `poll` may block when no records are waiting. Control messages (a
/// checkpoint trigger, shutdown) wait at most this long.
const POLL_WAIT: Duration = Duration::from_millis(20);

/// Most records taken in one burst before batches are dispatched and control
/// messages get a turn.
const POLL_BURST: usize = 16_384;

/// How long a seek after resuming a partition may block the poll thread.
const SEEK_TIMEOUT: Duration = Duration::from_secs(5);

/// Mailbox capacity of the source: only control messages (checkpoint triggers, a
/// shutdown request) arrive here; the timer skips a tick rather than queue a second.
pub const SOURCE_MAILBOX: usize = 4;

/// Asks the source to start a checkpoint, carrying the timer's instance watermark
/// (`None` while unknown); the checkpoint's barriers close the windows it passed.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct TriggerCheckpoint {
    pub watermark: Option<i64>,
}

/// Asks the source to stop reading, run a final checkpoint, commit, and leave the group.
/// `done` receives the outcome.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown {
    pub done: tokio::sync::oneshot::Sender<anyhow::Result<()>>,
}

/// The self-message that keeps the poll loop going between other messages.
#[derive(Message)]
#[rtype(result = "()")]
struct Poll;

/// Everything a reader needs, minus the partition number.
#[derive(Clone)]
pub struct ReaderFactory {
    pub config: Arc<Config>,
    pub context: ReaderContext,
    pub arbiters: Arc<[ArbiterHandle]>,
    /// Shared with the timer (see `held.rs`).
    pub held: Held,
}

struct Slot {
    reader: Mailbox<PartitionInput>,
    arbiter: ArbiterHandle,
    building: RecordBatch,
    outbox: VecDeque<PartitionInput>,
    blocked: bool,
    /// Offset after the last record handed on; starts at the claim's lower fence.
    next_offset: i64,
    claim: Claim,
}

struct InFlight {
    spec: Arc<CheckpointSpec>,
    started: Instant,
    fences: BTreeMap<SinkKind, Vec<(i32, i64)>>,
}

/// State shared by the actor and the rebalance callback (which runs inside `poll`,
/// when the actor holds no lock).
struct SourceState {
    factory: ReaderFactory,
    slots: BTreeMap<i32, Slot>,
    next_reader: usize,
    notices: Receiver<SourceNotice>,
    notices_tx: Sender<SourceNotice>,
    in_flight: Option<InFlight>,
    next_checkpoint: u64,
    /// Set when a final checkpoint completed; consumed by whoever waits for it.
    completed: Option<u64>,
    /// The latest watermark the timer sent; final checkpoints close windows with it.
    watermark: Option<i64>,
    /// Partitions paused by backpressure or behind a silent broker: never idle.
    held: Held,
}

pub struct SourceContext {
    state: Mutex<SourceState>,
    metrics: Metrics,
    revoke_timeout: Duration,
    topic: String,
    redis_url: String,
    redis_timeout: Duration,
    keys: FenceKeys,
    /// Whether a partition without fences or committed offset starts at its end.
    start_at_latest: bool,
    /// Processing time; measured against Redis's at every claim.
    clock: crate::clock::Clock,
    /// Where the warehouse keeps what each instance published (checked at claims).
    warehouse_root: std::path::PathBuf,
    group: String,
    /// Shared with the timer: partitions that are not idle whatever their silence.
    held: Held,
}

impl SourceContext {
    fn lock(&self) -> MutexGuard<'_, SourceState> {
        // A panic while holding this lock already took the process down with it
        // (panics abort the arbiter); recovering the guard keeps shutdown working.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

type SourceConsumer = BaseConsumer<SourceContext>;

impl SourceState {
    fn flush_building(&mut self, consumer: &SourceConsumer, partition: i32) {
        let Some(slot) = self.slots.get_mut(&partition) else {
            return;
        };
        if slot.building.records.is_empty() {
            return;
        }
        let batch = std::mem::replace(&mut slot.building, RecordBatch::new(partition));
        slot.outbox.push_back(PartitionInput::Records(batch));
        self.dispatch(consumer, partition);
    }

    /// Hands queued items to the reader while it has room; pauses the partition and
    /// starts a drainer when it does not.
    fn dispatch(&mut self, consumer: &SourceConsumer, partition: i32) {
        let topic = self.factory.context.topic.clone();
        let notices = self.notices_tx.clone();
        let held = self.held.clone();
        let metrics = self.factory.context.metrics.clone();
        let Some(slot) = self.slots.get_mut(&partition) else {
            return;
        };
        if slot.blocked {
            return;
        }
        while let Some(item) = slot.outbox.pop_front() {
            if !slot.reader.connected() {
                error!(
                    partition,
                    queued = slot.outbox.len() + 1,
                    "partition reader is gone; its records cannot be processed"
                );
                slot.outbox.push_front(item);
                return;
            }
            // The room comes back on the reader's thread: this one blocks at times
            // (rebalance callbacks, the final checkpoint).
            let Err(item) = slot.reader.try_send_on(item, &slot.arbiter) else {
                continue;
            };
            slot.outbox.push_front(item);
            slot.blocked = true;
            held.set_paused(partition, true);
            metrics.partition_pauses.inc();
            debug!(
                partition,
                queued = slot.outbox.len(),
                next_offset = slot.next_offset,
                "reader full; partition paused"
            );
            if let Err(e) = consumer.pause(&single(&topic, partition)) {
                warn!(partition, error = %e, "could not pause partition");
            }
            let items: Vec<PartitionInput> = slot.outbox.drain(..).collect();
            let reader = slot.reader.clone();
            slot.arbiter.spawn(async move {
                for item in items {
                    if let Err(error) = reader.send(item).await {
                        warn!(partition, %error, "partition reader is gone; queued input dropped");
                        break;
                    }
                }
                let _ = notices.send(SourceNotice::Drained { partition });
            });
            return;
        }
    }

    fn start_checkpoint(&mut self, consumer: &SourceConsumer, kind: CheckpointKind) -> Option<u64> {
        if self.in_flight.is_some() {
            return None;
        }
        let partitions: Vec<i32> = self.slots.keys().copied().collect();
        if partitions.is_empty() {
            return None;
        }
        self.next_checkpoint += 1;
        let spec = Arc::new(CheckpointSpec {
            id: self.next_checkpoint,
            partitions: partitions.clone(),
            kind,
            watermark: self.watermark,
        });
        for partition in partitions {
            self.flush_building(consumer, partition);
            if let Some(slot) = self.slots.get_mut(&partition) {
                let barrier = Barrier {
                    spec: spec.clone(),
                    partition,
                    next_offset: slot.next_offset,
                    claim: slot.claim,
                    max_event_ms: None,
                };
                slot.outbox.push_back(PartitionInput::Barrier(barrier));
            }
            self.dispatch(consumer, partition);
        }
        debug!(checkpoint = spec.id, ?kind, "checkpoint started");
        let id = spec.id;
        self.in_flight = Some(InFlight {
            spec,
            started: Instant::now(),
            fences: BTreeMap::new(),
        });
        Some(id)
    }

    /// Applies one notice; commits offsets when a checkpoint completes.
    fn on_notice(&mut self, consumer: &SourceConsumer, notice: SourceNotice, mode: CommitMode) {
        match notice {
            SourceNotice::Drained { partition } => {
                if let Some(slot) = self.slots.get_mut(&partition) {
                    slot.blocked = false;
                    self.held.set_paused(partition, false);
                    let topic = &self.factory.context.topic;
                    if let Err(e) = consumer.resume(&single(topic, partition)) {
                        warn!(partition, error = %e, "could not resume partition");
                    }
                    // Pausing purges librdkafka's prefetched records; it does not always
                    // fetch them again on resume, so say exactly where to continue.
                    // Records below that offset that still arrive are skipped on poll.
                    debug!(
                        partition,
                        next_offset = slot.next_offset,
                        "reader drained; partition resumed"
                    );
                    if slot.next_offset >= 0 {
                        if let Err(e) = consumer.seek(
                            topic,
                            partition,
                            Offset::Offset(slot.next_offset),
                            SEEK_TIMEOUT,
                        ) {
                            warn!(partition, offset = slot.next_offset, error = %e, "could not seek after resume");
                        }
                    }
                }
                self.dispatch(consumer, partition);
            }
            SourceNotice::SinkCommitted {
                sink,
                checkpoint,
                fences,
            } => {
                let Some(in_flight) = self.in_flight.as_mut() else {
                    return;
                };
                if in_flight.spec.id != checkpoint {
                    warn!(
                        checkpoint,
                        current = in_flight.spec.id,
                        sink = sink.name(),
                        "stale sink commit ignored"
                    );
                    return;
                }
                in_flight.fences.insert(sink, fences);
                if in_flight.fences.len() == 2 {
                    if let Some(done) = self.in_flight.take() {
                        self.complete(consumer, done, mode);
                    }
                }
            }
        }
    }

    fn complete(&mut self, consumer: &SourceConsumer, done: InFlight, mode: CommitMode) {
        // Kafka's offset is the lowest fence over the sinks; -1 means nothing read yet.
        let fence = |sink: SinkKind, partition: i32| {
            done.fences
                .get(&sink)?
                .iter()
                .find(|(p, _)| *p == partition)
                .map(|(_, o)| *o)
        };
        let durable: BTreeMap<i32, i64> = done
            .spec
            .partitions
            .iter()
            .filter_map(|&p| {
                let offset = fence(SinkKind::Redis, p)?.min(fence(SinkKind::Warehouse, p)?);
                (offset >= 0).then_some((p, offset))
            })
            .collect();
        let metrics = &self.factory.context.metrics;
        fault::point(fault::AFTER_SINKS_COMMITTED);
        if !durable.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (&partition, &offset) in &durable {
                if let Err(e) = tpl.add_partition_offset(
                    &self.factory.context.topic,
                    partition,
                    Offset::Offset(offset),
                ) {
                    warn!(partition, error = %e, "cannot express offset");
                }
            }
            match consumer.commit(&tpl, mode) {
                Ok(()) => {
                    if let Ok(mut committed) = metrics.committed_offsets.lock() {
                        committed.extend(durable.iter().map(|(p, o)| (*p, *o)));
                    }
                }
                Err(e) => {
                    warn!(checkpoint = done.spec.id, error = %e, "offset commit failed; the next checkpoint retries")
                }
            }
        }
        let took = done.started.elapsed();
        metrics.checkpoint_completed(took);
        metrics
            .last_checkpoint_timestamp_seconds
            .set(crate::clock::wall_ms() as f64 / 1000.0);
        metrics.set_ready(true);
        debug!(
            checkpoint = done.spec.id,
            took_ms = took.as_millis() as u64,
            partitions = durable.len(),
            "checkpoint complete"
        );
        self.completed = Some(done.spec.id);
    }

    fn drain_notices(&mut self, consumer: &SourceConsumer) {
        while let Ok(notice) = self.notices.try_recv() {
            self.on_notice(consumer, notice, CommitMode::Async);
        }
    }

    /// Runs a final checkpoint and waits for it (used by revocation and shutdown).
    fn final_checkpoint(
        &mut self,
        consumer: &SourceConsumer,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let wait =
            |state: &mut SourceState, until: &dyn Fn(&SourceState) -> bool| -> anyhow::Result<()> {
                while !until(state) {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match state
                        .notices
                        .recv_timeout(left.max(Duration::from_millis(1)))
                    {
                        Ok(notice) => state.on_notice(consumer, notice, CommitMode::Sync),
                        Err(RecvTimeoutError::Timeout) if Instant::now() >= deadline => {
                            anyhow::bail!("final checkpoint did not complete within {timeout:?}")
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => anyhow::bail!("sinks are gone"),
                    }
                }
                Ok(())
            };
        // A periodic checkpoint may be running; let it finish first.
        wait(self, &|s| s.in_flight.is_none())?;
        self.completed = None;
        let Some(id) = self.start_checkpoint(consumer, CheckpointKind::Final) else {
            return Ok(());
        };
        wait(self, &|s| s.completed == Some(id))
    }

    fn create_reader(&mut self, partition: i32, claim: Claim, windows: StoredWindows) -> Slot {
        let factory = &self.factory;
        let arbiter = factory.arbiters[self.next_reader % factory.arbiters.len()].clone();
        self.next_reader += 1;
        let context = factory.context.clone();
        let reader = Supervisor::start_in_arbiter(&arbiter, move |_| {
            PartitionReader::new(context, partition, claim, windows)
        });
        let reader = Mailbox::new(
            reader,
            crate::partition_reader::READER_MAILBOX,
            self.factory.context.metrics.mailbox("partition_reader"),
        );
        self.held.track_reader(
            partition,
            reader.busy_probe(crate::partition_reader::READER_MAILBOX),
        );
        Slot {
            reader,
            arbiter,
            building: RecordBatch::new(partition),
            outbox: VecDeque::new(),
            blocked: false,
            next_offset: claim.start(),
            claim,
        }
    }
}

fn single(topic: &str, partition: i32) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    tpl
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

impl ClientContext for SourceContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                error!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Warning => {
                warn!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                info!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Debug => debug!(target: "librdkafka", facility = fac, "{log_message}"),
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown) {
            // Until statistics show a broker answering again, nothing assigned is idle.
            let assigned = self.lock().slots.keys().copied().collect();
            self.held.set_unreachable(assigned);
        }
        error!(target: "librdkafka", error = %error, reason, "kafka client error");
    }

    fn stats(&self, statistics: Statistics) {
        self.held.update(&statistics);
        for topic in statistics.topics.values() {
            for (id, partition) in &topic.partitions {
                if *id < 0 {
                    continue; // librdkafka's internal "unassigned" partition
                }
                let lag = partition_lag(
                    partition.consumer_lag,
                    partition.hi_offset,
                    partition.lo_offset,
                    partition.app_offset,
                );
                if let Some(lag) = lag {
                    self.metrics
                        .consumer_lag
                        .get_or_create(&PartitionLabel { partition: *id })
                        .set(lag);
                }
            }
        }
    }
}

/// Records between the end of a partition and where this group will continue.
/// librdkafka's `consumer_lag` is -1 until an offset has been committed; fall back to
/// the high watermark minus the position the application has read to.
fn partition_lag(
    consumer_lag: i64,
    hi_offset: i64,
    lo_offset: i64,
    app_offset: i64,
) -> Option<i64> {
    if consumer_lag >= 0 {
        return Some(consumer_lag);
    }
    if hi_offset < 0 {
        return None;
    }
    Some((hi_offset - app_offset.max(lo_offset).max(0)).max(0))
}

impl SourceContext {
    /// A record arrived after a gap in the offsets. A gap inside the log is normal
    /// (transaction markers, compaction); a gap that starts below the log's first
    /// offset means the broker deleted records before they were read (retention, a
    /// trimmed log) and librdkafka reset the position: those records are skipped for
    /// good, and that is counted, logged as an error and stored for `fences show`.
    fn on_gap(&self, consumer: &SourceConsumer, partition: i32, expected: i64, delivered: i64) {
        let log_start = match consumer.fetch_watermarks(&self.topic, partition, SEEK_TIMEOUT) {
            Ok((low, _)) => low,
            Err(e) => {
                warn!(partition, expected, delivered, error = %e, "offset gap; could not read the log start to tell why");
                return;
            }
        };
        let Some(skipped) = crate::skipped::skipped(expected, delivered, log_start) else {
            debug!(
                partition,
                expected,
                delivered,
                "offset gap inside the log (transaction markers or compaction)"
            );
            return;
        };
        let reason = crate::skipped::OUT_OF_RANGE;
        self.metrics
            .records_skipped
            .get_or_create(&crate::metrics::SkipLabel { partition, reason })
            .inc_by((skipped.end - skipped.start) as u64);
        error!(
            partition,
            from = skipped.start,
            to = skipped.end,
            log_start,
            "records were deleted by the broker before they were read; they are skipped (anchorflow fences show lists them)"
        );
        let stored = fences::connect(&self.redis_url, self.redis_timeout)
            .and_then(|mut conn| crate::skipped::store(&mut conn, &self.keys, partition, &skipped));
        if let Err(e) = stored {
            warn!(
                partition,
                error = format!("{e:#}"),
                "could not store the skipped range"
            );
        }
    }

    /// Compares the claimed warehouse fences with what the warehouse says it published.
    /// A fence behind it means Redis went back in time (restored from an older
    /// snapshot, a stale replica promoted): reading on would publish those rows again.
    /// The loss is marked in Redis, as when Redis restarts empty, and an operator
    /// recovers (`fences recover --redis-from keep`, docs/exactly-once.md).
    fn check_published(
        &self,
        conn: &mut redis::Connection,
        claims: &BTreeMap<i32, fences::Claimed>,
    ) -> Result<(), ClaimError> {
        let published = crate::warehouse_files::published_fences(
            &self.warehouse_root,
            &self.group,
            &self.topic,
        )?;
        for (partition, claimed) in claims {
            let Some(&mark) = published.get(partition) else {
                continue;
            };
            if claimed.claim.warehouse < mark {
                let marker = format!(
                    "warehouse:{partition}: Redis's fence {} is behind the {mark} the warehouse published",
                    claimed.claim.warehouse
                );
                fences::mark_lost(conn, &self.keys, &marker)?;
                return Err(ClaimError::StateLost { marker });
            }
        }
        Ok(())
    }

    /// Claims `partitions`, retrying while Redis is unreachable for at most the revoke
    /// timeout (the group waits for this callback).
    fn claim_with_retries(
        &self,
        consumer: &SourceConsumer,
        partitions: &[i32],
    ) -> Result<BTreeMap<i32, (Claim, StoredWindows)>, ClaimError> {
        let deadline = Instant::now() + self.revoke_timeout;
        let mut attempt = 0u32;
        loop {
            let result = fences::connect(&self.redis_url, self.redis_timeout)
                .map_err(ClaimError::Other)
                .and_then(|mut conn| {
                    crate::clock::measure(&self.clock, &mut conn)?;
                    let claims = fences::claim(&mut conn, &self.keys, partitions, |fresh| {
                        self.cold_start(consumer, fresh)
                    })?;
                    // An earlier owner may have recorded commits it never published;
                    // their rows are below the fences we resume from.
                    match crate::warehouse_files::complete_recorded(&mut conn, &self.keys)? {
                        Ok(0) => {}
                        Ok(records) => info!(
                            records,
                            "completed recorded warehouse commits of an earlier owner"
                        ),
                        Err(error) => return Err(ClaimError::Unpublishable(error)),
                    }
                    self.check_published(&mut conn, &claims)?;
                    let mut windows = fences::read_windows(&mut conn, &self.keys, partitions)?;
                    Ok(claims
                        .into_iter()
                        .map(|(p, claimed)| {
                            let mut stored = windows.remove(&p).unwrap_or_default();
                            stored.unit_fences = claimed.unit_fences;
                            (p, (claimed.claim, stored))
                        })
                        .collect())
                });
            match result {
                Err(ClaimError::Other(e)) if Instant::now() < deadline => {
                    let delay = Backoff::DEFAULT.delay(attempt);
                    warn!(
                        error = format!("{e:#}"),
                        retry_in_ms = delay.as_millis() as u64,
                        "claiming partitions failed; retrying"
                    );
                    std::thread::sleep(delay);
                    attempt = attempt.saturating_add(1);
                }
                other => return other,
            }
        }
    }

    /// Where partitions without fences start: the group's committed offset if there
    /// is one (the cold-start fallback, e.g. after moving from another consumer),
    /// otherwise the beginning or the end as `auto.offset.reset` says.
    fn cold_start(
        &self,
        consumer: &SourceConsumer,
        partitions: &[i32],
    ) -> anyhow::Result<BTreeMap<i32, i64>> {
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            tpl.add_partition(&self.topic, p);
        }
        let committed = consumer
            .committed_offsets(tpl, self.redis_timeout)
            .context("reading the group's committed offsets")?;
        let mut out = BTreeMap::new();
        for &partition in partitions {
            let committed = committed
                .find_partition(&self.topic, partition)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) if o >= 0 => Some(o),
                    _ => None,
                });
            let offset = match committed {
                Some(offset) => {
                    warn!(partition, offset, "no fences in Redis for this partition: starting at the group's committed offset (cold-start fallback)");
                    offset
                }
                None => {
                    let (low, high) = consumer
                        .fetch_watermarks(&self.topic, partition, self.redis_timeout)
                        .context("reading the partition's watermarks")?;
                    let offset = if self.start_at_latest { high } else { low };
                    info!(
                        partition,
                        offset, "first run on this partition: fences initialised"
                    );
                    offset
                }
            };
            out.insert(partition, offset);
        }
        Ok(out)
    }
}

impl ConsumerContext for SourceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let partitions = partitions_of(tpl);
                info!(
                    ?partitions,
                    cooperative, "partitions assigned; claiming them"
                );
                let claims = match self.claim_with_retries(consumer, &partitions) {
                    Ok(claims) => claims,
                    Err(ClaimError::StateLost { marker }) => {
                        self.metrics.redis_state_lost.set(1);
                        self.metrics.set_ready(false);
                        error!(%marker, "Redis has lost anchorflow's fences; not reading until an operator recovers them (docs/exactly-once.md)");
                        System::current().stop_with_code(EXIT_STATE_LOST);
                        return;
                    }
                    Err(ClaimError::Other(e)) => {
                        error!(
                            ?partitions,
                            error = format!("{e:#}"),
                            "could not claim assigned partitions; exiting so a restart tries again"
                        );
                        System::current().stop_with_code(EXIT_ASSIGNMENT_LOST);
                        return;
                    }
                    Err(ClaimError::Unpublishable(e)) => {
                        self.metrics.set_ready(false);
                        error!(
                            ?partitions,
                            error = format!("{e:#}"),
                            "not reading: rows below the fences were recorded but cannot be published (docs/exactly-once.md)"
                        );
                        System::current().stop_with_code(crate::warehouse_sink::EXIT_IO_ERROR);
                        return;
                    }
                };
                {
                    let mut state = self.lock();
                    for (partition, (claim, windows)) in claims {
                        info!(
                            partition,
                            epoch = claim.epoch,
                            redis_fence = claim.redis,
                            warehouse_fence = claim.warehouse,
                            "partition claimed"
                        );
                        if let Err(e) = tpl.set_partition_offset(
                            &self.topic,
                            partition,
                            Offset::Offset(claim.start()),
                        ) {
                            error!(partition, error = %e, "cannot set the start offset");
                        }
                        let slot = state.create_reader(partition, claim, windows);
                        state.slots.insert(partition, slot);
                    }
                    self.metrics
                        .partitions_assigned
                        .set(state.slots.len() as i64);
                }
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = result {
                    error!(error = %e, "assign failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let partitions = partitions_of(tpl);
                if consumer.assignment_lost() {
                    error!(?partitions, "assignment lost: the group moved on before we checkpointed; exiting so a restart resumes from committed offsets");
                    System::current().stop_with_code(EXIT_ASSIGNMENT_LOST);
                } else {
                    info!(?partitions, "partitions revoked; checkpointing them first");
                    let mut state = self.lock();
                    match state.final_checkpoint(consumer, self.revoke_timeout) {
                        Ok(()) => info!(?partitions, "revoked partitions checkpointed"),
                        Err(e) => warn!(?partitions, error = format!("{e:#}"), "revocation checkpoint incomplete; uncommitted records will be read again"),
                    }
                    for partition in &partitions {
                        state.slots.remove(partition);
                        state.held.forget(*partition);
                    }
                    self.metrics
                        .partitions_assigned
                        .set(state.slots.len() as i64);
                }
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = result {
                    error!(error = %e, "unassign failed");
                }
            }
            other => error!(error = ?other, "rebalance error"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            warn!(error = %e, "offset commit failed");
        }
    }
}

pub struct KafkaSource {
    consumer: Arc<SourceConsumer>,
    shutdown: Option<tokio::sync::oneshot::Sender<anyhow::Result<()>>>,
    shutdown_timeout: Duration,
}

impl KafkaSource {
    /// Builds the consumer and subscribes; the actor starts polling once started.
    pub fn new(
        factory: ReaderFactory,
        notices: Receiver<SourceNotice>,
        notices_tx: Sender<SourceNotice>,
    ) -> anyhow::Result<Self> {
        let config = factory.config.clone();
        let held = factory.held.clone();
        let mut client = ClientConfig::new();
        // Defaults an operator may override in [kafka]…
        client.set("auto.offset.reset", "earliest");
        // Statistics tell which brokers answer (see `held.rs`) and drive the lag metric.
        client.set("statistics.interval.ms", "1000");
        client.set("queued.max.messages.kbytes", "16384");
        for (key, value) in &config.kafka.0 {
            client.set(key, value);
        }
        // …and the settings delivery depends on, which they may not.
        client.set("group.id", &config.source.group_id);
        client.set("enable.auto.commit", "false");
        client.set("enable.auto.offset.store", "false");
        let metrics = factory.context.metrics.clone();
        let start_at_latest = matches!(
            config.kafka.0.get("auto.offset.reset").map(String::as_str),
            Some("latest" | "largest" | "end")
        );
        let context = SourceContext {
            topic: config.source.topic.clone(),
            redis_url: config.redis.url.clone(),
            redis_timeout: Duration::from_secs(config.redis.command_timeout_secs),
            keys: FenceKeys::new(&config.source.group_id, &config.source.topic),
            start_at_latest,
            clock: factory.context.clock.clone(),
            held: held.clone(),
            warehouse_root: config.warehouse.root.clone().into(),
            group: config.source.group_id.clone(),
            state: Mutex::new(SourceState {
                factory,
                slots: BTreeMap::new(),
                next_reader: 0,
                notices,
                notices_tx,
                in_flight: None,
                next_checkpoint: 0,
                completed: None,
                watermark: None,
                held: held.clone(),
            }),
            metrics,
            revoke_timeout: Duration::from_millis(config.pipeline.revoke_timeout_ms),
        };
        let consumer: SourceConsumer = client
            .create_with_context(context)
            .context("creating the kafka consumer")?;
        consumer
            .subscribe(&[config.source.topic.as_str()])
            .context("subscribing to the topic")?;
        Ok(KafkaSource {
            consumer: Arc::new(consumer),
            shutdown: None,
            shutdown_timeout: Duration::from_secs(config.pipeline.shutdown_timeout_secs),
        })
    }

    fn poll_burst(&mut self) {
        let consumer = &*self.consumer;
        let context = consumer.context().clone();
        let (max_records, max_bytes) = {
            let state = context.lock();
            (
                state.factory.config.source.batch_max_records,
                state.factory.config.source.batch_max_bytes,
            )
        };
        let mut taken = 0;
        while taken < POLL_BURST {
            let wait = if taken == 0 {
                POLL_WAIT
            } else {
                Duration::ZERO
            };
            let Some(result) = consumer.poll(wait) else {
                break;
            };
            let message = match result {
                Ok(message) => message,
                Err(e) => {
                    warn!(error = %e, "kafka consumer error");
                    break;
                }
            };
            taken += 1;
            let partition = message.partition();
            let mut state = context.lock();
            let Some(slot) = state.slots.get_mut(&partition) else {
                warn!(
                    partition,
                    offset = message.offset(),
                    "record for an unassigned partition skipped"
                );
                continue;
            };
            if message.offset() < slot.next_offset {
                // Already handed on before a pause; librdkafka delivered it again.
                continue;
            }
            if message.offset() > slot.next_offset && slot.next_offset >= 0 {
                context.on_gap(consumer, partition, slot.next_offset, message.offset());
            }
            slot.building.push(message.offset(), message.payload());
            slot.next_offset = message.offset() + 1;
            if slot.building.records.len() >= max_records || slot.building.data.len() >= max_bytes {
                state.flush_building(consumer, partition);
            }
        }
        let mut state = context.lock();
        let partitions: Vec<i32> = state.slots.keys().copied().collect();
        for partition in partitions {
            state.flush_building(consumer, partition);
        }
        state.drain_notices(consumer);
    }

    fn finish(&mut self) {
        let consumer = &*self.consumer;
        let context = consumer.context().clone();
        let result = context
            .lock()
            .final_checkpoint(consumer, self.shutdown_timeout);
        if result.is_ok() {
            info!("final checkpoint committed");
        }
        // Everything is committed; the readers go now, so that the revocation librdkafka
        // runs while closing the consumer finds nothing left to checkpoint.
        {
            let mut state = context.lock();
            for partition in std::mem::take(&mut state.slots).into_keys() {
                state.held.forget(partition);
            }
            self.consumer.context().metrics.partitions_assigned.set(0);
        }
        consumer.unsubscribe();
        if let Some(done) = self.shutdown.take() {
            let _ = done.send(result);
        }
    }
}

impl Actor for KafkaSource {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(crate::mailbox::actix_capacity(SOURCE_MAILBOX));
        ctx.notify(Poll);
    }
}

impl Handler<Poll> for KafkaSource {
    type Result = ();

    fn handle(&mut self, _: Poll, ctx: &mut Self::Context) {
        if self.shutdown.is_some() {
            self.finish();
            ctx.stop();
            return;
        }
        self.poll_burst();
        // Yield to the runtime before the next burst: a notification handled in place
        // keeps actix's context loop from ever returning, which starves every other
        // task on this thread (such as the ones that give back the readers' room).
        ctx.wait(
            actix::fut::wrap_future::<_, Self>(tokio::task::yield_now())
                .map(|(), _source, ctx: &mut Context<Self>| ctx.notify(Poll)),
        );
    }
}

impl Handler<TriggerCheckpoint> for KafkaSource {
    type Result = ();

    fn handle(&mut self, trigger: TriggerCheckpoint, _ctx: &mut Self::Context) {
        let consumer = &*self.consumer;
        let context = consumer.context().clone();
        let mut state = context.lock();
        if trigger.watermark.is_some() {
            state.watermark = trigger.watermark;
        }
        if state
            .start_checkpoint(consumer, CheckpointKind::Periodic)
            .is_none()
            && state.in_flight.is_some()
        {
            debug!("previous checkpoint still running; tick skipped");
        }
    }
}

impl Handler<Shutdown> for KafkaSource {
    type Result = ();

    fn handle(&mut self, msg: Shutdown, _ctx: &mut Self::Context) {
        info!("shutdown requested: stopping reads, draining, final checkpoint");
        self.shutdown = Some(msg.done);
    }
}

#[cfg(test)]
mod tests {
    use super::partition_lag;

    #[test]
    fn lag_falls_back_to_the_high_watermark() {
        assert_eq!(partition_lag(7, 100, 0, 93), Some(7));
        assert_eq!(
            partition_lag(-1, 100, 0, -1),
            Some(100),
            "nothing read or committed yet"
        );
        assert_eq!(partition_lag(-1, 100, 40, 60), Some(40));
        assert_eq!(partition_lag(-1, 0, 0, -1), Some(0), "empty partition");
        assert_eq!(partition_lag(-1, -1, -1, -1), None, "watermarks unknown");
    }
}
