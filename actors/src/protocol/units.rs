//! Key-hash units: fixed ranges of the Redis Cluster hash slots (CRC16 of the key, as
//! `CLUSTER KEYSLOT` computes it). A checkpoint too big for one script is split by unit
//! ([`crate::sinks::redis::commit`]), and a unit's fences say what of it is applied;
//! because a unit is a set of hash slots, the same split maps onto a Redis Cluster.

/// Number of key-hash units a checkpoint can be split into. Part of the stored format
/// (unit fences name units by number): changing it needs every partition's unit
/// fences to be gone.
pub const UNITS: u16 = 1024;

/// Hash slots per unit.
pub const SLOTS_PER_UNIT: u16 = 16_384 / UNITS;

/// CRC16/XMODEM, the checksum Redis Cluster hashes keys with, a byte at a time through
/// a table (every key of a commit is hashed while its plan is built).
fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, &byte| {
        (crc << 8) ^ CRC16_TABLE[usize::from((crc >> 8) as u8 ^ byte)]
    })
}

/// The CRC of each byte value shifted into a zero register, bit by bit.
const CRC16_TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut byte = 0;
    while byte < 256 {
        let mut crc = (byte as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[byte] = crc;
        byte += 1;
    }
    table
};

/// The Redis Cluster hash slot of a key (a non-empty `{tag}` hashes only the tag).
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let len = rest.iter().position(|&b| b == b'}')?;
        (len > 0).then(|| &rest[..len])
    });
    crc16(tagged.unwrap_or(key)) % 16_384
}

/// The unit a key's writes belong to.
pub fn unit_of(key: &[u8]) -> u16 {
    key_slot(key) / SLOTS_PER_UNIT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis_cluster() {
        // Values from `CLUSTER KEYSLOT` on a Redis Cluster.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(
            key_slot(b"{}x"),
            key_slot(b"{}x"),
            "an empty tag hashes the whole key"
        );
        assert_ne!(key_slot(b"{}x"), key_slot(b""));
        assert!(unit_of(b"anything") < UNITS);
    }

    /// The table gives what the bit-by-bit definition gives, for keys of every length.
    #[test]
    fn the_table_crc_is_the_bitwise_crc() {
        fn bitwise(bytes: &[u8]) -> u16 {
            let mut crc: u16 = 0;
            for &byte in bytes {
                crc ^= u16::from(byte) << 8;
                for _ in 0..8 {
                    crc = if crc & 0x8000 != 0 {
                        (crc << 1) ^ 0x1021
                    } else {
                        crc << 1
                    };
                }
            }
            crc
        }
        let bytes: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        for start in 0..bytes.len() {
            let key = &bytes[start..(start + start % 37).min(bytes.len())];
            assert_eq!(crc16(key), bitwise(key), "{key:?}");
        }
    }
}
