//! The actors of anchorflow and the typed messages they exchange.
//!
//! Where things live:
//! - [`messages`]: the data messages (all batches) and barriers passed between actors.
//! - [`kafka_source`]: `KafkaSource`, the consumer-group member: polls, creates and
//!   pauses partition readers, injects checkpoint barriers, commits offsets.
//! - [`partition_reader`]: `PartitionReader`, one per partition: decode, validate,
//!   build warehouse rows, route events to aggregator shards.
//! - [`aggregator`]: `Aggregator`, a shard of pre-aggregated Redis state, scoped by
//!   source partition.
//! - [`timer`]: `Timer`, sleeps until the next deadline and triggers checkpoints; owns
//!   the event-time [`watermark`]s the readers report, and triggers a checkpoint as
//!   soon as the watermark passes a window's close.
//! - [`held`]: partitions with records this instance cannot read yet (paused by
//!   backpressure, broker silent): never idle.
//! - [`window`]: tumbling windows per source partition, kept by the shards (Redis
//!   series) and the warehouse sink (`dws_template_state_1m`), checkpointed with each.
//! - [`redis_sink`]: `RedisSink`, applies a checkpoint with one Lua script call (or a
//!   few, split by key-hash unit, when it is big: [`redis_commit`] plans them).
//! - [`clock`]: processing time corrected to Redis's clock.
//! - [`warehouse_sink`]: `WarehouseSink`, Parquet files in Hive layout, published at
//!   checkpoints; [`warehouse_files`] names, writes, publishes and cleans up the files.
//! - [`partition_committer`]: `PartitionCommitter`, `_SUCCESS` and the hook for
//!   complete folders, off the data path.
//! - [`fences`]: ownership epochs and fences in Redis, the commit-check Lua prologue,
//!   claims on assignment, recorded warehouse publishes. [`fault`]: test-only crash points.
//! - [`instance_lease`]: one live run per instance id, before cleaning up files.
//! - [`skipped`]: records the broker deleted before they were read, counted and kept.
//! - [`decode`]: the lenient austin `AnchorInfo` decoder and its rejection reasons.
//! - [`tables`]: warehouse schemas, column builders and Hive folders.
//! - [`config`], [`metrics`], [`backoff`]: configuration types, every metric, retry
//!   schedule. [`mailbox`]: the bounded links between actors on the data path.
//!
//! The wiring (which actor runs on which thread, with which links) is in the binary's
//! `pipeline` module.

pub mod aggregator;
pub mod backoff;
pub mod clock;
pub mod config;
pub mod decode;
pub mod fault;
pub mod fences;
pub mod held;
pub mod instance_lease;
pub mod kafka_source;
pub mod mailbox;
pub mod messages;
pub mod metrics;
pub mod partition_committer;
pub mod partition_reader;
pub mod redis_commit;
pub mod redis_sink;
pub mod skipped;
pub mod tables;
pub mod timer;
pub mod warehouse_files;
pub mod warehouse_sink;
pub mod watermark;
pub mod window;
