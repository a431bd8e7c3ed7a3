//! The arguments of `redis_commit.lua`, one script of a Redis sink commit: the writes
//! of each key-hash unit ([`UnitWrites`]), what only the final script carries
//! ([`FinalTail`]), and the command that sends them ([`commit_command`]). The script's
//! other contracts (the argument cursor, the reply) are in `scripts.rs`.

use std::collections::{BTreeMap, BTreeSet};

use compact_str::CompactString;

use crate::checkpoint::claim::{FenceRange, SinkKind};
use crate::logic::decode::TraceValues;
use crate::protocol::keys::{series_field, FenceKeys};
use crate::protocol::scripts::Args;

/// Whether a commit script only applies units (`part`), also moves the fences
/// (`final`), or applies series a final staged (`unstage`, after the final).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Part,
    Final,
    Unstage,
}

impl Mode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Part => "part",
            Mode::Final => "final",
            Mode::Unstage => "unstage",
        }
    }
}

/// When a list written by a commit expires. The time to live is taken from Redis's
/// clock when the script runs, not when the commit was planned: a commit that waited
/// (a stalled Redis, retries, a queue) must not carry a receiver list past midnight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Expiry {
    /// This many milliseconds after the write.
    After(i64),
    /// At the first of these instants (Unix ms, by Redis's clock) still ahead when the
    /// script runs: the end of the local day the commit was planned in, and the end of
    /// the next (a commit applied after midnight belongs to the new day). Past both,
    /// whole days are added to the second.
    DayEnd([i64; 2]),
}

impl std::fmt::Display for Expiry {
    /// The script's form (`redis_commit.lua`, `ttl_of`): a number of milliseconds, or
    /// `at:` and the two instants.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expiry::After(ms) => write!(f, "{ms}"),
            Expiry::DayEnd([first, second]) => write!(f, "at:{first}:{second}"),
        }
    }
}

/// How close to a day's end a transaction (`sinks/redis/transaction.rs`) with receiver
/// lists may start: closer, it
/// waits until this long past it. Also how long before the day's end its deadline key
/// expires.
pub const DAY_END_MARGIN_MS: i64 = 1_000;

pub const DAY_MS: i64 = 86_400_000;

/// The instant a list written at `now_ms` expires at, for `Expiry::DayEnd(ends)`: the
/// first of `ends` still ahead, whole days after the second past both (as
/// `redis_commit.lua`'s `ttl_of`).
pub fn day_end_at(ends: [i64; 2], now_ms: i64) -> i64 {
    let mut at = if ends[0] > now_ms { ends[0] } else { ends[1] };
    if at <= now_ms {
        at += (now_ms - at) / DAY_MS * DAY_MS + DAY_MS;
    }
    at
}

/// How long a transaction with lists expiring at `ends`, about to start at `now_ms`,
/// waits first: until [`DAY_END_MARGIN_MS`] past the day end when it is nearer than
/// twice that; then the day end it uses.
pub fn day_end_wait(ends: [i64; 2], now_ms: i64) -> (i64, i64) {
    let at = day_end_at(ends, now_ms);
    if at - now_ms < 2 * DAY_END_MARGIN_MS {
        let wait = at - now_ms + DAY_END_MARGIN_MS;
        (wait, day_end_at(ends, now_ms + wait))
    } else {
        (0, at)
    }
}

/// One list write: values to push (oldest first) and when the key expires. The key
/// (prefix and id) is held inline up to 24 bytes, as receivers' are: no allocation per
/// list.
#[derive(Debug)]
pub struct ListWrite {
    pub key: CompactString,
    pub expiry: Expiry,
    pub values: TraceValues,
}

/// One hash write: increments and the key's TTL.
#[derive(Debug)]
pub struct HashWrite {
    pub key: String,
    pub ttl_ms: i64,
    pub fields: Vec<(String, i64)>,
}

impl ListWrite {
    /// Redis's work: a value pushed costs about what a command does.
    pub fn ops(&self) -> usize {
        self.values.len() + self.values.len().div_ceil(1000) + 1
    }
}

impl HashWrite {
    pub fn ops(&self) -> usize {
        self.fields.len() + 1
    }
}

/// The writes of one key-hash unit.
#[derive(Debug, Default)]
pub struct UnitWrites {
    pub lists: Vec<ListWrite>,
    pub hashes: Vec<HashWrite>,
}

impl UnitWrites {
    pub fn ops(&self) -> usize {
        self.lists.iter().map(ListWrite::ops).sum::<usize>()
            + self.hashes.iter().map(HashWrite::ops).sum::<usize>()
    }
}

/// What only the final script of a commit carries.
#[derive(Clone, Copy, Debug)]
pub struct FinalTail<'a> {
    /// Window-series increments applied by the final script itself.
    pub series: &'a [HashWrite],
    /// Window-series increments too many for the final script: staged by it and
    /// applied by `unstage` scripts after it (`protocol/staged.rs`).
    pub staged: Option<Staged<'a>>,
    /// Per partition, the open series windows after this commit.
    pub windows: &'a BTreeMap<i32, String>,
    /// Keys not written (they fall in anchorflow's reserved prefix) and the values
    /// each lost: reported as conflicts.
    pub refused: &'a [(String, i64)],
}

/// Series a final script stages instead of applying (`redis_commit.lua`'s header).
#[derive(Clone, Copy, Debug)]
pub struct Staged<'a> {
    /// The staging list, named after the commit ([`FenceKeys::staged_list`]).
    pub list: &'a str,
    /// The set of staging lists not yet unstaged ([`FenceKeys::staged`]).
    pub pending: &'a str,
    /// One item per `unstage` script (`protocol/staged.rs`, `staged_batch`).
    pub batches: &'a [String],
}

/// `redis_commit.lua`: one script of a Redis sink commit.
pub struct CommitArgs<'a> {
    /// The checkpoint committed (`fence_check.lua`: tells an empty range's commit from
    /// its retry).
    pub checkpoint: u64,
    pub ranges: &'a [FenceRange],
    pub mode: Mode,
    pub units_prefix: &'a str,
    pub conflicts_ttl_ms: i64,
    pub units: &'a [(u16, UnitWrites)],
    /// Present exactly when `mode` is [`Mode::Final`].
    pub tail: Option<FinalTail<'a>>,
}

/// One class's lists: the single-value ones as key and value, then the others as key,
/// n and n values.
fn push_lists<'a>(args: &mut Args, lists: impl Iterator<Item = &'a ListWrite> + Clone) {
    let single = |list: &&ListWrite| list.values.len() == 1;
    args.push_int(lists.clone().filter(single).count());
    for list in lists.clone().filter(single) {
        args.push_str(&list.key);
        args.push_value(&list.values[0]);
    }
    let others = lists.filter(|list| list.values.len() != 1);
    args.push_int(others.clone().count());
    for list in others {
        args.push_str(&list.key);
        args.counted(&list.values, |args, value| args.push_value(value));
    }
}

fn push_hashes(args: &mut Args, hashes: &[HashWrite]) {
    args.counted(hashes, |args, hash| {
        args.push_str(&hash.key);
        args.push_int(hash.ttl_ms);
        args.counted(&hash.fields, |args, (field, n)| {
            args.push_str(field);
            args.push_int(*n);
        });
    });
}

impl CommitArgs<'_> {
    pub fn encode(&self) -> Args {
        let mut args = Args::fenced(SinkKind::Redis, self.checkpoint, self.ranges);
        args.push(self.mode.name());
        args.push(self.units_prefix);
        args.push(self.conflicts_ttl_ms);
        // The lists' expiry classes, then per unit its lists class by class
        // (`redis_commit.lua` has the layout).
        let classes: BTreeSet<Expiry> = self
            .units
            .iter()
            .flat_map(|(_, unit)| unit.lists.iter().map(|list| list.expiry))
            .collect();
        args.push(classes.len());
        for expiry in &classes {
            args.push(expiry);
        }
        args.counted(self.units, |args, (id, unit)| {
            args.push_int(*id);
            for &expiry in &classes {
                push_lists(args, unit.lists.iter().filter(|l| l.expiry == expiry));
            }
            push_hashes(args, &unit.hashes);
        });
        if let Some(tail) = self.tail {
            push_hashes(&mut args, tail.series);
            match tail.staged {
                Some(staged) => {
                    args.push(staged.list);
                    args.push(staged.pending);
                    args.counted(staged.batches, |args, batch| args.push(batch));
                }
                None => {
                    args.push("");
                    args.push("");
                    args.push(0);
                }
            }
            args.push(tail.windows.len());
            for (partition, state) in tail.windows {
                args.push(series_field(*partition));
                args.push(state);
            }
            args.counted(tail.refused, |args, (key, lost)| {
                args.push(key);
                args.push(lost);
            });
        }
        args.finish()
    }
}

/// The commit script's `EVALSHA` with its keys and `args` ([`CommitArgs::encode`]) as one
/// command: each argument is copied once, into the command's buffer, where an
/// invocation first copies each into an allocation of its own. The caller loads the
/// script when Redis answers `NOSCRIPT`.
pub fn commit_command(script: &redis::Script, keys: &FenceKeys, args: &Args) -> redis::Cmd {
    let keys = keys.commit_keys();
    let mut command = redis::Cmd::with_capacity(args.len() + 7, args.text_len() + 256);
    command
        .arg("EVALSHA")
        .arg(script.get_hash())
        .arg(keys.len());
    for key in keys {
        command.arg(key);
    }
    for arg in args.iter() {
        command.arg(arg);
    }
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_ends_are_the_first_ahead_and_near_midnight_wait_past_it() {
        let ends = [10 * DAY_MS, 11 * DAY_MS];
        assert_eq!(day_end_at(ends, 10 * DAY_MS - 5), 10 * DAY_MS);
        assert_eq!(day_end_at(ends, 10 * DAY_MS), 11 * DAY_MS);
        assert_eq!(day_end_at(ends, 11 * DAY_MS + 3), 12 * DAY_MS);
        assert_eq!(day_end_at(ends, 13 * DAY_MS), 14 * DAY_MS);
        assert_eq!(day_end_wait(ends, 9 * DAY_MS), (0, 10 * DAY_MS));
        let near = 10 * DAY_MS - DAY_END_MARGIN_MS;
        assert_eq!(
            day_end_wait(ends, near),
            (2 * DAY_END_MARGIN_MS, 11 * DAY_MS),
            "a second before midnight: wait until a second after, then the next day"
        );
    }

    use crate::logic::decode::TraceValue;
    use crate::protocol::scripts::END;

    fn list(key: &str, expiry: Expiry, timestamps: &[i64]) -> ListWrite {
        let values = timestamps
            .iter()
            .map(|&timestamp| TraceValue {
                state: 60,
                business_id: 7,
                timestamp,
            })
            .collect();
        ListWrite {
            key: key.into(),
            expiry,
            values,
        }
    }

    /// The lists' expiries go once per script (one class per expiry), and a
    /// single-value list is its key and value: two arguments, not four
    /// (`redis_commit.lua` reads them).
    #[test]
    fn lists_are_written_by_expiry_class_and_single_values_without_a_count() {
        let day_end = Expiry::DayEnd([5_000, 86_405_000]);
        let unit = UnitWrites {
            lists: vec![
                list("r1", day_end, &[1]),
                list("m1", Expiry::After(900), &[2, 3]),
                list("r2", day_end, &[4]),
            ],
            hashes: Vec::new(),
        };
        let units = [(7u16, unit)];
        let args = CommitArgs {
            checkpoint: 1,
            ranges: &[],
            mode: Mode::Part,
            units_prefix: "u:",
            conflicts_ttl_ms: 10,
            units: &units,
            tail: None,
        }
        .encode();
        let all: Vec<&str> = args.iter().collect();
        let own = all
            .iter()
            .position(|a| *a == "part")
            .expect("the mode argument");
        let value = |t: i64| {
            TraceValue {
                state: 60,
                business_id: 7,
                timestamp: t,
            }
            .to_json()
        };
        let (v1, v2, v3, v4) = (value(1), value(2), value(3), value(4));
        let expected = [
            "part",
            "u:",
            "10", // mode, unit-fence prefix, conflicts' TTL
            "2",
            "900",
            "at:5000:86405000", // two expiry classes
            "1",
            "7", // one unit, its id
            "0",
            "1",
            "m1",
            "2",
            &v2,
            &v3, // class 900 ms: no singles, one list of two
            "2",
            "r1",
            &v1,
            "r2",
            &v4,
            "0", // class day end: two singles, no others
            "0",
            END, // no hashes
        ];
        assert_eq!(&all[own..], expected);
    }
}
