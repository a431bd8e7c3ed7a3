//! Where the warehouse's files live, behind one trait: everything the warehouse sink,
//! the partition committer, crash recovery and `anchorflow fences` do to files goes
//! through [`Storage`]. [`LocalFs`] is a local (or mounted) filesystem;
//! `object_storage.rs` implements the same contract on S3-compatible storage, and
//! `open` (in `mod.rs`) picks one from `warehouse.root`.
//!
//! The contract the exactly-once protocol relies on (`docs/exactly-once.md`):
//! - [`Storage::create`] writes a new file under its in-progress name, and
//!   [`FileWriter::finish`] returns only once it is durable there, with what
//!   [`Storage::publish`] needs to find it (a [`FileHandle`], which the commit record
//!   stores);
//! - [`Storage::publish`] makes a finished file visible under its final name, never
//!   replaces a different file, and is idempotent (publishing again, or after the
//!   in-progress name is gone because it was published, is success); a file found
//!   under neither name is [`Published::Missing`], which callers report loudly;
//! - [`Storage::sync_folders`] makes new names durable.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::sinks::warehouse::upload_handle::{invalid, Handle};

/// A file being written.
pub trait FileWriter: Write + Send {
    /// Makes everything written durable.
    fn finish(self: Box<Self>) -> io::Result<Finished>;
}

/// A file [`FileWriter::finish`] made durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finished {
    /// Its size in bytes.
    pub bytes: u64,
    pub handle: FileHandle,
}

/// What [`Storage::publish`] needs to find a finished file, as the commit record keeps
/// it (one line of text, [`FileHandle::encode`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileHandle {
    /// A file under its in-progress name on a filesystem.
    InProgress(PathBuf),
    /// A finished multipart upload not completed yet (object storage).
    Upload(Handle),
}

impl FileHandle {
    /// The in-progress name: the file itself, or the upload's marker.
    pub fn path(&self) -> &Path {
        match self {
            FileHandle::InProgress(path) => path,
            FileHandle::Upload(handle) => &handle.marker,
        }
    }

    /// The record's text: the path, or the upload's fields after the marker's path.
    pub fn encode(&self) -> String {
        match self {
            FileHandle::InProgress(path) => path.display().to_string(),
            FileHandle::Upload(handle) => handle.encode(),
        }
    }

    pub fn decode(text: &str) -> io::Result<FileHandle> {
        Ok(match Handle::decode(text)? {
            Some(handle) => FileHandle::Upload(handle),
            None => FileHandle::InProgress(PathBuf::from(text)),
        })
    }
}

/// What [`Storage::publish`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Published {
    /// Visible now (or was already).
    Done,
    /// Another file has the final name; nothing was replaced.
    NameTaken,
    /// Under neither name: lost after it was recorded.
    Missing,
}

/// One entry of a folder listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub path: PathBuf,
    pub is_dir: bool,
}

/// The warehouse's files (see the module docs for the contract).
pub trait Storage: Send + Sync {
    /// Creates a new file (and its folders) for writing under its in-progress name
    /// `hidden`; it will be published as `visible`.
    fn create(&self, hidden: &Path, visible: &Path) -> io::Result<Box<dyn FileWriter>>;
    /// Makes the finished file `handle` names visible as `visible`.
    fn publish(&self, handle: &FileHandle, visible: &Path) -> io::Result<Published>;
    /// Makes the names in each of `folders` durable.
    fn sync_folders(&self, folders: &BTreeSet<&Path>) -> io::Result<()>;
    /// The entries of a folder; none when it does not exist.
    fn list(&self, folder: &Path) -> io::Result<Vec<Entry>>;
    /// Removes a file; false when there was none.
    fn remove(&self, path: &Path) -> io::Result<bool>;
    /// Removes a folder and everything in it; fine when there is none.
    fn remove_folder(&self, folder: &Path) -> io::Result<()>;
    /// A whole small file; `None` when there is none.
    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>>;
    /// Replaces a small file whole: readers see the old or the new content, never a
    /// mix. `durable` also waits until the new content survives a power cut.
    fn replace(&self, path: &Path, bytes: &[u8], durable: bool) -> io::Result<()>;
}

/// A local or mounted POSIX filesystem. Publishing is a hard link followed by removing
/// the in-progress name: unlike a rename, a link never replaces an existing file.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalFs;

struct LocalFile(File, PathBuf);

impl Write for LocalFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl FileWriter for LocalFile {
    fn finish(self: Box<Self>) -> io::Result<Finished> {
        self.0.sync_all()?;
        Ok(Finished {
            bytes: self.0.metadata()?.len(),
            handle: FileHandle::InProgress(self.1),
        })
    }
}

fn ignore_not_found<T>(result: io::Result<T>, absent: T) -> io::Result<T> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(absent),
        other => other,
    }
}

impl LocalFs {
    fn same_file(a: &Path, b: &Path) -> io::Result<bool> {
        let (a, b) = (fs::metadata(a)?, fs::metadata(b)?);
        Ok(a.dev() == b.dev() && a.ino() == b.ino())
    }
}

impl Storage for LocalFs {
    fn create(&self, path: &Path, _visible: &Path) -> io::Result<Box<dyn FileWriter>> {
        if let Some(folder) = path.parent() {
            fs::create_dir_all(folder)?;
        }
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(Box::new(LocalFile(file, path.to_path_buf())))
    }

    fn publish(&self, handle: &FileHandle, visible: &Path) -> io::Result<Published> {
        let FileHandle::InProgress(hidden) = handle else {
            return Err(invalid(format!(
                "{} names an upload, not a file of this folder",
                handle.encode()
            )));
        };
        match fs::hard_link(hidden, visible) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                match Self::same_file(hidden, visible) {
                    Ok(true) => {}
                    // The in-progress name is gone since: published meanwhile.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Published::Done),
                    Ok(false) => return Ok(Published::NameTaken),
                    Err(e) => return Err(e),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(if visible.exists() {
                    Published::Done
                } else {
                    Published::Missing
                });
            }
            Err(e) => return Err(e),
        }
        ignore_not_found(fs::remove_file(hidden), ())?;
        Ok(Published::Done)
    }

    fn sync_folders(&self, folders: &BTreeSet<&Path>) -> io::Result<()> {
        for folder in folders {
            File::open(folder)?.sync_all()?;
        }
        Ok(())
    }

    fn list(&self, folder: &Path) -> io::Result<Vec<Entry>> {
        let entries = match fs::read_dir(folder) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        entries
            .map(|entry| {
                let entry = entry?;
                Ok(Entry {
                    path: entry.path(),
                    is_dir: entry.file_type()?.is_dir(),
                })
            })
            .collect()
    }

    fn remove(&self, path: &Path) -> io::Result<bool> {
        ignore_not_found(fs::remove_file(path).map(|()| true), false)
    }

    fn remove_folder(&self, folder: &Path) -> io::Result<()> {
        ignore_not_found(fs::remove_dir_all(folder), ())
    }

    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        ignore_not_found(fs::read(path).map(Some), None)
    }

    fn replace(&self, path: &Path, bytes: &[u8], durable: bool) -> io::Result<()> {
        let folder = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(folder)?;
        let temporary = path.with_extension("next");
        let mut file = File::create(&temporary)?;
        file.write_all(bytes)?;
        if durable {
            file.sync_all()?;
        }
        fs::rename(&temporary, path)?;
        if durable {
            File::open(folder)?.sync_all()?;
        }
        Ok(())
    }
}

/// Makes the names of `files` durable (syncs the folders holding them).
pub fn sync_parents<'a>(
    storage: &dyn Storage,
    files: impl Iterator<Item = &'a Path>,
) -> anyhow::Result<()> {
    let folders: BTreeSet<&Path> = files.filter_map(|f| f.parent()).collect();
    storage
        .sync_folders(&folders)
        .with_context(|| format!("fsync of the folders {folders:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishing_links_once_and_never_replaces_another_file() {
        let dir = tempfile::tempdir().unwrap();
        let (hidden, visible) = (dir.path().join(".a.inprogress"), dir.path().join("a"));
        let fs = LocalFs;
        let mut file = fs.create(&hidden, &visible).unwrap();
        file.write_all(b"rows").unwrap();
        let finished = file.finish().unwrap();
        let handle = FileHandle::InProgress(hidden.clone());
        assert_eq!((finished.bytes, &finished.handle), (4, &handle));
        assert!(
            fs.create(&hidden, &visible).is_err(),
            "never truncates a file"
        );
        assert_eq!(fs.publish(&handle, &visible).unwrap(), Published::Done);
        assert_eq!(fs.publish(&handle, &visible).unwrap(), Published::Done);
        assert!(!hidden.exists());
        std::fs::write(&hidden, b"other").unwrap();
        assert_eq!(fs.publish(&handle, &visible).unwrap(), Published::NameTaken);
        assert_eq!(std::fs::read(&visible).unwrap(), b"rows");
        let lost = dir.path().join("lost");
        let never = FileHandle::InProgress(dir.path().join(".lost"));
        assert_eq!(fs.publish(&never, &lost).unwrap(), Published::Missing);
    }

    #[test]
    fn small_files_are_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x/marks");
        assert_eq!(LocalFs.read(&path).unwrap(), None);
        LocalFs.replace(&path, b"one", true).unwrap();
        LocalFs.replace(&path, b"two", false).unwrap();
        assert_eq!(LocalFs.read(&path).unwrap().unwrap(), b"two");
        assert_eq!(LocalFs.list(&dir.path().join("x")).unwrap().len(), 1);
        assert!(LocalFs.remove(&path).unwrap());
        assert!(!LocalFs.remove(&path).unwrap());
        LocalFs.remove_folder(&dir.path().join("x")).unwrap();
        assert!(LocalFs.list(&dir.path().join("x")).unwrap().is_empty());
    }
}
