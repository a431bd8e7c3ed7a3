//! Publishing recorded commits, and the cleanup after a crash (`docs/exactly-once.md`).
//!
//! A commit is first **recorded** in Redis (`warehouse_record.lua`: the fence check,
//! the new fences and the files to publish, in one script), then its files are
//! **published** through [`Storage::publish`], which never replaces a file and may run
//! twice; then the record is forgotten. A crash between the steps is repaired by
//! [`complete_recorded`], which every start and every claim runs: recorded commits are
//! rolled forward, whoever recorded them. A recorded file found under neither name was
//! lost after the commit was recorded (deleted by hand, a broken disk): that is an
//! error that stops the process, never a skipped file.
//!
//! In-progress files of an earlier run that no record names are orphans: their rows
//! were never recorded and will be read again. [`remove_orphans`] deletes only this
//! instance's (`.{instance}.` names) and only in the table folders.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use tracing::{info, warn};

use crate::checkpoint::claim::{FenceRange, SinkKind};
use crate::logic::tables::Table;
use crate::metrics::TableLabel;
use crate::protocol::fences::BlockingConnection;
use crate::protocol::keys::FenceKeys;
use crate::protocol::publish::{pending_publishes, publish_done, PublishRecord};
use crate::protocol::reply::Reply;
use crate::protocol::scripts::{self, RecordArgs};
use crate::runtime::fault;
use crate::sinks::fenced::{on_rejection, SinkShared};
use crate::sinks::warehouse::marks::PublishedMarks;
use crate::sinks::warehouse::roll::Roll;
use crate::sinks::warehouse::storage::{sync_parents, FileHandle, Published, Storage};
use crate::sinks::warehouse::writer::{Closed, FileNames};

/// Publishes one file of recorded commit `record`.
pub fn publish_file(
    storage: &dyn Storage,
    handle: &FileHandle,
    visible: &Path,
    record: &str,
) -> anyhow::Result<()> {
    let hidden = handle.path();
    let published = storage.publish(handle, visible).with_context(|| {
        format!(
            "publishing {} as {} (commit {record})",
            hidden.display(),
            visible.display()
        )
    })?;
    match published {
        Published::Done => Ok(()),
        Published::NameTaken => anyhow::bail!(
            "refusing to publish {} as {} (commit {record}): another file has that name",
            hidden.display(),
            visible.display()
        ),
        Published::Missing => anyhow::bail!(
            "{} of recorded commit {record} is missing under both its names ({}): its rows are lost; see docs/exactly-once.md, \"A recorded file is missing\"",
            visible.display(),
            hidden.display()
        ),
    }
}

/// Publishes every file of a recorded commit and makes the new names durable.
pub fn roll_forward(storage: &dyn Storage, record: &PublishRecord) -> anyhow::Result<()> {
    for (n, (handle, visible)) in record.files.iter().enumerate() {
        if n > 0 {
            fault::point(fault::BETWEEN_PUBLISHES);
        }
        publish_file(storage, handle, visible, &record.id)?;
    }
    sync_parents(storage, record.files.iter().map(|(_, v)| v.as_path()))
}

/// Completes every recorded commit whose publishing a crash interrupted, whoever
/// recorded it (the files' paths are in the record), and forgets it. Run at start and
/// by every instance that claims a partition, so rows a fence has passed become
/// visible however long the instance that recorded them stays down. The outer error is
/// Redis's (worth a retry); the inner one a file that cannot be published.
pub fn complete_recorded(
    storage: &dyn Storage,
    conn: &mut redis::Connection,
    keys: &FenceKeys,
) -> anyhow::Result<Result<usize, anyhow::Error>> {
    let records = pending_publishes(conn, keys)?;
    for record in &records {
        if let Err(error) = roll_forward(storage, record) {
            return Ok(Err(error));
        }
        publish_done(conn, keys, &record.id)?;
    }
    Ok(Ok(records.len()))
}

/// Removes every file of a recorded commit, under either name (`fences recover`, for
/// a commit that can no longer be published whole).
pub fn discard(storage: &dyn Storage, record: &PublishRecord) -> anyhow::Result<()> {
    for (handle, visible) in &record.files {
        for path in [handle.path(), visible] {
            storage
                .remove(path)
                .with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Deletes in-progress files of this instance left by an earlier run (a crash): their
/// rows were never recorded, so they will be read again. Only the table folders are
/// searched, and only `.{instance}.` names are touched; an entry that cannot be read
/// there is an error (it could hide such files). Returns how many were removed.
pub fn remove_orphans(
    storage: &dyn Storage,
    root: &Path,
    names: &FileNames,
) -> anyhow::Result<usize> {
    let mut removed = 0;
    let mut stack: Vec<PathBuf> = Table::ALL.iter().map(|t| root.join(t.name())).collect();
    while let Some(dir) = stack.pop() {
        let entries = storage
            .list(&dir)
            .with_context(|| format!("listing {}", dir.display()))?;
        for entry in entries {
            let name = entry
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if entry.is_dir {
                stack.push(entry.path);
            } else if names.is_own_in_progress(&name) && !name.contains(&format!(".{}.", names.run))
            {
                storage
                    .remove(&entry.path)
                    .with_context(|| format!("removing orphan {}", entry.path.display()))?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// Why a commit could not be finished.
#[derive(Debug)]
pub enum PublishError {
    /// Redis did not answer (or lost the fences): restart and try again.
    Redis(anyhow::Error),
    /// A file could not be written or published: stop the process.
    Files(anyhow::Error),
}

impl From<anyhow::Error> for PublishError {
    fn from(error: anyhow::Error) -> Self {
        PublishError::Files(error)
    }
}

/// A publishing checkpoint whose files are closed: what its record stores. It stays
/// with the [`Publisher`] until it is recorded and published, across restarts.
pub struct Publishing {
    pub checkpoint: u64,
    pub closed: Vec<Closed>,
    pub record: PublishRecord,
    /// Folders that received rows: they await their partition commit.
    pub folders: BTreeSet<String>,
    /// Open `dws_template_state_1m` windows per partition as of its barrier.
    pub states: BTreeMap<i32, String>,
    pub watermark: Option<i64>,
}

impl Publishing {
    /// The commit of `closed`, the files of checkpoint `checkpoint` over `ranges`.
    pub fn new(
        names: &FileNames,
        root: &Path,
        closed: Vec<Closed>,
        roll: &Roll,
        ranges: Vec<FenceRange>,
    ) -> Self {
        let checkpoint = roll.spec.id;
        let record = PublishRecord {
            id: format!("{}.{}.{checkpoint}", names.instance, names.run),
            files: closed
                .iter()
                .map(|c| (c.handle.clone(), c.visible.clone()))
                .collect(),
            ranges,
        };
        let folders = closed
            .iter()
            .filter(|c| c.table != Table::DeadLetter)
            .filter_map(|c| c.visible.parent()?.strip_prefix(root).ok())
            .map(|f| f.to_string_lossy().into_owned())
            .collect();
        Publishing {
            checkpoint,
            closed,
            record,
            folders,
            states: roll.states.clone(),
            watermark: roll.spec.watermark,
        }
    }
}

/// Records commits in Redis and publishes their files (the module docs say how).
pub struct Publisher {
    storage: Arc<dyn Storage>,
    shared: SinkShared,
    pub redis: BlockingConnection,
    script: redis::Script,
    /// What this instance published, kept in the warehouse (see `marks.rs`).
    marks: Option<PublishedMarks>,
    /// The commit being recorded or published.
    pending: Option<Publishing>,
    /// Records whose files are published but which Redis could not forget yet.
    uncleared: Vec<String>,
}

impl Publisher {
    pub fn new(storage: Arc<dyn Storage>, shared: SinkShared, redis: BlockingConnection) -> Self {
        Publisher {
            storage,
            shared,
            redis,
            script: scripts::record_script(),
            marks: None,
            pending: None,
            uncleared: Vec::new(),
        }
    }

    pub fn with_marks(mut self, marks: PublishedMarks) -> Self {
        self.marks = Some(marks);
        self
    }

    /// Takes a commit to record and publish.
    pub fn begin(&mut self, publishing: Publishing) {
        self.pending = Some(publishing);
    }

    /// Records and publishes the pending commit. It stays pending when Redis fails;
    /// `None` when there was none, or when its record was refused for good (the
    /// process is stopping; the files stay hidden).
    pub fn finish(&mut self) -> Result<Option<Publishing>, PublishError> {
        let Some(publishing) = self.pending.take() else {
            return Ok(None);
        };
        match self.record(&publishing) {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(error) => {
                self.pending = Some(publishing);
                return Err(error);
            }
        }
        if let Some(marks) = &mut self.marks {
            let ranges = &publishing.record.ranges;
            marks.record(ranges.iter().map(|r| (r.partition, r.to)))?;
        }
        if !publishing.record.files.is_empty() {
            fault::point(fault::AFTER_WAREHOUSE_RECORD);
            roll_forward(self.storage.as_ref(), &publishing.record)?;
            fault::point(fault::BEFORE_FORGETTING_RECORD);
            self.uncleared.push(publishing.record.id.clone());
            self.forget_records();
            self.count(&publishing.closed);
        }
        Ok(Some(publishing))
    }

    /// Records a commit in Redis. False when it was refused for good.
    fn record(&mut self, publishing: &Publishing) -> Result<bool, PublishError> {
        let args = RecordArgs {
            checkpoint: publishing.checkpoint,
            ranges: &publishing.record.ranges,
            record: &publishing.record,
            folders: &publishing.folders,
            watermark: publishing.watermark,
            states: &publishing.states,
        };
        let (script, keys) = (&self.script, &self.shared.keys);
        let reply = self
            .redis
            .run(|conn| args.invoke(script, conn, keys))
            .map_err(PublishError::Redis)?;
        let checkpoint = publishing.checkpoint;
        match reply {
            Reply::Applied { .. } => {}
            Reply::AppliedBefore => info!(
                checkpoint,
                "warehouse commit had been recorded before its reply was lost"
            ),
            Reply::Rejected(rejection) => {
                if !on_rejection(&self.shared, SinkKind::Warehouse, checkpoint, &rejection) {
                    return Ok(false);
                }
                return Err(PublishError::Redis(anyhow::anyhow!(
                    "{rejection}: holding the commit until an operator recovers the fences"
                )));
            }
        }
        self.shared.applied();
        Ok(true)
    }

    /// Forgets published records in Redis. One that cannot be forgotten now is
    /// harmless (publishing it again changes nothing) and is tried again next time.
    fn forget_records(&mut self) {
        let keys = &self.shared.keys;
        let ids = std::mem::take(&mut self.uncleared);
        let cleared = self
            .redis
            .run(|conn| ids.iter().try_for_each(|id| publish_done(conn, keys, id)));
        if let Err(error) = cleared {
            warn!(
                error = format!("{error:#}"),
                "could not clear publish records; retrying at the next commit"
            );
            self.uncleared = ids;
        }
    }

    fn count(&self, closed: &[Closed]) {
        let metrics = &self.shared.metrics;
        for file in closed {
            let label = TableLabel {
                table: file.table.name(),
            };
            metrics.parquet_files.get_or_create(&label).inc();
            metrics.parquet_rows.get_or_create(&label).inc_by(file.rows);
            metrics
                .parquet_bytes
                .get_or_create(&label)
                .inc_by(file.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::warehouse::storage::LocalFs;
    use crate::sinks::warehouse::writer::new_run_id;
    use std::fs::{self, File};

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
        let now = names("anchorflow", "now");
        assert_eq!(remove_orphans(&LocalFs, root.path(), &now).unwrap(), 1);
        assert!(!files[0].exists(), "an earlier run's file is an orphan");
        assert!(
            files[1..].iter().all(|f| f.exists()),
            "the rest is not ours to delete"
        );
        assert_eq!(remove_orphans(&LocalFs, root.path(), &now).unwrap(), 0);
    }

    #[test]
    fn publishing_never_replaces_a_file_and_is_loud_about_a_lost_one() {
        let root = tempfile::tempdir().unwrap();
        let names = names("a", new_run_id().as_str());
        let (hidden, visible) = (names.hidden(root.path(), 1), names.visible(root.path(), 1));
        fs::write(&hidden, b"rows").unwrap();
        let handle = FileHandle::InProgress(hidden.clone());
        publish_file(&LocalFs, &handle, &visible, "r1").unwrap();
        assert!(!hidden.exists() && fs::read(&visible).unwrap() == b"rows");
        publish_file(&LocalFs, &handle, &visible, "r1").expect("publishing again is harmless");
        // A different file under the visible name is never replaced.
        fs::write(&hidden, b"other rows").unwrap();
        let err = publish_file(&LocalFs, &handle, &visible, "r2").unwrap_err();
        assert!(
            format!("{err:#}").contains("another file has that name"),
            "{err:#}"
        );
        assert_eq!(fs::read(&visible).unwrap(), b"rows");
        // A recorded file under neither name is an error.
        let (lost, lost_visible) = (names.hidden(root.path(), 2), names.visible(root.path(), 2));
        let lost = FileHandle::InProgress(lost);
        let err = publish_file(&LocalFs, &lost, &lost_visible, "r3").unwrap_err();
        assert!(
            format!("{err:#}").contains("missing under both its names"),
            "{err:#}"
        );
    }
}
