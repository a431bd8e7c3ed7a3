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

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use anyhow::Context as _;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use tracing::{error, info, warn};

use crate::backoff::Backoff;
use crate::config::{RedisConfig, WarehouseConfig};
use crate::fault;
use crate::fences::{
    self, on_rejection, range_for, Claim, FenceKeys, FenceRange, PublishRecord, Reply,
};
use crate::instance_lease::InstanceLease;
use crate::mailbox::Mailbox;
use crate::messages::{
    Barrier, CheckpointKind, CheckpointSpec, DetailBatch, SinkKind, SourceNotice, Table, TableRows,
    WarehouseInput,
};
use crate::metrics::{ActorLabel, Metrics, SinkLabel, TableLabel};
use crate::partition_committer::{commit_deadline, CommitDue};
use crate::tables::{DwsRows, Folders};
use crate::warehouse_files::{
    complete_recorded, new_run_id, remove_orphans, roll_forward, FileNames, Generation, NewFile,
    PublishedMarks,
};
use crate::window::{Counts, PartitionWindows, WindowKey, WindowSpec};
use rustc_hash::FxHashMap;

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

pub struct WarehouseSink {
    restart: crate::backoff::RestartBackoff,
    config: WarehouseConfig,
    names: FileNames,
    seq: u64,
    metrics: Metrics,
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
    /// Writes `_SUCCESS` and runs the hook, on a thread of its own.
    committer: Option<Mailbox<CommitDue>>,
    /// What this instance published, kept in the warehouse (see `warehouse_files.rs`).
    marks: Option<PublishedMarks>,
    /// This run's claim on its instance id; in-progress files of earlier runs are
    /// deleted only while it is held.
    lease: InstanceLease,
    /// Whether earlier runs' in-progress files still wait for the lease.
    orphans_pending: bool,
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
        let run = new_run_id();
        let (keys_for_lease, instance_for_lease) = (keys.clone(), instance.clone());
        WarehouseSink {
            restart: Default::default(),
            config,
            names: FileNames {
                instance,
                run: run.clone(),
            },
            seq: 0,
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
            record_script: redis::Script::new(&format!(
                "{}{}",
                fences::FENCE_CHECK,
                include_str!("scripts/warehouse_record.lua")
            )),
            window_spec,
            dws: FxHashMap::default(),
            recorded_watermark: None,
            committer: None,
            marks: None,
            lease: InstanceLease::new(&keys_for_lease, &instance_for_lease, &run),
            orphans_pending: true,
            counters: WarehouseCounters::default(),
        }
    }

    /// Keeps `marks` up to date with every published commit.
    pub fn with_marks(mut self, marks: PublishedMarks) -> Self {
        self.marks = Some(marks);
        self
    }

    /// Nudges `committer` after every record that moved the watermark.
    pub fn with_committer(mut self, committer: Mailbox<CommitDue>) -> Self {
        self.committer = Some(committer);
        self
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
        let completed = self.with_redis("completing recorded commits", |conn| {
            complete_recorded(conn, &keys)
        })?;
        if completed > 0 {
            info!(records = completed, "rolled recorded commits forward");
        }
        self.clean_up_orphans()
    }

    /// Deletes earlier runs' in-progress files once this run holds the instance lease
    /// (renewing it when due): never while another run of the same id may be writing.
    fn clean_up_orphans(&mut self) -> anyhow::Result<()> {
        if !self.lease.due() {
            return Ok(());
        }
        let mut lease = std::mem::replace(
            &mut self.lease,
            InstanceLease::new(&self.keys, &self.names.instance, &self.names.run),
        );
        let held = self.with_redis("refreshing the instance lease", |conn| lease.refresh(conn));
        self.lease = lease;
        if held && self.orphans_pending {
            self.orphans_pending = false;
            let removed = remove_orphans(Path::new(&self.config.root), &self.names)?;
            if removed > 0 {
                info!(removed, "removed in-progress files left by an earlier run");
            }
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
        let rows = part.rows.num_rows() as u64;
        let properties = self.properties();
        let (root, names, seq) = (Path::new(&self.config.root), &self.names, &mut self.seq);
        let generation = if into_next {
            &mut self.next
        } else {
            &mut self.current
        };
        generation.append(
            part.table,
            part.folder,
            &part.rows,
            self.config.max_open_files,
            || {
                *seq += 1;
                NewFile {
                    root,
                    names,
                    seq: *seq,
                    properties,
                }
            },
        )?;
        self.counters.rows += rows;
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

    /// Tells the partition committer that folders may be complete now. A nudge that
    /// finds one queued is dropped: that one will look.
    fn nudge_committer(&self) {
        if let Some(committer) = &self.committer {
            let _ = committer.try_send(CommitDue);
        }
    }

    /// With nothing open, a checkpoint still records (no files) when the watermark
    /// moved: stored watermarks drive partition commits of quiet streams.
    fn quiet_progress(&self, watermark: Option<i64>) -> bool {
        self.current.is_empty()
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
            || self.current.open_files().any(|((table, folder), f)| {
                f.size() >= self.config.target_file_bytes
                    || f.opened.elapsed() >= age
                    // A folder due for its partition commit publishes now, not at the
                    // next roll.
                    || watermark.is_some_and(|mark| {
                        commit_deadline(
                            &self.window_spec,
                            self.config.partition_commit_delay_ms,
                            *table,
                            folder,
                        )
                        .is_some_and(|due| due <= mark)
                    })
            })
    }

    /// Handles a barrier; returns the fences to report once the checkpoint is complete.
    fn on_barrier(&mut self, barrier: Barrier) -> anyhow::Result<Option<Completed>> {
        self.clean_up_orphans()?;
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
        windows.note_max_event(barrier.max_event_ms);
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
                self.nudge_committer();
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

    /// Closes, records and renames one generation of files. Returns false when the
    /// record was refused for good (the process is stopping; the files stay hidden).
    fn publish(
        &mut self,
        generation: Generation,
        commit: Commit<'_>,
        checkpoint: u64,
    ) -> anyhow::Result<bool> {
        let closed = generation.close()?;
        let record = PublishRecord {
            id: format!("{}.{}.{checkpoint}", self.names.instance, self.names.run),
            files: closed
                .iter()
                .map(|c| (c.hidden.clone(), c.visible.clone()))
                .collect(),
            ranges: commit.ranges.to_vec(),
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
                let reply: redis::Value = invocation
                    .invoke(conn)
                    .context("running the record script")?;
                fences::reply(&reply)
            });
            match reply {
                Reply::Applied { .. } => break,
                Reply::AppliedBefore => {
                    info!(
                        checkpoint,
                        "warehouse commit had been recorded before its reply was lost"
                    );
                    break;
                }
                Reply::Rejected(rejection) => {
                    if !on_rejection(&self.metrics, SinkKind::Warehouse, checkpoint, &rejection) {
                        return Ok(false);
                    }
                    std::thread::sleep(Backoff::DEFAULT.delay(attempt));
                    attempt = attempt.saturating_add(1);
                }
            }
        }
        self.metrics.redis_state_lost.set(0);
        if let Some(marks) = &mut self.marks {
            marks.record(commit.ranges.iter().map(|r| (r.partition, r.to)))?;
        }
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
        ctx.set_mailbox_capacity(crate::mailbox::actix_capacity(WAREHOUSE_SINK_MAILBOX));
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
    use crate::partition_committer::PartitionCommitter;
    use crate::tables::OdsRows;
    use std::fs::{self, File};

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
        claims: &BTreeMap<i32, fences::Claimed>,
    ) -> Barrier {
        Barrier {
            spec: spec.clone(),
            partition,
            next_offset,
            claim: claims[&partition].claim,
            max_event_ms: None,
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
        // The committer's work, run in place after each checkpoint (in the pipeline it
        // runs on its own thread when the sink nudges it).
        let committer = || {
            PartitionCommitter::new(
                config.clone(),
                minute_windows(),
                keys.clone(),
                &redis,
                "t1".into(),
                Metrics::new(),
            )
        };
        let mut committer_of_first = committer();
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
            committer_of_first.commit_due().unwrap(),
            None,
            "nothing to retry"
        );
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
        // A restarted instance on the same Redis does not commit the folder again.
        drop(first);
        let mut second = sink(&config);
        let mut committer_of_second = committer();
        committer_of_second.commit_due().unwrap();
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
        committer_of_second.commit_due().unwrap();
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
        let later = FileNames {
            instance: "t1".into(),
            run: new_run_id(),
        };
        assert_eq!(remove_orphans(dir.path(), &later).unwrap(), 1);
        assert_eq!(remove_orphans(dir.path(), &later).unwrap(), 0);
    }
}
