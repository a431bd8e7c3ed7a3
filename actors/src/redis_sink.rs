//! `RedisSink`: writes the austin-compatible keys (DESIGN §3.1).
//!
//! It waits until every aggregator shard has handed over its flush for a checkpoint,
//! merges them, and applies the whole checkpoint with **one** `EVALSHA` of
//! [`COMMIT_SCRIPT`]: per distinct receiver one `LPUSH` of all its values plus one
//! `PEXPIREAT` (end of the current day in the configured zone), per message id one
//! `LPUSH` plus `PEXPIRE`, per template one `HINCRBY` per state plus `PEXPIRE`. The
//! network sees one command per checkpoint instead of austin's `2 + 2·len(ids)` per
//! event. A failed commit is retried with capped backoff until it succeeds: an outage
//! pauses progress (the shards, then the readers, then Kafka wait) and loses nothing.
//! Only after success does the sink report its fences to the source.

use std::collections::BTreeMap;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use redis::aio::MultiplexedConnection;
use rustc_hash::FxHashMap;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::config::RedisConfig;
use crate::messages::{
    CheckpointSpec, PartitionDelta, ShardFlush, SinkKind, SourceNotice, TraceValue,
};
use crate::metrics::{ActorLabel, MailboxMeter, Metrics, SinkLabel};
use crate::tables::end_of_day_ms;

/// Mailbox capacity: one flush per shard per checkpoint is all that is ever queued,
/// because a shard waits for its flush to be taken before it handles anything else.
pub const REDIS_SINK_MAILBOX: usize = 64;

/// Applies one checkpoint. ARGV layout, all counts explicit so the script needs no
/// parsing: `L`, then per list `key, pexpireat_ms, pexpire_ms, n, v1..vn` (one of the
/// two expiries is 0); then `H`, then per hash `key, pexpire_ms, m, (field, delta)×m`.
/// `LPUSH` is called with at most 1000 values at a time (Lua's `unpack` limit).
pub const COMMIT_SCRIPT: &str = r#"
local i = 1
local lists = tonumber(ARGV[i]); i = i + 1
local ops = 0
for _ = 1, lists do
  local key = ARGV[i]
  local at = tonumber(ARGV[i + 1])
  local ttl = tonumber(ARGV[i + 2])
  local n = tonumber(ARGV[i + 3])
  i = i + 4
  local last = i + n - 1
  local j = i
  while j <= last do
    local upto = math.min(j + 999, last)
    redis.call('LPUSH', key, unpack(ARGV, j, upto))
    ops = ops + 1
    j = upto + 1
  end
  i = last + 1
  if at > 0 then redis.call('PEXPIREAT', key, at) else redis.call('PEXPIRE', key, ttl) end
  ops = ops + 1
end
local hashes = tonumber(ARGV[i]); i = i + 1
for _ = 1, hashes do
  local key = ARGV[i]
  local ttl = tonumber(ARGV[i + 1])
  local m = tonumber(ARGV[i + 2])
  i = i + 3
  for _ = 1, m do
    redis.call('HINCRBY', key, ARGV[i], ARGV[i + 1])
    i = i + 2
  end
  redis.call('PEXPIRE', key, ttl)
  ops = ops + m + 1
end
return ops
"#;

/// Counters of the sink, for tests and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedisSinkCounters {
    /// Checkpoints applied.
    pub commits: u64,
    /// Failed attempts (each retried).
    pub errors: u64,
}

pub struct RedisSink {
    restart: crate::backoff::RestartBackoff,
    config: RedisConfig,
    tz: chrono_tz::Tz,
    shards: usize,
    metrics: Metrics,
    own_meter: MailboxMeter,
    notices: Sender<SourceNotice>,
    conn: Option<MultiplexedConnection>,
    script: redis::Script,
    pending: BTreeMap<u64, Vec<ShardFlush>>,
    counters: RedisSinkCounters,
}

impl RedisSink {
    pub fn new(
        config: RedisConfig,
        tz: chrono_tz::Tz,
        shards: usize,
        metrics: Metrics,
        notices: Sender<SourceNotice>,
    ) -> Self {
        RedisSink {
            restart: Default::default(),
            config,
            tz,
            shards,
            own_meter: metrics.mailbox("redis_sink"),
            metrics,
            notices,
            conn: None,
            script: redis::Script::new(COMMIT_SCRIPT),
            pending: BTreeMap::new(),
            counters: RedisSinkCounters::default(),
        }
    }

    pub fn counters(&self) -> RedisSinkCounters {
        self.counters
    }
}

/// A merged checkpoint, ready to send.
struct Commit {
    spec: Arc<CheckpointSpec>,
    args: Vec<Vec<u8>>,
    fences: Vec<(i32, i64)>,
}

/// Merges the shards' flushes of one checkpoint into the script's arguments. Shards own
/// disjoint templates but share receivers and message ids, so lists are merged by key.
fn build_commit(
    config: &RedisConfig,
    tz: chrono_tz::Tz,
    flushes: Vec<ShardFlush>,
) -> Option<Commit> {
    let spec = flushes.first()?.spec.clone();
    let mut fences: BTreeMap<i32, i64> = BTreeMap::new();
    let mut receivers: FxHashMap<String, Vec<TraceValue>> = FxHashMap::default();
    let mut messages: FxHashMap<String, Vec<TraceValue>> = FxHashMap::default();
    let mut templates: BTreeMap<i64, BTreeMap<i32, i64>> = BTreeMap::new();
    for flush in flushes {
        for delta in flush.partitions {
            let PartitionDelta {
                partition,
                next_offset,
                template_counts,
                receiver_lists,
                message_lists,
            } = delta;
            fences.insert(partition, next_offset);
            for (business_id, state, n) in template_counts {
                *templates
                    .entry(business_id)
                    .or_default()
                    .entry(state)
                    .or_insert(0) += n;
            }
            for push in receiver_lists {
                receivers.entry(push.key).or_default().extend(push.values);
            }
            for push in message_lists {
                messages.entry(push.key).or_default().extend(push.values);
            }
        }
    }
    let day_end = end_of_day_ms(tz, chrono::Utc::now());
    let message_ttl_ms = (config.message_ttl_secs * 1000).to_string();
    let template_ttl_ms = (config.template_ttl_secs * 1000).to_string();
    let mut args: Vec<Vec<u8>> = Vec::new();
    args.push((receivers.len() + messages.len()).to_string().into_bytes());
    let push_list =
        |args: &mut Vec<Vec<u8>>, key: String, at: String, ttl: &str, values: Vec<TraceValue>| {
            args.push(key.into_bytes());
            args.push(at.into_bytes());
            args.push(ttl.as_bytes().to_vec());
            args.push(values.len().to_string().into_bytes());
            args.extend(values.iter().map(|v| v.to_json().into_bytes()));
        };
    for (key, values) in receivers {
        push_list(
            &mut args,
            format!("{}{key}", config.receiver_key_prefix),
            day_end.to_string(),
            "0",
            values,
        );
    }
    for (key, values) in messages {
        push_list(
            &mut args,
            format!("{}{key}", config.message_key_prefix),
            "0".into(),
            &message_ttl_ms,
            values,
        );
    }
    args.push(templates.len().to_string().into_bytes());
    for (business_id, states) in templates {
        args.push(format!("{}{business_id}", config.template_key_prefix).into_bytes());
        args.push(template_ttl_ms.clone().into_bytes());
        args.push(states.len().to_string().into_bytes());
        for (state, n) in states {
            args.push(state.to_string().into_bytes());
            args.push(n.to_string().into_bytes());
        }
    }
    Some(Commit {
        spec,
        args,
        fences: fences.into_iter().collect(),
    })
}

/// One attempt: (re)connect if needed, then run the script.
async fn apply(
    client: &redis::Client,
    conn: &mut Option<MultiplexedConnection>,
    script: &redis::Script,
    args: &[Vec<u8>],
    timeout: Duration,
) -> anyhow::Result<i64> {
    use anyhow::Context as _;
    if conn.is_none() {
        // The client's own response timeout defaults to 500 ms, shorter than a large
        // commit script runs; on expiry the script has usually been applied already, and
        // retrying it would apply it twice. One deadline, ours, governs.
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let fresh = tokio::time::timeout(
            timeout,
            client.get_multiplexed_async_connection_with_config(&config),
        )
        .await
        .context("timed out connecting to redis")?
        .context("connecting to redis")?;
        *conn = Some(fresh);
    }
    let connection = conn.as_mut().context("no redis connection")?;
    let mut invocation = script.prepare_invoke();
    for arg in args {
        invocation.arg(arg.as_slice());
    }
    let result = tokio::time::timeout(timeout, invocation.invoke_async::<i64>(connection)).await;
    match result {
        Ok(Ok(ops)) => Ok(ops),
        Ok(Err(error)) => {
            *conn = None;
            Err(error).context("running the commit script")
        }
        Err(_) => {
            *conn = None;
            anyhow::bail!("redis did not answer within {timeout:?}")
        }
    }
}

impl Actor for RedisSink {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.restart.started(ctx);
        ctx.set_mailbox_capacity(REDIS_SINK_MAILBOX);
    }
}

impl Supervised for RedisSink {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.restart.restarting();
        self.metrics
            .actor_restarts
            .get_or_create(&ActorLabel {
                actor: "redis_sink",
            })
            .inc();
        self.conn = None;
    }
}

impl Handler<ShardFlush> for RedisSink {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, flush: ShardFlush, _ctx: &mut Self::Context) -> Self::Result {
        self.own_meter.received();
        let id = flush.spec.id;
        let arrived = self.pending.entry(id).or_default();
        arrived.push(flush);
        if arrived.len() < self.shards {
            return AtomicResponse::new(Box::pin(actix::fut::ready(())));
        }
        let flushes = self.pending.remove(&id).unwrap_or_default();
        let Some(commit) = build_commit(&self.config, self.tz, flushes) else {
            return AtomicResponse::new(Box::pin(actix::fut::ready(())));
        };
        let client = match redis::Client::open(self.config.url.as_str()) {
            Ok(client) => client,
            Err(error) => {
                // `Config::validate` parsed this URL already; reaching here is a bug.
                warn!(%error, "redis url no longer parses");
                return AtomicResponse::new(Box::pin(actix::fut::ready(())));
            }
        };
        let mut conn = self.conn.take();
        let script = self.script.clone();
        let metrics = self.metrics.clone();
        let notices = self.notices.clone();
        let timeout = Duration::from_secs(self.config.command_timeout_secs);
        let slowdown = self.config.slowdown_factor;
        AtomicResponse::new(Box::pin(
            async move {
                let mut attempt = 0u32;
                let mut errors = 0u64;
                loop {
                    let started = Instant::now();
                    match apply(&client, &mut conn, &script, &commit.args, timeout).await {
                        Ok(ops) => {
                            let took = started.elapsed();
                            metrics.redis_commands.inc();
                            metrics.redis_script_operations.inc_by(ops.max(0) as u64);
                            metrics.redis_commit_seconds.observe(took.as_secs_f64());
                            metrics
                                .sink_commits
                                .get_or_create(&SinkLabel { sink: "redis" })
                                .inc();
                            tracing::debug!(
                                checkpoint = commit.spec.id,
                                ops,
                                took_ms = took.as_millis() as u64,
                                "redis commit"
                            );
                            if attempt > 0 {
                                info!(
                                    checkpoint = commit.spec.id,
                                    attempts = attempt + 1,
                                    "redis commit succeeded after retries"
                                );
                            }
                            if slowdown > 0 {
                                tokio::time::sleep(took * slowdown).await;
                            }
                            break;
                        }
                        Err(error) => {
                            errors += 1;
                            metrics.redis_errors.inc();
                            metrics.set_ready(false);
                            let delay = Backoff::DEFAULT.delay(attempt);
                            warn!(
                                checkpoint = commit.spec.id,
                                attempt,
                                retry_in_ms = delay.as_millis() as u64,
                                error = format!("{error:#}"),
                                "redis commit failed; retrying"
                            );
                            tokio::time::sleep(delay).await;
                            attempt = attempt.saturating_add(1);
                        }
                    }
                }
                // The source may already be gone during teardown; nothing to do then.
                let _ = notices.send(SourceNotice::SinkCommitted {
                    sink: SinkKind::Redis,
                    checkpoint: commit.spec.id,
                    fences: commit.fences,
                });
                (conn, errors)
            }
            .into_actor(self)
            .map(|(conn, errors), sink, _ctx| {
                sink.conn = conn;
                sink.counters.commits += 1;
                sink.counters.errors += errors;
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{CheckpointKind, ListPush};

    fn flush(shard: usize, spec: &Arc<CheckpointSpec>, deltas: Vec<PartitionDelta>) -> ShardFlush {
        ShardFlush {
            shard,
            spec: spec.clone(),
            partitions: deltas,
        }
    }

    #[test]
    fn merges_shards_into_one_script_call() {
        let spec = Arc::new(CheckpointSpec {
            id: 3,
            partitions: vec![0, 1],
            kind: CheckpointKind::Periodic,
        });
        let v = |s| TraceValue {
            state: s,
            business_id: 9,
            timestamp: 1,
        };
        let a = PartitionDelta {
            partition: 0,
            next_offset: 10,
            template_counts: vec![(9, 10, 2)],
            receiver_lists: vec![ListPush {
                key: "u1".into(),
                values: vec![v(10)],
            }],
            message_lists: vec![],
        };
        let b = PartitionDelta {
            partition: 1,
            next_offset: 5,
            template_counts: vec![(9, 10, 1), (9, 60, 1)],
            receiver_lists: vec![ListPush {
                key: "u1".into(),
                values: vec![v(60)],
            }],
            message_lists: vec![ListPush {
                key: "m".into(),
                values: vec![v(60)],
            }],
        };
        let commit = build_commit(
            &RedisConfig::default(),
            chrono_tz::UTC,
            vec![flush(0, &spec, vec![a]), flush(1, &spec, vec![b])],
        )
        .unwrap();
        assert_eq!(commit.fences, vec![(0, 10), (1, 5)]);
        let args: Vec<String> = commit
            .args
            .iter()
            .map(|a| String::from_utf8(a.clone()).unwrap())
            .collect();
        assert_eq!(args[0], "2", "one receiver list and one message list");
        let hash_at = args.iter().position(|a| a == "9").unwrap();
        assert_eq!(
            &args[hash_at - 1..],
            &["1", "9", "2592000000", "2", "10", "3", "60", "1"]
        );
        assert!(args.contains(&"Austin:MessageId:m".to_string()));
    }
}
