//! Processing time, as Redis keeps it.
//!
//! anchorflow's wall clock serves two purposes that a skewed host clock would break:
//! the end of the day for the receiver lists' TTL (a host a day behind made them
//! expire at once) and the bound on how far in the future an event may claim to be
//! (`time.max_future_ms`). Redis is the one clock every instance shares and the one
//! that expires the keys, so anchorflow measures its own clock against Redis's `TIME`
//! whenever it connects (and then every minute) and corrects by the difference. The
//! difference is exported as `anchorflow_clock_skew_seconds` and logged when large.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use tracing::warn;

/// A difference larger than this is logged (once per change of its order of magnitude).
const WORTH_A_WARNING_MS: i64 = 2_000;

/// This host's wall clock, in milliseconds since the Unix epoch (every wall-clock read
/// of anchorflow goes through here; tests shift it, see [`crate::runtime::fault`]).
pub fn wall_ms() -> i64 {
    chrono::Utc::now().timestamp_millis() + crate::runtime::fault::clock_offset_ms()
}

/// Wall-clock time corrected to Redis's; clones share the correction.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    /// Redis's time minus ours, in milliseconds.
    skew_ms: Arc<AtomicI64>,
}

impl Clock {
    /// Milliseconds since the Unix epoch, by Redis's clock.
    pub fn now_ms(&self) -> i64 {
        wall_ms() + self.skew_ms()
    }

    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp_millis(self.now_ms()).unwrap_or_else(chrono::Utc::now)
    }

    /// Redis's time minus ours, in milliseconds.
    pub fn skew_ms(&self) -> i64 {
        self.skew_ms.load(Ordering::Relaxed)
    }

    /// Records a measurement: `redis_ms` read while our clock went from `before_ms`
    /// to `after_ms`.
    pub fn observe(&self, redis_ms: i64, before_ms: i64, after_ms: i64) {
        let skew = redis_ms - (before_ms + after_ms) / 2;
        let old = self.skew_ms.swap(skew, Ordering::Relaxed);
        if skew.abs() >= WORTH_A_WARNING_MS && magnitude(skew) != magnitude(old) {
            warn!(
                skew_ms = skew,
                "this host's clock differs from Redis's; anchorflow uses Redis's time for TTLs and the future-timestamp bound"
            );
        }
    }
}

fn magnitude(ms: i64) -> u32 {
    ms.unsigned_abs().checked_ilog10().unwrap_or(0)
}

/// Redis's `TIME` reply as Unix milliseconds.
fn redis_ms((seconds, micros): (i64, i64)) -> i64 {
    seconds * 1000 + micros / 1000
}

/// Measures Redis's clock on a blocking connection.
pub fn measure(clock: &Clock, conn: &mut redis::Connection) -> anyhow::Result<()> {
    let before = wall_ms();
    let started = Instant::now();
    let time: (i64, i64) = redis::cmd("TIME")
        .query(conn)
        .context("reading Redis's clock")?;
    let after = before + started.elapsed().as_millis() as i64;
    clock.observe(redis_ms(time), before, after);
    Ok(())
}

/// Measures Redis's clock on an async connection.
pub async fn measure_async(
    clock: &Clock,
    conn: &mut redis::aio::MultiplexedConnection,
) -> anyhow::Result<()> {
    let before = wall_ms();
    let started = Instant::now();
    let time: (i64, i64) = redis::cmd("TIME")
        .query_async(conn)
        .await
        .context("reading Redis's clock")?;
    let after = before + started.elapsed().as_millis() as i64;
    clock.observe(redis_ms(time), before, after);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrects_by_the_measured_difference() {
        let clock = Clock::default();
        let local = chrono::Utc::now().timestamp_millis();
        // Redis is a day ahead of this host; the measurement took 4 ms.
        clock.observe(local + 86_400_000 + 2, local, local + 4);
        assert_eq!(clock.skew_ms(), 86_400_000);
        let corrected = clock.now_ms();
        assert!((corrected - local - 86_400_000).abs() < 1_000);
        assert_eq!(magnitude(86_400_000), 7);
        assert_eq!(magnitude(-3_000), 3);
    }
}
