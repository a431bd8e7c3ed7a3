//! Recorded warehouse commits: the record a commit stores in Redis before its files
//! are published (`docs/exactly-once.md`), so that a crash between the two is rolled forward.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context as _;

use crate::checkpoint::claim::FenceRange;
use crate::protocol::keys::FenceKeys;
use crate::sinks::warehouse::storage::FileHandle;

/// A warehouse commit recorded in Redis: files to move from their hidden names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishRecord {
    pub id: String,
    /// Each file's handle and its final name.
    pub files: Vec<(FileHandle, PathBuf)>,
    /// The offset ranges the files hold, per partition: what an operator repairs if a
    /// file of this commit is lost (`fences recover`).
    pub ranges: Vec<FenceRange>,
}

impl PublishRecord {
    /// A first line `#ranges p:epoch:from:to,…`, then a line `handle\tvisible` per file
    /// ([`FileHandle::encode`]).
    pub fn encode(&self) -> String {
        let ranges: Vec<String> = self
            .ranges
            .iter()
            .map(|r| format!("{}:{}:{}:{}", r.partition, r.epoch, r.from, r.to))
            .collect();
        std::iter::once(format!("#ranges {}", ranges.join(",")))
            .chain(
                self.files
                    .iter()
                    .map(|(handle, visible)| format!("{}\t{}", handle.encode(), visible.display())),
            )
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn decode(id: String, value: &str) -> anyhow::Result<Self> {
        let malformed = |line: &str| format!("malformed publish record {id}: {line:?}");
        let mut record = PublishRecord {
            id: id.clone(),
            files: Vec::new(),
            ranges: Vec::new(),
        };
        for line in value.lines().filter(|l| !l.is_empty()) {
            if let Some(ranges) = line.strip_prefix("#ranges ") {
                for range in ranges.split(',').filter(|r| !r.is_empty()) {
                    let n: Vec<i64> = range
                        .split(':')
                        .map(str::parse)
                        .collect::<Result<_, _>>()
                        .with_context(|| malformed(line))?;
                    let [partition, epoch, from, to] = n[..] else {
                        anyhow::bail!(malformed(line));
                    };
                    record.ranges.push(FenceRange {
                        partition: partition as i32,
                        epoch,
                        from,
                        to,
                    });
                }
                continue;
            }
            let (handle, visible) = line.split_once('\t').with_context(|| malformed(line))?;
            let handle = FileHandle::decode(handle).with_context(|| malformed(line))?;
            record.files.push((handle, PathBuf::from(visible)));
        }
        Ok(record)
    }
}

/// Every recorded warehouse commit whose publishing is not known to be finished.
pub fn pending_publishes(
    conn: &mut redis::Connection,
    keys: &FenceKeys,
) -> anyhow::Result<Vec<PublishRecord>> {
    let all: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(&keys.publish)
        .query(conn)
        .context("reading pending publishes")?;
    all.into_iter()
        .map(|(id, value)| PublishRecord::decode(id, &value))
        .collect()
}

/// Forgets a recorded commit once its files are all in place.
pub fn publish_done(
    conn: &mut redis::Connection,
    keys: &FenceKeys,
    id: &str,
) -> anyhow::Result<()> {
    redis::cmd("HDEL")
        .arg(&keys.publish)
        .arg(id)
        .query::<i64>(conn)
        .context("clearing a publish record")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_records_round_trip() {
        let record = PublishRecord {
            id: "a-1".into(),
            files: vec![
                (
                    FileHandle::InProgress("/w/t/.a.inprogress".into()),
                    "/w/t/part-a.parquet".into(),
                ),
                (
                    FileHandle::Upload(
                        crate::sinks::warehouse::upload_handle::Handle::new(
                            "w/u/.b.inprogress".into(),
                            "w/u/part-b.parquet".into(),
                            "upload-1".into(),
                            1234,
                            vec!["etag-1".into(), "etag-2".into()],
                        )
                        .unwrap(),
                    ),
                    "w/u/part-b.parquet".into(),
                ),
            ],
            ranges: vec![
                FenceRange {
                    partition: 0,
                    epoch: 3,
                    from: 10,
                    to: 20,
                },
                FenceRange {
                    partition: 2,
                    epoch: 3,
                    from: 0,
                    to: 0,
                },
            ],
        };
        let back = PublishRecord::decode("a-1".into(), &record.encode()).unwrap();
        assert_eq!(back, record);
        assert!(PublishRecord::decode("x".into(), "no tab here").is_err());
    }
}
