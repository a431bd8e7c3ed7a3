//! [`Config::validate`]: what types alone cannot check, section by section. The error
//! names the first bad field; the binary exits 78 with it.

use crate::config::{Config, ConfigError};

fn positive(field: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        Err(ConfigError::new(field, "must be greater than 0"))
    } else {
        Ok(())
    }
}

fn not_empty(field: &str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        Err(ConfigError::new(field, "must not be empty"))
    } else {
        Ok(())
    }
}

/// An S3 endpoint must be an `http(s)://host[:port]` URL, and a plain `http://` one
/// needs `allow_http` (the object store refuses it otherwise, deep in a request).
fn validate_endpoint(s3: &crate::config::S3Config) -> Result<(), ConfigError> {
    let endpoint = s3.endpoint.trim();
    if endpoint.is_empty() {
        return Ok(());
    }
    let field = "warehouse.s3.endpoint";
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| ConfigError::new(field, format!("`{endpoint}` is not a URL: {e}")))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("https"), Some(_)) => Ok(()),
        (Some("http"), Some(_)) if s3.allow_http => Ok(()),
        (Some("http"), Some(_)) => Err(ConfigError::new(
            field,
            "is plain http://: set warehouse.s3.allow_http = true to allow it (a store on a private network or loopback), or use https://",
        )),
        _ => Err(ConfigError::new(
            field,
            format!("`{endpoint}` must be http(s)://host[:port]"),
        )),
    }
}

impl Config {
    /// Checks what types alone cannot; the error names the first bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_source()?;
        self.validate_kafka()?;
        self.validate_time()?;
        self.validate_pipeline()?;
        self.validate_redis()?;
        self.validate_warehouse()?;
        self.validate_outputs()
    }

    fn validate_source(&self) -> Result<(), ConfigError> {
        let source = &self.source;
        not_empty("source.topic", &source.topic)?;
        not_empty("source.group_id", &source.group_id)?;
        let id = &source.instance_id;
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ConfigError::new(
                "source.instance_id",
                "must be non-empty and use only letters, digits, '-' and '_'",
            ));
        }
        positive("source.batch_max_records", source.batch_max_records as u64)?;
        positive("source.batch_max_bytes", source.batch_max_bytes as u64)?;
        positive(
            "decode.max_record_bytes",
            self.decode.max_record_bytes as u64,
        )?;
        positive(
            "decode.max_nesting_depth",
            self.decode.max_nesting_depth as u64,
        )
    }

    fn validate_kafka(&self) -> Result<(), ConfigError> {
        if !self.kafka.0.contains_key("bootstrap.servers") {
            return Err(ConfigError::new("kafka.bootstrap.servers", "is required"));
        }
        for (reserved, why) in [
            ("group.id", "use source.group_id"),
            (
                "enable.auto.offset.store",
                "offsets are stored after sinks commit",
            ),
            (
                "enable.partition.eof",
                "the end-of-backlog checkpoint needs to know where each partition ends",
            ),
        ] {
            if self.kafka.0.contains_key(reserved) {
                return Err(ConfigError::new(
                    format!("kafka.{reserved}"),
                    format!("is managed by anchorflow ({why})"),
                ));
            }
        }
        // librdkafka checks every property's name and value as it is set, without
        // connecting: its own message names what is wrong.
        let mut client = rdkafka::ClientConfig::new();
        for (key, value) in &self.kafka.0 {
            client.set(key, value);
        }
        match client.create_native_config() {
            Ok(_) => Ok(()),
            Err(rdkafka::error::KafkaError::ClientConfig(_, description, key, _)) => {
                Err(ConfigError::new(format!("kafka.{key}"), description))
            }
            Err(other) => Err(ConfigError::new("kafka", other.to_string())),
        }
    }

    fn validate_time(&self) -> Result<(), ConfigError> {
        positive("time.idle_timeout_ms", self.time.idle_timeout_ms)?;
        positive("time.window_size_ms", self.time.window_size_ms)?;
        let size = self.time.window_size_ms;
        if size >= 3_600_000 && (size % 3_600_000 != 0 || 86_400_000 % size != 0) {
            return Err(ConfigError::new(
                "time.window_size_ms",
                "from one hour up must be a whole number of hours that divides a day (windows align on local time)",
            ));
        }
        if self.time.timezone.parse::<chrono_tz::Tz>().is_err() {
            return Err(ConfigError::new(
                "time.timezone",
                format!("`{}` is not an IANA time zone name", self.time.timezone),
            ));
        }
        Ok(())
    }

    fn validate_pipeline(&self) -> Result<(), ConfigError> {
        let pipeline = &self.pipeline;
        positive(
            "pipeline.checkpoint_interval_ms",
            pipeline.checkpoint_interval_ms,
        )?;
        positive(
            "pipeline.shutdown_timeout_secs",
            pipeline.shutdown_timeout_secs,
        )?;
        positive("pipeline.revoke_timeout_ms", pipeline.revoke_timeout_ms)?;
        if pipeline.memory_budget_mb < crate::runtime::memory::MIN_BUDGET_MB {
            return Err(ConfigError::new(
                "pipeline.memory_budget_mb",
                format!(
                    "must be at least {} (MiB)",
                    crate::runtime::memory::MIN_BUDGET_MB
                ),
            ));
        }
        if pipeline.max_uncommitted_records < self.source.batch_max_records as u64 {
            return Err(ConfigError::new(
                "pipeline.max_uncommitted_records",
                format!(
                    "must be at least source.batch_max_records ({})",
                    self.source.batch_max_records
                ),
            ));
        }
        // Revoked partitions are checkpointed inside the rebalance; if that takes longer
        // than the session, the group fences us first and the checkpoint is wasted.
        let session_ms = match self.kafka.0.get("session.timeout.ms") {
            Some(v) => v.trim().parse::<u64>().map_err(|_| {
                ConfigError::new(
                    "kafka.session.timeout.ms",
                    "must be a number of milliseconds",
                )
            })?,
            None => 45_000, // librdkafka's default
        };
        if pipeline.revoke_timeout_ms >= session_ms {
            return Err(ConfigError::new(
                "pipeline.revoke_timeout_ms",
                format!("must be below kafka.session.timeout.ms ({session_ms} ms), or the group fences this instance before revoked partitions are checkpointed"),
            ));
        }
        Ok(())
    }

    fn validate_redis(&self) -> Result<(), ConfigError> {
        let redis = &self.redis;
        if !(redis.url.starts_with("redis://") || redis.url.starts_with("rediss://")) {
            return Err(ConfigError::new(
                "redis.url",
                "must start with redis:// or rediss://",
            ));
        }
        if let Err(e) = redis::Client::open(redis.url.as_str()) {
            return Err(ConfigError::new(
                "redis.url",
                format!("cannot be parsed: {e}"),
            ));
        }
        redis_tls(redis)?;
        positive("redis.template_ttl_secs", redis.template_ttl_secs)?;
        positive("redis.message_ttl_secs", redis.message_ttl_secs)?;
        positive("redis.series_ttl_secs", redis.series_ttl_secs)?;
        positive("redis.command_timeout_secs", redis.command_timeout_secs)?;
        positive("redis.max_commit_ms", redis.max_commit_ms)
    }

    fn validate_warehouse(&self) -> Result<(), ConfigError> {
        let warehouse = &self.warehouse;
        not_empty("warehouse.root", &warehouse.root)?;
        positive("warehouse.target_file_bytes", warehouse.target_file_bytes)?;
        positive(
            "warehouse.partition_commit_hook_timeout_secs",
            warehouse.partition_commit_hook_timeout_secs,
        )?;
        positive("warehouse.row_group_rows", warehouse.row_group_rows as u64)?;
        positive("warehouse.max_open_files", warehouse.max_open_files as u64)?;
        if let Some(rest) = warehouse.root.strip_prefix("s3://") {
            let bucket = rest.split('/').next().unwrap_or_default();
            if bucket.is_empty() {
                return Err(ConfigError::new(
                    "warehouse.root",
                    "an s3:// root must name a bucket: s3://bucket/prefix",
                ));
            }
            if warehouse.s3.part_size_mb < 5 {
                return Err(ConfigError::new(
                    "warehouse.s3.part_size_mb",
                    "must be at least 5 (S3's smallest part)",
                ));
            }
            validate_endpoint(&warehouse.s3)?;
        } else if warehouse.root.contains("://") {
            return Err(ConfigError::new(
                "warehouse.root",
                "must be a local folder or s3://bucket/prefix",
            ));
        }
        Ok(())
    }

    fn validate_outputs(&self) -> Result<(), ConfigError> {
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(ConfigError::new(
                "metrics.listen",
                "must be host:port (an IP address) or empty",
            ));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(ConfigError::new("log.format", "must be `text` or `json`"));
        }
        Ok(())
    }
}

/// TLS files only with a `rediss://` URL, a certificate with its key, each readable,
/// and together something the TLS library accepts.
fn redis_tls(redis: &super::RedisConfig) -> Result<(), ConfigError> {
    let tls = &redis.tls;
    if !tls.is_set() {
        return Ok(());
    }
    if !redis.url.starts_with("rediss://") {
        return Err(ConfigError::new(
            "redis.tls",
            "needs a rediss:// redis.url (TLS files are set, the URL is plain redis://)",
        ));
    }
    if tls.crt_file.is_some() != tls.key_file.is_some() {
        return Err(ConfigError::new(
            "redis.tls.crt_file",
            "needs redis.tls.key_file, and the key its certificate",
        ));
    }
    for (field, path) in [
        ("redis.tls.ca_file", &tls.ca_file),
        ("redis.tls.crt_file", &tls.crt_file),
        ("redis.tls.key_file", &tls.key_file),
    ] {
        if let Some(path) = path {
            if let Err(e) = std::fs::read(path) {
                return Err(ConfigError::new(
                    field,
                    format!("cannot be read: {}: {e}", path.display()),
                ));
            }
        }
    }
    match redis.client() {
        Ok(_) => Ok(()),
        Err(e) => Err(ConfigError::new("redis.tls", format!("{e:#}"))),
    }
}
