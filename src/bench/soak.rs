//! `anchorflow bench --duration 10m`: the pipeline under a steady produce rate for a
//! long time. Every 10 s it prints the pipeline's RSS, what it committed in those 10 s,
//! how far committing trails what the broker acknowledged, the producer's own queue,
//! and the CPU the pipeline, Redis and the mock broker used; RSS and throughput should
//! stay flat (a leak or a slowdown shows as a trend, not as one figure).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anchorflow_actors::config::Config;
use anyhow::Context as _;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

use super::child::{cpu_of, rss_of};
use super::redis_probe::RedisProbe;
use super::{generator, mib, BenchOptions, Ground};

const REPORT_EVERY: Duration = Duration::from_secs(10);
/// Produce in ticks this long: rate / 100 records each.
const TICK: Duration = Duration::from_millis(10);

/// What the producer thread reports as it goes.
#[derive(Default)]
struct Produced {
    /// Records handed to the producer.
    sent: AtomicU64,
    /// Of those, the ones the broker has not acknowledged yet (the producer's queue).
    unacknowledged: AtomicU64,
}

/// Produces at `rate` records per second until `stop`; counts into `produced`.
fn produce_steadily(
    ground: &Ground,
    options: &BenchOptions,
    config: &Config,
    stop: Arc<AtomicBool>,
    produced: Arc<Produced>,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
    // A real broker (tansu) gets one record per batch, as in `demo::produce`. The mock
    // finds a fetch's offset by walking its record batches one by one, so it gets big
    // batches (a 200 ms linger), or it is soon the bottleneck.
    let (batch, linger) = match options.brokers {
        Some(_) => ("1", "5"),
        None => ("10000", "200"),
    };
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &ground.brokers)
        .set("batch.num.messages", batch)
        .set("linger.ms", linger)
        .create()
        .context("creating the producer")?;
    let (topic, partitions) = (ground.topic.clone(), options.partitions);
    let per_tick = (options.rate as f64 * TICK.as_secs_f64()).max(1.0) as u64;
    let mut records = generator(options, config);
    let thread = std::thread::spawn(move || -> anyhow::Result<()> {
        let started = Instant::now();
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let due = (started.elapsed().as_secs_f64() / TICK.as_secs_f64()) as u64 * per_tick;
            while sent < due {
                let value = records.next().and_then(|g| g.value);
                let partition = (sent % partitions as u64) as i32;
                let mut record = BaseRecord::<(), [u8]>::to(&topic).partition(partition);
                if let Some(v) = &value {
                    record = record.payload(v.as_slice());
                }
                if producer.send(record).is_err() {
                    producer.poll(Duration::from_millis(10));
                    continue; // queue full: the record is made again next round
                }
                sent += 1;
            }
            produced.sent.store(sent, Ordering::Relaxed);
            let queued = producer.in_flight_count().max(0) as u64;
            produced.unacknowledged.store(queued, Ordering::Relaxed);
            producer.poll(Duration::ZERO);
            std::thread::sleep(TICK);
        }
        producer.flush(Duration::from_secs(60))?;
        produced.sent.store(sent, Ordering::Relaxed);
        produced.unacknowledged.store(0, Ordering::Relaxed);
        Ok(())
    });
    Ok(thread)
}

/// The CPU the pipeline, Redis and (when it is the bench's own) the mock broker used
/// between two reports: a lag that grows over the soak shows whose work grew with it.
struct CpuWatch {
    pipeline: String,
    redis: RedisProbe,
    broker: Option<String>,
    last: [f64; 3],
}

impl CpuWatch {
    fn start(pipeline: &str, ground: &Ground) -> anyhow::Result<Self> {
        let mut watch = CpuWatch {
            pipeline: pipeline.to_string(),
            redis: RedisProbe::connect(&ground.redis_url)?,
            broker: ground.broker_pid(),
            last: [0.0; 3],
        };
        watch.last = watch.seconds()?;
        Ok(watch)
    }

    fn seconds(&mut self) -> anyhow::Result<[f64; 3]> {
        Ok([
            cpu_of(&self.pipeline),
            self.redis.cpu_seconds()?,
            self.broker.as_deref().map_or(0.0, cpu_of),
        ])
    }

    /// Each one's share of a core over the `wall` seconds since the last report.
    fn report(&mut self, wall: f64) -> anyhow::Result<String> {
        let now = self.seconds()?;
        let busy = |i: usize| 100.0 * (now[i] - self.last[i]) / wall;
        let mut line = format!(" cpu_pipeline={:.1}% cpu_redis={:.1}%", busy(0), busy(1));
        if self.broker.is_some() {
            line.push_str(&format!(" cpu_broker={:.1}%", busy(2)));
        }
        self.last = now;
        Ok(line)
    }
}

pub fn run(
    ground: &Ground,
    options: &BenchOptions,
    config: &Config,
    duration: Duration,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut child = ground.start_pipeline(options, dir.path())?;
    child.wait_assigned(Duration::from_secs(60))?;
    let (stop, produced) = (Arc::new(AtomicBool::new(false)), Arc::<Produced>::default());
    let producer = produce_steadily(ground, options, config, stop.clone(), produced.clone())?;
    println!(
        "soak: {} ev/s of {:?} data for {:?}, {} partitions",
        options.rate, options.data, duration, options.partitions
    );
    let started = Instant::now();
    let (mut last, mut last_committed) = (Instant::now(), 0i64);
    let mut cpu = CpuWatch::start(&child.pid(), ground)?;
    let mut rss = Vec::new();
    while started.elapsed() < duration {
        std::thread::sleep(Duration::from_millis(200));
        child.check_running()?;
        if last.elapsed() < REPORT_EVERY {
            continue;
        }
        let committed = child.committed()?;
        let rate = (committed - last_committed) as f64 / last.elapsed().as_secs_f64();
        // Records the broker has acknowledged, not the nominal rate × time nor what was
        // handed to the producer: a producer (or a mock broker) that falls behind is not
        // the pipeline's lag, and shows as its own queue.
        let queued = produced.unacknowledged.load(Ordering::Relaxed) as i64;
        let acknowledged = produced.sent.load(Ordering::Relaxed) as i64 - queued;
        let now_rss = rss_of(&child.pid()).0;
        rss.push(now_rss);
        let shares = cpu.report(last.elapsed().as_secs_f64())?;
        println!(
            "t={:>5.0}s rss_mib={:>6.1} committed_per_sec={:>7.0} behind_broker={} producer_queue={queued}{shares}",
            started.elapsed().as_secs_f64(),
            mib(now_rss),
            rate,
            (acknowledged - committed).max(0)
        );
        (last, last_committed) = (Instant::now(), committed);
    }
    stop.store(true, Ordering::Relaxed);
    producer
        .join()
        .map_err(|_| anyhow::anyhow!("the producer thread panicked"))??;
    let total = produced.sent.load(Ordering::Relaxed) as i64;
    let drain = Instant::now();
    while child.committed()? < total && drain.elapsed() < Duration::from_secs(120) {
        child.check_running()?;
        std::thread::sleep(Duration::from_millis(50));
    }
    let committed = child.committed()?;
    let peak = rss_of(&child.pid()).1;
    let exit_code = child.stop()?;
    let (low, high) = rss
        .iter()
        .fold((u64::MAX, 0), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    println!(
        "soak_produced: {total} committed: {committed} (in {:.1} s after producing stopped)",
        drain.elapsed().as_secs_f64()
    );
    println!(
        "soak_rss_mib: min {:.1} max {:.1} peak {:.1}; pipeline_exit_code: {exit_code}",
        mib(low.min(high)),
        mib(high),
        mib(peak)
    );
    Ok(())
}
