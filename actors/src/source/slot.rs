//! One assigned partition as the source sees it ([`Slot`]): its reader, the batch
//! being cut, what is queued for the reader, why it is paused, and how far it has read
//! beyond what the Redis sink made durable (where the input stops holding memory,
//! `CheckpointDone::released`), in records and in bytes (the memory budget's uncommitted
//! share, `runtime/memory.rs`). `flow.rs` drives it.

use std::collections::VecDeque;
use std::time::Instant;

use actix::prelude::*;

use crate::checkpoint::claim::Claim;
use crate::messages::{PartitionInput, RecordBatch};
use crate::metrics::{Metrics, ReasonLabel};
use crate::runtime::mailbox::Mailbox;
use crate::source::gap::GapSearch;

/// One assigned partition.
pub struct Slot {
    pub(super) reader: Mailbox<PartitionInput>,
    pub(super) arbiter: ArbiterHandle,
    pub(super) building: RecordBatch,
    pub(super) outbox: VecDeque<PartitionInput>,
    /// Paused for [`Pause::ReaderFull`]: a drainer is delivering the outbox.
    pub(super) reader_full: bool,
    /// Paused for [`Pause::Uncommitted`]: at the uncommitted bound, waiting for a
    /// checkpoint.
    pub(super) uncommitted: bool,
    /// librdkafka reported the end of the partition (`enable.partition.eof`: its fetch
    /// reached the high watermark) and no record came after it.
    pub(super) at_end: bool,
    /// Offset after the last record handed on; starts at the claim's lower fence.
    pub next_offset: i64,
    /// Where the input stops holding memory: the Redis sink's fence at the last
    /// completed checkpoint, or the claim (`CheckpointDone::released`).
    pub(super) released: i64,
    /// Bytes read so far (payloads plus `RECORD_OVERHEAD` each), the same counted up to
    /// `released`, and the count at each barrier not yet released, as `(next_offset,
    /// bytes)`: what the memory budget's uncommitted share is held against.
    pub(super) read_bytes: u64,
    pub(super) released_bytes: u64,
    pub(super) barrier_bytes: VecDeque<(i64, u64)>,
    pub(super) claim: Claim,
    /// The search for records the broker jumped over, while one runs (`gap.rs`), and
    /// how far back the last one found them (where the next starts).
    pub(super) search: Option<GapSearch>,
    pub(super) gap_step: i64,
    /// What librdkafka's statistics last said of the partition: the offset below which
    /// it has records for us (the last stable offset, else the high watermark; -1
    /// while unknown) and its log start.
    pub(super) high_watermark: i64,
    pub(super) log_start: i64,
    /// When the partition last delivered a record, or was (re)started or searched: a
    /// partition below its high watermark that delivers nothing for long is searched.
    pub(super) last_delivered: Instant,
}

/// Why a partition is paused (both may hold at once).
#[derive(Clone, Copy, Debug)]
pub(super) enum Pause {
    /// Its reader's mailbox is full.
    ReaderFull,
    /// It is at `pipeline.max_uncommitted_records`.
    Uncommitted,
}

impl Slot {
    /// A newly claimed partition, read from its claim's lower fence.
    pub(super) fn new(
        reader: Mailbox<PartitionInput>,
        arbiter: ArbiterHandle,
        partition: i32,
        claim: Claim,
    ) -> Self {
        Slot {
            reader,
            arbiter,
            building: RecordBatch::new(partition),
            outbox: VecDeque::new(),
            reader_full: false,
            uncommitted: false,
            at_end: false,
            next_offset: claim.start(),
            released: claim.start(),
            read_bytes: 0,
            released_bytes: 0,
            barrier_bytes: VecDeque::new(),
            claim,
            search: None,
            gap_step: 1,
            high_watermark: -1,
            log_start: 0,
            last_delivered: Instant::now(),
        }
    }

    /// Where reading resumes after a pause: where the search reads from while one
    /// runs, else the next offset.
    pub(super) fn resume_at(&self) -> i64 {
        self.search
            .as_ref()
            .map_or(self.next_offset, GapSearch::reading_from)
    }

    pub(super) fn paused(&self) -> bool {
        self.reader_full || self.uncommitted
    }

    /// Whether the partition read as much beyond its released fence as it may.
    pub(super) fn over_uncommitted(&self, max_records: i64, max_bytes: u64) -> bool {
        self.next_offset - self.released >= max_records
            || self.read_bytes - self.released_bytes >= max_bytes
    }

    /// Whether the partition read half of what it may beyond its released fence since
    /// its last barrier: a checkpoint then has enough to commit while the partition
    /// reads the other half (`flow.rs`, the size trigger).
    pub(super) fn half_full(&self, max_records: i64, max_bytes: u64) -> bool {
        let since = self.barrier_bytes.back().copied();
        let since = since.unwrap_or((self.released, self.released_bytes));
        half_read(
            (self.next_offset, self.read_bytes),
            since,
            max_records,
            max_bytes,
        )
    }

    /// Whether the partition read records after its last barrier (or, with none in
    /// flight, after its released fence).
    pub(super) fn read_since_barrier(&self) -> bool {
        let since = self
            .barrier_bytes
            .back()
            .map_or(self.released, |&(offset, _)| offset);
        self.next_offset > since
    }

    /// The released fence moved to `fence`: bytes up to the barriers it passed are too.
    pub(super) fn advance(&mut self, fence: i64) {
        self.released = self.released.max(fence);
        while let Some(&(offset, bytes)) = self.barrier_bytes.front() {
            if offset > self.released {
                break;
            }
            self.released_bytes = bytes;
            self.barrier_bytes.pop_front();
        }
    }
}

/// Whether the input ran dry: every partition is at its end and not paused (so nothing
/// more waits behind a pause), and some hold records no barrier has followed yet.
pub(super) fn caught_up<'a>(slots: impl Iterator<Item = &'a Slot>) -> bool {
    all_at_end(slots.map(|s| (s.at_end && !s.paused(), s.read_since_barrier())))
}

/// [`caught_up`] over `(at its end and unpaused, read since its last barrier)` per
/// partition. One partition at its end says nothing of the others, whose fetches may
/// simply not have come back yet.
fn all_at_end(partitions: impl Iterator<Item = (bool, bool)>) -> bool {
    let (mut all, mut any_read) = (true, false);
    for (at_end, read) in partitions {
        all &= at_end;
        any_read |= read;
    }
    all && any_read
}

/// Exports how many partitions are paused, by why (a partition may count under both).
pub(super) fn export_paused<'a>(metrics: &Metrics, slots: impl Iterator<Item = &'a Slot> + Clone) {
    for (reason, why) in [
        (
            "reader_full",
            (|s: &Slot| s.reader_full) as fn(&Slot) -> bool,
        ),
        ("uncommitted", |s: &Slot| s.uncommitted),
    ] {
        let count = slots.clone().filter(|s| why(s)).count() as i64;
        metrics
            .paused_partitions
            .get_or_create(&ReasonLabel { reason })
            .set(count);
    }
}

/// Whether `read` (next offset, bytes read) is at least half of either bound beyond
/// `since` (the last barrier's, or the released fence's).
fn half_read(read: (i64, u64), since: (i64, u64), max_records: i64, max_bytes: u64) -> bool {
    read.0 - since.0 >= max_records / 2 || read.1.saturating_sub(since.1) >= max_bytes / 2
}

#[cfg(test)]
mod tests {
    use super::{all_at_end, half_read};

    #[test]
    fn the_input_ran_dry_only_when_every_partition_is_at_its_end() {
        // Partition 0 read to its end, the last fetches of 1 and 2 not back yet:
        // committing now would leave their rest waiting for a tick.
        let early = [(true, true), (false, false), (false, false)];
        assert!(!all_at_end(early.into_iter()));
        assert!(all_at_end([(true, true), (true, false)].into_iter()));
        assert!(
            !all_at_end([(true, false), (true, false)].into_iter()),
            "nothing new"
        );
        assert!(!all_at_end(std::iter::empty()));
    }

    #[test]
    fn half_of_either_bound_is_due() {
        let since = (100, 1_000);
        assert!(!half_read((100, 1_000), since, 100, 1_000));
        assert!(!half_read((149, 1_499), since, 100, 1_000));
        assert!(half_read((120, 1_500), since, 100, 1_000), "half the bytes");
        assert!(
            half_read((150, 1_100), since, 100, 1_000),
            "half the records"
        );
    }
}
