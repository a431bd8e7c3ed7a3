//! For the sinks' unit tests: the test Redis that `scripts/test-env.sh` starts, and
//! what a sink shares with the source.

use std::sync::mpsc::{channel, Receiver};

use crate::config::RedisConfig;
use crate::messages::SourceNotice;
use crate::metrics::Metrics;
use crate::protocol::keys::FenceKeys;
use crate::runtime::health::Health;
use crate::sinks::fenced::SinkShared;

/// The test Redis (database 12, which no other test flushes), with fresh fence keys.
pub fn test_redis() -> (RedisConfig, FenceKeys) {
    let base = std::env::var("ANCHORFLOW_TEST_REDIS_URL")
        .expect("ANCHORFLOW_TEST_REDIS_URL is not set: run the tests with scripts/test.sh");
    let redis = RedisConfig {
        url: format!("{base}/12"),
        ..Default::default()
    };
    let group = format!(
        "unit-{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_micros()
    );
    (redis, FenceKeys::new(&group, "t"))
}

/// What a sink shares, and the receiving end of its notices to the source.
pub fn shared(keys: &FenceKeys) -> (SinkShared, Receiver<SourceNotice>) {
    let (tx, rx) = channel();
    let shared = SinkShared {
        metrics: Metrics::new(),
        health: Health::new(),
        notices: tx,
        keys: keys.clone(),
    };
    (shared, rx)
}
