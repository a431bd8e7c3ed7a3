//! The warehouse's storage contract (`actors/src/sinks/warehouse/storage.rs`), checked
//! the same way against a local folder and against a real S3-compatible server
//! (SeaweedFS, started by `scripts/test-env.sh`): files are invisible until published,
//! publishing is idempotent and never replaces another file, a discarded file is
//! reported missing, an unfinished file of a crashed run is found and removed (on S3 its
//! multipart upload is aborted), and small files are replaced whole.

mod common;

use std::io::Write as _;
use std::path::Path;

use anchorflow_actors::sinks::warehouse::object_storage::ObjectStorage;
use anchorflow_actors::sinks::warehouse::storage::{FileHandle, LocalFs, Published, Storage};

/// Bytes that need more than one part at the smallest part size (5 MiB).
fn content(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn names(storage: &dyn Storage, folder: &Path) -> Vec<String> {
    let mut names: Vec<String> = storage
        .list(folder)
        .unwrap()
        .into_iter()
        .map(|e| e.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn write(storage: &dyn Storage, hidden: &Path, visible: &Path, bytes: &[u8]) -> FileHandle {
    let mut file = storage.create(hidden, visible).unwrap();
    for chunk in bytes.chunks(700_000) {
        file.write_all(chunk).unwrap();
    }
    let finished = file.finish().unwrap();
    assert_eq!(finished.bytes, bytes.len() as u64);
    finished.handle
}

fn check_contract(storage: &dyn Storage, root: &Path) {
    let folder = root.join("ods_anchor_log/dt=2026-11-22/hour=10");
    let (hidden, visible) = (
        folder.join(".a.r.000001.parquet.inprogress"),
        folder.join("part-a.r.000001.parquet"),
    );
    let rows = content(1, 11 << 20);
    let handle = write(storage, &hidden, &visible, &rows);
    assert_eq!(
        storage.read(&visible).unwrap(),
        None,
        "invisible until published"
    );
    assert_eq!(names(storage, &folder), [".a.r.000001.parquet.inprogress"]);

    assert_eq!(storage.publish(&handle, &visible).unwrap(), Published::Done);
    assert_eq!(storage.read(&visible).unwrap().as_deref(), Some(&rows[..]));
    assert_eq!(names(storage, &folder), ["part-a.r.000001.parquet"]);
    // A crash after publishing and before forgetting the record publishes again.
    assert_eq!(storage.publish(&handle, &visible).unwrap(), Published::Done);
    assert_eq!(storage.read(&visible).unwrap().as_deref(), Some(&rows[..]));

    // Another file under the same final name (a zombie's) never replaces it.
    let other = write(
        storage,
        &folder.join(".a.r.000002.parquet.inprogress"),
        &visible,
        &content(2, 1000),
    );
    assert_eq!(
        storage.publish(&other, &visible).unwrap(),
        Published::NameTaken
    );
    assert_eq!(storage.read(&visible).unwrap().as_deref(), Some(&rows[..]));
    assert!(
        storage.remove(other.path()).unwrap(),
        "the zombie's file is discarded"
    );

    // A recorded file that was discarded (or lost) is missing, never skipped.
    let lost_visible = folder.join("part-a.r.000003.parquet");
    let lost = write(
        storage,
        &folder.join(".a.r.000003.parquet.inprogress"),
        &lost_visible,
        &content(3, 100),
    );
    assert!(storage.remove(lost.path()).unwrap());
    assert_eq!(
        storage.publish(&lost, &lost_visible).unwrap(),
        Published::Missing
    );

    // A crashed run's unfinished file: listed under its in-progress name, removable.
    let crashed = folder.join(".b.r.000004.parquet.inprogress");
    let mut file = storage
        .create(&crashed, &folder.join("part-b.r.000004.parquet"))
        .unwrap();
    file.write_all(&content(4, 6 << 20)).unwrap();
    drop(file);
    assert!(names(storage, &folder).contains(&".b.r.000004.parquet.inprogress".to_string()));
    assert!(storage.remove(&crashed).unwrap());
    assert!(!storage.remove(&crashed).unwrap());
    assert_eq!(names(storage, &folder), ["part-a.r.000001.parquet"]);

    // Small files (published marks) are replaced whole.
    let marks = root.join("_anchorflow/marks");
    assert_eq!(storage.read(&marks).unwrap(), None);
    storage.replace(&marks, b"one", true).unwrap();
    storage.replace(&marks, b"two", false).unwrap();
    assert_eq!(storage.read(&marks).unwrap().unwrap(), b"two");
    assert!(storage.remove(&marks).unwrap());
    assert!(!storage.remove(&marks).unwrap());

    storage.remove_folder(&root.join("ods_anchor_log")).unwrap();
    let left = storage.list(&folder).unwrap();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn a_local_folder_keeps_the_storage_contract() {
    let dir = tempfile::tempdir().unwrap();
    check_contract(&LocalFs, dir.path());
}

#[test]
fn an_s3_bucket_keeps_the_storage_contract() {
    let root = common::bucket::s3_root(&format!("contract-{}", std::process::id()));
    let config = common::bucket::s3_config();
    let storage = ObjectStorage::new(&root, &config).unwrap();
    check_contract(&storage, Path::new(&root));
}

/// The race the look-before-complete cannot close: an object appears under the final
/// name after `publish` looked. The store itself must refuse the completion (it is sent
/// with `If-None-Match: *`). With the condition turned off, the same completion
/// replaces the object, which shows the test ground can tell the two apart.
#[test]
fn an_s3_bucket_refuses_to_complete_over_an_object_that_appeared_meanwhile() {
    let root = common::bucket::s3_root(&format!("conditional-{}", std::process::id()));
    let folder = Path::new(&root).join("ods_anchor_log/dt=2026-12-05/hour=21");
    let mut config = common::bucket::s3_config();
    for (n, conditional) in [(1, true), (2, false)] {
        config.conditional_complete = conditional;
        let storage = ObjectStorage::new(&root, &config).unwrap();
        let visible = folder.join(format!("part-a.r.00000{n}.parquet"));
        let hidden = folder.join(format!(".a.r.00000{n}.parquet.inprogress"));
        let rows = content(n, 6 << 20);
        let handle = write(&storage, &hidden, &visible, &rows);
        let FileHandle::Upload(upload) = &handle else {
            panic!("a bucket's file is an upload: {handle:?}");
        };
        let (parts, upload) = (upload.parts.clone(), upload.upload.as_str());
        assert_eq!(parts.len(), 2, "6 MiB is two parts of 5 MiB: {handle:?}");

        let intruder = content(9, 1000);
        storage.replace(&visible, &intruder, true).unwrap();
        let key = storage.key(&visible).unwrap();
        let completed = storage.complete(&key, upload, &parts);
        let now = storage.read(&visible).unwrap().unwrap();
        if conditional {
            let error = completed.expect_err("completed over an existing object");
            assert_eq!(error.kind(), std::io::ErrorKind::AlreadyExists, "{error}");
            assert_eq!(now, intruder, "the object under the name is untouched");
            assert!(
                storage.remove(handle.path()).unwrap(),
                "the refused upload is aborted"
            );
        } else {
            completed.unwrap();
            assert_eq!(now, rows, "without the condition the object is replaced");
        }
    }
    ObjectStorage::new(&root, &config)
        .unwrap()
        .remove_folder(Path::new(&root))
        .unwrap();
}
