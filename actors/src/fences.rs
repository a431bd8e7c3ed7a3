//! Ownership epochs and fences, kept in Redis (DESIGN §6, `docs/exactly-once.md`).
//!
//! All bookkeeping of one (group, topic) lives under `anchorflow:{group}:{topic}:`:
//!
//! | key | type | content |
//! |---|---|---|
//! | `…:fences` | hash | `epoch:{p}` owner epoch, `redis:{p}` and `warehouse:{p}`: the next offset whose output is durable in that sink |
//! | `…:publish` | hash | warehouse commits recorded but perhaps not yet renamed: commit id → lines `hidden\tvisible` |
//! | `…:lost` | string | set by a commit that found its fences gone (Redis restarted empty) |
//! | `…:windows` | hash | open event-time windows per partition: `series:{p}` (stored by the Redis commit), `dws:{p}` (by the warehouse record), see [`crate::window`] |
//! | `…:folders` | set | warehouse folders with published rows awaiting their partition commit (`_SUCCESS`) |
//! | `…:committed` | set | warehouse folders whose partition commit is done |
//! | `…:wm` | hash | `{p}`: the watermark up to which partition `p`'s rows are published |
//!
//! Claiming a partition (on assignment) bumps its epoch and returns its fences; every
//! later write for it carries that epoch and the offset range it covers, and the
//! [`FENCE_CHECK`] Lua prologue applies a commit only if, for every partition, the
//! epoch is still the stored one and the range starts exactly at the stored fence. A
//! replay after a crash, or a zombie that lost its partitions, is rejected whole.
//! [`range_for`] (where a sink's next range starts) and [`on_rejection`] (what a
//! refused commit does to the process) serve both sinks.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use actix::System;
use tracing::error;

use crate::messages::SinkKind;
use crate::metrics::{Metrics, RejectionLabel};

/// Exit code when a commit is refused because this instance no longer owns a
/// partition (or the assignment was lost): a restart resumes from the stored fences.
pub const EXIT_FENCED: i32 = 75;

/// Redis keys of one (group, topic).
#[derive(Clone, Debug)]
pub struct FenceKeys {
    pub fences: String,
    pub publish: String,
    pub lost: String,
    pub windows: String,
    pub folders: String,
    pub committed: String,
    pub watermarks: String,
}

impl FenceKeys {
    pub fn new(group: &str, topic: &str) -> Self {
        let base = format!("anchorflow:{group}:{topic}");
        FenceKeys {
            fences: format!("{base}:fences"),
            publish: format!("{base}:publish"),
            lost: format!("{base}:lost"),
            windows: format!("{base}:windows"),
            folders: format!("{base}:folders"),
            committed: format!("{base}:committed"),
            watermarks: format!("{base}:wm"),
        }
    }
}

/// Field of a partition's open series windows in the windows hash.
pub fn series_field(partition: i32) -> String {
    format!("series:{partition}")
}

/// Field of a partition's open `dws_template_state_1m` windows in the windows hash.
pub fn dws_field(partition: i32) -> String {
    format!("dws:{partition}")
}

/// The stored open windows of a claimed partition, one per owner.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredWindows {
    pub series: crate::window::PartitionWindows,
    pub dws: crate::window::PartitionWindows,
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
            crate::window::PartitionWindows::decode(text.as_deref().unwrap_or(""))
                .with_context(|| format!("decoding the stored {what} windows of partition {p}"))
        };
        out.insert(
            p,
            StoredWindows {
                series: decode(series, "series")?,
                dws: decode(dws, "dws")?,
            },
        );
    }
    Ok(out)
}

/// What an instance learns when it takes a partition: its epoch, and where each sink's
/// durable output ends. It travels with every barrier, so the sinks know the epoch and
/// where their first range of this assignment starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim {
    pub epoch: i64,
    pub redis: i64,
    pub warehouse: i64,
}

impl Claim {
    /// Where reading resumes: the lowest fence over the sinks.
    pub fn start(&self) -> i64 {
        self.redis.min(self.warehouse)
    }

    pub fn fence(&self, sink: SinkKind) -> i64 {
        match sink {
            SinkKind::Redis => self.redis,
            SinkKind::Warehouse => self.warehouse,
        }
    }
}

/// One partition's share of a commit: the records `from..to` under `epoch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FenceRange {
    pub partition: i32,
    pub epoch: i64,
    pub from: i64,
    pub to: i64,
}

/// Lua prologue of every commit script. `KEYS[1]` is the fences hash, `KEYS[2]` the
/// lost marker; `ARGV` starts with the sink name, the number of ranges and, per range,
/// `partition, epoch, from, to`. It checks every range before it writes anything, then
/// moves the fences and leaves `i` at the script's own arguments. Rejections return
/// `{code, partition, stored}`: 1 stale epoch, 2 not contiguous, 3 fences missing.
pub const FENCE_CHECK: &str = r#"
local sink = ARGV[1]
local n = tonumber(ARGV[2])
local i = 3
local moves = {}
for _ = 1, n do
  local p = ARGV[i]
  local epoch = tonumber(ARGV[i + 1])
  local from = tonumber(ARGV[i + 2])
  local to = ARGV[i + 3]
  i = i + 4
  local stored_epoch = redis.call('HGET', KEYS[1], 'epoch:' .. p)
  local stored = redis.call('HGET', KEYS[1], sink .. ':' .. p)
  if not stored_epoch or not stored then
    redis.call('SET', KEYS[2], sink .. ':' .. p)
    return {3, tonumber(p), -1}
  end
  if tonumber(stored_epoch) ~= epoch then
    return {1, tonumber(p), tonumber(stored_epoch)}
  end
  if tonumber(stored) ~= from then
    return {2, tonumber(p), tonumber(stored)}
  end
  moves[#moves + 1] = sink .. ':' .. p
  moves[#moves + 1] = to
end
if #moves > 0 then
  redis.call('HSET', KEYS[1], unpack(moves))
end
"#;

/// Appends the prologue's arguments for `ranges` to a script invocation's arguments.
pub fn push_ranges(args: &mut Vec<Vec<u8>>, sink: SinkKind, ranges: &[FenceRange]) {
    args.push(sink.name().as_bytes().to_vec());
    args.push(ranges.len().to_string().into_bytes());
    for range in ranges {
        for value in [range.partition as i64, range.epoch, range.from, range.to] {
            args.push(value.to_string().into_bytes());
        }
    }
}

/// Where a sink's next range of a partition starts: the end of its last accepted
/// commit under the same epoch, else the claim's fence (a new assignment).
pub fn range_for(
    tracked: Option<(i64, i64)>,
    sink: SinkKind,
    partition: i32,
    claim: Claim,
    next_offset: i64,
) -> FenceRange {
    let from = match tracked {
        Some((epoch, end)) if epoch == claim.epoch => end,
        _ => claim.fence(sink),
    };
    FenceRange {
        partition,
        epoch: claim.epoch,
        from,
        // Records below a sink's fence are skipped, so a barrier may lie below it.
        to: next_offset.max(from),
    }
}

/// Why a commit was not applied. Nothing of it was written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("partition {partition} was claimed again (stored epoch {stored}); this instance no longer owns it")]
    StaleEpoch { partition: i32, stored: i64 },
    #[error("partition {partition}'s stored fence is {stored}, not where this commit starts")]
    NotContiguous { partition: i32, stored: i64 },
    #[error("partition {partition}'s fences are gone from Redis (restarted empty or flushed?)")]
    FencesMissing { partition: i32 },
}

impl Rejection {
    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::StaleEpoch { .. } => "stale_epoch",
            Rejection::NotContiguous { .. } => "not_contiguous",
            Rejection::FencesMissing { .. } => "fences_missing",
        }
    }
}

/// Reads a commit script's reply: `{0, n}` applied (n is the script's own figure), or
/// a rejection.
pub fn outcome(reply: &[i64]) -> anyhow::Result<Result<i64, Rejection>> {
    let (code, partition, stored) = match reply {
        [0, n] => return Ok(Ok(*n)),
        [code, partition, stored] => (*code, *partition as i32, *stored),
        other => anyhow::bail!("unexpected reply from a commit script: {other:?}"),
    };
    Ok(Err(match code {
        1 => Rejection::StaleEpoch { partition, stored },
        2 => Rejection::NotContiguous { partition, stored },
        3 => Rejection::FencesMissing { partition },
        other => anyhow::bail!("unexpected rejection code {other}"),
    }))
}

/// Reports a refused commit. Returns whether to retry it: only when Redis lost the
/// fences, which an operator must resolve (see `docs/exactly-once.md`); any other
/// rejection stops the process so that a restart resumes from the stored fences.
pub fn on_rejection(
    metrics: &Metrics,
    sink: SinkKind,
    checkpoint: u64,
    rejection: &Rejection,
) -> bool {
    metrics
        .commits_rejected
        .get_or_create(&RejectionLabel {
            sink: sink.name(),
            reason: rejection.reason(),
        })
        .inc();
    match rejection {
        Rejection::FencesMissing { .. } => {
            metrics.redis_state_lost.set(1);
            metrics.set_ready(false);
            error!(
                sink = sink.name(),
                checkpoint,
                %rejection,
                "Redis has lost anchorflow's fences: holding this commit; recover with `anchorflow fences recover` (docs/exactly-once.md)"
            );
            true
        }
        Rejection::StaleEpoch { .. } | Rejection::NotContiguous { .. } => {
            error!(
                sink = sink.name(),
                checkpoint,
                %rejection,
                "commit rejected by the fence check; exiting so a restart resumes from the stored fences"
            );
            System::current().stop_with_code(EXIT_FENCED);
            false
        }
    }
}

/// Claims partitions: bumps each epoch and returns the fences, initialising absent
/// fences to the given cold-start offset (-1: "the caller believes fences exist").
/// Returns `{-1}` while the lost marker is set, `{-2, p}` when `p` has no fences and no
/// cold-start offset was given.
const CLAIM_SCRIPT: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 then return {-1} end
local out = {}
local i = 2
for _ = 1, tonumber(ARGV[1]) do
  local p = ARGV[i]
  local cold = ARGV[i + 1]
  i = i + 2
  local r = redis.call('HGET', KEYS[1], 'redis:' .. p)
  local w = redis.call('HGET', KEYS[1], 'warehouse:' .. p)
  if not r or not w then
    if tonumber(cold) < 0 then return {-2, tonumber(p)} end
    if not r then r = cold; redis.call('HSET', KEYS[1], 'redis:' .. p, cold) end
    if not w then w = cold; redis.call('HSET', KEYS[1], 'warehouse:' .. p, cold) end
  end
  local e = redis.call('HINCRBY', KEYS[1], 'epoch:' .. p, 1)
  out[#out + 1] = tonumber(p)
  out[#out + 1] = e
  out[#out + 1] = tonumber(r)
  out[#out + 1] = tonumber(w)
end
return out
"#;

/// Why partitions could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("Redis lost anchorflow's fences ({marker}); see docs/exactly-once.md, \"Redis restarted empty\"")]
    StateLost { marker: String },
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// A blocking connection with the given timeouts on connect, reads and writes.
pub fn connect(url: &str, timeout: Duration) -> anyhow::Result<redis::Connection> {
    let client = redis::Client::open(url).context("parsing the redis url")?;
    let conn = client
        .get_connection_with_timeout(timeout)
        .context("connecting to redis")?;
    conn.set_read_timeout(Some(timeout))
        .context("setting the redis read timeout")?;
    conn.set_write_timeout(Some(timeout))
        .context("setting the redis write timeout")?;
    Ok(conn)
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
) -> Result<BTreeMap<i32, Claim>, ClaimError> {
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
    let script = redis::Script::new(CLAIM_SCRIPT);
    let mut invocation = script.key(&keys.fences);
    invocation.key(&keys.lost).arg(partitions.len());
    for p in partitions {
        invocation.arg(p).arg(cold.get(p).copied().unwrap_or(-1));
    }
    let reply: Vec<i64> = invocation
        .invoke(conn)
        .context("running the claim script")?;
    match reply.as_slice() {
        [-1] => {
            let marker = lost_marker(conn, keys)?.unwrap_or_default();
            Err(ClaimError::StateLost { marker })
        }
        [-2, p] => Err(ClaimError::Other(anyhow::anyhow!(
            "the fences of partition {p} vanished while claiming it"
        ))),
        flat if flat.len() == partitions.len() * 4 => Ok(flat
            .chunks(4)
            .map(|c| {
                (
                    c[0] as i32,
                    Claim {
                        epoch: c[1],
                        redis: c[2],
                        warehouse: c[3],
                    },
                )
            })
            .collect()),
        other => Err(ClaimError::Other(anyhow::anyhow!(
            "unexpected reply from the claim script: {other:?}"
        ))),
    }
}

/// A warehouse commit recorded in Redis: files to move from their hidden names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishRecord {
    pub id: String,
    pub files: Vec<(PathBuf, PathBuf)>,
}

impl PublishRecord {
    pub fn encode(&self) -> String {
        self.files
            .iter()
            .map(|(hidden, visible)| format!("{}\t{}", hidden.display(), visible.display()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn decode(id: String, value: &str) -> anyhow::Result<Self> {
        let files = value
            .lines()
            .filter(|l| !l.is_empty())
            .map(|line| {
                let (hidden, visible) = line
                    .split_once('\t')
                    .with_context(|| format!("malformed publish record {id}: {line:?}"))?;
                Ok((PathBuf::from(hidden), PathBuf::from(visible)))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(PublishRecord { id, files })
    }
}

/// Every recorded warehouse commit whose publishing is not known to be finished.
pub fn pending_publishes(
    conn: &mut redis::Connection,
    keys: &FenceKeys,
) -> anyhow::Result<Vec<PublishRecord>> {
    let all: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(&keys.publish)
        .query(conn)
        .context("reading pending publishes")?;
    all.into_iter()
        .map(|(id, value)| PublishRecord::decode(id, &value))
        .collect()
}

/// Forgets a recorded commit once its files are all in place.
pub fn publish_done(
    conn: &mut redis::Connection,
    keys: &FenceKeys,
    id: &str,
) -> anyhow::Result<()> {
    redis::cmd("HDEL")
        .arg(&keys.publish)
        .arg(id)
        .query::<i64>(conn)
        .context("clearing a publish record")?;
    Ok(())
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
        .query::<i64>(conn)
        .context("deleting fences")?;
    Ok(())
}

/// Sets both fences of each partition, bumps its epoch (fencing off every instance
/// still holding it), drops its open windows and clears the lost marker, in one
/// transaction.
pub fn reset(
    conn: &mut redis::Connection,
    keys: &FenceKeys,
    fences: &BTreeMap<i32, (i64, i64)>,
) -> anyhow::Result<()> {
    let mut pipe = redis::pipe();
    pipe.atomic();
    for (p, (redis_fence, warehouse_fence)) in fences {
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
        // Open windows belong to the old fences; they start afresh at the new ones.
        pipe.cmd("HDEL")
            .arg(&keys.windows)
            .arg(series_field(*p))
            .arg(dws_field(*p))
            .ignore();
    }
    pipe.cmd("DEL").arg(&keys.lost).ignore();
    pipe.query::<()>(conn).context("writing fences")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_map_to_outcomes() {
        assert_eq!(outcome(&[0, 7]).unwrap(), Ok(7));
        assert_eq!(
            outcome(&[1, 2, 5]).unwrap(),
            Err(Rejection::StaleEpoch {
                partition: 2,
                stored: 5
            })
        );
        assert_eq!(
            outcome(&[2, 0, 100]).unwrap(),
            Err(Rejection::NotContiguous {
                partition: 0,
                stored: 100
            })
        );
        assert_eq!(
            outcome(&[3, 1, -1]).unwrap(),
            Err(Rejection::FencesMissing { partition: 1 })
        );
        assert!(outcome(&[9, 9, 9]).is_err());
        assert!(outcome(&[]).is_err());
    }

    #[test]
    fn publish_records_round_trip() {
        let record = PublishRecord {
            id: "a-1".into(),
            files: vec![
                ("/w/t/.a.inprogress".into(), "/w/t/part-a.parquet".into()),
                ("/w/u/.b.inprogress".into(), "/w/u/part-b.parquet".into()),
            ],
        };
        let back = PublishRecord::decode("a-1".into(), &record.encode()).unwrap();
        assert_eq!(back, record);
        assert!(PublishRecord::decode("x".into(), "no tab here").is_err());
    }
}
