//! The warehouse on S3-compatible object storage: [`ObjectStorage`], the other
//! [`Storage`] (the contract is in `storage.rs`), through the `object_store` crate.
//!
//! Nothing is renamed. A file is a multipart upload to its final key, invisible until
//! it is completed. While it is written, a small *marker* object under the file's
//! in-progress name (`.{instance}.{run}.{seq}.parquet.inprogress`) holds the upload's
//! id, so that a crashed run's uploads are found by the same listing as on a filesystem
//! and aborted. Parts of `warehouse.s3.part_size_mb` are sent as the file grows (one
//! part buffered per open file, never a whole file); [`FileWriter::finish`] sends the
//! last one and returns a *handle* naming the marker, the upload, the size and the
//! parts' ETags. The warehouse records the handle in Redis before anything is completed
//! (`publish.rs`); publishing completes the upload and deletes the marker, and finding
//! the object already there with the recorded size (completed before) is success.
//!
//! Never replacing a published file: markers are created with `If-None-Match`
//! ([`PutMode::Create`]), and uploads are completed with `If-None-Match: *`
//! (`complete_upload.rs`, since `object_store`'s low-level multipart API cannot send
//! it), so the store itself refuses to complete over an object that is already there:
//! an object under the name with another size is [`Published::NameTaken`]. Final names
//! also carry the run's random id (`writer.rs`), so only the record's own upload ever
//! completes to a name. A store that rejects the condition can be told not to send it
//! (`warehouse.s3.conditional_complete = false`); publishing then only looks first.
//!
//! The trait is synchronous (a sink waits for its files, as on a filesystem); the
//! requests run on a small runtime of their own, which the calling thread waits on.

use std::collections::BTreeSet;
use std::future::Future;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::Context as _;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as Key;
use object_store::{GetOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

use crate::config::S3Config;
use crate::sinks::warehouse::complete_upload::ConditionalCompleter;
use crate::sinks::warehouse::storage::{
    Entry, FileHandle, FileWriter, Finished, Published, Storage,
};
use crate::sinks::warehouse::upload_handle::{invalid, Handle};

/// The runtime every object-store request runs on; never dropped (an actor thread may
/// hold the last handle to the storage, and a runtime cannot be dropped there).
fn runtime() -> io::Result<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(runtime) = RUNTIME.get() {
        return Ok(runtime);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("object-store")
        .enable_all()
        .build()?;
    Ok(RUNTIME.get_or_init(|| runtime))
}

/// Runs `request` on the object-store runtime and waits for it on this thread.
fn block<T: Send + 'static>(
    request: impl Future<Output = object_store::Result<T>> + Send + 'static,
) -> io::Result<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime()?.spawn(async move {
        let _ = tx.send(request.await);
    });
    rx.recv()
        .map_err(|_| io::Error::other("the object-store runtime stopped"))?
        .map_err(to_io)
}

fn to_io(error: object_store::Error) -> io::Error {
    let kind = match &error {
        object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
            io::ErrorKind::AlreadyExists
        }
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, error)
}

/// A bucket (and a prefix in it) holding the warehouse; paths are
/// `s3://bucket/prefix/...`, as `warehouse.root` gives them.
#[derive(Clone, Debug)]
pub struct ObjectStorage {
    s3: Arc<AmazonS3>,
    root: PathBuf,
    prefix: Key,
    part_size: usize,
    /// Sends completions with `If-None-Match: *`; `None` when the configuration says
    /// the store rejects that condition.
    completer: Option<Arc<ConditionalCompleter>>,
}

impl ObjectStorage {
    /// The bucket of `root` (`s3://bucket/prefix`), reached as `config` says.
    pub fn new(root: &str, config: &S3Config) -> anyhow::Result<Self> {
        let rest = root
            .strip_prefix("s3://")
            .with_context(|| format!("{root} is not an s3:// location"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_virtual_hosted_style_request(!config.path_style)
            .with_allow_http(config.allow_http);
        let settings = [
            (
                &config.endpoint,
                AmazonS3Builder::with_endpoint as fn(_, String) -> _,
            ),
            (&config.region, AmazonS3Builder::with_region),
            (&config.access_key_id, AmazonS3Builder::with_access_key_id),
            (
                &config.secret_access_key,
                AmazonS3Builder::with_secret_access_key,
            ),
        ];
        for (value, set) in settings {
            if !value.is_empty() {
                builder = set(builder, value.clone());
            }
        }
        let completer = match config.conditional_complete {
            true => Some(Arc::new(
                ConditionalCompleter::new(&builder, config.allow_http)
                    .with_context(|| format!("configuring the bucket of {root}"))?,
            )),
            false => None,
        };
        let s3 = builder
            .build()
            .with_context(|| format!("configuring the bucket of {root}"))?;
        Ok(ObjectStorage {
            s3: Arc::new(s3),
            root: PathBuf::from(root.trim_end_matches('/')),
            prefix: Key::from(prefix.trim_matches('/')),
            part_size: (config.part_size_mb.max(5) << 20) as usize,
            completer,
        })
    }

    /// The object key of a path under the warehouse root.
    pub fn key(&self, path: &Path) -> io::Result<Key> {
        let relative = path.strip_prefix(&self.root).map_err(|_| {
            invalid(format!(
                "{} is outside the warehouse {}",
                path.display(),
                self.root.display()
            ))
        })?;
        Ok(relative
            .components()
            .fold(self.prefix.clone(), |key, part| {
                key.join(part.as_os_str().to_string_lossy().as_ref())
            }))
    }

    fn path(&self, key: &Key) -> PathBuf {
        let parts = key.prefix_match(&self.prefix).into_iter().flatten();
        parts.fold(self.root.clone(), |path, part| path.join(part.as_ref()))
    }

    fn head(&self, key: &Key) -> io::Result<Option<u64>> {
        let (s3, key) = (self.s3.clone(), key.clone());
        let options = GetOptions {
            head: true,
            ..GetOptions::default()
        };
        match block(async move { s3.get_opts(&key, options).await }) {
            Ok(found) => Ok(Some(found.meta.size)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn put(&self, key: &Key, bytes: Vec<u8>, mode: PutMode) -> io::Result<()> {
        let (s3, key) = (self.s3.clone(), key.clone());
        block(async move {
            s3.put_opts(&key, PutPayload::from(bytes), PutOptions::from(mode))
                .await
        })
        .map(drop)
    }

    fn delete(&self, key: &Key) -> io::Result<()> {
        let (s3, key) = (self.s3.clone(), key.clone());
        block(async move { s3.delete(&key).await })
    }

    /// Completes `upload` to `key` from its parts' ETags: with `If-None-Match: *` unless
    /// the configuration turned the condition off. An object already under `key` makes
    /// the store refuse (`AlreadyExists`); the caller looks at what is there.
    pub fn complete(&self, key: &Key, upload: &str, parts: &[String]) -> io::Result<()> {
        let (s3, key, upload, parts) = (
            self.s3.clone(),
            key.clone(),
            upload.to_string(),
            parts.to_vec(),
        );
        match self.completer.clone() {
            Some(completer) => {
                block(async move { completer.complete(s3, &key, &upload, &parts).await })
            }
            None => block(async move {
                let parts = parts.into_iter().map(|content_id| PartId { content_id });
                s3.complete_multipart(&key, &upload, parts.collect()).await
            })
            .map(drop),
        }
    }

    /// Aborts the upload a marker names, then deletes the marker.
    fn abandon(&self, handle: &Handle) -> io::Result<()> {
        let (s3, key, upload) = (self.s3.clone(), handle.key.clone(), handle.upload.clone());
        match block(async move { s3.abort_multipart(&key, &upload).await }) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        self.delete(&self.key(&handle.marker)?)
    }

    /// What a marker says about its upload.
    fn handle(&self, hidden: &Path) -> io::Result<Option<Handle>> {
        let Some(bytes) = self.read(hidden)? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&bytes);
        let (key, upload) = text
            .split_once('\n')
            .ok_or_else(|| invalid(format!("malformed upload marker {}", hidden.display())))?;
        Ok(Some(Handle {
            marker: hidden.to_path_buf(),
            key: Key::from(key),
            upload: upload.trim().to_string(),
            size: 0,
            parts: Vec::new(),
        }))
    }
}

/// A file being uploaded.
struct Upload {
    storage: ObjectStorage,
    marker: PathBuf,
    key: Key,
    upload: String,
    buffer: Vec<u8>,
    parts: Vec<String>,
    size: u64,
}

impl Upload {
    fn send_part(&mut self) -> io::Result<()> {
        let data = std::mem::take(&mut self.buffer);
        let (s3, key, upload, index) = (
            self.storage.s3.clone(),
            self.key.clone(),
            self.upload.clone(),
            self.parts.len(),
        );
        let part = block(async move {
            s3.put_part(&key, &upload, index, PutPayload::from(data))
                .await
        })?;
        self.parts.push(part.content_id);
        Ok(())
    }
}

impl Write for Upload {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(buf);
        self.size += buf.len() as u64;
        if self.buffer.len() >= self.storage.part_size {
            self.send_part()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl FileWriter for Upload {
    fn finish(mut self: Box<Self>) -> io::Result<Finished> {
        if !self.buffer.is_empty() || self.parts.is_empty() {
            self.send_part()?;
        }
        let handle = Handle::new(
            self.marker.clone(),
            self.key.clone(),
            self.upload.clone(),
            self.size,
            std::mem::take(&mut self.parts),
        )?;
        Ok(Finished {
            bytes: self.size,
            handle: FileHandle::Upload(handle),
        })
    }
}

impl Storage for ObjectStorage {
    fn create(&self, hidden: &Path, visible: &Path) -> io::Result<Box<dyn FileWriter>> {
        let key = self.key(visible)?;
        let (s3, target) = (self.s3.clone(), key.clone());
        let upload = block(async move { s3.create_multipart(&target).await })?;
        // The marker first names the upload, so that a crash leaves nothing unfound.
        let marker = format!("{key}\n{upload}\n").into_bytes();
        self.put(&self.key(hidden)?, marker, PutMode::Create)?;
        Ok(Box::new(Upload {
            storage: self.clone(),
            marker: hidden.to_path_buf(),
            key,
            upload,
            buffer: Vec::with_capacity(self.part_size),
            parts: Vec::new(),
            size: 0,
        }))
    }

    fn publish(&self, handle: &FileHandle, visible: &Path) -> io::Result<Published> {
        let FileHandle::Upload(handle) = handle else {
            return Err(invalid(format!(
                "{} is not an upload handle",
                handle.path().display()
            )));
        };
        let key = self.key(visible)?;
        // Published before (a roll-forward runs again), or another file has the name.
        if let Some(size) = self.head(&key)? {
            if size != handle.size {
                return Ok(Published::NameTaken);
            }
            self.delete(&self.key(&handle.marker)?)?;
            return Ok(Published::Done);
        }
        // Completed meanwhile by another claimer, or never: the object tells.
        if let Err(error) = self.complete(&key, &handle.upload, &handle.parts) {
            match self.head(&key)? {
                Some(size) if size == handle.size => {}
                Some(_) => return Ok(Published::NameTaken),
                None if error.kind() == io::ErrorKind::NotFound => return Ok(Published::Missing),
                None => return Err(error),
            }
        }
        self.delete(&self.key(&handle.marker)?)?;
        Ok(Published::Done)
    }

    /// Objects are durable once their request succeeded.
    fn sync_folders(&self, _folders: &BTreeSet<&Path>) -> io::Result<()> {
        Ok(())
    }

    fn list(&self, folder: &Path) -> io::Result<Vec<Entry>> {
        let (s3, prefix) = (self.s3.clone(), self.key(folder)?);
        let listed = prefix.clone();
        let listing = block(async move { s3.list_with_delimiter(Some(&listed)).await })?;
        // Some stores (SeaweedFS) list a folder's own directory marker in it.
        let folders = listing.common_prefixes.iter().filter(|key| **key != prefix);
        let files = listing.objects.iter().map(|object| &object.location);
        let files = files.filter(|key| **key != prefix);
        let folders = folders.map(|key| Entry {
            path: self.path(key),
            is_dir: true,
        });
        let files = files.map(|key| Entry {
            path: self.path(key),
            is_dir: false,
        });
        Ok(folders.chain(files).collect())
    }

    /// Removes a file; an in-progress file (a marker) also aborts its upload.
    fn remove(&self, path: &Path) -> io::Result<bool> {
        let name = path.to_string_lossy();
        if name.contains(".inprogress") {
            return match self.handle(path)? {
                Some(handle) => self.abandon(&handle).map(|()| true),
                None => Ok(false),
            };
        }
        let key = self.key(path)?;
        if self.head(&key)?.is_none() {
            return Ok(false);
        }
        self.delete(&key).map(|()| true)
    }

    fn remove_folder(&self, folder: &Path) -> io::Result<()> {
        for entry in self.list(folder)? {
            if entry.is_dir {
                self.remove_folder(&entry.path)?;
            } else {
                self.remove(&entry.path)?;
            }
        }
        Ok(())
    }

    fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        let (s3, key) = (self.s3.clone(), self.key(path)?);
        let read = block(async move {
            let found = s3.get_opts(&key, GetOptions::default()).await?;
            found.bytes().await
        });
        match read {
            Ok(bytes) => Ok(Some(bytes.to_vec())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// One PUT replaces an object whole; it is durable once it succeeded.
    fn replace(&self, path: &Path, bytes: &[u8], _durable: bool) -> io::Result<()> {
        self.put(&self.key(path)?, bytes.to_vec(), PutMode::Overwrite)
    }
}
