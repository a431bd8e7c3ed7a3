//! The commands of a transaction, built with the plan: per list its pushes (a thousand
//! values each) and its expiry, per hash its increments and its expiry, and a final's
//! series, staged series and window states; each command with the [`Entry`] that says
//! how to read its answer, and each data key with its commands.

use super::commands::Commands;
use super::{key_hash, Entry, KeyWrites, PUSH_CHUNK};
use crate::protocol::commit_args::{
    day_end_at, Expiry, FinalTail, HashWrite, ListWrite, UnitWrites,
};
use crate::protocol::keys::{series_field, FenceKeys};

#[derive(Default)]
pub(super) struct Builder {
    pub(super) commands: Commands,
    pub(super) entries: Vec<Entry>,
    /// The day ends lists expire at, and the instant built for each
    /// ([`Entry::DayEnd`] names one by its index).
    pub(super) day_ends: Vec<([i64; 2], i64)>,
    pub(super) keys: Vec<KeyWrites>,
}

impl Builder {
    /// Closes the command being built, read back as `entry`.
    fn push(&mut self, entry: Entry) {
        self.commands.end();
        self.entries.push(entry);
    }

    fn key(&mut self, key: &[u8], list: bool, first: usize, lost: i64) {
        self.keys.push(KeyWrites {
            hash: key_hash(key),
            list,
            commands: first as u32..self.commands.len() as u32,
            lost,
        });
    }

    fn list(&mut self, list: &ListWrite, now_ms: i64) {
        let first = self.commands.len();
        for chunk in list.values.chunks(PUSH_CHUNK) {
            self.commands.start("LPUSH").arg(&list.key);
            for value in chunk {
                self.commands.value(value);
            }
            self.push(Entry::Push(chunk.len() as u32));
        }
        match list.expiry {
            Expiry::After(ms) => {
                self.commands.start("PEXPIRE").arg(&list.key).int(ms);
                self.push(Entry::Expire);
            }
            Expiry::DayEnd(ends) => {
                let at = day_end_at(ends, now_ms);
                let index = match self.day_ends.iter().position(|&(e, _)| e == ends) {
                    Some(index) => index,
                    None => {
                        self.day_ends.push((ends, at));
                        self.day_ends.len() - 1
                    }
                };
                self.commands.start("PEXPIREAT").arg(&list.key).int(at);
                self.push(Entry::DayEnd(index as u32));
            }
        }
        self.key(list.key.as_bytes(), true, first, list.values.len() as i64);
    }

    fn hash(&mut self, hash: &HashWrite) {
        let first = self.commands.len();
        for (field, n) in &hash.fields {
            self.commands
                .start("HINCRBY")
                .arg(&hash.key)
                .arg(field)
                .int(*n);
            self.push(Entry::Incr(*n));
        }
        self.commands
            .start("PEXPIRE")
            .arg(&hash.key)
            .int(hash.ttl_ms);
        self.push(Entry::Expire);
        let lost = hash.fields.iter().map(|(_, n)| n).sum();
        self.key(hash.key.as_bytes(), false, first, lost);
    }

    pub(super) fn unit(&mut self, unit: &UnitWrites, now_ms: i64) {
        for list in &unit.lists {
            self.list(list, now_ms);
        }
        for hash in &unit.hashes {
            self.hash(hash);
        }
    }

    pub(super) fn tail(&mut self, tail: &FinalTail<'_>, keys: &FenceKeys) {
        for hash in tail.series {
            self.hash(hash);
        }
        if let Some(staged) = tail.staged.filter(|s| !s.batches.is_empty()) {
            for chunk in staged.batches.chunks(PUSH_CHUNK) {
                self.commands.start("RPUSH").arg(staged.list);
                for batch in chunk {
                    self.commands.arg(batch);
                }
                self.push(Entry::Bookkeeping);
            }
            self.commands
                .start("SADD")
                .arg(staged.pending)
                .arg(staged.list);
            self.push(Entry::Bookkeeping);
        }
        if !tail.windows.is_empty() {
            self.commands.start("HSET").arg(&keys.windows);
            for (partition, state) in tail.windows {
                self.commands.arg(&series_field(*partition)).arg(state);
            }
            self.push(Entry::Bookkeeping);
        }
    }
}

pub(super) fn expire_at(key: &[u8], at: i64) -> redis::Cmd {
    let mut command = redis::cmd("PEXPIREAT");
    command.arg(key).arg(at);
    command
}
