//! `RedisSink`: writes the austin-compatible keys (DESIGN §3.1).
//!
//! It waits until every aggregator shard has handed over its flush for a checkpoint,
//! merges them, and applies the whole checkpoint with **one** `EVALSHA` of
//! [`COMMIT_BODY`]: per distinct receiver one `LPUSH` of all its values plus one
//! `PEXPIREAT` (end of the current day in the configured zone), per message id one
//! `LPUSH` plus `PEXPIRE`, per template one `HINCRBY` per state plus `PEXPIRE`. The
//! network sees one command per checkpoint instead of austin's `2 + 2·len(ids)` per
//! event. A failed commit is retried with capped backoff until it succeeds: an outage
//! pauses progress (the shards, then the readers, then Kafka wait) and loses nothing.
//! Only after success does the sink report its fences to the source.
//!
//! The script starts with the fence check ([`crate::fences::FENCE_CHECK`]): for every
//! partition the commit covers the records `from..to`, where `from` is where this
//! sink's last accepted commit ended (or the claim's fence), and Redis applies the
//! commit, fences included, only if every `from` is the stored fence under the same
//! epoch. A stale epoch or a gap means another instance owns the partition now or our
//! state is behind Redis: the process exits ([`fences::EXIT_FENCED`]) and a restart resumes
//! from the stored fences. Missing fences mean Redis lost its data: the sink holds the
//! commit, reports it (log, `anchorflow_redis_state_lost`, not ready) and retries.

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
use crate::fault;
use crate::fences::{self, on_rejection, range_for, FenceKeys, FenceRange, Rejection};
use crate::messages::{
    CheckpointSpec, PartitionDelta, ShardFlush, SinkKind, SourceNotice, TraceValue,
};
use crate::metrics::{ActorLabel, MailboxMeter, Metrics, SinkLabel};
use crate::tables::end_of_day_ms;

/// Mailbox capacity: one flush per shard per checkpoint is all that is ever queued,
/// because a shard waits for its flush to be taken before it handles anything else.
pub const REDIS_SINK_MAILBOX: usize = 64;

/// Prefix of the window series hashes: field `{windowStartMs}:{state}`, value events.
pub const SERIES_KEY_PREFIX: &str = "anchorflow:series:";

/// Applies one checkpoint, after [`fences::FENCE_CHECK`] (which consumed the ranges).
/// Remaining ARGV layout, all counts explicit so the script needs no
/// parsing: `L`, then per list `key, pexpireat_ms, pexpire_ms, n, v1..vn` (one of the
/// two expiries is 0); then `H`, then per hash `key, pexpire_ms, m, (field, delta)×m`.
/// `LPUSH` is called with at most 1000 values at a time (Lua's `unpack` limit). Last,
/// `W` and per partition `field, state` for the window-state hash `KEYS[3]` (the open
/// series windows, stored in the same commit that moves the fence).
pub const COMMIT_BODY: &str = r#"
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
local states = tonumber(ARGV[i]); i = i + 1
for _ = 1, states do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  i = i + 2
  ops = ops + 1
end
return {0, ops}
"#;

/// The whole commit script: fence check, then the body.
pub fn commit_script() -> redis::Script {
    redis::Script::new(&format!("{}{COMMIT_BODY}", fences::FENCE_CHECK))
}

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
    keys: FenceKeys,
    /// Per partition: the epoch and where our last accepted commit ended.
    fences: BTreeMap<i32, (i64, i64)>,
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
        keys: FenceKeys,
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
            script: commit_script(),
            keys,
            fences: BTreeMap::new(),
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
    ranges: Vec<FenceRange>,
}

/// Merges the shards' flushes of one checkpoint into the script's arguments. Shards own
/// disjoint templates but share receivers and message ids, so lists are merged by key.
fn build_commit(
    config: &RedisConfig,
    tz: chrono_tz::Tz,
    tracked: &BTreeMap<i32, (i64, i64)>,
    flushes: Vec<ShardFlush>,
) -> Option<Commit> {
    let spec = flushes.first()?.spec.clone();
    let mut ranges: BTreeMap<i32, FenceRange> = BTreeMap::new();
    let mut receivers: FxHashMap<String, Vec<TraceValue>> = FxHashMap::default();
    let mut messages: FxHashMap<String, Vec<TraceValue>> = FxHashMap::default();
    let mut templates: BTreeMap<i64, BTreeMap<i32, i64>> = BTreeMap::new();
    let mut series: BTreeMap<i64, BTreeMap<(i64, i32), i64>> = BTreeMap::new();
    let mut windows: BTreeMap<i32, String> = BTreeMap::new();
    for flush in flushes {
        for delta in flush.partitions {
            let PartitionDelta {
                partition,
                next_offset,
                claim,
                template_counts,
                receiver_lists,
                message_lists,
                series: closed,
                windows: open,
            } = delta;
            for ((start, business_id, state), counts) in closed {
                *series
                    .entry(business_id)
                    .or_default()
                    .entry((start, state))
                    .or_insert(0) += counts.events;
            }
            windows.entry(partition).or_default().push_str(&open);
            ranges.insert(
                partition,
                range_for(
                    tracked.get(&partition).copied(),
                    SinkKind::Redis,
                    partition,
                    claim,
                    next_offset,
                ),
            );
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
    let ranges: Vec<FenceRange> = ranges.into_values().collect();
    let mut args: Vec<Vec<u8>> = Vec::new();
    fences::push_ranges(&mut args, SinkKind::Redis, &ranges);
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
    args.push((templates.len() + series.len()).to_string().into_bytes());
    let series_ttl_ms = (config.series_ttl_secs * 1000).to_string();
    for (business_id, fields) in series {
        args.push(format!("{SERIES_KEY_PREFIX}{business_id}").into_bytes());
        args.push(series_ttl_ms.clone().into_bytes());
        args.push(fields.len().to_string().into_bytes());
        for ((start, state), n) in fields {
            args.push(format!("{start}:{state}").into_bytes());
            args.push(n.to_string().into_bytes());
        }
    }
    for (business_id, states) in templates {
        args.push(format!("{}{business_id}", config.template_key_prefix).into_bytes());
        args.push(template_ttl_ms.clone().into_bytes());
        args.push(states.len().to_string().into_bytes());
        for (state, n) in states {
            args.push(state.to_string().into_bytes());
            args.push(n.to_string().into_bytes());
        }
    }
    args.push(windows.len().to_string().into_bytes());
    for (partition, state) in windows {
        args.push(fences::series_field(partition).into_bytes());
        args.push(state.into_bytes());
    }
    Some(Commit { spec, args, ranges })
}

/// One attempt: (re)connect if needed, then run the script.
async fn apply(
    client: &redis::Client,
    conn: &mut Option<MultiplexedConnection>,
    script: &redis::Script,
    keys: &FenceKeys,
    args: &[Vec<u8>],
    timeout: Duration,
) -> anyhow::Result<Result<i64, Rejection>> {
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
    let mut invocation = script.key(&keys.fences);
    invocation.key(&keys.lost).key(&keys.windows);
    for arg in args {
        invocation.arg(arg.as_slice());
    }
    let result =
        tokio::time::timeout(timeout, invocation.invoke_async::<Vec<i64>>(connection)).await;
    match result {
        Ok(Ok(reply)) => fences::outcome(&reply),
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

/// What became of one commit after all its retries.
enum Settled {
    Applied,
    /// Refused for good: the process is stopping.
    Rejected,
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
        let Some(commit) = build_commit(&self.config, self.tz, &self.fences, flushes) else {
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
        let keys = self.keys.clone();
        let metrics = self.metrics.clone();
        let timeout = Duration::from_secs(self.config.command_timeout_secs);
        let slowdown = self.config.slowdown_factor;
        AtomicResponse::new(Box::pin(
            async move {
                let mut attempt = 0u32;
                let mut errors = 0u64;
                let settled =
                    loop {
                        let started = Instant::now();
                        let failure =
                            match apply(&client, &mut conn, &script, &keys, &commit.args, timeout)
                                .await
                            {
                                Ok(Ok(ops)) => {
                                    fault::point(fault::AFTER_REDIS_COMMIT);
                                    let took = started.elapsed();
                                    metrics.redis_commands.inc();
                                    metrics.redis_script_operations.inc_by(ops.max(0) as u64);
                                    metrics.redis_commit_seconds.observe(took.as_secs_f64());
                                    metrics.redis_state_lost.set(0);
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
                                    break Settled::Applied;
                                }
                                Ok(Err(rejection)) => {
                                    metrics.redis_commands.inc();
                                    if !on_rejection(
                                        &metrics,
                                        SinkKind::Redis,
                                        commit.spec.id,
                                        &rejection,
                                    ) {
                                        break Settled::Rejected;
                                    }
                                    format!("{rejection}")
                                }
                                Err(error) => {
                                    metrics.redis_errors.inc();
                                    format!("{error:#}")
                                }
                            };
                        errors += 1;
                        metrics.set_ready(false);
                        let delay = Backoff::DEFAULT.delay(attempt);
                        warn!(
                            checkpoint = commit.spec.id,
                            attempt,
                            retry_in_ms = delay.as_millis() as u64,
                            error = failure,
                            "redis commit failed; retrying"
                        );
                        tokio::time::sleep(delay).await;
                        attempt = attempt.saturating_add(1);
                    };
                (conn, errors, settled, commit)
            }
            .into_actor(self)
            .map(|(conn, errors, settled, commit), sink, _ctx| {
                sink.conn = conn;
                sink.counters.errors += errors;
                if let Settled::Applied = settled {
                    sink.counters.commits += 1;
                    for range in &commit.ranges {
                        sink.fences.insert(range.partition, (range.epoch, range.to));
                    }
                    // The source may already be gone during teardown; nothing to do then.
                    let _ = sink.notices.send(SourceNotice::SinkCommitted {
                        sink: SinkKind::Redis,
                        checkpoint: commit.spec.id,
                        fences: commit.ranges.iter().map(|r| (r.partition, r.to)).collect(),
                    });
                }
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fences::Claim;
    use crate::messages::{CheckpointKind, ListPush};
    use crate::window::Counts;

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
            watermark: None,
        });
        let v = |s| TraceValue {
            state: s,
            business_id: 9,
            timestamp: 1,
        };
        let claim = Claim {
            epoch: 4,
            redis: 0,
            warehouse: 0,
        };
        let a = PartitionDelta {
            partition: 0,
            next_offset: 10,
            claim,
            template_counts: vec![(9, 10, 2)],
            receiver_lists: vec![ListPush {
                key: "u1".into(),
                values: vec![v(10)],
            }],
            message_lists: vec![],
            series: vec![(
                (60_000, 9, 10),
                Counts {
                    events: 2,
                    receivers: 3,
                },
            )],
            windows: "c 60000\n".into(),
        };
        let b = PartitionDelta {
            partition: 1,
            next_offset: 5,
            claim,
            template_counts: vec![(9, 10, 1), (9, 60, 1)],
            receiver_lists: vec![ListPush {
                key: "u1".into(),
                values: vec![v(60)],
            }],
            message_lists: vec![ListPush {
                key: "m".into(),
                values: vec![v(60)],
            }],
            series: vec![(
                (60_000, 9, 10),
                Counts {
                    events: 1,
                    receivers: 1,
                },
            )],
            windows: "c 60000\nw 120000 9 10 1 1\n".into(),
        };
        // Partition 0 committed up to 3 under this epoch already; 1 starts at its claim.
        let tracked = BTreeMap::from([(0, (4, 3))]);
        let commit = build_commit(
            &RedisConfig::default(),
            chrono_tz::UTC,
            &tracked,
            vec![flush(0, &spec, vec![a]), flush(1, &spec, vec![b])],
        )
        .unwrap();
        assert_eq!(
            commit.ranges,
            vec![
                FenceRange {
                    partition: 0,
                    epoch: 4,
                    from: 3,
                    to: 10
                },
                FenceRange {
                    partition: 1,
                    epoch: 4,
                    from: 0,
                    to: 5
                }
            ]
        );
        let args: Vec<String> = commit
            .args
            .iter()
            .map(|a| String::from_utf8(a.clone()).unwrap())
            .collect();
        assert_eq!(
            &args[..10],
            &["redis", "2", "0", "4", "3", "10", "1", "4", "0", "5"]
        );
        assert_eq!(args[10], "2", "one receiver list and one message list");
        // The series hash (events of the closed window, summed over partitions), the
        // template hash, then each partition's open windows.
        let hash_at = args
            .iter()
            .position(|a| a == "anchorflow:series:9")
            .unwrap();
        assert_eq!(
            &args[hash_at - 1..],
            &[
                "2",
                "anchorflow:series:9",
                "2592000000",
                "1",
                "60000:10",
                "3",
                "9",
                "2592000000",
                "2",
                "10",
                "3",
                "60",
                "1",
                "2",
                "series:0",
                "c 60000\n",
                "series:1",
                "c 60000\nw 120000 9 10 1 1\n"
            ]
        );
        assert!(args.contains(&"Austin:MessageId:m".to_string()));
    }
}
