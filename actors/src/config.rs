//! Configuration types consumed by the actors.
//!
//! Every struct denies unknown fields and documents every field: the doc comments are
//! the user documentation (`config/anchorflow.toml` repeats them). Loading (TOML file,
//! `ANCHORFLOW_*` environment variables, `--set` flags) and the exit code for invalid
//! configuration live in the binary (`src/settings.rs`); this module only defines the
//! shape, the defaults and [`Config::validate`].

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::logic::decode::DecodeLimits;

mod validate;
mod warehouse;

pub use warehouse::{S3Config, WarehouseConfig};

/// The whole configuration of one anchorflow instance.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Which topic to read and how records are batched on the way in.
    pub source: SourceConfig,
    /// librdkafka properties passed through unchanged (`bootstrap.servers`,
    /// `security.protocol`, `sasl.*`, `ssl.*`, …). `group.id` comes from
    /// `source.group_id`; offset storing is always manual.
    pub kafka: KafkaProperties,
    /// Limits applied when decoding a record; a record that breaks one is dead-lettered.
    pub decode: DecodeLimits,
    /// Aggregation, checkpoints, shutdown.
    pub pipeline: PipelineConfig,
    /// The Redis sink (austin-compatible keys).
    pub redis: RedisConfig,
    /// The Parquet warehouse sink.
    pub warehouse: WarehouseConfig,
    /// Time zone used for `dt`/`hour` folders and for "end of the current day" TTLs.
    pub time: TimeConfig,
    /// The `/metrics`, `/healthz` and `/readyz` HTTP endpoint.
    pub metrics: MetricsConfig,
    /// Logging.
    pub log: LogConfig,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// Kafka topic holding austin `AnchorInfo` JSON records.
    pub topic: String,
    /// Consumer group id; instances with the same id share the partitions.
    pub group_id: String,
    /// Most records a partition batch holds before it is handed to its reader.
    pub batch_max_records: usize,
    /// Most payload bytes a partition batch holds before it is handed to its reader.
    pub batch_max_bytes: usize,
    /// Unique name of this instance among those sharing a group or a warehouse root;
    /// it prefixes this instance's in-progress files so that it cleans up only its
    /// own, and names its lease: a second live run of one id refuses to start (exit
    /// 73). Empty (the default): this host's name, so hosts deployed from one file
    /// differ.
    pub instance_id: String,
    /// When a fetch jumps over offsets, read again from further back before taking
    /// them as offsets without records, so that a broker that skipped records (one
    /// that answers a read inside a batch with the batches after it) loses none; a
    /// partition that gets nothing below its high watermark is searched the same way.
    /// Turn off only for a compacted or transactional topic, whose gaps are many and
    /// real: every gap is then taken at once (still counted in
    /// `anchorflow_offset_gaps_total`).
    pub verify_offset_gaps: bool,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            topic: "austinTraceLog".into(),
            group_id: "anchorflow".into(),
            batch_max_records: 4096,
            batch_max_bytes: 1 << 20,
            instance_id: host_instance_id(),
            verify_offset_gaps: true,
        }
    }
}

/// This host's name: the default instance id is made of it, and the instance lease
/// names the host of its run (`protocol/lease.rs`).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown-host".into())
}

/// This host's name as an instance id: letters, digits, '-' and '_' kept, anything
/// else turned into '-' (`anchorflow` if nothing is left).
pub fn host_instance_id() -> String {
    let name: String = hostname()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = name.trim_matches('-');
    if name.is_empty() {
        "anchorflow".into()
    } else {
        name.to_string()
    }
}

/// librdkafka properties; values whose key names a secret are redacted in `Debug`.
#[derive(Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct KafkaProperties(pub BTreeMap<String, String>);

impl KafkaProperties {
    /// Whether a librdkafka property holds a secret (password, secret, key material).
    pub fn is_secret(key: &str) -> bool {
        let key = key.to_ascii_lowercase();
        ["password", "secret", "ssl.key.pem", "keystore", "token"]
            .iter()
            .any(|needle| key.contains(needle))
    }

    /// The properties with secrets replaced by `***`, for display.
    pub fn redacted(&self) -> BTreeMap<String, String> {
        self.0
            .iter()
            .map(|(k, v)| {
                let v = if Self::is_secret(k) {
                    "***".to_string()
                } else {
                    v.clone()
                };
                (k.clone(), v)
            })
            .collect()
    }
}

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.redacted()).finish()
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Number of aggregator shards; 0 means one per CPU core.
    pub aggregator_shards: usize,
    /// Number of threads the partition readers run on; 0 means one per CPU core.
    pub reader_threads: usize,
    /// Milliseconds between checkpoints (flush aggregates, commit sinks, store offsets).
    pub checkpoint_interval_ms: u64,
    /// Seconds a graceful shutdown may take before the process exits non-zero.
    pub shutdown_timeout_secs: u64,
    /// Milliseconds a rebalance may spend checkpointing revoked partitions; must be
    /// below the consumer's `session.timeout.ms` (checked by `validate`).
    pub revoke_timeout_ms: u64,
    /// Records a partition may have read beyond what Redis has made durable; at this
    /// many the partition is paused until a checkpoint commits. Bounds what a stalled
    /// Redis leaves in memory (uncommitted aggregates and commit plans). The warehouse
    /// does not count here: rows it has not published are in its files and in row
    /// groups held to their own share of `memory_budget_mb`.
    pub max_uncommitted_records: u64,
    /// Memory the process may use for records in flight, in MiB: librdkafka's prefetch,
    /// batches on their way to the readers, input not yet durable in Redis, and the
    /// warehouse's open row groups are cut to shares of it (`runtime/memory.rs`), so
    /// RSS stays near it at any partition count and behind a slow sink. At least 32.
    pub memory_budget_mb: u64,
    /// Seconds a partition with records to read may keep its Redis fence unmoved (its
    /// warehouse fence: this plus `warehouse.roll_interval_secs`, as the warehouse
    /// publishes once per roll) before it is reported stalled: an error naming it and
    /// what it waits for, `anchorflow_stalled_partitions`, and `/readyz` not ready.
    pub stall_timeout_secs: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            aggregator_shards: 0,
            reader_threads: 0,
            checkpoint_interval_ms: 1000,
            shutdown_timeout_secs: 30,
            revoke_timeout_ms: 20_000,
            max_uncommitted_records: 100_000,
            memory_budget_mb: 256,
            stall_timeout_secs: 120,
        }
    }
}

impl PipelineConfig {
    pub fn memory(&self) -> crate::runtime::memory::MemoryBudget {
        crate::runtime::memory::MemoryBudget::from_mb(self.memory_budget_mb)
    }

    /// Shard count with 0 resolved to the number of cores.
    pub fn shards(&self) -> usize {
        resolve_cores(self.aggregator_shards)
    }

    /// Reader thread count with 0 resolved to the number of cores.
    pub fn readers(&self) -> usize {
        resolve_cores(self.reader_threads)
    }
}

fn resolve_cores(n: usize) -> usize {
    if n > 0 {
        n
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    }
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` for TLS.
    pub url: String,
    /// Prefix of the per-receiver list keys (austin-web reads them without a prefix).
    pub receiver_key_prefix: String,
    /// Prefix of the per-template hash keys (austin-web reads them without a prefix).
    pub template_key_prefix: String,
    /// Prefix of the per-message trace list keys.
    pub message_key_prefix: String,
    /// Time to live of the per-template hashes, in seconds (austin: 30 days).
    pub template_ttl_secs: u64,
    /// Time to live of the per-message trace lists, in seconds (austin: 3 days).
    pub message_ttl_secs: u64,
    /// Time to live of the per-template window series hashes
    /// (`anchorflow:series:{businessId}`), in seconds (30 days).
    pub series_ttl_secs: u64,
    /// Seconds to wait for a Redis reply before the commit is retried.
    pub command_timeout_secs: u64,
    /// Longest a single commit script may hold Redis, in milliseconds (austin-web reads
    /// the same Redis): a checkpoint too big for one script is split into several, each
    /// atomic with its own fences, and sized to 35 % of this at Redis's measured speed,
    /// which varies from script to script; window series too many for one script are
    /// staged by the final script and published in batches after it.
    pub max_commit_ms: u64,
    /// Benchmarks only: sleep this many times the commit's own duration after each
    /// commit, to emulate a slow sink. 0 disables.
    pub slowdown_factor: u32,
    /// Run against a Redis whose `maxmemory-policy` may evict keys without a time to
    /// live (`allkeys-*`). Such a policy can drop anchorflow's fences under memory
    /// pressure, and exactly-once with them, so by default it is refused at start
    /// (exit 78) and makes `/readyz` not ready if set later. Only for a Redis you know
    /// never reaches its `maxmemory`; evictions are logged and counted either way.
    pub allow_evicting_policy: bool,
    /// Certificates for a `rediss://` URL; without them the system's trust store
    /// verifies the server and no client certificate is sent.
    pub tls: RedisTls,
    /// How a commit's writes reach Redis: `script` (the default) as Lua scripts that
    /// check the fences themselves; `transaction` as `WATCH`/`MULTI`/`EXEC` of plain
    /// commands, fenced by what was read under `WATCH` (Redis 7.0 or later), which
    /// costs Redis less CPU per event and anchorflow more, and on Redis-heavy data
    /// exceeds the memory budget: for trials only (`docs/exactly-once.md`,
    /// `docs/benchmarks.md`).
    pub commit: CommitMode,
}

/// `redis.commit`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CommitMode {
    #[default]
    Script,
    Transaction,
}

/// TLS files for `rediss://` (PEM, named as Vector's `tls.*` options are).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisTls {
    /// The CA certificate that signed the server's, when the system's trust store
    /// does not hold it (a private CA).
    pub ca_file: Option<std::path::PathBuf>,
    /// This client's certificate, for a Redis with `tls-auth-clients` (needs `key_file`).
    pub crt_file: Option<std::path::PathBuf>,
    /// The private key of `crt_file`.
    pub key_file: Option<std::path::PathBuf>,
}

impl RedisTls {
    fn is_set(&self) -> bool {
        self != &RedisTls::default()
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            receiver_key_prefix: String::new(),
            template_key_prefix: String::new(),
            message_key_prefix: "Austin:MessageId:".into(),
            template_ttl_secs: 30 * 86_400,
            message_ttl_secs: 3 * 86_400,
            series_ttl_secs: 30 * 86_400,
            command_timeout_secs: 30,
            max_commit_ms: 100,
            slowdown_factor: 0,
            allow_evicting_policy: false,
            tls: RedisTls::default(),
            commit: CommitMode::default(),
        }
    }
}

impl RedisConfig {
    /// The URL with any password replaced by `***`.
    pub fn redacted_url(&self) -> String {
        redact_url_password(&self.url)
    }

    /// The client every connection to this Redis is opened from: the URL, and the
    /// TLS files read when any is set.
    pub fn client(&self) -> anyhow::Result<redis::Client> {
        use anyhow::Context as _;
        if !self.tls.is_set() {
            return redis::Client::open(self.url.as_str()).context("parsing redis.url");
        }
        let read = |field: &str, path: &Option<std::path::PathBuf>| {
            path.as_ref()
                .map(|path| {
                    std::fs::read(path)
                        .with_context(|| format!("reading redis.tls.{field} {}", path.display()))
                })
                .transpose()
        };
        let client_tls = match (
            read("crt_file", &self.tls.crt_file)?,
            read("key_file", &self.tls.key_file)?,
        ) {
            (Some(client_cert), Some(client_key)) => Some(redis::ClientTlsConfig {
                client_cert,
                client_key,
            }),
            (None, None) => None,
            _ => anyhow::bail!("redis.tls.crt_file and redis.tls.key_file go together"),
        };
        let certificates = redis::TlsCertificates {
            client_tls,
            root_cert: read("ca_file", &self.tls.ca_file)?,
        };
        redis::Client::build_with_tls(self.url.as_str(), certificates)
            .context("setting up TLS for redis.url (redis.tls.*)")
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.redacted_url())
            .field("receiver_key_prefix", &self.receiver_key_prefix)
            .field("template_key_prefix", &self.template_key_prefix)
            .field("message_key_prefix", &self.message_key_prefix)
            .field("template_ttl_secs", &self.template_ttl_secs)
            .field("message_ttl_secs", &self.message_ttl_secs)
            .field("series_ttl_secs", &self.series_ttl_secs)
            .field("command_timeout_secs", &self.command_timeout_secs)
            .field("max_commit_ms", &self.max_commit_ms)
            .field("slowdown_factor", &self.slowdown_factor)
            .field("allow_evicting_policy", &self.allow_evicting_policy)
            .field("tls", &self.tls)
            .field("commit", &self.commit)
            .finish()
    }
}

/// Replaces the password of `scheme://user:password@host` with `***`.
pub fn redact_url_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    let redacted = match userinfo.find(':') {
        Some(colon) => format!("{}:***", &userinfo[..colon]),
        None if userinfo.is_empty() => String::new(),
        // `redis://password@host` is how some clients spell a bare password.
        None => "***".to_string(),
    };
    format!("{}{}@{}", &url[..scheme_end + 3], redacted, &rest[at + 1..])
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeConfig {
    /// IANA time zone name (e.g. `Asia/Shanghai`, `UTC`).
    pub timezone: String,
    /// How far behind the largest event time seen a partition's watermark trails, in
    /// milliseconds (the out-of-orderness the stream may have).
    pub max_out_of_orderness_ms: u64,
    /// Milliseconds without records after which a partition is idle and no longer
    /// holds the watermark back.
    pub idle_timeout_ms: u64,
    /// Size of the tumbling windows of the series hash and `dws_template_state_1m`, in
    /// milliseconds. Below an hour windows align on the epoch (`ts - ts mod size`);
    /// hour multiples that divide a day align on local time in `timezone`.
    pub window_size_ms: u64,
    /// How long after its end a window still accepts events before it is emitted, in
    /// milliseconds; later events amend it (series) and add a correction row.
    pub allowed_lateness_ms: u64,
    /// Records whose event time is further ahead of processing time (Redis's clock)
    /// are dead-lettered as `timestamp_in_future`: a producer with a broken clock must
    /// not drag the watermark (and `_SUCCESS`) ahead of the data. 0 disables the bound.
    /// Default one hour, as Kafka's `log.message.timestamp.after.max.ms`.
    pub max_future_ms: u64,
    /// Records whose event time is further behind processing time are dead-lettered as
    /// `timestamp_too_old` (they would open folders and windows long complete).
    /// 0 (the default) disables the bound; raise it for a deliberate backfill.
    pub max_past_ms: u64,
}

impl Default for TimeConfig {
    fn default() -> Self {
        TimeConfig {
            timezone: "Asia/Shanghai".into(),
            max_out_of_orderness_ms: 5_000,
            idle_timeout_ms: 30_000,
            window_size_ms: 60_000,
            allowed_lateness_ms: 0,
            max_future_ms: 3_600_000,
            max_past_ms: 0,
        }
    }
}

impl TimeConfig {
    /// The parsed time zone; [`Config::validate`] guarantees it parses.
    pub fn tz(&self) -> chrono_tz::Tz {
        self.timezone.parse().unwrap_or(chrono_tz::UTC)
    }

    /// The bounds on event time against processing time.
    pub fn bounds(&self) -> crate::logic::decode::TimeBounds {
        crate::logic::decode::TimeBounds {
            max_future_ms: self.max_future_ms,
            max_past_ms: self.max_past_ms,
        }
    }

    /// The window layout this config describes.
    pub fn windows(&self) -> crate::logic::window::WindowSpec {
        crate::logic::window::WindowSpec::new(
            self.window_size_ms.min(i64::MAX as u64) as i64,
            self.allowed_lateness_ms.min(i64::MAX as u64) as i64,
            self.tz(),
        )
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the HTTP endpoint; empty disables it.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9898".into(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` (human-readable) or `json`.
    pub format: String,
    /// A `tracing` filter such as `info` or `anchorflow=debug,rdkafka=warn`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            level: "info".into(),
        }
    }
}

/// A configuration value that cannot work; names the field.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: `{field}`: {message}")]
pub struct ConfigError {
    /// Dotted path of the offending field, e.g. `redis.url`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        let mut config = Config::default();
        config
            .kafka
            .0
            .insert("bootstrap.servers".into(), "127.0.0.1:9092".into());
        config
    }

    #[test]
    fn defaults_with_brokers_are_valid() {
        valid().validate().expect("defaults are valid");
    }

    #[test]
    fn errors_name_the_field() {
        let mut config = valid();
        config.time.timezone = "Mars/Olympus".into();
        assert_eq!(config.validate().unwrap_err().field, "time.timezone");

        let mut config = valid();
        config.redis.url = "http://x".into();
        assert_eq!(config.validate().unwrap_err().field, "redis.url");

        for size in [0, 5 * 3_600_000, 2 * 86_400_000, 5_400_000] {
            let mut config = valid();
            config.time.window_size_ms = size;
            assert_eq!(
                config.validate().unwrap_err().field,
                "time.window_size_ms",
                "{size}"
            );
        }
        for size in [1, 300_000, 3_600_000, 6 * 3_600_000, 86_400_000] {
            let mut config = valid();
            config.time.window_size_ms = size;
            config.validate().expect("a valid window size");
        }

        for reserved in [
            "group.id",
            "enable.auto.offset.store",
            "enable.partition.eof",
        ] {
            let mut config = valid();
            config.kafka.0.insert(reserved.into(), "x".into());
            assert_eq!(
                config.validate().unwrap_err().field,
                format!("kafka.{reserved}")
            );
        }

        let mut config = valid();
        config
            .kafka
            .0
            .insert("session.timeout.ms".into(), "6000".into());
        assert_eq!(
            config.validate().unwrap_err().field,
            "pipeline.revoke_timeout_ms",
            "the default 20 s revoke bound exceeds a 6 s session"
        );
        config.pipeline.revoke_timeout_ms = 5000;
        assert!(config.validate().is_ok());

        let mut config = Config::default();
        config.pipeline.checkpoint_interval_ms = 1;
        assert_eq!(
            config.validate().unwrap_err().field,
            "kafka.bootstrap.servers"
        );
    }

    /// Everything `run` would refuse is refused here, naming the field: librdkafka's
    /// own verdict on a property, and an S3 endpoint that is no URL or is plain http
    /// without `allow_http`.
    #[test]
    fn what_run_would_refuse_is_refused_here() {
        let kafka = |key: &str, value: &str| {
            let mut config = valid();
            config.kafka.0.insert(key.into(), value.into());
            config.validate().err()
        };
        let e = kafka("no.such.property", "1").expect("an unknown property");
        assert_eq!(e.field, "kafka.no.such.property");
        assert!(e.message.contains("No such configuration property"), "{e}");
        let e = kafka("security.protocol", "bogus").expect("a bad value");
        assert_eq!(e.field, "kafka.security.protocol");
        assert!(
            e.message.contains("bogus") || e.message.contains("Invalid value"),
            "{e}"
        );
        assert!(kafka("security.protocol", "SASL_SSL").is_none());

        let s3 = |endpoint: &str, allow_http: bool| {
            let mut config = valid();
            config.warehouse.root = "s3://lake/anchorflow".into();
            config.warehouse.s3.endpoint = endpoint.into();
            config.warehouse.s3.allow_http = allow_http;
            config.validate().err()
        };
        let e = s3("http://minio:9000", false).expect("http without allow_http");
        assert_eq!(e.field, "warehouse.s3.endpoint");
        assert!(e.message.contains("allow_http"), "{e}");
        assert!(s3("http://minio:9000", true).is_none());
        assert!(s3("https://s3.example.com", false).is_none());
        let e = s3("notaurl", true).expect("not a URL");
        assert_eq!(e.field, "warehouse.s3.endpoint", "{e}");
    }

    #[test]
    fn secrets_never_reach_debug_output() {
        let mut config = valid();
        config
            .kafka
            .0
            .insert("sasl.password".into(), "hunter2".into());
        config.redis.url = "rediss://default:s3cret@cache:6380/2".into();
        config.warehouse.s3.secret_access_key = "bucket-s3cret".into();
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("rediss://default:***@cache:6380/2"),
            "{shown}"
        );
    }

    #[test]
    fn the_warehouse_is_a_folder_or_a_bucket() {
        let field = |root: &str, part_mb: u64| {
            let mut config = valid();
            config.warehouse.root = root.into();
            config.warehouse.s3.part_size_mb = part_mb;
            config.validate().err().map(|e| e.field)
        };
        assert_eq!(
            field("/data/warehouse", 1),
            None,
            "parts matter on a bucket only"
        );
        assert_eq!(field("s3://lake/anchorflow", 5), None);
        assert_eq!(field("s3://lake", 64), None);
        assert_eq!(field("s3://", 5).as_deref(), Some("warehouse.root"));
        assert_eq!(field("gs://lake/x", 5).as_deref(), Some("warehouse.root"));
        assert_eq!(
            field("s3://lake/x", 4).as_deref(),
            Some("warehouse.s3.part_size_mb")
        );
    }

    #[test]
    fn url_redaction_handles_every_userinfo_shape() {
        assert_eq!(redact_url_password("redis://h:1"), "redis://h:1");
        assert_eq!(redact_url_password("redis://:pw@h:1"), "redis://:***@h:1");
        assert_eq!(
            redact_url_password("redis://u:pw@h:1/0"),
            "redis://u:***@h:1/0"
        );
        assert_eq!(redact_url_password("redis://pw@h"), "redis://***@h");
    }
}
