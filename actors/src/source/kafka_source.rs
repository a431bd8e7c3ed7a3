//! `KafkaSource`: the consumer-group member. It runs alone on its own arbiter thread
//! because it blocks in librdkafka's `poll`, which is also where rebalance callbacks
//! run; blocking there (to checkpoint revoked partitions) must stall nothing else.
//!
//! Its jobs, and where they live:
//! - poll records in bursts and cut them into per-partition batches (here);
//! - ask the wiring's reader starter for a `PartitionReader` per assigned partition,
//!   hand it batches, pause the partition while its reader is full (`flow.rs`,
//!   `pausing.rs`);
//! - **claim** every assigned partition in Redis before reading it and start at the
//!   lower fence (`assignment.rs`, called from the rebalance callback in `context.rs`);
//! - inject checkpoint barriers after each partition's last batch and, when the
//!   checkpoint driver (`checkpoint/driver.rs`) has every sink's ack, commit the lowest
//!   fences to Kafka (`flow.rs`). That offset is only progress reporting (lag) and
//!   the cold-start position of a partition that has no fences.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use anyhow::Context as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use tracing::{debug, info, warn};

use crate::checkpoint::barrier::CheckpointKind;
use crate::messages::{Shutdown, TriggerCheckpoint};
use crate::protocol::keys::FenceKeys;
use crate::sinks::warehouse::storage::Storage;
use crate::source::assignment::Claimer;
use crate::source::context::{SourceConsumer, SourceContext};
use crate::source::control::OffsetCommit;
use crate::source::flow::{SourceParts, SourceState};

/// How long one `poll` may block when no records are waiting. Control messages (a
/// checkpoint trigger, shutdown) wait at most this long.
const POLL_WAIT: Duration = Duration::from_millis(20);

/// Most records taken in one burst before batches are dispatched and control
/// messages get a turn.
const POLL_BURST: usize = 16_384;

/// How long a graceful stop waits for the consumer to leave the group.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the broker may hold a fetch that finds no new records
/// (`fetch.wait.max.ms`; librdkafka's default is 500). A consumer has one fetch in
/// flight per broker, and a partition resumed after an uncommitted pause (`flow.rs`) is
/// only fetched again once it returns: when the partitions in that fetch are at their
/// end, the broker holds it this long while Redis waits for the records behind the
/// pause, so the default's half second is Redis idle on every such resume (the cost on
/// funnel data is in docs/benchmarks.md); an idle consumer pays for a shorter wait
/// with 10 fetches a second per broker instead of 2. An operator's `[kafka]` value wins.
pub const FETCH_WAIT_MAX_MS: u64 = 100;

/// Mailbox capacity of the source: only control messages (checkpoint triggers, a
/// shutdown request) arrive here; the timer skips a tick rather than queue a second.
pub const SOURCE_MAILBOX: usize = 4;

/// The self-message that keeps the poll loop going between other messages.
#[derive(Message)]
#[rtype(result = "()")]
struct Poll;

pub struct KafkaSource {
    /// Taken and closed by [`KafkaSource::finish`], so that a graceful stop has left
    /// the group before it reports done.
    consumer: Option<SourceConsumer>,
    shutdown: Option<tokio::sync::oneshot::Sender<anyhow::Result<()>>>,
    shutdown_timeout: Duration,
}

/// The consumer settings: defaults an operator may override in `[kafka]`, then the
/// ones delivery depends on, which they may not.
fn client_config(config: &crate::config::Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("auto.offset.reset", "earliest");
    // Statistics tell which brokers answer (see `held.rs`) and drive the lag metric.
    client.set("statistics.interval.ms", "1000");
    // The prefetch share of the memory budget (runtime/memory.rs), at most 16 MiB (the
    // most a partition's reader can fall behind by before a pause says so: the fault
    // rows' timing assumes it), and within librdkafka's range. One fetch may overshoot it by `fetch.max.bytes`, which
    // a budget below 128 MiB cuts too.
    let prefetch = config.pipeline.memory().prefetch_bytes().min(16 << 20);
    client.set(
        "queued.max.messages.kbytes",
        (prefetch >> 10).max(1).to_string(),
    );
    if prefetch < 16 << 20 {
        client.set("fetch.max.bytes", prefetch.max(1 << 20).to_string());
        client.set(
            "max.partition.fetch.bytes",
            (prefetch / 16).clamp(64 << 10, 1 << 20).to_string(),
        );
    }
    client.set("fetch.wait.max.ms", FETCH_WAIT_MAX_MS.to_string());
    for (key, value) in &config.kafka.0 {
        client.set(key, value);
    }
    client.set("group.id", &config.source.group_id);
    client.set("enable.auto.commit", "false");
    client.set("enable.auto.offset.store", "false");
    // The end-of-backlog trigger (`flow.rs`) needs to know when every partition is at
    // its end; a poll that finds nothing only says no fetch has come back yet.
    client.set("enable.partition.eof", "true");
    client
}

impl KafkaSource {
    /// Builds the consumer and subscribes; the actor starts polling once started.
    pub fn new(parts: SourceParts, storage: Arc<dyn Storage>) -> anyhow::Result<Self> {
        let config = parts.config.clone();
        let start_at_latest = matches!(
            config.kafka.0.get("auto.offset.reset").map(String::as_str),
            Some("latest" | "largest" | "end")
        );
        let context = SourceContext {
            metrics: parts.metrics.clone(),
            claimer: Claimer {
                redis: config.redis.clone(),
                redis_timeout: Duration::from_secs(config.redis.command_timeout_secs),
                keys: FenceKeys::new(&config.source.group_id, &config.source.topic),
                clock: parts.clock.clone(),
                storage,
                warehouse_root: config.warehouse.root.clone().into(),
                group: config.source.group_id.clone(),
                topic: config.source.topic.clone(),
            },
            revoke_timeout: Duration::from_millis(config.pipeline.revoke_timeout_ms),
            start_at_latest,
            held: parts.held.clone(),
            repeats: Default::default(),
            state: Mutex::new(SourceState::new(parts)),
        };
        let consumer: SourceConsumer = client_config(&config)
            .create_with_context(context)
            .context("creating the kafka consumer")?;
        consumer
            .subscribe(&[config.source.topic.as_str()])
            .context("subscribing to the topic")?;
        Ok(KafkaSource {
            consumer: Some(consumer),
            shutdown: None,
            shutdown_timeout: Duration::from_secs(config.pipeline.shutdown_timeout_secs),
        })
    }

    fn poll_burst(&mut self) {
        let Some(consumer) = self.consumer.as_ref() else {
            return;
        };
        let context = consumer.context().clone();
        let mut taken = 0;
        while taken < POLL_BURST {
            let wait = if taken == 0 {
                POLL_WAIT
            } else {
                Duration::ZERO
            };
            let message = match consumer.poll(wait) {
                None => break,
                Some(Ok(message)) => message,
                Some(Err(KafkaError::PartitionEOF(partition))) => {
                    taken += 1;
                    if let Some(slot) = context.lock().slot_mut(partition) {
                        debug!(
                            partition,
                            next_offset = slot.next_offset,
                            "partition at its end"
                        );
                        slot.at_end = true;
                    }
                    continue;
                }
                Some(Err(e)) => {
                    // The same error reached the context's error callback, which logs it
                    // (once per window while it repeats).
                    debug!(error = %e, "kafka consumer error");
                    break;
                }
            };
            taken += 1;
            let (partition, offset) = (message.partition(), message.offset());
            let mut state = context.lock();
            // Exactly the offset each partition expects next (`reading.rs`).
            if context.admit(consumer, &mut state, partition, offset) {
                state.push(consumer, partition, offset, message.payload());
            }
        }
        let mut state = context.lock();
        context.search_starved(consumer, &mut state);
        context.check_progress(&mut state);
        state.flush_all(consumer);
        state.apply_acks(consumer);
        state.ran_dry(consumer);
    }

    fn finish(&mut self) {
        let Some(consumer) = self.consumer.as_ref() else {
            return;
        };
        let context = consumer.context().clone();
        let result =
            context
                .lock()
                .final_checkpoint(consumer, self.shutdown_timeout, OffsetCommit::Send);
        if result.is_ok() {
            info!("final checkpoint committed");
        }
        // Everything is committed; the readers go now, so that the revocation librdkafka
        // runs while closing the consumer finds nothing left to checkpoint.
        {
            let mut state = context.lock();
            for partition in state.assigned() {
                state.unassign(partition);
            }
        }
        consumer.unsubscribe();
        self.close_consumer();
        if let Some(done) = self.shutdown.take() {
            let _ = done.send(result);
        }
    }

    /// Leaves the group and destroys the client before the stop is reported, so that
    /// nothing of it outlives the pipeline (a demo's embedded broker stopped right
    /// after: the client then logged "connection refused" errors after "stopped
    /// cleanly"). rust-rdkafka closes a consumer when it is dropped, waiting for the
    /// broker as long as it takes, so the drop runs on a thread of its own and is
    /// waited for up to [`CLOSE_TIMEOUT`]; past that the process goes on without it.
    fn close_consumer(&mut self) {
        let Some(consumer) = self.consumer.take() else {
            return;
        };
        let (closed_tx, closed) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("kafka-close".into())
            .spawn(move || {
                drop(consumer);
                let _ = closed_tx.send(());
            });
        if let Err(e) = spawned {
            warn!(error = %e, "no thread to close the kafka consumer on; closed on this one");
            return;
        }
        match closed.recv_timeout(CLOSE_TIMEOUT) {
            Ok(()) => debug!("kafka consumer closed"),
            Err(_) => warn!(
                timeout_ms = CLOSE_TIMEOUT.as_millis() as u64,
                "the kafka consumer did not close in time; going on without it"
            ),
        }
    }
}

impl Actor for KafkaSource {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(crate::runtime::mailbox::actix_capacity(SOURCE_MAILBOX));
        ctx.notify(Poll);
    }
}

impl Handler<Poll> for KafkaSource {
    type Result = ();

    fn handle(&mut self, _: Poll, ctx: &mut Self::Context) {
        if self.shutdown.is_some() {
            self.finish();
            ctx.stop();
            return;
        }
        self.poll_burst();
        // Yield to the runtime before the next burst: a notification handled in place
        // keeps actix's context loop from ever returning, which starves every other
        // task on this thread (such as the ones that give back the readers' room).
        ctx.wait(
            actix::fut::wrap_future::<_, Self>(tokio::task::yield_now())
                .map(|(), _source, ctx: &mut Context<Self>| ctx.notify(Poll)),
        );
    }
}

impl Handler<TriggerCheckpoint> for KafkaSource {
    type Result = ();

    fn handle(&mut self, trigger: TriggerCheckpoint, _ctx: &mut Self::Context) {
        let Some(consumer) = self.consumer.as_ref() else {
            return;
        };
        let context = consumer.context().clone();
        let mut state = context.lock();
        state.set_watermark(trigger.watermark);
        if !state.may_start_periodic() {
            debug!("previous checkpoints still running; tick skipped");
            return;
        }
        state.start_checkpoint(consumer, CheckpointKind::Periodic);
    }
}

impl Handler<Shutdown> for KafkaSource {
    type Result = ();

    fn handle(&mut self, msg: Shutdown, _ctx: &mut Self::Context) {
        info!("shutdown requested: stopping reads, draining, final checkpoint");
        self.shutdown = Some(msg.done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetch_that_finds_nothing_is_held_briefly_unless_the_operator_says_otherwise() {
        let mut config = crate::config::Config::default();
        let client = client_config(&config);
        assert_eq!(client.get("fetch.wait.max.ms"), Some("100"));
        config
            .kafka
            .0
            .insert("fetch.wait.max.ms".into(), "500".into());
        assert_eq!(client_config(&config).get("fetch.wait.max.ms"), Some("500"));
    }
}
