//! `claim.lua` through [`ClaimArgs`]: on assignment, bump each partition's epoch and
//! read its fences and the unit fences a split Redis commit left (`protocol/fences.rs`
//! calls it; `scripts.rs` has every script's contract).

use std::collections::BTreeMap;

use anyhow::Context as _;

use crate::checkpoint::claim::Claim;
use crate::protocol::keys::FenceKeys;
use crate::protocol::scripts::{claim_script, with_args, Args};

/// A claimed partition: its claim, and the unit fences a split Redis commit left
/// beyond its Redis fence (unit → fence; usually none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claimed {
    pub claim: Claim,
    pub unit_fences: BTreeMap<u16, i64>,
}

/// `claim.lua`: bump each partition's epoch, return its fences; absent fences start at
/// the partition's cold-start offset (-1: the caller believes they exist).
pub struct ClaimArgs<'a> {
    pub units_prefix: &'a str,
    /// `(partition, cold-start offset)`.
    pub partitions: &'a [(i32, i64)],
}

/// What `claim.lua` answered.
#[derive(Debug, PartialEq, Eq)]
pub enum ClaimReply {
    /// The lost marker is set: Redis lost anchorflow's fences.
    StateLost,
    /// A partition has no fences and no cold-start offset was given.
    Vanished(i32),
    Claimed(BTreeMap<i32, Claimed>),
}

impl ClaimArgs<'_> {
    pub fn encode(&self) -> Args {
        let mut args = Args::default();
        args.push(self.units_prefix);
        args.counted(self.partitions, |args, (p, cold)| {
            args.push(p);
            args.push(cold);
        });
        args.finish()
    }

    pub fn invoke(
        &self,
        conn: &mut redis::Connection,
        keys: &FenceKeys,
    ) -> anyhow::Result<ClaimReply> {
        let script = claim_script();
        let mut invocation = script.key(&keys.fences);
        invocation.key(&keys.lost);
        let reply: Vec<i64> = with_args(invocation, &self.encode())
            .invoke(conn)
            .context("running the claim script")?;
        match reply.as_slice() {
            [-1] => Ok(ClaimReply::StateLost),
            [-2, p] => Ok(ClaimReply::Vanished(*p as i32)),
            flat => parse_claims(flat).map(ClaimReply::Claimed),
        }
    }
}

/// Reads the claim script's reply: per partition `p, epoch, redis, warehouse, k` and
/// `k` pairs of unit and unit fence.
fn parse_claims(mut flat: &[i64]) -> anyhow::Result<BTreeMap<i32, Claimed>> {
    let mut out = BTreeMap::new();
    while let [p, epoch, redis, warehouse, k, rest @ ..] = flat {
        let k = usize::try_from(*k).context("a unit-fence count in the claim reply")?;
        anyhow::ensure!(rest.len() >= 2 * k, "a truncated claim reply");
        let unit_fences = rest[..2 * k]
            .chunks(2)
            .map(|pair| (pair[0] as u16, pair[1]))
            .collect();
        let claim = Claim {
            epoch: *epoch,
            redis: *redis,
            warehouse: *warehouse,
        };
        out.insert(*p as i32, Claimed { claim, unit_fences });
        flat = &rest[2 * k..];
    }
    anyhow::ensure!(flat.is_empty(), "unexpected claim reply tail: {flat:?}");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_replies_carry_unit_fences() {
        let claims = parse_claims(&[0, 3, 100, 90, 0, 5, 1, 40, 40, 2, 7, 60, 9, 55]).unwrap();
        assert_eq!(claims[&0].claim.start(), 90);
        assert!(claims[&0].unit_fences.is_empty());
        assert_eq!(claims[&5].claim.epoch, 1);
        assert_eq!(claims[&5].unit_fences, BTreeMap::from([(7, 60), (9, 55)]));
        assert!(parse_claims(&[0, 3, 100, 90, 2, 7]).is_err());
    }
}
