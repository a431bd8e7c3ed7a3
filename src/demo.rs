//! `anchorflow demo`: the whole product on an embedded default. It starts librdkafka's
//! mock cluster in-process, produces generated trace events (with a few malformed
//! ones), runs the full pipeline into Redis and `./warehouse`, stops it gracefully and
//! prints a summary with a funnel per template and a DuckDB query to copy.
//!
//! Redis: the URL given (default `redis://127.0.0.1:6379/9`, a database austin does not
//! use) if it answers; otherwise a throwaway `redis-server` on a free port if one is
//! installed; otherwise an error that says what to do.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anchorflow_actors::config::Config;
use anchorflow_actors::protocol::fences;
use anchorflow_actors::protocol::keys::FenceKeys;
use anyhow::{bail, Context as _};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

use crate::generator::{Generator, GeneratorConfig};
use crate::pipeline::{PipelineHandle, Telemetry};

#[derive(Clone, Debug)]
pub struct DemoOptions {
    pub events: usize,
    pub partitions: i32,
    pub redis_url: String,
    pub warehouse: PathBuf,
    pub metrics_listen: String,
}

/// A `redis-server` started for the demo, stopped when dropped.
pub struct ThrowawayRedis {
    child: Child,
    _dir: tempfile::TempDir,
    pub url: String,
    pub port: u16,
}

impl Drop for ThrowawayRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis_answers(url: &str) -> bool {
    redis::Client::open(url)
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
        .is_ok()
}

/// Starts `redis-server` on a free loopback port, without persistence.
pub fn start_throwaway_redis() -> anyhow::Result<ThrowawayRedis> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    start_redis_on(port)
}

/// Starts an empty `redis-server` without persistence on a given loopback port (a
/// test restarts Redis empty on the port its pipeline uses).
pub fn start_redis_on(port: u16) -> anyhow::Result<ThrowawayRedis> {
    let dir = tempfile::tempdir()?;
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting redis-server")?;
    let url = format!("redis://127.0.0.1:{port}/0");
    let started = Instant::now();
    while !redis_answers(&url) {
        if started.elapsed() > Duration::from_secs(10) {
            bail!("redis-server did not answer on port {port} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(ThrowawayRedis {
        child,
        _dir: dir,
        url,
        port,
    })
}

/// Produces `records` to `topic`, round-robin over partitions; returns them by partition.
///
/// With `one_per_batch`, every record is its own record batch. The tansu broker used by
/// the tests answers a fetch that starts in the middle of a stored batch with nothing
/// (real Kafka returns the containing batch), which stalls a consumer that resumes or
/// restarts mid-batch; one record per batch keeps every offset a batch boundary.
pub fn produce(
    brokers: &str,
    topic: &str,
    partitions: i32,
    records: impl Iterator<Item = Option<Vec<u8>>>,
    one_per_batch: bool,
) -> anyhow::Result<BTreeMap<i32, Vec<Option<Vec<u8>>>>> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set(
            "batch.num.messages",
            if one_per_batch { "1" } else { "10000" },
        )
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .set("message.max.bytes", "10000000")
        .create()
        .context("creating the producer")?;
    let mut sent: BTreeMap<i32, Vec<Option<Vec<u8>>>> = BTreeMap::new();
    for (i, value) in records.enumerate() {
        let partition = (i as i32) % partitions;
        loop {
            let mut record = BaseRecord::<(), [u8]>::to(topic).partition(partition);
            if let Some(v) = &value {
                record = record.payload(v.as_slice());
            }
            match producer.send(record) {
                Ok(()) => break,
                Err((e, _))
                    if e.rdkafka_error_code()
                        == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                {
                    producer.poll(Duration::from_millis(10));
                }
                Err((e, _)) => return Err(e).context("producing a record"),
            }
        }
        sent.entry(partition).or_default().push(value);
        producer.poll(Duration::ZERO);
    }
    flush_while_progressing(&producer, Duration::from_secs(60))?;
    Ok(sent)
}

/// Waits until every record is delivered, for as long as the broker keeps taking them;
/// fails once it has taken none for `stall`. (A fixed limit failed two fault tests
/// whose 150,000 records each, one per batch, tansu took more than 60 s to take on two
/// shared cores: slow, not stuck.)
fn flush_while_progressing(producer: &BaseProducer, stall: Duration) -> anyhow::Result<()> {
    let mut left = producer.in_flight_count();
    let mut progressed = Instant::now();
    while left > 0 {
        producer.poll(Duration::from_millis(100));
        let now = producer.in_flight_count();
        if now < left {
            (left, progressed) = (now, Instant::now());
        } else if progressed.elapsed() >= stall {
            bail!(
                "flushing the producer: {left} records not delivered, none in {} s",
                stall.as_secs()
            );
        }
    }
    Ok(())
}

/// Waits until the pipeline committed `total` offsets, or fails after `limit`.
pub fn wait_for_commits(
    handle: &PipelineHandle,
    total: i64,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let committed = handle.telemetry.health.committed_total();
        if committed >= total {
            return Ok(started.elapsed());
        }
        if handle.is_finished() {
            bail!("the pipeline stopped before committing all records ({committed} of {total})");
        }
        if started.elapsed() > limit {
            let by_partition = format!("{:?}", handle.telemetry.health.committed_offsets());
            bail!(
                "only {committed} of {total} records committed after {limit:?} (by partition: {by_partition}; pauses: {})",
                handle.telemetry.metrics.partition_pauses.get()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Redis for the demo: the URL given if it answers, else a throwaway server.
fn demo_redis(options: &DemoOptions) -> anyhow::Result<(String, Option<ThrowawayRedis>)> {
    if redis_answers(&options.redis_url) {
        println!(
            "redis: using {}",
            anchorflow_actors::config::redact_url_password(&options.redis_url)
        );
        return Ok((options.redis_url.clone(), None));
    }
    match start_throwaway_redis() {
        Ok(redis) => {
            println!("redis: nothing answers at {}; started a throwaway redis-server at {}", options.redis_url, redis.url);
            Ok((redis.url.clone(), Some(redis)))
        }
        Err(e) => bail!(
            "no Redis answers at {} and no redis-server could be started ({e:#}).\n\
             Install one (`sudo apt-get install redis-server`) or pass --redis-url redis://HOST:PORT/DB",
            options.redis_url
        ),
    }
}

/// Generates and produces the demo's records; returns how many were produced.
fn produce_demo_records(
    config: &Config,
    brokers: &str,
    options: &DemoOptions,
) -> anyhow::Result<usize> {
    let generator = GeneratorConfig {
        max_ids: config.decode.max_ids,
        ..Default::default()
    };
    let records: Vec<_> = Generator::new(generator).take(options.events).collect();
    let malformed = records.iter().filter(|r| r.bad.is_some()).count();
    let produced = produce(
        brokers,
        &config.source.topic,
        options.partitions,
        records.into_iter().map(|r| r.value),
        false,
    )?;
    let total: usize = produced.values().map(Vec::len).sum();
    println!("produced {total} records ({malformed} malformed on purpose)");
    Ok(total)
}

/// The topic was just created on a throwaway cluster: fences and published marks of an
/// earlier demo run describe a topic that no longer exists.
fn forget_earlier_runs(config: &Config, warehouse: &Path) -> anyhow::Result<()> {
    let keys = FenceKeys::new(&config.source.group_id, &config.source.topic);
    fences::connect(&config.redis, Duration::from_secs(5))
        .and_then(|mut conn| fences::forget(&mut conn, &keys))
        .context("clearing an earlier demo run's fences")?;
    anchorflow_actors::sinks::warehouse::marks::forget_published(
        &anchorflow_actors::sinks::warehouse::storage::LocalFs,
        warehouse,
        &config.source.group_id,
        &config.source.topic,
    )
    .context("clearing an earlier demo run's published marks")
}

pub fn run(mut config: Config, options: DemoOptions) -> anyhow::Result<i32> {
    let (redis_url, _throwaway) = demo_redis(&options)?;
    let cluster = MockCluster::new(1).context("starting the mock Kafka cluster")?;
    let topic = config.source.topic.clone();
    cluster
        .create_topic(&topic, options.partitions, 1)
        .context("creating the demo topic")?;
    let brokers = cluster.bootstrap_servers();
    println!(
        "kafka: librdkafka mock cluster at {brokers}, topic {topic} with {} partitions",
        options.partitions
    );
    let total = produce_demo_records(&config, &brokers, &options)?;
    config.kafka.0.insert("bootstrap.servers".into(), brokers);
    config.redis.url = redis_url.clone();
    forget_earlier_runs(&config, &options.warehouse)?;
    config.warehouse.root = options.warehouse.to_string_lossy().into_owned();
    let telemetry = Telemetry::default();
    if !options.metrics_listen.is_empty() {
        match crate::http::serve(&options.metrics_listen, telemetry.clone()) {
            Ok((addr, _)) => println!("metrics: http://{addr}/metrics"),
            Err(e) => println!("metrics: endpoint disabled ({e:#})"),
        }
    }
    let started = Instant::now();
    let handle = PipelineHandle::spawn(config.clone(), telemetry.clone())?;
    wait_for_commits(&handle, total as i64, Duration::from_secs(300))?;
    let code = handle.stop()?;
    let took = started.elapsed();
    drop(cluster);

    println!("\n== anchorflow demo summary ==");
    println!(
        "records: {total} in {:.1} s (including group join)",
        took.as_secs_f64()
    );
    print_dead_letters(&telemetry.metrics.encode());
    print_funnel(&redis_url, &config)?;
    print_warehouse(&options.warehouse);
    Ok(code)
}

fn print_dead_letters(encoded: &str) {
    let read = metric_value(encoded, "anchorflow_records_read_total");
    let decoded = metric_value(encoded, "anchorflow_events_decoded_total");
    println!("events decoded: {decoded:.0} of {read:.0} records read");
    println!("dead letters by reason:");
    for line in encoded
        .lines()
        .filter(|l| l.starts_with("anchorflow_dead_letters_total{"))
    {
        if let Some((labels, value)) = line.rsplit_once(' ') {
            if value != "0" {
                println!(
                    "  {:<20} {value}",
                    labels
                        .trim_start_matches("anchorflow_dead_letters_total{reason=\"")
                        .trim_end_matches("\"}")
                );
            }
        }
    }
}

fn print_warehouse(warehouse: &Path) {
    let files = parquet_files(warehouse);
    println!(
        "\nwarehouse: {} Parquet files under {}",
        files.len(),
        warehouse.display()
    );
    for table in ["ods_anchor_log", "dws_template_state_1m", "dead_letter"] {
        let n = files
            .iter()
            .filter(|f| f.to_string_lossy().contains(table))
            .count();
        println!("  {table:<21} {n} files");
    }
    let root = warehouse.canonicalize().unwrap_or(warehouse.to_path_buf());
    println!("\nquery it with DuckDB:");
    println!(
        "  duckdb -c \"SELECT business_id, state, count(*) AS events, sum(len(ids)) AS receivers \
         FROM read_parquet('{}/ods_anchor_log/*/*/*.parquet', hive_partitioning=true) \
         GROUP BY ALL ORDER BY business_id, state\"",
        root.display()
    );
    println!(
        "  duckdb -c \"SELECT window_start, business_id, state, sum(events) AS events \
         FROM read_parquet('{}/dws_template_state_1m/*/*.parquet', hive_partitioning=true) \
         GROUP BY ALL ORDER BY ALL LIMIT 20\"",
        root.display()
    );
}

fn metric_value(encoded: &str, name: &str) -> f64 {
    encoded
        .lines()
        .find(|l| l.starts_with(name) && l.as_bytes().get(name.len()) == Some(&b' '))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0.0)
}

fn print_funnel(redis_url: &str, config: &Config) -> anyhow::Result<()> {
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(5))?;
    let states = [10, 20, 22, 24, 30, 40, 50, 60, 64, 70];
    println!("\nper-template funnel (receivers, from the Redis hashes austin-web reads):");
    print!("  {:<18}", "businessId");
    for s in states {
        print!("{s:>7}");
    }
    println!();
    let mut keys = Vec::new();
    for index in 0..GeneratorConfig::default().templates {
        let base = Generator::business_id(index, GeneratorConfig::default().start_ms);
        keys.push(format!("{}{base}", config.redis.template_key_prefix));
    }
    for key in keys {
        let fields: BTreeMap<String, i64> = redis::cmd("HGETALL").arg(&key).query(&mut conn)?;
        if fields.is_empty() {
            continue;
        }
        print!("  {key:<18}");
        for s in states {
            print!("{:>7}", fields.get(&s.to_string()).copied().unwrap_or(0));
        }
        println!();
    }
    println!("  (states: 10 received, 20 discarded, 22/24 night-shielded, 30/40 deduplicated, 50 filtered, 60 sent, 64 clicked, 70 failed)");
    Ok(())
}

/// Published Parquet files under `root` (hidden in-progress files excluded).
pub fn parquet_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet")
                && !entry.file_name().to_string_lossy().starts_with(['.', '_'])
            {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}
