//! [`Lists`]: the values a shard pushes onto Redis lists in one checkpoint, per key
//! (receiver or message id).
//!
//! A push is the hottest step of the fold: on Redis-heavy data almost every key is new
//! to the checkpoint. A `HashMap` answers a new key with two lookups (`get_mut`, then
//! `insert` hashing and probing again); this table hashes the key once and finds
//! either its slot or the free slot for it in one probe (`HashTable::entry`).

use std::hash::BuildHasher as _;

use compact_str::CompactString;
use hashbrown::hash_table::{Entry, HashTable};
use rustc_hash::FxBuildHasher;

use crate::logic::decode::{TraceValue, TraceValues};

/// Values per list key, in push order.
#[derive(Default)]
pub struct Lists(HashTable<(CompactString, TraceValues)>);

fn hash(key: &str) -> u64 {
    FxBuildHasher.hash_one(key)
}

impl Lists {
    /// Appends `value` to `key`'s values.
    pub fn push(&mut self, key: &str, value: TraceValue) {
        let entry = self.0.entry(
            hash(key),
            |(k, _)| k.as_str() == key,
            |(k, _)| hash(k.as_str()),
        );
        match entry {
            Entry::Occupied(mut slot) => slot.get_mut().1.push(value),
            Entry::Vacant(slot) => {
                slot.insert((CompactString::new(key), smallvec::smallvec![value]));
            }
        }
    }

    /// `key`'s values, if it has any.
    pub fn get(&self, key: &str) -> Option<&TraceValues> {
        self.0
            .find(hash(key), |(k, _)| k.as_str() == key)
            .map(|(_, values)| values)
    }

    /// Moves every key and its values out, in no particular order, keeping the table's
    /// room: the next checkpoint folds into pages already in memory, where a fresh
    /// table's pages would fault in one by one as the fold first writes them.
    pub fn drain(&mut self) -> impl Iterator<Item = (CompactString, TraceValues)> + '_ {
        self.0.drain()
    }

    /// Gives back the room beyond what `keys` keys need.
    pub fn shrink_to(&mut self, keys: usize) {
        self.0.shrink_to(keys, |(k, _)| hash(k.as_str()));
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.0.capacity()
    }
}

impl IntoIterator for Lists {
    type Item = (CompactString, TraceValues);
    type IntoIter = hashbrown::hash_table::IntoIter<(CompactString, TraceValues)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(state: i32) -> TraceValue {
        TraceValue {
            state,
            business_id: 1,
            timestamp: 2,
        }
    }

    /// Keys inline and on the heap (over 24 bytes), new and seen again, across growth.
    #[test]
    fn values_gather_per_key_in_push_order() {
        let mut lists = Lists::default();
        let long = "o6_bmjrPTlm6_2sgVt7hMZOPfL2M-openid";
        for i in 0..1000 {
            lists.push(&format!("user{i}"), value(i));
        }
        lists.push("user7", value(60));
        lists.push(long, value(10));
        lists.push(long, value(64));
        assert_eq!(lists.len(), 1001);
        let states =
            |key| -> Vec<i32> { lists.get(key).unwrap().iter().map(|v| v.state).collect() };
        assert_eq!(states("user7"), [7, 60]);
        assert_eq!(states(long), [10, 64]);
        assert_eq!(states("user999"), [999]);
        assert!(lists.get("user1000").is_none());
        let mut all: Vec<(CompactString, usize)> =
            lists.into_iter().map(|(k, v)| (k, v.len())).collect();
        all.sort();
        assert_eq!(all.iter().map(|(_, n)| n).sum::<usize>(), 1003);
        assert!(all.contains(&(CompactString::new(long), 2)));
    }
}
