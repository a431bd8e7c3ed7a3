//! Fault points: named places where a test can make the process die as if by
//! `kill -9`, to force the dangerous instants of the commit protocol deterministically.
//!
//! Compiled only with the `fault-points` feature (the test script enables it; release
//! builds never have it). With the feature, `ANCHORFLOW_FAULT=<name>` aborts the
//! process (or, at a panic point, panics) the `ANCHORFLOW_FAULT_AFTER`-th time that
//! point is reached (by default the first), and with `ANCHORFLOW_FAULT_ONCE=<file>`
//! only in the first process that gets there; `ANCHORFLOW_FAULT_HOLD=<file>` makes an
//! async point hold instead ([`point_or_hold`]); `ANCHORFLOW_FAULT_POISON` makes every
//! record containing its text panic the reader.

/// After the Redis commit script succeeded, before the sink reports it (and so
/// before files of the same checkpoint are necessarily published).
pub const AFTER_REDIS_COMMIT: &str = "after_redis_commit";
/// After a Redis final script staged window series, before an `unstage` script
/// applies them (the first unstage reached; `ANCHORFLOW_FAULT_AFTER` picks a later one;
/// a hold point, [`point_or_hold`]).
pub const BEFORE_SERIES_UNSTAGE: &str = "before_series_unstage";
/// After a warehouse commit was recorded in Redis, before its files are renamed.
pub const AFTER_WAREHOUSE_RECORD: &str = "after_warehouse_record";
/// Between publishing two files of a recorded warehouse commit.
pub const BETWEEN_PUBLISHES: &str = "between_publishes";
/// After every file of a recorded warehouse commit is published, before the record is
/// forgotten.
pub const BEFORE_FORGETTING_RECORD: &str = "before_forgetting_record";
/// After both sinks committed a checkpoint, before the offsets go to Kafka.
pub const AFTER_SINKS_COMMITTED: &str = "after_sinks_committed";
/// A partition reader processing a batch (a panic point: see [`panic_point`]).
pub const READER_BATCH: &str = "reader_batch";
/// The timer handling a watermark report (a panic point).
pub const TIMER_UPDATE: &str = "timer_update";
/// An aggregator shard handling its input (a panic point).
pub const AGGREGATOR_INPUT: &str = "aggregator_input";

/// Whether the named point is reached for the `ANCHORFLOW_FAULT_AFTER`-th time.
#[cfg(feature = "fault-points")]
fn reached(name: &str) -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static HITS: AtomicU64 = AtomicU64::new(0);
    if std::env::var("ANCHORFLOW_FAULT").as_deref() != Ok(name) {
        return false;
    }
    let after: u64 = std::env::var("ANCHORFLOW_FAULT_AFTER")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    if HITS.fetch_add(1, Ordering::SeqCst) + 1 != after {
        return false;
    }
    // `ANCHORFLOW_FAULT_ONCE=<file>`: fire in one process only, over restarts.
    match std::env::var_os("ANCHORFLOW_FAULT_ONCE") {
        Some(marker) => std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(marker)
            .is_ok(),
        None => true,
    }
}

/// With the feature, panics once, the `ANCHORFLOW_FAULT_AFTER`-th time the point named
/// by `ANCHORFLOW_FAULT` is reached: a bug in a handler, for the supervision tests.
#[cfg(feature = "fault-points")]
pub fn panic_point(name: &str) {
    if reached(name) {
        panic!("fault point {name} reached");
    }
}

#[cfg(not(feature = "fault-points"))]
#[inline(always)]
pub fn panic_point(_name: &str) {}

/// With the feature, panics whenever a record's value contains the text in
/// `ANCHORFLOW_FAULT_POISON`: a record that makes processing panic every time.
#[cfg(feature = "fault-points")]
pub fn poison(payload: Option<&[u8]>) {
    static POISON: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let poison = POISON.get_or_init(|| std::env::var("ANCHORFLOW_FAULT_POISON").ok());
    if let (Some(poison), Some(payload)) = (poison, payload) {
        let found = payload
            .windows(poison.len().max(1))
            .any(|w| w == poison.as_bytes());
        if found {
            panic!("poison record reached");
        }
    }
}

#[cfg(not(feature = "fault-points"))]
#[inline(always)]
pub fn poison(_payload: Option<&[u8]>) {}

#[cfg(feature = "fault-points")]
pub fn point(name: &str) {
    if reached(name) {
        abort_at(name);
    }
}

#[cfg(not(feature = "fault-points"))]
#[inline(always)]
pub fn point(_name: &str) {}

#[cfg(feature = "fault-points")]
fn abort_at(name: &str) -> ! {
    eprintln!("fault point {name} reached: aborting");
    std::process::abort();
}

/// [`point`] for async code, which with `ANCHORFLOW_FAULT_HOLD=<file>` holds instead of
/// aborting: it creates the file and waits until the test removes it, so that the test
/// can break a dependency (freeze or stop Redis) at exactly that instant and then let
/// the work go on into the broken dependency.
#[cfg(feature = "fault-points")]
pub async fn point_or_hold(name: &str) {
    if !reached(name) {
        return;
    }
    let Some(marker) = std::env::var_os("ANCHORFLOW_FAULT_HOLD") else {
        abort_at(name);
    };
    let marker = std::path::PathBuf::from(marker);
    if let Err(error) = std::fs::write(&marker, name) {
        eprintln!("fault point {name}: cannot create {marker:?}: {error}");
        abort_at(name);
    }
    eprintln!("fault point {name} reached: holding until {marker:?} is removed");
    while marker.exists() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[cfg(not(feature = "fault-points"))]
#[inline(always)]
pub async fn point_or_hold(_name: &str) {}

/// With the feature, `ANCHORFLOW_FAULT_WAREHOUSE_DELAY_MS` makes the warehouse sink
/// sleep that long per batch of rows: a slow disk or bucket, for the test that a slow
/// warehouse holds reading back (through the readers' awaited handoff) and loses
/// nothing. Nothing without the feature.
#[cfg(feature = "fault-points")]
pub fn warehouse_delay() {
    static DELAY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let ms = *DELAY.get_or_init(|| {
        std::env::var("ANCHORFLOW_FAULT_WAREHOUSE_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    });
    if ms > 0 {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

#[cfg(not(feature = "fault-points"))]
#[inline(always)]
pub fn warehouse_delay() {}

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
