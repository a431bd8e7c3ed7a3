//! `anchorflow bench`: the figures of `docs/benchmarks.md`, measured in one run.
//!
//! 1. Preload N generated events into a broker (`--brokers`, e.g. the tansu that
//!    `scripts/bench.sh` starts; without it, librdkafka's in-process mock cluster).
//! 2. **Bare librdkafka read rate**: a `BaseConsumer` assigned every partition from the
//!    beginning, polling and touching each payload, nothing else.
//! 3. **Pipeline rate** from the same topic: from partition assignment until every
//!    record was processed by its reader (downstream mailboxes hold at most a few
//!    batches more), and the time until the last offset was committed (which waits for
//!    the next checkpoint).
//! 4. **Decode + route + aggregate** per core without Kafka: one thread over the same
//!    payloads.
//! 5. Redis commands per event, peak RSS (VmHWM), and RSS samples over the run, which
//!    with `--slow-sink-factor 10` shows memory staying flat behind a slow sink.
//!
//! The figures are printed; nothing here asserts on speed.

use std::time::{Duration, Instant};

use anchorflow_actors::aggregator::PartitionState;
use anchorflow_actors::config::Config;
use anchorflow_actors::logic::decode::decode;
use anchorflow_actors::messages::EventBatch;
use anchorflow_actors::reader::links::shard_of;
use anyhow::{bail, Context as _};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use crate::demo::{produce, start_throwaway_redis, ThrowawayRedis};
use crate::generator::{Generator, GeneratorConfig};
use crate::pipeline::{PipelineHandle, Telemetry};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchOptions {
    /// Events to preload.
    #[arg(long, default_value_t = 100_000)]
    pub events: usize,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 8)]
    pub partitions: i32,
    /// Kafka bootstrap servers; without it an in-process mock cluster is used (keep
    /// events × ~200 bytes / partitions under ~5 MB: the mock trims larger logs).
    #[arg(long)]
    pub brokers: Option<String>,
    /// Redis to write to; without it a throwaway redis-server is started.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Slow the Redis sink down by this factor (sleep factor × commit time after each
    /// commit) to show bounded memory.
    #[arg(long, default_value_t = 0)]
    pub slow_sink_factor: u32,
    /// Checkpoint interval for the run, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub checkpoint_interval_ms: u64,
    /// Events for the decode + route + aggregate measurement.
    #[arg(long, default_value_t = 2_000_000)]
    pub cpu_events: usize,
}

/// Resident set size and its peak, in bytes, from /proc/self/status.
pub fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn create_topic(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let results = runtime.block_on(admin.create_topics(
        &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
    ))?;
    for result in results {
        if let Err((name, code)) = result {
            bail!("creating topic {name}: {code}");
        }
    }
    Ok(())
}

/// Reads `expected` records from every partition with a bare consumer; returns the rate.
fn bare_read(brokers: &str, topic: &str, partitions: i32, expected: usize) -> anyhow::Result<f64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("bench-bare-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("queued.max.messages.kbytes", "16384")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let started = Instant::now();
    let (mut read, mut bytes) = (0usize, 0usize);
    while read < expected {
        if started.elapsed() > Duration::from_secs(300) {
            bail!("bare consumer read only {read} of {expected} records");
        }
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message?;
            bytes += message.payload().map_or(0, <[u8]>::len);
            read += 1;
        }
    }
    std::hint::black_box(bytes);
    Ok(read as f64 / started.elapsed().as_secs_f64())
}

/// Decode + route + aggregate on one thread; events per second.
fn cpu_rate(payloads: &[Option<Vec<u8>>], events: usize, config: &Config) -> f64 {
    let shards = config.pipeline.shards();
    let mut states: Vec<PartitionState> = (0..shards).map(|_| PartitionState::default()).collect();
    let mut batches: Vec<EventBatch> = (0..shards).map(|_| EventBatch::new(0)).collect();
    let started = Instant::now();
    let mut done = 0;
    'outer: loop {
        for payload in payloads {
            if let Ok(event) = decode(payload.as_deref(), &config.decode) {
                let shard = shard_of(event.business_id, shards);
                batches[shard].push(
                    done as i64,
                    event.state,
                    event.business_id,
                    event.log_timestamp,
                    event.ids.iter().map(|s| s.as_ref()),
                    event.message_id.as_deref(),
                );
                if batches[shard].events.len() >= 4096 {
                    states[shard].fold(&batches[shard], None);
                    batches[shard] = EventBatch::new(0);
                }
            }
            done += 1;
            if done >= events {
                break 'outer;
            }
        }
        // Start each pass with fresh state, as a checkpoint would.
        states = (0..shards).map(|_| PartitionState::default()).collect();
    }
    for (state, batch) in states.iter_mut().zip(&batches) {
        state.fold(batch, None);
    }
    std::hint::black_box(&states);
    done as f64 / started.elapsed().as_secs_f64()
}

/// Generates the benchmark's records and preloads them into the topic.
fn preload(
    config: &Config,
    options: &BenchOptions,
    brokers: &str,
    topic: &str,
) -> anyhow::Result<Vec<Option<Vec<u8>>>> {
    let generator = GeneratorConfig {
        bad_per_mille: 1,
        max_ids: config.decode.max_ids,
        ..Default::default()
    };
    let payloads: Vec<Option<Vec<u8>>> = Generator::new(generator)
        .take(options.events)
        .map(|g| g.value)
        .collect();
    let bytes: usize = payloads
        .iter()
        .map(|p| p.as_ref().map_or(0, Vec::len))
        .sum();
    let started = Instant::now();
    produce(
        brokers,
        topic,
        options.partitions,
        payloads.iter().cloned(),
        // A real broker (tansu) gets one record per batch; see `demo::produce`.
        options.brokers.is_some(),
    )?;
    println!(
        "preloaded: {} events, {:.1} MiB, {} partitions, in {:.1} s",
        options.events,
        mib(bytes as u64),
        options.partitions,
        started.elapsed().as_secs_f64()
    );
    Ok(payloads)
}

/// When the pipeline run reached its milestones, and the RSS it sampled.
struct Timeline {
    begin: Instant,
    assigned_at: Instant,
    processed_at: Instant,
    committed_at: Instant,
    rss_samples: Vec<u64>,
    exit_code: i32,
}

/// Runs the pipeline until every record is committed.
fn run_pipeline(config: &Config, telemetry: &Telemetry, total: i64) -> anyhow::Result<Timeline> {
    let metrics = &telemetry.metrics;
    let handle = PipelineHandle::spawn(config.clone(), telemetry.clone());
    let begin = Instant::now();
    let (mut assigned_at, mut processed_at) = (None, None);
    let mut rss_samples = Vec::new();
    let mut last_sample = Instant::now() - Duration::from_secs(1);
    while telemetry.health.committed_total() < total {
        if handle.is_finished() {
            bail!("pipeline stopped early");
        }
        if begin.elapsed() > Duration::from_secs(600) {
            bail!("pipeline did not finish within 600 s");
        }
        let now = Instant::now();
        if assigned_at.is_none() && metrics.partitions_assigned.get() > 0 {
            assigned_at = Some(now);
        }
        if processed_at.is_none() && metrics.records_read.get() as i64 >= total {
            processed_at = Some(now);
        }
        if now.duration_since(last_sample) >= Duration::from_millis(500) {
            rss_samples.push(rss().0);
            last_sample = now;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let committed_at = Instant::now();
    let exit_code = handle.stop()?;
    Ok(Timeline {
        begin,
        assigned_at: assigned_at.unwrap_or(begin),
        processed_at: processed_at.unwrap_or(committed_at),
        committed_at,
        rss_samples,
        exit_code,
    })
}

fn report(options: &BenchOptions, telemetry: &Telemetry, timeline: &Timeline, bare: f64) {
    let metrics = &telemetry.metrics;
    let events = options.events as f64;
    let pipeline_rate = events
        / timeline
            .processed_at
            .duration_since(timeline.assigned_at)
            .as_secs_f64();
    println!("pipeline_end_to_end_events_per_sec: {pipeline_rate:.0}");
    println!("pipeline_to_bare_ratio: {:.2}", pipeline_rate / bare);
    println!(
        "pipeline_time_to_last_commit_sec: {:.2} (group join {:.2} s not included; waits for the next checkpoint)",
        timeline.committed_at.duration_since(timeline.assigned_at).as_secs_f64(),
        timeline.assigned_at.duration_since(timeline.begin).as_secs_f64()
    );
    let commands = metrics.redis_commands.get() as f64;
    let operations = metrics.redis_script_operations.get() as f64;
    println!("redis_network_commands_per_event: {:.6}", commands / events);
    println!(
        "redis_operations_per_event_inside_scripts: {:.3}",
        operations / events
    );
    println!("partition_pauses: {}", metrics.partition_pauses.get());
    let mut durations: Vec<Duration> = telemetry.health.recent_checkpoints();
    durations.sort();
    let quantile = |q: f64| {
        durations
            .get(((durations.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "checkpoint_duration_ms: p50 {:.1} p99 {:.1} max {:.1} over {} checkpoints (interval {} ms)",
        quantile(0.5),
        quantile(0.99),
        quantile(1.0),
        durations.len(),
        options.checkpoint_interval_ms
    );
    println!("pipeline_exit_code: {}", timeline.exit_code);
}

pub fn run(mut config: Config, options: BenchOptions) -> anyhow::Result<()> {
    let mut _redis: Option<ThrowawayRedis> = None;
    let redis_url = match &options.redis_url {
        Some(url) => url.clone(),
        None => {
            let redis = start_throwaway_redis()
                .context("the benchmark needs redis-server (or --redis-url)")?;
            let url = redis.url.clone();
            _redis = Some(redis);
            url
        }
    };
    let mut _cluster = None;
    let brokers = match &options.brokers {
        Some(brokers) => brokers.clone(),
        None => {
            let cluster = MockCluster::new(1)?;
            let brokers = cluster.bootstrap_servers();
            _cluster = Some(cluster);
            brokers
        }
    };
    let topic = format!("anchorflow-bench-{}", chrono::Utc::now().timestamp_millis());
    match &_cluster {
        Some(cluster) => cluster.create_topic(&topic, options.partitions, 1)?,
        None => create_topic(&brokers, &topic, options.partitions)?,
    }
    let payloads = preload(&config, &options, &brokers, &topic)?;
    let bare = bare_read(&brokers, &topic, options.partitions, options.events)?;
    println!("bare_librdkafka_read_events_per_sec: {bare:.0}");

    let warehouse = tempfile::tempdir()?;
    config.kafka.0.insert("bootstrap.servers".into(), brokers);
    config.source.topic = topic.clone();
    config.source.group_id = format!("{topic}-pipeline");
    config.redis.url = redis_url;
    config.redis.slowdown_factor = options.slow_sink_factor;
    config.warehouse.root = warehouse.path().to_string_lossy().into_owned();
    config.warehouse.roll_interval_secs = 1;
    config.pipeline.checkpoint_interval_ms = options.checkpoint_interval_ms;
    let telemetry = Telemetry::default();
    let timeline = run_pipeline(&config, &telemetry, options.events as i64)?;
    report(&options, &telemetry, &timeline, bare);

    let cpu = cpu_rate(&payloads, options.cpu_events, &config);
    println!("decode_route_aggregate_events_per_sec_per_core: {cpu:.0}");
    let (_, peak) = rss();
    let shown: Vec<String> = timeline
        .rss_samples
        .iter()
        .map(|b| format!("{:.0}", mib(*b)))
        .collect();
    println!("rss_samples_mib_every_500ms: [{}]", shown.join(", "));
    println!("peak_rss_mib: {:.1}", mib(peak));
    Ok(())
}
