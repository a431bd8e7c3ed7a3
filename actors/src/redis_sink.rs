//! `RedisSink`: writes the austin-compatible keys (DESIGN §3.1).
//!
//! It waits until every aggregator shard has handed over its flush for a checkpoint,
//! then commits the checkpoint ([`crate::redis_commit`] plans it): per distinct
//! receiver one `LPUSH` of all its values plus one `PEXPIRE` (until the end of the
//! current day in the configured zone, relative, by Redis's clock), per message id one
//! `LPUSH` plus `PEXPIRE`, per template one `HINCRBY` per state plus `PEXPIRE`. A
//! checkpoint that fits `redis.max_commit_ms` is **one** `EVALSHA`; a bigger one is split
//! by key-hash unit into several, each atomic and carrying its own unit fences, so that
//! no single script holds Redis (which austin-web reads too) for long.
//!
//! A failed commit is retried with capped backoff until it succeeds: an outage pauses
//! progress (the shards, then the readers, then Kafka wait) and loses nothing. A retry
//! of a script that Redis applied but whose reply was lost is recognised by the fence
//! check and not applied twice. Only after success does the sink report its fences to
//! the source.
//!
//! Every script starts with the fence check ([`crate::fences::FENCE_CHECK`]): for every
//! partition the commit covers the records `from..to`, where `from` is where this
//! sink's last accepted commit ended (or the claim's fence), and Redis applies the
//! commit, fences included, only if every `from` is the stored fence under the same
//! epoch. A stale epoch or a gap means another instance owns the partition now or our
//! state is behind Redis: the process exits ([`fences::EXIT_FENCED`]) and a restart
//! resumes from the stored fences. Missing fences mean Redis lost its data: the sink
//! holds the commit, reports it (log, `anchorflow_redis_state_lost`, not ready) and
//! retries.
//!
//! A key Redis refuses to write (it holds another type, a hash field is not a number,
//! or it would land on anchorflow's own `anchorflow:` keys) does not fail the commit:
//! the rest applies, and the refusal is counted in
//! `anchorflow_redis_conflicts_total{reason}`, logged with the key, and recorded in the
//! conflicts hash (`anchorflow fences show` lists it).

use std::collections::BTreeMap;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use actix::prelude::*;
use redis::aio::MultiplexedConnection;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::clock::{self, Clock};
use crate::config::RedisConfig;
use crate::fault;
use crate::fences::{self, on_rejection, Conflict, FenceKeys, Reply};
use crate::messages::{ShardFlush, SinkKind, SourceNotice};
use crate::metrics::{ActorLabel, Metrics, ReasonLabel, SinkLabel};
use crate::redis_commit::{self, CommitInput, CommitPlan, KeyLayout, OpsBudget, Script, Ttls};
use crate::tables::end_of_day_ms;

pub use crate::redis_commit::SERIES_KEY_PREFIX;

/// Mailbox capacity: one flush per shard per checkpoint is all that is ever queued,
/// because a shard waits for its flush to be taken before it handles anything else.
pub const REDIS_SINK_MAILBOX: usize = 64;

/// The commit script: fence check, then the body (`scripts/redis_commit.lua`).
pub fn commit_script() -> redis::Script {
    redis::Script::new(&format!(
        "{}{}",
        fences::FENCE_CHECK,
        include_str!("scripts/redis_commit.lua")
    ))
}

/// The commit script's invocation with its keys and `args` (one [`Script`] of a plan).
pub fn commit_invocation<'a>(
    script: &'a redis::Script,
    keys: &FenceKeys,
    args: &[Vec<u8>],
) -> redis::ScriptInvocation<'a> {
    let mut invocation = script.key(&keys.fences);
    invocation
        .key(&keys.lost)
        .key(&keys.windows)
        .key(&keys.conflicts);
    for arg in args {
        invocation.arg(arg.as_slice());
    }
    invocation
}

/// How often Redis's clock is read again (it is also read on every new connection).
const CLOCK_CHECK: Duration = Duration::from_secs(60);

/// Conflicts logged per commit with their key; the rest are counted.
const LOGGED_CONFLICTS: usize = 10;

/// How long the conflicts hash keeps a key it has not seen again.
const CONFLICTS_TTL_MS: i64 = 30 * 86_400_000;

/// Counters of the sink, for tests and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedisSinkCounters {
    /// Checkpoints applied.
    pub commits: u64,
    /// Scripts run for them (more than one for a split checkpoint).
    pub scripts: u64,
    /// Failed attempts (each retried).
    pub errors: u64,
}

pub struct RedisSink {
    restart: crate::backoff::RestartBackoff,
    config: RedisConfig,
    tz: chrono_tz::Tz,
    shards: usize,
    metrics: Metrics,
    notices: Sender<SourceNotice>,
    link: Link,
    layout: KeyLayout,
    keys: FenceKeys,
    budget: OpsBudget,
    /// Per partition: the epoch and where our last accepted commit ended.
    fences: BTreeMap<i32, (i64, i64)>,
    pending: BTreeMap<u64, Vec<ShardFlush>>,
    counters: RedisSinkCounters,
}

/// The connection and what lives with it; handed to each commit and back.
struct Link {
    conn: Option<MultiplexedConnection>,
    script: redis::Script,
    clock: Clock,
    clock_read: Option<Instant>,
}

impl RedisSink {
    pub fn new(
        config: RedisConfig,
        tz: chrono_tz::Tz,
        shards: usize,
        metrics: Metrics,
        notices: Sender<SourceNotice>,
        keys: FenceKeys,
        clock: Clock,
    ) -> Self {
        RedisSink {
            restart: Default::default(),
            layout: KeyLayout::new(&config),
            budget: OpsBudget::new(config.max_commit_ms),
            config,
            tz,
            shards,
            metrics,
            notices,
            link: Link {
                conn: None,
                script: commit_script(),
                clock,
                clock_read: None,
            },
            keys,
            fences: BTreeMap::new(),
            pending: BTreeMap::new(),
            counters: RedisSinkCounters::default(),
        }
    }

    pub fn counters(&self) -> RedisSinkCounters {
        self.counters
    }

    fn ttls(&self) -> Ttls {
        let now = self.link.clock.now();
        let secs = |s: u64| (s * 1000).min(i64::MAX as u64) as i64;
        Ttls {
            receiver_ms: (end_of_day_ms(self.tz, now) - now.timestamp_millis()).max(1),
            message_ms: secs(self.config.message_ttl_secs),
            template_ms: secs(self.config.template_ttl_secs),
            series_ms: secs(self.config.series_ttl_secs),
            conflicts_ms: CONFLICTS_TTL_MS,
        }
    }
}

impl Link {
    /// One attempt at one script: (re)connect if needed, then run it.
    async fn apply(
        &mut self,
        client: &redis::Client,
        keys: &FenceKeys,
        args: &[Vec<u8>],
        timeout: Duration,
    ) -> anyhow::Result<Reply> {
        use anyhow::Context as _;
        if self.conn.is_none() {
            // The client's own response timeout defaults to 500 ms, shorter than a large
            // commit script runs; one deadline, ours, governs.
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
            self.conn = Some(fresh);
            self.clock_read = None;
        }
        let conn = self.conn.as_mut().context("no redis connection")?;
        if self.clock_read.is_none_or(|at| at.elapsed() >= CLOCK_CHECK) {
            let measured =
                tokio::time::timeout(timeout, clock::measure_async(&self.clock, conn)).await;
            match measured {
                Ok(Ok(())) => self.clock_read = Some(Instant::now()),
                Ok(Err(error)) => {
                    self.conn = None;
                    return Err(error);
                }
                Err(_) => {
                    self.conn = None;
                    anyhow::bail!("redis did not answer within {timeout:?}");
                }
            }
        }
        let conn = self.conn.as_mut().context("no redis connection")?;
        let invocation = commit_invocation(&self.script, keys, args);
        let result =
            tokio::time::timeout(timeout, invocation.invoke_async::<redis::Value>(conn)).await;
        match result {
            Ok(Ok(reply)) => fences::reply(&reply),
            Ok(Err(error)) => {
                self.conn = None;
                Err(error).context("running the commit script")
            }
            Err(_) => {
                self.conn = None;
                anyhow::bail!("redis did not answer within {timeout:?}")
            }
        }
    }
}

impl Actor for RedisSink {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.restart.started(ctx);
        ctx.set_mailbox_capacity(crate::mailbox::actix_capacity(REDIS_SINK_MAILBOX));
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
        self.link.conn = None;
    }
}

/// What became of one commit after all its retries.
enum Settled {
    Applied,
    /// Refused for good: the process is stopping.
    Rejected,
}

/// What one commit learned, handed back to the actor.
struct Outcome {
    settled: Settled,
    errors: u64,
    scripts: u64,
    budget: OpsBudget,
}

/// Everything a commit needs that is not the actor's.
struct Committer {
    client: redis::Client,
    keys: FenceKeys,
    metrics: Metrics,
    timeout: Duration,
    slowdown: u32,
}

impl Committer {
    /// Runs every script of a checkpoint in order, each retried until it applies.
    async fn commit(&self, link: &mut Link, plan: &CommitPlan, mut budget: OpsBudget) -> Outcome {
        let started = Instant::now();
        let mut errors = 0;
        let mut scripts = 0;
        for script in &plan.scripts {
            match self.run(link, plan, script, &mut budget, &mut errors).await {
                Settled::Applied => scripts += 1,
                Settled::Rejected => {
                    return Outcome {
                        settled: Settled::Rejected,
                        errors,
                        scripts,
                        budget,
                    }
                }
            }
        }
        let took = started.elapsed();
        self.metrics
            .redis_commit_seconds
            .observe(took.as_secs_f64());
        self.metrics
            .sink_commits
            .get_or_create(&SinkLabel { sink: "redis" })
            .inc();
        self.metrics.redis_state_lost.set(0);
        fault::point(fault::AFTER_REDIS_COMMIT);
        if self.slowdown > 0 {
            tokio::time::sleep(took * self.slowdown).await;
        }
        Outcome {
            settled: Settled::Applied,
            errors,
            scripts,
            budget,
        }
    }

    async fn run(
        &self,
        link: &mut Link,
        plan: &CommitPlan,
        script: &Script,
        budget: &mut OpsBudget,
        errors: &mut u64,
    ) -> Settled {
        let checkpoint = plan.spec.id;
        let mut attempt = 0u32;
        loop {
            let started = Instant::now();
            let failure = match link
                .apply(&self.client, &self.keys, &script.args, self.timeout)
                .await
            {
                Ok(Reply::Applied {
                    ops,
                    conflicts,
                    first,
                }) => {
                    let took = started.elapsed();
                    budget.observe(script.ops, took);
                    self.metrics.redis_commands.inc();
                    self.metrics
                        .redis_script_seconds
                        .observe(took.as_secs_f64());
                    self.metrics
                        .redis_script_operations
                        .inc_by(ops.max(0) as u64);
                    self.report_conflicts(checkpoint, conflicts, &first);
                    debug!(checkpoint, ops, took_ms = took.as_millis() as u64, mode = ?script.mode, "redis script applied");
                    if attempt > 0 {
                        info!(
                            checkpoint,
                            attempts = attempt + 1,
                            "redis commit succeeded after retries"
                        );
                    }
                    return Settled::Applied;
                }
                Ok(Reply::AppliedBefore) => {
                    self.metrics.redis_commands.inc();
                    info!(checkpoint, attempts = attempt + 1, "redis commit had been applied before its reply was lost; not applied again");
                    return Settled::Applied;
                }
                Ok(Reply::Rejected(rejection)) => {
                    self.metrics.redis_commands.inc();
                    if !on_rejection(&self.metrics, SinkKind::Redis, checkpoint, &rejection) {
                        return Settled::Rejected;
                    }
                    format!("{rejection}")
                }
                Err(error) => {
                    self.metrics.redis_errors.inc();
                    format!("{error:#}")
                }
            };
            *errors += 1;
            self.metrics.set_ready(false);
            let delay = Backoff::DEFAULT.delay(attempt);
            warn!(
                checkpoint,
                attempt,
                retry_in_ms = delay.as_millis() as u64,
                error = failure,
                "redis commit failed; retrying"
            );
            tokio::time::sleep(delay).await;
            attempt = attempt.saturating_add(1);
        }
    }

    fn report_conflicts(&self, checkpoint: u64, total: i64, first: &[Conflict]) {
        if total <= 0 {
            return;
        }
        for conflict in first {
            let reason = conflict_reason(&conflict.reason);
            self.metrics
                .redis_conflicts
                .get_or_create(&ReasonLabel { reason })
                .inc();
        }
        let unlisted = (total as usize).saturating_sub(first.len());
        if unlisted > 0 {
            self.metrics
                .redis_conflicts
                .get_or_create(&ReasonLabel { reason: "other" })
                .inc_by(unlisted as u64);
        }
        for conflict in first.iter().take(LOGGED_CONFLICTS) {
            warn!(
                checkpoint,
                key = conflict.key,
                reason = conflict.reason,
                lost = conflict.lost,
                "redis refused a write; the rest of the commit applied (anchorflow fences show lists these)"
            );
        }
    }
}

/// The metric label of a conflict reason the script reported (a fixed set).
fn conflict_reason(reason: &str) -> &'static str {
    match reason {
        "wrong_type" => "wrong_type",
        "not_an_integer" => "not_an_integer",
        "overflow" => "overflow",
        "reserved_key" => "reserved_key",
        _ => "other",
    }
}

impl Handler<ShardFlush> for RedisSink {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, flush: ShardFlush, _ctx: &mut Self::Context) -> Self::Result {
        let id = flush.spec.id;
        let arrived = self.pending.entry(id).or_default();
        arrived.push(flush);
        if arrived.len() < self.shards {
            return AtomicResponse::new(Box::pin(actix::fut::ready(())));
        }
        let flushes = self.pending.remove(&id).unwrap_or_default();
        let input = CommitInput {
            layout: &self.layout,
            ttls: self.ttls(),
            tracked: &self.fences,
            units_prefix: &self.keys.units_prefix,
            budget_ops: self.budget.ops(),
        };
        let Some(plan) = redis_commit::plan(&input, flushes) else {
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
        let committer = Committer {
            client,
            keys: self.keys.clone(),
            metrics: self.metrics.clone(),
            timeout: Duration::from_secs(self.config.command_timeout_secs),
            slowdown: self.config.slowdown_factor,
        };
        let mut link = Link {
            conn: self.link.conn.take(),
            script: self.link.script.clone(),
            clock: self.link.clock.clone(),
            clock_read: self.link.clock_read,
        };
        let budget = self.budget;
        AtomicResponse::new(Box::pin(
            async move {
                let outcome = committer.commit(&mut link, &plan, budget).await;
                (link, outcome, plan)
            }
            .into_actor(self)
            .map(|(link, outcome, plan), sink, _ctx| {
                sink.link = link;
                sink.metrics
                    .clock_skew_seconds
                    .set(sink.link.clock.skew_ms() as f64 / 1000.0);
                sink.budget = outcome.budget;
                sink.counters.errors += outcome.errors;
                sink.counters.scripts += outcome.scripts;
                if let Settled::Applied = outcome.settled {
                    sink.counters.commits += 1;
                    for range in &plan.ranges {
                        sink.fences.insert(range.partition, (range.epoch, range.to));
                    }
                    // The source may already be gone during teardown; nothing to do then.
                    let _ = sink.notices.send(SourceNotice::SinkCommitted {
                        sink: SinkKind::Redis,
                        checkpoint: plan.spec.id,
                        fences: plan.ranges.iter().map(|r| (r.partition, r.to)).collect(),
                    });
                }
            }),
        ))
    }
}
