//! The actors of anchorflow and everything they are made of.
//!
//! Where things live (no module imports one that imports it back;
//! `tests/architecture.rs` checks it):
//! - [`messages`]: every message actors send each other: the data batches and
//!   barriers, and the few control messages (checkpoint trigger, watermark reports,
//!   shutdown, commit nudges).
//! - Actors, one file each: [`source::kafka_source`] (the consumer-group member),
//!   [`reader::partition_reader`] (one per partition: decode, rows, routing),
//!   [`aggregator`] (a shard of the Redis state), [`timer`] (checkpoint ticks and
//!   watermarks), [`sinks::redis::redis_sink`], [`sinks::warehouse::warehouse_sink`]
//!   and [`sinks::warehouse::partition_committer`].
//! - [`source`]: the rdkafka callbacks ([`source::context`]), claims on assignment
//!   ([`source::assignment`]), flow control and checkpoints ([`source::flow`]),
//!   partitions that must not turn idle ([`source::held`]).
//! - [`reader`]: what a reader makes of a batch ([`reader::output`]) and where it
//!   goes ([`reader::links`]).
//! - [`checkpoint`]: barriers, claims and fence ranges as data, and the coordinator
//!   that says when a checkpoint is complete.
//! - [`logic`]: decoding, the shards' list values, windows, watermarks, tables and Hive
//!   folders: no actors, no I/O.
//! - [`protocol`]: anchorflow's bookkeeping in Redis: key names, claims and fences,
//!   recorded publishes, the instance lease, skipped records, and the Lua scripts with
//!   their typed argument builders ([`protocol::scripts`]).
//! - [`sinks`]: the Redis sink (its commit plan and connection) and the warehouse sink
//!   (roll policy, file writers, publishing, published marks, partition commit, the
//!   hook, and the [`sinks::warehouse::storage::Storage`] its files live behind).
//! - [`runtime`]: what every actor runs on: exit codes, health, supervision, the one
//!   retry loop, backoff, bounded mailboxes, Redis-corrected processing time and the
//!   test-only fault points.
//! - [`config`], [`metrics`]: configuration types and every metric.
//!
//! The wiring (which actor runs on which thread, with which links) is in the binary's
//! `pipeline` module.

pub mod aggregator;
pub mod checkpoint;
pub mod config;
pub mod logic;
pub mod messages;
pub mod metrics;
pub mod protocol;
pub mod reader;
pub mod runtime;
pub mod sinks;
pub mod source;
pub mod timer;
