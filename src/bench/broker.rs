//! The benchmark's Kafka broker in a process of its own: `anchorflow mock-serve` runs
//! librdkafka's mock cluster and prints its bootstrap address, so that the pipeline,
//! the bare consumer and the reference job all read over loopback TCP from another
//! process, as they would from a real broker (a mock cluster inside the benchmark
//! process competes with the reader for the same threads and reads ~10× slower).
//!
//! The child lives as long as its stdin: when the benchmark ends, however it ends, the
//! pipe closes and the broker exits.

use std::io::{BufRead as _, BufReader, Read as _};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context as _};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// A consumer of group `group` assigned every partition of `topic` from the beginning
/// (the bare consumer and the reference job read this way).
pub fn assigned_consumer(
    brokers: &str,
    topic: &str,
    partitions: i32,
    group: &str,
) -> anyhow::Result<BaseConsumer> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        // Once its queue passes `queued.max.messages.kbytes` (64 MiB; the preloaded
        // topic is about that), librdkafka postpones the next fetch by this long, 1 s by
        // default: a pause that would make the bare consumer's ceiling depend on when
        // its queue happened to fill.
        .set("fetch.queue.backoff.ms", "10")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    Ok(consumer)
}

/// `anchorflow mock-serve`: a mock cluster with `topic` until stdin closes.
pub fn serve(topic: &str, partitions: i32) -> anyhow::Result<()> {
    let cluster = MockCluster::new(1).context("starting the mock Kafka cluster")?;
    cluster
        .create_topic(topic, partitions, 1)
        .with_context(|| format!("creating topic {topic}"))?;
    println!("bootstrap.servers={}", cluster.bootstrap_servers());
    // Blocks until the parent closes our stdin (or dies).
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

/// A `mock-serve` child process.
pub struct MockBroker {
    child: Child,
    pub bootstrap: String,
}

impl MockBroker {
    pub fn start(topic: &str, partitions: i32) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the anchorflow binary")?;
        let mut child = Command::new(exe)
            .args(["mock-serve", "--topic", topic, "--partitions"])
            .arg(partitions.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting `anchorflow mock-serve`")?;
        let stdout = child.stdout.take().context("mock-serve stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .context("reading the mock broker's address")?;
        let Some(bootstrap) = line.trim().strip_prefix("bootstrap.servers=") else {
            let _ = child.kill();
            bail!("mock-serve printed {line:?} instead of its address");
        };
        Ok(MockBroker {
            bootstrap: bootstrap.to_string(),
            child,
        })
    }
}

impl MockBroker {
    /// The broker process, whose CPU the pipeline run reports beside its own.
    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

impl Drop for MockBroker {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}
