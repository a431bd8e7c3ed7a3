//! What both sinks do with a commit the fence check refused.

use tracing::error;

use crate::checkpoint::claim::SinkKind;
use crate::metrics::RejectionLabel;
use crate::protocol::reply::Rejection;
use crate::runtime::exit;

/// Reports a refused commit. Returns whether to retry it: only when Redis lost the
/// fences, which an operator must resolve (see `docs/exactly-once.md`); any other
/// rejection stops the process so that a restart resumes from the stored fences.
pub fn on_rejection(
    shared: &SinkShared,
    sink: SinkKind,
    checkpoint: u64,
    rejection: &Rejection,
) -> bool {
    let metrics = &shared.metrics;
    shared.health.failed();
    metrics
        .commits_rejected
        .get_or_create(&RejectionLabel {
            sink: sink.name(),
            reason: rejection.reason(),
        })
        .inc();
    match rejection {
        Rejection::FencesMissing { .. } => {
            metrics.redis_state_lost.set(1);
            shared.health.set_state_lost(true);
            error!(
                sink = sink.name(),
                checkpoint,
                %rejection,
                "Redis has lost anchorflow's fences: holding this commit; recover with `anchorflow fences recover` (docs/exactly-once.md)"
            );
            true
        }
        Rejection::StaleEpoch { .. } | Rejection::NotContiguous { .. } => {
            error!(sink = sink.name(), checkpoint, %rejection, "commit rejected by the fence check");
            exit::stop(
                exit::FENCED,
                "exiting so that a restart resumes from the stored fences",
            );
            false
        }
    }
}

/// What both sinks share: their metrics and health, and the keys of their bookkeeping.
/// Where a sink reports its commits is its own [`SinkAcks`] handle, given in its
/// constructor.
///
/// [`SinkAcks`]: crate::checkpoint::driver::SinkAcks
#[derive(Clone)]
pub struct SinkShared {
    pub metrics: crate::metrics::Metrics,
    pub health: crate::runtime::health::Health,
    pub keys: crate::protocol::keys::FenceKeys,
}

impl SinkShared {
    /// A commit applied: Redis holds the fences (again).
    pub fn applied(&self) {
        self.metrics.redis_state_lost.set(0);
        self.health.set_state_lost(false);
    }
}
