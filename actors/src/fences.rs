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
//! | `…:units:{p}` | hash | unit → fence: the units of a split Redis commit applied beyond `redis:{p}` (see [`crate::redis_commit`]) |
//! | `…:conflicts` | hash | `{reason} {key}` → values Redis refused to store (a key of another type…) |
//! | `…:skipped` | hash | `{p}`: records the broker no longer held when they were due; `range:{p}`: the last such range |
//! | `…:instance:{id}` | string | the live run of an instance id (`host:pid:run`), a 30 s lease |
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
    /// Prefix of the per-partition unit-fence hashes (`{prefix}{p}`).
    pub units_prefix: String,
    pub conflicts: String,
    pub skipped: String,
    /// Prefix of the instance leases (`{prefix}{instance id}`, see `instance_lease.rs`).
    pub instances_prefix: String,
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
            units_prefix: format!("{base}:units:"),
            conflicts: format!("{base}:conflicts"),
            skipped: format!("{base}:skipped"),
            instances_prefix: format!("{base}:instance:"),
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

/// The stored state of a claimed partition: its open windows, one per owner, and the
/// unit fences of an interrupted split Redis commit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredWindows {
    pub series: crate::window::PartitionWindows,
    pub dws: crate::window::PartitionWindows,
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
            crate::window::PartitionWindows::decode(text.as_deref().unwrap_or(""))
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

/// Lua prologue of every commit script (`scripts/fence_check.lua`): `fence_verdict()`
/// checks every partition's epoch and contiguity before the script writes anything,
/// and recognises a retry of a commit that was applied already; `move_fences()`
/// moves them after the script's own writes.
pub const FENCE_CHECK: &str = include_str!("scripts/fence_check.lua");

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

/// A key Redis refused to write, as a commit script reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub key: String,
    /// `wrong_type`, `not_an_integer`, `overflow`, `reserved_key` or `other`.
    pub reason: String,
    /// Values (list items, or the increment) that were not stored.
    pub lost: i64,
}

/// What a fenced commit script did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Applied now: the script's own figure (its operations), how many writes Redis
    /// refused, and the first of them.
    Applied {
        ops: i64,
        conflicts: i64,
        first: Vec<Conflict>,
    },
    /// Applied before: the fences stood at this commit's ends already (a retry after
    /// a reply that was lost, e.g. to a timeout). Nothing was written again.
    AppliedBefore,
    Rejected(Rejection),
}

fn int(value: &redis::Value) -> anyhow::Result<i64> {
    redis::from_redis_value_ref(value).context("a number in a commit script's reply")
}

/// Reads a commit script's reply: `{0, ops[, conflicts, key, reason, lost, …]}`
/// applied, `{0, -1}` applied before, or `{code, partition, stored}` refused.
pub fn reply(value: &redis::Value) -> anyhow::Result<Reply> {
    let redis::Value::Array(items) = value else {
        anyhow::bail!("unexpected reply from a commit script: {value:?}");
    };
    let code = int(items
        .first()
        .context("an empty reply from a commit script")?)?;
    if code == 0 {
        let ops = int(items
            .get(1)
            .context("a commit script's reply without its figure")?)?;
        if ops == -1 {
            return Ok(Reply::AppliedBefore);
        }
        let conflicts = items.get(2).map(int).transpose()?.unwrap_or(0);
        let first = items[3.min(items.len())..]
            .chunks(3)
            .map(|c| -> anyhow::Result<Conflict> {
                let [key, reason, lost] = c else {
                    anyhow::bail!("a truncated conflict in a commit script's reply");
                };
                Ok(Conflict {
                    key: redis::from_redis_value_ref(key).context("a conflict's key")?,
                    reason: redis::from_redis_value_ref(reason).context("a conflict's reason")?,
                    lost: int(lost)?,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        return Ok(Reply::Applied {
            ops,
            conflicts,
            first,
        });
    }
    let (partition, stored) = match items.as_slice() {
        [_, partition, stored] => (int(partition)? as i32, int(stored)?),
        other => anyhow::bail!("unexpected reply from a commit script: {other:?}"),
    };
    Ok(Reply::Rejected(match code {
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

/// Claims partitions (`scripts/claim.lua`): bumps each epoch and returns the fences,
/// initialising absent ones to the given cold-start offset.
const CLAIM_SCRIPT: &str = include_str!("scripts/claim.lua");

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

/// A claimed partition: its claim, and the unit fences a split Redis commit left
/// beyond its Redis fence (unit → fence; usually none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claimed {
    pub claim: Claim,
    pub unit_fences: BTreeMap<u16, i64>,
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
    let script = redis::Script::new(CLAIM_SCRIPT);
    let mut invocation = script.key(&keys.fences);
    invocation
        .key(&keys.lost)
        .arg(&keys.units_prefix)
        .arg(partitions.len());
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
        flat => parse_claims(flat).map_err(ClaimError::Other),
    }
}

/// Reads the claim script's reply: per partition `p, epoch, redis, warehouse, k` and
/// `k` pairs of unit and unit fence.
fn parse_claims(mut flat: &[i64]) -> anyhow::Result<BTreeMap<i32, Claimed>> {
    let mut out = BTreeMap::new();
    while let [p, epoch, redis, warehouse, k, rest @ ..] = flat {
        let k = usize::try_from(*k).context("a unit-fence count in the claim reply")?;
        anyhow::ensure!(rest.len() >= 2 * k, "a truncated claim reply");
        let unit_fences = rest[..2 * k]
            .chunks(2)
            .map(|pair| (pair[0] as u16, pair[1]))
            .collect();
        let claim = Claim {
            epoch: *epoch,
            redis: *redis,
            warehouse: *warehouse,
        };
        out.insert(*p as i32, Claimed { claim, unit_fences });
        flat = &rest[2 * k..];
    }
    anyhow::ensure!(flat.is_empty(), "unexpected claim reply tail: {flat:?}");
    Ok(out)
}

/// A warehouse commit recorded in Redis: files to move from their hidden names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishRecord {
    pub id: String,
    pub files: Vec<(PathBuf, PathBuf)>,
    /// The offset ranges the files hold, per partition: what an operator repairs if a
    /// file of this commit is lost (`fences recover`).
    pub ranges: Vec<FenceRange>,
}

impl PublishRecord {
    /// A first line `#ranges p:epoch:from:to,…`, then a line `hidden\tvisible` per file.
    pub fn encode(&self) -> String {
        let ranges: Vec<String> = self
            .ranges
            .iter()
            .map(|r| format!("{}:{}:{}:{}", r.partition, r.epoch, r.from, r.to))
            .collect();
        std::iter::once(format!("#ranges {}", ranges.join(",")))
            .chain(
                self.files.iter().map(|(hidden, visible)| {
                    format!("{}\t{}", hidden.display(), visible.display())
                }),
            )
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn decode(id: String, value: &str) -> anyhow::Result<Self> {
        let malformed = |line: &str| format!("malformed publish record {id}: {line:?}");
        let mut record = PublishRecord {
            id: id.clone(),
            files: Vec::new(),
            ranges: Vec::new(),
        };
        for line in value.lines().filter(|l| !l.is_empty()) {
            if let Some(ranges) = line.strip_prefix("#ranges ") {
                for range in ranges.split(',').filter(|r| !r.is_empty()) {
                    let n: Vec<i64> = range
                        .split(':')
                        .map(str::parse)
                        .collect::<Result<_, _>>()
                        .with_context(|| malformed(line))?;
                    let [partition, epoch, from, to] = n[..] else {
                        anyhow::bail!(malformed(line));
                    };
                    record.ranges.push(FenceRange {
                        partition: partition as i32,
                        epoch,
                        from,
                        to,
                    });
                }
                continue;
            }
            let (hidden, visible) = line.split_once('\t').with_context(|| malformed(line))?;
            record
                .files
                .push((PathBuf::from(hidden), PathBuf::from(visible)));
        }
        Ok(record)
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
        .arg(&keys.conflicts)
        .arg(&keys.skipped)
        .query::<i64>(conn)
        .context("deleting fences")?;
    let units: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", keys.units_prefix))
        .query(conn)
        .context("listing unit fences")?;
    for key in units {
        redis::cmd("DEL")
            .arg(key)
            .query::<i64>(conn)
            .context("deleting unit fences")?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn array(items: &[redis::Value]) -> redis::Value {
        redis::Value::Array(items.to_vec())
    }

    fn ints(items: &[i64]) -> redis::Value {
        array(
            &items
                .iter()
                .map(|i| redis::Value::Int(*i))
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn replies_map_to_outcomes() {
        assert_eq!(
            reply(&ints(&[0, 7])).unwrap(),
            Reply::Applied {
                ops: 7,
                conflicts: 0,
                first: vec![]
            }
        );
        assert_eq!(reply(&ints(&[0, -1])).unwrap(), Reply::AppliedBefore);
        let text = |s: &str| redis::Value::BulkString(s.as_bytes().to_vec());
        assert_eq!(
            reply(&array(&[
                redis::Value::Int(0),
                redis::Value::Int(9),
                redis::Value::Int(1),
                text("u1"),
                text("wrong_type"),
                redis::Value::Int(3),
            ]))
            .unwrap(),
            Reply::Applied {
                ops: 9,
                conflicts: 1,
                first: vec![Conflict {
                    key: "u1".into(),
                    reason: "wrong_type".into(),
                    lost: 3
                }]
            }
        );
        assert_eq!(
            reply(&ints(&[1, 2, 5])).unwrap(),
            Reply::Rejected(Rejection::StaleEpoch {
                partition: 2,
                stored: 5
            })
        );
        assert_eq!(
            reply(&ints(&[2, 0, 100])).unwrap(),
            Reply::Rejected(Rejection::NotContiguous {
                partition: 0,
                stored: 100
            })
        );
        assert_eq!(
            reply(&ints(&[3, 1, -1])).unwrap(),
            Reply::Rejected(Rejection::FencesMissing { partition: 1 })
        );
        assert!(reply(&ints(&[9, 9, 9])).is_err());
        assert!(reply(&ints(&[])).is_err());
        assert!(reply(&redis::Value::Okay).is_err());
    }

    #[test]
    fn claim_replies_carry_unit_fences() {
        let claims = parse_claims(&[0, 3, 100, 90, 0, 5, 1, 40, 40, 2, 7, 60, 9, 55]).unwrap();
        assert_eq!(claims[&0].claim.start(), 90);
        assert!(claims[&0].unit_fences.is_empty());
        assert_eq!(claims[&5].claim.epoch, 1);
        assert_eq!(claims[&5].unit_fences, BTreeMap::from([(7, 60), (9, 55)]));
        assert!(parse_claims(&[0, 3, 100, 90, 2, 7]).is_err());
    }

    #[test]
    fn publish_records_round_trip() {
        let record = PublishRecord {
            id: "a-1".into(),
            files: vec![
                ("/w/t/.a.inprogress".into(), "/w/t/part-a.parquet".into()),
                ("/w/u/.b.inprogress".into(), "/w/u/part-b.parquet".into()),
            ],
            ranges: vec![
                FenceRange {
                    partition: 0,
                    epoch: 3,
                    from: 10,
                    to: 20,
                },
                FenceRange {
                    partition: 2,
                    epoch: 3,
                    from: 0,
                    to: 0,
                },
            ],
        };
        let back = PublishRecord::decode("a-1".into(), &record.encode()).unwrap();
        assert_eq!(back, record);
        assert!(PublishRecord::decode("x".into(), "no tab here").is_err());
    }
}
