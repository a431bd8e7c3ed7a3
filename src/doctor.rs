//! `anchorflow check-config --connect`: reaches every dependency the way `run` will and
//! says, one line each, whether it answered and what it found:
//! - the broker: the topic exists, its partitions;
//! - Redis: version and mode, its `maxmemory-policy` (refused as `run` refuses it,
//!   `protocol/server.rs`), whether fences are stored, and that it runs anchorflow's
//!   scripts;
//! - the warehouse: a probe file written, published (the conditional write that never
//!   replaces a file: on a bucket `If-None-Match`) and removed, in a folder or a bucket.
//!
//! The exit code says which failed: 0 none, else 80 plus 1 for the broker, 2 for Redis
//! and 4 for the warehouse (81 to 87).

use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use anchorflow_actors::config::Config;
use anchorflow_actors::protocol::fences;
use anchorflow_actors::protocol::keys::FenceKeys;
use anchorflow_actors::protocol::scripts;
use anchorflow_actors::protocol::server;
use anchorflow_actors::sinks::warehouse::open as open_warehouse;
use anchorflow_actors::sinks::warehouse::storage::Published;
use anyhow::{bail, Context as _};

use crate::fences_cli::{kafka_offsets, BROKER_TIMEOUT};
use crate::say;

/// The exit code of a check whose failures are `failed` (bits: 1 broker, 2 Redis, 4
/// warehouse).
pub const EXIT_BASE: u8 = 80;

/// One check: what it reached, or why it could not.
type Check = fn(&Config) -> anyhow::Result<String>;

/// Runs every check, prints a line each; returns the failed bits.
pub fn run(config: &Config) -> u8 {
    let checks: [(&str, u8, Check); 3] = [
        ("kafka", 1, broker),
        ("redis", 2, redis),
        ("warehouse", 4, warehouse),
    ];
    let mut failed = 0;
    for (name, bit, check) in checks {
        match check(config) {
            Ok(found) => say!("{name}: ok: {found}"),
            Err(e) => {
                failed |= bit;
                say!("{name}: FAILED: {e:#}");
            }
        }
    }
    failed
}

fn broker(config: &Config) -> anyhow::Result<String> {
    let offsets = kafka_offsets(config, BROKER_TIMEOUT)?;
    let records: i64 = offsets.values().map(|(low, high, _)| high - low).sum();
    Ok(format!(
        "topic {} has {} partitions holding {records} records",
        config.source.topic,
        offsets.len()
    ))
}

fn redis(config: &Config) -> anyhow::Result<String> {
    let timeout = Duration::from_secs(config.redis.command_timeout_secs);
    let mut conn = fences::connect(&config.redis, timeout)?;
    let info = server::inspect(&mut conn)?;
    if let Some(why) = info.refusal(&config.redis) {
        bail!("{why}");
    }
    let keys = FenceKeys::new(&config.source.group_id, &config.source.topic);
    let partitions = crate::status::stored_partitions(&mut conn, &keys)?.len();
    scripts::commit_script()
        .prepare_invoke()
        .load(&mut conn)
        .context("loading anchorflow's commit script")?;
    let lost = fences::lost_marker(&mut conn, &keys)?;
    Ok(format!(
        "{} {}, maxmemory-policy {}, fences of {partitions} partition(s) stored{}, scripts load",
        info.version,
        info.mode,
        if info.policy.is_empty() {
            "unknown"
        } else {
            &info.policy
        },
        match lost {
            Some(marker) => format!(" (LOST: {marker}; run `anchorflow fences recover`)"),
            None => String::new(),
        }
    ))
}

fn warehouse(config: &Config) -> anyhow::Result<String> {
    let storage = open_warehouse(&config.warehouse)?;
    let root = Path::new(&config.warehouse.root);
    let name = format!(
        "probe-{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_micros()
    );
    let folder = root.join("_anchorflow").join("doctor");
    let (hidden, visible) = (folder.join(format!(".{name}")), folder.join(&name));
    let mut file = storage
        .create(&hidden, &visible)
        .with_context(|| format!("creating {}", hidden.display()))?;
    file.write_all(b"anchorflow check-config --connect\n")
        .context("writing the probe")?;
    let finished = file.finish().context("closing the probe")?;
    let published = storage
        .publish(&finished.handle, &visible)
        .with_context(|| format!("publishing {}", visible.display()))?;
    let removed = storage.remove(&visible);
    if published != Published::Done {
        bail!("publishing the probe answered {published:?}");
    }
    removed.with_context(|| format!("removing {}", visible.display()))?;
    Ok(format!(
        "{} is writable: a probe file was written, published without replacing anything, and removed",
        config.warehouse.root
    ))
}
