//! What a partition reader makes of one batch of records: events routed to the
//! aggregator shards, and warehouse rows split by Hive folder (`ods_anchor_log`, dead
//! letters) with the batch's window counts pre-aggregated.

use rustc_hash::FxHashMap;

use crate::logic::tables::{DeadLetterRows, Folders, OdsRows, Table};
use crate::logic::window::{Counts, WindowKey};
use crate::messages::{DetailBatch, EventBatch, TableRows};

/// What one batch becomes while it is processed.
pub struct Output {
    pub routed: Vec<EventBatch>,
    /// `ods_anchor_log` rows per hour folder.
    pub ods: Vec<(String, OdsRows)>,
    pub dead: DeadLetterRows,
    /// Warehouse-bound events pre-aggregated per (window, businessId, state).
    pub windows: FxHashMap<WindowKey, Counts>,
    pub max_event_ms: Option<i64>,
}

impl Output {
    pub fn new(partition: i32, shards: usize) -> Self {
        Output {
            routed: (0..shards).map(|_| EventBatch::new(partition)).collect(),
            ods: Vec::new(),
            dead: DeadLetterRows::default(),
            windows: FxHashMap::default(),
            max_event_ms: None,
        }
    }

    pub fn ods_rows(&mut self, folder: String) -> &mut OdsRows {
        let at = match self.ods.iter().position(|(f, _)| *f == folder) {
            Some(at) => at,
            None => {
                self.ods.push((folder, OdsRows::default()));
                self.ods.len() - 1
            }
        };
        &mut self.ods[at].1
    }

    /// The batch's rows, split by folder, with dead letters filed under `ingest_day`.
    pub fn finish(self, partition: i32, ingest_day: String) -> (Vec<EventBatch>, DetailBatch) {
        let mut parts: Vec<TableRows> = self
            .ods
            .into_iter()
            .map(|(folder, mut rows)| TableRows {
                table: Table::OdsAnchorLog,
                folder,
                rows: rows.finish(),
            })
            .collect();
        let mut dead = self.dead;
        if !dead.is_empty() {
            parts.push(TableRows {
                table: Table::DeadLetter,
                folder: ingest_day,
                rows: dead.finish(),
            });
        }
        let detail = DetailBatch {
            partition,
            parts,
            windows: self.windows.into_iter().collect(),
        };
        (self.routed, detail)
    }
}

/// The day folder dead letters are filed under: the day they were read.
pub fn ingest_day(folders: &Folders, now_ms: i64) -> String {
    folders
        .day_folder(now_ms)
        .unwrap_or_else(|| "dt=1970-01-01".into())
}
