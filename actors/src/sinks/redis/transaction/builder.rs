//! The commands of a transaction, built with the plan: per list its pushes (a thousand
//! values each) and its expiry, per hash its increments and its expiry, and a final's
//! series, staged series and window states; each command with the [`Entry`] that says
//! how to read its answer, and each data key with its commands.

use super::{key_hash, Entry, KeyWrites, PUSH_CHUNK};
use crate::protocol::commit_args::{
    day_end_at, Expiry, FinalTail, HashWrite, ListWrite, UnitWrites,
};
use crate::protocol::keys::{series_field, FenceKeys};

#[derive(Default)]
pub(super) struct Builder {
    pub(super) commands: Vec<redis::Cmd>,
    pub(super) entries: Vec<Entry>,
    pub(super) keys: Vec<KeyWrites>,
    value: String,
}

impl Builder {
    fn push(&mut self, command: redis::Cmd, entry: Entry) {
        self.commands.push(command);
        self.entries.push(entry);
    }

    fn key(&mut self, key: &[u8], list: bool, first: usize, lost: i64) {
        self.keys.push(KeyWrites {
            hash: key_hash(key),
            list,
            commands: first..self.commands.len(),
            lost,
        });
    }

    fn list(&mut self, list: &ListWrite, now_ms: i64) {
        let first = self.commands.len();
        for chunk in list.values.chunks(PUSH_CHUNK) {
            let mut command =
                redis::Cmd::with_capacity(chunk.len() + 2, list.key.len() + chunk.len() * 64);
            command.arg("LPUSH").arg(list.key.as_str());
            for value in chunk {
                self.value.clear();
                value.write_json(&mut self.value);
                command.arg(self.value.as_str());
            }
            self.push(command, Entry::Push(chunk.len()));
        }
        match list.expiry {
            Expiry::After(ms) => {
                let mut command = redis::cmd("PEXPIRE");
                command.arg(list.key.as_str()).arg(ms);
                self.push(command, Entry::Expire);
            }
            Expiry::DayEnd(ends) => {
                let at = day_end_at(ends, now_ms);
                self.push(
                    expire_at(list.key.as_bytes(), at),
                    Entry::DayEnd { ends, at },
                );
            }
        }
        self.key(list.key.as_bytes(), true, first, list.values.len() as i64);
    }

    fn hash(&mut self, hash: &HashWrite) {
        let first = self.commands.len();
        for (field, n) in &hash.fields {
            let mut command = redis::cmd("HINCRBY");
            command.arg(&hash.key).arg(field).arg(*n);
            self.push(command, Entry::Incr(*n));
        }
        let mut command = redis::cmd("PEXPIRE");
        command.arg(&hash.key).arg(hash.ttl_ms);
        self.push(command, Entry::Expire);
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
                let mut command = redis::cmd("RPUSH");
                command.arg(staged.list).arg(chunk);
                self.push(command, Entry::Bookkeeping);
            }
            let mut command = redis::cmd("SADD");
            command.arg(staged.pending).arg(staged.list);
            self.push(command, Entry::Bookkeeping);
        }
        if !tail.windows.is_empty() {
            let mut command = redis::cmd("HSET");
            command.arg(&keys.windows);
            for (partition, state) in tail.windows {
                command.arg(series_field(*partition)).arg(state);
            }
            self.push(command, Entry::Bookkeeping);
        }
    }
}

pub(super) fn expire_at(key: &[u8], at: i64) -> redis::Cmd {
    let mut command = redis::cmd("PEXPIREAT");
    command.arg(key).arg(at);
    command
}
