//! Applying one commit plan (`commit.rs`) to Redis, script by script (a Lua script or a
//! transaction, `transaction.rs`), each once: what a script's reply means (applied, applied before its reply was lost, refused by the
//! fence check), the budgets it teaches, and why an attempt stopped. The sink
//! (`redis_sink.rs`) runs an attempt beside its mailbox and keeps the commit in flight
//! across its restarts.

use std::time::Instant;

use tracing::{debug, info};

use crate::checkpoint::claim::SinkKind;
use crate::protocol::commit_args::Mode;
use crate::protocol::reply::{Rejection, Reply};
use crate::runtime::fault;
use crate::sinks::fenced::{on_rejection, SinkShared};
use crate::sinks::redis::budget::OpsBudget;
use crate::sinks::redis::client::SinkConnection;
use crate::sinks::redis::commit::{Body, CommitPlan};
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
        let checkpoint = in_flight.plan.spec.id;
        while let Some(script) = in_flight.plan.scripts.get(in_flight.applied) {
            if script.mode == Mode::Unstage {
                fault::point_or_hold(fault::BEFORE_SERIES_UNSTAGE).await;
            }
            let started = Instant::now();
            let keys = &self.shared.keys;
            let attempt = match &script.body {
                Body::Lua(args) => link.apply(keys, args).await,
                Body::Transaction(tx) => link.transact(keys, tx).await,
            };
            let reply = match attempt {
                Ok(reply) => reply,
                Err(error) => return Err(Stop::Failed(error)),
            };
            self.shared.metrics.redis_commands.inc();
            match reply {
                Reply::Applied {
                    ops,
                    conflicts,
                    first,
                } => {
                    let took = started.elapsed();
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
                    info!(checkpoint, "redis commit had been applied before its reply was lost; not applied again");
                }
                Reply::Rejected(rejection) => {
                    let stop =
                        if on_rejection(&self.shared, SinkKind::Redis, checkpoint, &rejection) {
                            Stop::Failed(lost_fences(rejection))
                        } else {
                            Stop::Refused
                        };
                    return Err(stop);
                }
            }
            in_flight.applied += 1;
        }
        if self.slowdown > 0 {
            tokio::time::sleep(in_flight.started.elapsed() * self.slowdown).await;
        }
        Ok(())
    }
}

fn lost_fences(rejection: Rejection) -> anyhow::Error {
    anyhow::anyhow!("{rejection}: holding the commit until an operator recovers the fences")
}
