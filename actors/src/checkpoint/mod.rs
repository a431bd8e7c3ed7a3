//! Checkpoints as data: the barrier that marks one on a partition's stream, the claim
//! and fence ranges that tie a commit to its owner and offsets, and the coordinator
//! that decides when a checkpoint is complete.

pub mod barrier;
pub mod claim;
pub mod coordinator;
