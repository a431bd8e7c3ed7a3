//! `RedisSink`: writes the austin-compatible keys (`docs/redis.md`).
//!
//! It waits until every aggregator shard has handed over its flush for a checkpoint,
//! then commits the checkpoint ([`crate::sinks::redis::commit`] plans it): per distinct
//! receiver one `LPUSH` of all its values plus one `PEXPIRE` (until the end of the
//! current day in the configured zone, relative, by Redis's clock), per message id one
//! `LPUSH` plus `PEXPIRE`, per template one `HINCRBY` per state plus `PEXPIRE`. A
//! checkpoint that fits `redis.max_commit_ms` is **one** `EVALSHA`; a bigger one is split
//! by key-hash unit into several, each atomic and carrying its own unit fences, so that
//! no single script holds Redis (which austin-web reads too) for long. Window series too
//! many for one script are staged by the final script and unstaged by scripts after
//! it (a claim unstages what a crash left staged: `protocol/staged.rs`).
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
//! **Commits run beside the mailbox.** Taking a flush never waits for Redis: while one
//! commit's scripts run, the next checkpoint's flushes arrive and its plan is built on
//! the blocking pool (`checkpoint/coordinator.rs` lets that checkpoint start once only
//! Redis is behind), so Redis does not wait for anchorflow between commits. Plans are
//! applied one at a time in checkpoint order, each planned from where the one before
//! ends ([`RedisSink`]'s `fences`). The coordinator bounds the queue (two checkpoints in
//! flight); the source's uncommitted share, held against this sink's fence, bounds the
//! memory.
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

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use actix::prelude::*;
use tracing::{debug, error};

use crate::checkpoint::driver::SinkAcks;
use crate::config::{CommitMode, RedisConfig};
use crate::logic::tables::end_of_day_ms;
use crate::messages::ShardFlush;
use crate::metrics::SinkLabel;
use crate::protocol::commit_args::Expiry;
use crate::protocol::keys::{KeyLayout, CONFLICTS_TTL_MS};
use crate::runtime::clock::Clock;
use crate::runtime::fault;
use crate::runtime::supervision::{self, Failure, Restarts};
use crate::sinks::fenced::SinkShared;
use crate::sinks::redis::apply::{Committer, InFlight, Stop};
use crate::sinks::redis::budget::OpsBudget;
use crate::sinks::redis::client::{ServerWatch, SinkConnection};
use crate::sinks::redis::commit::{self, CommitInput, CommitPlan, Ttls};

/// Mailbox capacity: one flush per shard per checkpoint is all that is ever queued,
/// because a shard waits for its flush to be taken before it handles anything else, and
/// at most two checkpoints are in flight.
pub const REDIS_SINK_MAILBOX: usize = 64;

pub struct RedisSink {
    restarts: Restarts,
    config: RedisConfig,
    tz: chrono_tz::Tz,
    shards: usize,
    shared: SinkShared,
    /// Where each applied checkpoint is reported.
    acks: SinkAcks,
    /// Lent to the commit future while one runs.
    link: Option<SinkConnection>,
    /// The link's clock (shared with it), for planning while the link is lent.
    clock: Clock,
    layout: KeyLayout,
    budget: OpsBudget,
    /// Series fields per `unstage` script, measured apart: a field costs Redis about
    /// three times what a list push does (decoded, then `HINCRBY` into a hash).
    unstage_budget: OpsBudget,
    /// Per partition: the epoch and where our last planned commit ends. Plans apply in
    /// order, each only if the one before did (else the process stops or the sink
    /// retries it), so the next plan starts there.
    fences: BTreeMap<i32, (i64, i64)>,
    /// Flushes per checkpoint, until every shard's is in.
    pending: BTreeMap<u64, Vec<ShardFlush>>,
    /// A plan is being built ([`RedisSink::plan_next`]).
    planning: bool,
    /// Plans waiting for the one in flight (at most one: two checkpoints in flight).
    queued: VecDeque<CommitPlan>,
    in_flight: Option<InFlight>,
}

impl RedisSink {
    pub fn new(
        config: RedisConfig,
        tz: chrono_tz::Tz,
        shards: usize,
        shared: SinkShared,
        acks: SinkAcks,
        clock: Clock,
    ) -> Self {
        RedisSink {
            acks,
            restarts: Restarts::new("redis_sink", &shared.metrics, &shared.health),
            layout: KeyLayout::new(&config),
            budget: OpsBudget::new(config.max_commit_ms),
            unstage_budget: OpsBudget::new(config.max_commit_ms),
            link: Some(SinkConnection::new(
                &config,
                clock.clone(),
                ServerWatch::new(
                    &shared.metrics,
                    &shared.health,
                    config.allow_evicting_policy,
                ),
            )),
            clock,
            config,
            tz,
            shards,
            shared,
            fences: BTreeMap::new(),
            pending: BTreeMap::new(),
            planning: false,
            queued: VecDeque::new(),
            in_flight: None,
        }
    }

    fn ttls(&self, clock: &Clock) -> Ttls {
        let secs = |s: u64| (s * 1000).min(i64::MAX as u64) as i64;
        Ttls {
            receiver: day_end(self.tz, clock.now()),
            message: Expiry::After(secs(self.config.message_ttl_secs)),
            template_ms: secs(self.config.template_ttl_secs),
            series_ms: secs(self.config.series_ttl_secs),
            conflicts_ms: CONFLICTS_TTL_MS,
        }
    }

    /// Plans the oldest checkpoint whose every flush is in, on the blocking pool: a
    /// big plan takes 50–350 ms, and on the sink's own thread it would keep the replies
    /// of the commit before from being read, so Redis would wait. One plan at a time:
    /// each starts where the one before ends. The plan comes back as [`Planned`], to the
    /// sink's address, so a restart of the sink meanwhile does not lose it.
    fn plan_next(&mut self, ctx: &mut Context<Self>) {
        if self.planning {
            return;
        }
        // Only the oldest checkpoint: each plan starts where the one before ends, so a
        // later one planned past an older that is not in would move the fences over the
        // older one's output. Checkpoints complete in order, so that never happens;
        // if it did, stopping is the only way not to lose it.
        let Some((&id, arrived)) = self.pending.iter().next() else {
            return;
        };
        if arrived.len() < self.shards {
            if let Some(later) = self
                .pending
                .iter()
                .skip(1)
                .find(|(_, arrived)| arrived.len() >= self.shards)
            {
                error!(
                    waiting = id,
                    complete = *later.0,
                    "a later checkpoint is complete before an earlier one"
                );
                supervision::stateful_panic("redis_sink", "checkpoints out of order");
            }
            return;
        }
        let flushes = self.pending.remove(&id).unwrap_or_default();
        let (layout, ttls, tracked) = (
            self.layout.clone(),
            self.ttls(&self.clock),
            self.fences.clone(),
        );
        let (keys, budget_ops, unstage_fields) = (
            self.shared.keys.clone(),
            self.budget.ops(),
            self.unstage_budget.ops(),
        );
        let (transactions, now_ms) = (
            self.config.commit == CommitMode::Transaction,
            self.clock.now_ms(),
        );
        self.planning = true;
        let sink = ctx.address();
        actix::spawn(async move {
            let plan = move || {
                let started = Instant::now();
                let input = CommitInput {
                    layout: &layout,
                    ttls,
                    tracked: &tracked,
                    keys: &keys,
                    budget_ops,
                    unstage_fields,
                    transactions,
                    now_ms,
                };
                let plan = commit::plan(&input, flushes);
                let took_ms = started.elapsed().as_millis() as u64;
                debug!(checkpoint = id, took_ms, "redis commit planned");
                plan
            };
            let planned = tokio::task::spawn_blocking(move || supervision::catch(plan))
                .await
                .unwrap_or_else(|error| Err(error.to_string()));
            // Only fails when the system is stopping.
            let _ = sink.send(Planned(planned)).await;
        });
    }

    /// Starts the next queued plan unless a commit is running or waits for a restart.
    fn start_next(&mut self, ctx: &mut Context<Self>) {
        if self.in_flight.is_some() || self.link.is_none() {
            return;
        }
        let Some(plan) = self.queued.pop_front() else {
            return;
        };
        self.in_flight = Some(InFlight {
            plan,
            applied: 0,
            started: Instant::now(),
        });
        ctx.spawn(self.apply_in_flight());
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
            unstage_budget: self.unstage_budget,
            slowdown: self.config.slowdown_factor,
        };
        Box::pin(
            async move {
                let mut committer = committer;
                let outcome = committer.apply(&mut link, &mut in_flight).await;
                let budgets = (committer.budget, committer.unstage_budget);
                (link, in_flight, budgets, outcome)
            }
            .into_actor(self)
            .map(|(link, in_flight, budgets, outcome), sink, ctx| {
                sink.link = Some(link);
                (sink.budget, sink.unstage_budget) = budgets;
                sink.settle(ctx, in_flight, outcome);
            }),
        )
    }

    /// What follows one attempt at the commit in flight.
    fn settle(&mut self, ctx: &mut Context<Self>, in_flight: InFlight, outcome: Result<(), Stop>) {
        let metrics = &self.shared.metrics;
        if let Some(link) = &self.link {
            metrics
                .clock_skew_seconds
                .set(link.clock.skew_ms() as f64 / 1000.0);
        }
        match outcome {
            Ok(()) => {
                self.applied(in_flight);
                self.start_next(ctx);
            }
            Err(Stop::Refused) => {}
            Err(Stop::Failed(error)) => {
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
        let fences = plan.ranges.iter().map(|r| (r.partition, r.to)).collect();
        self.acks.committed(plan.spec.id, fences);
    }
}

/// The receivers' expiry for a commit planned at `now`: the end of its local day, or
/// of the next if the script runs after midnight (Redis's clock decides, when it runs).
fn day_end(tz: chrono_tz::Tz, now: chrono::DateTime<chrono::Utc>) -> Expiry {
    let today = end_of_day_ms(tz, now);
    let next = chrono::DateTime::from_timestamp_millis(today)
        .map_or(today + 86_400_000, |midnight| end_of_day_ms(tz, midnight));
    Expiry::DayEnd([today, next])
}

impl Actor for RedisSink {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(crate::runtime::mailbox::actix_capacity(REDIS_SINK_MAILBOX));
        // After a restart: wait out the backoff, then finish the commit in flight
        // before anything else (`wait` holds the mailbox).
        self.restarts.started_then(ctx, |sink: &mut Self, _| {
            Box::pin(
                sink.apply_in_flight()
                    .map(|(), sink, ctx| sink.start_next(ctx)),
            )
        });
    }
}

impl Supervised for RedisSink {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.restarts.restarting();
    }
}

impl Handler<ShardFlush> for RedisSink {
    /// Returns once the flush is taken, not when Redis has it: a slow Redis holds
    /// reading back through the source's uncommitted share, which is held against this
    /// sink's fence.
    type Result = ();

    fn handle(&mut self, flush: ShardFlush, ctx: &mut Self::Context) {
        self.pending.entry(flush.spec.id).or_default().push(flush);
        self.plan_next(ctx);
    }
}

/// A checkpoint's plan, built off the sink's thread ([`RedisSink::plan_next`]), or the
/// panic that building it raised.
#[derive(Message)]
#[rtype(result = "()")]
struct Planned(Result<Option<CommitPlan>, String>);

impl Handler<Planned> for RedisSink {
    type Result = ();

    fn handle(&mut self, Planned(planned): Planned, ctx: &mut Self::Context) {
        self.planning = false;
        match planned {
            Ok(Some(plan)) => {
                for range in &plan.ranges {
                    self.fences.insert(range.partition, (range.epoch, range.to));
                }
                self.queued.push_back(plan);
            }
            Ok(None) => {}
            Err(panic) => return supervision::stateful_panic("redis_sink", &panic),
        }
        self.start_next(ctx);
        self.plan_next(ctx);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::Receiver;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::checkpoint::barrier::{CheckpointKind, CheckpointSpec};
    use crate::checkpoint::claim::{Claim, SinkKind};
    use crate::logic::decode::TraceValue;
    use crate::messages::{Ack, ListPush, PartitionDelta};
    use crate::protocol::fences;
    use crate::sinks::test_redis::{acks, shared, test_redis};

    /// One shard's flush of checkpoint `id`: partition 0 up to `next_offset`, one value
    /// pushed onto `receiver`.
    fn flush(id: u64, next_offset: i64, claim: Claim, receiver: &str) -> ShardFlush {
        let value = TraceValue {
            state: 60,
            business_id: 1000001220231120,
            timestamp: id as i64,
        };
        ShardFlush {
            shard: 0,
            spec: Arc::new(CheckpointSpec {
                id,
                partitions: vec![0],
                kind: CheckpointKind::Periodic,
                watermark: None,
            }),
            partitions: vec![PartitionDelta {
                partition: 0,
                next_offset,
                claim,
                template_counts: vec![],
                receiver_lists: vec![ListPush {
                    key: receiver.into(),
                    values: smallvec::smallvec![value],
                }],
                message_lists: vec![],
                series: vec![],
                windows: String::new(),
            }],
        }
    }

    /// The sink's reports so far, waiting (on the actor's own runtime) for `n`.
    async fn reports(notices: &Receiver<Ack>, n: usize) -> Vec<(u64, Vec<(i32, i64)>)> {
        let mut out = Vec::new();
        for _ in 0..1000 {
            while let Ok(Ack::SinkCommitted {
                checkpoint, fences, ..
            }) = notices.try_recv()
            {
                out.push((checkpoint, fences));
            }
            if out.len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        out
    }

    /// Taking a flush never waits for Redis: while Redis holds checkpoint 1's script
    /// (paused), the sink takes checkpoint 2's flush and plans it from where 1 ends;
    /// once Redis runs again both apply, in order, each exactly once.
    #[actix::test]
    async fn a_flush_is_taken_while_redis_still_runs_the_commit_before() {
        let (config, keys) = test_redis();
        let mut conn = fences::connect(&config, Duration::from_secs(5)).unwrap();
        let claims = fences::claim(&mut conn, &keys, &[0], |fresh| {
            Ok(fresh.iter().map(|p| (*p, 0)).collect())
        })
        .unwrap();
        let claim = claims[&0].claim;
        let receiver = format!(
            "unit-redis-sink-{}-{}",
            std::process::id(),
            chrono::Utc::now().timestamp_micros()
        );
        let (acks, notices) = acks(SinkKind::Redis);
        let sink = RedisSink::new(
            config,
            chrono_tz::UTC,
            1,
            shared(&keys),
            acks,
            Clock::default(),
        )
        .start();

        // Scripts wait while Redis is paused for writes; reads and UNPAUSE do not.
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(20_000)
            .arg("WRITE")
            .query(&mut conn)
            .unwrap();
        sink.send(flush(1, 2, claim, &receiver)).await.unwrap();
        sink.send(flush(2, 5, claim, &receiver)).await.unwrap();
        let before = reports(&notices, 0).await;
        let stored = fences::read(&mut conn, &keys, &[0]).unwrap()[&0].1;
        let _: () = redis::cmd("CLIENT")
            .arg("UNPAUSE")
            .query(&mut conn)
            .unwrap();
        assert_eq!(before, vec![], "both flushes taken, nothing applied yet");
        assert_eq!(stored, Some(0), "Redis held the first script");

        let applied = reports(&notices, 2).await;
        assert_eq!(applied, vec![(1, vec![(0, 2)]), (2, vec![(0, 5)])]);
        let stored = fences::read(&mut conn, &keys, &[0]).unwrap()[&0].1;
        assert_eq!(stored, Some(5));
        let values: Vec<String> = redis::cmd("LRANGE")
            .arg(&receiver)
            .arg(0)
            .arg(-1)
            .query(&mut conn)
            .unwrap();
        let timestamps: Vec<bool> = ["\"timestamp\":2", "\"timestamp\":1"]
            .iter()
            .zip(&values)
            .map(|(t, v)| v.contains(t))
            .collect();
        assert_eq!(
            (values.len(), timestamps),
            (2, vec![true, true]),
            "{values:?}"
        );
        let _: () = redis::cmd("DEL").arg(&receiver).query(&mut conn).unwrap();
    }
}
