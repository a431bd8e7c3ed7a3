//! Decode + route + aggregate on one core, without Kafka or Redis, against a straight
//! loop over the same payloads in the same process.
//!
//! - **anchorflow's path**: the production pieces a record goes through between the
//!   consumer and the Redis sink: `decode`, the route to the template's shard
//!   (`EventBatch::push`), the shard's fold (counts per (template, state), values per
//!   receiver and message id) and its event-time windows.
//! - **the straight loop**: typed borrowed decode, hash route, and a count per
//!   (partition, window, template, state) in one hash map: the least a job computing
//!   austin's counts has to do.

use std::collections::HashMap;
use std::time::Instant;

use anchorflow_actors::config::Config;
use anchorflow_actors::logic::decode::{decode, TraceEvent};
use anchorflow_actors::logic::partition_state::PartitionState;
use anchorflow_actors::logic::route::shard_of;
use anchorflow_actors::logic::window::{Counts, PartitionWindows, WindowSpec};
use anchorflow_actors::messages::EventBatch;
use anchorflow_actors::runtime::memory::RECORD_OVERHEAD;

/// Partitions the payloads are spread over (as the producer does, round-robin).
const PARTITIONS: usize = 16;
/// Events per routed batch (the reader's batches are of this order).
const BATCH: usize = 4096;

fn window_spec(config: &Config) -> WindowSpec {
    let tz = config.time.timezone.parse().unwrap_or(chrono_tz::UTC);
    WindowSpec::new(
        config.time.window_size_ms as i64,
        config.time.allowed_lateness_ms as i64,
        tz,
    )
}

/// Feeds `each` every decoded event of the payloads (with the payload's index and a
/// running record number), passing over them until `events` records were taken and
/// calling `checkpoint` after every `checkpoint_every` records; returns records per
/// second.
fn timed(
    payloads: &[Option<Vec<u8>>],
    (events, checkpoint_every): (usize, usize),
    config: &Config,
    mut each: impl FnMut(usize, i64, TraceEvent<'_>),
    mut checkpoint: impl FnMut(),
) -> f64 {
    let started = Instant::now();
    let mut done = 0;
    for (i, payload) in payloads.iter().enumerate().cycle() {
        if done >= events {
            break;
        }
        if let Ok(event) = decode(payload.as_deref(), &config.decode) {
            each(i, done as i64, event);
        }
        done += 1;
        if done % checkpoint_every == 0 {
            checkpoint();
        }
    }
    done as f64 / started.elapsed().as_secs_f64()
}

/// Records the largest checkpoint holds: every partition's whole uncommitted share of
/// the memory budget (`runtime/memory.rs`; a checkpoint usually starts at half of it),
/// or `pipeline.max_uncommitted_records` each if that is less. Production's shards never
/// hold more than this before a barrier takes their state, and a state that grows past
/// it would measure cache misses production does not have.
pub fn checkpoint_records(payloads: &[Option<Vec<u8>>], config: &Config) -> usize {
    let bytes: u64 = payloads
        .iter()
        .map(|p| p.as_ref().map_or(0, Vec::len) as u64 + RECORD_OVERHEAD)
        .sum();
    let per_record = (bytes / payloads.len().max(1) as u64).max(1);
    let share = config.pipeline.memory().uncommitted_bytes(PARTITIONS) / per_record;
    let per_partition = share.min(config.pipeline.max_uncommitted_records).max(1);
    per_partition as usize * PARTITIONS
}

/// Events per second through anchorflow's decode, route, fold and windows.
pub fn anchorflow_rate(payloads: &[Option<Vec<u8>>], events: usize, config: &Config) -> f64 {
    let shards = config.pipeline.shards();
    let spec = window_spec(config);
    let states: Vec<PartitionState> = (0..shards).map(|_| PartitionState::default()).collect();
    let states = std::cell::RefCell::new(states);
    let mut windows: Vec<PartitionWindows> = (0..PARTITIONS).map(|_| Default::default()).collect();
    let mut batches: Vec<EventBatch> = (0..shards).map(|_| EventBatch::new(0)).collect();
    let rate = timed(
        payloads,
        (events, checkpoint_records(payloads, config)),
        config,
        |i, offset, event| {
            let shard = shard_of(event.business_id, shards);
            let batch = &mut batches[shard];
            batch.push(
                offset,
                event.state,
                event.business_id,
                event.log_timestamp,
                event.ids.iter().map(|s| s.as_ref()),
                event.message_id.as_deref(),
            );
            if batch.events.len() >= BATCH {
                states.borrow_mut()[shard].fold(batch, None);
                for e in &batch.events {
                    let counts = Counts {
                        events: 1,
                        receivers: (e.receivers.end - e.receivers.start) as i64,
                    };
                    let start = spec.start_of(e.log_timestamp);
                    windows[i % PARTITIONS].add(&spec, start, e.business_id, e.state, counts);
                }
                *batch = EventBatch::new(0);
            }
        },
        // Each checkpoint takes the lists out, as a barrier does (the sink drops them).
        || {
            for state in states.borrow_mut().iter_mut() {
                drop(state.take_lists());
            }
        },
    );
    std::hint::black_box((&states, &windows, &batches));
    rate
}

/// Events per second through the straight loop.
pub fn straight_loop_rate(payloads: &[Option<Vec<u8>>], events: usize, config: &Config) -> f64 {
    let shards = config.pipeline.shards();
    let spec = window_spec(config);
    let mut counts: HashMap<(usize, usize, i64, i64, i32), i64> = HashMap::new();
    let rate = timed(
        payloads,
        (events, usize::MAX),
        config,
        |i, _, event| {
            let shard = shard_of(event.business_id, shards);
            let window = spec.start_of(event.log_timestamp);
            let key = (
                i % PARTITIONS,
                shard,
                window,
                event.business_id,
                event.state,
            );
            *counts.entry(key).or_default() += 1;
        },
        || {},
    );
    std::hint::black_box(&counts);
    rate
}

/// Prints decode + route + aggregate against the straight loop, on one core; returns
/// the straight loop's rate.
pub fn report(payloads: &[Option<Vec<u8>>], events: usize, config: &Config) -> anyhow::Result<f64> {
    let straight = straight_loop_rate(payloads, events, config);
    let ours = anchorflow_rate(payloads, events, config);
    println!(
        "decode_route_aggregate_events_per_sec_per_core: {ours:.0}   (shard state taken every {} records, the largest checkpoint the memory budget allows)",
        checkpoint_records(payloads, config)
    );
    println!("straight_loop_events_per_sec_per_core: {straight:.0}");
    println!(
        "ratio_decode_route_aggregate_to_straight_loop: {:.2}",
        ours / straight
    );
    Ok(straight)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 256 MiB: 3/8 for uncommitted input, over an expansion of 6 and 16 partitions, is
    /// 1 MiB each; records of 136 + 64 bytes make 5,242 per partition. A smaller
    /// `pipeline.max_uncommitted_records` is the bound instead.
    #[test]
    fn the_measured_state_is_the_largest_checkpoint_the_budget_allows() {
        let payloads = vec![Some(vec![b'x'; 136]); 10];
        let mut config = Config::default();
        assert_eq!(config.pipeline.memory_budget_mb, 256);
        assert_eq!(checkpoint_records(&payloads, &config), 5_242 * 16);
        config.pipeline.max_uncommitted_records = 1_000;
        assert_eq!(checkpoint_records(&payloads, &config), 16_000);
    }
}
