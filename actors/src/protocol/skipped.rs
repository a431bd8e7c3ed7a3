//! Records the broker no longer held when they were due: a fence pointing below the
//! log's first offset (retention deleted them while the instance was down or paused,
//! a trimmed log). librdkafka resets the position per `auto.offset.reset` and only
//! logs a warning; anchorflow counts the range in
//! `anchorflow_records_skipped_total{partition,reason}`, logs it as an error and keeps
//! a per-partition total and the last range in Redis for `anchorflow fences show`.

use std::ops::Range;

use anyhow::Context as _;

use crate::protocol::keys::FenceKeys;

/// The metric reason of records skipped because their offsets were out of range.
pub const OUT_OF_RANGE: &str = "offset_out_of_range";

/// The records skipped when `delivered` arrives where `expected` was due and the log
/// starts at `log_start`: none when the gap lies inside the log (its offsets hold
/// transaction markers or compacted records, nothing anchorflow should have read).
pub fn skipped(expected: i64, delivered: i64, log_start: i64) -> Option<Range<i64>> {
    (delivered > expected && expected < log_start).then_some(expected..delivered)
}

/// Adds a skipped range to the partition's stored total and keeps it as the last one.
pub fn store(
    conn: &mut redis::Connection,
    keys: &FenceKeys,
    partition: i32,
    range: &Range<i64>,
) -> anyhow::Result<()> {
    redis::pipe()
        .atomic()
        .cmd("HINCRBY")
        .arg(&keys.skipped)
        .arg(partition)
        .arg(range.end - range.start)
        .ignore()
        .cmd("HSET")
        .arg(&keys.skipped)
        .arg(format!("range:{partition}"))
        .arg(format!("{}..{}", range.start, range.end))
        .ignore()
        .query::<()>(conn)
        .context("storing a skipped range")
}

/// Per partition: records skipped in all, and the last range.
pub fn read(
    conn: &mut redis::Connection,
    keys: &FenceKeys,
) -> anyhow::Result<std::collections::BTreeMap<i32, (i64, String)>> {
    let all: std::collections::BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(&keys.skipped)
        .query(conn)
        .context("reading skipped ranges")?;
    let mut out = std::collections::BTreeMap::new();
    for (field, value) in &all {
        if let Ok(partition) = field.parse::<i32>() {
            let total = value.parse().unwrap_or_default();
            let last = all
                .get(&format!("range:{partition}"))
                .cloned()
                .unwrap_or_default();
            out.insert(partition, (total, last));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_gaps_below_the_log_start_are_skipped_records() {
        assert_eq!(skipped(200, 1_500, 1_500), Some(200..1_500), "retention");
        assert_eq!(
            skipped(200, 9_000, 1_500),
            Some(200..9_000),
            "reset to the end"
        );
        assert_eq!(skipped(200, 205, 0), None, "transaction markers");
        assert_eq!(skipped(200, 200, 1_500), None, "no gap");
    }
}
