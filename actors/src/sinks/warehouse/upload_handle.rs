//! The handle of a finished multipart upload (`object_storage.rs`), in the form a
//! warehouse commit record stores it: what publishing needs to complete the upload
//! after a crash, with nothing but the record.

use std::io;
use std::path::{Path, PathBuf};

use object_store::path::Path as Key;

pub fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// A finished upload, as a commit record stores it: the marker's path, then
/// `#key#upload#size#etag,etag,…` (keys, upload ids and ETags never hold `#`, `,`, tabs
/// or newlines; `encode` refuses them if one ever did).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handle {
    pub marker: PathBuf,
    pub key: Key,
    pub upload: String,
    pub size: u64,
    pub parts: Vec<String>,
}

impl Handle {
    pub fn encode(&self) -> io::Result<PathBuf> {
        let clean = |s: &str| !s.contains(['#', ',', '\t', '\n']);
        let key = self.key.to_string();
        if !clean(&key) || !clean(&self.upload) || !self.parts.iter().all(|p| clean(p)) {
            return Err(invalid(format!(
                "the key, upload id or an ETag of {key} holds a reserved character"
            )));
        }
        Ok(PathBuf::from(format!(
            "{}#{key}#{}#{}#{}",
            self.marker.display(),
            self.upload,
            self.size,
            self.parts.join(",")
        )))
    }

    /// `None` when `hidden` is a plain path (a marker), not a handle.
    pub fn decode(hidden: &Path) -> io::Result<Option<Handle>> {
        let text = hidden.to_string_lossy();
        let fields: Vec<&str> = text.splitn(5, '#').collect();
        let [marker, key, upload, size, parts] = fields[..] else {
            return Ok(None);
        };
        Ok(Some(Handle {
            marker: PathBuf::from(marker),
            key: Key::from(key),
            upload: upload.to_string(),
            size: size
                .parse()
                .map_err(|_| invalid(format!("malformed upload handle {text}")))?,
            parts: parts
                .split(',')
                .filter(|p| !p.is_empty())
                .map(String::from)
                .collect(),
        }))
    }
}
