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
    }
}
