//! The typed data messages that travel between actors, all of them batches.
//!
//! ```text
//! KafkaSource ──PartitionInput──> PartitionReader ──ShardInput──> Aggregator ──ShardFlush──> RedisSink
//!                                                 └─WarehouseInput──────────────────────────> WarehouseSink
//! RedisSink, WarehouseSink, drainers ──Ack (SinkAcks, DrainAcks)──> KafkaSource's CheckpointDriver
//! ```
//!
//! Every batch names its source partition, and every stream carries [`Barrier`]s in
//! band: a barrier for checkpoint *n* on partition *p* says "everything of *p* before
//! `next_offset` came before me". Operator state is scoped by partition, so a barrier
//! never has to stall other partitions (see `docs/checkpoints.md`).

use std::ops::Range;
use std::sync::Arc;

use actix::Message;
use arrow_array::RecordBatch as ArrowBatch;

use crate::checkpoint::barrier::{Barrier, CheckpointSpec};
use crate::checkpoint::claim::{Claim, SinkKind};
use crate::logic::decode::TraceValues;
use crate::logic::tables::Table;
use crate::logic::watermark::InstanceMark;
use crate::logic::window::{Counts, PartitionWindows, WindowKey};
use compact_str::CompactString;

/// Raw records of one partition as read from Kafka. Payloads share one buffer so a
/// batch costs two allocations however many records it holds.
#[derive(Debug, Default)]
pub struct RecordBatch {
    pub partition: i32,
    pub records: Vec<RawRecord>,
    pub data: Vec<u8>,
}

#[derive(Clone, Debug)]
pub struct RawRecord {
    pub offset: i64,
    /// Range of the value in [`RecordBatch::data`]; `None` for a null value.
    pub payload: Option<Range<usize>>,
}

impl RecordBatch {
    pub fn new(partition: i32) -> Self {
        RecordBatch {
            partition,
            records: Vec::new(),
            data: Vec::new(),
        }
    }

    pub fn push(&mut self, offset: i64, payload: Option<&[u8]>) {
        let payload = payload.map(|bytes| {
            let start = self.data.len();
            self.data.extend_from_slice(bytes);
            start..self.data.len()
        });
        self.records.push(RawRecord { offset, payload });
    }

    pub fn payload(&self, record: &RawRecord) -> Option<&[u8]> {
        record.payload.clone().map(|range| &self.data[range])
    }

    pub fn next_offset(&self) -> Option<i64> {
        self.records.last().map(|r| r.offset + 1)
    }
}

/// What the source hands a partition reader, in partition order.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub enum PartitionInput {
    Records(RecordBatch),
    Barrier(Barrier),
}

/// Events of one partition routed to one aggregator shard. Receivers and message ids
/// live in one shared string buffer.
#[derive(Debug, Default)]
pub struct EventBatch {
    pub partition: i32,
    pub events: Vec<RoutedEvent>,
    /// Concatenated receivers and message ids.
    pub text: String,
    /// Byte ranges of receivers in `text`; each event names a range of these.
    pub receivers: Vec<Range<u32>>,
}

#[derive(Clone, Debug)]
pub struct RoutedEvent {
    /// The record's offset in its partition.
    pub offset: i64,
    pub state: i32,
    pub business_id: i64,
    pub log_timestamp: i64,
    /// Indexes into [`EventBatch::receivers`].
    pub receivers: Range<u32>,
    /// Byte range of the message id in [`EventBatch::text`].
    pub message_id: Option<Range<u32>>,
}

impl EventBatch {
    pub fn new(partition: i32) -> Self {
        EventBatch {
            partition,
            ..Default::default()
        }
    }

    fn push_text(&mut self, s: &str) -> Range<u32> {
        let start = self.text.len() as u32;
        self.text.push_str(s);
        start..self.text.len() as u32
    }

    /// Appends one event, copying its strings into the shared buffer.
    #[allow(clippy::too_many_arguments)]
    pub fn push<'a>(
        &mut self,
        offset: i64,
        state: i32,
        business_id: i64,
        log_timestamp: i64,
        ids: impl IntoIterator<Item = &'a str>,
        message_id: Option<&str>,
    ) {
        let first = self.receivers.len() as u32;
        for id in ids {
            let range = self.push_text(id);
            self.receivers.push(range);
        }
        let receivers = first..self.receivers.len() as u32;
        let message_id = message_id.map(|m| self.push_text(m));
        self.events.push(RoutedEvent {
            offset,
            state,
            business_id,
            log_timestamp,
            receivers,
            message_id,
        });
    }

    pub fn text(&self, range: &Range<u32>) -> &str {
        &self.text[range.start as usize..range.end as usize]
    }

    pub fn receivers_of<'s>(
        &'s self,
        event: &'s RoutedEvent,
    ) -> impl Iterator<Item = &'s str> + 's {
        self.receivers[event.receivers.start as usize..event.receivers.end as usize]
            .iter()
            .map(move |r| self.text(r))
    }
}

/// What a reader hands an aggregator shard.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub enum ShardInput {
    Events(EventBatch),
    Barrier(Barrier),
    /// A newly claimed partition's open windows (this shard's part) and the unit fences
    /// of its last, interrupted Redis commit, sent by its reader before the partition's
    /// first records; replaces what the shard held.
    Restore {
        partition: i32,
        windows: PartitionWindows,
        unit_fences: std::collections::BTreeMap<u16, i64>,
    },
}

/// Values to push onto one list key, oldest first.
#[derive(Debug)]
pub struct ListPush {
    /// The key without its configured prefix (a receiver or a message id).
    pub key: CompactString,
    pub values: TraceValues,
}

/// One partition's share of one shard's state for one checkpoint.
#[derive(Debug)]
pub struct PartitionDelta {
    pub partition: i32,
    /// The barrier's offset: this delta covers the partition's records before it.
    pub next_offset: i64,
    /// The barrier's claim.
    pub claim: Claim,
    /// `(businessId, state, receivers)` increments.
    pub template_counts: Vec<(i64, i32, i64)>,
    pub receiver_lists: Vec<ListPush>,
    pub message_lists: Vec<ListPush>,
    /// Series increments: windows closed at this barrier and late amendments.
    pub series: Vec<(WindowKey, Counts)>,
    /// The shard's part of the partition's open windows after this barrier
    /// ([`PartitionWindows::encode`]; parts concatenate).
    pub windows: String,
}

/// Everything one aggregator shard holds for one checkpoint.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct ShardFlush {
    pub shard: usize,
    pub spec: Arc<CheckpointSpec>,
    pub partitions: Vec<PartitionDelta>,
}

/// Rows of one table for one Hive partition folder (`dt=…/hour=…`).
#[derive(Debug)]
pub struct TableRows {
    pub table: Table,
    /// Folder below the table, e.g. `dt=2023-11-20/hour=11`.
    pub folder: String,
    pub rows: ArrowBatch,
}

/// Rows of one partition's record batch, already columnar and split by folder.
#[derive(Debug)]
pub struct DetailBatch {
    pub partition: i32,
    pub parts: Vec<TableRows>,
    /// The same events pre-aggregated per (window, businessId, state), for the
    /// `dws_template_state_1m` windows the warehouse sink keeps.
    pub windows: Vec<(WindowKey, Counts)>,
}

/// What a reader hands the warehouse sink.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub enum WarehouseInput {
    Rows(DetailBatch),
    Barrier(Barrier),
    /// A newly claimed partition's open `dws_template_state_1m` windows, sent by its
    /// reader before the partition's first rows; replaces what the sink held.
    Restore {
        partition: i32,
        windows: PartitionWindows,
    },
}

/// What travels back up the pipeline to the Kafka source's checkpoint driver
/// (`checkpoint/driver.rs`), sent through a [`SinkAcks`] or a [`DrainAcks`] handle. Acks
/// travel over a std channel because the source's thread may be blocked inside
/// librdkafka's rebalance callback waiting for them; at most a few arrive per
/// checkpoint, so the channel needs no bound.
///
/// [`SinkAcks`]: crate::checkpoint::driver::SinkAcks
/// [`DrainAcks`]: crate::checkpoint::driver::DrainAcks
#[derive(Debug)]
pub enum Ack {
    /// A sink made everything before `fences[p]` durable for checkpoint `checkpoint`.
    SinkCommitted {
        sink: SinkKind,
        checkpoint: u64,
        fences: Vec<(i32, i64)>,
    },
    /// The items a paused partition had queued were delivered; resume it.
    Drained { partition: i32 },
}

// Control messages: few, small, off the data path.

/// Asks the source to start a checkpoint, carrying the timer's instance watermark and
/// the partitions it was taken over (`None` while unknown); the checkpoint's barriers
/// close the windows it passed.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct TriggerCheckpoint {
    pub watermark: Option<InstanceMark>,
}

/// Asks the source to stop reading, run a final checkpoint, commit, and leave the group.
/// `done` receives the outcome.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown {
    pub done: tokio::sync::oneshot::Sender<anyhow::Result<()>>,
}

/// A partition reader's report to the timer.
#[derive(Clone, Copy, Debug, Message)]
#[rtype(result = "()")]
pub enum WatermarkUpdate {
    /// The reader of this partition started (the partition was assigned); `restored`
    /// is the largest event time of its stored state, where its watermark resumes.
    Assigned {
        partition: i32,
        restored: Option<i64>,
    },
    /// A batch was read; `max_event_ms` is its largest decoded event time.
    Observed {
        partition: i32,
        max_event_ms: Option<i64>,
    },
    /// The reader stopped (the partition was revoked).
    Revoked { partition: i32 },
}

/// Folders with rows may be complete now: look.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct CommitDue;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_batch_keeps_strings_apart() {
        let mut batch = EventBatch::new(3);
        batch.push(0, 10, 7, 1, ["a", "bc"], Some("m1"));
        batch.push(1, 60, 7, 2, std::iter::empty(), None);
        let first: Vec<_> = batch.receivers_of(&batch.events[0]).collect();
        assert_eq!(first, vec!["a", "bc"]);
        assert_eq!(
            batch.text(batch.events[0].message_id.as_ref().unwrap()),
            "m1"
        );
        assert_eq!(batch.receivers_of(&batch.events[1]).count(), 0);
    }

    #[test]
    fn record_batch_tracks_offsets_and_nulls() {
        let mut batch = RecordBatch::new(0);
        batch.push(5, Some(b"ab"));
        batch.push(6, None);
        assert_eq!(batch.payload(&batch.records[0]), Some(&b"ab"[..]));
        assert_eq!(batch.payload(&batch.records[1]), None);
        assert_eq!(batch.next_offset(), Some(7));
    }
}
