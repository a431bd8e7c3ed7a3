//! `anchorflow fences show|recover`: the operator's view of the exactly-once
//! bookkeeping, and the recovery after Redis lost it (`docs/exactly-once.md`).
//!
//! The warehouse is read through the same [`Storage`] as the sinks use
//! (`warehouse::open`), so recovery works on a local folder and on a bucket alike.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::say;
use anchorflow_actors::config::Config;
use anchorflow_actors::protocol::fences;
use anchorflow_actors::protocol::keys::FenceKeys;
use anchorflow_actors::protocol::publish::{pending_publishes, publish_done};
use anchorflow_actors::sinks::warehouse::marks::{cap_published, published_fences};
use anchorflow_actors::sinks::warehouse::open as open_warehouse;
use anchorflow_actors::sinks::warehouse::publish::{discard, roll_forward};
use anchorflow_actors::sinks::warehouse::storage::Storage;
use anyhow::{bail, Context as _};
use arrow_array::{Array, Int32Array, Int64Array, StringArray};
use clap::{Subcommand, ValueEnum};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

#[derive(Subcommand)]
pub enum FencesCommand {
    /// Print, per partition, the owner epoch, both sinks' fences, the group's committed
    /// offset and the partition's watermarks.
    Show,
    /// After Redis lost its data: store new fences, fence off running instances (they
    /// restart and resume from the new fences) and clear the lost marker. The warehouse
    /// fences are read from the published files; `--redis-from` says where the Redis
    /// aggregates resume.
    Recover {
        /// `earliest`: rebuild the Redis aggregates from the oldest record Kafka still
        /// holds (exact if retention reaches back to the start of the counts);
        /// `committed`: accept the loss and continue from the group's committed offset;
        /// `keep`: keep the Redis fences present now (after restoring a Redis backup).
        #[arg(long, value_enum)]
        redis_from: RedisFrom,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RedisFrom {
    Earliest,
    Committed,
    Keep,
}

/// Per partition: low and high watermark, committed offset (if any).
pub type KafkaOffsets = BTreeMap<i32, (i64, i64, Option<i64>)>;

/// The topic's partitions with their watermarks and the group's committed offsets,
/// each request bounded by `timeout`.
pub fn kafka_offsets(config: &Config, timeout: Duration) -> anyhow::Result<KafkaOffsets> {
    let mut client = ClientConfig::new();
    for (key, value) in &config.kafka.0 {
        client.set(key, value);
    }
    client.set("group.id", &config.source.group_id);
    client.set("enable.auto.commit", "false");
    let consumer: BaseConsumer = client.create().context("creating a kafka client")?;
    let topic = &config.source.topic;
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .context("reading topic metadata")?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        bail!("topic {topic} has no partitions (does it exist?)");
    }
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, timeout)
        .context("reading committed offsets")?;
    let mut out = BTreeMap::new();
    for p in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, timeout)
            .with_context(|| format!("reading the watermarks of partition {p}"))?;
        let committed = committed
            .find_partition(topic, p)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) if o >= 0 => Some(o),
                _ => None,
            });
        out.insert(p, (low, high, committed));
    }
    Ok(out)
}

/// Next offset after the highest one in published warehouse files, per partition of
/// `topic` (over `ods_anchor_log` and `dead_letter`, which together hold a row for
/// every record). Each file is read whole into memory, one at a time: files are rolled
/// at `warehouse.target_file_bytes`, and this runs only in an operator's recovery.
pub fn warehouse_fences(
    storage: &dyn Storage,
    root: &Path,
    topic: &str,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let mut out: BTreeMap<i32, i64> = BTreeMap::new();
    let mut stack: Vec<PathBuf> = ["ods_anchor_log", "dead_letter"]
        .iter()
        .map(|t| root.join(t))
        .collect();
    while let Some(dir) = stack.pop() {
        let entries = storage
            .list(&dir)
            .with_context(|| format!("listing {}", dir.display()))?;
        for entry in entries {
            let name = entry
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if entry.is_dir {
                stack.push(entry.path);
            } else if name.starts_with("part-") && name.ends_with(".parquet") {
                let path = entry.path;
                let bytes = storage
                    .read(&path)
                    .with_context(|| format!("reading {}", path.display()))?
                    .with_context(|| format!("{} vanished while it was read", path.display()))?;
                scan_file(bytes.into(), topic, &mut out)
                    .with_context(|| format!("reading {}", path.display()))?;
            }
        }
    }
    Ok(out)
}

fn scan_file(file: bytes::Bytes, topic: &str, out: &mut BTreeMap<i32, i64>) -> anyhow::Result<()> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
    let schema = builder.parquet_schema();
    let wanted = ["kafka_topic", "kafka_partition", "kafka_offset"];
    let indices: Vec<usize> = (0..schema.num_columns())
        .filter(|&i| wanted.contains(&schema.column(i).name()))
        .collect();
    let mask = ProjectionMask::leaves(schema, indices);
    for batch in builder.with_projection(mask).build()? {
        let batch = batch?;
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .with_context(|| format!("column {name} missing"))
        };
        let topics = column("kafka_topic")?
            .as_any()
            .downcast_ref::<StringArray>()
            .context("kafka_topic is not a string column")?;
        let partitions = column("kafka_partition")?
            .as_any()
            .downcast_ref::<Int32Array>()
            .context("kafka_partition is not an int32 column")?;
        let offsets = column("kafka_offset")?
            .as_any()
            .downcast_ref::<Int64Array>()
            .context("kafka_offset is not an int64 column")?;
        for i in 0..batch.num_rows() {
            if topics.is_valid(i) && topics.value(i) == topic {
                let next = out.entry(partitions.value(i)).or_insert(0);
                *next = (*next).max(offsets.value(i) + 1);
            }
        }
    }
    Ok(())
}

/// Publishes every recorded commit it can; a commit a file of which is lost is
/// discarded whole (its other files removed) and its ranges are re-read: returns, per
/// partition, where the earliest discarded range started.
fn complete_or_discard(
    storage: &Arc<dyn Storage>,
    conn: &mut redis::Connection,
    keys: &FenceKeys,
    root: &Path,
    group: &str,
    topic: &str,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let mut repaired: BTreeMap<i32, i64> = BTreeMap::new();
    for record in pending_publishes(conn, keys)? {
        match roll_forward(storage.as_ref(), &record) {
            Ok(()) => say!("published recorded commit {}", record.id),
            Err(error) => {
                say!(
                    "recorded commit {} cannot be published ({error:#}): its files are removed and its ranges read again",
                    record.id
                );
                discard(storage.as_ref(), &record)?;
                for range in &record.ranges {
                    let start = repaired.entry(range.partition).or_insert(range.from);
                    *start = (*start).min(range.from);
                }
            }
        }
        publish_done(conn, keys, &record.id)?;
    }
    if !repaired.is_empty() {
        cap_published(storage.clone(), root, group, topic, &repaired)?;
    }
    Ok(repaired)
}

pub fn run(config: &Config, command: FencesCommand) -> anyhow::Result<()> {
    let keys = FenceKeys::new(&config.source.group_id, &config.source.topic);
    let timeout = Duration::from_secs(config.redis.command_timeout_secs);
    let mut conn = fences::connect(&config.redis, timeout)?;
    match command {
        FencesCommand::Show => {
            // What Redis holds is shown whether or not the broker answers.
            let kafka = match kafka_offsets(config, BROKER_TIMEOUT) {
                Ok(kafka) => kafka,
                Err(e) => {
                    say!("broker: unreachable ({e:#}); showing what Redis holds");
                    crate::status::stored_partitions(&mut conn, &keys)?
                        .into_iter()
                        .map(|p| (p, (-1, -1, None)))
                        .collect()
                }
            };
            let partitions: Vec<i32> = kafka.keys().copied().collect();
            let stored = fences::read(&mut conn, &keys, &partitions)?;
            show(config, &mut conn, &keys, &kafka, &stored)
        }
        FencesCommand::Recover { redis_from } => {
            let kafka = kafka_offsets(config, Duration::from_secs(10))?;
            let partitions: Vec<i32> = kafka.keys().copied().collect();
            let stored = fences::read(&mut conn, &keys, &partitions)?;
            recover(config, &mut conn, &keys, &kafka, &stored, redis_from)
        }
    }
}

/// How long a command waits for the broker before it shows what Redis holds alone.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

fn show(
    config: &Config,
    conn: &mut redis::Connection,
    keys: &FenceKeys,
    kafka: &KafkaOffsets,
    stored: &fences::StoredFences,
) -> anyhow::Result<()> {
    let show = |v: Option<i64>| v.map_or("-".to_string(), |v| v.to_string());
    if let Some(marker) = fences::lost_marker(conn, keys)? {
        say!("LOST: Redis lost the fences ({marker}); run `anchorflow fences recover`");
    }
    let pending = pending_publishes(conn, keys)?;
    say!(
        "topic {} group {}: {} recorded warehouse commit(s) awaiting publish",
        config.source.topic,
        config.source.group_id,
        pending.len()
    );
    let staged: Vec<String> = redis::cmd("SMEMBERS")
        .arg(&keys.staged)
        .query(conn)
        .context("reading the staged series")?;
    if !staged.is_empty() {
        say!(
            "{} commit(s) with window series staged, not yet published (the next start of a Redis sink publishes them)",
            staged.len()
        );
    }
    say!("partition\tepoch\tredis\twarehouse\tcommitted\tlow\thigh");
    for (p, (low, high, committed)) in kafka {
        let (epoch, redis, warehouse) = stored.get(p).copied().unwrap_or_default();
        say!(
            "{p}\t{}\t{}\t{}\t{}\t{low}\t{high}",
            show(epoch),
            show(redis),
            show(warehouse),
            show(*committed)
        );
    }
    for (p, (total, last)) in anchorflow_actors::protocol::skipped::read(conn, keys)? {
        say!(
            "partition {p}: skipped {total} records the broker no longer held (last range {last})"
        );
    }
    let conflicts: BTreeMap<String, i64> = redis::cmd("HGETALL")
        .arg(&keys.conflicts)
        .query(conn)
        .context("reading conflicts")?;
    if !conflicts.is_empty() {
        say!("writes Redis refused (reason key: values lost), last 30 days:");
        for (what, lost) in conflicts.iter().take(50) {
            say!("  {what}: {lost}");
        }
        if conflicts.len() > 50 {
            say!("  … and {} more keys", conflicts.len() - 50);
        }
    }
    Ok(())
}

fn recover(
    config: &Config,
    conn: &mut redis::Connection,
    keys: &FenceKeys,
    kafka: &KafkaOffsets,
    stored: &fences::StoredFences,
    redis_from: RedisFrom,
) -> anyhow::Result<()> {
    let storage = open_warehouse(&config.warehouse)?;
    let root = Path::new(&config.warehouse.root);
    let (group, topic) = (&config.source.group_id, &config.source.topic);
    let repaired = complete_or_discard(&storage, conn, keys, root, group, topic)?;
    let files = warehouse_fences(storage.as_ref(), root, topic)?;
    let marks = published_fences(storage.as_ref(), root, group, topic)?;
    let mut new = BTreeMap::new();
    for (&p, &(low, _, committed)) in kafka {
        let redis = match redis_from {
            RedisFrom::Earliest => low,
            RedisFrom::Committed => committed.unwrap_or(low),
            RedisFrom::Keep => stored.get(&p).and_then(|s| s.1).with_context(|| {
                format!("partition {p} has no Redis fence to keep; choose earliest or committed")
            })?,
        };
        // The warehouse holds what its files hold and what it recorded as published
        // (ranges without rows count too); a partition without either restarts at the
        // oldest record Kafka holds. A commit whose files were lost is re-read from
        // where it started.
        let published = files.get(&p).copied().max(marks.get(&p).copied());
        let warehouse = repaired
            .get(&p)
            .copied()
            .or(published)
            .unwrap_or(low)
            .max(low);
        new.insert(p, (redis, warehouse));
    }
    fences::reset(conn, keys, &new, stored)?;
    say!("partition\tredis\twarehouse");
    for (p, (redis, warehouse)) in &new {
        say!("{p}\t{redis}\t{warehouse}");
    }
    say!("fences stored and the lost marker cleared; running instances restart and resume from these fences");
    Ok(())
}
