//! One memory budget, `pipeline.memory_budget_mb`, split over what holds records:
//!
//! | share | what | how it is held to it |
//! |---|---|---|
//! | 1/8 | librdkafka's prefetch | `queued.max.messages.kbytes` (at most the 16 MiB it always had), `fetch.max.bytes` below a 128 MiB budget |
//! | 1/8 | records on their way to the readers | batch size per assigned partition (a slot holds at most [`BATCHES_PER_PARTITION`] batches) |
//! | 3/8 | input read but not yet durable in Redis (aggregates, commit plans) | a partition is paused at its share, counted as payload bytes × [`EXPANSION`] |
//! | 1/8 | rows the warehouse has not written out yet (the open files' row groups) | the largest row group is written early past the share ([`MemoryBudget::row_group_bytes`]) |
//! | 1/4 | the rest: code, threads, allocator slack, clients; on object storage half of it holds the open files' upload parts | files open at once per generation ([`MemoryBudget::open_uploads`]) |
//!
//! The allocator is part of the budget too: glibc's malloc is held to
//! [`ALLOCATOR_ARENAS`] arenas ([`cap_allocator_arenas`]), or freed memory stays with
//! the thread that freed it and RSS outgrows what the shares hold.
//!
//! The shares are split over the partitions assigned at the time, so the bound holds
//! at 1 partition as at 64. `pipeline.max_uncommitted_records` stays as a second,
//! explicit bound in records.
//!
//! Uncommitted input is held against the Redis sink's fence, not the warehouse's: rows
//! the warehouse has not published yet are in its files (on disk, or uploaded parts)
//! and in row groups held to their own share, so they cost no more memory however long
//! the warehouse waits to publish (`warehouse.roll_interval_secs`, a minute by
//! default). Held against both fences, a partition could read only its share per roll
//! interval, whatever Redis could take.

/// glibc malloc arenas the process may use (`M_ARENA_MAX`). glibc's default allows 8 per
/// core, and a thread that finds the others' arenas busy gets its own, which keeps what
/// that thread freed. librdkafka's, actix's and the blocking pool's threads each
/// allocate, so the default lets freed memory pile up per thread beyond the memory
/// budget; two arenas keep the process within it at the same throughput
/// (docs/benchmarks.md has the figures).
pub const ALLOCATOR_ARENAS: i32 = 2;

/// Caps glibc's malloc arenas at [`ALLOCATOR_ARENAS`], unless the operator set
/// `MALLOC_ARENA_MAX` (glibc reads it itself). Call it first thing in `main`, before
/// any thread starts.
pub fn cap_allocator_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: sets one allocator tunable; no memory is touched.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, ALLOCATOR_ARENAS) };
    }
}

/// The least budget accepted (below it the shares are smaller than one batch).
pub const MIN_BUDGET_MB: u64 = 32;

/// Batches a slot can hold at once: the one being cut, the reader's mailbox (2), one
/// in the drainer's hands.
pub const BATCHES_PER_PARTITION: usize = 4;

/// Memory held per payload byte of uncommitted input: aggregator state (list values,
/// keys, and the room each shard's tables keep from the last checkpoint), the Redis
/// commit plan built from it, and Arrow/Parquet buffers of the rows.
/// Measured with `anchorflow bench` on unique message ids (the worst case): see
/// docs/benchmarks.md.
pub const EXPANSION: u64 = 6;

/// Bytes counted for a record besides its payload (offset, slot, batch bookkeeping).
pub const RECORD_OVERHEAD: u64 = 64;

/// Smallest batch the budget cuts to, whatever the partition count.
const MIN_BATCH_BYTES: usize = 16 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryBudget {
    bytes: u64,
}

impl MemoryBudget {
    pub fn from_mb(mb: u64) -> Self {
        MemoryBudget { bytes: mb << 20 }
    }

    /// librdkafka's prefetch queue, in bytes.
    pub fn prefetch_bytes(&self) -> u64 {
        self.bytes / 8
    }

    /// The batch size each of `partitions` slots cuts at (never above `configured`).
    pub fn batch_bytes(&self, configured: usize, partitions: usize) -> usize {
        let share = (self.bytes / 8) as usize / (partitions.max(1) * BATCHES_PER_PARTITION);
        configured.min(share.max(MIN_BATCH_BYTES))
    }

    /// Files each of the warehouse's two generations (the one being written and the
    /// next) may keep open on object storage, where every open file buffers one part
    /// of `part_bytes`: their parts fit in 1/8 of the budget. Never above `configured`,
    /// never below 1.
    pub fn open_uploads(&self, configured: usize, part_bytes: u64) -> usize {
        let fit = self.bytes / 8 / part_bytes.max(1) / 2;
        configured.min((fit as usize).max(1))
    }

    /// Payload bytes (plus [`RECORD_OVERHEAD`] each) one of `partitions` partitions may
    /// have read beyond what Redis made durable.
    pub fn uncommitted_bytes(&self, partitions: usize) -> u64 {
        self.bytes * 3 / 8 / EXPANSION / partitions.max(1) as u64
    }

    /// Bytes the open files of one of the warehouse's two generations may buffer in
    /// their row groups before the largest is written out early.
    pub fn row_group_bytes(&self) -> u64 {
        self.bytes / 8 / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_split_over_the_assigned_partitions() {
        let budget = MemoryBudget::from_mb(256);
        assert_eq!(budget.prefetch_bytes(), 32 << 20);
        assert_eq!(
            budget.batch_bytes(1 << 20, 1),
            1 << 20,
            "never above the configured"
        );
        assert_eq!(budget.batch_bytes(1 << 20, 16), 512 << 10);
        assert_eq!(budget.batch_bytes(1 << 20, 4096), MIN_BATCH_BYTES);
        let one = budget.uncommitted_bytes(1);
        assert_eq!(one, (96 << 20) / EXPANSION);
        assert_eq!(budget.uncommitted_bytes(64), one / 64);
        assert_eq!(
            budget.open_uploads(64, 8 << 20),
            2,
            "2 × 2 parts of 8 MiB in 32 MiB"
        );
        assert_eq!(MemoryBudget::from_mb(2048).open_uploads(64, 5 << 20), 25);
        assert_eq!(MemoryBudget::from_mb(32).open_uploads(64, 8 << 20), 1);
        assert_eq!(budget.row_group_bytes(), 16 << 20);
    }
}
