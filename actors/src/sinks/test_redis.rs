//! For the sinks' unit tests: the test Redis that `scripts/test-env.sh` starts, and
//! what a sink shares with the source.

use std::sync::mpsc::{channel, Receiver};

use crate::checkpoint::claim::SinkKind;
use crate::checkpoint::driver::SinkAcks;
use crate::config::RedisConfig;
use crate::messages::Ack;
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

/// What a sink shares.
pub fn shared(keys: &FenceKeys) -> SinkShared {
    SinkShared {
        metrics: Metrics::new(),
        health: Health::new(),
        keys: keys.clone(),
    }
}

/// A sink's ack handle, and the receiving end of what it reports.
pub fn acks(sink: SinkKind) -> (SinkAcks, Receiver<Ack>) {
    let (tx, rx) = channel();
    (SinkAcks::to(sink, tx), rx)
}
