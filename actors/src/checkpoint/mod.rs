//! Checkpoints: the barrier that marks one on a partition's stream, the claim and fence
//! ranges that tie a commit to its owner and offsets, the coordinator that decides when
//! a checkpoint is complete, and the driver that starts checkpoints and receives every
//! sink's and drainer's acks (`driver.rs`).

pub mod barrier;
pub mod claim;
pub mod coordinator;
pub mod driver;
