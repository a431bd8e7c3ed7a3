//! Every metric anchorflow exports, declared in one place.
//!
//! Names follow Prometheus conventions (`anchorflow_<what>_<unit>_total`); labels are
//! low-cardinality (reason, table, actor, sink, partition number) and never carry user
//! data. Actors hold a cheap clone of [`Metrics`]; the HTTP endpoint encodes
//! [`Metrics::registry`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    pub table: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActorLabel {
    pub actor: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabel {
    pub sink: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectionLabel {
    pub sink: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    pub partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SkipLabel {
    pub partition: i32,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: StateCode,
}

/// An unknown state code as a label value: the code itself for the first
/// [`UNKNOWN_STATE_LABELS`] distinct codes, `other` for the rest, so that hostile input
/// cannot grow the metric without bound.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum StateCode {
    Code(i32),
    Other,
}

impl prometheus_client::encoding::EncodeLabelValue for StateCode {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder,
    ) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        match self {
            StateCode::Code(code) => write!(encoder, "{code}"),
            StateCode::Other => encoder.write_str("other"),
        }
    }
}

/// Distinct unknown state codes that get a label of their own.
pub const UNKNOWN_STATE_LABELS: usize = 32;

type FloatCounter = Counter<f64, AtomicU64>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// Handles to every metric; clone freely (each field is reference-counted).
#[derive(Clone)]
pub struct Metrics {
    pub registry: Arc<Registry>,
    pub records_read: Counter,
    pub events_decoded: Counter,
    pub dead_letters: Family<ReasonLabel, Counter>,
    /// Records the broker deleted before they were read (their fence was out of range).
    pub records_skipped: Family<SkipLabel, Counter>,
    pub unknown_state_events: Family<StateLabel, Counter>,
    pub redis_commands: Counter,
    pub redis_errors: Counter,
    pub redis_script_operations: Counter,
    pub redis_commit_seconds: Histogram,
    /// Duration of one commit script (a checkpoint's commit runs one or a few).
    pub redis_script_seconds: Histogram,
    /// Writes Redis refused (a key of another type, …), by reason; the rest applied.
    pub redis_conflicts: Family<ReasonLabel, Counter>,
    /// Redis's clock minus this host's, as last measured.
    pub clock_skew_seconds: FloatGauge,
    pub sink_commits: Family<SinkLabel, Counter>,
    /// Commits a fence check refused (zombie, replay, or Redis lost its state).
    pub commits_rejected: Family<RejectionLabel, Counter>,
    /// 1 while Redis has lost anchorflow's fences and an operator must recover.
    pub redis_state_lost: Gauge,
    pub parquet_rows: Family<TableLabel, Counter>,
    pub parquet_files: Family<TableLabel, Counter>,
    pub parquet_bytes: Family<TableLabel, Counter>,
    pub mailbox_depth: Family<ActorLabel, Gauge>,
    pub backpressure_seconds: Family<ActorLabel, FloatCounter>,
    pub consumer_lag: Family<PartitionLabel, Gauge>,
    /// Wall-clock now minus the partition's watermark.
    pub watermark_lag_seconds: Family<PartitionLabel, FloatGauge>,
    /// The instance watermark (Unix seconds).
    pub watermark_timestamp_seconds: FloatGauge,
    pub idle_partitions: Gauge,
    /// Assigned partitions with records not processed yet (never idle, see `held.rs`).
    pub held_partitions: Gauge,
    /// Events whose window had already closed for their partition (series path).
    pub late_events: Counter,
    /// (window, businessId, state) results emitted to the series hash.
    pub windows_closed: Counter,
    /// Warehouse folders committed (`_SUCCESS` written, hook run), per table.
    pub partitions_committed: Family<TableLabel, Counter>,
    /// Partition-commit hook runs that failed or timed out (retried later).
    pub partition_commit_hook_failures: Counter,
    pub partitions_assigned: Gauge,
    pub partition_pauses: Counter,
    pub checkpoints: Counter,
    pub checkpoint_seconds: Histogram,
    pub last_checkpoint_timestamp_seconds: FloatGauge,
    pub actor_restarts: Family<ActorLabel, Counter>,
    /// Readiness for `/readyz`: partitions assigned and the last commit succeeded.
    pub ready: Arc<AtomicBool>,
    /// Offsets committed to Kafka per partition (next offset to read), for progress
    /// reports in the demo, the benchmark and tests.
    pub committed_offsets: Arc<Mutex<BTreeMap<i32, i64>>>,
    /// Durations of the most recent checkpoints (at most [`RECENT_CHECKPOINTS`]), for
    /// the benchmark's percentiles.
    pub recent_checkpoints: Arc<Mutex<std::collections::VecDeque<Duration>>>,
    /// The unknown state codes that have a label of their own.
    unknown_states: Arc<Mutex<std::collections::BTreeSet<i32>>>,
}

/// How many checkpoint durations [`Metrics::recent_checkpoints`] keeps.
pub const RECENT_CHECKPOINTS: usize = 4096;

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("anchorflow");
        let records_read = Counter::default();
        registry.register("records_read", "Kafka records read", records_read.clone());
        let events_decoded = Counter::default();
        registry.register(
            "events_decoded",
            "Records decoded into trace events",
            events_decoded.clone(),
        );
        let dead_letters = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "dead_letters",
            "Records sent to the dead-letter table, by reason",
            dead_letters.clone(),
        );
        for reason in crate::decode::DecodeError::REASONS {
            drop(dead_letters.get_or_create(&ReasonLabel { reason }));
        }
        let records_skipped = Family::<SkipLabel, Counter>::default();
        registry.register(
            "records_skipped",
            "Records the broker no longer held when they were due (retention, a trimmed log), by partition",
            records_skipped.clone(),
        );
        let unknown_state_events = Family::<StateLabel, Counter>::default();
        registry.register(
            "unknown_state_events",
            "Events whose state code is not one of austin's (kept and counted under their number)",
            unknown_state_events.clone(),
        );
        let redis_commands = Counter::default();
        registry.register(
            "redis_commands",
            "Commands sent to Redis",
            redis_commands.clone(),
        );
        let redis_script_operations = Counter::default();
        registry.register(
            "redis_script_operations",
            "Redis operations (LPUSH, HINCRBY, expiries) executed inside commit scripts",
            redis_script_operations.clone(),
        );
        let redis_errors = Counter::default();
        registry.register(
            "redis_errors",
            "Failed Redis commits (retried)",
            redis_errors.clone(),
        );
        let redis_commit_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "redis_commit_seconds",
            "Duration of one Redis commit",
            redis_commit_seconds.clone(),
        );
        let redis_script_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "redis_script_seconds",
            "Duration of one Redis commit script (bounded by redis.max_commit_ms)",
            redis_script_seconds.clone(),
        );
        let redis_conflicts = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "redis_conflicts",
            "Writes Redis refused (key of another type, non-numeric field, overflow, reserved key); the rest of the commit applied",
            redis_conflicts.clone(),
        );
        let clock_skew_seconds = FloatGauge::default();
        registry.register(
            "clock_skew_seconds",
            "Redis's clock minus this host's; anchorflow corrects its processing time by it",
            clock_skew_seconds.clone(),
        );
        let sink_commits = Family::<SinkLabel, Counter>::default();
        registry.register(
            "sink_commits",
            "Checkpoints committed by each sink",
            sink_commits.clone(),
        );
        let commits_rejected = Family::<RejectionLabel, Counter>::default();
        registry.register(
            "commits_rejected",
            "Sink commits refused by the fence check, by sink and reason",
            commits_rejected.clone(),
        );
        let redis_state_lost = Gauge::default();
        registry.register(
            "redis_state_lost",
            "Whether Redis has lost the fences (restarted empty): 1 until an operator recovers; see docs/exactly-once.md",
            redis_state_lost.clone(),
        );
        let parquet_rows = Family::<TableLabel, Counter>::default();
        registry.register(
            "parquet_rows",
            "Rows written to published Parquet files",
            parquet_rows.clone(),
        );
        let parquet_files = Family::<TableLabel, Counter>::default();
        registry.register(
            "parquet_files",
            "Parquet files published",
            parquet_files.clone(),
        );
        let parquet_bytes = Family::<TableLabel, Counter>::default();
        registry.register(
            "parquet_bytes",
            "Bytes of published Parquet files",
            parquet_bytes.clone(),
        );
        let mailbox_depth = Family::<ActorLabel, Gauge>::default();
        registry.register(
            "mailbox_depth",
            "Messages waiting in an actor kind's mailboxes",
            mailbox_depth.clone(),
        );
        let backpressure_seconds = Family::<ActorLabel, FloatCounter>::default();
        registry.register(
            "backpressure_seconds",
            "Time an actor kind spent waiting for room in a full downstream mailbox",
            backpressure_seconds.clone(),
        );
        let consumer_lag = Family::<PartitionLabel, Gauge>::default();
        registry.register(
            "consumer_lag",
            "Records between the committed offset and the end, per partition",
            consumer_lag.clone(),
        );
        let watermark_lag_seconds = Family::<PartitionLabel, FloatGauge>::default();
        registry.register(
            "watermark_lag_seconds",
            "Wall-clock time minus the partition's event-time watermark",
            watermark_lag_seconds.clone(),
        );
        let watermark_timestamp_seconds = FloatGauge::default();
        registry.register(
            "watermark_timestamp_seconds",
            "The instance's event-time watermark (minimum over non-idle partitions), Unix time",
            watermark_timestamp_seconds.clone(),
        );
        let idle_partitions = Gauge::default();
        registry.register(
            "idle_partitions",
            "Assigned partitions without records for time.idle_timeout_ms",
            idle_partitions.clone(),
        );
        let held_partitions = Gauge::default();
        registry.register(
            "held_partitions",
            "Assigned partitions with records not processed yet (paused by backpressure, behind the broker, or behind a silent broker): never idle",
            held_partitions.clone(),
        );
        let partitions_assigned = Gauge::default();
        registry.register(
            "partitions_assigned",
            "Kafka partitions assigned to this instance",
            partitions_assigned.clone(),
        );
        let late_events = Counter::default();
        registry.register(
            "late_events",
            "Events whose event-time window had already closed; they amend it",
            late_events.clone(),
        );
        let windows_closed = Counter::default();
        registry.register(
            "windows_closed",
            "Window results (window, template, state) emitted to the series hash",
            windows_closed.clone(),
        );
        let partitions_committed = Family::<TableLabel, Counter>::default();
        registry.register(
            "partitions_committed",
            "Warehouse folders marked complete with _SUCCESS",
            partitions_committed.clone(),
        );
        let partition_commit_hook_failures = Counter::default();
        registry.register(
            "partition_commit_hook_failures",
            "Partition-commit hook runs that failed or timed out",
            partition_commit_hook_failures.clone(),
        );
        let partition_pauses = Counter::default();
        registry.register(
            "partition_pauses",
            "Times a partition was paused because its reader was full",
            partition_pauses.clone(),
        );
        let checkpoints = Counter::default();
        registry.register(
            "checkpoints",
            "Checkpoints completed by every sink",
            checkpoints.clone(),
        );
        let checkpoint_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "checkpoint_seconds",
            "Time from triggering a checkpoint to its completion",
            checkpoint_seconds.clone(),
        );
        let last_checkpoint_timestamp_seconds = FloatGauge::default();
        registry.register(
            "last_checkpoint_timestamp_seconds",
            "Unix time of the last completed checkpoint",
            last_checkpoint_timestamp_seconds.clone(),
        );
        let actor_restarts = Family::<ActorLabel, Counter>::default();
        registry.register(
            "actor_restarts",
            "Supervised actor restarts",
            actor_restarts.clone(),
        );
        Metrics {
            registry: Arc::new(registry),
            records_read,
            events_decoded,
            dead_letters,
            records_skipped,
            unknown_state_events,
            redis_commands,
            redis_errors,
            redis_script_operations,
            redis_commit_seconds,
            redis_script_seconds,
            redis_conflicts,
            clock_skew_seconds,
            sink_commits,
            commits_rejected,
            redis_state_lost,
            parquet_rows,
            parquet_files,
            parquet_bytes,
            mailbox_depth,
            backpressure_seconds,
            consumer_lag,
            watermark_lag_seconds,
            watermark_timestamp_seconds,
            idle_partitions,
            held_partitions,
            late_events,
            windows_closed,
            partitions_committed,
            partition_commit_hook_failures,
            partitions_assigned,
            partition_pauses,
            checkpoints,
            checkpoint_seconds,
            last_checkpoint_timestamp_seconds,
            actor_restarts,
            ready: Arc::new(AtomicBool::new(false)),
            committed_offsets: Arc::default(),
            recent_checkpoints: Arc::default(),
            unknown_states: Arc::default(),
        }
    }

    /// Counts an event whose state code is not one of austin's.
    pub fn unknown_state(&self, state: i32) {
        let label = match self.unknown_states.lock() {
            Ok(mut seen) if seen.contains(&state) || seen.len() < UNKNOWN_STATE_LABELS => {
                seen.insert(state);
                StateCode::Code(state)
            }
            _ => StateCode::Other,
        };
        self.unknown_state_events
            .get_or_create(&StateLabel { state: label })
            .inc();
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// A per-actor-kind handle for mailbox depth and send-wait time.
    pub fn mailbox(&self, actor: &'static str) -> MailboxMeter {
        MailboxMeter {
            depth: self
                .mailbox_depth
                .get_or_create(&ActorLabel { actor })
                .clone(),
            blocked: self
                .backpressure_seconds
                .get_or_create(&ActorLabel { actor })
                .clone(),
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Ready: the last checkpoint completed and Redis has not lost the fences (a
    /// checkpoint still completing as the loss is found must not flip this back).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.redis_state_lost.get() == 0
    }

    /// Records one completed checkpoint's duration.
    pub fn checkpoint_completed(&self, took: Duration) {
        self.checkpoints.inc();
        self.checkpoint_seconds.observe(took.as_secs_f64());
        if let Ok(mut recent) = self.recent_checkpoints.lock() {
            if recent.len() == RECENT_CHECKPOINTS {
                recent.pop_front();
            }
            recent.push_back(took);
        }
    }

    /// Sum over partitions of the committed offsets: records durably processed when
    /// every partition started at offset 0.
    pub fn committed_total(&self) -> i64 {
        self.committed_offsets
            .lock()
            .map(|c| c.values().sum())
            .unwrap_or(0)
    }
}

/// Mailbox depth and blocked-send time of one actor kind. The sender calls
/// [`MailboxMeter::sent`] and the receiver [`MailboxMeter::received`]: actix does not
/// expose queue lengths, so depth is counted at both ends.
#[derive(Clone, Debug)]
pub struct MailboxMeter {
    depth: Gauge,
    blocked: FloatCounter,
}

impl MailboxMeter {
    pub fn sent(&self) {
        self.depth.inc();
    }

    pub fn received(&self) {
        self.depth.dec();
    }

    /// Records time spent waiting for room in this actor's mailbox.
    pub fn blocked_for(&self, waited: Duration) {
        self.blocked.inc_by(waited.as_secs_f64());
    }

    pub fn depth(&self) -> i64 {
        self.depth.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_state_labels_are_bounded() {
        let metrics = Metrics::new();
        for state in 0..1_000 {
            metrics.unknown_state(1_000 + state);
        }
        metrics.unknown_state(1_000);
        let text = metrics.encode();
        let series = text
            .lines()
            .filter(|l| l.starts_with("anchorflow_unknown_state_events_total{"))
            .count();
        assert_eq!(series, UNKNOWN_STATE_LABELS + 1, "{text}");
        assert!(text.contains(r#"anchorflow_unknown_state_events_total{state="1000"} 2"#));
        assert!(text.contains(&format!(
            r#"anchorflow_unknown_state_events_total{{state="other"}} {}"#,
            1_000 - UNKNOWN_STATE_LABELS
        )));
    }

    #[test]
    fn encodes_prometheus_names() {
        let metrics = Metrics::new();
        metrics.records_read.inc_by(3);
        metrics
            .dead_letters
            .get_or_create(&ReasonLabel {
                reason: "invalid_json",
            })
            .inc();
        metrics.mailbox("aggregator").sent();
        let text = metrics.encode();
        assert!(text.contains("anchorflow_records_read_total 3"), "{text}");
        assert!(
            text.contains(r#"anchorflow_dead_letters_total{reason="invalid_json"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"anchorflow_mailbox_depth{actor="aggregator"} 1"#),
            "{text}"
        );
    }

    /// Every series the shipped Grafana dashboard queries is one we export.
    #[test]
    fn the_dashboard_queries_only_exported_metrics() {
        let dashboard = include_str!("../../config/grafana-dashboard.json");
        // Families are encoded only once they have a series; give each one.
        let metrics = Metrics::new();
        let p = PartitionLabel { partition: 0 };
        metrics.consumer_lag.get_or_create(&p).set(0);
        metrics.watermark_lag_seconds.get_or_create(&p).set(0.0);
        metrics.mailbox("reader");
        let actor = ActorLabel { actor: "reader" };
        metrics.actor_restarts.get_or_create(&actor).inc();
        let table = TableLabel { table: "t" };
        metrics.parquet_rows.get_or_create(&table).inc();
        metrics.partitions_committed.get_or_create(&table).inc();
        let rejection = RejectionLabel {
            sink: "redis",
            reason: "stale_epoch",
        };
        metrics.commits_rejected.get_or_create(&rejection).inc();
        let reason = ReasonLabel {
            reason: "wrongtype",
        };
        metrics.redis_conflicts.get_or_create(&reason).inc();
        metrics.dead_letters.get_or_create(&reason).inc();
        let skip = SkipLabel {
            partition: 0,
            reason: "offset_out_of_range",
        };
        metrics.records_skipped.get_or_create(&skip).inc();
        metrics.unknown_state(9);
        let declared: Vec<String> = metrics
            .encode()
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect();
        let mut queried = 0;
        for (at, _) in dashboard.match_indices("anchorflow_") {
            let name: String = dashboard[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            let base = ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(&name);
            assert!(
                declared.iter().any(|d| d == base),
                "the dashboard queries {name}, which is not exported"
            );
            queried += 1;
        }
        assert!(queried >= 10, "found only {queried} queries");
    }
}
