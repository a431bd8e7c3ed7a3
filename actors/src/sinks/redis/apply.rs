//! Applying one commit plan (`commit.rs`) to Redis, script by script (a Lua script or a
//! transaction, `transaction.rs`), each once: what a script's reply means (applied, applied before its reply was lost, refused by the
//! fence check), the budgets it teaches, and why an attempt stopped. The sink
//! (`redis_sink.rs`) runs an attempt beside its mailbox and keeps the commit in flight
//! across its restarts.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures::stream::{FuturesOrdered, StreamExt as _};
use tracing::{debug, info};

use crate::checkpoint::claim::SinkKind;
use crate::protocol::commit_args::Mode;
use crate::protocol::reply::{self, Rejection, Reply};
use crate::runtime::fault;
use crate::sinks::fenced::{on_rejection, SinkShared};
use crate::sinks::redis::budget::OpsBudget;
use crate::sinks::redis::client::SinkConnection;
use crate::sinks::redis::commit::{Body, CommitPlan, Script};
use crate::sinks::redis::conflicts::report_conflicts;

/// The commit being applied; it survives a restart of the sink, which resumes it.
pub struct InFlight {
    pub plan: CommitPlan,
    /// Scripts of the plan applied so far.
    pub applied: usize,
    pub started: Instant,
}

/// Why a commit stopped before it applied.
pub enum Stop {
    /// Refused for good by the fence check: the process is stopping.
    Refused,
    /// Redis did not answer, or has lost the fences: restart and try again.
    Failed(anyhow::Error),
}

/// What a commit needs that is not lent by the actor.
pub struct Committer {
    pub shared: SinkShared,
    pub budget: OpsBudget,
    pub unstage_budget: OpsBudget,
    /// Test and benchmark knob (`redis.slowdown_factor`): after a commit, wait this
    /// many times as long as it took.
    pub slowdown: u32,
}

impl Committer {
    /// Runs the scripts of the commit that have not applied yet, in order, each once.
    pub async fn apply(
        &mut self,
        link: &mut SinkConnection,
        in_flight: &mut InFlight,
    ) -> Result<(), Stop> {
        while let Some(script) = in_flight.plan.scripts.get(in_flight.applied) {
            if parts_run(&in_flight.plan.scripts[in_flight.applied..]) > 1 {
                self.apply_parts(link, in_flight).await?;
                continue;
            }
            if script.mode == Mode::Unstage {
                fault::point_or_hold(fault::BEFORE_SERIES_UNSTAGE).await;
            }
            let started = Instant::now();
            let keys = &self.shared.keys;
            let attempt = match &script.body {
                Body::Lua(args) => link.apply(keys, args).await,
                Body::Transaction(tx) => link.transact(keys, tx).await,
            };
            let reply = attempt.map_err(Stop::Failed)?;
            self.settle(
                &in_flight.plan,
                &mut in_flight.applied,
                reply,
                started.elapsed(),
            )?;
        }
        if self.slowdown > 0 {
            tokio::time::sleep(in_flight.started.elapsed() * self.slowdown).await;
        }
        Ok(())
    }

    /// Applies the run of Lua parts the commit is at, [`PIPELINED`] outstanding at a
    /// time, so that Redis has the next part when it finishes one. Parts may apply in
    /// any order, each atomic with its units' fences: a part that failed is sent again
    /// and leaves out the units a later one already applied. The final script, which
    /// moves the fences past every part, is sent only once every part answered.
    async fn apply_parts(
        &mut self,
        link: &mut SinkConnection,
        in_flight: &mut InFlight,
    ) -> Result<(), Stop> {
        let scripts = &in_flight.plan.scripts;
        let end = in_flight.applied + parts_run(&scripts[in_flight.applied..]);
        let mut next = in_flight.applied;
        let mut answers = FuturesOrdered::new();
        let mut sent_at = VecDeque::with_capacity(PIPELINED);
        let mut answered = Instant::now();
        while in_flight.applied < end {
            while next < end && answers.len() < PIPELINED {
                let Body::Lua(args) = &scripts[next].body else {
                    break;
                };
                answers.push_back(
                    link.send(&self.shared.keys, args)
                        .await
                        .map_err(Stop::Failed)?,
                );
                sent_at.push_back(Instant::now());
                next += 1;
            }
            let Some(value) = answers.next().await else {
                break;
            };
            let value = value.map_err(|error| {
                link.reset();
                Stop::Failed(error)
            })?;
            let reply = reply::parse(&value).map_err(Stop::Failed)?;
            // Redis's time on it: from when it was sent or the one before answered.
            let started = sent_at.pop_front().map_or(answered, |at| at.max(answered));
            answered = Instant::now();
            self.settle(
                &in_flight.plan,
                &mut in_flight.applied,
                reply,
                answered - started,
            )?;
        }
        Ok(())
    }

    /// What the reply of the script the commit is at means: counted and learned from
    /// when applied, and the commit moves on to the next; or why it stops.
    fn settle(
        &mut self,
        plan: &CommitPlan,
        applied: &mut usize,
        reply: Reply,
        took: Duration,
    ) -> Result<(), Stop> {
        let checkpoint = plan.spec.id;
        let script = &plan.scripts[*applied];
        self.shared.metrics.redis_commands.inc();
        match reply {
            Reply::Applied {
                ops,
                conflicts,
                first,
            } => {
                match script.mode {
                    Mode::Unstage => self.unstage_budget.observe(script.ops, took),
                    Mode::Part | Mode::Final => self.budget.observe(script.ops, took),
                }
                let metrics = &self.shared.metrics;
                metrics.redis_script_seconds.observe(took.as_secs_f64());
                metrics.redis_script_operations.inc_by(ops.max(0) as u64);
                report_conflicts(metrics, checkpoint, conflicts, &first);
                debug!(checkpoint, ops, took_ms = took.as_millis() as u64, mode = ?script.mode, "redis script applied");
            }
            Reply::AppliedBefore if script.mode == Mode::Unstage => {
                debug!(
                    checkpoint,
                    "staged series already unstaged (by a retry or another instance)"
                );
            }
            Reply::AppliedBefore => {
                info!(
                    checkpoint,
                    "redis commit had been applied before its reply was lost; not applied again"
                );
            }
            Reply::Rejected(rejection) => {
                let stop = if on_rejection(&self.shared, SinkKind::Redis, checkpoint, &rejection) {
                    Stop::Failed(lost_fences(rejection))
                } else {
                    Stop::Refused
                };
                return Err(stop);
            }
        }
        *applied += 1;
        Ok(())
    }
}

/// Commit scripts outstanding at once on a run of parts: one running, the next already
/// sent, so Redis has it as soon as it finishes the first. Each is sized to a share of
/// `redis.max_commit_ms`, and a reader of the same Redis waits at most for the one
/// running and the one sent.
const PIPELINED: usize = 2;

/// How many of `scripts`, from the first, are Lua parts (which may be outstanding
/// together).
fn parts_run(scripts: &[Script]) -> usize {
    scripts
        .iter()
        .take_while(|s| s.mode == Mode::Part && matches!(s.body, Body::Lua(_)))
        .count()
}

fn lost_fences(rejection: Rejection) -> anyhow::Error {
    anyhow::anyhow!("{rejection}: holding the commit until an operator recovers the fences")
}
