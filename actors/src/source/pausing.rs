//! Pausing and resuming partitions: the source's half of backpressure.
//!
//! Batches go to a reader with `try_send`. When the reader's mailbox is full the
//! partition is **paused**, the queued items are delivered with `send().await` by a
//! drainer task on the reader's arbiter, and the partition **resumes** (at the exact
//! next offset) when the drainer acks (a `DrainAcks` handle of the checkpoint driver).
//! The consumer keeps polling all the while, so rebalances and other partitions carry
//! on. A partition is also paused at its uncommitted bound and resumes when a checkpoint
//! brings it back under (`flow.rs` says why the bound exists). `Pause` names the two
//! reasons (`ReaderFull`, `Uncommitted`), each a flag of the slot; a partition resumes
//! only once neither holds.

use std::collections::BTreeMap;
use std::time::Instant;

use tracing::{debug, error, warn};

use crate::messages::PartitionInput;
use crate::source::control::PartitionControl;
use crate::source::flow::SourceState;
use crate::source::slot::Pause;

impl SourceState {
    /// Hands queued items to the reader while it has room; pauses the partition and
    /// starts a drainer when it does not.
    pub(super) fn dispatch(&mut self, control: &impl PartitionControl, partition: i32) {
        let Some(slot) = self.slots.get_mut(&partition) else {
            return;
        };
        if slot.reader_full {
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
            self.pause(control, partition);
            return;
        }
    }

    /// Pauses a partition whose reader is full and hands what is queued for it to a
    /// drainer, which reports back when the reader took it all.
    pub(super) fn pause(&mut self, control: &impl PartitionControl, partition: i32) {
        self.hold(control, partition, Pause::ReaderFull);
        let Some(slot) = self.slots.get_mut(&partition) else {
            return;
        };
        let items: Vec<PartitionInput> = slot.outbox.drain(..).collect();
        let reader = slot.reader.clone();
        let acks = self.driver.drain_acks();
        slot.arbiter.spawn(async move {
            for item in items {
                if let Err(error) = reader.send(item).await {
                    warn!(partition, %error, "partition reader is gone; queued input dropped");
                    break;
                }
            }
            acks.drained(partition);
        });
    }

    /// The reader drained what was queued for it.
    pub(super) fn drained(&mut self, control: &impl PartitionControl, partition: i32) {
        if let Some(slot) = self.slots.get_mut(&partition) {
            slot.reader_full = false;
            self.release(control, partition);
        }
        self.dispatch(control, partition);
    }

    /// Marks why a partition is paused, and pauses it in the consumer unless it was.
    pub(super) fn hold(&mut self, control: &impl PartitionControl, partition: i32, why: Pause) {
        let Some(slot) = self.slots.get_mut(&partition) else {
            return;
        };
        let was_paused = slot.paused();
        let metrics = &self.metrics;
        match why {
            Pause::ReaderFull => {
                slot.reader_full = true;
                metrics.partition_pauses.inc();
            }
            Pause::Uncommitted => {
                slot.uncommitted = true;
                metrics.uncommitted_pauses.inc();
            }
        }
        self.held.set_paused(partition, true);
        debug!(
            partition,
            ?why,
            queued = slot.outbox.len(),
            next_offset = slot.next_offset,
            released = slot.released,
            "partition paused"
        );
        if !was_paused {
            control.pause(partition);
        }
        self.export_paused();
    }

    /// Resumes a partition, at its exact next offset, once nothing holds it paused.
    pub(super) fn release(&mut self, control: &impl PartitionControl, partition: i32) {
        self.export_paused();
        let Some(slot) = self.slots.get_mut(&partition) else {
            return;
        };
        if slot.paused() {
            return;
        }
        self.held.set_paused(partition, false);
        debug!(
            partition,
            next_offset = slot.next_offset,
            "partition resumed"
        );
        slot.last_delivered = Instant::now();
        control.resume(partition, slot.resume_at());
    }

    /// A checkpoint released input (`CheckpointDone::released`): partitions paused at
    /// their uncommitted bound that are back under it resume.
    pub(super) fn advance_released(
        &mut self,
        control: &impl PartitionControl,
        released: &BTreeMap<i32, i64>,
    ) {
        let pipeline = &self.config.pipeline;
        let max_records = pipeline.max_uncommitted_records as i64;
        let max_bytes = pipeline.memory().uncommitted_bytes(self.slots.len());
        for (&partition, &fence) in released {
            let Some(slot) = self.slots.get_mut(&partition) else {
                continue;
            };
            slot.advance(fence);
            if slot.uncommitted && !slot.over_uncommitted(max_records, max_bytes) {
                slot.uncommitted = false;
                self.release(control, partition);
            }
        }
    }
}
