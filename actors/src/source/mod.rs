//! The Kafka source: the consumer-group member (`kafka_source.rs`), its librdkafka
//! callbacks (`context.rs`), claims on assignment (`assignment.rs`), checkpoints and
//! the records handed to the readers (`flow.rs`), pausing and resuming (`pausing.rs`),
//! one `slot.rs` per assigned partition, what all that needs of the consumer
//! (`control.rs`), the checks every delivered record passes and the search for records
//! a fetch jumped over (`reading.rs`, `gap.rs`), whether every partition keeps moving
//! (`progress.rs`), and the partitions that must never turn idle (`held.rs`).

pub mod assignment;
pub mod context;
pub mod control;
pub mod flow;
pub mod gap;
pub mod held;
pub mod kafka_source;
pub mod pausing;
pub mod progress;
pub mod reading;
pub mod slot;
