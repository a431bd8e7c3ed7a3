//! `anchorflow bench`: the figures of `docs/benchmarks.md`, each a ratio taken in one
//! run on one machine.
//!
//! 1. A broker out of process (`--brokers`, or `anchorflow mock-serve` as a child, see
//!    `bench/broker.rs`) is preloaded with N generated events: `--data redis-heavy` (a new
//!    message id per event, receivers drawn from a million: Redis does most of the
//!    work) or `--data funnel` (the demo's traffic).
//! 2. **Bare consumer**: a `BaseConsumer` reads every partition, touching each payload.
//! 3. **Reference job** (`bench/reference.rs`): a straight-line single-thread program doing
//!    the same Redis and Parquet writes at-least-once; and the floor: the same Redis
//!    writes for the whole input in one batch, the least Redis work for it.
//! 4. **Pipeline** (`bench/child.rs`): `anchorflow run` in its own process. The headline is
//!    *committed* records (durable in both sinks by the fences in Redis) per second,
//!    from partition assignment to the last fence. Redis's CPU seconds over the same
//!    wall time (`bench/redis_probe.rs`) say how busy Redis was.
//! 5. **Decode + route + aggregate** on one core against a straight loop (`bench/cpu.rs`).
//! 6. Peak RSS of the pipeline process against `pipeline.memory_budget_mb`,
//!    checkpoint p50/p99 and Redis's longest single command.
//! 7. The cores committing at half the bare consumer's rate takes at the least: the
//!    straight loop's decode plus Redis at the floor's cost (`bench/report.rs`).
//!
//! `--duration 10m` runs the soak instead (`bench/soak.rs`): a steady produce rate, RSS and
//! committed throughput printed every 10 s. The figures are printed; nothing here
//! asserts on speed.

mod broker;
mod child;
mod cpu;
mod ground;
mod redis_probe;
mod reference;
mod report;
mod soak;

use std::time::{Duration, Instant};

use anchorflow_actors::config::Config;
use anyhow::bail;
use rdkafka::Message;

pub use broker::serve as mock_serve;
use child::{cpu_of, rss_of};
use ground::Ground;
use redis_probe::RedisProbe;
use report::{report_cores_needed, report_pipeline, report_references, PipelineRun};

use crate::demo::produce;
use crate::generator::{Generator, GeneratorConfig, Shape};

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Data {
    /// A new message id per event and a million receivers: ~2.4 new Redis keys per event.
    RedisHeavy,
    /// The demo's funnel traffic: many events per key.
    Funnel,
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchOptions {
    /// The traffic to preload.
    #[arg(long, value_enum, default_value_t = Data::RedisHeavy)]
    pub data: Data,
    /// austin's batch sends on either `--data`: a tenth of the sends go to 2–19
    /// receivers at once, the rest to one.
    #[arg(long)]
    pub batch_sends: bool,
    /// Events to preload (the mock broker trims a partition past ~5 MB: keep
    /// events × ~150 bytes / partitions below that).
    #[arg(long, default_value_t = 400_000)]
    pub events: usize,
    /// Spread the events' times uniformly over this many hours (0: in order), so that
    /// every checkpoint writes into that many `hour=` folders at once: the open-file
    /// cap and, on a bucket, the part buffers are what hold memory then.
    #[arg(long, default_value_t = 0)]
    pub spread_hours: u64,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 16)]
    pub partitions: i32,
    /// Kafka bootstrap servers; without it `anchorflow mock-serve` runs as a child.
    #[arg(long)]
    pub brokers: Option<String>,
    /// Redis to write to (its database must be empty); without it a throwaway
    /// redis-server is started.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Slow the pipeline's Redis sink down by this factor (sleep factor × commit time
    /// after each commit): memory must stay within the budget.
    #[arg(long, default_value_t = 0)]
    pub slow_sink_factor: u32,
    /// `pipeline.checkpoint_interval_ms` of the pipeline run.
    #[arg(long, default_value_t = 1000)]
    pub checkpoint_interval_ms: u64,
    /// `pipeline.memory_budget_mb` of the pipeline run (default: the configured one).
    #[arg(long)]
    pub memory_budget_mb: Option<u64>,
    /// Events for the decode + route + aggregate measurement.
    #[arg(long, default_value_t = 2_000_000)]
    pub cpu_events: usize,
    /// Measure only decode + route + aggregate against the straight loop (no broker,
    /// no Redis): the CPU figure alone, quick to repeat.
    #[arg(long)]
    pub cpu_only: bool,
    /// Skip the reference job (e.g. for memory runs).
    #[arg(long)]
    pub skip_reference: bool,
    /// Keep the pipeline's folder (its log and warehouse) and print where it is.
    #[arg(long)]
    pub keep: bool,
    /// Run the soak for this long instead (`90s`, `10m`, `1h`).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Events per second produced during the soak.
    #[arg(long, default_value_t = 5_000)]
    pub rate: u64,
    /// More `section.field=value` overrides for the pipeline run, applied last (e.g.
    /// `warehouse.root=s3://bucket/prefix` and `warehouse.s3.*` for a bucket).
    #[arg(long = "pipeline-set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(text.trim_end_matches(char::is_alphabetic).len());
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}`: expected e.g. 90s, 10m or 1h"))?;
    match unit {
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("`{text}`: the unit must be s, m or h")),
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn generator(options: &BenchOptions, config: &Config) -> Generator {
    Generator::new(GeneratorConfig {
        bad_per_mille: 1,
        max_ids: config.decode.max_ids,
        shape: match options.data {
            Data::RedisHeavy => Shape::RedisHeavy {
                receivers: 1_000_000,
            },
            Data::Funnel => Shape::Funnel,
        },
        spread_ms: options.spread_hours * 3_600_000,
        batch_sends: options.batch_sends,
        ..Default::default()
    })
}

/// Reads `expected` records from every partition with a bare consumer; returns the rate.
fn bare_read(ground: &Ground, partitions: i32, expected: usize) -> anyhow::Result<f64> {
    let group = format!("bench-bare-{}", std::process::id());
    let consumer = broker::assigned_consumer(&ground.brokers, &ground.topic, partitions, &group)?;
    let mut started = None;
    let (mut read, mut bytes) = (0usize, 0usize);
    let deadline = Instant::now() + Duration::from_secs(300);
    while read < expected {
        if Instant::now() > deadline {
            bail!("bare consumer read only {read} of {expected} records");
        }
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message?;
            started.get_or_insert_with(Instant::now);
            bytes += message.payload().map_or(0, <[u8]>::len);
            read += 1;
        }
    }
    std::hint::black_box(bytes);
    let took = started.map_or(Duration::ZERO, |s: Instant| s.elapsed());
    Ok(read as f64 / took.as_secs_f64())
}

/// The pipeline's time with a commit script sent to Redis and its reply not yet read.
const SCRIPT_SECONDS: &str = "anchorflow_redis_script_seconds_sum";

/// Runs `anchorflow run` until every preloaded record is durable in both sinks.
fn run_pipeline(
    ground: &Ground,
    options: &BenchOptions,
    probe: &mut RedisProbe,
) -> anyhow::Result<PipelineRun> {
    let dir = tempfile::tempdir()?;
    let (path, _removed_at_end) = if options.keep {
        let path = dir.keep();
        println!("pipeline folder (kept): {}", path.display());
        (path, None)
    } else {
        (dir.path().to_path_buf(), Some(dir))
    };
    let begin = Instant::now();
    let mut child = ground.start_pipeline(options, &path)?;
    child.wait_assigned(Duration::from_secs(60))?;
    let assigned = Instant::now();
    let cpu_before = probe.cpu_seconds()?;
    let own_cpu_before = cpu_of(&child.pid());
    let broker_pid = ground.broker_pid();
    let broker_cpu_before = broker_pid.as_deref().map(cpu_of);
    probe.watch_slowlog()?;
    let scripts_before = child.metric(SCRIPT_SECONDS).unwrap_or(0.0);
    let total = options.events as i64;
    let (mut rss_samples, mut last_sample) = (Vec::new(), Instant::now());
    let mut redis_drain = None;
    loop {
        let (both, in_redis) = child.fenced()?;
        if in_redis >= total && redis_drain.is_none() {
            redis_drain = Some(assigned.elapsed());
        }
        if both >= total {
            break;
        }
        child.check_running()?;
        if assigned.elapsed() > Duration::from_secs(900) {
            bail!("the pipeline did not commit {total} records within 900 s");
        }
        if last_sample.elapsed() >= Duration::from_millis(500) {
            rss_samples.push(rss_of(&child.pid()).0);
            last_sample = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let drain = assigned.elapsed();
    let redis_cpu_secs = probe.cpu_seconds()? - cpu_before;
    let own_cpu_secs = cpu_of(&child.pid()) - own_cpu_before;
    let broker_cpu_secs = broker_pid
        .as_deref()
        .zip(broker_cpu_before)
        .map(|(pid, before)| cpu_of(pid) - before);
    let script_secs = child.metric(SCRIPT_SECONDS).unwrap_or(0.0) - scripts_before;
    let longest = probe.longest()?;
    let checkpoints = child.checkpoints();
    let uncommitted_pauses = child
        .metric("anchorflow_uncommitted_pauses_total")
        .unwrap_or(0.0);
    let peak_rss = rss_of(&child.pid()).1;
    let exit_code = child.stop()?;
    Ok(PipelineRun {
        committed_per_sec: total as f64 / drain.as_secs_f64(),
        drain_secs: drain.as_secs_f64(),
        redis_drain_secs: redis_drain.unwrap_or(drain).as_secs_f64(),
        join_secs: assigned.duration_since(begin).as_secs_f64(),
        redis_cpu_secs,
        own_cpu_secs,
        broker_cpu_secs,
        script_secs,
        rss_samples,
        peak_rss,
        checkpoints,
        longest,
        uncommitted_pauses,
        exit_code,
    })
}

/// The reference job's figures: committed ev/s and Redis CPU seconds.
fn run_reference(
    ground: &Ground,
    options: &BenchOptions,
    config: &Config,
    probe: &mut RedisProbe,
    writes: reference::Writes,
) -> anyhow::Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let target = reference::Target {
        writes,
        brokers: &ground.brokers,
        topic: &ground.topic,
        partitions: options.partitions,
        redis_url: &ground.redis_url,
        warehouse: dir.path(),
    };
    let cpu_before = probe.cpu_seconds()?;
    let started = Instant::now();
    let rate = reference::run(config, &target, options.events)?;
    let wall = started.elapsed().as_secs_f64();
    let cpu = probe.cpu_seconds()? - cpu_before;
    // The pipeline must start from an empty database, as the reference did.
    probe.flush()?;
    let per_event = cpu * 1e6 / options.events as f64;
    if writes == reference::Writes::Floor {
        println!(
            "redis_floor_cpu_us_per_event: {per_event:.2}   (the Multi reference's commands for the whole input in one batch, every key written once, no MULTI: the least Redis work for this input)"
        );
        return Ok((rate, cpu));
    }
    println!("reference_{writes:?}_committed_events_per_sec: {rate:.0}");
    println!(
        "redis_cpu_us_per_event_reference_{writes:?}: {per_event:.2}   (Redis busy {:.0} % of its {wall:.2} s)",
        100.0 * cpu / wall,
    );
    Ok((rate, cpu))
}

/// Both reference runs: `(writes, committed ev/s, Redis CPU s)`.
fn run_references(
    ground: &Ground,
    options: &BenchOptions,
    config: &Config,
    probe: &mut RedisProbe,
) -> anyhow::Result<Vec<(reference::Writes, f64, f64)>> {
    let mut out = Vec::new();
    if !options.skip_reference {
        use reference::Writes;
        for writes in [Writes::Script, Writes::Multi, Writes::Floor] {
            let (rate, cpu) = run_reference(ground, options, config, probe, writes)?;
            out.push((writes, rate, cpu));
        }
    }
    Ok(out)
}

/// Payload bytes per partition the mock broker keeps all of: it trims a partition
/// past ~5 MB (records plus their overhead), oldest first.
const MOCK_PARTITION_BYTES: usize = 4_500_000;

/// Refuses a run whose payloads the mock broker would trim (the runs would wait forever
/// for records it dropped). A broker of the caller's own (`--brokers`) is not checked.
fn check_mock_capacity(options: &BenchOptions, bytes: usize) -> anyhow::Result<()> {
    let per_partition = bytes / options.partitions.max(1) as usize;
    if options.brokers.is_none() && per_partition > MOCK_PARTITION_BYTES {
        bail!(
            "--events {} over --partitions {} is {:.1} MiB per partition; the mock broker \
             trims a partition at ~5 MB, and the runs would wait for records it dropped: \
             use fewer events, more partitions, or --brokers",
            options.events,
            options.partitions,
            mib(per_partition as u64)
        );
    }
    Ok(())
}

/// The benchmark's records, generated and checked against the mock's capacity before
/// any server starts.
fn generate(config: &Config, options: &BenchOptions) -> anyhow::Result<Vec<Option<Vec<u8>>>> {
    let payloads: Vec<Option<Vec<u8>>> = generator(options, config)
        .take(options.events)
        .map(|g| g.value)
        .collect();
    check_mock_capacity(options, payload_bytes(&payloads))?;
    Ok(payloads)
}

fn payload_bytes(payloads: &[Option<Vec<u8>>]) -> usize {
    payloads
        .iter()
        .map(|p| p.as_ref().map_or(0, Vec::len))
        .sum()
}

/// Preloads the generated records into the topic.
fn preload(
    options: &BenchOptions,
    ground: &Ground,
    payloads: &[Option<Vec<u8>>],
) -> anyhow::Result<()> {
    let bytes = payload_bytes(payloads);
    let started = Instant::now();
    produce(
        &ground.brokers,
        &ground.topic,
        options.partitions,
        payloads.iter().cloned(),
        // A real broker (tansu) gets one record per batch; see `demo::produce`.
        options.brokers.is_some(),
    )?;
    println!(
        "preloaded: {} {:?}{} events, {:.1} MiB ({:.0} B each), {} partitions, in {:.1} s",
        options.events,
        options.data,
        if options.batch_sends {
            " batch-send"
        } else {
            ""
        },
        mib(bytes as u64),
        bytes as f64 / options.events as f64,
        options.partitions,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn run(config: Config, options: BenchOptions) -> anyhow::Result<()> {
    let payloads = match options.duration {
        Some(_) => Vec::new(),
        None => generate(&config, &options)?,
    };
    if options.cpu_only {
        return cpu::report(&payloads, options.cpu_events, &config).map(drop);
    }
    let ground = Ground::start(&options)?;
    let mut probe = RedisProbe::connect(&ground.redis_url)?;
    if probe.keys()? > 0 {
        bail!("the benchmark's Redis database must be empty (it is flushed between runs)");
    }
    if let Some(duration) = options.duration {
        return soak::run(&ground, &options, &config, duration);
    }
    preload(&options, &ground, &payloads)?;
    let bare = bare_read(&ground, options.partitions, options.events)?;
    println!("bare_consumer_events_per_sec: {bare:.0}");
    let references = run_references(&ground, &options, &config, &mut probe)?;
    let run = run_pipeline(&ground, &options, &mut probe)?;
    report_pipeline(&options, &config, &run, bare);
    let floor_secs = report_references(options.events, bare, &run, references);
    let straight = cpu::report(&payloads, options.cpu_events, &config)?;
    if let Some(redis_secs) = floor_secs {
        report_cores_needed(bare, straight, redis_secs);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchOptions,
    }

    fn options(args: &[&str]) -> BenchOptions {
        Cli::parse_from(std::iter::once("bench").chain(args.iter().copied())).bench
    }

    /// 40,000 events of ~150 B on one partition are ~5.7 MiB for the mock broker, which
    /// keeps ~5 MB per partition: refused before any server starts, naming the figures.
    /// The same events on two partitions, or on a broker of one's own, run.
    #[test]
    fn a_run_the_mock_broker_would_trim_is_refused_before_it_starts() {
        let config = Config::default();
        let one = options(&["--events", "40000", "--partitions", "1"]);
        let message = match generate(&config, &one) {
            Ok(payloads) => panic!("{} records accepted for one partition", payloads.len()),
            Err(error) => format!("{error:#}"),
        };
        assert!(
            message.contains("--events 40000 over --partitions 1")
                && message.contains("MiB per partition")
                && message.contains("--brokers"),
            "{message}"
        );
        let fits = generate(
            &config,
            &options(&["--events", "40000", "--partitions", "2"]),
        )
        .expect("two partitions hold them");
        assert_eq!(fits.len(), 40_000);
        let own_broker = options(&[
            "--events",
            "40000",
            "--partitions",
            "1",
            "--brokers",
            "127.0.0.1:9",
        ]);
        assert!(generate(&config, &own_broker).is_ok());
    }
}
