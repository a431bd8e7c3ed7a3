//! One source partition's pre-aggregated Redis state in one aggregator shard, as plain
//! data: template counts and the values to push onto receiver and message lists,
//! folded from event batches and taken whole at a barrier ([`PartitionState`]), and the
//! filter that leaves out what an interrupted split commit already applied
//! ([`UnitFilter`]). The actor around it is `aggregator.rs`.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::checkpoint::barrier::Barrier;
use crate::logic::decode::TraceValue;
use crate::logic::lists::Lists;
use crate::logic::window::Emitted;
use crate::messages::{EventBatch, ListPush, PartitionDelta};
use crate::protocol::keys::KeyLayout;
use crate::protocol::units::unit_of;

/// The unit fences of a claimed partition ([`crate::sinks::redis::commit`]): a split Redis
/// commit that was interrupted applied some units beyond the partition's fence, so an
/// event below the fence of its key's unit is in Redis for that key already and its
/// output there is left out. Empty in the normal case, and dropped once the
/// partition's commits have passed every unit fence.
pub struct UnitFilter {
    layout: Arc<KeyLayout>,
    /// The highest unit fence: events from here on are never left out.
    below: i64,
    fences: FxHashMap<u16, i64>,
}

impl UnitFilter {
    pub fn new(layout: Arc<KeyLayout>, fences: &BTreeMap<u16, i64>) -> Option<Self> {
        let below = fences.values().copied().max()?;
        Some(UnitFilter {
            layout,
            below,
            fences: fences.iter().map(|(u, f)| (*u, *f)).collect(),
        })
    }

    /// Whether a commit ending at `next_offset` passes every unit fence: the filter
    /// has nothing left to leave out.
    pub fn passed_by(&self, next_offset: i64) -> bool {
        next_offset >= self.below
    }

    fn keeps(&self, offset: i64, key: &str) -> bool {
        self.fences
            .get(&unit_of(key.as_bytes()))
            .is_none_or(|fence| offset >= *fence)
    }
}

/// Pre-aggregated state of one source partition in one shard, for one checkpoint at a
/// time: a barrier takes its contents and leaves its tables' room for the next.
#[derive(Default)]
pub struct PartitionState {
    counts: FxHashMap<(i64, i32), i64>,
    receivers: Lists,
    messages: Lists,
}

/// Takes every list out of `lists`, keeping the table's room for the next checkpoint
/// (it is sized like this one, not grown and rehashed from empty) unless it is over
/// four times what this checkpoint held: a burst's room is given back.
fn take_pushes(lists: &mut Lists) -> Vec<ListPush> {
    let pushes: Vec<ListPush> = lists
        .drain()
        .map(|(key, values)| ListPush { key, values })
        .collect();
    if lists.capacity() > 4 * pushes.len() {
        lists.shrink_to(pushes.len());
    }
    pushes
}

impl PartitionState {
    /// Takes the receiver and message lists folded since the last barrier, leaving
    /// them empty (`take_pushes`).
    pub fn take_lists(&mut self) -> (Vec<ListPush>, Vec<ListPush>) {
        (
            take_pushes(&mut self.receivers),
            take_pushes(&mut self.messages),
        )
    }

    /// Folds a batch of events into the state, leaving out what `filter` says Redis
    /// has already.
    pub fn fold(&mut self, batch: &EventBatch, filter: Option<&UnitFilter>) {
        for event in &batch.events {
            let filter = filter.filter(|f| event.offset < f.below);
            // Key names are built only while a filter applies (rarely, after a crash).
            let keeps = |key: &dyn Fn(&KeyLayout) -> String| {
                filter.is_none_or(|f| f.keeps(event.offset, &key(&f.layout)))
            };
            let receivers = (event.receivers.end - event.receivers.start) as i64;
            if keeps(&|l| l.template(event.business_id)) {
                *self
                    .counts
                    .entry((event.business_id, event.state))
                    .or_insert(0) += receivers;
            }
            let value = TraceValue {
                state: event.state,
                business_id: event.business_id,
                timestamp: event.log_timestamp,
            };
            for receiver in batch.receivers_of(event) {
                if keeps(&|l| l.receiver(receiver)) {
                    self.receivers.push(receiver, value);
                }
            }
            if let Some(message_id) = &event.message_id {
                let message_id = batch.text(message_id);
                if keeps(&|l| l.message(message_id)) {
                    self.messages.push(message_id, value);
                }
            }
        }
    }

    /// Takes what was folded since the last barrier as the partition's delta for
    /// `barrier`, leaving the state empty for the next checkpoint.
    pub fn take_delta(
        &mut self,
        barrier: &Barrier,
        emitted: Emitted,
        windows: String,
    ) -> PartitionDelta {
        let mut series = emitted.closed;
        series.extend(emitted.late);
        let (receiver_lists, message_lists) = self.take_lists();
        PartitionDelta {
            partition: barrier.partition,
            next_offset: barrier.next_offset,
            claim: barrier.claim,
            template_counts: self.counts.drain().map(|((b, s), n)| (b, s, n)).collect(),
            receiver_lists,
            message_lists,
            series,
            windows,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_barrier_takes_the_lists_and_keeps_their_room_but_not_a_bursts() {
        let mut state = state_with(&[
            (10, 1, &["a", "b"], Some("m1")),
            (10, 1, &["c"], Some("m2")),
        ]);
        let (receivers, messages) = state.take_lists();
        assert_eq!((receivers.len(), messages.len()), (3, 2));
        assert!(state.receivers.is_empty() && state.messages.is_empty());
        assert!(state.receivers.capacity() >= 3 && state.messages.capacity() >= 2);
        // The next checkpoint holds only what it folds itself.
        let mut batch = EventBatch::new(0);
        batch.push(5, 60, 1, 5, ["a"], None);
        state.fold(&batch, None);
        let (receivers, messages) = state.take_lists();
        assert_eq!(receivers.len(), 1);
        assert_eq!(receivers[0].key, "a");
        assert_eq!(receivers[0].values.len(), 1);
        assert_eq!(receivers[0].values[0].state, 60);
        assert!(messages.is_empty());
        // A burst's room is given back once a checkpoint needs a quarter of it.
        let mut batch = EventBatch::new(0);
        let ids: Vec<String> = (0..1000).map(|i| format!("user{i}")).collect();
        batch.push(6, 10, 1, 6, ids.iter().map(String::as_str), None);
        state.fold(&batch, None);
        assert_eq!(state.take_lists().0.len(), 1000);
        assert!(state.receivers.capacity() >= 1000);
        state.fold(&EventBatch::new(0), None);
        assert!(state.take_lists().0.is_empty());
        assert!(
            state.receivers.capacity() < 250,
            "{}",
            state.receivers.capacity()
        );
    }

    fn state_with(events: &[(i32, i64, &[&str], Option<&str>)]) -> PartitionState {
        let mut batch = EventBatch::new(0);
        for (i, (state, business_id, ids, message_id)) in events.iter().enumerate() {
            batch.push(
                i as i64,
                *state,
                *business_id,
                i as i64,
                ids.iter().copied(),
                *message_id,
            );
        }
        let mut partition = PartitionState::default();
        partition.fold(&batch, None);
        partition
    }

    #[test]
    fn counts_receivers_per_template_and_state() {
        let state = state_with(&[
            (10, 7, &["a", "b"], Some("m")),
            (10, 7, &["a"], Some("m")),
            (60, 7, &[], None),
        ]);
        assert_eq!(state.counts[&(7, 10)], 3);
        assert_eq!(state.counts[&(7, 60)], 0);
        assert_eq!(state.receivers.get("a").unwrap().len(), 2);
        assert_eq!(state.receivers.get("b").unwrap().len(), 1);
        // Keys past 24 bytes (openids, UUIDs) leave the inline form: the same lookups.
        let openid = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o";
        let uuid = "3f0c8a2e-5b7d-4c1a-9e2f-7d6b5a4c3b2a";
        let long = state_with(&[
            (10, 7, &[openid], Some(uuid)),
            (20, 7, &[openid], Some(uuid)),
        ]);
        assert_eq!(long.receivers.get(openid).unwrap().len(), 2);
        assert_eq!(long.messages.get(uuid).unwrap().len(), 2);
        assert_eq!(
            state
                .messages
                .get("m")
                .unwrap()
                .iter()
                .map(|v| v.timestamp)
                .collect::<Vec<_>>(),
            vec![0, 1]
        );
    }
}
