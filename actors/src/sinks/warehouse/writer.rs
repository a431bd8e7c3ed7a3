//! The warehouse's files while they are written: how this run names them, and the
//! open Parquet writers of one generation (with a cap on how many are open). The
//! warehouse sink (`warehouse_sink.rs`) decides *when* to publish; `publish.rs` does it.
//!
//! Names: a file is written as `.{instance}.{run}.{seq}.parquet.inprogress` (hidden:
//! Hive, Spark, Trino and DuckDB skip names starting with `.`) and published as
//! `part-{instance}.{run}.{seq}.parquet`. Instance ids cannot contain a `.`, so
//! `.{instance}.` names exactly one instance's files: `anchorflow` never mistakes
//! `anchorflow-2`'s files for its own. The run id is random, not a time stamp, so a
//! restart with a clock set back cannot reuse a name.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use arrow_array::RecordBatch as ArrowBatch;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

use crate::logic::tables::Table;
use crate::sinks::warehouse::storage::{sync_parents, FileHandle, FileWriter, Storage};

/// A random id for this run of the process (64 bits, hex).
pub fn new_run_id() -> String {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    format!("{:016x}", hasher.finish())
}

/// How this run names its files.
#[derive(Clone, Debug)]
pub struct FileNames {
    pub instance: String,
    pub run: String,
}

impl FileNames {
    pub fn hidden(&self, dir: &Path, seq: u64) -> PathBuf {
        dir.join(format!(
            ".{}.{}.{seq:06}.parquet.inprogress",
            self.instance, self.run
        ))
    }

    pub fn visible(&self, dir: &Path, seq: u64) -> PathBuf {
        dir.join(format!(
            "part-{}.{}.{seq:06}.parquet",
            self.instance, self.run
        ))
    }

    /// Whether `name` is an in-progress file of this instance (of any run).
    pub fn is_own_in_progress(&self, name: &str) -> bool {
        name.starts_with(&format!(".{}.", self.instance)) && name.ends_with(".inprogress")
    }
}

/// A Parquet file being written under its hidden name.
pub struct OpenFile {
    pub table: Table,
    writer: ArrowWriter<Box<dyn FileWriter>>,
    pub hidden: PathBuf,
    pub visible: PathBuf,
    pub opened: Instant,
    last_write: Instant,
    pub rows: u64,
}

impl OpenFile {
    /// Bytes written plus those buffered for the current row group.
    pub fn size(&self) -> u64 {
        (self.writer.bytes_written() + self.writer.in_progress_size()) as u64
    }

    fn write(&mut self, rows: &ArrowBatch) -> anyhow::Result<()> {
        self.writer
            .write(rows)
            .with_context(|| format!("writing {}", self.hidden.display()))?;
        self.rows += rows.num_rows() as u64;
        self.last_write = Instant::now();
        Ok(())
    }

    /// Writes the footer and makes the file durable under its hidden name.
    fn close(self) -> anyhow::Result<Closed> {
        let file = self
            .writer
            .into_inner()
            .with_context(|| format!("closing {}", self.hidden.display()))?;
        let finished = file
            .finish()
            .with_context(|| format!("finishing {}", self.hidden.display()))?;
        Ok(Closed {
            table: self.table,
            rows: self.rows,
            bytes: finished.bytes,
            handle: finished.handle,
            visible: self.visible,
        })
    }
}

/// A closed, synced file waiting to be published.
pub struct Closed {
    pub table: Table,
    pub rows: u64,
    pub bytes: u64,
    /// What publishing needs to find it.
    pub handle: FileHandle,
    pub visible: PathBuf,
}

/// What a new file needs.
pub struct NewFile<'a> {
    pub storage: &'a dyn Storage,
    pub root: &'a Path,
    pub names: &'a FileNames,
    pub seq: u64,
    pub properties: WriterProperties,
}

/// The files one checkpoint will publish: open ones, one per (table, folder), and
/// ones closed early because more than `max_open` folders were written at once (data
/// spread over many hours). Open writers buffer a row group each; the cap on open
/// files and the row-group budget (`max_buffered`, a share of the memory budget) bound
/// that memory whatever the event times and however long the files stay open.
#[derive(Default)]
pub struct Generation {
    open: HashMap<(Table, String), OpenFile>,
    closed: Vec<Closed>,
}

impl Generation {
    pub fn is_empty(&self) -> bool {
        self.open.is_empty() && self.closed.is_empty()
    }

    /// The open files, for roll decisions.
    pub fn open_files(&self) -> impl Iterator<Item = (&(Table, String), &OpenFile)> {
        self.open.iter()
    }

    /// Appends `rows` to the open file of (table, folder), opening one (and, at the
    /// cap, closing the longest-idle one) when needed; then, while the open files'
    /// row groups buffer more than `max_buffered` bytes, writes the largest out early.
    pub fn append<'a>(
        &mut self,
        table: Table,
        folder: String,
        rows: &ArrowBatch,
        limits: (usize, u64),
        new_file: impl FnOnce() -> NewFile<'a>,
    ) -> anyhow::Result<()> {
        let (max_open, max_buffered) = limits;
        let key = (table, folder);
        if !self.open.contains_key(&key) {
            if self.open.len() >= max_open.max(1) {
                let idle = self
                    .open
                    .iter()
                    .min_by_key(|(_, f)| f.last_write)
                    .map(|(k, _)| k.clone());
                if let Some(file) = idle.and_then(|k| self.open.remove(&k)) {
                    self.closed.push(file.close()?);
                }
            }
            let file = open_file(new_file(), table, &key.1, rows)?;
            self.open.insert(key.clone(), file);
        }
        self.open
            .get_mut(&key)
            .context("an open file vanished")?
            .write(rows)?;
        self.hold_buffers(max_buffered)
    }

    /// Row-group bytes the open files buffer.
    pub fn buffered(&self) -> u64 {
        self.open
            .values()
            .map(|f| f.writer.in_progress_size() as u64)
            .sum()
    }

    /// Writes the largest row groups out (smaller row groups, same rows) until the open
    /// files buffer at most `max` bytes.
    fn hold_buffers(&mut self, max: u64) -> anyhow::Result<()> {
        while self.buffered() > max {
            let Some(largest) = self
                .open
                .values_mut()
                .filter(|f| f.writer.in_progress_rows() > 0)
                .max_by_key(|f| f.writer.in_progress_size())
            else {
                break;
            };
            largest
                .writer
                .flush()
                .with_context(|| format!("writing a row group of {}", largest.hidden.display()))?;
        }
        Ok(())
    }

    /// Closes every file (footer, fsync) and fsyncs their folders, so that the hidden
    /// files survive a power cut once a record names them.
    pub fn close(self, storage: &dyn Storage) -> anyhow::Result<Vec<Closed>> {
        let mut closed = self.closed;
        for (_, file) in self.open {
            closed.push(file.close()?);
        }
        sync_parents(storage, closed.iter().map(|c| c.handle.path()))?;
        Ok(closed)
    }
}

fn open_file(
    new: NewFile<'_>,
    table: Table,
    folder: &str,
    sample: &ArrowBatch,
) -> anyhow::Result<OpenFile> {
    let dir = new.root.join(table.name()).join(folder);
    let hidden = new.names.hidden(&dir, new.seq);
    let visible = new.names.visible(&dir, new.seq);
    let file = new
        .storage
        .create(&hidden, &visible)
        .with_context(|| format!("creating {}", hidden.display()))?;
    let writer = ArrowWriter::try_new(file, sample.schema(), Some(new.properties))
        .with_context(|| format!("starting a parquet writer for {}", hidden.display()))?;
    let now = Instant::now();
    Ok(OpenFile {
        table,
        writer,
        hidden,
        visible,
        opened: now,
        last_write: now,
        rows: 0,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, Int64Array};
    use parquet::file::reader::{FileReader as _, SerializedFileReader};

    use super::*;
    use crate::sinks::warehouse::storage::LocalFs;

    fn rows(from: i64, n: i64) -> ArrowBatch {
        let values: ArrayRef = Arc::new(Int64Array::from_iter_values(from..from + n));
        ArrowBatch::try_from_iter([("v", values)]).unwrap()
    }

    /// Appends 40 batches over 4 folders; returns the most the files ever buffered and
    /// the rows read back from the closed files.
    fn fill(max_buffered: u64) -> (u64, i64) {
        let dir = tempfile::tempdir().unwrap();
        let names = FileNames {
            instance: "t".into(),
            run: "r".into(),
        };
        let mut generation = Generation::default();
        let (mut seq, mut most) = (0, 0);
        for n in 0..40 {
            let folder = format!("dt=2026-12-0{}", n % 4 + 1);
            generation
                .append(
                    Table::OdsAnchorLog,
                    folder,
                    &rows(n * 1000, 1000),
                    (8, max_buffered),
                    || {
                        seq += 1;
                        NewFile {
                            storage: &LocalFs,
                            root: dir.path(),
                            names: &names,
                            seq,
                            properties: WriterProperties::builder().build(),
                        }
                    },
                )
                .unwrap();
            most = most.max(generation.buffered());
        }
        let closed = generation.close(&LocalFs).unwrap();
        let read: i64 = closed
            .iter()
            .map(|c| {
                let file = std::fs::File::open(c.handle.path()).unwrap();
                SerializedFileReader::new(file)
                    .unwrap()
                    .metadata()
                    .file_metadata()
                    .num_rows()
            })
            .sum();
        (most, read)
    }

    #[test]
    fn open_row_groups_are_held_to_their_budget_without_losing_rows() {
        let (unbounded, read) = fill(u64::MAX);
        assert_eq!(read, 40_000);
        let max = unbounded / 4;
        let (most, read) = fill(max);
        assert!(most <= max, "{most} bytes buffered, budget {max}");
        assert_eq!(read, 40_000, "rows written early are still in the files");
    }
}
