//! The services one benchmark run talks to: a Redis (the operator's, or a throwaway
//! one) and a broker (the operator's, or the out-of-process mock), and how the
//! pipeline under test is pointed at them.

use std::time::Duration;

use anyhow::{bail, Context as _};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::ClientConfig;

use super::child::PipelineChild;
use super::{broker, BenchOptions};
use crate::demo::{start_throwaway_redis, ThrowawayRedis};

/// The services one benchmark run talks to; they stop when this is dropped.
pub struct Ground {
    pub redis_url: String,
    pub brokers: String,
    pub topic: String,
    _redis: Option<ThrowawayRedis>,
    broker: Option<broker::MockBroker>,
}

impl Ground {
    pub fn start(options: &BenchOptions) -> anyhow::Result<Self> {
        let (redis_url, redis) = match &options.redis_url {
            Some(url) => (url.clone(), None),
            None => {
                let redis = start_throwaway_redis()
                    .context("the benchmark needs redis-server (or --redis-url)")?;
                (redis.url.clone(), Some(redis))
            }
        };
        let topic = format!("anchorflow-bench-{}", chrono::Utc::now().timestamp_millis());
        let (brokers, broker) = match &options.brokers {
            Some(brokers) => {
                create_topic(brokers, &topic, options.partitions)?;
                (brokers.clone(), None)
            }
            None => {
                let broker = broker::MockBroker::start(&topic, options.partitions)?;
                (broker.bootstrap.clone(), Some(broker))
            }
        };
        Ok(Ground {
            redis_url,
            brokers,
            topic,
            _redis: redis,
            broker,
        })
    }

    /// The mock broker's process, when the bench started it (not for `--brokers`).
    pub fn broker_pid(&self) -> Option<String> {
        self.broker.as_ref().map(broker::MockBroker::pid)
    }

    /// The `--set` overrides that point `anchorflow run` at this ground.
    pub fn pipeline_sets(
        &self,
        options: &BenchOptions,
        warehouse: &std::path::Path,
    ) -> Vec<String> {
        let mut sets = vec![
            format!("kafka.bootstrap.servers={}", self.brokers),
            format!("source.topic={}", self.topic),
            format!("source.group_id={}-pipeline", self.topic),
            format!("redis.url={}", self.redis_url),
            format!("redis.slowdown_factor={}", options.slow_sink_factor),
            format!("warehouse.root={}", warehouse.display()),
            // Files are durable (and the warehouse fence moves) when they are published;
            // publishing at every checkpoint, as Flink's bulk-format sink does, makes
            // "committed" mean the same in both sinks.
            "warehouse.roll_interval_secs=0".to_string(),
            format!(
                "pipeline.checkpoint_interval_ms={}",
                options.checkpoint_interval_ms
            ),
        ];
        if let Some(budget) = options.memory_budget_mb {
            sets.push(format!("pipeline.memory_budget_mb={budget}"));
        }
        sets.extend(options.sets.iter().cloned());
        sets
    }

    pub fn start_pipeline(
        &self,
        options: &BenchOptions,
        dir: &std::path::Path,
    ) -> anyhow::Result<PipelineChild> {
        let warehouse = dir.join("warehouse");
        std::fs::create_dir_all(&warehouse)?;
        let group = format!("{}-pipeline", self.topic);
        PipelineChild::start(
            &self.pipeline_sets(options, &warehouse),
            &self.redis_url,
            (&group, &self.topic, options.partitions),
            dir,
        )
    }
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
