//! What the source's flow control ([`super::flow`]) needs of the Kafka consumer, as a
//! trait so that its logic does not depend on librdkafka (`context.rs` implements it).

use std::collections::BTreeMap;

/// What flow control and checkpoints need of the Kafka consumer.
pub trait PartitionControl {
    fn pause(&self, partition: i32);
    /// Resumes a paused partition at `next_offset` (pausing purges what librdkafka
    /// had fetched, and it does not always fetch it again by itself).
    fn resume(&self, partition: i32, next_offset: i64);
    /// Commits offsets to the group, waiting for its answer or not.
    fn commit(&self, offsets: &BTreeMap<i32, i64>, commit: OffsetCommit) -> anyhow::Result<()>;
}

/// How a checkpoint's offsets are reported to the consumer group. They are progress
/// reports only (the fences decide where reading resumes), so nothing waits on them
/// longer than it must.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetCommit {
    /// Wait for the group's answer: a revocation, so that the next owner's lag starts
    /// right (the rebalance needs the broker anyway).
    Wait,
    /// Send and go on: periodic checkpoints, and a shutdown, which must end within its
    /// deadline even when the broker does not answer (closing the consumer then waits,
    /// bounded, for the commit in flight).
    Send,
}
