//! The Lua scripts anchorflow runs in Redis (`scripts/*.lua`) and their contracts: per
//! script, a typed builder that writes the arguments in the order the script reads
//! them, the keys it is invoked with, and its reply as a Rust type.
//!
//! | script | arguments | keys | reply |
//! |---|---|---|---|
//! | `claim.lua` | [`ClaimArgs`](crate::protocol::claim_script::ClaimArgs) | fences, lost | [`ClaimReply`](crate::protocol::claim_script::ClaimReply) |
//! | `fence_check.lua` + `redis_commit.lua` | [`CommitArgs`], [`staged::PublishArgs`](crate::protocol::staged::PublishArgs) | fences, lost, windows, conflicts | [`Reply`] |
//! | `fence_check.lua` + `warehouse_record.lua` | [`RecordArgs`] | fences, lost, publish, windows, folders, committed, wm | [`Reply`] |
//! | `lease.lua` | [`LeaseArgs`] | the lease | the holder left in place, if not us |
//!
//! Every script starts with `args.lua`: it reads `ARGV` through a cursor and, before
//! its first write, checks that the cursor ends exactly on the [`END`] marker that
//! [`Args::finish`] appends. A builder and a script that disagree therefore fail the
//! call with nothing written, never misread. `tests/protocol.rs` runs every builder
//! against its script on a real Redis.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use compact_str::CompactString;

use crate::checkpoint::claim::{FenceRange, SinkKind};
use crate::logic::decode::{TraceValue, TraceValues};
use crate::protocol::keys::{dws_field, series_field, FenceKeys};
use crate::protocol::publish::PublishRecord;
use crate::protocol::reply::{self, Reply};

/// The last argument of every call (see `scripts/args.lua`).
pub const END: &str = ".end";

const ARGS: &str = include_str!("scripts/args.lua");
const FENCE_CHECK: &str = include_str!("scripts/fence_check.lua");

fn script(parts: &[&str]) -> redis::Script {
    redis::Script::new(&parts.concat())
}

/// `claim.lua`.
pub fn claim_script() -> redis::Script {
    script(&[ARGS, include_str!("scripts/claim.lua")])
}

/// The Redis sink's commit: the fence check, then `redis_commit.lua`.
pub fn commit_script() -> redis::Script {
    script(&[ARGS, FENCE_CHECK, include_str!("scripts/redis_commit.lua")])
}

/// The warehouse sink's record: the fence check, then `warehouse_record.lua`.
pub fn record_script() -> redis::Script {
    script(&[
        ARGS,
        FENCE_CHECK,
        include_str!("scripts/warehouse_record.lua"),
    ])
}

/// `lease.lua`.
pub fn lease_script() -> redis::Script {
    script(&[ARGS, include_str!("scripts/lease.lua")])
}

/// The arguments of one call, in the order its script reads them: one buffer and where
/// each argument ends, so that a big commit's tens of thousands of arguments are not as
/// many allocations, and go into the command with one copy ([`commit_command`]).
#[derive(Debug, Default)]
pub struct Args {
    text: String,
    ends: Vec<usize>,
}

impl Args {
    /// Starts the arguments of a fenced commit: the sink, the checkpoint and its
    /// ranges, which `fence_check.lua` reads.
    pub fn fenced(sink: SinkKind, checkpoint: u64, ranges: &[FenceRange]) -> Self {
        let mut args = Args::default();
        args.push(sink.name());
        args.push(checkpoint);
        args.push(ranges.len());
        for range in ranges {
            for value in [range.partition as i64, range.epoch, range.from, range.to] {
                args.push(value);
            }
        }
        args
    }

    pub fn push(&mut self, value: impl std::fmt::Display) {
        use std::fmt::Write as _;
        write!(self.text, "{value}").expect("a String takes any text");
        self.ends.push(self.text.len());
    }

    /// The arguments a commit has by the hundred thousand (keys, values, counts) go in
    /// without `fmt`'s machinery, which cost the pipeline a tenth of its CPU on funnel
    /// data (docs/benchmarks.md).
    pub fn push_str(&mut self, value: &str) {
        self.text.push_str(value);
        self.ends.push(self.text.len());
    }

    pub fn push_int(&mut self, value: impl itoa::Integer) {
        self.push_str(itoa::Buffer::new().format(value));
    }

    pub fn push_value(&mut self, value: &TraceValue) {
        value.write_json(&mut self.text);
        self.ends.push(self.text.len());
    }

    /// A count, then each item as `write` puts it.
    pub fn counted<T>(&mut self, items: &[T], mut write: impl FnMut(&mut Args, &T)) {
        self.push_int(items.len());
        for item in items {
            write(self, item);
        }
    }

    /// The arguments, closed with [`END`].
    pub fn finish(mut self) -> Args {
        self.push(END);
        self
    }

    /// Each argument, in order.
    pub fn iter(&self) -> impl Iterator<Item = &str> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter().copied())
            .map(|(start, end)| &self.text[start..end])
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

/// Adds `args` to an invocation.
pub(crate) fn with_args<'a>(
    mut invocation: redis::ScriptInvocation<'a>,
    args: &Args,
) -> redis::ScriptInvocation<'a> {
    for arg in args.iter() {
        invocation.arg(arg);
    }
    invocation
}

/// Runs a script whose reply is a [`Reply`] on a blocking connection (loading it when
/// Redis does not have it).
pub(crate) fn invoke_fenced(
    script: &redis::Script,
    conn: &mut redis::Connection,
    keys: &[&String],
    args: &Args,
    what: &'static str,
) -> anyhow::Result<Reply> {
    let mut invocation = script.prepare_invoke();
    for key in keys {
        invocation.key(*key);
    }
    let value: redis::Value = with_args(invocation, args).invoke(conn).context(what)?;
    reply::parse(&value)
}

/// Whether a commit script only applies units (`part`), also moves the fences
/// (`final`), or applies series a final staged (`publish`, after the final).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Part,
    Final,
    Publish,
}

impl Mode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Part => "part",
            Mode::Final => "final",
            Mode::Publish => "publish",
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
    /// applied by `publish` scripts after it (`protocol/staged.rs`).
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
    /// The set of staging lists not yet published ([`FenceKeys::staged`]).
    pub pending: &'a str,
    /// One item per `publish` script (`protocol/staged.rs`, `staged_batch`).
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
    let mut command = redis::Cmd::with_capacity(args.len() + 7, args.text.len() + 256);
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

/// `warehouse_record.lua`: records one warehouse commit.
pub struct RecordArgs<'a> {
    /// The checkpoint whose files these are (as in [`CommitArgs`]).
    pub checkpoint: u64,
    pub ranges: &'a [FenceRange],
    /// The files to publish; a record without files stores no publish entry.
    pub record: &'a PublishRecord,
    /// Folders that received rows: they await their partition commit.
    pub folders: &'a BTreeSet<String>,
    /// The checkpoint's watermark, stored for every partition of `ranges`.
    pub watermark: Option<i64>,
    /// Per partition, the open `dws_template_state_1m` windows after this commit.
    pub states: &'a BTreeMap<i32, String>,
}

impl RecordArgs<'_> {
    pub fn encode(&self) -> Args {
        let mut args = Args::fenced(SinkKind::Warehouse, self.checkpoint, self.ranges);
        args.push(&self.record.id);
        if self.record.files.is_empty() {
            args.push("");
        } else {
            args.push(self.record.encode());
        }
        args.push(self.folders.len());
        for folder in self.folders {
            args.push(folder);
        }
        args.push(
            self.watermark
                .map_or_else(|| "-".to_string(), |w| w.to_string()),
        );
        args.counted(self.ranges, |args, range| args.push(range.partition));
        args.push(self.states.len());
        for (partition, state) in self.states {
            args.push(dws_field(*partition));
            args.push(state);
        }
        args.finish()
    }

    pub fn invoke(
        &self,
        script: &redis::Script,
        conn: &mut redis::Connection,
        keys: &FenceKeys,
    ) -> anyhow::Result<Reply> {
        invoke_fenced(
            script,
            conn,
            &keys.record_keys(),
            &self.encode(),
            "running the record script",
        )
    }
}

/// `lease.lua`: take `key` for `holder` when it is free or held by `expected`.
pub struct LeaseArgs<'a> {
    pub key: &'a str,
    pub expected: &'a str,
    pub holder: &'a str,
    pub lease_ms: u64,
}

impl LeaseArgs<'_> {
    pub fn encode(&self) -> Args {
        let mut args = Args::default();
        args.push(self.expected);
        args.push(self.holder);
        args.push(self.lease_ms);
        args.finish()
    }

    /// `None` when `holder` holds the lease now, else the holder left in place.
    pub fn invoke(&self, conn: &mut redis::Connection) -> anyhow::Result<Option<String>> {
        let script = lease_script();
        with_args(script.key(self.key), &self.encode())
            .invoke(conn)
            .context("running the lease script")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
