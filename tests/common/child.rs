//! The `anchorflow` binary as child processes of a test: a private topic, group,
//! Redis database and warehouse per test ([`Setup`]), one child ([`Instance`]), a
//! child under a restart loop as systemd runs it ([`Supervised`]), and a background
//! producer ([`Producer`]). The oracle lives in the parent module.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;

/// `decode.max_ids` of every child: small, so that oversize `ids` arrays are cheap.
pub const MAX_IDS: usize = 40;

/// A test's private topic, group, Redis database and warehouse, and the `--set`
/// arguments that point a child process at them.
pub struct Setup {
    /// When the test began (Unix ms), for TTL checks.
    pub started: i64,
    /// Set when the test runs on librdkafka's mock cluster instead of tansu.
    _cluster:
        Option<rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>>,
    pub brokers: String,
    pub topic: String,
    pub group: String,
    pub url: String,
    pub partitions: i32,
    pub warehouse: tempfile::TempDir,
    /// Kept after the test (small), for diagnosing a failure.
    pub logs: PathBuf,
    /// `--set` overrides appended after the defaults of [`Setup::sets`].
    extra: Vec<String>,
    /// `time.window_size_ms` of the children, for the oracle (set by [`Setup::set`]).
    pub window_ms: i64,
    /// Keys of this Redis that belong to someone else (the oracle leaves them out).
    pub foreign: Vec<String>,
    /// `decode.max_ids` of the children (set by [`Setup::set`]).
    pub max_ids: usize,
    /// The warehouse's prefix in the test bucket when it lives there ([`Setup::on_s3`]).
    pub s3_prefix: Option<String>,
    spawned: Arc<AtomicUsize>,
}

impl Setup {
    /// A test against tansu, the real Kafka-protocol broker.
    pub fn new(name: &str, partitions: i32, redis_url: String) -> Self {
        Self::on_brokers(name, &brokers(), partitions, redis_url)
    }

    /// A test against a tansu broker of its own (see [`super::servers::TestBroker`]).
    pub fn on_brokers(name: &str, brokers: &str, partitions: i32, redis_url: String) -> Self {
        let topic = unique(name);
        create_topic_on(brokers, &topic, partitions);
        Self::with(None, brokers.to_string(), topic, partitions, redis_url)
    }

    /// A test against librdkafka's mock cluster, hosted by the test process. Used for
    /// consumer-group membership: tansu 0.6.0 never expires the session of a member
    /// that stops heartbeating, so a frozen or killed member would keep its
    /// partitions forever; the mock cluster expires it after `session.timeout.ms`.
    pub fn on_mock_cluster(name: &str, partitions: i32, redis_url: String) -> Self {
        let topic = unique(name);
        let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
        cluster
            .create_topic(&topic, partitions, 1)
            .expect("mock topic");
        let brokers = cluster.bootstrap_servers();
        Self::with(Some(cluster), brokers, topic, partitions, redis_url)
    }

    pub fn with(
        mock: Option<
            rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
        >,
        brokers: String,
        topic: String,
        partitions: i32,
        redis_url: String,
    ) -> Self {
        init_logs();
        flush_db(&redis_url);
        Setup {
            started: chrono::Utc::now().timestamp_millis(),
            _cluster: mock,
            brokers,
            group: format!("{topic}-group"),
            topic: topic.clone(),
            url: redis_url,
            partitions,
            warehouse: tempfile::tempdir().unwrap(),
            logs: {
                let dir = std::env::temp_dir()
                    .join("anchorflow-test-logs")
                    .join(&topic);
                std::fs::create_dir_all(&dir).unwrap();
                dir
            },
            extra: Vec::new(),
            window_ms: 60_000,
            foreign: Vec::new(),
            max_ids: MAX_IDS,
            s3_prefix: None,
            spawned: Arc::default(),
        }
    }

    pub fn sets(&self, instance: &str, metrics: &str) -> Vec<String> {
        [
            format!("kafka.bootstrap.servers={}", self.brokers),
            // A killed member leaves the group after this; keep the loop short.
            "kafka.session.timeout.ms=6000".into(),
            "kafka.heartbeat.interval.ms=500".into(),
            format!("source.topic={}", self.topic),
            format!("source.group_id={}", self.group),
            format!("source.instance_id={instance}"),
            "source.batch_max_records=256".into(),
            format!("redis.url={}", self.url),
            "redis.command_timeout_secs=5".into(),
            format!("warehouse.root={}", self.warehouse.path().display()),
            "warehouse.roll_interval_secs=1".into(),
            "pipeline.checkpoint_interval_ms=200".into(),
            "pipeline.aggregator_shards=2".into(),
            "pipeline.reader_threads=2".into(),
            "pipeline.revoke_timeout_ms=5000".into(),
            format!("decode.max_ids={MAX_IDS}"),
            format!("metrics.listen={metrics}"),
        ]
        .into_iter()
        .chain(self.extra.iter().cloned())
        .flat_map(|s| ["--set".to_string(), s])
        .collect()
    }

    /// Puts the warehouse in the test bucket (SeaweedFS), under a prefix of its own;
    /// [`Self::check`] reads it back from there.
    pub fn on_s3(mut self) -> Self {
        let prefix = self.topic.clone();
        self.extra.extend(super::bucket::s3_sets(&prefix));
        self.s3_prefix = Some(prefix);
        self
    }

    /// Adds a `--set` override for every instance started from now on.
    pub fn set(&mut self, assignment: impl Into<String>) -> &mut Self {
        let assignment = assignment.into();
        if let Some(ms) = assignment.strip_prefix("time.window_size_ms=") {
            self.window_ms = ms.parse().expect("a window size in ms");
        }
        if let Some(n) = assignment.strip_prefix("decode.max_ids=") {
            self.max_ids = n.parse().expect("a number of ids");
        }
        self.extra.push(assignment);
        self
    }

    /// What starts one `anchorflow run` child of this setup.
    pub fn launcher(&self, instance: &str, env: &[(&str, &str)], metrics: &str) -> Launcher {
        Launcher {
            args: self.sets(instance, metrics),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            instance: instance.to_string(),
            logs: self.logs.clone(),
            spawned: self.spawned.clone(),
            wrapper: Vec::new(),
        }
    }

    /// Starts `anchorflow run` as a child; its log goes to a file named after it.
    pub fn spawn(&self, instance: &str, env: &[(&str, &str)], metrics: &str) -> Instance {
        self.launcher(instance, env, metrics).spawn()
    }

    /// Starts `anchorflow run` under a restart loop, as systemd runs it.
    pub fn supervise(&self, instance: &str, env: &[(&str, &str)], metrics: &str) -> Supervised {
        Supervised::start(self.launcher(instance, env, metrics))
    }

    /// Runs `anchorflow fences …` to completion.
    /// The mock cluster this setup runs on, if it does (for fault injection).
    pub fn mock(
        &self,
    ) -> Option<&rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>>
    {
        self._cluster.as_ref()
    }

    /// Runs `anchorflow <args>` with this setup's settings plus `sets` to completion;
    /// returns its exit status, stdout and stderr.
    pub fn command(&self, args: &[&str], sets: &[&str]) -> (ExitStatus, String, String) {
        let out = Command::new(binary())
            .args(args)
            .args(self.sets("operator", ""))
            .args(sets.iter().flat_map(|s| ["--set", s]))
            .env("ANCHORFLOW_LOG", "warn")
            .output()
            .expect("running anchorflow");
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn fences_command(&self, args: &[&str]) -> (ExitStatus, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_anchorflow"))
            .arg("fences")
            .args(args)
            .args(self.sets("operator", ""))
            .output()
            .expect("running anchorflow fences");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status, text)
    }

    pub fn produce(&self, seed: u64, count: usize) -> Produced {
        produce_to(&self.brokers, &self.topic, self.partitions, seed, count)
    }

    /// Produces `records` round-robin over the partitions, one record per batch.
    pub fn produce_records(&self, records: Vec<Option<Vec<u8>>>) -> Produced {
        anchorflow::demo::produce(
            &self.brokers,
            &self.topic,
            self.partitions,
            records.into_iter(),
            true,
        )
        .expect("produce")
    }

    /// Produces `records` round-robin over the partitions as a real producer does,
    /// many records per batch: a read that resumes inside a batch must not lose the
    /// batch's rest (tansu 0.6.0 answers a fetch inside a batch with the batches after
    /// it, or with nothing at the partition's end).
    pub fn produce_batched(&self, records: Vec<Option<Vec<u8>>>) -> Produced {
        anchorflow::demo::produce(
            &self.brokers,
            &self.topic,
            self.partitions,
            records.into_iter(),
            false,
        )
        .expect("produce")
    }

    pub fn producer(
        &self,
        seed: u64,
        batch: usize,
        pause: Duration,
        max_batches: usize,
    ) -> Producer {
        Producer::start(
            &self.brokers,
            &self.topic,
            self.partitions,
            seed,
            batch,
            pause,
            max_batches,
        )
    }

    pub fn fences(&self) -> std::collections::BTreeMap<i32, (i64, i64, i64)> {
        stored_fences(&self.url, &self.group, &self.topic, self.partitions)
    }

    /// Sum of the owner epochs: grows by one with every claim of a partition.
    pub fn epochs(&self) -> i64 {
        self.fences().values().map(|(e, _, _)| (*e).max(0)).sum()
    }

    /// Sum of the Redis fences: progress.
    pub fn progress(&self) -> i64 {
        self.fences().values().map(|(_, r, _)| (*r).max(0)).sum()
    }

    pub fn wait_until(&self, what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting until {what}; fences {:?}; logs in {}",
                self.fences(),
                self.logs.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_drained(&self, produced: &Produced) {
        self.wait_until(
            "both sinks are fenced at the end of every partition",
            Duration::from_secs(180),
            || fenced_to_end(&self.url, &self.group, &self.topic, produced),
        );
    }

    /// [`Self::check`] for in-order data, plus that nothing was closed early: no
    /// correction rows, nothing published into a folder after its `_SUCCESS`.
    pub fn check_in_order(&self, produced: &Produced) {
        self.check(produced);
        let corrections: Vec<DwsRow> = read_dws(self.warehouse.path())
            .into_iter()
            .filter(|r| r.is_correction)
            .collect();
        assert!(
            corrections.is_empty(),
            "in-order data made {} correction rows: a window closed early; the first: {:?}",
            corrections.len(),
            &corrections[..corrections.len().min(3)]
        );
        let late = published_after_success(self.warehouse.path());
        assert!(
            late.is_empty(),
            "files published into folders after their _SUCCESS: {late:?}"
        );
    }

    /// The final comparison with the oracle.
    pub fn check(&self, produced: &Produced) {
        self.check_with(produced, Dws::Complete);
    }

    /// [`Self::check`] with an explicit expectation of the dws side.
    pub fn check_with(&self, produced: &Produced, dws: Dws) {
        if let Some(prefix) = &self.s3_prefix {
            let copied = super::bucket::download(prefix, self.warehouse.path());
            println!("read {copied} objects back from s3 prefix {prefix}");
            // Every crashed run's upload was aborted and its marker removed.
            let markers = hidden_files(self.warehouse.path());
            assert!(
                markers.is_empty(),
                "upload markers left in the bucket: {markers:?}"
            );
        }
        // The warehouse first: its report names the offset ranges a loss hit.
        check_warehouse(self.warehouse.path(), produced, self.max_ids, false);
        check_redis_except(
            &self.url,
            produced,
            self.max_ids,
            self.started,
            &self.foreign,
        );
        check_windows(
            &self.url,
            self.warehouse.path(),
            &self.group,
            &self.topic,
            produced,
            self.max_ids,
            WindowRules {
                window_ms: self.window_ms,
                dws,
            },
        );
        for (p, records) in produced {
            let (_, redis, warehouse) = self.fences()[p];
            assert_eq!(
                (redis, warehouse),
                (records.len() as i64, records.len() as i64),
                "fences of partition {p}"
            );
        }
    }
}

pub struct Instance {
    pub child: Child,
    pub log: PathBuf,
}

impl Instance {
    pub fn signal(&self, signal: &str) {
        if signal == "TERM" || signal == "INT" {
            self.wait_until_it_handles(signal);
        }
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal}");
    }

    /// Waits until the child has installed its handler for `signal` (its `SigCgt` mask
    /// in `/proc`), or has exited: a SIGTERM that comes before the handler kills the
    /// process by the default action, which no stop path of the product can see.
    fn wait_until_it_handles(&self, signal: &str) {
        let bit = match signal {
            "INT" => 2,
            _ => 15,
        };
        let status = format!("/proc/{}/status", self.child.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let Ok(text) = std::fs::read_to_string(&status) else {
                return;
            };
            let caught = text
                .lines()
                .find_map(|l| l.strip_prefix("SigCgt:"))
                .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok());
            match caught {
                Some(mask) if mask & (1 << (bit - 1)) != 0 => return,
                // A zombie (exited, not yet reaped) has no handlers: nothing to wait for.
                _ if text
                    .lines()
                    .any(|l| l.starts_with("State:") && l.contains('Z')) =>
                {
                    return
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        panic!(
            "the instance never installed a SIG{signal} handler; log:\n{}",
            self.tail()
        );
    }

    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "instance did not exit in {timeout:?}; log:\n{}",
                    self.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Graceful stop: SIGTERM, then exit code 0.
    pub fn stop(mut self) {
        self.signal("TERM");
        let status = self.wait_exit(Duration::from_secs(60));
        assert_eq!(
            status.code(),
            Some(0),
            "graceful stop; log:\n{}",
            self.tail()
        );
    }

    pub fn tail(&self) -> String {
        tail(&self.log)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Produces batches in the background until stopped; returns everything produced.
pub struct Producer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Produced>,
}

impl Producer {
    pub fn start(
        brokers: &str,
        topic: &str,
        partitions: i32,
        seed: u64,
        batch: usize,
        pause: Duration,
        max_batches: usize,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let topic = topic.to_string();
        let brokers = brokers.to_string();
        let thread = std::thread::spawn(move || {
            let mut produced = Produced::new();
            for i in 0..max_batches {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                extend(
                    &mut produced,
                    produce_to(&brokers, &topic, partitions, seed + i as u64, batch),
                );
                std::thread::sleep(pause);
            }
            produced
        });
        Producer { stop, thread }
    }

    pub fn finish(self) -> Produced {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("producer thread")
    }
}

/// One record per batch (tansu answers fetches inside a batch with nothing; see README).
pub fn produce_to(
    brokers: &str,
    topic: &str,
    partitions: i32,
    seed: u64,
    count: usize,
) -> Produced {
    anchorflow::demo::produce(
        brokers,
        topic,
        partitions,
        generate(seed, count, MAX_IDS).into_iter(),
        true,
    )
    .expect("produce")
}

/// xorshift: reproducible "random" moments from a printed seed.
pub fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, text))
}

/// Everything needed to start one `anchorflow run` child, again and again.
#[derive(Clone)]
pub struct Launcher {
    args: Vec<String>,
    env: Vec<(String, String)>,
    instance: String,
    logs: PathBuf,
    spawned: Arc<AtomicUsize>,
    /// A command the binary runs under (e.g. `setpriv …`), empty for none.
    wrapper: Vec<String>,
}

impl Launcher {
    /// Adds a `--set` override for this launcher's children only.
    pub fn with_set(mut self, assignment: &str) -> Self {
        self.args
            .extend(["--set".to_string(), assignment.to_string()]);
        self
    }

    /// Runs the binary under `wrapper` (its arguments followed by the binary's).
    pub fn wrapped(mut self, wrapper: &[&str]) -> Self {
        self.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn spawn(&self) -> Instance {
        let n = self.spawned.fetch_add(1, Ordering::SeqCst) + 1;
        let log = self.logs.join(format!("{n:03}-{}.log", self.instance));
        let binary = binary();
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        let child = command
            .arg("run")
            .args(&self.args)
            .env(
                "ANCHORFLOW_LOG",
                // ANCHORFLOW_TEST_CHILD_LOG (e.g. `debug`) for diagnosing a test.
                std::env::var("ANCHORFLOW_TEST_CHILD_LOG")
                    .unwrap_or_else(|_| "info,librdkafka=warn".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("starting anchorflow");
        Instance { child, log }
    }
}

/// The binary the children run: `ANCHORFLOW_TEST_BINARY` runs another build (the
/// release binary, whose timing differs, or an older one to see a test fail) under the
/// same tests; the suite's own build by default.
pub fn binary() -> String {
    std::env::var("ANCHORFLOW_TEST_BINARY")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_anchorflow").to_string())
}

/// How one run of a supervised child ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, `None` when a signal ended it.
    pub code: Option<i32>,
    pub log: PathBuf,
}

/// A child under a restart loop like systemd's `Restart=on-failure` with
/// `RestartPreventExitStatus=78`: restarted (after a short pause) whenever it exits
/// non-zero or by a signal, except with 78 (invalid configuration).
pub struct Supervised {
    stop: Arc<AtomicBool>,
    pid: Arc<AtomicU32>,
    exits: Arc<Mutex<Vec<Exit>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// systemd's `RestartSec` in the shipped unit is longer; the tests keep it short.
const RESTART_PAUSE: Duration = Duration::from_millis(300);

impl Supervised {
    pub fn start(launcher: Launcher) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let pid = Arc::new(AtomicU32::new(0));
        let exits: Arc<Mutex<Vec<Exit>>> = Arc::default();
        let (s, p, e) = (stop.clone(), pid.clone(), exits.clone());
        let thread = std::thread::spawn(move || loop {
            let mut instance = launcher.spawn();
            p.store(instance.child.id(), Ordering::SeqCst);
            let status = loop {
                if let Some(status) = instance.child.try_wait().expect("try_wait") {
                    break status;
                }
                if s.load(Ordering::SeqCst) {
                    instance.signal("TERM");
                    break instance.wait_exit(Duration::from_secs(90));
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            p.store(0, Ordering::SeqCst);
            let code = status.code();
            e.lock().unwrap().push(Exit {
                code,
                log: instance.log.clone(),
            });
            if s.load(Ordering::SeqCst) || code == Some(0) || code == Some(78) {
                return;
            }
            std::thread::sleep(RESTART_PAUSE);
        });
        Supervised {
            stop,
            pid,
            exits,
            thread: Some(thread),
        }
    }

    /// The running child's pid (0 between runs).
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::SeqCst)
    }

    /// How the runs so far ended.
    pub fn exits(&self) -> Vec<Exit> {
        self.exits.lock().unwrap().clone()
    }

    /// Whether the loop has ended (a clean exit or 78).
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the loop with SIGTERM to the running child and returns every run's end,
    /// however the last one ended (a stop during a fault may miss its deadline).
    pub fn terminate(mut self) -> Vec<Exit> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("supervisor thread");
        }
        self.exits()
    }

    /// Stops the loop with SIGTERM to the running child; returns every run's end. The
    /// last one must be the graceful stop (code 0).
    pub fn stop(self) -> Vec<Exit> {
        let exits = self.terminate();
        let last = exits.last().expect("at least one run");
        assert_eq!(
            last.code,
            Some(0),
            "the last run stops gracefully; log {}:\n{}",
            last.log.display(),
            tail(&last.log)
        );
        exits
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let pid = self.pid();
        if pid != 0 {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The last 40 lines of a log file.
pub fn tail(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
