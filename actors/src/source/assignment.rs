//! Claiming assigned partitions (`docs/exactly-once.md`): before a partition is read, its
//! epoch is bumped in Redis (fencing off every earlier owner) and its fences and stored
//! window state are read; reading starts at the lower fence. On the way, recorded
//! warehouse commits and staged window series an earlier owner left are completed, and
//! the claimed warehouse fences are compared with what the warehouse says it published
//! (a Redis restored from an older snapshot shows up there).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::info;

use crate::checkpoint::claim::Claim;
use crate::protocol::claim_script::Claimed;
use crate::protocol::fences::{self, ClaimError, StoredWindows};
use crate::protocol::keys::FenceKeys;
use crate::protocol::staged;
use crate::runtime::clock::{self, Clock};
use crate::runtime::retry::{self, Until};
use crate::sinks::warehouse::marks::published_fences;
use crate::sinks::warehouse::publish::complete_recorded;
use crate::sinks::warehouse::storage::Storage;

/// What a claim returns per partition: the claim, and the state stored with it.
pub type Claims = BTreeMap<i32, (Claim, StoredWindows)>;

/// Claims partitions in Redis for this instance.
pub struct Claimer {
    pub redis: crate::config::RedisConfig,
    pub redis_timeout: Duration,
    pub keys: FenceKeys,
    /// Processing time; measured against Redis's at every claim.
    pub clock: Clock,
    pub storage: Arc<dyn Storage>,
    pub warehouse_root: PathBuf,
    pub group: String,
    pub topic: String,
}

impl Claimer {
    /// Claims `partitions`, retrying while Redis is unreachable until `deadline` (the
    /// group waits for the rebalance callback). `cold_start` gives the first offset of
    /// partitions that have no fences yet.
    pub fn claim_with_retries(
        &self,
        partitions: &[i32],
        deadline: Instant,
        mut cold_start: impl FnMut(&[i32]) -> anyhow::Result<BTreeMap<i32, i64>>,
    ) -> Result<Claims, ClaimError> {
        retry::blocking(
            "claiming partitions",
            Until::Deadline(deadline),
            || self.claim(partitions, &mut cold_start),
            |e| matches!(e, ClaimError::Other(_)),
            |_| {},
        )
    }

    fn claim(
        &self,
        partitions: &[i32],
        cold_start: &mut impl FnMut(&[i32]) -> anyhow::Result<BTreeMap<i32, i64>>,
    ) -> Result<Claims, ClaimError> {
        let mut conn =
            fences::connect(&self.redis, self.redis_timeout).map_err(ClaimError::Other)?;
        clock::measure(&self.clock, &mut conn)?;
        let claims = fences::claim(&mut conn, &self.keys, partitions, |fresh| cold_start(fresh))?;
        // An earlier owner may have recorded commits it never published; their rows are
        // below the fences we resume from.
        match complete_recorded(self.storage.as_ref(), &mut conn, &self.keys)? {
            Ok(0) => {}
            Ok(records) => info!(
                records,
                "completed recorded warehouse commits of an earlier owner"
            ),
            Err(error) => return Err(ClaimError::Unpublishable(error)),
        }
        // And window series it staged but never unstaged.
        let staged = staged::unstage_pending(&mut conn, &self.keys).map_err(ClaimError::Other)?;
        if staged.lists > 0 {
            info!(
                lists = staged.lists,
                conflicts = staged.conflicts,
                "unstaged window series an earlier commit had staged"
            );
        }
        self.check_published(&mut conn, &claims)?;
        let mut windows = fences::read_windows(&mut conn, &self.keys, partitions)?;
        Ok(claims
            .into_iter()
            .map(|(p, claimed)| {
                let mut stored = windows.remove(&p).unwrap_or_default();
                stored.unit_fences = claimed.unit_fences;
                (p, (claimed.claim, stored))
            })
            .collect())
    }

    /// Compares the claimed warehouse fences with what the warehouse says it published.
    /// A fence behind it means Redis went back in time (restored from an older
    /// snapshot, a stale replica promoted): reading on would publish those rows again.
    /// The loss is marked in Redis, as when Redis restarts empty, and an operator
    /// recovers (`fences recover --redis-from keep`, docs/exactly-once.md).
    fn check_published(
        &self,
        conn: &mut redis::Connection,
        claims: &BTreeMap<i32, Claimed>,
    ) -> Result<(), ClaimError> {
        let published = published_fences(
            self.storage.as_ref(),
            &self.warehouse_root,
            &self.group,
            &self.topic,
        )?;
        for (partition, claimed) in claims {
            let Some(&mark) = published.get(partition) else {
                continue;
            };
            if claimed.claim.warehouse < mark {
                let marker = format!(
                    "warehouse:{partition}: Redis's fence {} is behind the {mark} the warehouse published",
                    claimed.claim.warehouse
                );
                fences::mark_lost(conn, &self.keys, &marker)?;
                return Err(ClaimError::StateLost { marker });
            }
        }
        Ok(())
    }
}
