//! The warehouse sink: the actor (`warehouse_sink.rs`), when a checkpoint publishes
//! (`roll.rs`), the files being written (`writer.rs`), publishing and crash cleanup
//! (`publish.rs`), what each instance published (`marks.rs`), `_SUCCESS` and the hook
//! (`partition_committer.rs`, `hook.rs`), and where the files live (`storage.rs`: a local folder, or
//! `object_storage.rs`: S3-compatible object storage, with `upload_handle.rs` for what a
//! record keeps of an upload and `complete_upload.rs` for the conditional completion
//! `object_store` cannot send).

pub mod complete_upload;
pub mod hook;
pub mod marks;
pub mod object_storage;
pub mod partition_committer;
pub mod publish;
pub mod roll;
pub mod storage;
pub mod upload_handle;
pub mod warehouse_sink;
pub mod writer;

use std::sync::Arc;

use crate::config::WarehouseConfig;
use crate::sinks::warehouse::object_storage::ObjectStorage;
use crate::sinks::warehouse::storage::{LocalFs, Storage};

/// The warehouse's storage: `s3://bucket/prefix` is object storage, anything else a
/// local folder.
pub fn open(config: &WarehouseConfig) -> anyhow::Result<Arc<dyn Storage>> {
    if config.root.starts_with("s3://") {
        let storage = ObjectStorage::new(&config.root, &config.s3)?;
        return Ok(Arc::new(storage));
    }
    Ok(Arc::new(LocalFs))
}
