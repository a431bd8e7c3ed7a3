//! The nemesis, in the manner of Jepsen: one driver runs the `anchorflow` binary under a
//! restart loop, as systemd does, against a private Redis, the mock Kafka cluster and a
//! warehouse on a disk of its own, while a seeded random schedule throws the
//! production faults the fault matrix knows one at a time at it, alone and two at once:
//! kill -9, SIGTERM, SIGSTOP (a zombie), Redis frozen, stopped, restarted, dropping
//! every connection, at `maxmemory`; the broker down or frozen; the warehouse disk
//! full; a second, slower instance joining and leaving.
//!
//! Then every fault is healed and the driver checks **liveness** (every partition
//! reaches its end within a bound, nothing stalled) and the oracle exactly (distinct
//! (partition, offset) pairs, every Redis key, every row, every window), plus that no
//! window closed early (in-order data makes no correction row) and no file was
//! published into a folder after its `_SUCCESS`.
//!
//! The seed and the schedule are printed first: `ANCHORFLOW_NEMESIS_SEED=<seed>`
//! replays a schedule, `ANCHORFLOW_NEMESIS_SECS` sets its length (a short one in the
//! test command; `scripts/nemesis.sh --minutes 30` for long runs). The group runs on
//! the mock cluster: tansu 0.6.0 never expires a killed member.

mod common;

use std::time::{Duration, Instant};

use common::child::*;
use common::servers::*;
use common::*;

/// The schedule's length when `ANCHORFLOW_NEMESIS_SECS` is not set.
const DEFAULT_SECS: u64 = 150;

/// How long the pipeline may take, once every fault is healed, to bring every
/// partition to its end: the liveness bound.
const LIVENESS: Duration = Duration::from_secs(180);

/// Records produced in all (a backlog first, then a few every tick the broker is up):
/// the mock cluster trims a partition at about 5 MB, and these stay well below.
const MAX_RECORDS: usize = 48_000;

/// Records produced per tick while the broker is up, in batches as a producer makes.
const PER_TICK: usize = 120;

/// How often held faults act again and records are produced.
const TICK: Duration = Duration::from_millis(300);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// SIGKILL to the instance (its restart loop starts it again).
    Kill9,
    /// SIGTERM: a graceful stop, then a new start.
    Term,
    /// SIGSTOP for the step, then SIGCONT: a zombie once the group moved on.
    Zombie,
    RedisFrozen,
    /// Redis stopped (connections refused), then started again from its AOF.
    RedisDown,
    /// Redis restarted at once (from its AOF).
    RedisRestart,
    /// Every client connection dropped, three times a second.
    RedisDropsConnections,
    /// Every write refused with OOM (`maxmemory` far below what the data set uses).
    RedisOom,
    /// The broker down (connections refused).
    BrokerDown,
    /// The broker frozen: every request answered after 30 s.
    BrokerFrozen,
    /// The warehouse's disk full.
    DiskFull,
    /// A second instance, its Redis sink five times slower, joins the group; at the
    /// step's end it leaves, gracefully or killed.
    SecondInstance,
}

const FAULTS: [Fault; 12] = [
    Fault::Kill9,
    Fault::Term,
    Fault::Zombie,
    Fault::RedisFrozen,
    Fault::RedisDown,
    Fault::RedisRestart,
    Fault::RedisDropsConnections,
    Fault::RedisOom,
    Fault::BrokerDown,
    Fault::BrokerFrozen,
    Fault::DiskFull,
    Fault::SecondInstance,
];

impl Fault {
    /// Faults that take the same thing down cannot be held at once.
    fn target(self) -> &'static str {
        match self {
            Fault::Kill9 | Fault::Term | Fault::Zombie => "instance",
            Fault::RedisFrozen
            | Fault::RedisDown
            | Fault::RedisRestart
            | Fault::RedisDropsConnections
            | Fault::RedisOom => "redis",
            Fault::BrokerDown | Fault::BrokerFrozen => "broker",
            Fault::DiskFull => "disk",
            Fault::SecondInstance => "second",
        }
    }
}

/// One step of the schedule: faults held together, then a pause with none.
#[derive(Clone, Debug)]
struct Step {
    faults: Vec<Fault>,
    hold: Duration,
    pause: Duration,
    /// For a second instance: whether it leaves killed instead of gracefully.
    kill_second: bool,
}

/// The schedule `seed` gives for `total` seconds.
fn schedule(mut seed: u64, total: Duration) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut planned = Duration::ZERO;
    while planned < total {
        let mut faults = vec![FAULTS[(next_random(&mut seed) % FAULTS.len() as u64) as usize]];
        if next_random(&mut seed) % 3 == 0 {
            let other = FAULTS[(next_random(&mut seed) % FAULTS.len() as u64) as usize];
            if other.target() != faults[0].target() {
                faults.push(other);
            }
        }
        // A zombie must outlast the group's session (6 s) to be one.
        let floor = if faults.contains(&Fault::Zombie) {
            8
        } else {
            2
        };
        let hold = Duration::from_secs(floor + next_random(&mut seed) % 12);
        let pause = Duration::from_secs(1 + next_random(&mut seed) % 5);
        let kill_second = next_random(&mut seed) % 2 == 0;
        planned += hold + pause;
        steps.push(Step {
            faults,
            hold,
            pause,
            kill_second,
        });
    }
    steps
}

/// Everything the faults act on.
struct World {
    setup: Setup,
    redis: TestRedis,
    admin: Option<redis::Connection>,
    disk: Tmpfs,
    metrics: String,
    primary: Option<Supervised>,
    second: Option<Supervised>,
    exits: Vec<Exit>,
    /// Where the records' event time starts.
    event_time_start: i64,
    /// Whether the second instance took part (it comes back for the drain).
    second_ran: bool,
    produced: Produced,
    seed: u64,
}

impl World {
    fn start_primary(&mut self) {
        self.primary = Some(self.setup.supervise("nemesis", &[], &self.metrics));
    }

    fn primary_pid(&self) -> u32 {
        self.primary.as_ref().map_or(0, Supervised::pid)
    }

    fn signal_primary(&self, signal: &str) {
        let pid = self.primary_pid();
        if pid != 0 {
            let _ = std::process::Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(pid.to_string())
                .status();
        }
    }

    fn produce(&mut self, count: usize) {
        let from = self.seed;
        self.seed += 1;
        // Event time starts at the wall clock and runs ahead of it (40 ms a record,
        // hundreds of records a second), as a live stream's does: a pause of the
        // producer that makes every partition idle moves the watermark on with
        // processing time, which then never passes records still to come.
        let start = self.event_time_start + self.records() as i64 * 40;
        let records = generate_spread(from, count, MAX_IDS, start, 40);
        extend(&mut self.produced, self.setup.produce_batched(records));
    }

    /// A few more records, while the budget lasts: reading goes on under every fault.
    fn produce_some(&mut self) {
        if self.records() + PER_TICK <= MAX_RECORDS {
            self.produce(PER_TICK);
        }
    }

    fn records(&self) -> usize {
        self.produced.values().map(Vec::len).sum()
    }

    fn begin(&mut self, fault: Fault) {
        match fault {
            Fault::Kill9 => self.signal_primary("KILL"),
            Fault::Term => {
                if let Some(primary) = self.primary.take() {
                    self.exits.extend(primary.terminate());
                }
                self.start_primary();
            }
            Fault::Zombie => self.signal_primary("STOP"),
            Fault::RedisFrozen => self.redis.pause(),
            Fault::RedisDown => {
                self.admin = None;
                self.redis.stop();
            }
            Fault::RedisRestart => {
                self.admin = None;
                self.redis.restart();
            }
            Fault::RedisDropsConnections => {}
            Fault::RedisOom => {
                let admin = admin_of(&self.redis, &mut self.admin);
                self.redis.set_maxmemory(admin, 1 << 20);
            }
            Fault::BrokerDown => self.mock().broker_down(1).expect("broker down"),
            Fault::BrokerFrozen => self
                .mock()
                .broker_round_trip_time(1, Duration::from_secs(30))
                .expect("broker rtt"),
            Fault::DiskFull => {
                let used = disk_used(self.setup.warehouse.path());
                self.disk
                    .remount(&format!("{}k", used / 1024 + 64), 100_000);
            }
            Fault::SecondInstance => {
                let slow = self
                    .setup
                    .launcher("nemesis-2", &[], "")
                    .with_set("redis.slowdown_factor=5");
                self.second = Some(Supervised::start(slow));
                self.second_ran = true;
            }
        }
    }

    /// What a fault does while it is held, every tick.
    fn tick(&mut self, fault: Fault) {
        if fault == Fault::RedisDropsConnections {
            let admin = admin_of(&self.redis, &mut self.admin);
            self.redis.kill_clients(admin);
        }
    }

    fn end(&mut self, fault: Fault, kill_second: bool) {
        match fault {
            Fault::Kill9 | Fault::Term | Fault::RedisRestart => {}
            Fault::Zombie => self.signal_primary("CONT"),
            Fault::RedisFrozen => self.redis.resume(),
            Fault::RedisDown => self.redis.restart(),
            Fault::RedisDropsConnections => {}
            Fault::RedisOom => {
                let admin = admin_of(&self.redis, &mut self.admin);
                self.redis.set_maxmemory(admin, 0);
            }
            Fault::BrokerDown => self.mock().broker_up(1).expect("broker up"),
            Fault::BrokerFrozen => self
                .mock()
                .broker_round_trip_time(1, Duration::ZERO)
                .expect("broker rtt"),
            Fault::DiskFull => self.disk.remount("1g", 100_000),
            Fault::SecondInstance => {
                if let Some(second) = self.second.take() {
                    if kill_second && second.pid() != 0 {
                        let _ = std::process::Command::new("kill")
                            .arg("-KILL")
                            .arg(second.pid().to_string())
                            .status();
                    }
                    self.exits.extend(second.terminate());
                }
            }
        }
    }

    fn mock(
        &self,
    ) -> &rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
        self.setup
            .mock()
            .expect("the nemesis runs on the mock cluster")
    }
}

/// The test's own connection to `redis`, opened again after Redis restarted.
fn admin_of<'a>(
    redis: &TestRedis,
    admin: &'a mut Option<redis::Connection>,
) -> &'a mut redis::Connection {
    admin.get_or_insert_with(|| redis.admin())
}

/// Bytes used on the filesystem holding `path`.
fn disk_used(path: &std::path::Path) -> u64 {
    let out = std::process::Command::new("df")
        .args(["--output=used", "-B1"])
        .arg(path)
        .output()
        .expect("df");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_random_schedule_of_faults_loses_nothing_and_every_partition_finishes() {
    let seed: u64 = std::env::var("ANCHORFLOW_NEMESIS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| chrono::Utc::now().timestamp_micros() as u64 | 1);
    let secs: u64 = std::env::var("ANCHORFLOW_NEMESIS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_SECS);
    let steps = schedule(seed, Duration::from_secs(secs));
    println!(
        "nemesis: seed {seed}, {secs} s (ANCHORFLOW_NEMESIS_SEED={seed} replays it); schedule:"
    );
    for (n, step) in steps.iter().enumerate() {
        println!(
            "  {n:3}: {:?} for {} s, then {} s quiet",
            step.faults,
            step.hold.as_secs(),
            step.pause.as_secs()
        );
    }

    let redis = TestRedis::start();
    let mut setup = Setup::on_mock_cluster("nemesis", 4, redis.url(1));
    setup
        .set("redis.command_timeout_secs=2")
        .set("time.idle_timeout_ms=3000")
        .set("time.window_size_ms=5000")
        .set("pipeline.max_uncommitted_records=2000")
        .set("pipeline.shutdown_timeout_secs=10")
        .set("pipeline.stall_timeout_secs=5");
    // More settings for every instance, comma-separated (`scripts/nemesis.sh --set`),
    // e.g. `redis.commit=transaction`.
    for assignment in std::env::var("ANCHORFLOW_NEMESIS_SET")
        .unwrap_or_default()
        .split(',')
        .filter(|a| !a.is_empty())
    {
        println!("nemesis: --set {assignment}");
        setup.set(assignment);
    }
    let disk = Tmpfs::mount(setup.warehouse.path(), "1g", 100_000);
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut world = World {
        setup,
        redis,
        admin: None,
        disk,
        metrics,
        primary: None,
        second: None,
        exits: Vec::new(),
        event_time_start: chrono::Utc::now().timestamp_millis(),
        second_ran: false,
        produced: Produced::new(),
        seed: seed % 1_000_000,
    };
    world.produce(12_000);
    world.start_primary();

    let started = Instant::now();
    for (n, step) in steps.iter().enumerate() {
        println!(
            "{:6.1} s, step {n}: {:?} for {} s",
            started.elapsed().as_secs_f64(),
            step.faults,
            step.hold.as_secs()
        );
        for &fault in &step.faults {
            world.begin(fault);
        }
        let broker_out = step
            .faults
            .iter()
            .any(|f| matches!(f, Fault::BrokerDown | Fault::BrokerFrozen));
        let held = Instant::now();
        while held.elapsed() < step.hold {
            for &fault in &step.faults {
                world.tick(fault);
            }
            if !broker_out {
                world.produce_some();
            }
            std::thread::sleep(TICK);
        }
        for &fault in step.faults.iter().rev() {
            world.end(fault, step.kill_second);
        }
        let quiet = Instant::now();
        while quiet.elapsed() < step.pause {
            world.produce_some();
            std::thread::sleep(TICK);
        }
    }

    // An instance that crashed leaves its in-progress files until it runs again (a
    // retired id's are the operator's, docs/exactly-once.md): a second instance that
    // took part comes back for the drain, as systemd would bring it back, and cleans
    // up once it holds its lease.
    if world.second_ran {
        world.begin(Fault::SecondInstance);
    }
    // Everything healed: every partition must reach its end within the bound.
    println!(
        "{:6.1} s: schedule over, {} records; draining",
        started.elapsed().as_secs_f64(),
        world.records()
    );
    let drained = Instant::now();
    let (url, group, topic) = (
        world.setup.url.clone(),
        world.setup.group.clone(),
        world.setup.topic.clone(),
    );
    while !fenced_to_end(&url, &group, &topic, &world.produced) {
        assert!(
            drained.elapsed() < LIVENESS,
            "liveness: not every partition reached its end {LIVENESS:?} after the last fault (seed {seed}); fences {:?}, produced {:?}; /readyz: {:?}; logs in {}",
            world.setup.fences(),
            world.produced.iter().map(|(p, r)| (*p, r.len())).collect::<Vec<_>>(),
            http_get(&world.metrics, "/readyz").map(|r| r.1),
            world.setup.logs.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("drained in {:.1} s", drained.elapsed().as_secs_f64());
    if let Some(second) = world.second.take() {
        // It stops once it has renewed its lease at a checkpoint and removed what it
        // left (its orphans go at its first barrier once the lease is its own).
        world.setup.wait_until(
            "the second instance cleaned up after itself",
            LIVENESS,
            || {
                hidden_files(world.setup.warehouse.path()).iter().all(|f| {
                    !f.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(".nemesis-2."))
                })
            },
        );
        world.exits.extend(second.stop());
    }
    let stalled = http_get(&world.metrics, "/metrics")
        .and_then(|(_, text)| metric(&text, "anchorflow_stalled_partitions"));
    let primary = world.primary.take().expect("the primary runs");
    world.exits.extend(primary.stop());
    let codes: Vec<Option<i32>> = world.exits.iter().map(|e| e.code).collect();
    println!("runs ended with {codes:?}");
    // Every end is one the faults explain: a stop (0), a stop that met a fault (1), a
    // full disk (74), fenced (75), or a signal. A panic (70), Redis state lost (76,
    // the AOF keeps it) or a config error (78) is a bug.
    let unexplained: Vec<&Exit> = world
        .exits
        .iter()
        .filter(|e| !matches!(e.code, None | Some(0 | 1 | 74 | 75)))
        .collect();
    assert!(
        unexplained.is_empty(),
        "runs ended in ways no fault explains (seed {seed}): {unexplained:?}"
    );
    assert_eq!(
        stalled,
        Some(0.0),
        "no partition stalled once drained (seed {seed})"
    );
    println!("checking the oracle (seed {seed})");
    world.setup.check_in_order(&world.produced);
}

#[test]
fn a_schedule_is_the_same_for_the_same_seed_and_mixes_every_fault() {
    let a = schedule(42, Duration::from_secs(600));
    let b = schedule(42, Duration::from_secs(600));
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
    for fault in FAULTS {
        assert!(
            a.iter().any(|s| s.faults.contains(&fault)),
            "{fault:?} never comes up in ten minutes"
        );
    }
    assert!(a.iter().any(|s| s.faults.len() == 2), "faults mixed");
    assert!(a
        .iter()
        .all(|s| s.faults.len() < 2 || s.faults[0].target() != s.faults[1].target()));
}
