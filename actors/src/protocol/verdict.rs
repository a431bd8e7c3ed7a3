//! The fence check of `scripts/fence_check.lua` as a pure function, for the Redis
//! sink's transactions (`sinks/redis/transaction.rs`): they read the stored fences
//! under `WATCH`, decide here, and write only if nothing they read changed before
//! `EXEC`. Both must reach the same verdict on the same fences; `tests/protocol.rs`
//! compares them on a real Redis.
//!
//! Also here: which units of a `part` are there already (`applied_units` in
//! `redis_commit.lua`), and the unit-fence fields a commit writes and passes.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;

use crate::checkpoint::claim::{FenceRange, SinkKind};
use crate::protocol::reply::Rejection;

/// One partition's fence fields, as `HMGET fences epoch:{p} {sink}:{p}
/// {sink}-checkpoint:{p}` reads them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredFence {
    pub epoch: Option<String>,
    pub fence: Option<String>,
    /// `epoch:checkpoint` of the last commit that moved it.
    pub last: Option<String>,
}

/// The fields of the fences hash one range is checked against, in [`StoredFence`]'s
/// order.
pub fn fence_fields(sink: SinkKind, partition: i32) -> [String; 3] {
    let sink = sink.name();
    [
        format!("epoch:{partition}"),
        format!("{sink}:{partition}"),
        format!("{sink}-checkpoint:{partition}"),
    ]
}

/// What the fence check decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every range starts at its stored fence under the stored epoch.
    Apply,
    /// Every fence stands at its range's end already: this commit applied before.
    AppliedBefore,
    /// Refused; nothing may be written. For [`Rejection::FencesMissing`] the lost
    /// marker is set (the only write of a refused commit).
    Rejected(Rejection),
}

fn number(field: &str, text: &str) -> anyhow::Result<i64> {
    text.parse()
        .with_context(|| format!("the stored {field} {text:?} is not a number"))
}

/// `fence_verdict()` of `fence_check.lua`: ranges in order, the first missing fence or
/// stale epoch refuses at once; otherwise apply when every range starts at its fence,
/// applied before when every range ends at it, else the first range that does not start
/// there is not contiguous. An empty range moves no fence: its stored
/// `epoch:checkpoint` tells whether this checkpoint (or a later one) applied it.
pub fn verdict(
    checkpoint: u64,
    ranges: &[FenceRange],
    stored: &[StoredFence],
) -> anyhow::Result<Verdict> {
    anyhow::ensure!(
        ranges.len() == stored.len(),
        "{} fences read for {} ranges",
        stored.len(),
        ranges.len()
    );
    let (mut at_from, mut at_to, mut off) = (true, true, None);
    for (range, stored) in ranges.iter().zip(stored) {
        let partition = range.partition;
        let (Some(epoch), Some(fence)) = (&stored.epoch, &stored.fence) else {
            return Ok(Verdict::Rejected(Rejection::FencesMissing { partition }));
        };
        let epoch = number("epoch", epoch)?;
        if epoch != range.epoch {
            return Ok(Verdict::Rejected(Rejection::StaleEpoch {
                partition,
                stored: epoch,
            }));
        }
        let fence = number("fence", fence)?;
        let (mut pending, mut applied) = (fence == range.from, fence == range.to);
        if range.from == range.to && pending {
            applied = stored
                .last
                .as_deref()
                .and_then(|last| last.split_once(':'))
                .and_then(|(e, c)| Some((e.parse::<i64>().ok()?, c.parse::<u64>().ok()?)))
                .is_some_and(|(e, c)| e == range.epoch && c >= checkpoint);
            pending = !applied;
        }
        if !pending {
            at_from = false;
            off = off.or(Some(Rejection::NotContiguous {
                partition,
                stored: fence,
            }));
        }
        if !applied {
            at_to = false;
        }
    }
    Ok(if at_from {
        Verdict::Apply
    } else if at_to {
        Verdict::AppliedBefore
    } else {
        Verdict::Rejected(off.expect("a range that is not pending set it"))
    })
}

/// The units a unit-fence field covers: `a-b`, or `u` alone.
fn span(field: &str) -> Option<(u16, u16)> {
    match field.split_once('-') {
        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
        None => field.parse().ok().map(|u| (u, u)),
    }
}

/// The units of a `part` that are there already (`applied_units` in
/// `redis_commit.lua`): those that, for every range, lie in a stored unit fence at or
/// beyond the range's end. `unit_fences` holds each range's unit-fence hash.
pub fn applied_units(
    units: &[u16],
    ranges: &[FenceRange],
    unit_fences: &[BTreeMap<String, String>],
) -> BTreeSet<u16> {
    let (Some(&lo), Some(&hi)) = (units.iter().min(), units.iter().max()) else {
        return BTreeSet::new();
    };
    let mut applied: BTreeSet<u16> = units.iter().copied().collect();
    for (range, stored) in ranges.iter().zip(unit_fences) {
        let spans: Vec<(u16, u16)> = stored
            .iter()
            .filter(|(_, end)| end.parse::<i64>().is_ok_and(|end| end >= range.to))
            .filter_map(|(field, _)| span(field))
            .filter(|&(a, b)| a <= hi && b >= lo)
            .collect();
        if spans.is_empty() {
            return BTreeSet::new();
        }
        applied.retain(|&u| spans.iter().any(|&(a, b)| a <= u && u <= b));
    }
    applied
}

/// The unit-fence field a `part` over `units` records.
pub fn part_field(units: &[u16]) -> Option<String> {
    let lo = units.iter().min()?;
    let hi = units.iter().max()?;
    Some(format!("{lo}-{hi}"))
}

/// Whether a `part` records its span for `range`: never lowering one already there.
pub fn raises(stored: &BTreeMap<String, String>, field: &str, range: &FenceRange) -> bool {
    stored
        .get(field)
        .and_then(|end| end.parse::<i64>().ok())
        .is_none_or(|end| end < range.to)
}

/// The unit fences a `final` drops: those its range end passes.
pub fn passed_fields(stored: &BTreeMap<String, String>, range: &FenceRange) -> Vec<String> {
    stored
        .iter()
        .filter(|(_, end)| end.parse::<i64>().is_ok_and(|end| end <= range.to))
        .map(|(field, _)| field.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(partition: i32, from: i64, to: i64) -> FenceRange {
        FenceRange {
            partition,
            epoch: 3,
            from,
            to,
        }
    }

    fn stored(epoch: &str, fence: &str, last: Option<&str>) -> StoredFence {
        StoredFence {
            epoch: Some(epoch.into()),
            fence: Some(fence.into()),
            last: last.map(Into::into),
        }
    }

    #[test]
    fn verdicts_follow_the_fence_check() {
        let ranges = [range(0, 10, 20), range(1, 5, 9)];
        let at = |a: &str, b: &str| [stored("3", a, None), stored("3", b, None)];
        assert_eq!(verdict(7, &ranges, &at("10", "5")).unwrap(), Verdict::Apply);
        assert_eq!(
            verdict(7, &ranges, &at("20", "9")).unwrap(),
            Verdict::AppliedBefore
        );
        assert_eq!(
            verdict(7, &ranges, &at("10", "9")).unwrap(),
            Verdict::Rejected(Rejection::NotContiguous {
                partition: 1,
                stored: 9
            })
        );
        assert_eq!(
            verdict(
                7,
                &ranges,
                &[stored("4", "10", None), stored("3", "5", None)]
            )
            .unwrap(),
            Verdict::Rejected(Rejection::StaleEpoch {
                partition: 0,
                stored: 4
            })
        );
        let missing = [StoredFence::default(), stored("3", "5", None)];
        assert_eq!(
            verdict(7, &ranges, &missing).unwrap(),
            Verdict::Rejected(Rejection::FencesMissing { partition: 0 })
        );
        assert!(verdict(7, &ranges, &at("ten", "5")).is_err());
        assert!(verdict(7, &ranges, &at("10", "5")[..1]).is_err());
    }

    /// An empty range is applied when its stored checkpoint of the same epoch is this
    /// one or later.
    #[test]
    fn an_empty_range_is_told_from_its_retry_by_the_stored_checkpoint() {
        let ranges = [range(0, 10, 10)];
        let with = |last| [stored("3", "10", last)];
        assert_eq!(verdict(7, &ranges, &with(None)).unwrap(), Verdict::Apply);
        assert_eq!(
            verdict(7, &ranges, &with(Some("3:6"))).unwrap(),
            Verdict::Apply
        );
        assert_eq!(
            verdict(7, &ranges, &with(Some("3:7"))).unwrap(),
            Verdict::AppliedBefore
        );
        assert_eq!(
            verdict(7, &ranges, &with(Some("2:9"))).unwrap(),
            Verdict::Apply,
            "another epoch's checkpoint says nothing of this one"
        );
    }

    #[test]
    fn unit_fences_skip_what_every_range_has() {
        let ranges = [range(0, 10, 20), range(1, 5, 9)];
        let hash = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(f, v)| (f.to_string(), v.to_string()))
                .collect()
        };
        let units = [4, 5, 9];
        let both = [hash(&[("0-5", "20")]), hash(&[("3-9", "9")])];
        assert_eq!(
            applied_units(&units, &ranges, &both),
            BTreeSet::from([4, 5])
        );
        let one_short = [hash(&[("0-9", "20")]), hash(&[("0-9", "8")])];
        assert!(applied_units(&units, &ranges, &one_short).is_empty());
        assert!(applied_units(&units, &ranges, &[hash(&[]), hash(&[])]).is_empty());
        assert_eq!(part_field(&units).as_deref(), Some("4-9"));
        let stored = hash(&[("4-9", "15"), ("1", "30")]);
        assert!(raises(&stored, "4-9", &ranges[0]));
        assert!(!raises(&stored, "1", &ranges[0]));
        assert_eq!(passed_fields(&stored, &ranges[0]), vec!["4-9".to_string()]);
    }
}
