//! The warehouse's files on disk: their names, the open Parquet writers of one
//! generation (with a cap on how many are open), the publish step, and the cleanup
//! after a crash. The warehouse sink (`warehouse_sink.rs`) decides *when*; this
//! module does the file work.
//!
//! Names: a file is written as `.{instance}.{run}.{seq}.parquet.inprogress` (hidden:
//! Hive, Spark, Trino and DuckDB skip names starting with `.`) and published as
//! `part-{instance}.{run}.{seq}.parquet`. Instance ids cannot contain a `.`, so
//! `.{instance}.` names exactly one instance's files: `anchorflow` never mistakes
//! `anchorflow-2`'s files for its own. The run id is random, not a time stamp, so a
//! restart with a clock set back cannot reuse a name.
//!
//! Publishing links the hidden file under its visible name and then removes the hidden
//! one. Unlike a rename, a link never replaces an existing file, so a published file
//! cannot be overwritten; and it is idempotent, so rolling a recorded commit forward
//! twice (after a crash, or by two instances) is harmless. A recorded file that is
//! found under neither name was lost after the commit was recorded (deleted by hand,
//! a broken disk): that is an error that stops the process, never a skipped file.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File};
use std::hash::{BuildHasher, Hasher};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use arrow_array::RecordBatch as ArrowBatch;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;

use crate::fences::PublishRecord;
use crate::messages::Table;

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
    fn is_own_in_progress(&self, name: &str) -> bool {
        name.starts_with(&format!(".{}.", self.instance)) && name.ends_with(".inprogress")
    }
}

/// A Parquet file being written under its hidden name.
pub struct OpenFile {
    pub table: Table,
    writer: ArrowWriter<File>,
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
        let handle = self
            .writer
            .into_inner()
            .with_context(|| format!("closing {}", self.hidden.display()))?;
        handle
            .sync_all()
            .with_context(|| format!("fsync {}", self.hidden.display()))?;
        let bytes = handle
            .metadata()
            .with_context(|| format!("reading the size of {}", self.hidden.display()))?
            .len();
        Ok(Closed {
            table: self.table,
            rows: self.rows,
            bytes,
            hidden: self.hidden,
            visible: self.visible,
        })
    }
}

/// A closed, synced file waiting to be published.
pub struct Closed {
    pub table: Table,
    pub rows: u64,
    pub bytes: u64,
    pub hidden: PathBuf,
    pub visible: PathBuf,
}

/// What a new file needs.
pub struct NewFile<'a> {
    pub root: &'a Path,
    pub names: &'a FileNames,
    pub seq: u64,
    pub properties: WriterProperties,
}

/// The files one checkpoint will publish: open ones, one per (table, folder), and
/// ones closed early because more than `max_open` folders were written at once (data
/// spread over many hours). Open writers buffer a row group each, so the cap bounds
/// memory whatever the event times.
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
    /// cap, closing the longest-idle one) when needed.
    pub fn append<'a>(
        &mut self,
        table: Table,
        folder: String,
        rows: &ArrowBatch,
        max_open: usize,
        new_file: impl FnOnce() -> NewFile<'a>,
    ) -> anyhow::Result<()> {
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
            .write(rows)
    }

    /// Closes every file (footer, fsync) and fsyncs their folders, so that the hidden
    /// files survive a power cut once a record names them.
    pub fn close(self) -> anyhow::Result<Vec<Closed>> {
        let mut closed = self.closed;
        for (_, file) in self.open {
            closed.push(file.close()?);
        }
        sync_folders(closed.iter().map(|c| c.hidden.as_path()))?;
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
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let hidden = new.names.hidden(&dir, new.seq);
    let visible = new.names.visible(&dir, new.seq);
    let file = File::create(&hidden).with_context(|| format!("creating {}", hidden.display()))?;
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

/// Publishes one file: links it under its visible name, then removes the hidden name.
/// Idempotent; refuses to replace another file; an error when the file is under
/// neither name.
pub fn publish_file(hidden: &Path, visible: &Path, record: &str) -> anyhow::Result<()> {
    match fs::hard_link(hidden, visible) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let same = |a: &Path, b: &Path| -> std::io::Result<bool> {
                let (a, b) = (fs::metadata(a)?, fs::metadata(b)?);
                Ok(a.dev() == b.dev() && a.ino() == b.ino())
            };
            match same(hidden, visible) {
                Ok(true) => {}
                // The hidden name is gone since: published meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Ok(false) => anyhow::bail!(
                    "refusing to publish {} as {} (commit {record}): another file has that name",
                    hidden.display(),
                    visible.display()
                ),
                Err(e) => return Err(e).context("comparing a file with its published name"),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if visible.exists() {
                return Ok(());
            }
            anyhow::bail!(
                "{} of recorded commit {record} is missing under both its names ({}): its rows are lost; see docs/exactly-once.md, \"A recorded file is missing\"",
                visible.display(),
                hidden.display()
            );
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "publishing {} as {} (commit {record})",
                    hidden.display(),
                    visible.display()
                )
            })
        }
    }
    match fs::remove_file(hidden) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", hidden.display())),
    }
}

/// Publishes every file of a recorded commit and makes the new names durable.
pub fn roll_forward(record: &PublishRecord) -> anyhow::Result<()> {
    for (hidden, visible) in &record.files {
        publish_file(hidden, visible, &record.id)?;
    }
    sync_folders(record.files.iter().map(|(_, v)| v.as_path()))
}

/// Completes every recorded commit whose publishing a crash interrupted, whoever
/// recorded it (the files' paths are in the record), and forgets it. Run at start and
/// by every instance that claims a partition, so rows a fence has passed become
/// visible however long the instance that recorded them stays down. The outer error is
/// Redis's (worth a retry); the inner one a file that cannot be published.
pub fn complete_recorded(
    conn: &mut redis::Connection,
    keys: &crate::fences::FenceKeys,
) -> anyhow::Result<Result<usize, anyhow::Error>> {
    let records = crate::fences::pending_publishes(conn, keys)?;
    for record in &records {
        if let Err(error) = roll_forward(record) {
            return Ok(Err(error));
        }
        crate::fences::publish_done(conn, keys, &record.id)?;
    }
    Ok(Ok(records.len()))
}

/// What each instance has published, kept in the warehouse itself:
/// `{root}/_anchorflow/{group}/{topic}/published/{instance}` holds, per partition, the
/// warehouse fence of the last commit this instance published. The fences proper live
/// in Redis; these files outlive a Redis restored from an older snapshot, so a claim
/// can tell that Redis's fences are behind what the warehouse already holds (and stop,
/// instead of publishing those rows a second time). Written after every published
/// commit, replaced atomically, not fsynced: a lost update can only hide a rollback
/// from the check, never invent one.
pub struct PublishedMarks {
    path: PathBuf,
    marks: std::collections::BTreeMap<i32, i64>,
}

/// The folder holding every instance's published marks of one (group, topic).
fn marks_dir(root: &Path, group: &str, topic: &str) -> PathBuf {
    root.join("_anchorflow")
        .join(group)
        .join(topic)
        .join("published")
}

fn read_marks(path: &Path) -> anyhow::Result<std::collections::BTreeMap<i32, i64>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (p, fence) = line
                .split_once('\t')
                .with_context(|| format!("a malformed line in {}: {line:?}", path.display()))?;
            Ok((p.parse()?, fence.parse()?))
        })
        .collect()
}

impl PublishedMarks {
    /// This instance's marks, as its earlier runs left them.
    pub fn load(root: &Path, group: &str, topic: &str, instance: &str) -> anyhow::Result<Self> {
        let path = marks_dir(root, group, topic).join(instance);
        let marks = read_marks(&path)?;
        Ok(PublishedMarks { path, marks })
    }

    /// Records that the warehouse now holds everything below `fence` of each partition.
    pub fn record(&mut self, fences: impl IntoIterator<Item = (i32, i64)>) -> anyhow::Result<()> {
        let mut changed = false;
        for (partition, fence) in fences {
            let mark = self.marks.entry(partition).or_insert(i64::MIN);
            if fence > *mark {
                *mark = fence;
                changed = true;
            }
        }
        if changed {
            self.write()?;
        }
        Ok(())
    }

    fn write(&self) -> anyhow::Result<()> {
        let dir = self.path.parent().context("a marks file has a folder")?;
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut text =
            String::from("# warehouse fences this instance published: partition, fence\n");
        for (partition, fence) in &self.marks {
            text.push_str(&format!("{partition}\t{fence}\n"));
        }
        let temporary = self.path.with_extension("next");
        fs::write(&temporary, text).with_context(|| format!("writing {}", temporary.display()))?;
        fs::rename(&temporary, &self.path)
            .with_context(|| format!("replacing {}", self.path.display()))
    }
}

/// Per partition, the highest warehouse fence any instance published.
pub fn published_fences(
    root: &Path,
    group: &str,
    topic: &str,
) -> anyhow::Result<std::collections::BTreeMap<i32, i64>> {
    let dir = marks_dir(root, group, topic);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut out = std::collections::BTreeMap::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        if path.extension().is_some_and(|e| e == "next") {
            continue;
        }
        for (partition, fence) in read_marks(&path)? {
            let best = out.entry(partition).or_insert(fence);
            *best = (*best).max(fence);
        }
    }
    Ok(out)
}

/// Lowers every instance's mark of each partition in `caps` to at most its cap: after
/// `fences recover` dropped a recorded commit whose files were lost, the warehouse
/// holds that partition only up to where that commit started.
pub fn cap_published(
    root: &Path,
    group: &str,
    topic: &str,
    caps: &std::collections::BTreeMap<i32, i64>,
) -> anyhow::Result<()> {
    let dir = marks_dir(root, group, topic);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry
            .with_context(|| format!("listing {}", dir.display()))?
            .path();
        let Some(instance) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if path.extension().is_some_and(|e| e == "next") {
            continue;
        }
        let mut marks = PublishedMarks::load(root, group, topic, instance)?;
        for (partition, cap) in caps {
            if let Some(mark) = marks.marks.get_mut(partition) {
                *mark = (*mark).min(*cap);
            }
        }
        marks.write()?;
    }
    Ok(())
}

/// Removes every file of a recorded commit, under either name (`fences recover`, for
/// a commit that can no longer be published whole).
pub fn discard(record: &PublishRecord) -> anyhow::Result<()> {
    for (hidden, visible) in &record.files {
        for path in [hidden, visible] {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
            }
        }
    }
    Ok(())
}

/// Forgets what every instance published for (group, topic): for a topic recreated
/// from scratch (the demo's throwaway cluster), never for a live one.
pub fn forget_published(root: &Path, group: &str, topic: &str) -> anyhow::Result<()> {
    let dir = marks_dir(root, group, topic);
    match fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
    }
}

/// Fsyncs the distinct folders holding `files`.
pub fn sync_folders<'a>(files: impl Iterator<Item = &'a Path>) -> anyhow::Result<()> {
    let folders: BTreeSet<&Path> = files.filter_map(|f| f.parent()).collect();
    for folder in folders {
        File::open(folder)
            .and_then(|dir| dir.sync_all())
            .with_context(|| format!("fsync folder {}", folder.display()))?;
    }
    Ok(())
}

/// Deletes in-progress files of this instance left by an earlier run (a crash): their
/// rows were never recorded, so they will be read again. Only the table folders are
/// searched, and only `.{instance}.` names are touched; an entry that cannot be read
/// there is an error (it could hide such files). Returns how many were removed.
pub fn remove_orphans(root: &Path, names: &FileNames) -> anyhow::Result<usize> {
    let mut removed = 0;
    let mut stack: Vec<PathBuf> = Table::ALL.iter().map(|t| root.join(t.name())).collect();
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
            let path = entry.path();
            let kind = entry
                .file_type()
                .with_context(|| format!("reading {}", path.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if kind.is_dir() {
                stack.push(path);
            } else if names.is_own_in_progress(&name) && !name.contains(&format!(".{}.", names.run))
            {
                fs::remove_file(&path)
                    .with_context(|| format!("removing orphan {}", path.display()))?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(instance: &str, run: &str) -> FileNames {
        FileNames {
            instance: instance.into(),
            run: run.into(),
        }
    }

    #[test]
    fn cleanup_touches_only_this_instances_files_of_earlier_runs() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ods_anchor_log/dt=2023-11-20/hour=11");
        fs::create_dir_all(&dir).unwrap();
        let files = [
            names("anchorflow", "old").hidden(&dir, 1),
            names("anchorflow", "now").hidden(&dir, 2),
            names("anchorflow-2", "old").hidden(&dir, 3),
            names("anchorflow_b", "old").hidden(&dir, 4),
            dir.join(".anchorflow-old-000005.parquet.inprogress"),
        ];
        for file in &files {
            File::create(file).unwrap();
        }
        let removed = remove_orphans(root.path(), &names("anchorflow", "now")).unwrap();
        assert_eq!(removed, 1);
        assert!(!files[0].exists(), "an earlier run's file is an orphan");
        assert!(
            files[1..].iter().all(|f| f.exists()),
            "the rest is not ours to delete"
        );
        assert_eq!(
            remove_orphans(root.path(), &names("anchorflow", "now")).unwrap(),
            0
        );
    }

    #[test]
    fn publishing_never_replaces_a_file_and_is_loud_about_a_lost_one() {
        let root = tempfile::tempdir().unwrap();
        let names = names("a", new_run_id().as_str());
        let (hidden, visible) = (names.hidden(root.path(), 1), names.visible(root.path(), 1));
        fs::write(&hidden, b"rows").unwrap();
        publish_file(&hidden, &visible, "r1").unwrap();
        assert!(!hidden.exists() && fs::read(&visible).unwrap() == b"rows");
        publish_file(&hidden, &visible, "r1").expect("publishing again is harmless");
        // A different file under the visible name is never replaced.
        fs::write(&hidden, b"other rows").unwrap();
        let err = publish_file(&hidden, &visible, "r2").unwrap_err();
        assert!(
            format!("{err:#}").contains("another file has that name"),
            "{err:#}"
        );
        assert_eq!(fs::read(&visible).unwrap(), b"rows");
        // A recorded file under neither name is an error.
        let (lost, lost_visible) = (names.hidden(root.path(), 2), names.visible(root.path(), 2));
        let err = publish_file(&lost, &lost_visible, "r3").unwrap_err();
        assert!(
            format!("{err:#}").contains("missing under both its names"),
            "{err:#}"
        );
    }

    #[test]
    fn published_marks_keep_the_highest_fence_over_runs_and_instances() {
        let root = tempfile::tempdir().unwrap();
        let mut a = PublishedMarks::load(root.path(), "g", "t", "a").unwrap();
        a.record([(0, 100), (1, 50)]).unwrap();
        a.record([(0, 90)]).unwrap();
        let mut again = PublishedMarks::load(root.path(), "g", "t", "a").unwrap();
        again.record([(1, 70)]).unwrap();
        let mut b = PublishedMarks::load(root.path(), "g", "t", "b").unwrap();
        b.record([(0, 120)]).unwrap();
        let all = published_fences(root.path(), "g", "t").unwrap();
        assert_eq!(all, [(0, 120), (1, 70)].into());
        assert!(published_fences(root.path(), "g", "other")
            .unwrap()
            .is_empty());
        forget_published(root.path(), "g", "t").unwrap();
        assert!(published_fences(root.path(), "g", "t").unwrap().is_empty());
    }

    #[test]
    fn run_ids_differ() {
        assert_ne!(new_run_id(), new_run_id());
        assert_eq!(new_run_id().len(), 16);
    }
}
