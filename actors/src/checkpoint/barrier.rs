//! Checkpoint barriers: what a checkpoint is, and the in-band marker of one
//! checkpoint on one partition's stream (`docs/checkpoints.md`).
//!
//! A barrier for checkpoint *n* on partition *p* says "everything of *p* before
//! `next_offset` came before me". Operator state is scoped by partition, so a barrier
//! never has to stall other partitions.

use std::sync::Arc;

use crate::checkpoint::claim::Claim;

/// Identifies one checkpoint and the partitions taking part in it.
#[derive(Debug)]
pub struct CheckpointSpec {
    /// Monotonic within one process.
    pub id: u64,
    /// Partitions that will each send one barrier for this checkpoint (sorted).
    pub partitions: Vec<i32>,
    /// Whether sinks must make everything durable now (shutdown, revocation).
    pub kind: CheckpointKind,
    /// The instance watermark when the checkpoint was triggered (`None` while it is
    /// unknown): at each partition's barrier, windows it has passed are closed.
    pub watermark: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointKind {
    /// Timer-driven: the warehouse may keep files open if they are not due to roll.
    Periodic,
    /// Shutdown or revocation: every sink makes all it holds durable.
    Final,
}

/// The in-band marker of a checkpoint on one partition's stream.
#[derive(Clone, Debug)]
pub struct Barrier {
    pub spec: Arc<CheckpointSpec>,
    pub partition: i32,
    /// The offset after the last record of this partition that precedes the barrier.
    pub next_offset: i64,
    /// The partition's claim (epoch and fences at assignment): sinks start their first
    /// range of this assignment at their fence, and every commit carries the epoch.
    pub claim: Claim,
    /// The largest event time of the partition before the barrier (set by its reader):
    /// stored with the window state, it is where the watermark resumes after a restart.
    pub max_event_ms: Option<i64>,
}
