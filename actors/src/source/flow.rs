//! The source's flow control and checkpoints, apart from librdkafka: per assigned
//! partition a [`Slot`] (its reader, the batch being cut, what is queued for it), and
//! the checkpoint [`Coordinator`]. The actor (`kafka_source.rs`) and the rebalance
//! callback (`context.rs`, which runs inside `poll`) share one [`SourceState`] behind
//! a mutex; what it needs of the consumer is [`PartitionControl`].
//!
//! Batches go to a reader with `try_send`; a full reader pauses its partition
//! (`pausing.rs`). A partition is also paused (*throttled*) once it has read
//! `pipeline.max_uncommitted_records`, or its share of the memory budget, beyond what
//! the Redis sink has made durable, and resumes when a checkpoint brings it back under.
//! The shards accept records until the next barrier, so without this bound a stalled
//! Redis would let the whole backlog into memory, and the partitions, read to their
//! ends, would turn idle while nothing of theirs was committed. The bound is held
//! against the Redis sink alone (`Completed::released`): the warehouse keeps the rows it
//! has not published in files and in row groups held to a share of their own, so a
//! warehouse that publishes once a minute (`warehouse.roll_interval_secs`) must not
//! stop reading in between; a slow or stalled warehouse sink stops it through the
//! handoff (a reader waits until the warehouse took each batch).

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tracing::{debug, info, warn};

use crate::checkpoint::barrier::{Barrier, CheckpointKind};
use crate::checkpoint::claim::Claim;
use crate::checkpoint::coordinator::{Completed, Coordinator};
use crate::config::Config;
use crate::messages::{PartitionInput, RecordBatch, SourceNotice};
use crate::protocol::fences::StoredWindows;
use crate::reader::links::ReaderContext;
use crate::reader::partition_reader::{PartitionReader, READER_MAILBOX};
use crate::runtime::fault;
use crate::runtime::health::Health;
use crate::runtime::mailbox::Mailbox;
use crate::runtime::memory::RECORD_OVERHEAD;
use crate::source::control::{OffsetCommit, PartitionControl};
use crate::source::held::Held;
use crate::source::progress::{Fence, Progress};
pub use crate::source::slot::Slot;
use crate::source::slot::{self, Pause};

/// Everything a reader needs, minus the partition number.
#[derive(Clone)]
pub struct ReaderFactory {
    pub config: Arc<Config>,
    pub context: ReaderContext,
    pub arbiters: Arc<[ArbiterHandle]>,
    /// Shared with the timer (see `held.rs`).
    pub held: Held,
    pub health: Health,
}

pub struct SourceState {
    pub factory: ReaderFactory,
    pub(super) slots: BTreeMap<i32, Slot>,
    next_reader: usize,
    notices: Receiver<SourceNotice>,
    pub(super) notices_tx: Sender<SourceNotice>,
    coordinator: Coordinator,
    /// The last checkpoint completed; whoever waits for a final one looks here.
    completed: Option<u64>,
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
    pub fn new(
        factory: ReaderFactory,
        notices: Receiver<SourceNotice>,
        notices_tx: Sender<SourceNotice>,
    ) -> Self {
        SourceState {
            factory,
            slots: BTreeMap::new(),
            next_reader: 0,
            notices,
            notices_tx,
            coordinator: Coordinator::default(),
            completed: None,
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
        let factory = &self.factory;
        let arbiter = factory.arbiters[self.next_reader % factory.arbiters.len()].clone();
        self.next_reader += 1;
        let context = factory.context.clone();
        let reader = Supervisor::start_in_arbiter(&arbiter, move |_| {
            PartitionReader::new(context, partition, claim, windows)
        });
        let reader = Mailbox::new(
            reader,
            READER_MAILBOX,
            factory.context.metrics.mailbox("partition_reader"),
        );
        factory
            .held
            .track_reader(partition, reader.busy_probe(READER_MAILBOX));
        self.slots
            .insert(partition, Slot::new(reader, arbiter, partition, claim));
        self.progress
            .assigned(partition, claim.start(), Instant::now());
        self.export_assigned();
    }

    /// Drops a partition's reader (revocation, shutdown).
    pub fn unassign(&mut self, partition: i32) {
        self.slots.remove(&partition);
        self.progress.forget(partition);
        self.factory.context.metrics.forget_partition(partition);
        self.factory.held.forget(partition);
        self.export_assigned();
    }

    fn export_assigned(&self) {
        let metrics = &self.factory.context.metrics;
        metrics.partitions_assigned.set(self.slots.len() as i64);
        self.export_paused();
    }

    pub(super) fn export_paused(&self) {
        slot::export_paused(&self.factory.context.metrics, self.slots.values());
    }

    /// Adds a record to its partition's batch; hands the batch on once it is full.
    pub fn push(
        &mut self,
        control: &impl PartitionControl,
        partition: i32,
        offset: i64,
        payload: Option<&[u8]>,
    ) {
        let (source, pipeline) = (&self.factory.config.source, &self.factory.config.pipeline);
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
        let throttle = !slot.throttled && slot.over_uncommitted(uncommitted.0, uncommitted.1);
        self.due |= slot.half_full(uncommitted.0, uncommitted.1);
        if throttle
            || slot.building.records.len() >= max_records
            || slot.building.data.len() >= max_bytes
        {
            self.flush_building(control, partition);
        }
        if throttle {
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
        self.coordinator.running()
    }

    /// Keeps the timer's latest watermark; checkpoints close the windows it passed.
    pub fn set_watermark(&mut self, watermark: Option<i64>) {
        self.coordinator.set_watermark(watermark);
    }

    pub fn checkpoint_in_flight(&self) -> bool {
        self.coordinator.in_flight().is_some()
    }

    /// Whether a periodic checkpoint may start now (`checkpoint/coordinator.rs`).
    pub fn may_start_periodic(&self) -> bool {
        self.coordinator.may_start(CheckpointKind::Periodic)
    }

    /// Starts a checkpoint: a barrier after each partition's last batch.
    pub fn start_checkpoint(
        &mut self,
        control: &impl PartitionControl,
        kind: CheckpointKind,
    ) -> Option<u64> {
        let spec = self.coordinator.start(self.assigned(), kind)?;
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

    /// Applies one notice; commits offsets when a checkpoint completes.
    fn on_notice(
        &mut self,
        control: &impl PartitionControl,
        notice: SourceNotice,
        commit: OffsetCommit,
    ) {
        match notice {
            SourceNotice::Drained { partition } => self.drained(control, partition),
            SourceNotice::SinkCommitted {
                sink,
                checkpoint,
                fences,
            } => match self.coordinator.sink_committed(sink, checkpoint, fences) {
                Ok(completed) => {
                    for done in completed {
                        self.complete(control, done, commit);
                    }
                }
                Err(stale) => warn!(
                    checkpoint = stale.checkpoint,
                    current = stale.current,
                    sink = sink.name(),
                    "stale sink commit ignored"
                ),
            },
        }
    }

    fn complete(&mut self, control: &impl PartitionControl, done: Completed, commit: OffsetCommit) {
        fault::point(fault::AFTER_SINKS_COMMITTED);
        self.advance_released(control, &done.released);
        self.advanced(Fence::Redis, &done.released);
        self.advanced(Fence::Durable, &done.durable);
        let metrics = &self.factory.context.metrics;
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
        metrics.checkpoint_completed(done.took);
        metrics
            .last_checkpoint_timestamp_seconds
            .set(crate::runtime::clock::wall_ms() as f64 / 1000.0);
        self.factory
            .health
            .checkpoint_completed(done.took, &committed);
        debug!(
            checkpoint = done.id,
            took_ms = done.took.as_millis() as u64,
            partitions = done.durable.len(),
            "checkpoint complete"
        );
        self.completed = Some(done.id);
    }

    /// Applies the notices that arrived (between polls).
    pub fn drain_notices(&mut self, control: &impl PartitionControl) {
        while let Ok(notice) = self.notices.try_recv() {
            self.on_notice(control, notice, OffsetCommit::Send);
        }
        self.start_if_due(control);
    }

    /// Waits for notices until `done` holds or `deadline` passes; offsets of the
    /// checkpoints completed meanwhile are committed to the group as `commit` says.
    fn wait(
        &mut self,
        control: &impl PartitionControl,
        deadline: Instant,
        commit: OffsetCommit,
        done: impl Fn(&SourceState) -> bool,
    ) -> anyhow::Result<()> {
        while !done(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .notices
                .recv_timeout(left.max(Duration::from_millis(1)))
            {
                Ok(notice) => self.on_notice(control, notice, commit),
                Err(RecvTimeoutError::Timeout) if Instant::now() >= deadline => {
                    anyhow::bail!("deadline passed")
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => anyhow::bail!("the sinks are gone"),
            }
        }
        Ok(())
    }

    /// Runs a final checkpoint and waits for it (revocation and shutdown).
    pub fn final_checkpoint(
        &mut self,
        control: &impl PartitionControl,
        timeout: Duration,
        commit: OffsetCommit,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let late = |what: &str| format!("{what} did not complete within {timeout:?}");
        // A periodic checkpoint may be running; let it finish first.
        let running = self.wait(control, deadline, commit, |s| !s.checkpoint_in_flight());
        running.map_err(|e| e.context(late("the checkpoint before the final one")))?;
        let Some(id) = self.start_checkpoint(control, CheckpointKind::Final) else {
            return Ok(());
        };
        self.wait(control, deadline, commit, |s| s.completed == Some(id))
            .map_err(|e| e.context(late("the final checkpoint")))
    }
}
