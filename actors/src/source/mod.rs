//! The Kafka source: the consumer-group member (`kafka_source.rs`), its librdkafka
//! callbacks (`context.rs`), claims on assignment (`assignment.rs`), flow control and
//! checkpoints (`flow.rs`) over one `slot.rs` per assigned partition, what that flow
//! needs of the consumer (`control.rs`), and the partitions that must never turn idle
//! (`held.rs`).

pub mod assignment;
pub mod context;
pub mod control;
pub mod flow;
pub mod held;
pub mod kafka_source;
pub mod slot;
