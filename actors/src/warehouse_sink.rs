//! `WarehouseSink`: writes Parquet files in Hive layout (DESIGN §3.2).
//!
//! One open file per (table, folder). Files are written under a hidden name
//! (`.{instance}-{run}-{seq}.parquet.inprogress`), and published only at a checkpoint:
//! footer, fsync, rename to `part-{instance}-{run}-{seq}.parquet`, fsync the folder.
//! A checkpoint publishes ("rolls") when a file reached `target_file_bytes`, when the
//! oldest open file is `roll_interval_secs` old, or when the checkpoint is final
//! (shutdown, revocation); otherwise files stay open and grow, so a quiet hour does not
//! leave a file per second.
//!
//! The roll decision is taken at the checkpoint's first barrier. From then on, rows of a
//! partition whose barrier has arrived go to a second generation of files, so the
//! published files hold exactly the rows before the checkpoint's barriers and no
//! partition waits for another.
//!
//! Publishing is a two-step commit (DESIGN §6, `docs/exactly-once.md`):
//! 1. close every file (footer, fsync, fsync its folder), then **record** the commit in
//!    Redis with one script: the fence check for every partition's offset range (epoch
//!    and contiguity, as for the Redis sink), the new fences, and the list of files to
//!    rename. A zombie's or a replay's record is refused and its files stay hidden;
//! 2. rename every file into place and fsync the folders, then forget the record.
//!
//! A crash between the steps is repaired at the next start: recorded commits are
//! **rolled forward** (renames are idempotent), then this instance's remaining hidden
//! files, which no record names, are deleted as orphans. The sink's fence of a
//! partition (reported to the source) is the end of its last recorded range.
//!
//! It also keeps the open `dws_template_state_1m` windows per partition (from counts
//! the readers pre-aggregate): at a checkpoint's barriers the windows its watermark
//! passed become rows in the files that checkpoint publishes, and each partition's
//! remaining windows are stored by the record script with its fence. Every record also
//! stores the checkpoint's watermark per partition and the folders that got rows; once
//! the slowest partition of the topic passed a folder's end, the sink writes
//! `_SUCCESS` there and runs the partition-commit hook, once (`docs/warehouse.md`).
//!
//! File I/O errors stop the process with exit code 74: a half-written Parquet writer
//! cannot be trusted, and a restart resumes from the stored fences.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use anyhow::Context as _;
use arrow_array::RecordBatch as ArrowBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use tracing::{error, info, warn};

use crate::backoff::Backoff;
use crate::config::{RedisConfig, WarehouseConfig};
use crate::fault;
use crate::fences::{self, on_rejection, range_for, Claim, FenceKeys, FenceRange, PublishRecord};
use crate::messages::{
    Barrier, CheckpointKind, CheckpointSpec, DetailBatch, SinkKind, SourceNotice, Table, TableRows,
    WarehouseInput,
};
use crate::metrics::{ActorLabel, MailboxMeter, Metrics, SinkLabel, TableLabel};
use crate::tables::{self, DwsRows, Folders};
use crate::window::{Counts, PartitionWindows, WindowKey, WindowSpec};
use rustc_hash::FxHashMap;

/// Records a warehouse commit after [`fences::FENCE_CHECK`]. Remaining ARGV: the
/// record's id and file list (stored in the publish hash `KEYS[3]` unless empty); the
/// folders that received rows (added to the pending set `KEYS[5]` unless already
/// committed, `KEYS[6]`); the checkpoint's watermark (`-` if unknown) and the
/// partitions it now covers (raised in `KEYS[7]`); per partition the open
/// `dws_template_state_1m` windows (`KEYS[4]`).
const RECORD_BODY: &str = r#"
if ARGV[i + 1] ~= '' then redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
i = i + 2
local folders = tonumber(ARGV[i]); i = i + 1
for _ = 1, folders do
  if redis.call('SISMEMBER', KEYS[6], ARGV[i]) == 0 then redis.call('SADD', KEYS[5], ARGV[i]) end
  i = i + 1
end
local mark = ARGV[i]; i = i + 1
local partitions = tonumber(ARGV[i]); i = i + 1
for _ = 1, partitions do
  if mark ~= '-' then
    local old = redis.call('HGET', KEYS[7], ARGV[i])
    if not old or tonumber(old) < tonumber(mark) then redis.call('HSET', KEYS[7], ARGV[i], mark) end
  end
  i = i + 1
end
local states = tonumber(ARGV[i]); i = i + 1
for _ = 1, states do
  redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1])
  i = i + 2
end
return {0, 1}
"#;

/// In a quiet stream (nothing open), how far the watermark must move before a
/// checkpoint records it without files, so partition commits follow processing time.
const QUIET_RECORD_STEP_MS: i64 = 1_000;

/// What a publishing checkpoint records next to its files.
struct Commit<'a> {
    ranges: &'a [FenceRange],
    /// Open `dws_template_state_1m` windows per partition as of its barrier.
    states: &'a BTreeMap<i32, String>,
    watermark: Option<i64>,
}

/// Mailbox capacity, in detail batches. Every reader may have one batch in flight; the
/// sink encodes Parquet on its own thread, and a short queue keeps readers paused
/// rather than letting encoded batches pile up in memory.
pub const WAREHOUSE_SINK_MAILBOX: usize = 16;

/// Exit code when a file cannot be written (EX_IOERR).
pub const EXIT_IO_ERROR: i32 = 74;

/// Counters of the sink, for tests and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WarehouseCounters {
    /// Rows appended to open files.
    pub rows: u64,
    /// Files published.
    pub files: u64,
    /// Checkpoints that published files.
    pub rolls: u64,
}

struct OpenFile {
    table: Table,
    writer: ArrowWriter<File>,
    hidden: PathBuf,
    visible: PathBuf,
    opened: Instant,
    rows: u64,
}

impl OpenFile {
    fn size(&self) -> u64 {
        (self.writer.bytes_written() + self.writer.in_progress_size()) as u64
    }
}

#[derive(Default)]
struct Generation {
    files: HashMap<(Table, String), OpenFile>,
}

/// A completed checkpoint: its id and the sink's fences per partition.
type Completed = (u64, Vec<(i32, i64)>);

struct Roll {
    spec: Arc<CheckpointSpec>,
    /// Barrier offset and claim per partition whose barrier arrived.
    seen: BTreeMap<i32, (i64, Claim)>,
    publish: bool,
    /// Window results the barriers emitted, summed over partitions; `true` marks late
    /// amendments (correction rows).
    emitted: BTreeMap<(WindowKey, bool), Counts>,
    /// Each partition's open windows as of its barrier, stored with the record.
    states: BTreeMap<i32, String>,
}

/// A closed, synced file waiting to be renamed.
struct Closed {
    table: Table,
    rows: u64,
    bytes: u64,
    hidden: PathBuf,
    visible: PathBuf,
}

pub struct WarehouseSink {
    restart: crate::backoff::RestartBackoff,
    config: WarehouseConfig,
    instance: String,
    run: String,
    seq: u64,
    metrics: Metrics,
    own_meter: MailboxMeter,
    notices: Sender<SourceNotice>,
    current: Generation,
    next: Generation,
    roll: Option<Roll>,
    /// Per partition: the epoch and the end of our last recorded range.
    fences: BTreeMap<i32, (i64, i64)>,
    redis_url: String,
    redis_timeout: Duration,
    keys: FenceKeys,
    conn: Option<redis::Connection>,
    record_script: redis::Script,
    window_spec: WindowSpec,
    /// Open `dws_template_state_1m` windows per partition; they outlive checkpoints.
    dws: FxHashMap<i32, PartitionWindows>,
    /// The watermark this sink last stored for its partitions (partition commit).
    recorded_watermark: Option<i64>,
    counters: WarehouseCounters,
}

impl WarehouseSink {
    pub fn new(
        config: WarehouseConfig,
        redis: &RedisConfig,
        window_spec: WindowSpec,
        keys: FenceKeys,
        instance: String,
        metrics: Metrics,
        notices: Sender<SourceNotice>,
    ) -> Self {
        let run = format!("{:x}", chrono::Utc::now().timestamp_millis());
        WarehouseSink {
            restart: Default::default(),
            config,
            instance,
            run,
            seq: 0,
            own_meter: metrics.mailbox("warehouse_sink"),
            metrics,
            notices,
            current: Generation::default(),
            next: Generation::default(),
            roll: None,
            fences: BTreeMap::new(),
            redis_url: redis.url.clone(),
            redis_timeout: Duration::from_secs(redis.command_timeout_secs),
            keys,
            conn: None,
            record_script: redis::Script::new(&format!("{}{RECORD_BODY}", fences::FENCE_CHECK)),
            window_spec,
            dws: FxHashMap::default(),
            recorded_watermark: None,
            counters: WarehouseCounters::default(),
        }
    }

    /// Runs `f` on the Redis connection, connecting first if needed, and retries with
    /// capped backoff until it succeeds: the warehouse cannot commit without Redis, and
    /// waiting here pauses the readers behind this sink's mailbox.
    fn with_redis<T>(
        &mut self,
        what: &str,
        mut f: impl FnMut(&mut redis::Connection) -> anyhow::Result<T>,
    ) -> T {
        let mut attempt = 0u32;
        loop {
            let result = match self.conn.take() {
                Some(conn) => Ok(conn),
                None => fences::connect(&self.redis_url, self.redis_timeout),
            }
            .and_then(|mut conn| {
                let out = f(&mut conn)?;
                Ok((conn, out))
            });
            match result {
                Ok((conn, out)) => {
                    self.conn = Some(conn);
                    return out;
                }
                Err(error) => {
                    self.metrics.redis_errors.inc();
                    self.metrics.set_ready(false);
                    let delay = Backoff::DEFAULT.delay(attempt);
                    warn!(
                        attempt,
                        retry_in_ms = delay.as_millis() as u64,
                        error = format!("{error:#}"),
                        "warehouse: {what} failed; retrying"
                    );
                    std::thread::sleep(delay);
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }

    /// Publishes recorded commits a crash interrupted, then deletes this instance's
    /// hidden files that no record names.
    fn recover(&mut self) -> anyhow::Result<()> {
        let keys = self.keys.clone();
        let records = self.with_redis("reading recorded commits", |conn| {
            fences::pending_publishes(conn, &keys)
        });
        for record in &records {
            roll_forward(record)?;
            info!(
                record = record.id,
                files = record.files.len(),
                "rolled a recorded commit forward"
            );
            let id = record.id.clone();
            self.with_redis("clearing a publish record", |conn| {
                fences::publish_done(conn, &keys, &id)
            });
        }
        let removed = remove_orphans(&self.config.root, &self.instance)?;
        if removed > 0 {
            info!(removed, "removed in-progress files left by an earlier run");
        }
        Ok(())
    }

    pub fn counters(&self) -> WarehouseCounters {
        self.counters
    }

    fn properties(&self) -> WriterProperties {
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(self.config.row_group_rows))
            .set_created_by(format!("anchorflow {}", env!("CARGO_PKG_VERSION")))
            .build()
    }

    fn write_rows(&mut self, batch: DetailBatch) -> anyhow::Result<()> {
        let into_next = self
            .roll
            .as_ref()
            .is_some_and(|r| r.publish && r.seen.contains_key(&batch.partition));
        for part in batch.parts {
            self.append(into_next, part)?;
        }
        let windows = self.dws.entry(batch.partition).or_default();
        for ((start, business_id, state), counts) in batch.windows {
            windows.add(&self.window_spec, start, business_id, state, counts);
        }
        Ok(())
    }

    /// Appends rows to the open file of their (table, folder) in one generation.
    fn append(&mut self, into_next: bool, part: TableRows) -> anyhow::Result<()> {
        let key = (part.table, part.folder);
        let exists = if into_next {
            self.next.files.contains_key(&key)
        } else {
            self.current.files.contains_key(&key)
        };
        if !exists {
            self.seq += 1;
            let file = open_file(
                &self.config.root,
                &self.instance,
                &self.run,
                self.seq,
                key.0,
                &key.1,
                self.properties(),
                &part.rows,
            )?;
            let generation = if into_next {
                &mut self.next
            } else {
                &mut self.current
            };
            generation.files.insert(key.clone(), file);
        }
        let generation = if into_next {
            &mut self.next
        } else {
            &mut self.current
        };
        let file = generation
            .files
            .get_mut(&key)
            .context("open file vanished")?;
        file.writer
            .write(&part.rows)
            .with_context(|| format!("writing {}", file.hidden.display()))?;
        file.rows += part.rows.num_rows() as u64;
        self.counters.rows += part.rows.num_rows() as u64;
        Ok(())
    }

    /// Writes the window results of a checkpoint as `dws_template_state_1m` rows into
    /// the generation the checkpoint publishes (they belong before its barriers).
    fn write_window_rows(
        &mut self,
        emitted: &BTreeMap<(WindowKey, bool), Counts>,
    ) -> anyhow::Result<()> {
        let folders = Folders::new(self.window_spec.tz);
        let mut by_day: BTreeMap<String, DwsRows> = BTreeMap::new();
        for (&((start, business_id, state), correction), counts) in emitted {
            let day = folders
                .day_folder(start)
                .context("a window start outside the representable date range")?;
            by_day.entry(day).or_default().append(
                start,
                self.window_spec.end_of(start),
                business_id,
                state,
                counts.events,
                counts.receivers,
                correction,
            );
        }
        for (folder, mut rows) in by_day {
            self.append(
                false,
                TableRows {
                    table: Table::DwsTemplateState,
                    folder,
                    rows: rows.finish(),
                },
            )?;
        }
        Ok(())
    }

    /// With nothing open, a checkpoint still records (no files) when the watermark
    /// moved: stored watermarks drive partition commits of quiet streams.
    fn quiet_progress(&self, watermark: Option<i64>) -> bool {
        self.current.files.is_empty()
            && watermark.is_some_and(|mark| {
                self.recorded_watermark
                    .is_none_or(|stored| mark >= stored + QUIET_RECORD_STEP_MS)
            })
    }

    /// Whether this checkpoint publishes: on shutdown and revocation always (a record
    /// without files still stores the fences and window state), else when an open
    /// file is big or old enough or its folder is due for its partition commit.
    fn due(&self, kind: CheckpointKind, watermark: Option<i64>) -> bool {
        let age = Duration::from_secs(self.config.roll_interval_secs);
        kind == CheckpointKind::Final
            || self.current.files.iter().any(|((table, folder), f)| {
                f.size() >= self.config.target_file_bytes
                    || f.opened.elapsed() >= age
                    // A folder due for its partition commit publishes now, not at the
                    // next roll.
                    || watermark.is_some_and(|mark| {
                        self.commit_deadline(*table, folder)
                            .is_some_and(|due| due <= mark)
                    })
            })
    }

    /// The watermark at which a folder is complete: the end of its hour (ods) or day
    /// (dws, plus the allowed lateness: its last windows close then) plus the delay.
    fn commit_deadline(&self, table: Table, folder: &str) -> Option<i64> {
        let end = tables::folder_end(self.window_spec.tz, folder)?;
        let delay = self.config.partition_commit_delay_ms as i64;
        match table {
            Table::OdsAnchorLog => Some(end + delay),
            Table::DwsTemplateState => Some(end + self.window_spec.lateness_ms + delay),
            Table::DeadLetter => None,
        }
    }

    /// Handles a barrier; returns the fences to report once the checkpoint is complete.
    fn on_barrier(&mut self, barrier: Barrier) -> anyhow::Result<Option<Completed>> {
        if self
            .roll
            .as_ref()
            .is_none_or(|r| r.spec.id != barrier.spec.id)
        {
            if let Some(stale) = self.roll.take() {
                warn!(
                    checkpoint = stale.spec.id,
                    "checkpoint abandoned before all barriers arrived"
                );
            }
            let publish = self.due(barrier.spec.kind, barrier.spec.watermark)
                || self.quiet_progress(barrier.spec.watermark);
            self.roll = Some(Roll {
                spec: barrier.spec.clone(),
                seen: BTreeMap::new(),
                publish,
                emitted: BTreeMap::new(),
                states: BTreeMap::new(),
            });
        }
        let roll = self.roll.as_mut().context("roll state just set")?;
        roll.seen
            .insert(barrier.partition, (barrier.next_offset, barrier.claim));
        let windows = self.dws.entry(barrier.partition).or_default();
        let emitted = windows.close(&self.window_spec, barrier.spec.watermark);
        for (late, results) in [(false, emitted.closed), (true, emitted.late)] {
            for (key, counts) in results {
                roll.emitted.entry((key, late)).or_default().add(counts);
            }
        }
        roll.states.insert(barrier.partition, windows.encode());
        if roll.seen.len() < roll.spec.partitions.len() {
            return Ok(None);
        }
        let roll = self.roll.take().context("roll state just checked")?;
        // Window results belong before the barriers: into the generation this
        // checkpoint publishes (or the open one, published by a later roll).
        self.write_window_rows(&roll.emitted)?;
        let ranges: Vec<FenceRange> = roll
            .seen
            .iter()
            .map(|(&partition, &(next_offset, claim))| {
                range_for(
                    self.fences.get(&partition).copied(),
                    SinkKind::Warehouse,
                    partition,
                    claim,
                    next_offset,
                )
            })
            .collect();
        let watermark = roll.spec.watermark;
        if roll.publish {
            let current = std::mem::replace(&mut self.current, std::mem::take(&mut self.next));
            let commit = Commit {
                ranges: &ranges,
                states: &roll.states,
                watermark,
            };
            if !self.publish(current, commit, roll.spec.id)? {
                return Ok(None);
            }
            self.counters.rolls += 1;
            for range in &ranges {
                self.fences.insert(range.partition, (range.epoch, range.to));
            }
            if watermark.is_some() {
                self.commit_partitions()?;
            }
        } else {
            // Nothing recorded: fences stay where they are, or start at a new claim's.
            for range in &ranges {
                self.fences
                    .insert(range.partition, (range.epoch, range.from));
            }
        }
        self.metrics
            .sink_commits
            .get_or_create(&SinkLabel { sink: "warehouse" })
            .inc();
        let fences = ranges
            .iter()
            .filter_map(|r| {
                self.fences
                    .get(&r.partition)
                    .map(|(_, o)| (r.partition, *o))
            })
            .collect();
        Ok(Some((roll.spec.id, fences)))
    }

    /// Commits every pending folder whose deadline the slowest partition of the topic
    /// has passed: its stored watermark (each owner stores it with its records) covers
    /// every partition, whichever instance owns it.
    fn commit_partitions(&mut self) -> anyhow::Result<()> {
        let keys = self.keys.clone();
        let (pending, marks, fences) =
            self.with_redis("reading pending partition commits", |conn| {
                let pending: Vec<String> = redis::cmd("SMEMBERS")
                    .arg(&keys.folders)
                    .query(conn)
                    .context("reading pending folders")?;
                if pending.is_empty() {
                    return Ok((pending, BTreeMap::new(), BTreeMap::new()));
                }
                let marks: BTreeMap<String, i64> = redis::cmd("HGETALL")
                    .arg(&keys.watermarks)
                    .query(conn)
                    .context("reading stored watermarks")?;
                let fences: BTreeMap<String, String> = redis::cmd("HGETALL")
                    .arg(&keys.fences)
                    .query(conn)
                    .context("reading fences")?;
                Ok((pending, marks, fences))
            });
        // A claimed partition that never stored a watermark holds every commit back.
        let slowest = fences
            .keys()
            .filter_map(|k| k.strip_prefix("epoch:"))
            .map(|p| marks.get(p).copied())
            .collect::<Option<Vec<i64>>>()
            .and_then(|marks| marks.into_iter().min());
        let Some(slowest) = slowest else {
            return Ok(());
        };
        for folder in pending {
            let Some((table, below)) = folder.split_once('/') else {
                continue;
            };
            let table = match table {
                "ods_anchor_log" => Table::OdsAnchorLog,
                "dws_template_state_1m" => Table::DwsTemplateState,
                _ => continue,
            };
            if self
                .commit_deadline(table, below)
                .is_some_and(|due| due <= slowest)
            {
                self.commit_partition(&folder, table, below)?;
            }
        }
        Ok(())
    }

    /// Writes `_SUCCESS`, runs the hook, and marks the folder committed, under a lock
    /// so that two instances do not commit one folder at once. A failed hook leaves the
    /// folder pending; a later checkpoint tries again.
    fn commit_partition(&mut self, folder: &str, table: Table, below: &str) -> anyhow::Result<()> {
        let keys = self.keys.clone();
        let lock = format!("{}:lock:{folder}", keys.committed);
        let hold_ms = (self.config.partition_commit_hook_timeout_secs * 1000 + 30_000) as i64;
        let instance = self.instance.clone();
        let locked = self.with_redis("locking a partition commit", |conn| {
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
        });
        if !locked {
            return Ok(());
        }
        let path = Path::new(&self.config.root).join(folder);
        let marker = path.join("_SUCCESS");
        File::create(&marker)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("writing {}", marker.display()))?;
        sync_folders(std::iter::once(marker.as_path()))?;
        let hook = run_hook(&self.config, table, &path, below);
        if let Err(error) = &hook {
            self.metrics.partition_commit_hook_failures.inc();
            warn!(
                folder,
                error = format!("{error:#}"),
                "partition commit hook failed; retrying at a later checkpoint"
            );
        }
        let committed = hook.is_ok();
        self.with_redis("finishing a partition commit", |conn| {
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
        });
        if committed {
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

    /// Closes, records and renames one generation of files. Returns false when the
    /// record was refused for good (the process is stopping; the files stay hidden).
    fn publish(
        &mut self,
        generation: Generation,
        commit: Commit<'_>,
        checkpoint: u64,
    ) -> anyhow::Result<bool> {
        let mut closed = Vec::new();
        for (_, file) in generation.files {
            let handle = file
                .writer
                .into_inner()
                .with_context(|| format!("closing {}", file.hidden.display()))?;
            handle
                .sync_all()
                .with_context(|| format!("fsync {}", file.hidden.display()))?;
            let bytes = handle.metadata().map(|m| m.len()).unwrap_or(0);
            closed.push(Closed {
                table: file.table,
                rows: file.rows,
                bytes,
                hidden: file.hidden,
                visible: file.visible,
            });
        }
        // The hidden files must survive a power cut once the record names them.
        sync_folders(closed.iter().map(|c| c.hidden.as_path()))?;
        let record = PublishRecord {
            id: format!("{}-{}-{checkpoint}", self.instance, self.run),
            files: closed
                .iter()
                .map(|c| (c.hidden.clone(), c.visible.clone()))
                .collect(),
        };
        let mut args = Vec::new();
        fences::push_ranges(&mut args, SinkKind::Warehouse, commit.ranges);
        args.push(record.id.clone().into_bytes());
        args.push(record.encode().into_bytes());
        // Folders that received rows await their partition commit.
        let root = Path::new(&self.config.root);
        let folders: BTreeSet<String> = closed
            .iter()
            .filter(|c| c.table != Table::DeadLetter)
            .filter_map(|c| c.visible.parent()?.strip_prefix(root).ok())
            .map(|f| f.to_string_lossy().into_owned())
            .collect();
        args.push(folders.len().to_string().into_bytes());
        args.extend(folders.into_iter().map(String::into_bytes));
        args.push(
            commit
                .watermark
                .map_or_else(|| "-".to_string(), |w| w.to_string())
                .into_bytes(),
        );
        args.push(commit.ranges.len().to_string().into_bytes());
        args.extend(
            commit
                .ranges
                .iter()
                .map(|r| r.partition.to_string().into_bytes()),
        );
        args.push(commit.states.len().to_string().into_bytes());
        for (partition, state) in commit.states {
            args.push(fences::dws_field(*partition).into_bytes());
            args.push(state.clone().into_bytes());
        }
        let script = self.record_script.clone();
        let keys = self.keys.clone();
        let mut attempt = 0u32;
        loop {
            let reply = self.with_redis("recording a commit", |conn| {
                let mut invocation = script.key(&keys.fences);
                invocation
                    .key(&keys.lost)
                    .key(&keys.publish)
                    .key(&keys.windows)
                    .key(&keys.folders)
                    .key(&keys.committed)
                    .key(&keys.watermarks);
                for arg in &args {
                    invocation.arg(arg.as_slice());
                }
                let reply: Vec<i64> = invocation
                    .invoke(conn)
                    .context("running the record script")?;
                fences::outcome(&reply)
            });
            match reply {
                Ok(_) => break,
                Err(rejection) => {
                    if !on_rejection(&self.metrics, SinkKind::Warehouse, checkpoint, &rejection) {
                        return Ok(false);
                    }
                    std::thread::sleep(Backoff::DEFAULT.delay(attempt));
                    attempt = attempt.saturating_add(1);
                }
            }
        }
        self.metrics.redis_state_lost.set(0);
        if let Some(mark) = commit.watermark {
            self.recorded_watermark = Some(self.recorded_watermark.map_or(mark, |r| r.max(mark)));
        }
        if record.files.is_empty() {
            return Ok(true);
        }
        fault::point(fault::AFTER_WAREHOUSE_RECORD);
        roll_forward(&record)?;
        let id = record.id.clone();
        self.with_redis("clearing a publish record", |conn| {
            fences::publish_done(conn, &keys, &id)
        });
        for file in closed {
            let label = TableLabel {
                table: file.table.name(),
            };
            self.metrics.parquet_files.get_or_create(&label).inc();
            self.metrics
                .parquet_rows
                .get_or_create(&label)
                .inc_by(file.rows);
            self.metrics
                .parquet_bytes
                .get_or_create(&label)
                .inc_by(file.bytes);
            self.counters.files += 1;
        }
        Ok(true)
    }
}

/// Runs the partition-commit hook, if one is configured, with the folder in its
/// environment; kills it after the configured timeout.
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
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(&config.partition_commit_hook)
        .env("ANCHORFLOW_TABLE", table.name())
        .env("ANCHORFLOW_PARTITION_PATH", path)
        .env("ANCHORFLOW_DT", date.format("%Y-%m-%d").to_string())
        .env(
            "ANCHORFLOW_HOUR",
            hour.map(|h| format!("{h:02}")).unwrap_or_default(),
        )
        .stdin(std::process::Stdio::null())
        .spawn()
        .context("starting the partition commit hook")?;
    let deadline = Instant::now() + Duration::from_secs(config.partition_commit_hook_timeout_secs);
    loop {
        if let Some(status) = child.try_wait().context("waiting for the hook")? {
            anyhow::ensure!(status.success(), "the hook exited with {status}");
            return Ok(());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "the hook ran longer than {} s and was killed",
                config.partition_commit_hook_timeout_secs
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Moves a recorded commit's files into place. Idempotent: a file already moved (by an
/// earlier attempt, or by another instance rolling the same record forward) is fine.
pub fn roll_forward(record: &PublishRecord) -> anyhow::Result<()> {
    for (hidden, visible) in &record.files {
        match fs::rename(hidden, visible) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && visible.exists() => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "publishing {} as {} (commit {})",
                        hidden.display(),
                        visible.display(),
                        record.id
                    )
                })
            }
        }
    }
    // The renames are durable only once their folders are synced.
    sync_folders(record.files.iter().map(|(_, v)| v.as_path()))
}

/// Fsyncs the distinct folders holding `files`.
fn sync_folders<'a>(files: impl Iterator<Item = &'a Path>) -> anyhow::Result<()> {
    let folders: BTreeSet<&Path> = files.filter_map(|f| f.parent()).collect();
    for folder in folders {
        File::open(folder)
            .and_then(|dir| dir.sync_all())
            .with_context(|| format!("fsync folder {}", folder.display()))?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn open_file(
    root: &str,
    instance: &str,
    run: &str,
    seq: u64,
    table: Table,
    folder: &str,
    properties: WriterProperties,
    sample: &ArrowBatch,
) -> anyhow::Result<OpenFile> {
    let dir = Path::new(root).join(table.name()).join(folder);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let hidden = dir.join(format!(".{instance}-{run}-{seq:06}.parquet.inprogress"));
    let visible = dir.join(format!("part-{instance}-{run}-{seq:06}.parquet"));
    let file = File::create(&hidden).with_context(|| format!("creating {}", hidden.display()))?;
    let writer = ArrowWriter::try_new(file, sample.schema(), Some(properties))
        .with_context(|| format!("starting parquet writer for {}", hidden.display()))?;
    Ok(OpenFile {
        table,
        writer,
        hidden,
        visible,
        opened: Instant::now(),
        rows: 0,
    })
}

/// Deletes this instance's in-progress files left by a crash. Their rows were never
/// published and their offsets never stored, so they will be read again.
pub fn remove_orphans(root: &str, instance: &str) -> anyhow::Result<usize> {
    let prefix = format!(".{instance}-");
    let mut removed = 0;
    let mut stack = vec![PathBuf::from(root)];
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(path);
            } else if name.starts_with(&prefix) && name.ends_with(".inprogress") {
                fs::remove_file(&path)
                    .with_context(|| format!("removing orphan {}", path.display()))?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

fn fail_hard(error: anyhow::Error) {
    error!(
        error = format!("{error:#}"),
        "warehouse write failed; stopping so a restart resumes from stored offsets"
    );
    System::current().stop_with_code(EXIT_IO_ERROR);
}

impl Actor for WarehouseSink {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.restart.started(ctx);
        ctx.set_mailbox_capacity(WAREHOUSE_SINK_MAILBOX);
        // Only on the first start: after a supervised restart the hidden files are this
        // run's own open files, not orphans.
        if self.restart.restarts() > 0 {
            return;
        }
        if let Err(e) = self.recover() {
            fail_hard(e);
        }
    }
}

impl Supervised for WarehouseSink {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.restart.restarting();
        self.metrics
            .actor_restarts
            .get_or_create(&ActorLabel {
                actor: "warehouse_sink",
            })
            .inc();
    }
}

impl Handler<WarehouseInput> for WarehouseSink {
    type Result = ();

    fn handle(&mut self, input: WarehouseInput, _ctx: &mut Self::Context) {
        self.own_meter.received();
        match input {
            WarehouseInput::Rows(batch) => {
                if let Err(e) = self.write_rows(batch) {
                    fail_hard(e);
                }
            }
            WarehouseInput::Restore { partition, windows } => {
                self.dws.insert(partition, windows);
            }
            WarehouseInput::Barrier(barrier) => match self.on_barrier(barrier) {
                Ok(Some((checkpoint, fences))) => {
                    // The source may already be gone during teardown; nothing to do then.
                    let _ = self.notices.send(SourceNotice::SinkCommitted {
                        sink: SinkKind::Warehouse,
                        checkpoint,
                        fences,
                    });
                }
                Ok(None) => {}
                Err(e) => fail_hard(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::TableRows;
    use crate::tables::OdsRows;

    fn rows(partition: i32, offsets: std::ops::Range<i64>) -> DetailBatch {
        let mut ods = OdsRows::default();
        let event = crate::decode::decode(
            Some(br#"{"ids":["a"],"state":10,"businessId":3,"logTimestamp":4}"#),
            &Default::default(),
        )
        .unwrap();
        let n = offsets.end - offsets.start;
        for offset in offsets {
            ods.append(&event, "t", partition, offset, 0);
        }
        DetailBatch {
            partition,
            parts: vec![TableRows {
                table: Table::OdsAnchorLog,
                folder: "dt=1970-01-01/hour=08".into(),
                rows: ods.finish(),
            }],
            windows: vec![(
                (0, 3, 10),
                Counts {
                    events: n,
                    receivers: n,
                },
            )],
        }
    }

    fn barrier(
        spec: &Arc<CheckpointSpec>,
        partition: i32,
        next_offset: i64,
        claims: &BTreeMap<i32, Claim>,
    ) -> Barrier {
        Barrier {
            spec: spec.clone(),
            partition,
            next_offset,
            claim: claims[&partition],
        }
    }

    fn minute_windows() -> WindowSpec {
        WindowSpec::new(60_000, 0, chrono_tz::Asia::Shanghai)
    }

    fn dws_rows(root: &Path) -> Vec<(i64, i64, i64, i32, i64, i64, bool)> {
        use arrow_array::cast::AsArray;
        use arrow_array::types::{Int32Type, Int64Type, TimestampMillisecondType};
        let mut out = Vec::new();
        let dir = root.join("dws_template_state_1m/dt=1970-01-01");
        for entry in fs::read_dir(dir).into_iter().flatten() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "parquet") {
                continue;
            }
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                File::open(&path).unwrap(),
            )
            .unwrap()
            .build()
            .unwrap();
            for batch in reader {
                let batch = batch.unwrap();
                let ts = |i: usize| batch.column(i).as_primitive::<TimestampMillisecondType>();
                let int = |i: usize| batch.column(i).as_primitive::<Int64Type>();
                for r in 0..batch.num_rows() {
                    out.push((
                        ts(0).value(r),
                        ts(1).value(r),
                        int(2).value(r),
                        batch.column(3).as_primitive::<Int32Type>().value(r),
                        int(4).value(r),
                        int(5).value(r),
                        batch.column(6).as_boolean().value(r),
                    ));
                }
            }
        }
        out.sort();
        out
    }

    /// Window rows and partition commits: a window closes into one row, a late event
    /// into a correction row, a complete hour folder gets `_SUCCESS` and the hook runs
    /// once, also for a new sink on the same Redis (a restart).
    #[test]
    fn closes_windows_into_rows_and_commits_complete_folders_once() {
        let dir = tempfile::tempdir().unwrap();
        let hook_log = dir.path().join("hook.log");
        let root = dir.path().join("w");
        let config = WarehouseConfig {
            root: root.to_string_lossy().into(),
            partition_commit_hook: format!(
                "echo \"$ANCHORFLOW_TABLE $ANCHORFLOW_DT $ANCHORFLOW_HOUR $ANCHORFLOW_PARTITION_PATH\" >> {}",
                hook_log.display()
            ),
            ..Default::default()
        };
        let (redis, keys) = test_redis();
        let mut conn = fences::connect(&redis.url, Duration::from_secs(5)).unwrap();
        let claims = fences::claim(&mut conn, &keys, &[0], |fresh| {
            Ok(fresh.iter().map(|p| (*p, 0)).collect())
        })
        .unwrap();
        let sink = |config: &WarehouseConfig| {
            let (tx, _rx) = std::sync::mpsc::channel();
            WarehouseSink::new(
                config.clone(),
                &redis,
                minute_windows(),
                keys.clone(),
                "t1".into(),
                Metrics::new(),
                tx,
            )
        };
        let mut first = sink(&config);
        let checkpoint = |id, watermark| {
            Arc::new(CheckpointSpec {
                id,
                partitions: vec![0],
                kind: CheckpointKind::Periodic,
                watermark,
            })
        };
        first.write_rows(rows(0, 0..3)).unwrap();
        // The hour 08:00-09:00 (Shanghai) of 1970-01-01 ends at 3,600,000 ms. One
        // millisecond before, the minute window [0, 60 s) closes into the open files,
        // which are young and small: nothing is published yet.
        let (_, fences) = first
            .on_barrier(barrier(&checkpoint(1, Some(3_599_999)), 0, 3, &claims))
            .unwrap()
            .unwrap();
        assert_eq!(fences, vec![(0, 0)]);
        assert!(dws_rows(&root).is_empty());
        // A late event for the closed window becomes a correction row. The watermark
        // reaches the hour's end: its folder is due, which rolls the files, and the
        // folder is committed.
        first.write_rows(rows(0, 3..4)).unwrap();
        let (_, fences) = first
            .on_barrier(barrier(&checkpoint(2, Some(3_600_000)), 0, 4, &claims))
            .unwrap()
            .unwrap();
        assert_eq!(fences, vec![(0, 4)]);
        assert_eq!(
            dws_rows(&root),
            vec![
                (0, 60_000, 3, 10, 1, 1, true),
                (0, 60_000, 3, 10, 3, 3, false)
            ]
        );
        assert!(root
            .join("ods_anchor_log/dt=1970-01-01/hour=08/_SUCCESS")
            .exists());
        assert!(
            !root
                .join("dws_template_state_1m/dt=1970-01-01/_SUCCESS")
                .exists(),
            "the day is not over"
        );
        let log = fs::read_to_string(&hook_log).unwrap();
        let expected = format!(
            "ods_anchor_log 1970-01-01 08 {}\n",
            root.join("ods_anchor_log/dt=1970-01-01/hour=08").display()
        );
        assert_eq!(log, expected);
        // A restarted sink on the same Redis does not commit the folder again.
        drop(first);
        let mut second = sink(&config);
        second.commit_partitions().unwrap();
        assert_eq!(fs::read_to_string(&hook_log).unwrap(), expected);
        // The day folder commits once the watermark passes local midnight (16:00 UTC),
        // even in a quiet stream: with nothing open, a periodic checkpoint records the
        // watermark without files.
        let claims = fences::claim(&mut conn, &keys, &[0], |_| unreachable!()).unwrap();
        let (_, fences) = second
            .on_barrier(barrier(&checkpoint(1, Some(16 * 3_600_000)), 0, 4, &claims))
            .unwrap()
            .unwrap();
        assert_eq!(fences, vec![(0, 4)]);
        assert_eq!(second.counters().files, 0, "a record without files");
        assert!(root
            .join("dws_template_state_1m/dt=1970-01-01/_SUCCESS")
            .exists());
        assert_eq!(
            fs::read_to_string(&hook_log).unwrap().lines().count(),
            2,
            "one more hook run, for the day folder"
        );
    }

    /// The test Redis started by `scripts/test-env.sh` (database 12, which no other
    /// test flushes), with fresh keys.
    fn test_redis() -> (RedisConfig, FenceKeys) {
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

    fn published_offsets(root: &Path) -> Vec<(i32, i64)> {
        let mut out = Vec::new();
        let dir = root.join("ods_anchor_log/dt=1970-01-01/hour=08");
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if !path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("part-")
            {
                continue;
            }
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                File::open(path).unwrap(),
            )
            .unwrap()
            .build()
            .unwrap();
            for batch in reader {
                let batch = batch.unwrap();
                let p = batch.column_by_name("kafka_partition").unwrap();
                let o = batch.column_by_name("kafka_offset").unwrap();
                let p = p
                    .as_any()
                    .downcast_ref::<arrow_array::Int32Array>()
                    .unwrap();
                let o = o
                    .as_any()
                    .downcast_ref::<arrow_array::Int64Array>()
                    .unwrap();
                out.extend(
                    p.iter()
                        .zip(o.iter())
                        .map(|(p, o)| (p.unwrap(), o.unwrap())),
                );
            }
        }
        out.sort();
        out
    }

    #[test]
    fn published_files_hold_exactly_the_rows_before_the_barriers() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, _rx) = std::sync::mpsc::channel();
        let config = WarehouseConfig {
            root: dir.path().to_string_lossy().into(),
            ..Default::default()
        };
        let (redis, keys) = test_redis();
        let mut conn = fences::connect(&redis.url, Duration::from_secs(5)).unwrap();
        let claims = fences::claim(&mut conn, &keys, &[0, 1], |fresh| {
            Ok(fresh.iter().map(|p| (*p, 0)).collect())
        })
        .unwrap();
        let mut sink = WarehouseSink::new(
            config,
            &redis,
            minute_windows(),
            keys.clone(),
            "t1".into(),
            Metrics::new(),
            tx,
        );
        sink.write_rows(rows(0, 0..3)).unwrap();
        sink.write_rows(rows(1, 0..2)).unwrap();
        let spec = Arc::new(CheckpointSpec {
            id: 1,
            partitions: vec![0, 1],
            kind: CheckpointKind::Final,
            watermark: None,
        });
        assert!(sink
            .on_barrier(barrier(&spec, 0, 3, &claims))
            .unwrap()
            .is_none());
        // Partition 0 continues past its barrier while partition 1's is still missing.
        sink.write_rows(rows(0, 3..5)).unwrap();
        sink.write_rows(rows(1, 2..3)).unwrap();
        let (id, fences) = sink
            .on_barrier(barrier(&spec, 1, 3, &claims))
            .unwrap()
            .unwrap();
        assert_eq!((id, fences), (1, vec![(0, 3), (1, 3)]));
        assert_eq!(
            published_offsets(dir.path()),
            vec![(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
        );
        // The commit moved the stored fences and left no publish record behind.
        let stored = fences::read(&mut conn, &keys, &[0, 1]).unwrap();
        assert_eq!(stored[&0].2, Some(3));
        assert_eq!(stored[&1].2, Some(3));
        assert!(fences::pending_publishes(&mut conn, &keys)
            .unwrap()
            .is_empty());
        // A periodic checkpoint with young, small files publishes nothing.
        let spec = Arc::new(CheckpointSpec {
            id: 2,
            partitions: vec![0, 1],
            kind: CheckpointKind::Periodic,
            watermark: None,
        });
        sink.on_barrier(barrier(&spec, 0, 5, &claims)).unwrap();
        let (_, fences) = sink
            .on_barrier(barrier(&spec, 1, 3, &claims))
            .unwrap()
            .unwrap();
        assert_eq!(
            fences,
            vec![(0, 3), (1, 3)],
            "nothing published: fences stay at the last recorded commit"
        );
        assert_eq!(sink.counters().files, 1);
        // The hidden file is invisible to readers and removed as an orphan after a crash.
        drop(sink);
        assert_eq!(
            remove_orphans(&dir.path().to_string_lossy(), "t1").unwrap(),
            1
        );
        assert_eq!(
            remove_orphans(&dir.path().to_string_lossy(), "t1").unwrap(),
            0
        );
    }
}
