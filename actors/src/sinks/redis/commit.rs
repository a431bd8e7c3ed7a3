//! The Redis sink's commit of one checkpoint, as plain data: the shards' flushes merged,
//! every write assigned to the key-hash *unit* its key falls in, and the units packed
//! into scripts of `scripts/redis_commit.lua` no bigger than an operations budget.
//!
//! Units are fixed ranges of the Redis Cluster hash slots (CRC16 of the key, as
//! `CLUSTER KEYSLOT` computes it): [`UNITS`] of them, each [`SLOTS_PER_UNIT`] slots. A
//! checkpoint that fits the budget is one script, as it always was. A bigger one is
//! several `part` scripts and one `final`; each part records, per partition and unit,
//! the range end it applied (a *unit fence*, `anchorflow:{group}:{topic}:units:{p}`),
//! so a crash between scripts leaves every unit either applied or not, and a replay
//! leaves out, unit by unit, what is there already (the aggregators filter by the unit
//! fences a claim returns). Because a unit is a set of hash slots, the same split maps
//! onto a Redis Cluster later: one unit per slot.

use std::collections::BTreeMap;
use std::sync::Arc;

use compact_str::CompactString;
use rustc_hash::FxHashMap;

use crate::checkpoint::barrier::CheckpointSpec;
use crate::checkpoint::claim::{range_for, FenceRange, SinkKind};
use crate::logic::decode::TraceValues;
use crate::logic::window::Counts;
use crate::messages::{ListPush, PartitionDelta, ShardFlush};
use crate::protocol::keys::{KeyLayout, RESERVED_PREFIX, SERIES_KEY_PREFIX};
use crate::protocol::scripts::{
    Args, CommitArgs, FinalTail, HashWrite, ListWrite, Mode, UnitWrites,
};
use crate::protocol::units::unit_of;

/// Time to live of each kind of key, in milliseconds, for one commit.
#[derive(Clone, Copy, Debug)]
pub struct Ttls {
    /// Until the end of the current day in the configured zone, relative, so that a
    /// clock that differs from Redis's cannot make the lists expire early.
    pub receiver_ms: i64,
    pub message_ms: i64,
    pub template_ms: i64,
    pub series_ms: i64,
    /// Of the conflicts hash.
    pub conflicts_ms: i64,
}

/// One script invocation of a commit.
#[derive(Debug)]
pub struct Script {
    pub mode: Mode,
    pub args: Args,
    /// Writes it carries (for the budget's calibration).
    pub ops: usize,
}

/// A checkpoint's commit: its ranges and the scripts that apply it, in order.
#[derive(Debug)]
pub struct CommitPlan {
    pub spec: Arc<CheckpointSpec>,
    pub ranges: Vec<FenceRange>,
    pub scripts: Vec<Script>,
    /// Keys not written because they fall in anchorflow's reserved prefix, with the
    /// number of values each lost (reported by the final script as conflicts).
    pub refused: Vec<(String, i64)>,
}

/// What the commit of one checkpoint needs besides the flushes.
pub struct CommitInput<'a> {
    pub layout: &'a KeyLayout,
    pub ttls: Ttls,
    /// Per partition: the epoch and where this sink's last accepted commit ended.
    pub tracked: &'a BTreeMap<i32, (i64, i64)>,
    pub units_prefix: &'a str,
    /// Most writes one script may carry.
    pub budget_ops: usize,
}

/// Everything the shards flushed for one checkpoint, merged by key.
#[derive(Default)]
struct Merged {
    ranges: BTreeMap<i32, FenceRange>,
    receivers: FxHashMap<CompactString, TraceValues>,
    messages: FxHashMap<CompactString, TraceValues>,
    templates: BTreeMap<i64, BTreeMap<i32, i64>>,
    series: BTreeMap<i64, BTreeMap<(i64, i32), i64>>,
    windows: BTreeMap<i32, String>,
}

fn merge(tracked: &BTreeMap<i32, (i64, i64)>, flushes: Vec<ShardFlush>) -> Merged {
    let mut merged = Merged::default();
    for delta in flushes.into_iter().flat_map(|f| f.partitions) {
        let PartitionDelta {
            partition,
            next_offset,
            claim,
            template_counts,
            receiver_lists,
            message_lists,
            series,
            windows,
        } = delta;
        merged.ranges.insert(
            partition,
            range_for(
                tracked.get(&partition).copied(),
                SinkKind::Redis,
                partition,
                claim,
                next_offset,
            ),
        );
        for ((start, business_id, state), counts) in series {
            add_series(&mut merged.series, start, business_id, state, counts);
        }
        merged
            .windows
            .entry(partition)
            .or_default()
            .push_str(&windows);
        for (business_id, state, n) in template_counts {
            *merged
                .templates
                .entry(business_id)
                .or_default()
                .entry(state)
                .or_insert(0) += n;
        }
        extend_lists(&mut merged.receivers, receiver_lists);
        extend_lists(&mut merged.messages, message_lists);
    }
    merged
}

/// Most keys come from one shard only: their values move in without a copy.
fn extend_lists(into: &mut FxHashMap<CompactString, TraceValues>, pushes: Vec<ListPush>) {
    use std::collections::hash_map::Entry;
    for push in pushes {
        match into.entry(push.key) {
            Entry::Vacant(vacant) => {
                vacant.insert(push.values);
            }
            Entry::Occupied(mut occupied) => occupied.get_mut().extend(push.values),
        }
    }
}

fn add_series(
    series: &mut BTreeMap<i64, BTreeMap<(i64, i32), i64>>,
    start: i64,
    business_id: i64,
    state: i32,
    counts: Counts,
) {
    *series
        .entry(business_id)
        .or_default()
        .entry((start, state))
        .or_insert(0) += counts.events;
}

/// Plans the commit of one checkpoint. Shards own disjoint templates but share
/// receivers and message ids, so lists are merged by key.
pub fn plan(input: &CommitInput<'_>, flushes: Vec<ShardFlush>) -> Option<CommitPlan> {
    let spec = flushes.first()?.spec.clone();
    let merged = merge(input.tracked, flushes);
    let ranges: Vec<FenceRange> = merged.ranges.values().copied().collect();
    let mut refused = Vec::new();
    let units = into_units(
        input,
        &mut refused,
        merged.receivers,
        merged.messages,
        merged.templates,
    );
    let series = series_writes(input.ttls.series_ms, merged.series);
    let groups = pack(
        units,
        series.iter().map(HashWrite::ops).sum(),
        input.budget_ops,
    );
    let last = groups.len() - 1;
    let scripts = groups
        .into_iter()
        .enumerate()
        .map(|(n, units)| {
            let mode = if n == last { Mode::Final } else { Mode::Part };
            let tail = (mode == Mode::Final).then_some(FinalTail {
                series: &series,
                windows: &merged.windows,
                refused: &refused,
            });
            let ops = units.iter().map(|(_, u)| u.ops()).sum::<usize>()
                + tail.map_or(0, |t| t.series.iter().map(HashWrite::ops).sum());
            let args = CommitArgs {
                checkpoint: spec.id,
                ranges: &ranges,
                mode,
                units_prefix: input.units_prefix,
                conflicts_ttl_ms: input.ttls.conflicts_ms,
                units: &units,
                tail,
            };
            Script {
                mode,
                args: args.encode(),
                ops,
            }
        })
        .collect();
    Some(CommitPlan {
        spec,
        ranges,
        scripts,
        refused,
    })
}

/// Assigns every list and template write to the unit its key falls in; keys in
/// anchorflow's reserved prefix go to `refused` with the values they lose.
fn into_units(
    input: &CommitInput<'_>,
    refused: &mut Vec<(String, i64)>,
    receivers: FxHashMap<CompactString, TraceValues>,
    messages: FxHashMap<CompactString, TraceValues>,
    templates: BTreeMap<i64, BTreeMap<i32, i64>>,
) -> BTreeMap<u16, UnitWrites> {
    let mut units: BTreeMap<u16, UnitWrites> = BTreeMap::new();
    let ttls = input.ttls;
    let lists = [
        (receivers, &input.layout.receiver_prefix, ttls.receiver_ms),
        (messages, &input.layout.message_prefix, ttls.message_ms),
    ];
    for (by_id, prefix, ttl_ms) in lists {
        for (id, values) in by_id {
            let mut key = String::with_capacity(prefix.len() + id.len());
            key.push_str(prefix);
            key.push_str(&id);
            if key.starts_with(RESERVED_PREFIX) {
                refused.push((key, values.len() as i64));
                continue;
            }
            let unit = units.entry(unit_of(key.as_bytes())).or_default();
            unit.lists.push(ListWrite {
                key,
                ttl_ms,
                values,
            });
        }
    }
    for (business_id, states) in templates {
        let key = input.layout.template(business_id);
        let fields = states
            .into_iter()
            .map(|(state, n)| (state.to_string(), n))
            .collect();
        units
            .entry(unit_of(key.as_bytes()))
            .or_default()
            .hashes
            .push(HashWrite {
                key,
                ttl_ms: ttls.template_ms,
                fields,
            });
    }
    units
}

/// The window-series increments as hash writes, one per template.
fn series_writes(ttl_ms: i64, series: BTreeMap<i64, BTreeMap<(i64, i32), i64>>) -> Vec<HashWrite> {
    series
        .into_iter()
        .map(|(business_id, fields)| HashWrite {
            key: format!("{SERIES_KEY_PREFIX}{business_id}"),
            ttl_ms,
            fields: fields
                .into_iter()
                .map(|((start, state), n)| (format!("{start}:{state}"), n))
                .collect(),
        })
        .collect()
}

/// Packs units, in unit order, into groups of at most `budget` writes; the last group
/// also carries `final_ops` (the series), and there is always at least one group.
fn pack(
    units: BTreeMap<u16, UnitWrites>,
    final_ops: usize,
    budget: usize,
) -> Vec<Vec<(u16, UnitWrites)>> {
    let mut groups: Vec<Vec<(u16, UnitWrites)>> = vec![Vec::new()];
    let mut ops = 0;
    for (id, unit) in units {
        let size = unit.ops();
        let current = groups.last_mut().expect("at least one group");
        if !current.is_empty() && ops + size > budget {
            groups.push(Vec::new());
            ops = 0;
        }
        ops += size;
        groups.last_mut().expect("just pushed").push((id, unit));
    }
    if ops + final_ops > budget && groups.last().is_some_and(|g| !g.is_empty()) {
        groups.push(Vec::new());
    }
    groups
}

/// The share of `redis.max_commit_ms` a script is sized to. The same script's cost per
/// operation varies by up to ~1.7× on a busy machine (`anchorflow bench` on 2 cores:
/// 2.4–4.1 µs within one run), so scripts sized to the whole bound ran over it (135 ms
/// against 100); sized to half, a busier Redis still ran one over it in about every
/// third run (up to 125 ms), its script descheduled while the readers had the cores. A script's own fixed cost (the fence
/// check, one unit fence per partition) is ~0.2 ms, so smaller scripts cost little.
pub const HEADROOM: f64 = 0.35;

/// Keeps the per-script operations budget so that one script stays within
/// `redis.max_commit_ms`: the measured cost per operation (a moving average over
/// scripts big enough to measure) converts [`HEADROOM`] of the time bound into
/// operations.
#[derive(Clone, Copy, Debug)]
pub struct OpsBudget {
    max_ms: f64,
    micros_per_op: f64,
}

impl OpsBudget {
    /// Until measured, assume 5 µs per operation: `anchorflow bench` measured 4-7 µs
    /// per write on 2 cores with unique keys, where the first scripts at 2 µs took 2-3×
    /// `redis.max_commit_ms`.
    pub fn new(max_commit_ms: u64) -> Self {
        OpsBudget {
            max_ms: max_commit_ms as f64,
            micros_per_op: 5.0,
        }
    }

    pub fn ops(&self) -> usize {
        ((HEADROOM * self.max_ms * 1000.0 / self.micros_per_op) as usize).clamp(1_000, 1_000_000)
    }

    /// Learns from one script that carried `ops` writes and took `took`.
    pub fn observe(&mut self, ops: usize, took: std::time::Duration) {
        if ops < 2_000 {
            return;
        }
        let measured = took.as_secs_f64() * 1e6 / ops as f64;
        // Dearer than assumed: believe it at once, so that at most one script runs over
        // the bound; cheaper: average it in.
        self.micros_per_op = if measured > self.micros_per_op {
            measured
        } else {
            (0.8 * self.micros_per_op + 0.2 * measured).max(0.05)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::barrier::CheckpointKind;
    use crate::checkpoint::claim::Claim;
    use crate::logic::decode::TraceValue;

    fn delta(partition: i32, receivers: &[(&str, usize)]) -> PartitionDelta {
        let value = TraceValue {
            state: 10,
            business_id: 9,
            timestamp: 1,
        };
        PartitionDelta {
            partition,
            next_offset: 10,
            claim: Claim {
                epoch: 1,
                redis: 0,
                warehouse: 0,
            },
            template_counts: vec![(9, 10, 1)],
            receiver_lists: receivers
                .iter()
                .map(|(key, n)| ListPush {
                    key: (*key).into(),
                    values: smallvec::smallvec![value; *n],
                })
                .collect(),
            message_lists: vec![],
            series: vec![(
                (60_000, 9, 10),
                Counts {
                    events: 1,
                    receivers: 1,
                },
            )],
            windows: "c -\n".into(),
        }
    }

    fn input<'a>(
        layout: &'a KeyLayout,
        tracked: &'a BTreeMap<i32, (i64, i64)>,
        budget: usize,
    ) -> CommitInput<'a> {
        CommitInput {
            layout,
            ttls: Ttls {
                receiver_ms: 1000,
                message_ms: 2000,
                template_ms: 3000,
                series_ms: 4000,
                conflicts_ms: 5000,
            },
            tracked,
            units_prefix: "anchorflow:g:t:units:",
            budget_ops: budget,
        }
    }

    fn flush(deltas: Vec<PartitionDelta>) -> ShardFlush {
        ShardFlush {
            shard: 0,
            spec: Arc::new(CheckpointSpec {
                id: 1,
                partitions: deltas.iter().map(|d| d.partition).collect(),
                kind: CheckpointKind::Periodic,
                watermark: None,
            }),
            partitions: deltas,
        }
    }

    /// A small checkpoint is one final script; a big one is parts and a final, every
    /// unit in exactly one script, each within the budget, and reserved keys refused.
    #[test]
    fn big_checkpoints_split_into_units_within_the_budget() {
        let layout = KeyLayout::default();
        let tracked = BTreeMap::new();
        let keys: Vec<(String, usize)> = (0..400).map(|k| (format!("user{k}"), 3)).collect();
        let refs: Vec<(&str, usize)> = keys.iter().map(|(k, n)| (k.as_str(), *n)).collect();
        let small = plan(
            &input(&layout, &tracked, 100_000),
            vec![flush(vec![delta(0, &refs)])],
        )
        .unwrap();
        assert_eq!(small.scripts.len(), 1);
        assert_eq!(small.scripts[0].mode, Mode::Final);

        let mut with_reserved = refs.clone();
        with_reserved.push(("anchorflow:g:t:fences", 2));
        let big = plan(
            &input(&layout, &tracked, 100),
            vec![flush(vec![delta(0, &with_reserved), delta(1, &refs)])],
        )
        .unwrap();
        assert!(big.scripts.len() > 5, "{} scripts", big.scripts.len());
        let (last, parts) = big.scripts.split_last().unwrap();
        assert_eq!(last.mode, Mode::Final);
        assert!(parts.iter().all(|s| s.mode == Mode::Part && s.ops <= 100));
        assert_eq!(big.refused, vec![("anchorflow:g:t:fences".to_string(), 2)]);
        // Every receiver key is pushed by exactly one script, both partitions' values
        // merged into it.
        let mut pushed: BTreeMap<String, usize> = BTreeMap::new();
        for script in &big.scripts {
            for arg in script.args.iter() {
                if arg.starts_with("user") {
                    *pushed.entry(arg.to_string()).or_default() += 1;
                }
            }
        }
        assert_eq!(pushed.len(), 400);
        assert!(pushed.values().all(|n| *n == 1));
        let script = big.scripts[0].args.iter().nth(11).unwrap_or_default();
        assert_eq!(
            script, "part",
            "after sink, checkpoint, count and two ranges of four"
        );
    }

    #[test]
    fn the_budget_follows_measured_cost() {
        let mut budget = OpsBudget::new(100);
        assert_eq!(budget.ops(), 7_000, "35 % of 100 ms at 5 µs");
        budget.observe(10_000, std::time::Duration::from_millis(100));
        assert_eq!(budget.ops(), 3_500, "a dearer script corrects at once");
        for _ in 0..30 {
            budget.observe(10_000, std::time::Duration::from_millis(40));
        }
        assert!((8_500..9_000).contains(&budget.ops()), "{}", budget.ops());
        budget.observe(10, std::time::Duration::from_secs(1));
        assert!(
            (8_500..9_000).contains(&budget.ops()),
            "tiny scripts are ignored"
        );
    }
}
