//! The Redis sink's commit of one checkpoint, as plain data: the shards' flushes merged,
//! every write assigned to the key-hash *unit* its key falls in, and the units packed
//! into scripts of `scripts/redis_commit.lua` no bigger than an operations budget.
//!
//! Units are fixed ranges of the Redis Cluster hash slots (CRC16 of the key, as
//! `CLUSTER KEYSLOT` computes it): [`UNITS`](crate::protocol::units::UNITS) of them, each
//! [`SLOTS_PER_UNIT`](crate::protocol::units::SLOTS_PER_UNIT) slots. A
//! checkpoint that fits the budget is one script. A bigger one is
//! several `part` scripts and one `final`; each part records, per partition and unit,
//! the range end it applied (a *unit fence*, `anchorflow:{group}:{topic}:units:{p}`),
//! so a crash between scripts leaves every unit either applied or not, and a replay
//! leaves out, unit by unit, what is there already (the aggregators filter by the unit
//! fences a claim returns). Because a unit is a set of hash slots, the same split maps
//! onto a Redis Cluster later: one unit per slot.
//!
//! Window series belong to no unit (a window closes at a barrier, not at a record), so
//! they go in the `final` script. When they alone exceed the budget, the final stages
//! them on a list instead (a copy, no per-field work) and `unstage` scripts after it
//! apply them a batch each (`docs/exactly-once.md`).

use std::collections::BTreeMap;
use std::sync::Arc;

use compact_str::CompactString;
use rustc_hash::FxHashMap;

use crate::checkpoint::barrier::CheckpointSpec;
use crate::checkpoint::claim::{range_for, FenceRange, SinkKind};
use crate::logic::decode::TraceValues;
use crate::logic::window::Counts;
use crate::messages::{ListPush, PartitionDelta, ShardFlush};
use crate::protocol::commit_args::{
    CommitArgs, Expiry, FinalTail, HashWrite, ListWrite, Mode, Staged, UnitWrites,
};
use crate::protocol::keys::{FenceKeys, KeyLayout, RESERVED_PREFIX, SERIES_KEY_PREFIX};
use crate::protocol::scripts::Args;
use crate::protocol::staged::{staged_batch, SeriesPart, UnstageArgs};
use crate::protocol::units::unit_of;
use crate::sinks::redis::transaction::{Commit, Transaction};

/// When each kind of key expires, for one commit (hashes: milliseconds after the write).
#[derive(Clone, Copy, Debug)]
pub struct Ttls {
    /// The end of the current day in the configured zone, chosen by Redis's clock when
    /// the script runs ([`Expiry::DayEnd`]): neither a host clock that differs from
    /// Redis's nor a commit that waited can move it.
    pub receiver: Expiry,
    pub message: Expiry,
    pub template_ms: i64,
    pub series_ms: i64,
    /// Of the conflicts hash.
    pub conflicts_ms: i64,
}

/// One script of a commit: a Lua script's arguments, or the same writes as a
/// transaction (`redis.commit`).
#[derive(Debug)]
pub struct Script {
    pub mode: Mode,
    pub body: Body,
    /// Writes it carries (for the budget's calibration).
    pub ops: usize,
}

/// How a script's writes are sent.
#[derive(Debug)]
pub enum Body {
    /// `redis_commit.lua`'s arguments.
    Lua(Args),
    /// `WATCH`/`MULTI`/`EXEC` of plain commands (`transaction.rs`).
    Transaction(Transaction),
}

impl Script {
    /// The script's arguments, when it is one.
    pub fn args(&self) -> Option<&Args> {
        match &self.body {
            Body::Lua(args) => Some(args),
            Body::Transaction(_) => None,
        }
    }
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
    /// The unit-fence prefix and the staging keys.
    pub keys: &'a FenceKeys,
    /// Most writes one script may carry.
    pub budget_ops: usize,
    /// Most series fields one `unstage` script may carry (their cost per field is
    /// measured apart: about three times a list push's, `docs/benchmarks.md`).
    pub unstage_fields: usize,
    /// Part and final scripts as transactions (`redis.commit`); `unstage` scripts are
    /// always Lua (each pops what it applied, atomically).
    pub transactions: bool,
    /// The sink's estimate of Redis's clock, in Unix ms: the day end receiver lists
    /// are built for (a transaction checks it against Redis's clock before it runs).
    pub now_ms: i64,
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
///
/// The window series go in the final script when they fit the budget. More (data spread
/// over many windows: a backlog of late events, a day's windows closing at once) are
/// staged by the final, in batches of `unstage_fields`, and applied after it by one
/// `unstage` script per batch (`scripts/redis_commit.lua`).
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
    let series_ops: usize = series.iter().map(HashWrite::ops).sum();
    let staged_list = ranges
        .first()
        .filter(|_| series_ops > input.budget_ops)
        .map(|r| input.keys.staged_list(r.partition, r.epoch, spec.id));
    let (batches, counts): (Vec<String>, Vec<usize>) = match staged_list {
        Some(_) => staged_batches(&series, input.unstage_fields)
            .into_iter()
            .unzip(),
        None => Default::default(),
    };
    let (inline, staged) = match &staged_list {
        Some(list) => (
            &[][..],
            Some(Staged {
                list,
                pending: &input.keys.staged,
                batches: &batches,
            }),
        ),
        None => (&series[..], None),
    };
    let final_ops = series_ops_in_final(inline, staged);
    let groups = pack(units, final_ops, input.budget_ops);
    let last = groups.len() - 1;
    let mut scripts: Vec<Script> = groups
        .into_iter()
        .enumerate()
        .map(|(n, units)| {
            let mode = if n == last { Mode::Final } else { Mode::Part };
            let tail = (mode == Mode::Final).then_some(FinalTail {
                series: inline,
                staged,
                windows: &merged.windows,
                refused: &refused,
            });
            let ops = units.iter().map(|(_, u)| u.ops()).sum::<usize>()
                + if tail.is_some() { final_ops } else { 0 };
            let body = script_body(input, spec.id, &ranges, mode, &units, tail);
            Script { mode, body, ops }
        })
        .collect();
    if let Some(list) = &staged_list {
        scripts.extend(unstages(input, spec.id, list, &counts));
    }
    Some(CommitPlan {
        spec,
        ranges,
        scripts,
        refused,
    })
}

/// One script's writes as the sink sends them: a transaction or a Lua script's
/// arguments (`CommitInput::transactions`).
fn script_body(
    input: &CommitInput<'_>,
    checkpoint: u64,
    ranges: &[FenceRange],
    mode: Mode,
    units: &[(u16, UnitWrites)],
    tail: Option<FinalTail<'_>>,
) -> Body {
    if input.transactions {
        let commit = Commit {
            checkpoint,
            ranges: ranges.to_vec(),
            mode,
            refused: tail.map(|t| t.refused.to_vec()).unwrap_or_default(),
            conflicts_ttl_ms: input.ttls.conflicts_ms,
        };
        let tx = Transaction::build(commit, units, tail.as_ref(), input.keys, input.now_ms);
        Body::Transaction(tx)
    } else {
        let args = CommitArgs {
            checkpoint,
            ranges,
            mode,
            units_prefix: &input.keys.units_prefix,
            conflicts_ttl_ms: input.ttls.conflicts_ms,
            units,
            tail,
        };
        Body::Lua(args.encode())
    }
}

/// Redis's work for the series in a final script: the writes of those it applies, and
/// for staged ones the bytes it pushes (a copy: counted as a write per 4 KiB).
fn series_ops_in_final(inline: &[HashWrite], staged: Option<Staged<'_>>) -> usize {
    inline.iter().map(HashWrite::ops).sum::<usize>()
        + staged.map_or(0, |s| {
            s.batches.len() + s.batches.iter().map(String::len).sum::<usize>() / 4096
        })
}

/// The series in batches of at most `fields` fields (a template's fields may span
/// two), each with its field count.
fn staged_batches(series: &[HashWrite], fields: usize) -> Vec<(String, usize)> {
    let fields = fields.max(1);
    let mut batches = Vec::new();
    let mut batch: Vec<SeriesPart<'_>> = Vec::new();
    let mut in_batch = 0;
    for hash in series {
        let mut rest = &hash.fields[..];
        while !rest.is_empty() {
            let (now, later) = rest.split_at(rest.len().min(fields - in_batch));
            batch.push((&hash.key, hash.ttl_ms, now));
            in_batch += now.len();
            rest = later;
            if in_batch == fields {
                batches.push((staged_batch(batch.drain(..)), in_batch));
                in_batch = 0;
            }
        }
    }
    if in_batch > 0 {
        batches.push((staged_batch(batch), in_batch));
    }
    batches
}

/// One `unstage` script per staged batch; its figure is the batch's fields, which the
/// sink's unstage budget is measured in.
fn unstages(input: &CommitInput<'_>, checkpoint: u64, list: &str, counts: &[usize]) -> Vec<Script> {
    counts
        .iter()
        .map(|fields| Script {
            mode: Mode::Unstage,
            body: Body::Lua(
                UnstageArgs {
                    checkpoint,
                    units_prefix: &input.keys.units_prefix,
                    conflicts_ttl_ms: input.ttls.conflicts_ms,
                    list,
                    pending: &input.keys.staged,
                }
                .encode(),
            ),
            ops: *fields,
        })
        .collect()
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
        (receivers, &input.layout.receiver_prefix, ttls.receiver),
        (messages, &input.layout.message_prefix, ttls.message),
    ];
    for (by_id, prefix, expiry) in lists {
        for (id, values) in by_id {
            let mut key = CompactString::with_capacity(prefix.len() + id.len());
            key.push_str(prefix);
            key.push_str(&id);
            if key.starts_with(RESERVED_PREFIX) {
                refused.push((key.into(), values.len() as i64));
                continue;
            }
            let unit = units.entry(unit_of(key.as_bytes())).or_default();
            unit.lists.push(ListWrite {
                key,
                expiry,
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
        keys: &'a FenceKeys,
        budget: usize,
    ) -> CommitInput<'a> {
        CommitInput {
            layout,
            ttls: Ttls {
                receiver: Expiry::After(1000),
                message: Expiry::After(2000),
                template_ms: 3000,
                series_ms: 4000,
                conflicts_ms: 5000,
            },
            tracked,
            keys,
            budget_ops: budget,
            unstage_fields: budget,
            transactions: false,
            now_ms: 0,
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
        let fence_keys = FenceKeys::new("g", "t");
        let keys: Vec<(String, usize)> = (0..400).map(|k| (format!("user{k}"), 3)).collect();
        let refs: Vec<(&str, usize)> = keys.iter().map(|(k, n)| (k.as_str(), *n)).collect();
        let small = plan(
            &input(&layout, &tracked, &fence_keys, 100_000),
            vec![flush(vec![delta(0, &refs)])],
        )
        .unwrap();
        assert_eq!(small.scripts.len(), 1);
        assert_eq!(small.scripts[0].mode, Mode::Final);

        let mut with_reserved = refs.clone();
        with_reserved.push(("anchorflow:g:t:fences", 2));
        let big = plan(
            &input(&layout, &tracked, &fence_keys, 100),
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
            for arg in script.args().unwrap().iter() {
                if arg.starts_with("user") {
                    *pushed.entry(arg.to_string()).or_default() += 1;
                }
            }
        }
        assert_eq!(pushed.len(), 400);
        assert!(pushed.values().all(|n| *n == 1));
        let script = big.scripts[0]
            .args()
            .unwrap()
            .iter()
            .nth(11)
            .unwrap_or_default();
        assert_eq!(
            script, "part",
            "after sink, checkpoint, count and two ranges of four"
        );
    }

    /// Series over the budget are staged by the final script and unstaged after it
    /// in scripts within the budget, which together take every field once; series that
    /// fit stay in the final script.
    #[test]
    fn series_over_the_budget_are_staged_and_unstaged_within_it() {
        let layout = KeyLayout::default();
        let tracked = BTreeMap::new();
        let keys = FenceKeys::new("g", "t");
        let spread = || {
            let mut spread = delta(0, &[("user", 1)]);
            spread.series = (0..250)
                .map(|n| {
                    let one = Counts {
                        events: 1,
                        receivers: 1,
                    };
                    ((60_000 * (n % 125), 9 + n / 125, 10), one)
                })
                .collect();
            spread
        };
        let inline = plan(
            &input(&layout, &tracked, &keys, 100_000),
            vec![flush(vec![spread()])],
        )
        .unwrap();
        assert_eq!(inline.scripts.len(), 1, "all in the final script");

        let staged = plan(
            &input(&layout, &tracked, &keys, 100),
            vec![flush(vec![spread()])],
        )
        .unwrap();
        let (last_part, unstages) = staged
            .scripts
            .iter()
            .position(|s| s.mode == Mode::Final)
            .map(|at| staged.scripts.split_at(at + 1))
            .unwrap();
        assert!(last_part.iter().all(|s| s.ops <= 100));
        assert!(unstages
            .iter()
            .all(|s| s.mode == Mode::Unstage && s.ops <= 100));
        let list = keys.staged_list(0, 1, 1);
        assert!(unstages
            .iter()
            .all(|s| s.args().unwrap().iter().nth(6) == Some(list.as_str())));
        let fields: Vec<usize> = unstages.iter().map(|s| s.ops).collect();
        assert_eq!(fields, vec![100, 100, 50], "batches of the unstage budget");
        // The final carries the batches: two series keys of 125 fields, the second
        // batch holding the end of one and the start of the other.
        let batches: Vec<serde_json::Value> = last_part
            .last()
            .unwrap()
            .args()
            .unwrap()
            .iter()
            .filter(|a| a.starts_with("[["))
            .map(|a| serde_json::from_str(a).unwrap())
            .collect();
        assert_eq!(batches.len(), 3);
        let second = batches[1].as_array().unwrap();
        assert_eq!(second.len(), 2);
        assert_eq!(second[0][0], "anchorflow:series:9");
        assert_eq!(second[1][0], "anchorflow:series:10");
        assert_eq!(second[0][1], "4000", "the TTL");
        assert_eq!(
            second
                .iter()
                .map(|h| (h.as_array().unwrap().len() - 2) / 2)
                .sum::<usize>(),
            100
        );
    }
}
