//! Wiring of the actor system: which actor runs on which thread, linked to whom.
//!
//! ```text
//! KafkaSource (own thread) ─[2]─> PartitionReader ×partitions (reader threads)
//!     PartitionReader ─[8]─> Aggregator ×shards (one thread each) ─[64]─> RedisSink (own thread)
//!     PartitionReader ─[16]──────────────────────────────────────────────> WarehouseSink (own thread)
//!     WarehouseSink ─[2]─> PartitionCommitter (own thread)
//! Timer (main thread) ─[4]─> KafkaSource;  PartitionReader ─[64]─> Timer (watermarks)
//! RedisSink, WarehouseSink (SinkAcks), drainers (DrainAcks) ──Ack──> KafkaSource's
//!     CheckpointDriver (unbounded, a few per checkpoint)
//! ```
//! Numbers in brackets are mailbox capacities (see each actor's constant for why).
//! The readers, both sinks, the timer and the partition committer run under an actix
//! `Supervisor` (`runtime/supervision.rs` says what a failure means for each).

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use actix::prelude::*;
use anchorflow_actors::aggregator::{Aggregator, AGGREGATOR_MAILBOX};
use anchorflow_actors::checkpoint::claim::SinkKind;
use anchorflow_actors::checkpoint::driver::CheckpointDriver;
use anchorflow_actors::config::Config;
use anchorflow_actors::logic::watermark::Watermarks;
use anchorflow_actors::messages::{ShardFlush, ShardInput, Shutdown, WarehouseInput};
use anchorflow_actors::metrics::Metrics;
use anchorflow_actors::protocol::fences;
use anchorflow_actors::protocol::keys::{FenceKeys, KeyLayout};
use anchorflow_actors::reader::links::{ReaderContext, ReaderOutputs};
use anchorflow_actors::reader::spawn::ReaderSpawner;
use anchorflow_actors::runtime::clock::Clock;
use anchorflow_actors::runtime::exit;
use anchorflow_actors::runtime::health::Health;
use anchorflow_actors::runtime::mailbox::Mailbox;
use anchorflow_actors::sinks::fenced::SinkShared;
use anchorflow_actors::sinks::redis::redis_sink::{RedisSink, REDIS_SINK_MAILBOX};
use anchorflow_actors::sinks::warehouse::marks::PublishedMarks;
use anchorflow_actors::sinks::warehouse::partition_committer::{
    PartitionCommitter, COMMITTER_MAILBOX,
};
use anchorflow_actors::sinks::warehouse::warehouse_sink::{WarehouseSink, WAREHOUSE_SINK_MAILBOX};
use anchorflow_actors::sinks::warehouse::{self, storage::Storage};
use anchorflow_actors::source::flow::SourceParts;
use anchorflow_actors::source::held::Held;
use anchorflow_actors::source::kafka_source::{KafkaSource, SOURCE_MAILBOX};
use anchorflow_actors::timer::{Timer, TriggersTo, TIMER_MAILBOX};
use anyhow::Context as _;
use tokio::sync::watch;
use tracing::{error, info, warn};

/// What the pipeline reports through: metrics and health, shared with the HTTP
/// endpoint, the demo, the benchmark and tests.
#[derive(Clone, Default)]
pub struct Telemetry {
    pub metrics: Metrics,
    pub health: Health,
}

/// A pipeline running on its own thread (used by `demo`, `bench` and tests; `run`
/// calls [`run`] on the main thread).
pub struct PipelineHandle {
    pub telemetry: Telemetry,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<anyhow::Result<i32>>>,
}

impl PipelineHandle {
    /// Starts a pipeline on a new thread; fails when the OS will not give it one.
    pub fn spawn(config: Config, telemetry: Telemetry) -> anyhow::Result<Self> {
        let (stop, stop_rx) = watch::channel(false);
        let for_thread = telemetry.clone();
        let thread = std::thread::Builder::new()
            .name("anchorflow-pipeline".into())
            .spawn(move || run(config, for_thread, stop_rx))
            .context("spawning the pipeline thread")?;
        Ok(PipelineHandle {
            telemetry,
            stop,
            thread: Some(thread),
        })
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
fn wait_while_state_lost(
    config: &Config,
    telemetry: &Telemetry,
    stop: &watch::Receiver<bool>,
) -> bool {
    let keys = FenceKeys::new(&config.source.group_id, &config.source.topic);
    let timeout = Duration::from_secs(config.redis.command_timeout_secs);
    let mut last_report: Option<std::time::Instant> = None;
    loop {
        if *stop.borrow() {
            return false;
        }
        let marker = fences::connect(&config.redis, timeout)
            .and_then(|mut conn| fences::lost_marker(&mut conn, &keys));
        let lost = matches!(marker, Ok(Some(_)));
        telemetry.metrics.redis_state_lost.set(i64::from(lost));
        telemetry.health.set_state_lost(lost);
        match marker {
            Ok(Some(marker)) => {
                if last_report.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                    error!(%marker, "Redis has lost anchorflow's fences; waiting for `anchorflow fences recover` (docs/exactly-once.md)");
                    last_report = Some(std::time::Instant::now());
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            // Unreachable Redis: claiming partitions retries and reports it.
            Ok(None) | Err(_) => return true,
        }
    }
}

/// Why this Redis must not be run against: its eviction policy may drop anchorflow's
/// bookkeeping (`protocol/server.rs`), unless `redis.allow_evicting_policy` says so, or
/// it is too old for `redis.commit = "transaction"`. An unreachable Redis is not
/// refused here: claiming partitions retries and reports it, and the Redis sink looks
/// again once it connects.
fn refused_redis(config: &Config) -> Option<String> {
    let timeout = Duration::from_secs(config.redis.command_timeout_secs);
    let info = fences::connect(&config.redis, timeout)
        .and_then(|mut conn| anchorflow_actors::protocol::server::inspect(&mut conn))
        .ok()?;
    info.refusal(&config.redis)
}

/// The live run that holds this instance id's lease, if one does (`protocol/lease.rs`).
/// An unreachable Redis says nothing here (claiming reports it).
fn live_run_of_this_id(config: &Config) -> Option<String> {
    let keys = FenceKeys::new(&config.source.group_id, &config.source.topic);
    let timeout = Duration::from_secs(config.redis.command_timeout_secs);
    let mut conn = fences::connect(&config.redis, timeout).ok()?;
    anchorflow_actors::protocol::lease::live_holder(&mut conn, &keys, &config.source.instance_id)
        .ok()
        .flatten()
}

/// The sinks and their links.
struct Sinks {
    redis: Mailbox<ShardFlush>,
    warehouse: Mailbox<WarehouseInput>,
}

fn start_sinks(
    config: &Arc<Config>,
    telemetry: &Telemetry,
    shared: &SinkShared,
    driver: &CheckpointDriver,
    storage: &Arc<dyn Storage>,
    clock: &Clock,
) -> anyhow::Result<Sinks> {
    let metrics = &telemetry.metrics;
    let (tz, shards, windows) = (
        config.time.tz(),
        config.pipeline.shards(),
        config.time.windows(),
    );
    let (c, s, t) = (config.redis.clone(), shared.clone(), clock.clone());
    let acks = driver.sink_acks(SinkKind::Redis);
    let redis = Supervisor::start_in_arbiter(&Arbiter::new().handle(), move |_| {
        RedisSink::new(c, tz, shards, s, acks, t)
    });
    // The warehouse sink and its partition committer are built from the same parts.
    let parts = (
        warehouse_config(config),
        config.redis.clone(),
        config.source.instance_id.clone(),
        shared.clone(),
        storage.clone(),
    );
    let committer = {
        let (c, r, i, s, st) = parts.clone();
        let addr = Supervisor::start_in_arbiter(&Arbiter::new().handle(), move |_| {
            PartitionCommitter::new(c, windows, &r, i, &s, st)
        });
        Mailbox::new(
            addr,
            COMMITTER_MAILBOX,
            metrics.mailbox("partition_committer"),
        )
    };
    let marks = PublishedMarks::load(
        storage.clone(),
        Path::new(&config.warehouse.root),
        &config.source.group_id,
        &config.source.topic,
        &config.source.instance_id,
    )?;
    let (c, r, i, s, st) = parts;
    let row_group_bytes = config.pipeline.memory().row_group_bytes();
    let acks = driver.sink_acks(SinkKind::Warehouse);
    let warehouse = Supervisor::start_in_arbiter(&Arbiter::new().handle(), move |_| {
        WarehouseSink::new(c, &r, windows, i, s, acks, st)
            .with_committer(committer)
            .with_marks(marks)
            .with_row_group_bytes(row_group_bytes)
    });
    // One link per receiving actor, shared by all its senders (`mailbox.rs`).
    Ok(Sinks {
        redis: Mailbox::new(redis, REDIS_SINK_MAILBOX, metrics.mailbox("redis_sink")),
        warehouse: Mailbox::new(
            warehouse,
            WAREHOUSE_SINK_MAILBOX,
            metrics.mailbox("warehouse_sink"),
        ),
    })
}

/// One aggregator shard per thread; a panic there stops the process (its state is
/// every partition's), so they are not supervised.
fn start_aggregators(
    config: &Config,
    metrics: &Metrics,
    redis: &Mailbox<ShardFlush>,
) -> Vec<Mailbox<ShardInput>> {
    let windows = config.time.windows();
    (0..config.pipeline.shards())
        .map(|shard| {
            let (r, m, l) = (
                redis.clone(),
                metrics.clone(),
                KeyLayout::new(&config.redis),
            );
            let addr = Aggregator::start_in_arbiter(&Arbiter::new().handle(), move |_| {
                Aggregator::new(shard, windows, l, r, m)
            });
            Mailbox::new(addr, AGGREGATOR_MAILBOX, metrics.mailbox("aggregator"))
        })
        .collect()
}

/// Starts the timer, the readers' starter and the source, and connects the timer to
/// the source: the readers send to the timer, the timer triggers the source, and the
/// source starts readers.
fn start_source_and_timer(
    config: &Arc<Config>,
    telemetry: &Telemetry,
    sinks: Sinks,
    storage: Arc<dyn Storage>,
    clock: Clock,
    driver: CheckpointDriver,
) -> anyhow::Result<Addr<KafkaSource>> {
    let metrics = &telemetry.metrics;
    let held = Held::default();
    let aggregators = start_aggregators(config, metrics, &sinks.redis);
    let watermarks = Watermarks::new(
        Duration::from_millis(config.time.max_out_of_orderness_ms),
        Duration::from_millis(config.time.idle_timeout_ms),
    );
    let timer = Timer::new(Duration::from_millis(
        config.pipeline.checkpoint_interval_ms,
    ))
    .with_watermarks(watermarks, metrics.clone())
    .with_windows(config.time.windows())
    .with_clock(clock.clone())
    .with_held(held.clone())
    .supervised(metrics, &telemetry.health);
    let timer = Supervisor::start(move |_| timer);
    let context = ReaderContext {
        topic: config.source.topic.as_str().into(),
        limits: config.decode.clone(),
        bounds: config.time.bounds(),
        tz: config.time.tz(),
        windows: config.time.windows(),
        links: ReaderOutputs {
            shards: aggregators.into(),
            warehouse: sinks.warehouse,
            timer: Mailbox::new(timer.clone(), TIMER_MAILBOX, metrics.mailbox("timer")),
        },
        metrics: metrics.clone(),
        health: telemetry.health.clone(),
        clock: clock.clone(),
    };
    let parts = SourceParts {
        config: config.clone(),
        metrics: metrics.clone(),
        health: telemetry.health.clone(),
        clock,
        held,
        readers: Box::new(ReaderSpawner::new(context, config.pipeline.readers())),
        driver,
    };
    let source = KafkaSource::new(parts, storage)?;
    let source = KafkaSource::start_in_arbiter(&Arbiter::new().handle(), move |_| source);
    // Off the data path: one control message at start-up, to a mailbox that is empty
    // then; `do_send` cannot block the wiring on a timer that has not run yet.
    timer.do_send(TriggersTo(Mailbox::new(
        source.clone(),
        SOURCE_MAILBOX,
        metrics.mailbox("kafka_source"),
    )));
    Ok(source)
}

/// Turns `stop` into a graceful shutdown: a final checkpoint, then the system stops
/// with 0, or with [`exit::SHUTDOWN_TIMEOUT`] when the deadline passes.
async fn shut_down_when(
    mut stop: watch::Receiver<bool>,
    source: Addr<KafkaSource>,
    timeout: Duration,
) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            break;
        }
    }
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let code = match source.send(Shutdown { done: done_tx }).await {
        Err(_) => 0,
        Ok(()) => match tokio::time::timeout(timeout + Duration::from_secs(1), done_rx).await {
            Ok(Ok(Ok(()))) => {
                info!("stopped cleanly");
                0
            }
            Ok(Ok(Err(e))) => {
                error!(error = format!("{e:#}"), "final checkpoint failed");
                exit::SHUTDOWN_TIMEOUT
            }
            Ok(Err(_)) | Err(_) => {
                error!(timeout_secs = timeout.as_secs(), "shutdown deadline passed");
                exit::SHUTDOWN_TIMEOUT
            }
        },
    };
    System::current().stop_with_code(code);
}

/// Runs the pipeline on the current thread until `stop` turns true (then drains,
/// commits a final checkpoint and returns 0) or an actor stops the system with an
/// exit code (`runtime/exit.rs`).
pub fn run(
    config: Config,
    telemetry: Telemetry,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<i32> {
    if !wait_while_state_lost(&config, &telemetry, &stop) {
        return Ok(0);
    }
    if let Some(why) = refused_redis(&config) {
        error!("{why}");
        return Ok(exit::CONFIG);
    }
    if let Some(holder) = live_run_of_this_id(&config) {
        error!(
            instance_id = config.source.instance_id,
            holder,
            "another live run holds this instance id: every instance needs its own source.instance_id (the default is this host's name)"
        );
        return Ok(exit::DUPLICATE);
    }
    let config = Arc::new(config);
    let system = System::new();
    let shutdown_timeout = Duration::from_secs(config.pipeline.shutdown_timeout_secs);
    let setup: anyhow::Result<()> = system.block_on(async {
        let driver = CheckpointDriver::default();
        let storage: Arc<dyn Storage> = warehouse::open(&config.warehouse)?;
        let clock = Clock::default();
        let shared = SinkShared {
            metrics: telemetry.metrics.clone(),
            health: telemetry.health.clone(),
            keys: FenceKeys::new(&config.source.group_id, &config.source.topic),
        };
        let sinks = start_sinks(&config, &telemetry, &shared, &driver, &storage, &clock)?;
        let source = start_source_and_timer(&config, &telemetry, sinks, storage, clock, driver)?;
        info!(topic = %config.source.topic, group = %config.source.group_id, shards = config.pipeline.shards(), "pipeline started");
        actix::spawn(shut_down_when(stop, source, shutdown_timeout));
        Ok(())
    });
    setup.context("starting the pipeline")?;
    telemetry.health.set_running();
    let budget = config.pipeline.memory_budget_mb.saturating_mul(1 << 20);
    telemetry
        .metrics
        .memory_budget_bytes
        .set(i64::try_from(budget).unwrap_or(i64::MAX));
    let code = system.run_with_code().context("running the actor system");
    // A partition-commit hook still running would outlive the process.
    anchorflow_actors::sinks::warehouse::hook::kill_running_hook();
    if matches!(code, Ok(0)) {
        release_instance_id(&config);
    }
    code
}

/// After a clean stop, hands this run's instance lease back (`protocol/lease.rs`), so
/// that the id may start on another host at once. Failing only delays that by the lease.
fn release_instance_id(config: &Config) {
    let keys = FenceKeys::new(&config.source.group_id, &config.source.topic);
    let timeout = Duration::from_secs(config.redis.command_timeout_secs);
    let released = fences::connect(&config.redis, timeout).and_then(|mut conn| {
        anchorflow_actors::protocol::lease::release_held_here(
            &mut conn,
            &keys,
            &config.source.instance_id,
        )
    });
    if let Err(error) = released {
        warn!(
            error = format!("{error:#}"),
            "could not release the instance lease: another host may start this instance id once it expires"
        );
    }
}

/// The warehouse's settings as the sink uses them: on object storage every open file
/// buffers one upload part, so the files open at once are held to the memory budget
/// (`runtime/memory.rs`).
fn warehouse_config(config: &Config) -> anchorflow_actors::config::WarehouseConfig {
    let mut warehouse = config.warehouse.clone();
    if warehouse.root.starts_with("s3://") {
        let part_bytes = warehouse.s3.part_size_mb << 20;
        warehouse.max_open_files = config
            .pipeline
            .memory()
            .open_uploads(warehouse.max_open_files, part_bytes);
    }
    warehouse
}
