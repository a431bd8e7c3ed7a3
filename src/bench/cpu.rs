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

use anchorflow_actors::aggregator::PartitionState;
use anchorflow_actors::config::Config;
use anchorflow_actors::logic::decode::{decode, TraceEvent};
use anchorflow_actors::logic::window::{Counts, PartitionWindows, WindowSpec};
use anchorflow_actors::messages::EventBatch;
use anchorflow_actors::reader::links::shard_of;

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
/// calling `pass_done` after each full pass; returns records per second.
fn timed(
    payloads: &[Option<Vec<u8>>],
    events: usize,
    config: &Config,
    mut each: impl FnMut(usize, i64, TraceEvent<'_>),
    mut pass_done: impl FnMut(),
) -> f64 {
    let started = Instant::now();
    let mut done = 0;
    'outer: loop {
        for (i, payload) in payloads.iter().enumerate() {
            if let Ok(event) = decode(payload.as_deref(), &config.decode) {
                each(i, done as i64, event);
            }
            done += 1;
            if done >= events {
                break 'outer;
            }
        }
        pass_done();
    }
    done as f64 / started.elapsed().as_secs_f64()
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
        events,
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
        // Each pass starts with fresh state, as after a checkpoint (sized like the last).
        || {
            let mut states = states.borrow_mut();
            *states = states.iter().map(PartitionState::successor).collect();
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
        events,
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
