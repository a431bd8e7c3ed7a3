//! Ownership epochs and fences, kept in Redis (`docs/exactly-once.md`).
//!
//! All bookkeeping of one (group, topic) lives under `anchorflow:{group}:{topic}:`:
//!
//! | key | type | content |
//! |---|---|---|
//! | `…:fences` | hash | `epoch:{p}` owner epoch, `redis:{p}` and `warehouse:{p}`: the next offset whose output is durable in that sink |
//! | `…:publish` | hash | warehouse commits recorded but perhaps not yet renamed: commit id → lines `hidden\tvisible` |
//! | `…:lost` | string | set by a commit that found its fences gone (Redis restarted empty) |
//! | `…:windows` | hash | open event-time windows per partition: `series:{p}` (stored by the Redis commit), `dws:{p}` (by the warehouse record), see [`crate::logic::window`] |
//! | `…:folders` | set | warehouse folders with published rows awaiting their partition commit (`_SUCCESS`) |
//! | `…:committed` | set | warehouse folders whose partition commit is done |
//! | `…:wm` | hash | `{p}`: the watermark up to which partition `p`'s rows are published |
//! | `…:units:{p}` | hash | unit → fence: the units of a split Redis commit applied beyond `redis:{p}` (see [`crate::sinks::redis::commit`]) |
//! | `…:conflicts` | hash | `{reason} {key}` → values Redis refused to store (a key of another type…) |
//! | `…:skipped` | hash | `{p}`: records the broker no longer held when they were due; `range:{p}`: the last such range |
//! | `…:instance:{id}` | string | the live run of an instance id (`host:pid:run`), a 30 s lease |
//!
//! Claiming a partition (on assignment) bumps its epoch and returns its fences; every
//! later write for it carries that epoch and the offset range it covers, and the
//! fence-check Lua prologue (`scripts/fence_check.lua`) applies a commit only if, for every partition, the
//! epoch is still the stored one and the range starts exactly at the stored fence. A
//! replay after a crash, or a zombie that lost its partitions, is rejected whole.
//! [`range_for`](crate::checkpoint::claim::range_for) (where a sink's next range starts) and [`on_rejection`](crate::sinks::fenced::on_rejection) (what a
//! refused commit does to the process) serve both sinks.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;

use crate::protocol::claim_script::{ClaimArgs, ClaimReply, Claimed};
use crate::protocol::keys::{dws_field, series_field, FenceKeys};

/// The stored state of a claimed partition: its open windows, one per owner, and the
/// unit fences of an interrupted split Redis commit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredWindows {
    pub series: crate::logic::window::PartitionWindows,
    pub dws: crate::logic::window::PartitionWindows,
    pub unit_fences: BTreeMap<u16, i64>,
}

/// Reads the open windows of `partitions`. Called right after the claim: the new
/// epoch already fences every older owner, so nothing changes them until we commit.
pub fn read_windows(
    conn: &mut redis::Connection,
    keys: &FenceKeys,
    partitions: &[i32],
) -> anyhow::Result<BTreeMap<i32, StoredWindows>> {
    let mut out = BTreeMap::new();
    for &p in partitions {
        let (series, dws): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(&keys.windows)
            .arg(series_field(p))
            .arg(dws_field(p))
            .query(conn)
            .context("reading open windows")?;
        let decode = |text: Option<String>, what: &str| {
            crate::logic::window::PartitionWindows::decode(text.as_deref().unwrap_or(""))
                .with_context(|| format!("decoding the stored {what} windows of partition {p}"))
        };
        out.insert(
            p,
            StoredWindows {
                series: decode(series, "series")?,
                dws: decode(dws, "dws")?,
                unit_fences: BTreeMap::new(),
            },
        );
    }
    Ok(out)
}

/// Why partitions could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("Redis lost anchorflow's fences ({marker}); see docs/exactly-once.md, \"Redis restarted empty\"")]
    StateLost { marker: String },
    /// A recorded warehouse commit cannot be completed (a file is gone): reading on
    /// would move past rows that were never published.
    #[error("a recorded warehouse commit cannot be published: {0:#}")]
    Unpublishable(anyhow::Error),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// A blocking connection with the given timeouts on connect, reads and writes.
pub fn connect(
    redis: &crate::config::RedisConfig,
    timeout: Duration,
) -> anyhow::Result<redis::Connection> {
    let conn = redis
        .client()?
        .get_connection_with_timeout(timeout)
        .context("connecting to redis")?;
    conn.set_read_timeout(Some(timeout))
        .context("setting the redis read timeout")?;
    conn.set_write_timeout(Some(timeout))
        .context("setting the redis write timeout")?;
    Ok(conn)
}

/// A blocking connection that connects on first use and again after an error.
pub struct BlockingConnection {
    redis: crate::config::RedisConfig,
    timeout: Duration,
    conn: Option<redis::Connection>,
}

impl BlockingConnection {
    pub fn new(config: &crate::config::RedisConfig) -> Self {
        BlockingConnection {
            redis: config.clone(),
            timeout: Duration::from_secs(config.command_timeout_secs),
            conn: None,
        }
    }

    /// Runs `f` on the connection, connecting first if needed. On error the connection
    /// is dropped: a timed-out command may still be answered later, on a connection
    /// nobody must read again.
    pub fn run<T>(
        &mut self,
        f: impl FnOnce(&mut redis::Connection) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => connect(&self.redis, self.timeout)?,
        };
        let out = f(&mut conn)?;
        self.conn = Some(conn);
        Ok(out)
    }

    /// Drops the connection (the next use reconnects).
    pub fn reset(&mut self) {
        self.conn = None;
    }
}

/// The lost marker, if set.
pub fn lost_marker(
    conn: &mut redis::Connection,
    keys: &FenceKeys,
) -> anyhow::Result<Option<String>> {
    redis::cmd("GET")
        .arg(&keys.lost)
        .query(conn)
        .context("reading the lost marker")
}

/// Marks Redis's state as lost (every instance then waits for `fences recover`).
pub fn mark_lost(conn: &mut redis::Connection, keys: &FenceKeys, why: &str) -> anyhow::Result<()> {
    redis::cmd("SET")
        .arg(&keys.lost)
        .arg(why)
        .query::<()>(conn)
        .context("setting the lost marker")
}

/// Stored fences per partition, as `(epoch, redis, warehouse)`; absent fields are `None`.
pub type StoredFences = BTreeMap<i32, (Option<i64>, Option<i64>, Option<i64>)>;

/// Reads the fences of `partitions`.
pub fn read(
    conn: &mut redis::Connection,
    keys: &FenceKeys,
    partitions: &[i32],
) -> anyhow::Result<StoredFences> {
    let mut out = BTreeMap::new();
    for &p in partitions {
        let (epoch, redis, warehouse): (Option<i64>, Option<i64>, Option<i64>) =
            redis::cmd("HMGET")
                .arg(&keys.fences)
                .arg(format!("epoch:{p}"))
                .arg(format!("redis:{p}"))
                .arg(format!("warehouse:{p}"))
                .query(conn)
                .context("reading fences")?;
        out.insert(p, (epoch, redis, warehouse));
    }
    Ok(out)
}

/// Claims `partitions` for this instance. `cold_start` is asked for the offsets of
/// partitions that have no fences yet (first run of the group on this Redis).
pub fn claim(
    conn: &mut redis::Connection,
    keys: &FenceKeys,
    partitions: &[i32],
    mut cold_start: impl FnMut(&[i32]) -> anyhow::Result<BTreeMap<i32, i64>>,
) -> Result<BTreeMap<i32, Claimed>, ClaimError> {
    if let Some(marker) = lost_marker(conn, keys)? {
        return Err(ClaimError::StateLost { marker });
    }
    let stored = read(conn, keys, partitions)?;
    let fresh: Vec<i32> = stored
        .iter()
        .filter(|(_, (_, r, w))| r.is_none() || w.is_none())
        .map(|(p, _)| *p)
        .collect();
    let cold = if fresh.is_empty() {
        BTreeMap::new()
    } else {
        cold_start(&fresh)?
    };
    let partitions: Vec<(i32, i64)> = partitions
        .iter()
        .map(|p| (*p, cold.get(p).copied().unwrap_or(-1)))
        .collect();
    let args = ClaimArgs {
        units_prefix: &keys.units_prefix,
        partitions: &partitions,
    };
    match args.invoke(conn, keys)? {
        ClaimReply::StateLost => {
            let marker = lost_marker(conn, keys)?.unwrap_or_default();
            Err(ClaimError::StateLost { marker })
        }
        ClaimReply::Vanished(p) => Err(ClaimError::Other(anyhow::anyhow!(
            "the fences of partition {p} vanished while claiming it"
        ))),
        ClaimReply::Claimed(claims) => Ok(claims),
    }
}

/// Deletes every bookkeeping key of one (group, topic): for a topic that was
/// recreated from scratch (the demo's throwaway cluster), never for a live one.
pub fn forget(conn: &mut redis::Connection, keys: &FenceKeys) -> anyhow::Result<()> {
    redis::cmd("DEL")
        .arg(&keys.fences)
        .arg(&keys.publish)
        .arg(&keys.lost)
        .arg(&keys.windows)
        .arg(&keys.folders)
        .arg(&keys.committed)
        .arg(&keys.watermarks)
        .arg(&keys.conflicts)
        .arg(&keys.skipped)
        .query::<i64>(conn)
        .context("deleting fences")?;
    for prefix in [&keys.units_prefix, &keys.deadline_prefix] {
        let found: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query(conn)
            .context("listing unit fences and deadline keys")?;
        for key in found {
            redis::cmd("DEL")
                .arg(key)
                .query::<i64>(conn)
                .context("deleting unit fences and deadline keys")?;
        }
    }
    Ok(())
}

/// Sets both fences of each partition, bumps its epoch (fencing off every instance
/// still holding it) and clears the lost marker, in one transaction. Open windows and
/// unit fences belong to the fence they were stored with: where a fence moves, they
/// are dropped (windows start afresh at the new fence); where it stays, they stay.
pub fn reset(
    conn: &mut redis::Connection,
    keys: &FenceKeys,
    fences: &BTreeMap<i32, (i64, i64)>,
    old: &StoredFences,
) -> anyhow::Result<()> {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for (p, (redis_fence, warehouse_fence)) in fences {
        let (_, old_redis, old_warehouse) = old.get(p).copied().unwrap_or_default();
        pipe.cmd("HSET")
            .arg(&keys.fences)
            .arg(format!("redis:{p}"))
            .arg(redis_fence)
            .arg(format!("warehouse:{p}"))
            .arg(warehouse_fence)
            .ignore();
        pipe.cmd("HINCRBY")
            .arg(&keys.fences)
            .arg(format!("epoch:{p}"))
            .arg(1)
            .ignore();
        if old_redis != Some(*redis_fence) {
            pipe.cmd("HDEL")
                .arg(&keys.windows)
                .arg(series_field(*p))
                .ignore();
            pipe.cmd("DEL")
                .arg(format!("{}{p}", keys.units_prefix))
                .ignore();
        }
        if old_warehouse != Some(*warehouse_fence) {
            pipe.cmd("HDEL")
                .arg(&keys.windows)
                .arg(dws_field(*p))
                .ignore();
        }
    }
    pipe.cmd("DEL").arg(&keys.lost).ignore();
    pipe.query::<()>(conn).context("writing fences")?;
    Ok(())
}
