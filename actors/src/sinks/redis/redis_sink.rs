//! `RedisSink`: writes the austin-compatible keys (`docs/redis.md`).
//!
//! It waits until every aggregator shard has handed over its flush for a checkpoint,
//! then commits the checkpoint ([`crate::sinks::redis::commit`] plans it): per distinct
//! receiver one `LPUSH` of all its values plus one `PEXPIRE` (until the end of the
//! current day in the configured zone, relative, by Redis's clock), per message id one
//! `LPUSH` plus `PEXPIRE`, per template one `HINCRBY` per state plus `PEXPIRE`. A
//! checkpoint that fits `redis.max_commit_ms` is **one** `EVALSHA`; a bigger one is split
//! by key-hash unit into several, each atomic and carrying its own unit fences, so that
//! no single script holds Redis (which austin-web reads too) for long.
//!
//! Every script starts with the fence check (`protocol/scripts/fence_check.lua`): for
//! every partition the commit covers the records `from..to`, where `from` is where this
//! sink's last accepted commit ended (or the claim's fence), and Redis applies the
//! commit, fences included, only if every `from` is the stored fence under the same
//! epoch. A stale epoch or a gap means another instance owns the partition now or our
//! state is behind Redis: the process exits (75) and a restart resumes from the stored
//! fences. A retry of a script that Redis applied but whose reply was lost is
//! recognised by the fence check and not applied twice.
//!
//! **Failures restart the sink** (`runtime/supervision.rs`): when Redis does not answer,
//! refuses connections, or has lost the fences, the sink stops and its supervisor
//! restarts it after a capped backoff. The commit in flight stays with the sink and is
//! applied first after the restart; meanwhile its mailbox fills, the shards wait, the
//! readers wait and the source pauses the partitions: an outage pauses progress and
//! loses nothing. The process is not ready while the sink is restarting. Only after a
//! commit applied does the sink report its fences to the source.
//!
//! A key Redis refuses to write (it holds another type, a hash field is not a number,
//! or it would land on anchorflow's own `anchorflow:` keys) does not fail the commit:
//! the rest applies, and the refusal is counted in
//! `anchorflow_redis_conflicts_total{reason}`, logged with the key, and recorded in the
//! conflicts hash (`anchorflow fences show` lists it).

use std::collections::BTreeMap;
use std::time::Instant;

use actix::prelude::*;
use tracing::{debug, info, warn};

use crate::checkpoint::claim::SinkKind;
use crate::config::RedisConfig;
use crate::logic::tables::end_of_day_ms;
use crate::messages::ShardFlush;
use crate::metrics::{Metrics, ReasonLabel, SinkLabel};
use crate::protocol::keys::KeyLayout;
use crate::protocol::reply::{Conflict, Rejection, Reply};
use crate::runtime::clock::Clock;
use crate::runtime::fault;
use crate::runtime::supervision::{self, Failure, Restarts};
use crate::sinks::fenced::{on_rejection, SinkShared};
use crate::sinks::redis::client::Link;
use crate::sinks::redis::commit::{self, CommitInput, CommitPlan, OpsBudget, Ttls};

/// Mailbox capacity: one flush per shard per checkpoint is all that is ever queued,
/// because a shard waits for its flush to be taken before it handles anything else.
pub const REDIS_SINK_MAILBOX: usize = 64;

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
    /// Failed attempts (each followed by a restart).
    pub errors: u64,
}

/// The commit being applied; it survives a restart of the sink, which resumes it.
struct InFlight {
    plan: CommitPlan,
    /// Scripts of the plan applied so far.
    applied: usize,
    started: Instant,
}

pub struct RedisSink {
    restarts: Restarts,
    config: RedisConfig,
    tz: chrono_tz::Tz,
    shards: usize,
    shared: SinkShared,
    /// Lent to the commit future while one runs.
    link: Option<Link>,
    layout: KeyLayout,
    budget: OpsBudget,
    /// Per partition: the epoch and where our last accepted commit ended.
    fences: BTreeMap<i32, (i64, i64)>,
    pending: BTreeMap<u64, Vec<ShardFlush>>,
    in_flight: Option<InFlight>,
    counters: RedisSinkCounters,
}

impl RedisSink {
    pub fn new(
        config: RedisConfig,
        tz: chrono_tz::Tz,
        shards: usize,
        shared: SinkShared,
        clock: Clock,
    ) -> Self {
        RedisSink {
            restarts: Restarts::new("redis_sink", &shared.metrics, &shared.health),
            layout: KeyLayout::new(&config),
            budget: OpsBudget::new(config.max_commit_ms),
            link: Some(Link::new(&config, clock)),
            config,
            tz,
            shards,
            shared,
            fences: BTreeMap::new(),
            pending: BTreeMap::new(),
            in_flight: None,
            counters: RedisSinkCounters::default(),
        }
    }

    pub fn counters(&self) -> RedisSinkCounters {
        self.counters
    }

    fn ttls(&self, clock: &Clock) -> Ttls {
        let now = clock.now();
        let secs = |s: u64| (s * 1000).min(i64::MAX as u64) as i64;
        Ttls {
            receiver_ms: (end_of_day_ms(self.tz, now) - now.timestamp_millis()).max(1),
            message_ms: secs(self.config.message_ttl_secs),
            template_ms: secs(self.config.template_ttl_secs),
            series_ms: secs(self.config.series_ttl_secs),
            conflicts_ms: CONFLICTS_TTL_MS,
        }
    }

    /// Plans the commit of a checkpoint once every shard's flush is in.
    fn plan(&mut self, flush: ShardFlush) -> Option<CommitPlan> {
        let id = flush.spec.id;
        let arrived = self.pending.entry(id).or_default();
        arrived.push(flush);
        if arrived.len() < self.shards {
            return None;
        }
        // The link is only lent while a commit runs, and handlers wait for that; still,
        // take the flushes only once the plan can be made.
        let clock = self.link.as_ref()?.clock.clone();
        let flushes = self.pending.remove(&id).unwrap_or_default();
        let input = CommitInput {
            layout: &self.layout,
            ttls: self.ttls(&clock),
            tracked: &self.fences,
            units_prefix: &self.shared.keys.units_prefix,
            budget_ops: self.budget.ops(),
        };
        commit::plan(&input, flushes)
    }

    /// Applies the scripts of the commit in flight that have not applied yet.
    fn apply_in_flight(&mut self) -> ResponseActFuture<Self, ()> {
        if self.link.is_none() || self.in_flight.is_none() {
            return Box::pin(actix::fut::ready(()));
        }
        let (Some(mut link), Some(mut in_flight)) = (self.link.take(), self.in_flight.take())
        else {
            unreachable!("both checked above");
        };
        let committer = Committer {
            shared: self.shared.clone(),
            budget: self.budget,
            slowdown: self.config.slowdown_factor,
        };
        Box::pin(
            async move {
                let mut committer = committer;
                let outcome = committer.apply(&mut link, &mut in_flight).await;
                (link, in_flight, committer.budget, outcome)
            }
            .into_actor(self)
            .map(|(link, in_flight, budget, outcome), sink, ctx| {
                sink.link = Some(link);
                sink.budget = budget;
                sink.settle(ctx, in_flight, outcome);
            }),
        )
    }

    /// What follows one attempt at the commit in flight.
    fn settle(&mut self, ctx: &mut Context<Self>, in_flight: InFlight, outcome: Outcome) {
        let metrics = &self.shared.metrics;
        if let Some(link) = &self.link {
            metrics
                .clock_skew_seconds
                .set(link.clock.skew_ms() as f64 / 1000.0);
        }
        self.counters.scripts += outcome.scripts;
        match outcome.result {
            Ok(()) => self.applied(in_flight),
            Err(Stop::Refused) => {}
            Err(Stop::Failed(error)) => {
                self.counters.errors += 1;
                metrics.redis_errors.inc();
                if let Some(link) = &mut self.link {
                    link.reset();
                }
                self.in_flight = Some(in_flight);
                self.restarts.fail(ctx, Failure::Dependency(error));
            }
        }
    }

    fn applied(&mut self, in_flight: InFlight) {
        let plan = in_flight.plan;
        let took = in_flight.started.elapsed();
        let metrics = &self.shared.metrics;
        metrics.redis_commit_seconds.observe(took.as_secs_f64());
        metrics
            .sink_commits
            .get_or_create(&SinkLabel { sink: "redis" })
            .inc();
        self.shared.applied();
        self.restarts.succeeded();
        fault::point(fault::AFTER_REDIS_COMMIT);
        self.counters.commits += 1;
        for range in &plan.ranges {
            self.fences.insert(range.partition, (range.epoch, range.to));
        }
        let fences = plan.ranges.iter().map(|r| (r.partition, r.to)).collect();
        self.shared.committed(SinkKind::Redis, plan.spec.id, fences);
    }
}

/// Why a commit stopped before it applied.
enum Stop {
    /// Refused for good by the fence check: the process is stopping.
    Refused,
    /// Redis did not answer, or has lost the fences: restart and try again.
    Failed(anyhow::Error),
}

/// What one attempt learned, handed back to the actor.
struct Outcome {
    result: Result<(), Stop>,
    scripts: u64,
}

/// What a commit needs that is not lent by the actor.
struct Committer {
    shared: SinkShared,
    budget: OpsBudget,
    /// Test and benchmark knob (`redis.slowdown_factor`): after a commit, wait this
    /// many times as long as it took.
    slowdown: u32,
}

impl Committer {
    /// Runs the scripts of the commit that have not applied yet, in order, each once.
    async fn apply(&mut self, link: &mut Link, in_flight: &mut InFlight) -> Outcome {
        let mut scripts = 0;
        let checkpoint = in_flight.plan.spec.id;
        while let Some(script) = in_flight.plan.scripts.get(in_flight.applied) {
            let started = Instant::now();
            let reply = match link.apply(&self.shared.keys, &script.args).await {
                Ok(reply) => reply,
                Err(error) => {
                    return Outcome {
                        result: Err(Stop::Failed(error)),
                        scripts,
                    }
                }
            };
            self.shared.metrics.redis_commands.inc();
            match reply {
                Reply::Applied {
                    ops,
                    conflicts,
                    first,
                } => {
                    let took = started.elapsed();
                    self.budget.observe(script.ops, took);
                    let metrics = &self.shared.metrics;
                    metrics.redis_script_seconds.observe(took.as_secs_f64());
                    metrics.redis_script_operations.inc_by(ops.max(0) as u64);
                    report_conflicts(metrics, checkpoint, conflicts, &first);
                    debug!(checkpoint, ops, took_ms = took.as_millis() as u64, mode = ?script.mode, "redis script applied");
                }
                Reply::AppliedBefore => {
                    info!(checkpoint, "redis commit had been applied before its reply was lost; not applied again");
                }
                Reply::Rejected(rejection) => {
                    let stop =
                        if on_rejection(&self.shared, SinkKind::Redis, checkpoint, &rejection) {
                            Stop::Failed(lost_fences(rejection))
                        } else {
                            Stop::Refused
                        };
                    return Outcome {
                        result: Err(stop),
                        scripts,
                    };
                }
            }
            in_flight.applied += 1;
            scripts += 1;
        }
        if self.slowdown > 0 {
            tokio::time::sleep(in_flight.started.elapsed() * self.slowdown).await;
        }
        Outcome {
            result: Ok(()),
            scripts,
        }
    }
}

fn lost_fences(rejection: Rejection) -> anyhow::Error {
    anyhow::anyhow!("{rejection}: holding the commit until an operator recovers the fences")
}

fn report_conflicts(metrics: &Metrics, checkpoint: u64, total: i64, first: &[Conflict]) {
    if total <= 0 {
        return;
    }
    for conflict in first {
        let reason = conflict_reason(&conflict.reason);
        metrics
            .redis_conflicts
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }
    let unlisted = (total as usize).saturating_sub(first.len());
    if unlisted > 0 {
        metrics
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

impl Actor for RedisSink {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(crate::runtime::mailbox::actix_capacity(REDIS_SINK_MAILBOX));
        // After a restart: wait out the backoff, then finish the commit in flight
        // before anything else (`wait` holds the mailbox).
        self.restarts
            .started_then(ctx, |sink: &mut Self, _| sink.apply_in_flight());
    }
}

impl Supervised for RedisSink {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.restarts.restarting();
    }
}

impl Handler<ShardFlush> for RedisSink {
    /// Atomic: the sink handles nothing else while a commit runs, so a slow Redis
    /// holds the shards back.
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, flush: ShardFlush, _ctx: &mut Self::Context) -> Self::Result {
        let plan = match supervision::catch(|| self.plan(flush)) {
            Ok(Some(plan)) => plan,
            Ok(None) => return AtomicResponse::new(Box::pin(actix::fut::ready(()))),
            Err(panic) => {
                supervision::stateful_panic("redis_sink", &panic);
                return AtomicResponse::new(Box::pin(actix::fut::ready(())));
            }
        };
        self.in_flight = Some(InFlight {
            plan,
            applied: 0,
            started: Instant::now(),
        });
        AtomicResponse::new(self.apply_in_flight())
    }
}
