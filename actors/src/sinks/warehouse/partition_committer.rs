//! `PartitionCommitter`: writes `_SUCCESS` into complete warehouse folders and runs the
//! partition-commit hook (`docs/warehouse.md`), on a thread of its own so
//! that a slow, hanging or failing hook never holds the data path.
//!
//! The warehouse sink stores, with every record, the checkpoint's watermark per
//! partition and the folders that got rows; after each record it nudges this actor
//! ([`CommitDue`]). A folder is complete when the slowest claimed partition of the
//! topic has passed its end (an `ods_anchor_log` hour, or a `dws_template_state_1m`
//! day plus the allowed lateness) plus `warehouse.partition_commit_delay_ms`, so this
//! works across instances. Then, under a lock in Redis so that two instances do not
//! commit one folder at once: `_SUCCESS` is written and fsynced, the hook runs, and the
//! folder moves to the committed set, once, also across restarts.
//!
//! The hook runs as `hook.rs` says; a failed or
//! killed hook is counted and retried for that folder with capped exponential backoff;
//! other folders carry on.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use anyhow::Context as _;
use tracing::{info, warn};

use crate::config::WarehouseConfig;
use crate::logic::tables::{self, Table};
use crate::logic::window::WindowSpec;
use crate::messages::CommitDue;
use crate::metrics::{Metrics, TableLabel};
use crate::protocol::fences::BlockingConnection;
use crate::protocol::keys::FenceKeys;
use crate::runtime::backoff::Backoff;
use crate::runtime::supervision::{self, Failure, Restarts};
use crate::sinks::fenced::SinkShared;
use crate::sinks::warehouse::hook::run_hook;
use crate::sinks::warehouse::storage::Storage;

/// Mailbox capacity: nudges only, each meaning "look again"; one queued is enough.
pub const COMMITTER_MAILBOX: usize = 2;

/// The watermark at which a folder is complete: the end of its hour (ods) or day (dws,
/// plus the allowed lateness: its last windows close then) plus the delay. Dead letters
/// are filed by ingest time and never committed.
pub fn commit_deadline(
    windows: &WindowSpec,
    delay_ms: u64,
    table: Table,
    folder: &str,
) -> Option<i64> {
    let end = tables::folder_end(windows.tz, folder)?;
    let delay = delay_ms as i64;
    match table {
        Table::OdsAnchorLog => Some(end + delay),
        Table::DwsTemplateState => Some(end + windows.lateness_ms + delay),
        Table::DeadLetter => None,
    }
}

pub struct PartitionCommitter {
    restarts: Restarts,
    config: WarehouseConfig,
    windows: WindowSpec,
    keys: FenceKeys,
    redis: BlockingConnection,
    storage: Arc<dyn Storage>,
    instance: String,
    metrics: Metrics,
    /// Folders whose hook failed: when to try again, and how often it failed.
    retries: BTreeMap<String, (Instant, u32)>,
    /// Generation of the scheduled re-check (a newer one supersedes it).
    wake: u64,
}

impl PartitionCommitter {
    pub fn new(
        config: WarehouseConfig,
        windows: WindowSpec,
        redis: &crate::config::RedisConfig,
        instance: String,
        shared: &SinkShared,
        storage: Arc<dyn Storage>,
    ) -> Self {
        PartitionCommitter {
            restarts: Restarts::new("partition_committer", &shared.metrics, &shared.health),
            config,
            windows,
            keys: shared.keys.clone(),
            redis: BlockingConnection::new(redis),
            storage,
            instance,
            metrics: shared.metrics.clone(),
            retries: BTreeMap::new(),
            wake: 0,
        }
    }

    /// Runs `f` on the Redis connection, connecting first if needed; drops the
    /// connection on error (the next attempt reconnects).
    fn redis<T>(
        &mut self,
        f: impl FnOnce(&mut redis::Connection, &FenceKeys) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let keys = &self.keys;
        self.redis.run(|conn| f(conn, keys))
    }

    /// Commits every complete folder that is not waiting out a backoff. Returns when
    /// to look again for folders that failed (none: only on the next nudge).
    pub fn commit_due(&mut self) -> anyhow::Result<Option<Instant>> {
        let (pending, slowest) = self.redis(pending_and_slowest)?;
        let Some(slowest) = slowest else {
            return Ok(self.next_retry());
        };
        let now = Instant::now();
        for folder in pending {
            let Some((table, below)) = folder.split_once('/') else {
                continue;
            };
            let table = match table {
                "ods_anchor_log" => Table::OdsAnchorLog,
                "dws_template_state_1m" => Table::DwsTemplateState,
                _ => continue,
            };
            let complete = commit_deadline(
                &self.windows,
                self.config.partition_commit_delay_ms,
                table,
                below,
            )
            .is_some_and(|due| due <= slowest);
            let waiting = self.retries.get(&folder).is_some_and(|(at, _)| *at > now);
            if complete && !waiting {
                self.commit_folder(&folder, table, below)?;
            }
        }
        Ok(self.next_retry())
    }

    fn next_retry(&self) -> Option<Instant> {
        self.retries.values().map(|(at, _)| *at).min()
    }

    /// Writes `_SUCCESS`, runs the hook, and marks the folder committed, under a lock.
    fn commit_folder(&mut self, folder: &str, table: Table, below: &str) -> anyhow::Result<()> {
        let lock = format!("{}:lock:{folder}", self.keys.committed);
        let hold_ms = (self.config.partition_commit_hook_timeout_secs * 1000 + 30_000) as i64;
        let instance = self.instance.clone();
        let locked = self.redis(|conn, keys| {
            let reply: Option<String> = redis::cmd("SET")
                .arg(&lock)
                .arg(&instance)
                .arg("NX")
                .arg("PX")
                .arg(hold_ms)
                .query(conn)
                .context("locking a partition commit")?;
            let done: bool = redis::cmd("SISMEMBER")
                .arg(&keys.committed)
                .arg(folder)
                .query(conn)
                .context("checking a partition commit")?;
            Ok(reply.is_some() && !done)
        })?;
        if !locked {
            return Ok(());
        }
        let path = Path::new(&self.config.root).join(folder);
        let marker = path.join("_SUCCESS");
        let written = self
            .storage
            .replace(&marker, b"", true)
            .with_context(|| format!("writing {}", marker.display()));
        let hook = match written {
            Ok(()) => run_hook(&self.config, table, &path, below),
            Err(e) => Err(e),
        };
        let committed = hook.is_ok();
        if let Err(error) = &hook {
            self.metrics.partition_commit_hook_failures.inc();
            let attempts = self.retries.get(folder).map_or(0, |(_, n)| *n);
            let delay = Backoff::DEFAULT.delay(attempts);
            self.retries
                .insert(folder.to_string(), (Instant::now() + delay, attempts + 1));
            warn!(
                folder,
                attempts = attempts + 1,
                retry_in_ms = delay.as_millis() as u64,
                error = format!("{error:#}"),
                "partition commit failed; retrying later"
            );
        }
        self.redis(|conn, keys| {
            let mut pipe = redis::pipe();
            pipe.atomic();
            if committed {
                pipe.cmd("SMOVE")
                    .arg(&keys.folders)
                    .arg(&keys.committed)
                    .arg(folder)
                    .ignore();
            }
            pipe.cmd("DEL").arg(&lock).ignore();
            pipe.query::<()>(conn)
                .context("marking a partition committed")
        })?;
        if committed {
            self.retries.remove(folder);
            info!(folder, "partition committed");
            self.metrics
                .partitions_committed
                .get_or_create(&TableLabel {
                    table: table.name(),
                })
                .inc();
        }
        Ok(())
    }

    fn check(&mut self, ctx: &mut Context<Self>) {
        let next = match self.commit_due() {
            Ok(next) => next,
            Err(error) => {
                // Redis is unreachable: the nudges of later records, or this re-check,
                // try again.
                warn!(
                    error = format!("{error:#}"),
                    "partition commit check failed; retrying"
                );
                Some(Instant::now() + Backoff::DEFAULT.delay(2))
            }
        };
        self.wake += 1;
        if let Some(at) = next {
            let wake = self.wake;
            ctx.run_later(
                at.saturating_duration_since(Instant::now()),
                move |committer, ctx| {
                    if committer.wake == wake {
                        committer.check(ctx);
                    }
                },
            );
        }
    }
}

/// The folders awaiting their commit, and the watermark of the slowest claimed
/// partition of the topic (`None` while one never stored a watermark).
fn pending_and_slowest(
    conn: &mut redis::Connection,
    keys: &FenceKeys,
) -> anyhow::Result<(Vec<String>, Option<i64>)> {
    let pending: Vec<String> = redis::cmd("SMEMBERS")
        .arg(&keys.folders)
        .query(conn)
        .context("reading pending folders")?;
    if pending.is_empty() {
        return Ok((pending, None));
    }
    let marks: BTreeMap<String, i64> = redis::cmd("HGETALL")
        .arg(&keys.watermarks)
        .query(conn)
        .context("reading stored watermarks")?;
    let fences: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(&keys.fences)
        .query(conn)
        .context("reading fences")?;
    let slowest = fences
        .keys()
        .filter_map(|k| k.strip_prefix("epoch:"))
        .map(|p| marks.get(p).copied())
        .collect::<Option<Vec<i64>>>()
        .and_then(|marks| marks.into_iter().min());
    Ok((pending, slowest))
}

impl Actor for PartitionCommitter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(crate::runtime::mailbox::actix_capacity(COMMITTER_MAILBOX));
        self.restarts.started(ctx);
        if self.restarts.recovering() {
            // The scheduled re-check went with the old context: look now.
            ctx.notify(CommitDue);
        }
    }
}

impl Supervised for PartitionCommitter {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.restarts.restarting();
        self.redis.reset();
    }
}

impl Handler<CommitDue> for PartitionCommitter {
    type Result = ();

    /// Blocks this actor's own thread (Redis, file and hook work): nothing else runs
    /// there. A panic restarts the committer; what is due is read from Redis again.
    fn handle(&mut self, _: CommitDue, ctx: &mut Self::Context) {
        match supervision::catch(|| self.check(ctx)) {
            Ok(()) => self.restarts.succeeded(),
            Err(panic) => self.restarts.fail(ctx, Failure::Panic(panic)),
        }
    }
}
