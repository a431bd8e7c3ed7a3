//! What the poll loop checks before a delivered record joins its partition's batch,
//! and what it does when a partition delivers the wrong record or none.
//!
//! A partition must deliver exactly the offset it expects next (its slot's
//! `next_offset`): a fence moves only over records that were read. A record below it
//! was had already (librdkafka re-delivers after a pause or a seek) and is dropped. A
//! record beyond it is a **jump**: records the broker deleted (below the log's start:
//! counted as skipped, the one loss nothing can prevent, `protocol/skipped.rs`),
//! records the broker skipped, or offsets that hold none. The last two look the same
//! to a client; the [`GapSearch`] tells them apart by reading again from further back.
//! A partition that delivers nothing while the broker reports records for it is
//! searched the same way (a broker that answers a read inside its last batch with
//! nothing). Every outcome is counted in `anchorflow_offset_gaps_total{outcome}` and
//! logged: nothing is passed over silently.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::topic_partition_list::Offset;
use tracing::{debug, error, info, warn};

use crate::metrics::{OutcomeLabel, SkipLabel};
use crate::protocol::fences;
use crate::protocol::skipped;
use crate::source::context::{SourceConsumer, SourceContext, BROKER_TIMEOUT};
use crate::source::flow::SourceState;
use crate::source::gap::{GapSearch, Next};
use crate::source::progress::Timeouts;
use crate::source::slot::Slot;

/// How long a partition below its high watermark may deliver nothing before it is
/// searched: a healthy fetch returns within `fetch.wait.max.ms`.
pub const STARVED_AFTER: Duration = Duration::from_secs(5);

/// Whether a jump read again has been logged as a warning in this process.
static REREAD_REPORTED: AtomicBool = AtomicBool::new(false);

impl SourceContext {
    /// Whether the record at `offset` of `partition` is the one to process next. A
    /// record had already is dropped; a jump ahead starts or goes on with the gap
    /// search (the record is dropped while the search reads from further back).
    pub fn admit(
        &self,
        consumer: &SourceConsumer,
        state: &mut SourceState,
        partition: i32,
        offset: i64,
    ) -> bool {
        let verify = state.config.source.verify_offset_gaps;
        let Some(slot) = state.slot_mut(partition) else {
            warn!(
                partition,
                offset, "record for an unassigned partition skipped"
            );
            return false;
        };
        slot.last_delivered = Instant::now();
        let expected = slot.next_offset;
        if offset < expected {
            return false;
        }
        if offset == expected || expected < 0 {
            if let Some(search) = slot.search.take() {
                slot.gap_step = search.step();
                self.counted("reread");
                let (reads, read_from) = (search.reads(), search.reading_from());
                // Once loudly: a broker that does it once does it at every read that
                // starts inside a batch; the counter says how often.
                if !REREAD_REPORTED.swap(true, Ordering::Relaxed) {
                    warn!(partition, offset, reads, read_from, "the broker jumped over records (it answers a read inside a batch with the batches after it); they were read again from further back, nothing lost; anchorflow_offset_gaps_total{{outcome=\"reread\"}} counts further cases");
                } else {
                    debug!(
                        partition,
                        offset, reads, read_from, "jumped-over records read again"
                    );
                }
            }
            return true;
        }
        self.jumped(consumer, slot, partition, offset, verify)
    }

    /// A record at `offset` beyond the `expected` one: records the broker deleted,
    /// skipped, or offsets that hold none (the module doc says how it is told).
    /// Returns whether to take the record now.
    fn jumped(
        &self,
        consumer: &SourceConsumer,
        slot: &mut Slot,
        partition: i32,
        offset: i64,
        verify: bool,
    ) -> bool {
        let expected = slot.next_offset;
        // The log's start is asked of the broker once per search (it blocks the poll).
        let known = slot.search.as_ref().map(GapSearch::log_start);
        let asked = known.map_or_else(
            || consumer.fetch_watermarks(self.topic(), partition, BROKER_TIMEOUT),
            |low| Ok((low, 0)),
        );
        let log_start = match asked {
            Ok((low, _)) => low,
            Err(e) => {
                // Nothing can be told without the log's start: read the jump again.
                warn!(partition, expected, offset, error = %e, "offset jump; could not read the log start to tell why");
                self.read_from(consumer, partition, expected);
                return false;
            }
        };
        if let Some(range) = skipped::skipped(expected, offset, log_start) {
            slot.search = None;
            self.trimmed(partition, log_start, &range);
            return true;
        }
        if !verify {
            self.not_in_log(
                partition,
                expected..offset,
                "source.verify_offset_gaps is off",
            );
            return true;
        }
        let first = GapSearch::first_step_for(expected, Some(offset), slot.gap_step);
        let search = slot
            .search
            .get_or_insert_with(|| GapSearch::new(expected, log_start, first));
        match search.jumped(Some(offset)) {
            Next::ReadFrom(from) => {
                debug!(
                    partition,
                    expected, offset, from, "offset jump: reading again from further back"
                );
                self.read_from(consumer, partition, from);
                false
            }
            Next::NotInLog(range) => {
                slot.search = None;
                self.not_in_log(
                    partition,
                    range,
                    "every read from further back jumped the same way",
                );
                true
            }
        }
    }

    /// Searches every unpaused partition that has delivered nothing for
    /// [`STARVED_AFTER`] while its high watermark says it has records for us.
    pub fn search_starved(&self, consumer: &SourceConsumer, state: &mut SourceState) {
        if !state.config.source.verify_offset_gaps {
            return;
        }
        for partition in state.assigned() {
            let Some(slot) = state.slot_mut(partition) else {
                continue;
            };
            let starved = !slot.paused()
                && slot.next_offset >= 0
                && slot.high_watermark > slot.next_offset
                && slot.last_delivered.elapsed() >= STARVED_AFTER;
            if !starved {
                continue;
            }
            slot.last_delivered = Instant::now();
            let (expected, log_start) = (slot.next_offset, slot.log_start);
            let first = GapSearch::first_step_for(expected, None, slot.gap_step);
            let search = slot
                .search
                .get_or_insert_with(|| GapSearch::new(expected, log_start, first));
            match search.jumped(None) {
                Next::ReadFrom(from) => {
                    warn!(
                        partition,
                        expected,
                        high_watermark = slot.high_watermark,
                        from,
                        "the broker delivers nothing below its high watermark: reading again from further back"
                    );
                    self.read_from(consumer, partition, from);
                }
                Next::NotInLog(_) => {
                    // Nothing from anywhere down to the log's start: the broker does not
                    // serve these records. The search starts over at the next turn; the
                    // stalled-partition report says so meanwhile.
                    slot.search = None;
                    error!(
                        partition,
                        expected,
                        high_watermark = slot.high_watermark,
                        "the broker delivers no record of this partition, down to the log's start, though it reports some"
                    );
                }
            }
        }
    }

    /// Seeks `partition` to `offset`.
    fn read_from(&self, consumer: &SourceConsumer, partition: i32, offset: i64) {
        if let Err(e) = consumer.seek(
            self.topic(),
            partition,
            Offset::Offset(offset),
            BROKER_TIMEOUT,
        ) {
            warn!(partition, offset, error = %e, "could not seek; the search reads on where the fetch is");
        }
    }

    fn counted(&self, outcome: &'static str) {
        self.metrics
            .offset_gaps
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    /// Offsets that hold no records: reading goes on past them.
    fn not_in_log(&self, partition: i32, range: std::ops::Range<i64>, why: &str) {
        self.counted("not_in_log");
        info!(
            partition,
            from = range.start,
            to = range.end,
            why,
            "offsets without records (compaction, transactions): reading goes on past them"
        );
    }

    /// Records the broker deleted before they were read (retention, a trimmed log):
    /// skipped for good, counted, logged as an error and stored for `fences show`.
    fn trimmed(&self, partition: i32, log_start: i64, range: &std::ops::Range<i64>) {
        let reason = skipped::OUT_OF_RANGE;
        self.metrics
            .records_skipped
            .get_or_create(&SkipLabel { partition, reason })
            .inc_by((range.end - range.start) as u64);
        error!(
            partition,
            from = range.start,
            to = range.end,
            log_start,
            "records were deleted by the broker before they were read; they are skipped (anchorflow fences show lists them)"
        );
        let claimer = &self.claimer;
        let stored = fences::connect(&claimer.redis, claimer.redis_timeout)
            .and_then(|mut conn| skipped::store(&mut conn, &claimer.keys, partition, range));
        if let Err(e) = stored {
            warn!(
                partition,
                error = format!("{e:#}"),
                "could not store the skipped range"
            );
        }
    }

    /// Keeps what librdkafka's statistics say of each assigned partition's offsets.
    pub fn note_offsets(&self, statistics: &rdkafka::statistics::Statistics) {
        let mut state = self.lock();
        for topic in statistics.topics.values() {
            for (&id, partition) in &topic.partitions {
                let Some(slot) = state.slot_mut(id) else {
                    continue;
                };
                // Read-committed consumers get records below the last stable offset.
                slot.high_watermark = if partition.ls_offset >= 0 {
                    partition.ls_offset
                } else {
                    partition.hi_offset
                };
                slot.log_start = partition.lo_offset.max(0);
            }
        }
    }

    /// Reports the partitions whose fence has stood too long while records wait
    /// (`progress.rs`), once a second: metric, readiness, an error naming each and
    /// what it waits for.
    pub fn check_progress(&self, state: &mut SourceState) {
        if state.progress_checked.elapsed() < PROGRESS_CHECK {
            return;
        }
        let now = Instant::now();
        state.progress_checked = now;
        let config = &state.config;
        let redis = Duration::from_secs(config.pipeline.stall_timeout_secs);
        let roll = Duration::from_secs(config.warehouse.roll_interval_secs);
        let timeouts = Timeouts {
            redis,
            durable: redis + roll,
        };
        let highs: BTreeMap<i32, i64> = state
            .assigned()
            .into_iter()
            .filter_map(|p| Some((p, state.slot_mut(p)?.high_watermark)))
            .collect();
        let stalls = state
            .progress
            .stalled(now, timeouts, |p| highs.get(&p).copied());
        self.metrics.stalled_partitions.set(stalls.len() as i64);
        let mut reasons = BTreeMap::new();
        for stall in stalls {
            let waits_for = waits_for(state, stall.partition);
            if stall.log {
                error!(
                    partition = stall.partition,
                    which = stall.which.name(),
                    fence = stall.fence,
                    high_watermark = stall.high_watermark,
                    stood_secs = stall.stood.as_secs(),
                    waits_for = %waits_for,
                    "partition stalled: it has records to read, but its fence has not moved"
                );
            }
            reasons.insert(
                stall.partition,
                format!(
                    "its {} fence {} stood {} s with records up to {}; waiting for {waits_for}",
                    stall.which.name(),
                    stall.fence,
                    stall.stood.as_secs(),
                    stall.high_watermark
                ),
            );
        }
        state.health.set_stalled(reasons);
    }
}

/// How often [`SourceContext::check_progress`] looks.
const PROGRESS_CHECK: Duration = Duration::from_secs(1);

/// What a stalled partition waits for, in words, from what the source knows of it.
fn waits_for(state: &mut SourceState, partition: i32) -> String {
    let mut waits = Vec::new();
    let restarting = state.health.restarting();
    if !restarting.is_empty() {
        waits.push(format!("restarting actors ({})", restarting.join(", ")));
    }
    if let Some((id, running)) = state.checkpoint_running() {
        waits.push(format!(
            "checkpoint {id}, in flight for {} s",
            running.as_secs()
        ));
    }
    if state.held.unreachable(partition) {
        waits.push("its broker, which does not answer".into());
    }
    if let Some(slot) = state.slot_mut(partition) {
        if let Some(search) = &slot.search {
            waits.push(format!(
                "records the broker jumped over (searching from offset {})",
                search.reading_from()
            ));
        }
        if slot.reader_full {
            waits.push("its reader, whose downstream is full (a slow or restarting sink)".into());
        }
        if slot.uncommitted {
            waits.push("Redis commits (paused at the uncommitted bound)".into());
        }
        if waits.is_empty() {
            waits.push(format!(
                "records from the broker (next offset {})",
                slot.next_offset
            ));
        }
    }
    waits.join("; ")
}
