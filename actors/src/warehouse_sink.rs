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
//! partition waits for another. The sink's fence of a partition (reported to the
//! source) is the barrier offset of the last published checkpoint; a partition with
//! no rows in open files advances its fence at every checkpoint.
//!
//! File I/O errors stop the process with exit code 74: a half-written Parquet writer
//! cannot be trusted, and a restart resumes from the last stored offsets.

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

use crate::config::WarehouseConfig;
use crate::messages::{
    Barrier, CheckpointKind, CheckpointSpec, DetailBatch, SinkKind, SourceNotice, Table,
    WarehouseInput,
};
use crate::metrics::{ActorLabel, MailboxMeter, Metrics, SinkLabel, TableLabel};

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
    /// Partitions with rows in these files.
    dirty: BTreeSet<i32>,
}

/// A completed checkpoint: its id and the sink's fences per partition.
type Completed = (u64, Vec<(i32, i64)>);

struct Roll {
    spec: Arc<CheckpointSpec>,
    seen: BTreeMap<i32, i64>,
    publish: bool,
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
    fences: BTreeMap<i32, i64>,
    counters: WarehouseCounters,
}

impl WarehouseSink {
    pub fn new(
        config: WarehouseConfig,
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
            counters: WarehouseCounters::default(),
        }
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
            let key = (part.table, part.folder);
            let generation = if into_next {
                &mut self.next
            } else {
                &mut self.current
            };
            if !generation.files.contains_key(&key) {
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
            generation.dirty.insert(batch.partition);
            let file = generation
                .files
                .get_mut(&key)
                .context("open file vanished")?;
            file.writer
                .write(&part.rows)
                .with_context(|| format!("writing {}", file.hidden.display()))?;
            file.rows += part.rows.num_rows() as u64;
            self.counters.rows += part.rows.num_rows() as u64;
        }
        Ok(())
    }

    fn due(&self, kind: CheckpointKind) -> bool {
        let age = Duration::from_secs(self.config.roll_interval_secs);
        kind == CheckpointKind::Final
            || self
                .current
                .files
                .values()
                .any(|f| f.size() >= self.config.target_file_bytes || f.opened.elapsed() >= age)
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
            let publish = self.due(barrier.spec.kind) && !self.current.files.is_empty();
            self.roll = Some(Roll {
                spec: barrier.spec.clone(),
                seen: BTreeMap::new(),
                publish,
            });
        }
        let roll = self.roll.as_mut().context("roll state just set")?;
        roll.seen.insert(barrier.partition, barrier.next_offset);
        if roll.seen.len() < roll.spec.partitions.len() {
            return Ok(None);
        }
        let roll = self.roll.take().context("roll state just checked")?;
        if roll.publish {
            let current = std::mem::replace(&mut self.current, std::mem::take(&mut self.next));
            self.publish(current)?;
            self.counters.rolls += 1;
            for (&partition, &offset) in &roll.seen {
                self.fences.insert(partition, offset);
            }
        } else {
            for (&partition, &offset) in &roll.seen {
                if !self.current.dirty.contains(&partition) {
                    self.fences.insert(partition, offset);
                }
            }
        }
        self.metrics
            .sink_commits
            .get_or_create(&SinkLabel { sink: "warehouse" })
            .inc();
        let fences = roll
            .spec
            .partitions
            .iter()
            .filter_map(|p| self.fences.get(p).map(|o| (*p, *o)))
            .collect();
        Ok(Some((roll.spec.id, fences)))
    }

    fn publish(&mut self, generation: Generation) -> anyhow::Result<()> {
        let mut folders = BTreeSet::new();
        for (_, file) in generation.files {
            let table = file.table;
            let rows = file.rows;
            let handle = file
                .writer
                .into_inner()
                .with_context(|| format!("closing {}", file.hidden.display()))?;
            handle
                .sync_all()
                .with_context(|| format!("fsync {}", file.hidden.display()))?;
            let bytes = handle.metadata().map(|m| m.len()).unwrap_or(0);
            drop(handle);
            fs::rename(&file.hidden, &file.visible).with_context(|| {
                format!(
                    "publishing {} as {}",
                    file.hidden.display(),
                    file.visible.display()
                )
            })?;
            if let Some(folder) = file.visible.parent() {
                folders.insert(folder.to_path_buf());
            }
            let label = TableLabel {
                table: table.name(),
            };
            self.metrics.parquet_files.get_or_create(&label).inc();
            self.metrics.parquet_rows.get_or_create(&label).inc_by(rows);
            self.metrics
                .parquet_bytes
                .get_or_create(&label)
                .inc_by(bytes);
            self.counters.files += 1;
        }
        // The renames are durable only once their folders are synced.
        for folder in folders {
            File::open(&folder)
                .and_then(|dir| dir.sync_all())
                .with_context(|| format!("fsync folder {}", folder.display()))?;
        }
        Ok(())
    }
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
        match remove_orphans(&self.config.root, &self.instance) {
            Ok(0) => {}
            Ok(n) => info!(
                removed = n,
                "removed in-progress files left by an earlier run"
            ),
            Err(e) => fail_hard(e),
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
        }
    }

    fn barrier(spec: &Arc<CheckpointSpec>, partition: i32, next_offset: i64) -> Barrier {
        Barrier {
            spec: spec.clone(),
            partition,
            next_offset,
        }
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
        let mut sink = WarehouseSink::new(config, "t1".into(), Metrics::new(), tx);
        sink.write_rows(rows(0, 0..3)).unwrap();
        sink.write_rows(rows(1, 0..2)).unwrap();
        let spec = Arc::new(CheckpointSpec {
            id: 1,
            partitions: vec![0, 1],
            kind: CheckpointKind::Final,
        });
        assert!(sink.on_barrier(barrier(&spec, 0, 3)).unwrap().is_none());
        // Partition 0 continues past its barrier while partition 1's is still missing.
        sink.write_rows(rows(0, 3..5)).unwrap();
        sink.write_rows(rows(1, 2..3)).unwrap();
        let (id, fences) = sink.on_barrier(barrier(&spec, 1, 3)).unwrap().unwrap();
        assert_eq!((id, fences), (1, vec![(0, 3), (1, 3)]));
        assert_eq!(
            published_offsets(dir.path()),
            vec![(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
        );
        // A periodic checkpoint with young, small files publishes nothing.
        let spec = Arc::new(CheckpointSpec {
            id: 2,
            partitions: vec![0, 1],
            kind: CheckpointKind::Periodic,
        });
        sink.on_barrier(barrier(&spec, 0, 5)).unwrap();
        let (_, fences) = sink.on_barrier(barrier(&spec, 1, 3)).unwrap().unwrap();
        assert_eq!(
            fences,
            vec![(0, 3), (1, 3)],
            "partition 0 has unpublished rows; 1 has none open"
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
