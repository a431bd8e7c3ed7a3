//! One script of a commit plan as a `WATCH`/`MULTI`/`EXEC` transaction of plain
//! commands (`redis.commit = "transaction"`): the same writes, fences and
//! reply as `scripts/redis_commit.lua`, at the cost of the commands themselves, where
//! every write a script makes costs Redis a Lua call on top (`docs/benchmarks.md`).
//!
//! Two round trips per script ([`SinkConnection::transact`](super::client::SinkConnection::transact)):
//!
//! 1. `WATCH` the fences hash and every range's unit-fence hash, read them, and read
//!    Redis's clock. The fence check ([`crate::protocol::verdict`], the same as
//!    `fence_check.lua`'s) runs here, on what was read.
//! 2. `MULTI`, the writes built at planning time ([`Transaction`]), the unit fences or
//!    the fences moved, `EXEC`. Redis runs it only if nothing watched changed since the
//!    read (another sink's commit, a claim): otherwise `EXEC` answers nil, nothing was
//!    written, and the round trips start over.
//!
//! What the script guarantees, the transaction keeps, step by step: the fence check,
//! out of memory, refused writes, keys of another type (found first, by
//! `client/transact.rs`, and left out whole), and receiver lists that expire at their
//! day's end by Redis's clock (an absolute `PEXPIREAT`, guarded by a watched deadline
//! key): `docs/exactly-once.md`, "Transactions". The commands are built in
//! `transaction/builder.rs`.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use anyhow::Context as _;
use redis::Value;

use crate::checkpoint::claim::{FenceRange, SinkKind};
use crate::protocol::commit_args::{day_end_at, FinalTail, Mode, UnitWrites};
use crate::protocol::keys::FenceKeys;
use crate::protocol::reply::Conflict;
use crate::protocol::verdict::{self, StoredFence};

mod builder;
mod commands;
use builder::{expire_at, Builder};
use commands::Commands;

/// Values per `LPUSH` or `RPUSH` (as the script pushes them).
const PUSH_CHUNK: usize = 1_000;

/// What one command of a transaction is, to read its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    /// `LPUSH` of this many values.
    Push(u32),
    /// `PEXPIRE` of the key written before it.
    Expire,
    /// `PEXPIREAT` at the first day end still ahead when it runs, of the pair
    /// [`Transaction::day_ends`] holds at this index (with the instant it was built
    /// for).
    DayEnd(u32),
    /// `HINCRBY` by this much.
    Incr(i64),
    /// anchorflow's own keys (window states, staged series).
    Bookkeeping,
}

/// The writes of one part or final script, as commands, built with the plan (on the
/// blocking pool, off the sink's thread), and the commit they belong to.
#[derive(Debug)]
pub struct Transaction {
    pub commit: Commit,
    commands: Commands,
    /// How to read each command's answer.
    entries: Vec<Entry>,
    /// The day ends of the lists, each with the instant its `PEXPIREAT` was built for.
    day_ends: Vec<([i64; 2], i64)>,
    /// The script's units in order, each with the range of its commands.
    units: Vec<(u16, Range<u32>)>,
    /// Every data key written, with its commands.
    keys: Vec<KeyWrites>,
}

/// The commands of one data key, which all go or all stay.
#[derive(Debug)]
struct KeyWrites {
    /// [`key_hash`] of the key.
    hash: u64,
    /// A list (else a hash).
    list: bool,
    commands: Range<u32>,
    /// Values (list items or increments) the writes carry.
    lost: i64,
}

/// What a key is known by to the sink's connection (keys it saw hold the type it
/// writes).
pub fn key_hash(key: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = rustc_hash::FxHasher::default();
    key.hash(&mut hasher);
    hasher.finish()
}

/// A refusal's reason, as `redis_commit.lua`'s `conflict` names it.
fn reason(error: &redis::ServerError) -> &'static str {
    let text = format!("{} {}", error.code(), error.details().unwrap_or(""));
    if text.contains("WRONGTYPE") {
        "wrong_type"
    } else if text.contains("not an integer") {
        "not_an_integer"
    } else if text.contains("overflow") {
        "overflow"
    } else {
        "other"
    }
}

/// What step 1 read.
#[derive(Debug)]
pub struct Read {
    pub fences: Vec<StoredFence>,
    /// Each range's unit-fence hash.
    pub unit_fences: Vec<BTreeMap<String, String>>,
    /// Redis's clock, in Unix ms.
    pub now_ms: i64,
}

/// What an applied transaction did: writes that applied, and those refused.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub ops: i64,
    pub conflicts: Vec<Conflict>,
}

/// The commit one transaction belongs to.
#[derive(Clone, Debug)]
pub struct Commit {
    pub checkpoint: u64,
    pub ranges: Vec<FenceRange>,
    pub mode: Mode,
    /// Keys the plan refused to write (they fall in anchorflow's reserved prefix) and
    /// the values each lost: a final reports them as conflicts.
    pub refused: Vec<(String, i64)>,
    /// Of the conflicts hash, in ms.
    pub conflicts_ttl_ms: i64,
}

impl Transaction {
    /// The writes of `units` and, for a final script, of its `tail`; lists expiring at
    /// a day's end are built for the one ahead at `now_ms` (the sink's estimate of
    /// Redis's clock), and rebuilt if Redis's clock says otherwise when they run.
    pub fn build(
        commit: Commit,
        units: &[(u16, UnitWrites)],
        tail: Option<&FinalTail<'_>>,
        keys: &FenceKeys,
        now_ms: i64,
    ) -> Transaction {
        let mut builder = Builder::default();
        let mut spans = Vec::with_capacity(units.len());
        for (id, unit) in units {
            let first = builder.commands.len() as u32;
            builder.unit(unit, now_ms);
            spans.push((*id, first..builder.commands.len() as u32));
        }
        if let Some(tail) = tail {
            builder.tail(tail, keys);
        }
        Transaction {
            commit,
            commands: builder.commands,
            entries: builder.entries,
            day_ends: builder.day_ends,
            units: spans,
            keys: builder.keys,
        }
    }

    /// The day ends its lists expire at (one per commit in practice).
    pub fn day_ends(&self) -> BTreeSet<[i64; 2]> {
        self.day_ends.iter().map(|(ends, _)| *ends).collect()
    }

    /// The heap it holds, in bytes: what a plan holds it by until it commits.
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        self.commands.heap_bytes()
            + self.entries.capacity() * size_of::<Entry>()
            + self.keys.capacity() * size_of::<KeyWrites>()
            + self.units.capacity() * size_of::<(u16, Range<u32>)>()
    }

    fn unit_ids(&self) -> Vec<u16> {
        self.units.iter().map(|(id, _)| *id).collect()
    }

    /// The keys (by index) `known` does not hold: their type is checked first.
    pub fn unknown_keys(&self, known: &rustc_hash::FxHashSet<u64>) -> Vec<usize> {
        (0..self.keys.len())
            .filter(|&k| !known.contains(&self.keys[k].hash))
            .collect()
    }

    /// The name of key `k`.
    pub fn key_name(&self, k: usize) -> String {
        self.commands.key(self.keys[k].commands.start as usize)
    }

    /// Whether `TYPE`'s answer for key `k` lets its writes go: none yet, or the type
    /// they write.
    pub fn writable(&self, k: usize, type_name: &str) -> bool {
        let own = if self.keys[k].list { "list" } else { "hash" };
        type_name == "none" || type_name == own
    }

    /// The keys whose writes all applied (none refused), by [`key_hash`]: the
    /// connection knows them from now on.
    pub fn applied_keys<'a>(
        &'a self,
        sent: &'a [usize],
        answers: &'a [Value],
    ) -> impl Iterator<Item = u64> + 'a {
        let refused: BTreeSet<usize> = answers
            .iter()
            .zip(sent)
            .filter(|(answer, _)| matches!(answer, Value::ServerError(_)))
            .map(|(_, &n)| n)
            .collect();
        let sent: BTreeSet<usize> = sent.iter().copied().collect();
        self.keys
            .iter()
            .filter(move |key| {
                let mut commands = key.commands.start as usize..key.commands.end as usize;
                sent.contains(&commands.start) && !commands.any(|n| refused.contains(&n))
            })
            .map(|key| key.hash)
    }

    /// Step 1: watch and read the fences (and the deadline key, when given: its name
    /// and the instant it expires at), and Redis's clock.
    pub fn read_step(&self, keys: &FenceKeys, deadline: Option<(&str, i64)>) -> redis::Pipeline {
        let commit = &self.commit;
        let mut pipe = redis::pipe();
        if let Some((key, at)) = deadline {
            pipe.cmd("SET").arg(key).arg(1).arg("PXAT").arg(at).ignore();
        }
        let watch = pipe.cmd("WATCH").arg(&keys.fences);
        for range in &commit.ranges {
            watch.arg(format!("{}{}", keys.units_prefix, range.partition));
        }
        if let Some((key, _)) = deadline {
            watch.arg(key);
        }
        watch.ignore();
        if !commit.ranges.is_empty() {
            let fields = pipe.cmd("HMGET").arg(&keys.fences);
            for range in &commit.ranges {
                for field in verdict::fence_fields(SinkKind::Redis, range.partition) {
                    fields.arg(field);
                }
            }
        }
        for range in &commit.ranges {
            pipe.cmd("HGETALL")
                .arg(format!("{}{}", keys.units_prefix, range.partition));
        }
        pipe.cmd("TIME");
        pipe
    }

    /// Reads step 1's answers (those [`Transaction::read_step`] did not ignore).
    pub fn read(&self, values: Vec<Value>) -> anyhow::Result<Read> {
        let commit = &self.commit;
        let mut values = values.into_iter();
        let mut next = |what: &str| values.next().with_context(|| format!("no {what} read"));
        let mut fences = Vec::with_capacity(commit.ranges.len());
        if !commit.ranges.is_empty() {
            let stored: Vec<Option<String>> =
                redis::from_redis_value(next("fences")?).context("the fences read")?;
            anyhow::ensure!(
                stored.len() == 3 * commit.ranges.len(),
                "{} fence fields read",
                stored.len()
            );
            let mut stored = stored.into_iter();
            for _ in &commit.ranges {
                fences.push(StoredFence {
                    epoch: stored.next().flatten(),
                    fence: stored.next().flatten(),
                    last: stored.next().flatten(),
                });
            }
        }
        let mut unit_fences = Vec::with_capacity(commit.ranges.len());
        for _ in &commit.ranges {
            unit_fences.push(
                redis::from_redis_value(next("unit fences")?).context("the unit fences read")?,
            );
        }
        let (secs, micros): (i64, i64) =
            redis::from_redis_value(next("time")?).context("redis's TIME")?;
        Ok(Read {
            fences,
            unit_fences,
            now_ms: secs * 1000 + micros / 1000,
        })
    }

    /// The units of a `part` that are there already (a replay): left out of step 2.
    pub fn applied_units(&self, read: &Read) -> BTreeSet<u16> {
        if self.commit.mode != Mode::Part {
            return BTreeSet::new();
        }
        verdict::applied_units(&self.unit_ids(), &self.commit.ranges, &read.unit_fences)
    }

    /// Command `n` as sent at `now_ms` by Redis's clock: a list's day end rebuilt if
    /// that clock says another is ahead.
    fn command(&self, n: usize, entry: Entry, now_ms: i64) -> redis::Cmd {
        if let Entry::DayEnd(index) = entry {
            let (ends, at) = self.day_ends[index as usize];
            let now_at = day_end_at(ends, now_ms);
            if now_at != at {
                return expire_at(self.commands.key(n).as_bytes(), now_at);
            }
        }
        self.commands.to_cmd(n)
    }

    /// Step 2: `MULTI`, the writes (but those of `skip`; lists at a day's end at the
    /// one ahead at `now_ms`), then the unit fences of a part, or a final's fences
    /// moved and the unit fences it passed, and `EXEC`. Also returns how many of its
    /// commands are writes of the data (they come first).
    pub fn write_step(
        &self,
        keys: &FenceKeys,
        read: &Read,
        skip: &BTreeSet<u16>,
        foreign: &BTreeSet<usize>,
    ) -> (redis::Pipeline, Vec<usize>) {
        let commit = &self.commit;
        let mut pipe = redis::pipe();
        pipe.atomic().ignore_errors();
        let mut sent = Vec::with_capacity(self.commands.len());
        let skipped: Vec<&Range<u32>> = self
            .units
            .iter()
            .filter(|(id, _)| skip.contains(id))
            .map(|(_, commands)| commands)
            .chain(foreign.iter().map(|&k| &self.keys[k].commands))
            .collect();
        for (n, entry) in self.entries.iter().enumerate() {
            if skipped
                .iter()
                .any(|commands| commands.contains(&(n as u32)))
            {
                continue;
            }
            pipe.add_command(self.command(n, *entry, read.now_ms));
            sent.push(n);
        }
        match commit.mode {
            Mode::Part => {
                if let Some(field) = verdict::part_field(&self.unit_ids()) {
                    for (range, stored) in commit.ranges.iter().zip(&read.unit_fences) {
                        if verdict::raises(stored, &field, range) {
                            pipe.cmd("HSET")
                                .arg(format!("{}{}", keys.units_prefix, range.partition))
                                .arg(&field)
                                .arg(range.to);
                        }
                    }
                }
            }
            Mode::Final => {
                if !commit.ranges.is_empty() {
                    let at = read.now_ms.to_string();
                    let fences = pipe.cmd("HSET").arg(&keys.fences);
                    for range in &commit.ranges {
                        let p = range.partition;
                        fences
                            .arg(format!("redis:{p}"))
                            .arg(range.to)
                            .arg(format!("redis-checkpoint:{p}"))
                            .arg(format!("{}:{}", range.epoch, commit.checkpoint))
                            .arg(format!("redis-at:{p}"))
                            .arg(&at);
                    }
                }
                for (range, stored) in commit.ranges.iter().zip(&read.unit_fences) {
                    let passed = verdict::passed_fields(stored, range);
                    if !passed.is_empty() {
                        pipe.cmd("HDEL")
                            .arg(format!("{}{}", keys.units_prefix, range.partition))
                            .arg(passed);
                    }
                }
            }
            Mode::Unstage => {}
        }
        (pipe, sent)
    }

    /// Reads `EXEC`'s answers: `sent` are the indexes of the commands step 2 sent,
    /// first in it; what follows them is anchorflow's bookkeeping, whose refusal is
    /// reported as a conflict too (it cannot be undone: the fences moved with it).
    /// The `foreign` keys, left out, are conflicts with all they carried, and so are a
    /// final's keys refused at planning (`reserved_key`).
    pub fn outcome(&self, sent: &[usize], answers: &[Value], foreign: &BTreeSet<usize>) -> Outcome {
        let mut outcome = Outcome::default();
        for &k in foreign {
            outcome.conflicts.push(Conflict {
                key: self.key_name(k),
                reason: "wrong_type".into(),
                lost: self.keys[k].lost,
            });
        }
        for (at, answer) in answers.iter().enumerate() {
            let entry = sent.get(at).map(|&n| self.entries[n]);
            let Value::ServerError(error) = answer else {
                // The script's figure: the writes of the data that applied.
                if entry.is_some_and(|e| e != Entry::Bookkeeping) {
                    outcome.ops += 1;
                }
                continue;
            };
            let (key, lost) = match sent.get(at) {
                Some(&n) => {
                    let lost = match self.entries[n] {
                        Entry::Push(values) => values as i64,
                        Entry::Incr(n) => n,
                        _ => 0,
                    };
                    (self.commands.key(n), lost)
                }
                None => (format!("(bookkeeping: {error})"), 0),
            };
            let reason = reason(error);
            // A list's later chunks are refused for the same reason: one conflict.
            match outcome.conflicts.last_mut() {
                Some(last) if last.key == key && last.reason == reason && lost > 0 => {
                    last.lost += lost;
                }
                _ => outcome.conflicts.push(Conflict {
                    key,
                    reason: reason.to_string(),
                    lost,
                }),
            }
        }
        if self.commit.mode == Mode::Final {
            let refused = self.commit.refused.iter().map(|(key, lost)| Conflict {
                key: key.clone(),
                reason: "reserved_key".into(),
                lost: *lost,
            });
            outcome.conflicts.extend(refused);
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logic::decode::TraceValue;
    use crate::protocol::commit_args::{Expiry, HashWrite, ListWrite, DAY_MS};
    use std::collections::BTreeMap;

    fn value(timestamp: i64) -> TraceValue {
        TraceValue {
            state: 10,
            business_id: 9,
            timestamp,
        }
    }

    fn units() -> Vec<(u16, UnitWrites)> {
        let list = |key: &str, n: i64, expiry| ListWrite {
            key: key.into(),
            expiry,
            values: (0..n).map(value).collect(),
        };
        let ends = [10 * DAY_MS, 11 * DAY_MS];
        vec![
            (
                3,
                UnitWrites {
                    lists: vec![list("r1", 1, Expiry::DayEnd(ends))],
                    hashes: vec![HashWrite {
                        key: "t9".into(),
                        ttl_ms: 500,
                        fields: vec![("10".into(), 2), ("20".into(), 1)],
                    }],
                },
            ),
            (
                8,
                UnitWrites {
                    lists: vec![list("m1", 2_500, Expiry::After(900))],
                    hashes: vec![],
                },
            ),
        ]
    }

    fn commit(ranges: Vec<FenceRange>, mode: Mode) -> Commit {
        Commit {
            checkpoint: 4,
            ranges,
            mode,
            refused: vec![],
            conflicts_ttl_ms: 1_000,
        }
    }

    fn names(pipe: &redis::Pipeline) -> Vec<String> {
        pipe.cmd_iter()
            .map(|c| match c.args_iter().next() {
                Some(redis::Arg::Simple(name)) => String::from_utf8_lossy(name).into_owned(),
                _ => String::new(),
            })
            .collect()
    }

    /// A part's writes, its units' fences, and the replay that leaves a unit out.
    #[test]
    fn a_part_writes_its_units_and_records_its_span() {
        let keys = FenceKeys::new("g", "t");
        let ranges = vec![FenceRange {
            partition: 0,
            epoch: 2,
            from: 5,
            to: 9,
        }];
        let tx = Transaction::build(
            commit(ranges, Mode::Part),
            &units(),
            None,
            &keys,
            9 * DAY_MS,
        );
        let read = Read {
            fences: vec![],
            unit_fences: vec![BTreeMap::new()],
            now_ms: 9 * DAY_MS,
        };
        let (pipe, sent) = tx.write_step(&keys, &read, &BTreeSet::new(), &BTreeSet::new());
        assert_eq!(
            names(&pipe),
            [
                "LPUSH",
                "PEXPIREAT",
                "HINCRBY",
                "HINCRBY",
                "PEXPIRE",
                "LPUSH",
                "LPUSH",
                "LPUSH",
                "PEXPIRE",
                "HSET"
            ]
        );
        assert_eq!(sent.len(), 9);
        let replay = tx.applied_units(&Read {
            fences: vec![],
            unit_fences: vec![BTreeMap::from([("3-3".to_string(), "9".to_string())])],
            now_ms: read.now_ms,
        });
        assert_eq!(replay, BTreeSet::from([3]));
        let (pipe, _) = tx.write_step(&keys, &read, &replay, &BTreeSet::new());
        assert_eq!(
            names(&pipe),
            ["LPUSH", "LPUSH", "LPUSH", "PEXPIRE", "HSET"],
            "unit 3 left out, the span recorded"
        );
    }

    /// A plan holds its transactions until they commit, counted in the memory budget
    /// as a script's arguments are: on keys with one value each (the most commands per
    /// value), a transaction holds little more than its arguments' bytes.
    #[test]
    fn a_transaction_holds_about_the_bytes_of_its_arguments() {
        let keys = FenceKeys::new("g", "t");
        let lists = (0..2_000)
            .map(|n| ListWrite {
                key: format!("Austin:MessageId:{n:012}").into(),
                expiry: Expiry::After(259_200_000),
                values: vec![value(1_700_000_000_000 + n)].into_iter().collect(),
            })
            .collect();
        let units = vec![(
            0,
            UnitWrites {
                lists,
                hashes: vec![],
            },
        )];
        let tx = Transaction::build(commit(vec![], Mode::Part), &units, None, &keys, DAY_MS);
        let read = Read {
            fences: vec![],
            unit_fences: vec![],
            now_ms: DAY_MS,
        };
        let (pipe, _) = tx.write_step(&keys, &read, &BTreeSet::new(), &BTreeSet::new());
        let argument_bytes: usize = pipe
            .cmd_iter()
            .flat_map(|c| c.args_iter())
            .map(|a| match a {
                redis::Arg::Simple(a) => a.len(),
                _ => 0,
            })
            .sum();
        let held = tx.heap_bytes();
        assert!(
            held < 3 * argument_bytes,
            "{held} bytes held for {argument_bytes} bytes of arguments"
        );
    }

    /// Redis's clock past the planned day end: the lists get the next one.
    #[test]
    fn lists_planned_before_midnight_and_written_after_get_the_next_day_end() {
        let keys = FenceKeys::new("g", "t");
        let tx = Transaction::build(
            commit(vec![], Mode::Final),
            &units(),
            None,
            &keys,
            10 * DAY_MS - 60_000,
        );
        let read = Read {
            fences: vec![],
            unit_fences: vec![],
            now_ms: 10 * DAY_MS + 5,
        };
        let (pipe, _) = tx.write_step(&keys, &read, &BTreeSet::new(), &BTreeSet::new());
        let expire = pipe.cmd_iter().nth(1).unwrap();
        let args: Vec<String> = expire
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(a) => String::from_utf8_lossy(a).into_owned(),
                _ => String::new(),
            })
            .collect();
        assert_eq!(args, ["PEXPIREAT", "r1", &(11 * DAY_MS).to_string()]);
    }

    /// Refusals map to the script's conflicts: a list's chunks as one, with every value
    /// it lost; an increment with its amount.
    #[test]
    fn refused_writes_are_conflicts_with_what_they_lost() {
        let keys = FenceKeys::new("g", "t");
        let tx = Transaction::build(
            commit(vec![], Mode::Part),
            &units(),
            None,
            &keys,
            9 * DAY_MS,
        );
        let sent: Vec<usize> = (0..9).collect();
        let error =
            |text: &str| redis::parse_redis_value(format!("-{text}\r\n").as_bytes()).unwrap();
        let wrong = || error("WRONGTYPE Operation against a key holding the wrong kind of value");
        let mut answers = vec![Value::Int(1); 9];
        answers[2] = error("ERR hash value is not an integer");
        answers[5] = wrong();
        answers[6] = wrong();
        answers[7] = wrong();
        let outcome = tx.outcome(&sent, &answers, &BTreeSet::new());
        assert_eq!(outcome.ops, 5);
        assert_eq!(
            outcome.conflicts,
            vec![
                Conflict {
                    key: "t9".into(),
                    reason: "not_an_integer".into(),
                    lost: 2
                },
                Conflict {
                    key: "m1".into(),
                    reason: "wrong_type".into(),
                    lost: 2_500
                },
            ]
        );
    }
}
