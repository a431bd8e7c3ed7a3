//! The names of every key anchorflow writes: its bookkeeping under
//! `anchorflow:{group}:{topic}:` ([`FenceKeys`], the table in [`crate::protocol`]) and
//! austin's keys ([`KeyLayout`], `docs/redis.md`).

/// Redis keys of one (group, topic).
#[derive(Clone, Debug)]
pub struct FenceKeys {
    pub fences: String,
    pub publish: String,
    pub lost: String,
    pub windows: String,
    pub folders: String,
    pub committed: String,
    pub watermarks: String,
    /// Prefix of the per-partition unit-fence hashes (`{prefix}{p}`).
    pub units_prefix: String,
    pub conflicts: String,
    pub skipped: String,
    /// Prefix of the instance leases (`{prefix}{instance id}`, see `protocol/lease.rs`).
    pub instances_prefix: String,
    /// The set of staging lists of window series not yet published
    /// (`scripts/redis_commit.lua`); each list is named by [`FenceKeys::staged_list`].
    pub staged: String,
    /// Prefix of the deadline keys of the Redis sink's transactions
    /// (`{prefix}{connection}`, see `sinks/redis/transaction.rs`).
    pub deadline_prefix: String,
}

impl FenceKeys {
    pub fn new(group: &str, topic: &str) -> Self {
        let base = format!("anchorflow:{group}:{topic}");
        FenceKeys {
            fences: format!("{base}:fences"),
            publish: format!("{base}:publish"),
            lost: format!("{base}:lost"),
            windows: format!("{base}:windows"),
            folders: format!("{base}:folders"),
            committed: format!("{base}:committed"),
            watermarks: format!("{base}:wm"),
            units_prefix: format!("{base}:units:"),
            conflicts: format!("{base}:conflicts"),
            skipped: format!("{base}:skipped"),
            instances_prefix: format!("{base}:instance:"),
            staged: format!("{base}:staged"),
            deadline_prefix: format!("{base}:deadline:"),
        }
    }

    /// The staging list of one commit's series: named by the first partition it
    /// covers, that partition's owner epoch and the checkpoint, which no other commit
    /// shares (a new owner bumps the epoch; checkpoint ids grow within an owner).
    pub fn staged_list(&self, partition: i32, epoch: i64, checkpoint: u64) -> String {
        format!("{}:{partition}:{epoch}:{checkpoint}", self.staged)
    }

    /// The KEYS of the Redis sink's commit script, in its order (every mode).
    pub fn commit_keys(&self) -> [&String; 4] {
        [&self.fences, &self.lost, &self.windows, &self.conflicts]
    }

    /// The KEYS of the warehouse sink's record script, in its order.
    pub fn record_keys(&self) -> [&String; 7] {
        [
            &self.fences,
            &self.lost,
            &self.publish,
            &self.windows,
            &self.folders,
            &self.committed,
            &self.watermarks,
        ]
    }
}

/// Field of a partition's open series windows in the windows hash.
pub fn series_field(partition: i32) -> String {
    format!("series:{partition}")
}

/// Field of a partition's open `dws_template_state_1m` windows in the windows hash.
pub fn dws_field(partition: i32) -> String {
    format!("dws:{partition}")
}

/// Prefix of the window series hashes: field `{windowStartMs}:{state}`, value events.
pub const SERIES_KEY_PREFIX: &str = "anchorflow:series:";

/// How long the conflicts hash keeps a key it has not seen again.
pub const CONFLICTS_TTL_MS: i64 = 30 * 86_400_000;

/// anchorflow's own keys start with this; no austin key may be written there.
pub const RESERVED_PREFIX: &str = "anchorflow:";

/// How the austin keys are named (`docs/redis.md`; prefixes are configurable).
#[derive(Clone, Debug, Default)]
pub struct KeyLayout {
    pub receiver_prefix: String,
    pub message_prefix: String,
    pub template_prefix: String,
}

impl KeyLayout {
    pub fn new(config: &crate::config::RedisConfig) -> Self {
        KeyLayout {
            receiver_prefix: config.receiver_key_prefix.clone(),
            message_prefix: config.message_key_prefix.clone(),
            template_prefix: config.template_key_prefix.clone(),
        }
    }

    pub fn receiver(&self, id: &str) -> String {
        format!("{}{id}", self.receiver_prefix)
    }

    pub fn message(&self, id: &str) -> String {
        format!("{}{id}", self.message_prefix)
    }

    pub fn template(&self, business_id: i64) -> String {
        format!("{}{business_id}", self.template_prefix)
    }
}
