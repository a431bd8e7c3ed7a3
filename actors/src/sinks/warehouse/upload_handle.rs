//! The handle of a finished multipart upload (`object_storage.rs`), in the form a
//! warehouse commit record stores it: what publishing needs to complete the upload
//! after a crash, with nothing but the record.

use std::io;
use std::path::PathBuf;

use object_store::path::Path as Key;

pub fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// A finished upload, as a commit record stores it: the marker's path, then
/// `#key#upload#size#etag,etag,…` (keys, upload ids and ETags never hold `#`, `,`, tabs
/// or newlines; [`Handle::new`] refuses them if one ever did).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handle {
    pub marker: PathBuf,
    pub key: Key,
    pub upload: String,
    pub size: u64,
    pub parts: Vec<String>,
}

impl Handle {
    /// A handle the record format can hold.
    pub fn new(
        marker: PathBuf,
        key: Key,
        upload: String,
        size: u64,
        parts: Vec<String>,
    ) -> io::Result<Handle> {
        let clean = |s: &str| !s.contains(['#', ',', '\t', '\n']);
        if !clean(key.as_ref()) || !clean(&upload) || !parts.iter().all(|p| clean(p)) {
            return Err(invalid(format!(
                "the key, upload id or an ETag of {key} holds a reserved character"
            )));
        }
        Ok(Handle {
            marker,
            key,
            upload,
            size,
            parts,
        })
    }

    pub fn encode(&self) -> String {
        format!(
            "{}#{}#{}#{}#{}",
            self.marker.display(),
            self.key,
            self.upload,
            self.size,
            self.parts.join(",")
        )
    }

    /// `None` when `text` is a plain path (a marker), not a handle.
    pub fn decode(text: &str) -> io::Result<Option<Handle>> {
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
