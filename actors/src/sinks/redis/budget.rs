//! The operations budget a Redis commit's scripts are sized to, so that no script
//! holds Redis (which austin-web reads too) past `redis.max_commit_ms`: learned from the
//! scripts that ran.

/// The share of `redis.max_commit_ms` a script is sized to. The cost per operation is
/// measured from earlier scripts, but the same script's cost varies within a run on a
/// busy machine (a Redis descheduled while the readers have the cores), so a script
/// sized to the whole bound, or to half of it, runs over it at times. A script's fixed
/// cost (the fence check, one unit fence per partition) is small beside the bound, so
/// smaller scripts cost little (docs/benchmarks.md has the measured spread).
pub const HEADROOM: f64 = 0.35;

/// Keeps the per-script operations budget so that one script stays within
/// `redis.max_commit_ms`: the measured cost per operation (a moving average over
/// scripts big enough to measure) converts [`HEADROOM`] of the time bound into
/// operations.
#[derive(Clone, Copy, Debug)]
pub struct OpsBudget {
    max_ms: f64,
    micros_per_op: f64,
}

impl OpsBudget {
    /// Until measured, assume a slow operation (a write of a new key on a busy
    /// machine): an optimistic first guess makes the first scripts, the ones that
    /// measure, run over `redis.max_commit_ms`.
    pub fn new(max_commit_ms: u64) -> Self {
        OpsBudget {
            max_ms: max_commit_ms as f64,
            micros_per_op: 5.0,
        }
    }

    pub fn ops(&self) -> usize {
        ((HEADROOM * self.max_ms * 1000.0 / self.micros_per_op) as usize).clamp(1_000, 1_000_000)
    }

    /// Learns from one script that carried `ops` writes and took `took`.
    pub fn observe(&mut self, ops: usize, took: std::time::Duration) {
        if ops < 2_000 {
            return;
        }
        let measured = took.as_secs_f64() * 1e6 / ops as f64;
        // Dearer than assumed: believe it at once, so that at most one script runs over
        // the bound; cheaper: average it in.
        self.micros_per_op = if measured > self.micros_per_op {
            measured
        } else {
            (0.8 * self.micros_per_op + 0.2 * measured).max(0.05)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_follows_measured_cost() {
        let mut budget = OpsBudget::new(100);
        assert_eq!(budget.ops(), 7_000, "35 % of 100 ms at 5 µs");
        budget.observe(10_000, std::time::Duration::from_millis(100));
        assert_eq!(budget.ops(), 3_500, "a dearer script corrects at once");
        for _ in 0..30 {
            budget.observe(10_000, std::time::Duration::from_millis(40));
        }
        assert!((8_500..9_000).contains(&budget.ops()), "{}", budget.ops());
        budget.observe(10, std::time::Duration::from_secs(1));
        assert!(
            (8_500..9_000).contains(&budget.ops()),
            "tiny scripts are ignored"
        );
    }
}
