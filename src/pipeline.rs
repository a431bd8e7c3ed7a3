//! Wiring of the actor system: which actor runs on which thread, linked to whom.
//!
//! ```text
//! KafkaSource (own thread) ─[2]─> PartitionReader ×partitions (reader threads)
//!     PartitionReader ─[8]─> Aggregator ×shards (one thread each) ─[64]─> RedisSink (own thread)
//!     PartitionReader ─[16]──────────────────────────────────────────────> WarehouseSink (own thread)
//! Timer (main thread) ──> KafkaSource;  PartitionReader ──watermarks──> Timer
//! sinks ──notices──> KafkaSource
//! ```
//! Numbers in brackets are mailbox capacities (see each actor's constant for why).
//! Every actor except the source and the timer is started under an actix `Supervisor`.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use actix::prelude::*;
use anchorflow_actors::aggregator::{Aggregator, AGGREGATOR_MAILBOX};
use anchorflow_actors::clock::Clock;
use anchorflow_actors::config::Config;
use anchorflow_actors::fences::{self, FenceKeys};
use anchorflow_actors::held::Held;
use anchorflow_actors::kafka_source::{KafkaSource, ReaderFactory, Shutdown, SOURCE_MAILBOX};
use anchorflow_actors::mailbox::Mailbox;
use anchorflow_actors::messages::ShardInput;
use anchorflow_actors::metrics::Metrics;
use anchorflow_actors::partition_committer::{PartitionCommitter, COMMITTER_MAILBOX};
use anchorflow_actors::partition_reader::{ReaderContext, ReaderLinks};
use anchorflow_actors::redis_commit::KeyLayout;
use anchorflow_actors::redis_sink::{RedisSink, REDIS_SINK_MAILBOX};
use anchorflow_actors::timer::{Timer, TIMER_MAILBOX};
use anchorflow_actors::warehouse_files::PublishedMarks;
use anchorflow_actors::warehouse_sink::{WarehouseSink, WAREHOUSE_SINK_MAILBOX};
use anchorflow_actors::watermark::Watermarks;
use anyhow::Context as _;
use tokio::sync::watch;
use tracing::{error, info};

/// Exit code when the final checkpoint did not complete within the shutdown deadline.
pub const EXIT_SHUTDOWN_TIMEOUT: i32 = 1;

/// A pipeline running on its own thread (used by `demo`, `bench` and tests; `run`
/// calls [`run`] on the main thread).
pub struct PipelineHandle {
    pub metrics: Metrics,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<anyhow::Result<i32>>>,
}

impl PipelineHandle {
    /// Starts a pipeline on a new thread.
    pub fn spawn(config: Config, metrics: Metrics) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let thread_metrics = metrics.clone();
        let thread = std::thread::Builder::new()
            .name("anchorflow-pipeline".into())
            .spawn(move || run(config, thread_metrics, stop_rx))
            .expect("spawning the pipeline thread");
        PipelineHandle {
            metrics,
            stop,
            thread: Some(thread),
        }
    }

    /// Asks for a graceful stop (final checkpoint, offsets committed).
    pub fn request_stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Whether the pipeline thread has ended (e.g. a fatal error stopped it).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops gracefully and returns the exit code.
    pub fn stop(mut self) -> anyhow::Result<i32> {
        self.request_stop();
        self.join()
    }

    /// Waits for the pipeline to end on its own.
    pub fn join(&mut self) -> anyhow::Result<i32> {
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .map_err(|_| anyhow::anyhow!("pipeline thread panicked"))?,
            None => Ok(0),
        }
    }
}

impl Drop for PipelineHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.request_stop();
            let _ = self.join();
        }
    }
}

/// Waits, not ready, while Redis carries the marker saying it lost anchorflow's fences
/// (set by a commit that found them gone). Reading on would count from whatever Kafka
/// offset happens to be committed, silently partial; an operator decides instead
/// (`anchorflow fences recover`, see `docs/exactly-once.md`). Returns false if asked
/// to stop while waiting.
fn wait_while_state_lost(config: &Config, metrics: &Metrics, stop: &watch::Receiver<bool>) -> bool {
    let keys = FenceKeys::new(&config.source.group_id, &config.source.topic);
    let timeout = Duration::from_secs(config.redis.command_timeout_secs);
    let mut last_report: Option<std::time::Instant> = None;
    loop {
        if *stop.borrow() {
            return false;
        }
        let marker = fences::connect(&config.redis.url, timeout)
            .and_then(|mut conn| fences::lost_marker(&mut conn, &keys));
        match marker {
            Ok(Some(marker)) => {
                metrics.redis_state_lost.set(1);
                metrics.set_ready(false);
                if last_report.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                    error!(%marker, "Redis has lost anchorflow's fences; waiting for `anchorflow fences recover` (docs/exactly-once.md)");
                    last_report = Some(std::time::Instant::now());
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            Ok(None) => {
                metrics.redis_state_lost.set(0);
                return true;
            }
            // Unreachable Redis: claiming partitions retries and reports it.
            Err(_) => return true,
        }
    }
}

/// Runs the pipeline on the current thread until `stop` turns true (then drains,
/// commits a final checkpoint and returns 0) or an actor stops the system with an
/// exit code (I/O error, lost assignment).
pub fn run(
    config: Config,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<i32> {
    if !wait_while_state_lost(&config, &metrics, &stop) {
        return Ok(0);
    }
    let config = Arc::new(config);
    let system = System::new();
    let shutdown_timeout = Duration::from_secs(config.pipeline.shutdown_timeout_secs);
    let setup: anyhow::Result<()> = system.block_on(async {
        let (notices_tx, notices_rx) = std::sync::mpsc::channel();
        let tz = config.time.tz();
        let shards = config.pipeline.shards();
        let windows = config.time.windows();

        let redis_thread = Arbiter::new();
        let keys = FenceKeys::new(&config.source.group_id, &config.source.topic);
        let clock = Clock::default();
        let held = Held::default();
        let (c, m, n, k, t) = (config.redis.clone(), metrics.clone(), notices_tx.clone(), keys.clone(), clock.clone());
        let redis = Supervisor::start_in_arbiter(&redis_thread.handle(), move |_| RedisSink::new(c, tz, shards, m, n, k, t));

        let warehouse_thread = Arbiter::new();
        let (c, r, i, m, n) = (
            config.warehouse.clone(),
            config.redis.clone(),
            config.source.instance_id.clone(),
            metrics.clone(),
            notices_tx.clone(),
        );
        let committer = {
            let (c, r, i, m, k) = (
                config.warehouse.clone(),
                config.redis.clone(),
                config.source.instance_id.clone(),
                metrics.clone(),
                keys.clone(),
            );
            let addr = PartitionCommitter::start_in_arbiter(&Arbiter::new().handle(), move |_| {
                PartitionCommitter::new(c, windows, k, &r, i, m)
            });
            Mailbox::new(addr, COMMITTER_MAILBOX, metrics.mailbox("partition_committer"))
        };
        let marks = PublishedMarks::load(
            std::path::Path::new(&config.warehouse.root),
            &config.source.group_id,
            &config.source.topic,
            &config.source.instance_id,
        )?;
        let warehouse = Supervisor::start_in_arbiter(&warehouse_thread.handle(), move |_| {
            WarehouseSink::new(c, &r, windows, keys, i, m, n)
                .with_committer(committer)
                .with_marks(marks)
        });

        // One link per receiving actor, shared by all its senders (`mailbox.rs`).
        let redis = Mailbox::new(redis, REDIS_SINK_MAILBOX, metrics.mailbox("redis_sink"));
        let warehouse = Mailbox::new(warehouse, WAREHOUSE_SINK_MAILBOX, metrics.mailbox("warehouse_sink"));
        let aggregators: Vec<Mailbox<ShardInput>> = (0..shards)
            .map(|shard| {
                let (r, m, l) = (redis.clone(), metrics.clone(), KeyLayout::new(&config.redis));
                let addr = Supervisor::start_in_arbiter(&Arbiter::new().handle(), move |_| Aggregator::new(shard, windows, l, r, m));
                Mailbox::new(addr, AGGREGATOR_MAILBOX, metrics.mailbox("aggregator"))
            })
            .collect();

        let reader_threads: Arc<[ArbiterHandle]> =
            (0..config.pipeline.readers()).map(|_| Arbiter::new().handle()).collect();
        // The timer and the readers know each other's address: create the timer's
        // context first, run the timer once the source it triggers exists.
        let timer_ctx = Context::<Timer>::new();
        let factory = ReaderFactory {
            config: config.clone(),
            context: ReaderContext {
                topic: config.source.topic.as_str().into(),
                limits: config.decode.clone(),
                bounds: config.time.bounds(),
                tz,
                windows,
                links: ReaderLinks {
                    shards: aggregators.into(),
                    warehouse,
                    timer: Mailbox::new(timer_ctx.address(), TIMER_MAILBOX, metrics.mailbox("timer")),
                },
                metrics: metrics.clone(),
                clock: clock.clone(),
            },
            arbiters: reader_threads,
            held: held.clone(),
        };
        let source = KafkaSource::new(factory, notices_rx, notices_tx)?;
        let source = KafkaSource::start_in_arbiter(&Arbiter::new().handle(), move |_| source);
        let watermarks = Watermarks::new(
            Duration::from_millis(config.time.max_out_of_orderness_ms),
            Duration::from_millis(config.time.idle_timeout_ms),
        );
        timer_ctx.run(
            Timer::new(
                Mailbox::new(source.clone(), SOURCE_MAILBOX, metrics.mailbox("kafka_source")),
                Duration::from_millis(config.pipeline.checkpoint_interval_ms),
            )
                .with_watermarks(watermarks, metrics.clone())
                .with_windows(windows)
                .with_clock(clock.clone())
                .with_held(held),
        );
        info!(topic = %config.source.topic, group = %config.source.group_id, shards, "pipeline started");

        actix::spawn(async move {
            while !*stop.borrow() {
                if stop.changed().await.is_err() {
                    break;
                }
            }
            let (done_tx, done_rx) = tokio::sync::oneshot::channel();
            let code = match source.send(Shutdown { done: done_tx }).await {
                Err(_) => 0,
                Ok(()) => match tokio::time::timeout(shutdown_timeout + Duration::from_secs(1), done_rx).await {
                    Ok(Ok(Ok(()))) => {
                        info!("stopped cleanly");
                        0
                    }
                    Ok(Ok(Err(e))) => {
                        error!(error = format!("{e:#}"), "final checkpoint failed");
                        EXIT_SHUTDOWN_TIMEOUT
                    }
                    Ok(Err(_)) | Err(_) => {
                        error!(timeout_secs = shutdown_timeout.as_secs(), "shutdown deadline passed");
                        EXIT_SHUTDOWN_TIMEOUT
                    }
                },
            };
            System::current().stop_with_code(code);
        });
        Ok(())
    });
    setup.context("starting the pipeline")?;
    let code = system.run_with_code().context("running the actor system");
    // A partition-commit hook still running would outlive the process.
    anchorflow_actors::partition_committer::kill_running_hook();
    code
}
