//! The source's flow control, apart from librdkafka: per assigned partition a
//! [`Slot`] (its reader, the batch being cut, what is queued for it), the checkpoint
//! triggers, and what a completed checkpoint means to the source (partitions released,
//! offsets committed to the group). Checkpoints themselves are numbered and collected
//! by the [`CheckpointDriver`] (`checkpoint/driver.rs`), which the source holds. The
//! actor (`kafka_source.rs`) and the rebalance callback (`context.rs`, which runs
//! inside `poll`) share one [`SourceState`] behind a mutex; what it needs of the
//! consumer is [`PartitionControl`]; readers come from the wiring's [`StartReader`].
//!
//! Batches go to a reader with `try_send`; a full reader pauses its partition
//! (`Pause::ReaderFull`, `pausing.rs`). A partition is also paused at its uncommitted
//! bound (`Pause::Uncommitted`) once it has read `pipeline.max_uncommitted_records`,
//! or its share of the memory budget, beyond what the Redis sink has made durable, and
//! resumes when a checkpoint brings it back under. The shards accept records until the
//! next barrier, so without this bound a stalled Redis would let the whole backlog into
//! memory, and the partitions, read to their ends, would turn idle while nothing of
//! theirs was committed. The bound is held against the Redis sink alone
//! (`CheckpointDone::released`): the warehouse keeps the rows it has not published in
//! files and in row groups held to a share of their own, so a warehouse that publishes
//! once a minute (`warehouse.roll_interval_secs`) must not stop reading in between; a
//! slow or stalled warehouse sink stops it through the handoff (a reader waits until
//! the warehouse took each batch).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tracing::{debug, info, warn};

use crate::checkpoint::barrier::{Barrier, CheckpointKind};
use crate::checkpoint::claim::Claim;
use crate::checkpoint::coordinator::CheckpointDone;
use crate::checkpoint::driver::{self, CheckpointDriver, Driven, Event};
use crate::config::Config;
use crate::messages::{PartitionInput, RecordBatch};
use crate::metrics::Metrics;
use crate::protocol::fences::StoredWindows;
use crate::runtime::clock::Clock;
use crate::runtime::fault;
use crate::runtime::health::Health;
use crate::runtime::mailbox::Mailbox;
use crate::runtime::memory::RECORD_OVERHEAD;
use crate::source::control::{OffsetCommit, PartitionControl};
use crate::source::held::Held;
use crate::source::progress::{Fence, Progress};
pub use crate::source::slot::Slot;
use crate::source::slot::{self, Pause};

/// A reader the wiring started for a claimed partition.
pub struct StartedReader {
    pub mailbox: Mailbox<PartitionInput>,
    /// The thread it runs on: a paused partition's drainer delivers there.
    pub arbiter: ArbiterHandle,
    /// Whether its mailbox is full (the timer's idleness test, `held.rs`).
    pub busy: Box<dyn Fn() -> bool + Send>,
}

/// Starts the reader of a partition the source claimed. The pipeline's wiring provides
/// it (`reader/spawn.rs`): the threads readers run on and the actors they feed are not
/// the source's concern.
pub trait StartReader: Send {
    fn start(&mut self, partition: i32, claim: Claim, windows: StoredWindows) -> StartedReader;
}

/// What the source is built from, apart from the consumer.
pub struct SourceParts {
    pub config: Arc<Config>,
    pub metrics: Metrics,
    pub health: Health,
    /// Processing time, by Redis's clock (claims stamp it).
    pub clock: Clock,
    /// Shared with the timer (see `held.rs`).
    pub held: Held,
    pub readers: Box<dyn StartReader>,
    /// Made by the wiring first: the sinks' ack handles come from it.
    pub driver: CheckpointDriver,
}

pub struct SourceState {
    pub config: Arc<Config>,
    pub metrics: Metrics,
    pub health: Health,
    pub held: Held,
    readers: Box<dyn StartReader>,
    pub(super) slots: BTreeMap<i32, Slot>,
    pub(super) driver: CheckpointDriver,
    /// A partition read half its uncommitted share since its last barrier.
    due: bool,
    /// The size trigger started a checkpoint since the input last ran dry.
    backlog: bool,
    /// Whether each partition's fence keeps moving (`progress.rs`), and when that was
    /// last checked (`reading.rs`).
    pub(super) progress: Progress,
    pub(super) progress_checked: Instant,
}

impl SourceState {
    pub fn new(parts: SourceParts) -> Self {
        SourceState {
            config: parts.config,
            metrics: parts.metrics,
            health: parts.health,
            held: parts.held,
            readers: parts.readers,
            slots: BTreeMap::new(),
            driver: parts.driver,
            due: false,
            backlog: false,
            progress: Progress::default(),
            progress_checked: Instant::now(),
        }
    }

    pub fn assigned(&self) -> Vec<i32> {
        self.slots.keys().copied().collect()
    }

    pub fn slot_mut(&mut self, partition: i32) -> Option<&mut Slot> {
        self.slots.get_mut(&partition)
    }

    /// Starts reading a claimed partition with a new reader.
    pub fn assign(&mut self, partition: i32, claim: Claim, windows: StoredWindows) {
        let reader = self.readers.start(partition, claim, windows);
        self.held.track_reader(partition, reader.busy);
        self.slots.insert(
            partition,
            Slot::new(reader.mailbox, reader.arbiter, partition, claim),
        );
        self.progress
            .assigned(partition, claim.start(), Instant::now());
        self.export_assigned();
    }

    /// Drops a partition's reader (revocation, shutdown).
    pub fn unassign(&mut self, partition: i32) {
        self.slots.remove(&partition);
        self.progress.forget(partition);
        self.metrics.forget_partition(partition);
        self.held.forget(partition);
        self.export_assigned();
    }

    fn export_assigned(&self) {
        let metrics = &self.metrics;
        metrics.partitions_assigned.set(self.slots.len() as i64);
        self.export_paused();
    }

    pub(super) fn export_paused(&self) {
        slot::export_paused(&self.metrics, self.slots.values());
    }

    /// Adds a record to its partition's batch; hands the batch on once it is full.
    pub fn push(
        &mut self,
        control: &impl PartitionControl,
        partition: i32,
        offset: i64,
        payload: Option<&[u8]>,
    ) {
        let (source, pipeline) = (&self.config.source, &self.config.pipeline);
        let assigned = self.slots.len();
        let max_records = source.batch_max_records;
        let max_bytes = pipeline
            .memory()
            .batch_bytes(source.batch_max_bytes, assigned);
        let uncommitted = (
            pipeline.max_uncommitted_records as i64,
            pipeline.memory().uncommitted_bytes(assigned),
        );
        let Some(slot) = self.slots.get_mut(&partition) else {
            return;
        };
        slot.building.push(offset, payload);
        slot.next_offset = offset + 1;
        slot.at_end = false;
        slot.read_bytes += payload.map_or(0, <[u8]>::len) as u64 + RECORD_OVERHEAD;
        let at_bound = !slot.uncommitted && slot.over_uncommitted(uncommitted.0, uncommitted.1);
        self.due |= slot.half_full(uncommitted.0, uncommitted.1);
        if at_bound
            || slot.building.records.len() >= max_records
            || slot.building.data.len() >= max_bytes
        {
            self.flush_building(control, partition);
        }
        if at_bound {
            // Read its uncommitted share beyond its released fence: paused until a
            // checkpoint commits.
            self.hold(control, partition, Pause::Uncommitted);
        }
        self.start_if_due(control);
    }

    /// The size trigger (`docs/checkpoints.md`): a partition read half its share since
    /// its last barrier, so a checkpoint starts as soon as one may.
    fn start_if_due(&mut self, control: &impl PartitionControl) {
        if self.due && self.may_start_periodic() {
            self.start_checkpoint(control, CheckpointKind::Periodic);
            self.backlog = true;
        }
    }

    /// The end-of-backlog trigger (`docs/checkpoints.md`): every partition is at its
    /// end, none is paused, and the size trigger has run since the input last ran dry.
    /// What was read since the last barriers is all there is: it commits now, not at
    /// the next tick. Once per backlog, so a trickle still commits at the interval.
    pub fn ran_dry(&mut self, control: &impl PartitionControl) {
        if self.backlog && slot::caught_up(self.slots.values()) && self.may_start_periodic() {
            self.backlog = false;
            self.start_checkpoint(control, CheckpointKind::Periodic);
        }
    }

    fn flush_building(&mut self, control: &impl PartitionControl, partition: i32) {
        let Some(slot) = self.slots.get_mut(&partition) else {
            return;
        };
        if slot.building.records.is_empty() {
            return;
        }
        let batch = std::mem::replace(&mut slot.building, RecordBatch::new(partition));
        slot.outbox.push_back(PartitionInput::Records(batch));
        self.dispatch(control, partition);
    }

    /// Hands every partition's partial batch on.
    pub fn flush_all(&mut self, control: &impl PartitionControl) {
        for partition in self.assigned() {
            self.flush_building(control, partition);
        }
    }

    /// A checkpoint moved `which` fences: stalled partitions that moved are stalled no
    /// more.
    fn advanced(&mut self, which: Fence, fences: &BTreeMap<i32, i64>) {
        for (&partition, &fence) in fences {
            if self
                .progress
                .advanced(partition, which, fence, Instant::now())
            {
                info!(
                    partition,
                    fence,
                    which = which.name(),
                    "a stalled partition moves again"
                );
            }
        }
    }

    /// The oldest checkpoint in flight and how long it has been.
    pub(super) fn checkpoint_running(&self) -> Option<(u64, Duration)> {
        self.driver.running()
    }

    /// Keeps the timer's latest watermark; checkpoints close the windows it passed.
    pub fn set_watermark(&mut self, watermark: Option<crate::logic::watermark::InstanceMark>) {
        self.driver.set_watermark(watermark);
    }

    pub fn checkpoint_in_flight(&self) -> bool {
        self.driver.in_flight()
    }

    /// Whether a periodic checkpoint may start now (`checkpoint/coordinator.rs`).
    pub fn may_start_periodic(&self) -> bool {
        self.driver.may_start_periodic()
    }

    /// Starts a checkpoint: a barrier after each partition's last batch.
    pub fn start_checkpoint(
        &mut self,
        control: &impl PartitionControl,
        kind: CheckpointKind,
    ) -> Option<u64> {
        let spec = self.driver.start(self.assigned(), kind)?;
        self.due = false;
        for &partition in &spec.partitions {
            self.flush_building(control, partition);
            if let Some(slot) = self.slots.get_mut(&partition) {
                slot.barrier_bytes
                    .push_back((slot.next_offset, slot.read_bytes));
                let barrier = Barrier {
                    spec: spec.clone(),
                    partition,
                    next_offset: slot.next_offset,
                    claim: slot.claim,
                    max_event_ms: None,
                };
                slot.outbox.push_back(PartitionInput::Barrier(barrier));
            }
            self.dispatch(control, partition);
        }
        debug!(checkpoint = spec.id, ?kind, "checkpoint started");
        Some(spec.id)
    }

    /// Applies one event of the driver; commits offsets when a checkpoint completes.
    fn apply(&mut self, control: &impl PartitionControl, event: Event, commit: OffsetCommit) {
        match event {
            Event::Drained(partition) => self.drained(control, partition),
            Event::Completed(done) => {
                for done in done {
                    self.complete(control, done, commit);
                }
            }
        }
    }

    fn complete(
        &mut self,
        control: &impl PartitionControl,
        done: CheckpointDone,
        commit: OffsetCommit,
    ) {
        fault::point(fault::AFTER_SINKS_COMMITTED);
        self.advance_released(control, &done.released);
        self.advanced(Fence::Redis, &done.released);
        self.advanced(Fence::Durable, &done.durable);
        let mut committed = BTreeMap::new();
        if !done.durable.is_empty() {
            match control.commit(&done.durable, commit) {
                Ok(()) => committed = done.durable.clone(),
                Err(e) => {
                    warn!(
                        checkpoint = done.id,
                        error = format!("{e:#}"),
                        "offset commit failed; the next checkpoint retries"
                    )
                }
            }
        }
        self.metrics.checkpoint_completed(done.took);
        self.metrics
            .last_checkpoint_timestamp_seconds
            .set(crate::runtime::clock::wall_ms() as f64 / 1000.0);
        self.health.checkpoint_completed(done.took, &committed);
        debug!(
            checkpoint = done.id,
            took_ms = done.took.as_millis() as u64,
            partitions = done.durable.len(),
            "checkpoint complete"
        );
        self.driver.finished(done.id);
    }

    /// Applies the acks that arrived (between polls).
    pub fn apply_acks(&mut self, control: &impl PartitionControl) {
        for event in self.driver.arrived() {
            self.apply(control, event, OffsetCommit::Send);
        }
        self.start_if_due(control);
    }

    /// Runs a final checkpoint and waits for it (revocation and shutdown); offsets of
    /// the checkpoints completed meanwhile are committed to the group as `commit` says.
    pub fn final_checkpoint(
        &mut self,
        control: &impl PartitionControl,
        timeout: Duration,
        commit: OffsetCommit,
    ) -> anyhow::Result<()> {
        driver::final_checkpoint(
            &mut Driving {
                state: self,
                control,
                commit,
            },
            timeout,
        )
    }
}

/// The source as the driver sees it while a final checkpoint is waited for.
struct Driving<'a, C> {
    state: &'a mut SourceState,
    control: &'a C,
    commit: OffsetCommit,
}

impl<C: PartitionControl> Driven for Driving<'_, C> {
    fn driver(&mut self) -> &mut CheckpointDriver {
        &mut self.state.driver
    }

    fn start(&mut self, kind: CheckpointKind) -> Option<u64> {
        self.state.start_checkpoint(self.control, kind)
    }

    fn apply(&mut self, event: Event) {
        self.state.apply(self.control, event, self.commit);
    }
}
