//! Claims and fence ranges: who owns a partition (its epoch) and where each sink's
//! durable output of it ends (its fences), as plain data. The Redis side of both is in
//! [`crate::protocol::fences`].

/// The sinks, as named in notices, logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SinkKind {
    Redis,
    Warehouse,
}

impl SinkKind {
    /// Every sink: a checkpoint is complete when each of them committed it.
    pub const ALL: [SinkKind; 2] = [SinkKind::Redis, SinkKind::Warehouse];

    pub fn name(self) -> &'static str {
        match self {
            SinkKind::Redis => "redis",
            SinkKind::Warehouse => "warehouse",
        }
    }
}

/// What an instance learns when it takes a partition: its epoch, and where each sink's
/// durable output ends. It travels with every barrier, so the sinks know the epoch and
/// where their first range of this assignment starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim {
    pub epoch: i64,
    pub redis: i64,
    pub warehouse: i64,
}

impl Claim {
    /// Where reading resumes: the lowest fence over the sinks.
    pub fn start(&self) -> i64 {
        self.redis.min(self.warehouse)
    }

    pub fn fence(&self, sink: SinkKind) -> i64 {
        match sink {
            SinkKind::Redis => self.redis,
            SinkKind::Warehouse => self.warehouse,
        }
    }
}

/// One partition's share of a commit: the records `from..to` under `epoch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FenceRange {
    pub partition: i32,
    pub epoch: i64,
    pub from: i64,
    pub to: i64,
}

/// Where a sink's next range of a partition starts: the end of its last accepted
/// commit under the same epoch, else the claim's fence (a new assignment).
pub fn range_for(
    tracked: Option<(i64, i64)>,
    sink: SinkKind,
    partition: i32,
    claim: Claim,
    next_offset: i64,
) -> FenceRange {
    let from = match tracked {
        Some((epoch, end)) if epoch == claim.epoch => end,
        _ => claim.fence(sink),
    };
    FenceRange {
        partition,
        epoch: claim.epoch,
        from,
        // Records below a sink's fence are skipped, so a barrier may lie below it.
        to: next_offset.max(from),
    }
}
