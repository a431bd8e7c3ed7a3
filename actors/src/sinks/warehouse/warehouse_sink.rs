//! `WarehouseSink`: writes Parquet files in Hive layout (`docs/warehouse.md`).
//!
//! One open file per (table, folder), written under a hidden name (`writer.rs`) and
//! published only at a checkpoint that rolls (`roll.rs` says when). Publishing is a
//! two-step commit (`publish.rs`, `docs/exactly-once.md`): close every file (footer,
//! fsync, fsync its folder), then **record** the commit in Redis with one script (the
//! fence check for every partition's offset range, the new fences, the files to
//! publish), then publish the files and forget the record. A zombie's or a replay's
//! record is refused and its files stay hidden. A crash between the steps is repaired
//! at the next start: recorded commits are rolled forward, then this instance's
//! remaining hidden files, which no record names, are deleted as orphans (only while
//! this run holds its instance lease, `protocol/lease.rs`). The sink's fence of a
//! partition (reported to the source) is the end of its last recorded range.
//!
//! It also keeps the open `dws_template_state_1m` windows per partition (from counts
//! the readers pre-aggregate): at a checkpoint's barriers the windows its watermark
//! passed become rows in the files that checkpoint publishes, and each partition's
//! remaining windows are stored by the record script with its fence. Every record also
//! stores the checkpoint's watermark per partition and the folders that got rows; the
//! partition committer (`partition_committer.rs`) commits complete folders.
//!
//! **Failures** (`runtime/supervision.rs`): when Redis does not answer, the sink stops
//! and its supervisor restarts it after a capped backoff; the commit it was recording
//! stays with it (files closed, record built) and is finished first after the restart,
//! while its mailbox holds the readers back. File I/O errors stop the process with
//! exit code 74: a half-written Parquet writer cannot be trusted, its rows come from
//! every partition, and a restart resumes from the stored fences.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use actix::prelude::*;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use rustc_hash::FxHashMap;
use tracing::{error, info, warn};

use crate::checkpoint::barrier::Barrier;
use crate::checkpoint::claim::FenceRange;
use crate::checkpoint::driver::SinkAcks;
use crate::config::{RedisConfig, WarehouseConfig};
use crate::logic::window::{PartitionWindows, WindowSpec};
use crate::messages::{CommitDue, DetailBatch, TableRows, WarehouseInput};
use crate::metrics::SinkLabel;
use crate::protocol::fences::BlockingConnection;
use crate::protocol::lease::InstanceLease;
use crate::runtime::exit;
use crate::runtime::fault;
use crate::runtime::mailbox::Mailbox;
use crate::runtime::supervision::{self, Failure, Restarts};
use crate::sinks::fenced::SinkShared;
use crate::sinks::warehouse::marks::PublishedMarks;
use crate::sinks::warehouse::publish::{
    complete_recorded, remove_orphans, PublishError, Publisher, Publishing,
};
use crate::sinks::warehouse::roll::{Roll, RollPolicy};
use crate::sinks::warehouse::storage::Storage;
use crate::sinks::warehouse::writer::{new_run_id, FileNames, Generation, NewFile};

/// Mailbox capacity, in detail batches. Every reader may have one batch in flight; the
/// sink encodes Parquet on its own thread, and a short queue keeps readers paused
/// rather than letting encoded batches pile up in memory.
pub const WAREHOUSE_SINK_MAILBOX: usize = 16;

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

/// What this sink reports for a checkpoint it made durable: the id and its fences per
/// partition.
type SinkReport = (u64, Vec<(i32, i64)>);

pub struct WarehouseSink {
    restarts: Restarts,
    config: WarehouseConfig,
    policy: RollPolicy,
    names: FileNames,
    seq: u64,
    storage: Arc<dyn Storage>,
    shared: SinkShared,
    /// Where each published checkpoint is reported.
    acks: SinkAcks,
    current: Generation,
    next: Generation,
    roll: Option<Roll>,
    /// Records commits and publishes their files; owns the Redis connection.
    publisher: Publisher,
    /// Per partition: the epoch and the end of our last recorded range.
    fences: BTreeMap<i32, (i64, i64)>,
    window_spec: WindowSpec,
    /// Open `dws_template_state_1m` windows per partition; they outlive checkpoints.
    dws: FxHashMap<i32, PartitionWindows>,
    /// The watermark this sink last stored for its partitions (partition commit).
    recorded_watermark: Option<i64>,
    /// Writes `_SUCCESS` and runs the hook, on a thread of its own.
    committer: Option<Mailbox<CommitDue>>,
    /// This run's claim on its instance id; in-progress files of earlier runs are
    /// deleted only while it is held.
    lease: InstanceLease,
    /// Whether earlier runs' in-progress files still wait for the lease.
    orphans_pending: bool,
    counters: WarehouseCounters,
    /// Row-group bytes each generation's open files may buffer (`with_row_group_bytes`).
    row_group_bytes: u64,
}

impl WarehouseSink {
    pub fn new(
        config: WarehouseConfig,
        redis: &RedisConfig,
        window_spec: WindowSpec,
        instance: String,
        shared: SinkShared,
        acks: SinkAcks,
        storage: Arc<dyn Storage>,
    ) -> Self {
        let run = new_run_id();
        let lease = InstanceLease::new(&shared.keys, &instance, &run);
        WarehouseSink {
            restarts: Restarts::new("warehouse_sink", &shared.metrics, &shared.health),
            policy: RollPolicy::new(&config, window_spec),
            config,
            names: FileNames { instance, run },
            seq: 0,
            publisher: Publisher::new(
                storage.clone(),
                shared.clone(),
                BlockingConnection::new(redis),
            ),
            storage,
            shared,
            acks,
            current: Generation::default(),
            next: Generation::default(),
            roll: None,
            fences: BTreeMap::new(),
            window_spec,
            dws: FxHashMap::default(),
            recorded_watermark: None,
            committer: None,
            lease,
            orphans_pending: true,
            counters: WarehouseCounters::default(),
            row_group_bytes: u64::MAX,
        }
    }

    /// Holds each generation's open row groups to `bytes` (a share of the memory
    /// budget, `runtime/memory.rs`); unbounded until set.
    pub fn with_row_group_bytes(mut self, bytes: u64) -> Self {
        self.row_group_bytes = bytes;
        self
    }

    /// Keeps `marks` up to date with every published commit.
    pub fn with_marks(mut self, marks: PublishedMarks) -> Self {
        self.publisher = self.publisher.with_marks(marks);
        self
    }

    /// Nudges `committer` after every record that moved the watermark.
    pub fn with_committer(mut self, committer: Mailbox<CommitDue>) -> Self {
        self.committer = Some(committer);
        self
    }

    pub fn counters(&self) -> WarehouseCounters {
        self.counters
    }

    /// One attempt at `f` on Redis.
    fn redis<T>(
        &mut self,
        f: impl FnOnce(&mut redis::Connection) -> anyhow::Result<T>,
    ) -> Result<T, PublishError> {
        self.publisher.redis.run(f).map_err(PublishError::Redis)
    }

    /// Publishes recorded commits a crash interrupted (ours included, after a
    /// restart), then deletes this instance's hidden files that no record names.
    fn recover(&mut self) -> Result<(), PublishError> {
        let (keys, storage) = (self.shared.keys.clone(), self.storage.clone());
        let completed = self.redis(|conn| complete_recorded(storage.as_ref(), conn, &keys))??;
        if completed > 0 {
            info!(records = completed, "rolled recorded commits forward");
        }
        self.clean_up_orphans()
    }

    /// Deletes earlier runs' in-progress files once this run holds the instance lease
    /// (renewing it when due): never while another run of the same id may be writing.
    fn clean_up_orphans(&mut self) -> Result<(), PublishError> {
        if !self.lease.due() {
            return Ok(());
        }
        let lease = &mut self.lease;
        let held = match self.publisher.redis.run(|conn| lease.refresh(conn)) {
            Ok(held) => held,
            // Not a reason to stop: this runs before a barrier is taken in, and a
            // restart would lose it. Without the lease nothing is deleted; the next
            // record or claim meets the outage anyway.
            Err(error) => {
                self.publisher.redis.reset();
                self.lease.failed();
                warn!(
                    error = format!("{error:#}"),
                    "could not renew the instance lease; in-progress files of earlier runs stay until it is renewed"
                );
                return Ok(());
            }
        };
        if held && self.orphans_pending {
            self.orphans_pending = false;
            let root = Path::new(&self.config.root);
            let removed = remove_orphans(self.storage.as_ref(), root, &self.names)?;
            if removed > 0 {
                info!(removed, "removed in-progress files left by an earlier run");
            }
        }
        Ok(())
    }

    fn properties(&self) -> WriterProperties {
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(self.config.row_group_rows))
            .set_created_by(format!("anchorflow {}", env!("CARGO_PKG_VERSION")))
            .build()
    }

    fn write_rows(&mut self, batch: DetailBatch) -> anyhow::Result<()> {
        fault::warehouse_delay();
        let into_next = self
            .roll
            .as_ref()
            .is_some_and(|r| r.passed(batch.partition));
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
        let storage = self.storage.as_ref();
        let generation = if into_next {
            &mut self.next
        } else {
            &mut self.current
        };
        generation.append(
            part.table,
            part.folder,
            &part.rows,
            (self.config.max_open_files, self.row_group_bytes),
            || {
                *seq += 1;
                NewFile {
                    storage,
                    root,
                    names,
                    seq: *seq,
                    properties,
                }
            },
        )?;
        self.counters.rows += rows;
        self.shared.metrics.warehouse_rows.inc_by(rows);
        Ok(())
    }

    /// Tells the partition committer that folders may be complete now. A nudge that
    /// finds one queued is dropped: that one will look.
    fn nudge_committer(&self) {
        if let Some(committer) = &self.committer {
            let _ = committer.try_send(CommitDue);
        }
    }

    /// The roll of the checkpoint `barrier` belongs to, started at its first barrier.
    fn roll_for(&mut self, barrier: &Barrier) -> &mut Roll {
        if let Some(stale) = self.roll.take_if(|r| r.spec.id != barrier.spec.id) {
            // Checkpoints complete in order and a revocation that cannot finish one
            // stops the process (`source/context.rs`): a later barrier before the
            // roll is whole means rows and fences no longer agree. Going on would move
            // the fences over the abandoned checkpoint's rows; stopping re-reads them.
            error!(
                checkpoint = stale.spec.id,
                next = barrier.spec.id,
                "a barrier of a later checkpoint came before this one was complete"
            );
            supervision::stateful_panic("warehouse_sink", "checkpoints out of order");
        }
        let (policy, current, recorded) = (&self.policy, &self.current, self.recorded_watermark);
        self.roll.get_or_insert_with(|| {
            let spec = barrier.spec.clone();
            let publish = policy.publishes(current, spec.kind, spec.watermark, recorded);
            Roll::new(spec, publish)
        })
    }

    /// Handles a barrier; returns the fences to report once the checkpoint is complete.
    fn on_barrier(&mut self, barrier: Barrier) -> Result<Option<SinkReport>, PublishError> {
        self.clean_up_orphans()?;
        let window_spec = self.window_spec;
        let mut windows = self.dws.remove(&barrier.partition).unwrap_or_default();
        let complete = self
            .roll_for(&barrier)
            .add(&barrier, &mut windows, &window_spec);
        self.dws.insert(barrier.partition, windows);
        if !complete {
            return Ok(None);
        }
        let roll = self.roll.take().expect("a roll is in progress");
        // Window results belong before the barriers: into the generation this
        // checkpoint publishes (or the open one, published by a later roll).
        for rows in roll.window_rows(&window_spec)? {
            self.append(false, rows)?;
        }
        let ranges = roll.ranges(&self.fences);
        if !roll.publish {
            // Nothing recorded: fences stay where they are, or start at a new claim's.
            for range in &ranges {
                self.fences
                    .insert(range.partition, (range.epoch, range.from));
            }
            return Ok(Some(self.report(roll.spec.id, &ranges)));
        }
        let current = std::mem::replace(&mut self.current, std::mem::take(&mut self.next));
        let closed = current.close(self.storage.as_ref())?;
        let root = Path::new(&self.config.root);
        let ranges = roll.ranges(&self.fences);
        let publishing = Publishing::new(&self.names, root, closed, &roll, ranges);
        self.publisher.begin(publishing);
        self.finish_publishing()
    }

    /// Records and publishes the pending commit, then moves the fences.
    fn finish_publishing(&mut self) -> Result<Option<SinkReport>, PublishError> {
        let Some(publishing) = self.publisher.finish()? else {
            return Ok(None);
        };
        let ranges = &publishing.record.ranges;
        for range in ranges {
            self.fences.insert(range.partition, (range.epoch, range.to));
        }
        if let Some(mark) = publishing.watermark {
            self.recorded_watermark = Some(self.recorded_watermark.map_or(mark, |r| r.max(mark)));
            self.nudge_committer();
        }
        self.counters.rolls += 1;
        self.counters.files += publishing.closed.len() as u64;
        Ok(Some(self.report(publishing.checkpoint, ranges)))
    }

    /// The sink's fences of a completed checkpoint's partitions.
    fn report(&self, checkpoint: u64, ranges: &[FenceRange]) -> SinkReport {
        self.shared
            .metrics
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
        (checkpoint, fences)
    }

    /// What follows a step: report a completed checkpoint, restart after a Redis
    /// failure, stop the process after a file error.
    fn settle(&mut self, ctx: &mut Context<Self>, step: Result<Option<SinkReport>, PublishError>) {
        match step {
            Ok(Some((checkpoint, fences))) => {
                self.restarts.succeeded();
                self.acks.committed(checkpoint, fences);
            }
            Ok(None) => {}
            Err(PublishError::Redis(error)) => {
                self.shared.metrics.redis_errors.inc();
                self.publisher.redis.reset();
                self.restarts.fail(ctx, Failure::Dependency(error));
            }
            Err(PublishError::Files(error)) => {
                warn!(error = format!("{error:#}"), "warehouse write failed");
                exit::stop(
                    exit::IO_ERROR,
                    "stopping so that a restart resumes from the stored fences",
                );
            }
        }
    }
}

impl Actor for WarehouseSink {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(crate::runtime::mailbox::actix_capacity(
            WAREHOUSE_SINK_MAILBOX,
        ));
        // After a restart: wait out the backoff, then finish the commit it was
        // recording before anything else (`wait` holds the mailbox).
        self.restarts.started_then(ctx, |sink: &mut Self, ctx| {
            let step = sink.recover().and_then(|()| sink.finish_publishing());
            sink.settle(ctx, step);
            Box::pin(actix::fut::ready(()))
        });
    }
}

impl Supervised for WarehouseSink {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.restarts.restarting();
    }
}

impl Handler<WarehouseInput> for WarehouseSink {
    type Result = ();

    fn handle(&mut self, input: WarehouseInput, ctx: &mut Self::Context) {
        let step = supervision::catch(|| match input {
            WarehouseInput::Rows(batch) => self
                .write_rows(batch)
                .map(|()| None)
                .map_err(PublishError::Files),
            WarehouseInput::Restore { partition, windows } => {
                self.dws.insert(partition, windows);
                Ok(None)
            }
            WarehouseInput::Barrier(barrier) => self.on_barrier(barrier),
        });
        match step {
            Ok(step) => self.settle(ctx, step),
            Err(panic) => supervision::stateful_panic("warehouse_sink", &panic),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::barrier::{CheckpointKind, CheckpointSpec};
    use crate::logic::tables::{OdsRows, Table};
    use crate::logic::window::Counts;
    use crate::protocol::claim_script::Claimed;
    use crate::protocol::fences;
    use crate::protocol::keys::FenceKeys;
    use crate::protocol::publish::pending_publishes;
    use crate::sinks::test_redis::test_redis;
    use crate::sinks::warehouse::partition_committer::PartitionCommitter;
    use crate::sinks::warehouse::storage::LocalFs;
    use std::fs::{self, File};
    use std::time::Duration;

    use crate::checkpoint::claim::SinkKind;
    use crate::sinks::test_redis::shared;

    /// An ack handle whose reports these tests do not read.
    fn acks() -> SinkAcks {
        crate::sinks::test_redis::acks(SinkKind::Warehouse).0
    }

    fn rows(partition: i32, offsets: std::ops::Range<i64>) -> DetailBatch {
        let mut ods = OdsRows::default();
        let event = crate::logic::decode::decode(
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
        claims: &BTreeMap<i32, Claimed>,
    ) -> Barrier {
        Barrier {
            spec: spec.clone(),
            partition,
            next_offset,
            claim: claims[&partition].claim,
            max_event_ms: None,
        }
    }

    /// A warehouse folder, fresh keys in the test Redis, and partitions 0 and 1
    /// claimed there.
    fn claimed_partitions() -> (
        tempfile::TempDir,
        FenceKeys,
        redis::Connection,
        BTreeMap<i32, Claimed>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (redis, keys) = test_redis();
        let mut conn = fences::connect(&redis, Duration::from_secs(5)).unwrap();
        let claims = fences::claim(&mut conn, &keys, &[0, 1], |fresh| {
            Ok(fresh.iter().map(|p| (*p, 0)).collect())
        })
        .unwrap();
        (dir, keys, conn, claims)
    }

    /// A sink of instance `t1` writing into `dir`.
    fn sink_in(dir: &tempfile::TempDir, keys: &FenceKeys) -> WarehouseSink {
        let config = WarehouseConfig {
            root: dir.path().to_string_lossy().into(),
            ..Default::default()
        };
        WarehouseSink::new(
            config,
            &test_redis().0,
            minute_windows(),
            "t1".into(),
            shared(keys),
            acks(),
            Arc::new(LocalFs),
        )
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
        let mut conn = fences::connect(&redis, Duration::from_secs(5)).unwrap();
        let claims = fences::claim(&mut conn, &keys, &[0], |fresh| {
            Ok(fresh.iter().map(|p| (*p, 0)).collect())
        })
        .unwrap();
        let sink = |config: &WarehouseConfig| {
            WarehouseSink::new(
                config.clone(),
                &redis,
                minute_windows(),
                "t1".into(),
                shared(&keys),
                acks(),
                Arc::new(LocalFs),
            )
        };
        // The committer's work, run in place after each checkpoint (in the pipeline it
        // runs on its own thread when the sink nudges it).
        let committer = || {
            PartitionCommitter::new(
                config.clone(),
                minute_windows(),
                &redis,
                "t1".into(),
                &shared(&keys),
                Arc::new(LocalFs),
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
        let (dir, keys, mut conn, claims) = claimed_partitions();
        let mut sink = sink_in(&dir, &keys);
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
        assert!(pending_publishes(&mut conn, &keys).unwrap().is_empty());
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
        assert_eq!(remove_orphans(&LocalFs, dir.path(), &later).unwrap(), 1);
        assert_eq!(remove_orphans(&LocalFs, dir.path(), &later).unwrap(), 0);
    }

    /// A barrier is never lost to a Redis error: the lease renewal at a barrier used
    /// to fail the barrier (a restart then resumed without it, and its checkpoint never
    /// completed: the Redis-outage row hung). Here the lease key holds a hash, so
    /// every renewal fails while the record script works.
    #[test]
    fn a_lease_that_cannot_be_renewed_loses_no_barrier() {
        let (dir, keys, mut conn, claims) = claimed_partitions();
        let lease = format!("{}t1", keys.instances_prefix);
        redis::cmd("HSET")
            .arg(&lease)
            .arg("not")
            .arg("a lease")
            .query::<()>(&mut conn)
            .unwrap();
        let mut sink = sink_in(&dir, &keys);
        sink.write_rows(rows(0, 0..3)).unwrap();
        sink.write_rows(rows(1, 0..2)).unwrap();
        let spec = Arc::new(CheckpointSpec {
            id: 1,
            partitions: vec![0, 1],
            kind: CheckpointKind::Final,
            watermark: None,
        });
        let first = sink.on_barrier(barrier(&spec, 0, 3, &claims));
        assert!(matches!(first, Ok(None)), "the barrier was taken in");
        let (id, fences) = sink
            .on_barrier(barrier(&spec, 1, 2, &claims))
            .unwrap()
            .expect("both barriers are in: the checkpoint completes");
        assert_eq!((id, fences), (1, vec![(0, 3), (1, 2)]));
        assert_eq!(published_offsets(dir.path()).len(), 5);
    }
}
