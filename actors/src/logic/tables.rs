//! Warehouse table schemas, their column builders and the Hive folder of a timestamp.
//!
//! Readers build Arrow batches here (so encoding work is spread over reader threads);
//! the warehouse sink only writes them. `dt`/`hour` folders come from event time in the
//! configured time zone, never from wall-clock time (dead letters, which may have no
//! event time, use ingest time).

use std::sync::{Arc, OnceLock};

use arrow_array::builder::{
    BinaryBuilder, BooleanBuilder, Int32Builder, Int64Builder, ListBuilder, StringBuilder,
    TimestampMillisecondBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

use crate::logic::decode::TraceEvent;

/// The warehouse tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    OdsAnchorLog,
    DeadLetter,
    DwsTemplateState,
}

impl Table {
    pub const ALL: [Table; 3] = [
        Table::OdsAnchorLog,
        Table::DeadLetter,
        Table::DwsTemplateState,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Table::OdsAnchorLog => "ods_anchor_log",
            Table::DeadLetter => "dead_letter",
            Table::DwsTemplateState => "dws_template_state_1m",
        }
    }
}

fn utc_millis() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// Schema of `ods_anchor_log`: one row per event.
pub fn ods_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("biz_id", DataType::Utf8, true),
                Field::new("message_id", DataType::Utf8, true),
                Field::new(
                    "ids",
                    DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
                    false,
                ),
                Field::new("state", DataType::Int32, false),
                Field::new("business_id", DataType::Int64, false),
                Field::new("log_timestamp", utc_millis(), false),
                Field::new("kafka_topic", DataType::Utf8, false),
                Field::new("kafka_partition", DataType::Int32, false),
                Field::new("kafka_offset", DataType::Int64, false),
                Field::new("ingest_time", utc_millis(), false),
            ]))
        })
        .clone()
}

/// Schema of `dead_letter`: one row per rejected record.
pub fn dead_letter_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("raw", DataType::Binary, true),
                Field::new("reason", DataType::Utf8, false),
                Field::new("error", DataType::Utf8, false),
                Field::new("kafka_topic", DataType::Utf8, false),
                Field::new("kafka_partition", DataType::Int32, false),
                Field::new("kafka_offset", DataType::Int64, false),
                Field::new("ingest_time", utc_millis(), false),
            ]))
        })
        .clone()
}

/// Column builders for `ods_anchor_log` rows of one folder.
pub struct OdsRows {
    biz_id: StringBuilder,
    message_id: StringBuilder,
    ids: ListBuilder<StringBuilder>,
    state: Int32Builder,
    business_id: Int64Builder,
    log_timestamp: TimestampMillisecondBuilder,
    kafka_topic: StringBuilder,
    kafka_partition: Int32Builder,
    kafka_offset: Int64Builder,
    ingest_time: TimestampMillisecondBuilder,
    len: usize,
}

impl Default for OdsRows {
    fn default() -> Self {
        OdsRows {
            biz_id: StringBuilder::new(),
            message_id: StringBuilder::new(),
            ids: ListBuilder::new(StringBuilder::new()),
            state: Int32Builder::new(),
            business_id: Int64Builder::new(),
            log_timestamp: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            kafka_topic: StringBuilder::new(),
            kafka_partition: Int32Builder::new(),
            kafka_offset: Int64Builder::new(),
            ingest_time: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            len: 0,
        }
    }
}

impl OdsRows {
    pub fn append(
        &mut self,
        event: &TraceEvent<'_>,
        topic: &str,
        partition: i32,
        offset: i64,
        ingest_ms: i64,
    ) {
        self.biz_id.append_option(event.biz_id.as_deref());
        self.message_id.append_option(event.message_id.as_deref());
        for id in &event.ids {
            self.ids.values().append_value(id);
        }
        self.ids.append(true);
        self.state.append_value(event.state);
        self.business_id.append_value(event.business_id);
        self.log_timestamp.append_value(event.log_timestamp);
        self.kafka_topic.append_value(topic);
        self.kafka_partition.append_value(partition);
        self.kafka_offset.append_value(offset);
        self.ingest_time.append_value(ingest_ms);
        self.len += 1;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(&mut self) -> RecordBatch {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.biz_id.finish()),
            Arc::new(self.message_id.finish()),
            Arc::new(self.ids.finish()),
            Arc::new(self.state.finish()),
            Arc::new(self.business_id.finish()),
            Arc::new(self.log_timestamp.finish()),
            Arc::new(self.kafka_topic.finish()),
            Arc::new(self.kafka_partition.finish()),
            Arc::new(self.kafka_offset.finish()),
            Arc::new(self.ingest_time.finish()),
        ];
        self.len = 0;
        RecordBatch::try_new(ods_schema(), columns)
            .expect("ods columns match the ods schema by construction")
    }
}

/// Column builders for `dead_letter` rows of one folder.
pub struct DeadLetterRows {
    raw: BinaryBuilder,
    reason: StringBuilder,
    error: StringBuilder,
    kafka_topic: StringBuilder,
    kafka_partition: Int32Builder,
    kafka_offset: Int64Builder,
    ingest_time: TimestampMillisecondBuilder,
    len: usize,
}

impl Default for DeadLetterRows {
    fn default() -> Self {
        DeadLetterRows {
            raw: BinaryBuilder::new(),
            reason: StringBuilder::new(),
            error: StringBuilder::new(),
            kafka_topic: StringBuilder::new(),
            kafka_partition: Int32Builder::new(),
            kafka_offset: Int64Builder::new(),
            ingest_time: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            len: 0,
        }
    }
}

impl DeadLetterRows {
    #[allow(clippy::too_many_arguments)]
    pub fn append(
        &mut self,
        raw: Option<&[u8]>,
        reason: &str,
        error: &str,
        topic: &str,
        partition: i32,
        offset: i64,
        ingest_ms: i64,
    ) {
        self.raw.append_option(raw);
        self.reason.append_value(reason);
        self.error.append_value(error);
        self.kafka_topic.append_value(topic);
        self.kafka_partition.append_value(partition);
        self.kafka_offset.append_value(offset);
        self.ingest_time.append_value(ingest_ms);
        self.len += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(&mut self) -> RecordBatch {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.raw.finish()),
            Arc::new(self.reason.finish()),
            Arc::new(self.error.finish()),
            Arc::new(self.kafka_topic.finish()),
            Arc::new(self.kafka_partition.finish()),
            Arc::new(self.kafka_offset.finish()),
            Arc::new(self.ingest_time.finish()),
        ];
        self.len = 0;
        RecordBatch::try_new(dead_letter_schema(), columns)
            .expect("dead-letter columns match the dead-letter schema by construction")
    }
}

/// Schema of `dws_template_state_1m`: one row per closed (window, template, state),
/// plus correction rows for late events (`is_correction`).
pub fn dws_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("window_start", utc_millis(), false),
                Field::new("window_end", utc_millis(), false),
                Field::new("business_id", DataType::Int64, false),
                Field::new("state", DataType::Int32, false),
                Field::new("events", DataType::Int64, false),
                Field::new("receivers", DataType::Int64, false),
                Field::new("is_correction", DataType::Boolean, false),
            ]))
        })
        .clone()
}

/// Column builders for `dws_template_state_1m` rows of one folder.
pub struct DwsRows {
    window_start: TimestampMillisecondBuilder,
    window_end: TimestampMillisecondBuilder,
    business_id: Int64Builder,
    state: Int32Builder,
    events: Int64Builder,
    receivers: Int64Builder,
    is_correction: BooleanBuilder,
    len: usize,
}

impl Default for DwsRows {
    fn default() -> Self {
        DwsRows {
            window_start: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            window_end: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            business_id: Int64Builder::new(),
            state: Int32Builder::new(),
            events: Int64Builder::new(),
            receivers: Int64Builder::new(),
            is_correction: BooleanBuilder::new(),
            len: 0,
        }
    }
}

impl DwsRows {
    #[allow(clippy::too_many_arguments)]
    pub fn append(
        &mut self,
        window_start: i64,
        window_end: i64,
        business_id: i64,
        state: i32,
        events: i64,
        receivers: i64,
        is_correction: bool,
    ) {
        self.window_start.append_value(window_start);
        self.window_end.append_value(window_end);
        self.business_id.append_value(business_id);
        self.state.append_value(state);
        self.events.append_value(events);
        self.receivers.append_value(receivers);
        self.is_correction.append_value(is_correction);
        self.len += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(&mut self) -> RecordBatch {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.window_start.finish()),
            Arc::new(self.window_end.finish()),
            Arc::new(self.business_id.finish()),
            Arc::new(self.state.finish()),
            Arc::new(self.events.finish()),
            Arc::new(self.receivers.finish()),
            Arc::new(self.is_correction.finish()),
        ];
        self.len = 0;
        RecordBatch::try_new(dws_schema(), columns)
            .expect("dws columns match the dws schema by construction")
    }
}

/// Maps epoch milliseconds to Hive folders in one time zone, caching the last local
/// hour so that a batch of events from the same hour costs one comparison each.
pub struct Folders {
    tz: Tz,
    cached: Option<(i64, i64, String)>,
}

impl Folders {
    pub fn new(tz: Tz) -> Self {
        Folders { tz, cached: None }
    }

    /// `dt=YYYY-MM-DD/hour=HH` of `ts_ms` in the time zone, or `None` when the
    /// timestamp is outside the range dates can represent.
    pub fn hour_folder(&mut self, ts_ms: i64) -> Option<&str> {
        let hit = matches!(&self.cached, Some((start, end, _)) if (*start..*end).contains(&ts_ms));
        if !hit {
            let local = self.tz.timestamp_millis_opt(ts_ms).single()?;
            let into_hour = i64::from(local.minute()) * 60_000
                + i64::from(local.second()) * 1000
                + i64::from(local.timestamp_subsec_millis());
            let start = ts_ms - into_hour;
            let folder = format!(
                "dt={:04}-{:02}-{:02}/hour={:02}",
                local.year(),
                local.month(),
                local.day(),
                local.hour()
            );
            self.cached = Some((start, start + 3_600_000, folder));
        }
        self.cached.as_ref().map(|(_, _, folder)| folder.as_str())
    }

    /// `dt=YYYY-MM-DD` of `ts_ms` in the time zone.
    pub fn day_folder(&self, ts_ms: i64) -> Option<String> {
        let local = self.tz.timestamp_millis_opt(ts_ms).single()?;
        Some(format!(
            "dt={:04}-{:02}-{:02}",
            local.year(),
            local.month(),
            local.day()
        ))
    }
}

/// The first instant of a local date and hour in `tz` (the earliest, if a DST change
/// makes it ambiguous; the next hour's, if it falls in a gap).
fn local_instant(tz: Tz, date: chrono::NaiveDate, hour: u32) -> Option<i64> {
    let at = date.and_hms_opt(hour, 0, 0)?;
    tz.from_local_datetime(&at)
        .earliest()
        .or_else(|| {
            tz.from_local_datetime(&(at + chrono::Duration::hours(1)))
                .earliest()
        })
        .map(|t| t.timestamp_millis())
}

/// The `dt` and optional `hour` of a Hive folder below its table
/// (`dt=2023-11-20/hour=11` or `dt=2023-11-20`).
pub fn parse_folder(folder: &str) -> Option<(chrono::NaiveDate, Option<u32>)> {
    let mut parts = folder.split('/');
    let date = parts.next()?.strip_prefix("dt=")?;
    let date = chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()?;
    let hour = match parts.next() {
        Some(h) => Some(
            h.strip_prefix("hour=")?
                .parse::<u32>()
                .ok()
                .filter(|h| *h < 24)?,
        ),
        None => None,
    };
    parts.next().is_none().then_some((date, hour))
}

/// Epoch milliseconds at which a Hive folder's time range ends in `tz`: the next local
/// hour for `dt=…/hour=…`, the next local midnight for `dt=…`.
pub fn folder_end(tz: Tz, folder: &str) -> Option<i64> {
    match parse_folder(folder)? {
        (date, Some(23)) => local_instant(tz, date.succ_opt()?, 0),
        (date, Some(hour)) => local_instant(tz, date, hour + 1),
        (date, None) => local_instant(tz, date.succ_opt()?, 0),
    }
}

/// Epoch milliseconds of the next local midnight after `now` in `tz`: when austin's
/// per-receiver lists expire.
pub fn end_of_day_ms(tz: Tz, now: DateTime<Utc>) -> i64 {
    let local = now.with_timezone(&tz);
    let tomorrow = local.date_naive().succ_opt().unwrap_or(local.date_naive());
    let midnight = tomorrow.and_hms_opt(0, 0, 0).unwrap_or_default();
    // A day that starts inside a DST gap has no local midnight; take the first instant
    // that exists after it.
    tz.from_local_datetime(&midnight)
        .earliest()
        .or_else(|| {
            tz.from_local_datetime(&(midnight + chrono::Duration::hours(1)))
                .earliest()
        })
        .map(|t| t.timestamp_millis())
        .unwrap_or_else(|| now.timestamp_millis() + 86_400_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_follow_event_time_in_the_zone() {
        let mut folders = Folders::new(chrono_tz::Asia::Shanghai);
        // 2023-11-19T15:59:59.999Z is 23:59:59.999 on the 19th in Shanghai (UTC+8).
        let before = 1_700_409_599_999;
        assert_eq!(folders.hour_folder(before), Some("dt=2023-11-19/hour=23"));
        assert_eq!(
            folders.hour_folder(before + 1),
            Some("dt=2023-11-20/hour=00")
        );
        assert_eq!(folders.hour_folder(before), Some("dt=2023-11-19/hour=23"));
        assert_eq!(
            folders.day_folder(before + 1).as_deref(),
            Some("dt=2023-11-20")
        );
        let mut utc = Folders::new(chrono_tz::UTC);
        assert_eq!(utc.hour_folder(before), Some("dt=2023-11-19/hour=15"));
        assert_eq!(utc.hour_folder(i64::MAX), None);
    }

    #[test]
    fn half_hour_zones_cache_the_local_hour() {
        let mut folders = Folders::new(chrono_tz::Asia::Kolkata);
        // 2023-11-20T00:29:59Z = 05:59:59 IST, 00:30:00Z = 06:00:00 IST.
        let t = 1_700_440_199_000;
        assert_eq!(folders.hour_folder(t), Some("dt=2023-11-20/hour=05"));
        assert_eq!(folders.hour_folder(t + 1000), Some("dt=2023-11-20/hour=06"));
    }

    #[test]
    fn receiver_lists_expire_at_local_midnight() {
        let now = Utc.timestamp_millis_opt(1_700_409_599_000).unwrap(); // 23:59:59 Shanghai
        assert_eq!(
            end_of_day_ms(chrono_tz::Asia::Shanghai, now),
            1_700_409_600_000
        );
        let utc_end = end_of_day_ms(chrono_tz::UTC, now);
        assert_eq!(utc_end, 1_700_438_400_000); // 2023-11-20T00:00:00Z
    }

    #[test]
    fn folders_end_at_the_next_local_hour_or_midnight() {
        let tz = chrono_tz::Asia::Shanghai;
        // 2023-11-20 00:00 in Shanghai is 2023-11-19 16:00 UTC.
        let midnight = 1_700_409_600_000;
        assert_eq!(folder_end(tz, "dt=2023-11-19/hour=23"), Some(midnight));
        assert_eq!(folder_end(tz, "dt=2023-11-19"), Some(midnight));
        assert_eq!(
            folder_end(tz, "dt=2023-11-20/hour=00"),
            Some(midnight + 3_600_000)
        );
        for bad in [
            "dt=2023-11-20/hour=24",
            "x=1",
            "dt=2023-13-01",
            "dt=2023-11-20/hour=1/x",
        ] {
            assert_eq!(folder_end(tz, bad), None, "{bad}");
        }
    }

    #[test]
    fn builders_match_their_schemas() {
        let mut ods = OdsRows::default();
        let event = crate::logic::decode::decode(
            Some(br#"{"ids":["a","b"],"state":10,"businessId":3,"logTimestamp":4}"#),
            &Default::default(),
        )
        .unwrap();
        ods.append(&event, "t", 1, 2, 5);
        assert_eq!(ods.finish().num_rows(), 1);
        let mut dead = DeadLetterRows::default();
        dead.append(None, "empty_payload", "no value", "t", 1, 3, 5);
        assert_eq!(dead.finish().num_rows(), 1);
        let mut dws = DwsRows::default();
        dws.append(0, 60_000, 3, 10, 2, 5, false);
        assert_eq!(dws.finish().num_rows(), 1);
    }
}
