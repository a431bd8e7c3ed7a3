//! What the Redis sink does with the writes Redis refused (a key of another type, a
//! hash field that is not a number, an overflow, a key under anchorflow's own prefix):
//! the rest of the commit applied, so each refusal is counted in
//! `anchorflow_redis_conflicts_total{reason}` and the first few are logged with their
//! key; the commit script records all of them in the conflicts hash for
//! `anchorflow fences show`.

use tracing::warn;

use crate::metrics::{Metrics, ReasonLabel};
use crate::protocol::reply::Conflict;

/// Conflicts logged per commit with their key; the rest are counted.
const LOGGED_CONFLICTS: usize = 10;

/// Reports the `total` refusals of one script, `first` of them named.
pub fn report_conflicts(metrics: &Metrics, checkpoint: u64, total: i64, first: &[Conflict]) {
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
