//! What each instance has published, kept in the warehouse itself:
//! `{root}/_anchorflow/{group}/{topic}/published/{instance}` holds, per partition, the
//! warehouse fence of the last commit this instance published. The fences proper live
//! in Redis; these files outlive a Redis restored from an older snapshot, so a claim
//! can tell that Redis's fences are behind what the warehouse already holds (and stop,
//! instead of publishing those rows a second time). Written after every published
//! commit, replaced whole, not fsynced: a lost update can only hide a rollback from
//! the check, never invent one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;

use crate::sinks::warehouse::storage::Storage;

/// One instance's marks.
pub struct PublishedMarks {
    storage: Arc<dyn Storage>,
    path: PathBuf,
    marks: BTreeMap<i32, i64>,
}

/// The folder holding every instance's published marks of one (group, topic).
fn marks_dir(root: &Path, group: &str, topic: &str) -> PathBuf {
    root.join("_anchorflow")
        .join(group)
        .join(topic)
        .join("published")
}

fn read_marks(storage: &dyn Storage, path: &Path) -> anyhow::Result<BTreeMap<i32, i64>> {
    let Some(bytes) = storage
        .read(path)
        .with_context(|| format!("reading {}", path.display()))?
    else {
        return Ok(BTreeMap::new());
    };
    String::from_utf8_lossy(&bytes)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (p, fence) = line
                .split_once('\t')
                .with_context(|| format!("a malformed line in {}: {line:?}", path.display()))?;
            Ok((p.parse()?, fence.parse()?))
        })
        .collect()
}

/// The marks files of every instance of one (group, topic).
fn marks_files(storage: &dyn Storage, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = storage
        .list(dir)
        .with_context(|| format!("listing {}", dir.display()))?;
    Ok(entries
        .into_iter()
        .filter(|e| !e.is_dir && e.path.extension().is_none_or(|x| x != "next"))
        .map(|e| e.path)
        .collect())
}

impl PublishedMarks {
    /// This instance's marks, as its earlier runs left them.
    pub fn load(
        storage: Arc<dyn Storage>,
        root: &Path,
        group: &str,
        topic: &str,
        instance: &str,
    ) -> anyhow::Result<Self> {
        let path = marks_dir(root, group, topic).join(instance);
        let marks = read_marks(storage.as_ref(), &path)?;
        Ok(PublishedMarks {
            storage,
            path,
            marks,
        })
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
        let mut text =
            String::from("# warehouse fences this instance published: partition, fence\n");
        for (partition, fence) in &self.marks {
            text.push_str(&format!("{partition}\t{fence}\n"));
        }
        self.storage
            .replace(&self.path, text.as_bytes(), false)
            .with_context(|| format!("replacing {}", self.path.display()))
    }
}

/// Per partition, the highest warehouse fence any instance published.
pub fn published_fences(
    storage: &dyn Storage,
    root: &Path,
    group: &str,
    topic: &str,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let mut out = BTreeMap::new();
    for path in marks_files(storage, &marks_dir(root, group, topic))? {
        for (partition, fence) in read_marks(storage, &path)? {
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
    storage: Arc<dyn Storage>,
    root: &Path,
    group: &str,
    topic: &str,
    caps: &BTreeMap<i32, i64>,
) -> anyhow::Result<()> {
    for path in marks_files(storage.as_ref(), &marks_dir(root, group, topic))? {
        let Some(instance) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let mut marks = PublishedMarks::load(storage.clone(), root, group, topic, instance)?;
        for (partition, cap) in caps {
            if let Some(mark) = marks.marks.get_mut(partition) {
                *mark = (*mark).min(*cap);
            }
        }
        marks.write()?;
    }
    Ok(())
}

/// Forgets what every instance published for (group, topic): for a topic recreated
/// from scratch (the demo's throwaway cluster), never for a live one.
pub fn forget_published(
    storage: &dyn Storage,
    root: &Path,
    group: &str,
    topic: &str,
) -> anyhow::Result<()> {
    let dir = marks_dir(root, group, topic);
    storage
        .remove_folder(&dir)
        .with_context(|| format!("removing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::warehouse::storage::LocalFs;

    #[test]
    fn published_marks_keep_the_highest_fence_over_runs_and_instances() {
        let root = tempfile::tempdir().unwrap();
        let fs: Arc<dyn Storage> = Arc::new(LocalFs);
        let load = |instance: &str| {
            PublishedMarks::load(fs.clone(), root.path(), "g", "t", instance).unwrap()
        };
        let mut a = load("a");
        a.record([(0, 100), (1, 50)]).unwrap();
        a.record([(0, 90)]).unwrap();
        load("a").record([(1, 70)]).unwrap();
        load("b").record([(0, 120)]).unwrap();
        let all = published_fences(&LocalFs, root.path(), "g", "t").unwrap();
        assert_eq!(all, [(0, 120), (1, 70)].into());
        assert!(published_fences(&LocalFs, root.path(), "g", "other")
            .unwrap()
            .is_empty());
        cap_published(fs.clone(), root.path(), "g", "t", &[(0, 110)].into()).unwrap();
        let capped = published_fences(&LocalFs, root.path(), "g", "t").unwrap();
        assert_eq!(capped, [(0, 110), (1, 70)].into());
        forget_published(&LocalFs, root.path(), "g", "t").unwrap();
        assert!(published_fences(&LocalFs, root.path(), "g", "t")
            .unwrap()
            .is_empty());
    }
}
