//! Fault points: named places where a test can make the process die as if by
//! `kill -9`, to force the dangerous instants of the commit protocol deterministically.
//!
//! Compiled only with the `fault-points` feature (the test script enables it; release
//! builds never have it). With the feature, `ANCHORFLOW_FAULT=<name>` aborts the
//! process the `ANCHORFLOW_FAULT_AFTER`-th time (default 1) that point is reached.

/// After the Redis commit script succeeded, before the sink reports it (and so
/// before files of the same checkpoint are necessarily published).
pub const AFTER_REDIS_COMMIT: &str = "after_redis_commit";
/// After a warehouse commit was recorded in Redis, before its files are renamed.
pub const AFTER_WAREHOUSE_RECORD: &str = "after_warehouse_record";
/// After both sinks committed a checkpoint, before the offsets go to Kafka.
pub const AFTER_SINKS_COMMITTED: &str = "after_sinks_committed";

#[cfg(feature = "fault-points")]
pub fn point(name: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static HITS: AtomicU64 = AtomicU64::new(0);
    if std::env::var("ANCHORFLOW_FAULT").as_deref() != Ok(name) {
        return;
    }
    let after: u64 = std::env::var("ANCHORFLOW_FAULT_AFTER")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    if HITS.fetch_add(1, Ordering::SeqCst) + 1 >= after {
        eprintln!("fault point {name} reached: aborting");
        std::process::abort();
    }
}

#[cfg(not(feature = "fault-points"))]
#[inline(always)]
pub fn point(_name: &str) {}

/// Milliseconds to add to this host's wall clock: with the feature,
/// `ANCHORFLOW_FAULT_CLOCK_OFFSET_MS` plays a host whose clock is wrong (tests of the
/// clock-skew fault). Always 0 without the feature.
#[cfg(feature = "fault-points")]
pub fn clock_offset_ms() -> i64 {
    static OFFSET: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *OFFSET.get_or_init(|| {
        std::env::var("ANCHORFLOW_FAULT_CLOCK_OFFSET_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    })
}

#[cfg(not(feature = "fault-points"))]
#[inline(always)]
pub fn clock_offset_ms() -> i64 {
    0
}
