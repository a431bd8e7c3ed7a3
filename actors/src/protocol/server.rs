//! What anchorflow needs to know of the Redis server itself, read from `INFO`: its
//! version and mode, its memory limit and eviction policy, and how many keys it has
//! evicted.
//!
//! Exactly-once rests on keys Redis must never drop on its own: the fences, epochs,
//! publish records, staged series and window state under `anchorflow:`, which carry no
//! time to live. A `maxmemory-policy` of `allkeys-*` evicts any key under memory
//! pressure, those included, and the promise is then gone without a trace; so such a
//! Redis is refused at start unless `redis.allow_evicting_policy` says the operator
//! knows (`pipeline.rs`), flagged not ready while it runs (`sinks/redis/client.rs`),
//! and every eviction Redis reports is logged and exported. `volatile-*` policies only
//! evict keys with a time to live, which anchorflow's bookkeeping never has (the austin
//! keys do: their loss is logged too).

use anyhow::Context as _;

/// What `INFO` says of the server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerInfo {
    pub version: String,
    /// `standalone`, `cluster` or `sentinel`.
    pub mode: String,
    /// Bytes; 0 for no limit.
    pub maxmemory: u64,
    pub policy: String,
    /// Keys evicted since the server started.
    pub evicted_keys: u64,
}

impl ServerInfo {
    /// Reads the fields of `INFO`'s text (`field:value` lines).
    pub fn parse(text: &str) -> Self {
        let mut info = ServerInfo::default();
        for line in text.lines() {
            let Some((field, value)) = line.trim_end().split_once(':') else {
                continue;
            };
            match field {
                "redis_version" => info.version = value.to_string(),
                "redis_mode" => info.mode = value.to_string(),
                "maxmemory" => info.maxmemory = value.parse().unwrap_or(0),
                "maxmemory_policy" => info.policy = value.to_string(),
                "evicted_keys" => info.evicted_keys = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        info
    }

    /// Why anchorflow, configured as `redis` says, must not run against this server:
    /// an eviction policy that may drop its bookkeeping (unless
    /// `redis.allow_evicting_policy`), or a version too old for `redis.commit`.
    pub fn refusal(&self, redis: &crate::config::RedisConfig) -> Option<String> {
        let evicting = self
            .may_evict_bookkeeping()
            .filter(|_| !redis.allow_evicting_policy);
        let too_old = self
            .lacks_transactions()
            .filter(|_| redis.commit == crate::config::CommitMode::Transaction);
        evicting.or(too_old)
    }

    /// Why this server cannot run the Redis sink's transactions (`redis.commit =
    /// "transaction"`), if it cannot: before 7.0 Redis does not abort an `EXEC` whose
    /// watched key expired, which their day-end deadline rests on
    /// (`sinks/redis/transaction.rs`). An unknown version is given the benefit of the
    /// doubt.
    pub fn lacks_transactions(&self) -> Option<String> {
        let major = self.version.split('.').next()?.parse::<u32>().ok()?;
        (major < 7).then(|| {
            format!(
                "redis.commit = \"transaction\" needs Redis 7.0 or later (an EXEC must abort when a watched key expired), this one is {}: upgrade it, or set redis.commit = \"script\"",
                self.version
            )
        })
    }

    /// Why this server may drop anchorflow's bookkeeping on its own, if it may: a
    /// policy that evicts keys without a time to live.
    pub fn may_evict_bookkeeping(&self) -> Option<String> {
        self.policy.starts_with("allkeys-").then(|| {
            format!(
                "Redis's maxmemory-policy is {}: under memory pressure it may evict anchorflow's fences and bookkeeping, and exactly-once is lost; set it to noeviction (or a volatile-* policy), or set redis.allow_evicting_policy = true if this Redis never reaches maxmemory",
                self.policy
            )
        })
    }
}

/// `INFO` of the server `conn` is connected to.
pub fn inspect(conn: &mut redis::Connection) -> anyhow::Result<ServerInfo> {
    let text: String = redis::cmd("INFO")
        .query(conn)
        .context("reading INFO from redis")?;
    Ok(ServerInfo::parse(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_is_read_and_only_allkeys_policies_are_flagged() {
        let text = "# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n\r\n# Memory\r\nmaxmemory:67108864\r\nmaxmemory_policy:allkeys-lru\r\n# Stats\r\nevicted_keys:12\r\n";
        let info = ServerInfo::parse(text);
        assert_eq!(
            info,
            ServerInfo {
                version: "7.0.15".into(),
                mode: "standalone".into(),
                maxmemory: 64 << 20,
                policy: "allkeys-lru".into(),
                evicted_keys: 12,
            }
        );
        assert!(info
            .may_evict_bookkeeping()
            .unwrap()
            .contains("allkeys-lru"));
        for safe in ["noeviction", "volatile-lru", "volatile-ttl", ""] {
            let info = ServerInfo {
                policy: safe.into(),
                ..info.clone()
            };
            assert_eq!(info.may_evict_bookkeeping(), None, "{safe}");
        }
        for (version, lacks) in [
            ("7.0.15", false),
            ("8.2.1", false),
            ("6.2.14", true),
            ("", false),
        ] {
            let info = ServerInfo {
                version: version.into(),
                ..ServerInfo::default()
            };
            assert_eq!(info.lacks_transactions().is_some(), lacks, "{version}");
        }
    }
}
