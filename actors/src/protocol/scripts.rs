//! The Lua scripts anchorflow runs in Redis (`scripts/*.lua`) and their contracts: per
//! script, a typed builder that writes the arguments in the order the script reads
//! them, the keys it is invoked with, and its reply as a Rust type.
//!
//! | script | arguments | keys | reply |
//! |---|---|---|---|
//! | `claim.lua` | [`ClaimArgs`](crate::protocol::claim_script::ClaimArgs) | fences, lost | [`ClaimReply`](crate::protocol::claim_script::ClaimReply) |
//! | `fence_check.lua` + `conflicts.lua` + `redis_commit.lua` | `CommitArgs` (`commit_args.rs`), `UnstageArgs` (`staged.rs`) | fences, lost, windows, conflicts | [`Reply`] |
//! | `fence_check.lua` + `warehouse_record.lua` | [`RecordArgs`] | fences, lost, publish, windows, folders, committed, wm | [`Reply`] |
//! | `conflicts.lua` + `record_conflicts.lua` | [`ConflictArgs`] | conflicts | how many were recorded |
//! | `lease.lua` | [`LeaseArgs`] | the lease | the holder left in place, if not us |
//!
//! Every script starts with `args.lua`: it reads `ARGV` through a cursor and, before
//! its first write, checks that the cursor ends exactly on the [`END`] marker that
//! [`Args::finish`] appends. A builder and a script that disagree therefore fail the
//! call with nothing written, never misread. `tests/protocol.rs` runs every builder
//! against its script on a real Redis.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;

use crate::checkpoint::claim::{FenceRange, SinkKind};
use crate::logic::decode::TraceValue;
use crate::protocol::keys::{dws_field, FenceKeys};
use crate::protocol::publish::PublishRecord;
use crate::protocol::reply::{self, Conflict, Reply};

/// The last argument of every call (see `scripts/args.lua`).
pub const END: &str = ".end";

const ARGS: &str = include_str!("scripts/args.lua");
const FENCE_CHECK: &str = include_str!("scripts/fence_check.lua");
const CONFLICTS: &str = include_str!("scripts/conflicts.lua");

fn script(parts: &[&str]) -> redis::Script {
    redis::Script::new(&parts.concat())
}

/// `claim.lua`.
pub fn claim_script() -> redis::Script {
    script(&[ARGS, include_str!("scripts/claim.lua")])
}

/// The Redis sink's commit: the fence check, then `redis_commit.lua`.
pub fn commit_script() -> redis::Script {
    script(&[
        ARGS,
        FENCE_CHECK,
        CONFLICTS,
        include_str!("scripts/redis_commit.lua"),
    ])
}

/// The record of the writes a Redis sink transaction had refused:
/// `record_conflicts.lua`.
pub fn conflicts_script() -> redis::Script {
    script(&[
        ARGS,
        CONFLICTS,
        include_str!("scripts/record_conflicts.lua"),
    ])
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
/// many allocations, and go into the command with one copy (`commit_args::commit_command`).
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
    /// without `fmt`'s machinery: this is on the hot path of every commit.
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
        self.range(0..self.ends.len())
    }

    /// The arguments at positions `range`, in order.
    pub fn range(&self, range: std::ops::Range<usize>) -> impl Iterator<Item = &str> + '_ {
        let first = match range.start {
            0 => 0,
            n => self.ends[n - 1],
        };
        let starts = std::iter::once(first).chain(self.ends[range.clone()].iter().copied());
        starts
            .zip(self.ends[range].iter().copied())
            .map(|(start, end)| &self.text[start..end])
    }

    /// The heap it holds, in bytes.
    pub fn heap_bytes(&self) -> usize {
        self.text.capacity() + self.ends.capacity() * std::mem::size_of::<usize>()
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// The bytes of all arguments together.
    pub fn text_len(&self) -> usize {
        self.text.len()
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

/// `warehouse_record.lua`: records one warehouse commit.
pub struct RecordArgs<'a> {
    /// The checkpoint whose files these are (as in `CommitArgs`).
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

/// `record_conflicts.lua`: the writes a Redis sink transaction had refused, recorded
/// in the conflicts hash after its `EXEC` (`sinks/redis/transaction.rs`).
pub struct ConflictArgs<'a> {
    pub ttl_ms: i64,
    pub conflicts: &'a [Conflict],
}

impl ConflictArgs<'_> {
    pub fn encode(&self) -> Args {
        let mut args = Args::default();
        args.push_int(self.ttl_ms);
        args.counted(self.conflicts, |args, conflict| {
            args.push_str(&conflict.key);
            args.push_str(&conflict.reason);
            args.push_int(conflict.lost);
        });
        args.finish()
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
