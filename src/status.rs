//! `anchorflow status`: how far each partition is, from what Redis holds and, when the
//! broker answers, how far behind its end. Per partition: the owner epoch, both sinks'
//! fences and how long ago each last committed (Redis's clock), the broker's end offset
//! and the lag behind the lower fence; then what waits: recorded warehouse commits not
//! yet published, staged window series, writes Redis refused, records the broker
//! deleted before they were read, and the lost marker. With only Redis reachable it
//! still prints what Redis holds. `--json` gives the same as one JSON object.

use std::collections::BTreeMap;
use std::time::Duration;

use anchorflow_actors::config::Config;
use anchorflow_actors::protocol::fences;
use anchorflow_actors::protocol::keys::FenceKeys;
use anchorflow_actors::protocol::publish::pending_publishes;
use anchorflow_actors::protocol::skipped;
use anyhow::Context as _;
use serde::Serialize;

use crate::fences_cli::{kafka_offsets, BROKER_TIMEOUT};
use crate::say;

#[derive(Debug, Serialize)]
pub struct Status {
    pub topic: String,
    pub group: String,
    /// The broker's answer: `null` when it answered, else why not.
    pub broker_error: Option<String>,
    /// Set when Redis lost anchorflow's fences (`anchorflow fences recover`).
    pub lost: Option<String>,
    pub partitions: Vec<PartitionStatus>,
    /// Recorded warehouse commits whose files are not all published yet.
    pub pending_publishes: usize,
    /// Commits whose window series are staged, not yet published.
    pub staged_series: usize,
    /// Keys Redis refused to write in the last 30 days (`fences show` lists them).
    pub refused_keys: usize,
    /// Per partition, records the broker deleted before they were read, and the last
    /// range.
    pub skipped: BTreeMap<i32, (i64, String)>,
}

#[derive(Debug, Serialize)]
pub struct PartitionStatus {
    pub partition: i32,
    pub epoch: Option<i64>,
    pub redis_fence: Option<i64>,
    pub warehouse_fence: Option<i64>,
    /// Seconds since each sink's last commit of the partition, by Redis's clock.
    pub redis_committed_secs_ago: Option<f64>,
    pub warehouse_committed_secs_ago: Option<f64>,
    /// The broker's next offset (its high watermark), when it answered.
    pub end_offset: Option<i64>,
    /// The group's committed offset (progress reporting only).
    pub committed_offset: Option<i64>,
    /// Records between the lower fence and the end.
    pub lag: Option<i64>,
}

/// The partitions Redis holds fences for (from their `epoch:{p}` fields).
pub fn stored_partitions(
    conn: &mut redis::Connection,
    keys: &FenceKeys,
) -> anyhow::Result<Vec<i32>> {
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(&keys.fences)
        .query(conn)
        .context("reading the fences")?;
    let mut partitions: Vec<i32> = fields
        .iter()
        .filter_map(|f| f.strip_prefix("epoch:")?.parse().ok())
        .collect();
    partitions.sort_unstable();
    Ok(partitions)
}

/// Reads the status; fails only when Redis cannot be read.
pub fn read(config: &Config) -> anyhow::Result<Status> {
    let keys = FenceKeys::new(&config.source.group_id, &config.source.topic);
    let timeout = Duration::from_secs(config.redis.command_timeout_secs);
    let mut conn = fences::connect(&config.redis, timeout)?;
    let (kafka, broker_error) = match kafka_offsets(config, BROKER_TIMEOUT) {
        Ok(kafka) => (Some(kafka), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let mut partitions = stored_partitions(&mut conn, &keys)?;
    if let Some(kafka) = &kafka {
        partitions.extend(kafka.keys());
        partitions.sort_unstable();
        partitions.dedup();
    }
    let stored = fences::read(&mut conn, &keys, &partitions)?;
    let (secs, micros): (i64, i64) = redis::cmd("TIME")
        .query(&mut conn)
        .context("reading Redis's clock")?;
    let now_ms = secs * 1000 + micros / 1000;
    let mut rows = Vec::new();
    for p in partitions {
        let (epoch, redis_fence, warehouse_fence) = stored.get(&p).copied().unwrap_or_default();
        let (redis_at, warehouse_at): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
            .arg(&keys.fences)
            .arg(format!("redis-at:{p}"))
            .arg(format!("warehouse-at:{p}"))
            .query(&mut conn)
            .context("reading the commit times")?;
        let ago = |at: Option<i64>| at.map(|at| (now_ms - at).max(0) as f64 / 1000.0);
        let broker = kafka.as_ref().and_then(|k| k.get(&p));
        let end_offset = broker.map(|(_, high, _)| *high);
        let lower = redis_fence.zip(warehouse_fence).map(|(r, w)| r.min(w));
        rows.push(PartitionStatus {
            partition: p,
            epoch,
            redis_fence,
            warehouse_fence,
            redis_committed_secs_ago: ago(redis_at),
            warehouse_committed_secs_ago: ago(warehouse_at),
            end_offset,
            committed_offset: broker.and_then(|(_, _, c)| *c),
            lag: end_offset
                .zip(lower)
                .map(|(end, fence)| (end - fence).max(0)),
        });
    }
    let staged: Vec<String> = redis::cmd("SMEMBERS")
        .arg(&keys.staged)
        .query(&mut conn)
        .context("reading the staged series")?;
    let refused: usize = redis::cmd("HLEN")
        .arg(&keys.conflicts)
        .query(&mut conn)
        .context("reading the refused writes")?;
    Ok(Status {
        topic: config.source.topic.clone(),
        group: config.source.group_id.clone(),
        broker_error,
        lost: fences::lost_marker(&mut conn, &keys)?,
        partitions: rows,
        pending_publishes: pending_publishes(&mut conn, &keys)?.len(),
        staged_series: staged.len(),
        refused_keys: refused,
        skipped: skipped::read(&mut conn, &keys)?,
    })
}

/// Prints the status as a table (or JSON).
pub fn print(status: &Status, json: bool) {
    if json {
        say!(
            "{}",
            serde_json::to_string_pretty(status)
                .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        );
        return;
    }
    let dash = |v: Option<i64>| v.map_or("-".to_string(), |v| v.to_string());
    let ago = |v: Option<f64>| v.map_or("-".to_string(), |s| format!("{s:.0} s ago"));
    say!("topic {} group {}", status.topic, status.group);
    match &status.broker_error {
        None => say!("broker: answered"),
        Some(e) => say!("broker: unreachable ({e}); showing what Redis holds"),
    }
    if let Some(marker) = &status.lost {
        say!("LOST: Redis lost the fences ({marker}); run `anchorflow fences recover`");
    }
    say!("partition\tepoch\tredis\twarehouse\tend\tlag\tredis commit\twarehouse commit");
    for p in &status.partitions {
        say!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            p.partition,
            dash(p.epoch),
            dash(p.redis_fence),
            dash(p.warehouse_fence),
            dash(p.end_offset),
            dash(p.lag),
            ago(p.redis_committed_secs_ago),
            ago(p.warehouse_committed_secs_ago)
        );
    }
    say!(
        "waiting: {} recorded warehouse commit(s) to publish, {} commit(s) with staged series; {} key(s) Redis refused (fences show lists them)",
        status.pending_publishes,
        status.staged_series,
        status.refused_keys
    );
    for (p, (total, last)) in &status.skipped {
        say!("partition {p}: {total} records deleted by the broker before they were read (last {last})");
    }
}
