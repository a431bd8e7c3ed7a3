//! The warehouse's configuration ([`WarehouseConfig`]) and, for a warehouse on
//! S3-compatible object storage, how to reach the bucket ([`S3Config`]).

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarehouseConfig {
    /// Where the warehouse lives, one sub-folder per table (`ods_anchor_log`,
    /// `dead_letter`, …): a local (or mounted) folder, or `s3://bucket/prefix` on
    /// S3-compatible object storage (then see `warehouse.s3`).
    pub root: String,
    /// A file is rolled (closed and published) at the next checkpoint once it reaches
    /// this many bytes.
    pub target_file_bytes: u64,
    /// A file is rolled at the next checkpoint once it has been open this many seconds;
    /// 0 rolls at every checkpoint (Flink's bulk-format file sink), so the warehouse is
    /// as fresh as Redis at the price of a file per checkpoint.
    pub roll_interval_secs: u64,
    /// Rows per Parquet row group; bounds the memory an open file buffers.
    pub row_group_rows: usize,
    /// Most files open for writing at once. Data spread over more folders (event times
    /// over many hours) closes the longest-idle file early; it is published with the
    /// rest at the next roll. Bounds the writers' memory whatever the event times.
    pub max_open_files: usize,
    /// Partition commit: once the watermark passes the end of an `ods_anchor_log` hour
    /// folder (or a `dws_template_state_1m` day folder, plus the allowed lateness) by
    /// this many milliseconds, `_SUCCESS` is written into it and the hook runs.
    pub partition_commit_delay_ms: u64,
    /// Command run once per committed folder by `sh -c`, with `ANCHORFLOW_TABLE`,
    /// `ANCHORFLOW_PARTITION_PATH`, `ANCHORFLOW_DT` and `ANCHORFLOW_HOUR` (empty for a
    /// day folder) in its environment, e.g. a metastore `ADD PARTITION`. Empty: none.
    pub partition_commit_hook: String,
    /// Seconds the hook may run before it is killed and retried at a later checkpoint.
    pub partition_commit_hook_timeout_secs: u64,
    /// How to reach the bucket when `root` is `s3://…`; ignored otherwise.
    pub s3: S3Config,
}

impl Default for WarehouseConfig {
    fn default() -> Self {
        WarehouseConfig {
            root: "./warehouse".into(),
            target_file_bytes: 128 << 20,
            roll_interval_secs: 60,
            row_group_rows: 64 * 1024,
            max_open_files: 64,
            partition_commit_delay_ms: 0,
            partition_commit_hook: String::new(),
            partition_commit_hook_timeout_secs: 60,
            s3: S3Config::default(),
        }
    }
}

/// An S3-compatible bucket (AWS S3, MinIO, SeaweedFS, Ceph, OSS, COS). Settings left
/// empty come from the standard AWS environment (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT`) or, on
/// AWS, from the instance or container credentials.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// The service's URL, e.g. `http://127.0.0.1:8333`; empty for AWS itself.
    pub endpoint: String,
    /// The bucket's region (`us-east-1` when empty and not in the environment).
    pub region: String,
    /// Path-style addressing (`endpoint/bucket/key`), which most self-hosted stores
    /// need; false for virtual-hosted style (`bucket.endpoint/key`).
    pub path_style: bool,
    /// Allow a plain `http://` endpoint (a store on a private network or loopback).
    pub allow_http: bool,
    /// Access key id; empty: from the environment.
    pub access_key_id: String,
    /// Secret access key; empty: from the environment. Never printed.
    pub secret_access_key: String,
    /// Size of each uploaded part of a file, in MiB (at least 5, S3's minimum): what
    /// one open file buffers before it is sent.
    pub part_size_mb: u64,
    /// Complete each file's upload with `If-None-Match: *`, so that the store itself
    /// refuses to replace an object already under the name (AWS S3 and SeaweedFS
    /// honour it); set false only for a store that rejects the header (a
    /// publish then fails with its answer), and publishing only looks before completing.
    pub conditional_complete: bool,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: String::new(),
            region: String::new(),
            path_style: false,
            allow_http: false,
            access_key_id: String::new(),
            secret_access_key: String::new(),
            part_size_mb: 5,
            conditional_complete: true,
        }
    }
}

impl S3Config {
    /// The same settings with the secret replaced, for display.
    pub fn redacted(&self) -> S3Config {
        let mut shown = self.clone();
        if !shown.secret_access_key.is_empty() {
            shown.secret_access_key = "***".into();
        }
        shown
    }
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = self.redacted();
        f.debug_struct("S3Config")
            .field("endpoint", &shown.endpoint)
            .field("region", &shown.region)
            .field("path_style", &shown.path_style)
            .field("allow_http", &shown.allow_http)
            .field("access_key_id", &shown.access_key_id)
            .field("secret_access_key", &shown.secret_access_key)
            .field("part_size_mb", &shown.part_size_mb)
            .field("conditional_complete", &shown.conditional_complete)
            .finish()
    }
}
