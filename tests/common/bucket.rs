//! The S3 side of the test ground: the SeaweedFS bucket `scripts/test-env.sh` starts,
//! the settings that point an instance at it, and a copy of a warehouse prefix into a
//! local folder, read with `object_store` on its own (not through anchorflow's
//! storage), so that the oracle checks the bucket with the same code as a folder.

use std::path::Path;

use futures::TryStreamExt as _;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt as _};

use super::service;

/// `--set` assignments that put an instance's warehouse at `s3://bucket/{prefix}`.
pub fn s3_sets(prefix: &str) -> Vec<String> {
    vec![
        format!(
            "warehouse.root=s3://{}/{prefix}",
            service("ANCHORFLOW_TEST_S3_BUCKET")
        ),
        format!(
            "warehouse.s3.endpoint={}",
            service("ANCHORFLOW_TEST_S3_ENDPOINT")
        ),
        "warehouse.s3.region=us-east-1".into(),
        "warehouse.s3.path_style=true".into(),
        "warehouse.s3.allow_http=true".into(),
        format!(
            "warehouse.s3.access_key_id={}",
            service("ANCHORFLOW_TEST_S3_ACCESS_KEY_ID")
        ),
        format!(
            "warehouse.s3.secret_access_key={}",
            service("ANCHORFLOW_TEST_S3_SECRET_ACCESS_KEY")
        ),
        "warehouse.s3.part_size_mb=5".into(),
    ]
}

/// How to reach the test bucket.
pub fn s3_config() -> anchorflow_actors::config::S3Config {
    anchorflow_actors::config::S3Config {
        endpoint: service("ANCHORFLOW_TEST_S3_ENDPOINT"),
        region: "us-east-1".into(),
        path_style: true,
        allow_http: true,
        access_key_id: service("ANCHORFLOW_TEST_S3_ACCESS_KEY_ID"),
        secret_access_key: service("ANCHORFLOW_TEST_S3_SECRET_ACCESS_KEY"),
        part_size_mb: 5,
        conditional_complete: true,
    }
}

/// `s3://bucket/{prefix}` in the test bucket.
pub fn s3_root(prefix: &str) -> String {
    format!("s3://{}/{prefix}", service("ANCHORFLOW_TEST_S3_BUCKET"))
}

/// Puts an in-process pipeline's warehouse at `s3://bucket/{prefix}`.
pub fn use_bucket(config: &mut anchorflow_actors::config::Config, prefix: &str) {
    config.warehouse.root = s3_root(prefix);
    config.warehouse.s3 = s3_config();
}

/// Copies every object under `prefix` into `into`, keeping the layout (a directory
/// marker some stores list is skipped). Returns how many objects it copied.
pub fn download(prefix: &str, into: &Path) -> usize {
    let store = AmazonS3Builder::new()
        .with_bucket_name(service("ANCHORFLOW_TEST_S3_BUCKET"))
        .with_endpoint(service("ANCHORFLOW_TEST_S3_ENDPOINT"))
        .with_region("us-east-1")
        .with_allow_http(true)
        .with_access_key_id(service("ANCHORFLOW_TEST_S3_ACCESS_KEY_ID"))
        .with_secret_access_key(service("ANCHORFLOW_TEST_S3_SECRET_ACCESS_KEY"))
        .build()
        .expect("the test bucket");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let root = Key::from(prefix);
    runtime.block_on(async {
        let objects: Vec<_> = store.list(Some(&root)).try_collect().await.unwrap();
        let mut copied = 0;
        for object in objects {
            let Some(parts) = object.location.prefix_match(&root) else {
                continue;
            };
            let relative: Vec<String> = parts.map(|p| p.as_ref().to_string()).collect();
            if relative.is_empty() || object.size == 0 && !relative.last().unwrap().starts_with('_')
            {
                continue;
            }
            let local = relative
                .iter()
                .fold(into.to_path_buf(), |p, part| p.join(part));
            std::fs::create_dir_all(local.parent().unwrap()).unwrap();
            let bytes = store
                .get(&object.location)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            std::fs::write(&local, &bytes).unwrap();
            copied += 1;
        }
        copied
    })
}
