//! One checkpoint as the warehouse sink sees it: the barriers it collects, whether it
//! publishes ("rolls") the open files, and the `dws_template_state_1m` windows its
//! watermark closes.
//!
//! A checkpoint publishes when it is final (shutdown, revocation), when an open file
//! reached `target_file_bytes` or is `roll_interval_secs` old, or when a folder with
//! open files is due for its partition commit; otherwise files stay open and grow, so
//! a quiet hour does not leave a file per second. With nothing open it still records
//! (without files) once the watermark moved, so quiet streams commit their folders.
//!
//! The decision is taken at the checkpoint's first barrier. From then on, rows of a
//! partition whose barrier has arrived go to the next generation of files, so the
//! published files hold exactly the rows before the checkpoint's barriers and no
//! partition waits for another.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::checkpoint::barrier::{Barrier, CheckpointKind, CheckpointSpec};
use crate::checkpoint::claim::{range_for, Claim, FenceRange, SinkKind};
use crate::config::WarehouseConfig;
use crate::logic::tables::{DwsRows, Folders, Table};
use crate::logic::window::{Counts, PartitionWindows, WindowKey, WindowSpec};
use crate::messages::TableRows;
use crate::sinks::warehouse::partition_committer::commit_deadline;
use crate::sinks::warehouse::writer::Generation;

/// In a quiet stream (nothing open), how far the watermark must move before a
/// checkpoint records it without files, so partition commits follow processing time.
const QUIET_RECORD_STEP_MS: i64 = 1_000;

/// When a checkpoint publishes.
pub struct RollPolicy {
    pub target_file_bytes: u64,
    pub roll_interval: Duration,
    pub commit_delay_ms: u64,
    pub windows: WindowSpec,
}

impl RollPolicy {
    pub fn new(config: &WarehouseConfig, windows: WindowSpec) -> Self {
        RollPolicy {
            target_file_bytes: config.target_file_bytes,
            roll_interval: Duration::from_secs(config.roll_interval_secs),
            commit_delay_ms: config.partition_commit_delay_ms,
            windows,
        }
    }

    /// Whether a checkpoint that starts now publishes `open`.
    pub fn publishes(
        &self,
        open: &Generation,
        kind: CheckpointKind,
        watermark: Option<i64>,
        recorded_watermark: Option<i64>,
    ) -> bool {
        kind == CheckpointKind::Final
            || self.due(open, watermark)
            || self.quiet_progress(open, watermark, recorded_watermark)
    }

    /// An open file is big or old enough, or its folder is due for its partition
    /// commit (then it publishes now, not at the next roll).
    fn due(&self, open: &Generation, watermark: Option<i64>) -> bool {
        open.open_files().any(|((table, folder), file)| {
            file.size() >= self.target_file_bytes
                || file.opened.elapsed() >= self.roll_interval
                || watermark.is_some_and(|mark| {
                    commit_deadline(&self.windows, self.commit_delay_ms, *table, folder)
                        .is_some_and(|due| due <= mark)
                })
        })
    }

    /// With nothing open, a checkpoint still records (no files) when the watermark
    /// moved: stored watermarks drive partition commits of quiet streams.
    fn quiet_progress(
        &self,
        open: &Generation,
        watermark: Option<i64>,
        recorded_watermark: Option<i64>,
    ) -> bool {
        open.is_empty()
            && watermark.is_some_and(|mark| {
                recorded_watermark.is_none_or(|stored| mark >= stored + QUIET_RECORD_STEP_MS)
            })
    }
}

/// The barriers of one checkpoint, as they arrive.
pub struct Roll {
    pub spec: Arc<CheckpointSpec>,
    /// Barrier offset and claim per partition whose barrier arrived.
    seen: BTreeMap<i32, (i64, Claim)>,
    pub publish: bool,
    /// Window results the barriers emitted, summed over partitions; `true` marks late
    /// amendments (correction rows).
    emitted: BTreeMap<(WindowKey, bool), Counts>,
    /// Each partition's open windows as of its barrier, stored with the record.
    pub states: BTreeMap<i32, String>,
}

impl Roll {
    pub fn new(spec: Arc<CheckpointSpec>, publish: bool) -> Self {
        Roll {
            spec,
            seen: BTreeMap::new(),
            publish,
            emitted: BTreeMap::new(),
            states: BTreeMap::new(),
        }
    }

    /// Whether the barrier of `partition` arrived (its later rows belong to the next
    /// generation when this roll publishes).
    pub fn passed(&self, partition: i32) -> bool {
        self.publish && self.seen.contains_key(&partition)
    }

    /// Takes one partition's barrier: closes the windows the checkpoint's watermark
    /// passed. Returns whether every partition's barrier is in.
    pub fn add(
        &mut self,
        barrier: &Barrier,
        windows: &mut PartitionWindows,
        spec: &WindowSpec,
    ) -> bool {
        self.seen
            .insert(barrier.partition, (barrier.next_offset, barrier.claim));
        windows.note_max_event(barrier.max_event_ms);
        let emitted = windows.close(spec, self.spec.watermark);
        for (late, results) in [(false, emitted.closed), (true, emitted.late)] {
            for (key, counts) in results {
                self.emitted.entry((key, late)).or_default().add(counts);
            }
        }
        self.states.insert(barrier.partition, windows.encode());
        self.seen.len() == self.spec.partitions.len()
    }

    /// Each partition's range of this commit, from the sink's fences.
    pub fn ranges(&self, fences: &BTreeMap<i32, (i64, i64)>) -> Vec<FenceRange> {
        self.seen
            .iter()
            .map(|(&partition, &(next_offset, claim))| {
                range_for(
                    fences.get(&partition).copied(),
                    SinkKind::Warehouse,
                    partition,
                    claim,
                    next_offset,
                )
            })
            .collect()
    }

    /// The window results as `dws_template_state_1m` rows, one batch per day folder.
    pub fn window_rows(&self, spec: &WindowSpec) -> anyhow::Result<Vec<TableRows>> {
        let folders = Folders::new(spec.tz);
        let mut by_day: BTreeMap<String, DwsRows> = BTreeMap::new();
        for (&((start, business_id, state), correction), counts) in &self.emitted {
            let day = folders
                .day_folder(start)
                .context("a window start outside the representable date range")?;
            by_day.entry(day).or_default().append(
                start,
                spec.end_of(start),
                business_id,
                state,
                counts.events,
                counts.receivers,
                correction,
            );
        }
        Ok(by_day
            .into_iter()
            .map(|(folder, mut rows)| TableRows {
                table: Table::DwsTemplateState,
                folder,
                rows: rows.finish(),
            })
            .collect())
    }
}
