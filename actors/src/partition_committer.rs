//! `PartitionCommitter`: writes `_SUCCESS` into complete warehouse folders and runs the
//! partition-commit hook (DESIGN §3.2, `docs/warehouse.md`), on a thread of its own so
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
//! The hook runs with `sh -c` in a process group of its own and a minimal environment
//! (`PATH`, `HOME`, `LANG`, `LC_ALL`, `TZ`, `TMPDIR` and the `ANCHORFLOW_*` variables
//! that describe the folder): nothing of anchorflow's own environment, where secrets
//! such as `ANCHORFLOW_KAFKA__SASL_PASSWORD` may live, reaches it. At
//! `partition_commit_hook_timeout_secs` its whole process group is killed. A failed or
//! killed hook is counted and retried for that folder with capped exponential backoff;
//! other folders carry on.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use actix::prelude::*;
use anyhow::Context as _;
use tracing::{error, info, warn};

use crate::backoff::Backoff;
use crate::config::WarehouseConfig;
use crate::fences::{self, FenceKeys};
use crate::messages::Table;
use crate::metrics::{Metrics, TableLabel};
use crate::tables;
use crate::warehouse_files::sync_folders;
use crate::window::WindowSpec;

/// Mailbox capacity: nudges only, each meaning "look again"; one queued is enough.
pub const COMMITTER_MAILBOX: usize = 2;

/// The process group of the hook running now (0: none), so that a stopping process
/// does not leave it behind ([`kill_running_hook`]).
static RUNNING_HOOK: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Kills the process group of a hook still running (at shutdown).
pub fn kill_running_hook() {
    let group = RUNNING_HOOK.swap(0, std::sync::atomic::Ordering::SeqCst);
    if group > 0 {
        // SAFETY: killpg only sends a signal; the group is the hook's own.
        unsafe { libc::killpg(group, libc::SIGKILL) };
    }
}

/// Variables of anchorflow's environment a hook may see.
const HOOK_ENV: [&str; 6] = ["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"];

/// Folders with rows may be complete now: look.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct CommitDue;

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

/// Counters of the committer, for tests and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommitterCounters {
    /// Folders committed.
    pub committed: u64,
    /// Hook runs that failed or timed out.
    pub hook_failures: u64,
}

pub struct PartitionCommitter {
    config: WarehouseConfig,
    windows: WindowSpec,
    keys: FenceKeys,
    redis_url: String,
    redis_timeout: Duration,
    instance: String,
    metrics: Metrics,
    conn: Option<redis::Connection>,
    /// Folders whose hook failed: when to try again, and how often it failed.
    retries: BTreeMap<String, (Instant, u32)>,
    /// Generation of the scheduled re-check (a newer one supersedes it).
    wake: u64,
    counters: CommitterCounters,
}

impl PartitionCommitter {
    pub fn new(
        config: WarehouseConfig,
        windows: WindowSpec,
        keys: FenceKeys,
        redis: &crate::config::RedisConfig,
        instance: String,
        metrics: Metrics,
    ) -> Self {
        PartitionCommitter {
            config,
            windows,
            keys,
            redis_url: redis.url.clone(),
            redis_timeout: Duration::from_secs(redis.command_timeout_secs),
            instance,
            metrics,
            conn: None,
            retries: BTreeMap::new(),
            wake: 0,
            counters: CommitterCounters::default(),
        }
    }

    pub fn counters(&self) -> CommitterCounters {
        self.counters
    }

    /// Runs `f` on the Redis connection, connecting first if needed; drops the
    /// connection on error (the next attempt reconnects).
    fn redis<T>(
        &mut self,
        f: impl FnOnce(&mut redis::Connection, &FenceKeys) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => fences::connect(&self.redis_url, self.redis_timeout)?,
        };
        let out = f(&mut conn, &self.keys)?;
        self.conn = Some(conn);
        Ok(out)
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
        let written = File::create(&marker)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("writing {}", marker.display()))
            .and_then(|()| sync_folders(std::iter::once(marker.as_path())));
        let hook = match written {
            Ok(()) => run_hook(&self.config, table, &path, below),
            Err(e) => Err(e),
        };
        let committed = hook.is_ok();
        if let Err(error) = &hook {
            self.counters.hook_failures += 1;
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
            self.counters.committed += 1;
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

/// Runs the partition-commit hook, if one is configured, with the folder in its
/// environment; kills its process group after the configured timeout.
fn run_hook(
    config: &WarehouseConfig,
    table: Table,
    path: &Path,
    below: &str,
) -> anyhow::Result<()> {
    if config.partition_commit_hook.trim().is_empty() {
        return Ok(());
    }
    let (date, hour) = tables::parse_folder(below).context("not a dt/hour folder")?;
    let inherited = HOOK_ENV
        .iter()
        .filter_map(|name| Some((*name, std::env::var_os(name)?)));
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(&config.partition_commit_hook)
        .env_clear()
        .envs(inherited)
        .env("ANCHORFLOW_TABLE", table.name())
        .env("ANCHORFLOW_PARTITION_PATH", path)
        .env("ANCHORFLOW_DT", date.format("%Y-%m-%d").to_string())
        .env(
            "ANCHORFLOW_HOUR",
            hour.map(|h| format!("{h:02}")).unwrap_or_default(),
        )
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting the partition commit hook")?;
    let group = i32::try_from(child.id()).context("a process id")?;
    RUNNING_HOOK.store(group, std::sync::atomic::Ordering::SeqCst);
    let outcome = wait_for_hook(&mut child, group, config.partition_commit_hook_timeout_secs);
    RUNNING_HOOK.store(0, std::sync::atomic::Ordering::SeqCst);
    outcome
}

/// Waits for the hook; at the timeout, kills its whole process group (the hook's own
/// children, a metastore client or a `sleep`, go with it).
fn wait_for_hook(
    child: &mut std::process::Child,
    group: i32,
    timeout_secs: u64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(timeout_secs);
    loop {
        if let Some(status) = child.try_wait().context("waiting for the hook")? {
            anyhow::ensure!(status.success(), "the hook exited with {status}");
            return Ok(());
        }
        if Instant::now() >= deadline {
            // SAFETY: killpg only sends a signal; the group is the hook's own.
            if unsafe { libc::killpg(group, libc::SIGKILL) } != 0 {
                error!(group, "could not kill the hook's process group");
            }
            let _ = child.wait();
            anyhow::bail!(
                "the hook ran longer than {timeout_secs} s; its process group was killed"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Actor for PartitionCommitter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(crate::mailbox::actix_capacity(COMMITTER_MAILBOX));
    }
}

impl Handler<CommitDue> for PartitionCommitter {
    type Result = ();

    /// Blocks this actor's own thread (Redis, file and hook work): nothing else runs
    /// there.
    fn handle(&mut self, _: CommitDue, ctx: &mut Self::Context) {
        self.check(ctx);
    }
}
