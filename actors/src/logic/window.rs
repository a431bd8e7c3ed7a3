//! Tumbling event-time windows (`docs/event-time.md`): events and receivers per
//! (window, businessId, state), closed once the watermark reaches
//! `window_end + allowed_lateness`.
//!
//! [`WindowSpec`] says where a window starts and ends: `start = ts - ts mod size` for
//! sizes below an hour, and local wall-clock alignment in the configured zone for hour
//! and day multiples (a day window is a local calendar day).
//!
//! [`PartitionWindows`] is the open state of **one source partition**. The same type
//! serves two owners, each checkpointed with its own sink so that a crash between the
//! two sinks' commits neither loses nor repeats a window in either (see
//! `docs/event-time.md`): the aggregator shards keep it for the Redis series hash, the
//! warehouse sink for the `dws_template_state_1m` table. Windows close at a barrier,
//! with the watermark the checkpoint carries; an event whose window already closed for
//! its partition is **late**: it is kept apart and emitted as an amendment (a
//! correction row) at the next barrier. The state encodes to a line-based text that is
//! stored next to the sink's fences and handed back on the next claim.

use std::collections::BTreeMap;

use anyhow::Context as _;
use chrono::{NaiveTime, TimeZone, Timelike};
use chrono_tz::Tz;
use rustc_hash::FxHashMap;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

/// Where windows start and end, and how long after its end a window stays open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowSpec {
    pub size_ms: i64,
    pub lateness_ms: i64,
    pub tz: Tz,
}

impl WindowSpec {
    pub fn new(size_ms: i64, lateness_ms: i64, tz: Tz) -> Self {
        WindowSpec {
            size_ms: size_ms.max(1),
            lateness_ms: lateness_ms.max(0),
            tz,
        }
    }

    /// Whether windows follow local wall-clock time (hour and day multiples).
    fn local(&self) -> bool {
        self.size_ms >= HOUR_MS && self.size_ms % HOUR_MS == 0 && DAY_MS % self.size_ms == 0
    }

    /// Start of the window holding `ts`.
    pub fn start_of(&self, ts: i64) -> i64 {
        let fixed = ts - ts.rem_euclid(self.size_ms);
        if !self.local() {
            return fixed;
        }
        let Some(local) = self.tz.timestamp_millis_opt(ts).single() else {
            return fixed;
        };
        let into_day = i64::from(local.num_seconds_from_midnight()) * 1000
            + i64::from(local.timestamp_subsec_millis());
        let floored = into_day - into_day.rem_euclid(self.size_ms);
        let time = NaiveTime::from_num_seconds_from_midnight_opt((floored / 1000) as u32, 0)
            .unwrap_or_default();
        let naive = local.date_naive().and_time(time);
        // A boundary inside a DST gap does not exist locally; the window then starts at
        // the first instant after it, never after `ts`.
        self.tz
            .from_local_datetime(&naive)
            .earliest()
            .map(|t| t.timestamp_millis().min(ts))
            .unwrap_or(fixed)
    }

    /// End (exclusive) of the window that starts at `start`.
    pub fn end_of(&self, start: i64) -> i64 {
        if !self.local() {
            return start + self.size_ms;
        }
        // The next window's start: on a DST change day a local window is an hour longer
        // or shorter than its nominal size.
        let mut probe = start + self.size_ms;
        while self.start_of(probe) <= start {
            probe += HOUR_MS;
        }
        self.start_of(probe)
    }

    /// The watermark at which the window starting at `start` closes.
    pub fn closes_at(&self, start: i64) -> i64 {
        self.end_of(start) + self.lateness_ms
    }

    /// The next close deadline above `watermark`: the close of the window holding
    /// `watermark - lateness` (every window before it has closed by `watermark`).
    pub fn next_close_after(&self, watermark: i64) -> i64 {
        self.closes_at(self.start_of(watermark - self.lateness_ms))
    }
}

/// Events and receivers of one (window, businessId, state).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub events: i64,
    pub receivers: i64,
}

impl Counts {
    pub fn add(&mut self, other: Counts) {
        self.events += other.events;
        self.receivers += other.receivers;
    }
}

/// `(window start, businessId, state)`.
pub type WindowKey = (i64, i64, i32);

/// Window results of one partition at one barrier.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Emitted {
    /// Windows the watermark closed, each emitted once.
    pub closed: Vec<(WindowKey, Counts)>,
    /// Late amendments to windows closed earlier.
    pub late: Vec<(WindowKey, Counts)>,
}

/// Open windows of one source partition, the watermark its windows closed at, and
/// the largest event time the partition had delivered (where its watermark resumes
/// after a restart).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionWindows {
    /// Windows with `closes_at <= closed_through` have been emitted.
    closed_through: Option<i64>,
    max_event_ms: Option<i64>,
    open: BTreeMap<i64, FxHashMap<(i64, i32), Counts>>,
    late: FxHashMap<WindowKey, Counts>,
}

impl PartitionWindows {
    /// Folds one (possibly pre-aggregated) contribution; returns true if its window had
    /// already closed for this partition (the event is late).
    pub fn add(
        &mut self,
        spec: &WindowSpec,
        start: i64,
        business_id: i64,
        state: i32,
        counts: Counts,
    ) -> bool {
        let late = self
            .closed_through
            .is_some_and(|closed| spec.closes_at(start) <= closed);
        if late {
            self.late
                .entry((start, business_id, state))
                .or_default()
                .add(counts);
        } else {
            self.open
                .entry(start)
                .or_default()
                .entry((business_id, state))
                .or_default()
                .add(counts);
        }
        late
    }

    /// Closes every window the watermark has passed and takes the late amendments.
    pub fn close(&mut self, spec: &WindowSpec, watermark: Option<i64>) -> Emitted {
        let mut emitted = Emitted {
            closed: Vec::new(),
            late: self.late.drain().collect(),
        };
        if let Some(mark) = watermark {
            while let Some(entry) = self.open.first_entry() {
                if spec.closes_at(*entry.key()) > mark {
                    break;
                }
                let start = *entry.key();
                emitted.closed.extend(
                    entry
                        .remove()
                        .into_iter()
                        .map(|((b, s), counts)| ((start, b, s), counts)),
                );
            }
            self.closed_through = Some(self.closed_through.map_or(mark, |c| c.max(mark)));
        }
        emitted.closed.sort_unstable_by_key(|(k, _)| *k);
        emitted.late.sort_unstable_by_key(|(k, _)| *k);
        emitted
    }

    pub fn closed_through(&self) -> Option<i64> {
        self.closed_through
    }

    /// Records the largest event time the partition delivered up to a barrier.
    pub fn note_max_event(&mut self, max_event_ms: Option<i64>) {
        if let Some(ms) = max_event_ms {
            self.max_event_ms = Some(self.max_event_ms.map_or(ms, |m| m.max(ms)));
        }
    }

    pub fn max_event_ms(&self) -> Option<i64> {
        self.max_event_ms
    }

    /// Number of open (window, businessId, state) entries.
    pub fn open_entries(&self) -> usize {
        self.open.values().map(|m| m.len()).sum()
    }

    /// Keeps only the entries `keep(businessId)` selects (a restored partition's state
    /// is split over the shards that own the templates).
    pub fn retain(&mut self, mut keep: impl FnMut(i64) -> bool) {
        for window in self.open.values_mut() {
            window.retain(|(b, _), _| keep(*b));
        }
        self.open.retain(|_, w| !w.is_empty());
        self.late.retain(|(_, b, _), _| keep(*b));
    }

    /// The state as text: a line `c <closed_through|->`, a line `m <max event time>`
    /// once known, then one line
    /// `w <start> <businessId> <state> <events> <receivers>` per open entry. Late
    /// amendments are never encoded: a barrier emits them before the state is taken.
    /// Concatenated encodings decode to their union (shards' parts of one partition).
    pub fn encode(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        match self.closed_through {
            Some(c) => {
                let _ = writeln!(out, "c {c}");
            }
            None => out.push_str("c -\n"),
        }
        if let Some(m) = self.max_event_ms {
            let _ = writeln!(out, "m {m}");
        }
        for (start, window) in &self.open {
            let mut entries: Vec<_> = window.iter().collect();
            entries.sort_unstable_by_key(|(k, _)| **k);
            for ((b, s), counts) in entries {
                let _ = writeln!(
                    out,
                    "w {start} {b} {s} {} {}",
                    counts.events, counts.receivers
                );
            }
        }
        out
    }

    pub fn decode(text: &str) -> anyhow::Result<Self> {
        let mut state = PartitionWindows::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let fields: Vec<&str> = line.split(' ').collect();
            let number = |i: usize| -> anyhow::Result<i64> {
                fields
                    .get(i)
                    .with_context(|| format!("window state line {line:?} is too short"))?
                    .parse()
                    .with_context(|| format!("window state line {line:?}"))
            };
            match fields.first() {
                Some(&"c") if fields.get(1) == Some(&"-") => {}
                Some(&"c") => {
                    let c = number(1)?;
                    state.closed_through = Some(state.closed_through.map_or(c, |old| old.max(c)));
                }
                Some(&"m") => state.note_max_event(Some(number(1)?)),
                Some(&"w") => {
                    let state_code = i32::try_from(number(3)?)
                        .with_context(|| format!("window state line {line:?}"))?;
                    state
                        .open
                        .entry(number(1)?)
                        .or_default()
                        .entry((number(2)?, state_code))
                        .or_default()
                        .add(Counts {
                            events: number(4)?,
                            receivers: number(5)?,
                        });
                }
                _ => anyhow::bail!("unknown window state line {line:?}"),
            }
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: i64 = 60_000;
    /// 2023-11-20 00:00:00 in Asia/Shanghai.
    const SHANGHAI_MIDNIGHT: i64 = 1_700_409_600_000;

    fn one(events: i64, receivers: i64) -> Counts {
        Counts { events, receivers }
    }

    #[test]
    fn minute_windows_align_on_the_epoch() {
        let spec = WindowSpec::new(MINUTE, 0, chrono_tz::Asia::Shanghai);
        assert_eq!(spec.start_of(1_700_450_012_345), 1_700_449_980_000);
        assert_eq!(spec.end_of(1_700_449_980_000), 1_700_450_040_000);
        assert_eq!(spec.start_of(-1), -MINUTE);
    }

    #[test]
    fn day_and_hour_windows_align_in_the_zone() {
        let day = WindowSpec::new(DAY_MS, 0, chrono_tz::Asia::Shanghai);
        // 23:59:59.999 local belongs to the day before midnight, 00:00 to the next.
        assert_eq!(
            day.start_of(SHANGHAI_MIDNIGHT - 1),
            SHANGHAI_MIDNIGHT - DAY_MS
        );
        assert_eq!(day.start_of(SHANGHAI_MIDNIGHT), SHANGHAI_MIDNIGHT);
        assert_eq!(day.end_of(SHANGHAI_MIDNIGHT), SHANGHAI_MIDNIGHT + DAY_MS);
        // Epoch alignment would put the day boundary at 08:00 local.
        assert_ne!(SHANGHAI_MIDNIGHT % DAY_MS, 0);
        let half_hour_zone = WindowSpec::new(HOUR_MS, 0, chrono_tz::Asia::Kolkata);
        // 10:45 IST is 05:15 UTC; the local hour starts at 10:00 IST = 04:30 UTC.
        let ts = 1_700_457_300_000; // 2023-11-20 05:15:00 UTC
        assert_eq!(half_hour_zone.start_of(ts), ts - 45 * MINUTE);
        // A DST day in Berlin has 23 hours: the day window ends at the next midnight.
        let berlin = WindowSpec::new(DAY_MS, 0, chrono_tz::Europe::Berlin);
        let start = berlin.start_of(1_711_886_400_000); // 2024-03-31 12:00 UTC
        assert_eq!(berlin.end_of(start) - start, 23 * HOUR_MS);
    }

    #[test]
    fn a_window_closes_exactly_when_the_watermark_reaches_end_plus_lateness() {
        let spec = WindowSpec::new(MINUTE, 2_000, chrono_tz::UTC);
        let mut state = PartitionWindows::default();
        assert!(!state.add(&spec, 0, 7, 10, one(1, 2)));
        assert!(!state.add(&spec, MINUTE, 7, 10, one(1, 1)));
        assert_eq!(state.close(&spec, Some(MINUTE + 1_999)), Emitted::default());
        let emitted = state.close(&spec, Some(MINUTE + 2_000));
        assert_eq!(emitted.closed, vec![((0, 7, 10), one(1, 2))]);
        assert_eq!(state.open_entries(), 1);
        assert_eq!(spec.next_close_after(MINUTE + 2_000), 2 * MINUTE + 2_000);
    }

    #[test]
    fn late_contributions_are_kept_apart_and_emitted_as_amendments() {
        let spec = WindowSpec::new(MINUTE, 0, chrono_tz::UTC);
        let mut state = PartitionWindows::default();
        state.add(&spec, 0, 7, 10, one(1, 1));
        state.close(&spec, Some(MINUTE));
        assert!(state.add(&spec, 0, 7, 10, one(2, 3)), "window 0 closed");
        assert!(!state.add(&spec, MINUTE, 7, 10, one(1, 1)));
        let emitted = state.close(&spec, Some(MINUTE + 5));
        assert!(emitted.closed.is_empty());
        assert_eq!(emitted.late, vec![((0, 7, 10), one(2, 3))]);
        // No watermark (unknown after a restart) closes nothing but still emits late ones.
        state.add(&spec, 0, 7, 20, one(1, 0));
        let emitted = state.close(&spec, None);
        assert_eq!(emitted.late, vec![((0, 7, 20), one(1, 0))]);
        assert_eq!(state.closed_through(), Some(MINUTE + 5));
    }

    #[test]
    fn state_survives_encoding_and_shards_parts_concatenate() {
        let spec = WindowSpec::new(MINUTE, 0, chrono_tz::UTC);
        let mut state = PartitionWindows::default();
        state.add(&spec, 0, 7, 10, one(1, 2));
        state.add(&spec, MINUTE, 8, 60, one(4, 4));
        state.close(&spec, Some(-5));
        state.note_max_event(Some(61_000));
        let decoded = PartitionWindows::decode(&state.encode()).unwrap();
        assert_eq!(decoded, state);
        let (mut a, mut b) = (decoded.clone(), decoded.clone());
        a.retain(|business| business == 7);
        b.retain(|business| business != 7);
        let joined = PartitionWindows::decode(&format!("{}{}", a.encode(), b.encode())).unwrap();
        assert_eq!(joined, state);
        assert!(PartitionWindows::decode("w 1 2").is_err());
        assert!(PartitionWindows::decode("x").is_err());
        assert_eq!(
            PartitionWindows::decode("").unwrap(),
            PartitionWindows::default()
        );
    }
}
