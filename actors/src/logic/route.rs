//! Which aggregator shard a record goes to: all records of one `businessId` (one
//! template on one day) meet in one shard, so its counts and windows live in one place.

/// The aggregator shard that owns `business_id`: FNV-1a over its bytes, so the choice
/// is stable across processes and releases.
pub fn shard_of(business_id: i64, shards: usize) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in business_id.to_le_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % shards.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_choice_is_stable_and_spread() {
        assert_eq!(shard_of(1000001220231120, 4), shard_of(1000001220231120, 4));
        let mut seen = [0usize; 4];
        for b in 0..1000 {
            seen[shard_of(1_000_000_220_231_120 + b * 100_000_000, 4)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 150), "{seen:?}");
        assert_eq!(shard_of(42, 1), 0);
    }
}
