//! Every metric anchorflow exports, declared in one place.
//!
//! Names follow Prometheus conventions (`anchorflow_<what>_<unit>_total`); labels are
//! low-cardinality (reason, table, actor, sink, partition number) and never carry user
//! data. Actors hold a cheap clone of [`Metrics`]; the HTTP endpoint encodes
//! [`Metrics::registry`].

use std::collections::BTreeSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

mod process;

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
pub struct BuildLabel {
    pub version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
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

/// Declares [`Metrics`]: one line per metric (field, type, how it is made, help text);
/// the metric's name is its field's, prefixed `anchorflow_` (counters get `_total`).
macro_rules! metrics {
    ($($(#[$doc:meta])* $field:ident: $ty:ty = $make:expr, $help:literal;)*) => {
        /// Handles to every metric; clone freely (each field is reference-counted).
        #[derive(Clone)]
        pub struct Metrics {
            pub registry: Arc<Registry>,
            $($(#[$doc])* pub $field: $ty,)*
            /// The unknown state codes that have a label of their own.
            unknown_states: Arc<Mutex<BTreeSet<i32>>>,
        }

        impl Metrics {
            pub fn new() -> Self {
                let mut registry = Registry::default();
                // The process's own series keep the names every client library uses.
                registry.register_collector(Box::new(process::ProcessCollector));
                let ours = registry.sub_registry_with_prefix("anchorflow");
                $(
                    let $field: $ty = $make;
                    ours.register(stringify!($field), $help, $field.clone());
                )*
                let metrics = Metrics {
                    registry: Arc::new(registry),
                    $($field,)*
                    unknown_states: Arc::default(),
                };
                metrics.export_from_start();
                metrics
            }
        }
    };
}

metrics! {
    records_read: Counter = Default::default(), "Kafka records read";
    events_decoded: Counter = Default::default(), "Records decoded into trace events";
    dead_letters: Family<ReasonLabel, Counter> = Default::default(), "Records sent to the dead-letter table, by reason";
    /// Records the broker deleted before they were read (their fence was out of range).
    records_skipped: Family<SkipLabel, Counter> = Default::default(), "Records the broker no longer held when they were due (retention, a trimmed log), by partition";
    /// Offsets a fetch jumped over, by what they turned out to be (`source/gap.rs`).
    offset_gaps: Family<OutcomeLabel, Counter> = Default::default(), "Times a fetch jumped over offsets, by outcome: reread (the broker had skipped records; they were read from further back) or not_in_log (no records there: compaction, transactions)";
    /// Partitions with records to read whose durable fence has not moved for
    /// `pipeline.stall_timeout_secs` (`source/progress.rs`).
    stalled_partitions: Gauge = Default::default(), "Assigned partitions with records to read whose fence has not moved for pipeline.stall_timeout_secs";
    /// Redis's own `evicted_keys`, as last read (`sinks/redis/client.rs`).
    redis_evicted_keys: Gauge = Default::default(), "Keys Redis has evicted since it started (INFO stats evicted_keys), as last read; growth means a maxmemory policy is dropping keys";
    unknown_state_events: Family<StateLabel, Counter> = Default::default(), "Events whose state code is not one of austin's (kept and counted under their number)";
    redis_commands: Counter = Default::default(), "Commands sent to Redis";
    redis_script_operations: Counter = Default::default(), "Redis operations (LPUSH, HINCRBY, expiries) executed inside commit scripts";
    redis_errors: Counter = Default::default(), "Failed Redis commits (retried)";
    redis_commit_seconds: Histogram = Histogram::new(exponential_buckets(0.001, 2.0, 16)), "Duration of one Redis commit";
    /// Duration of one commit script (a checkpoint's commit runs one or a few).
    redis_script_seconds: Histogram = Histogram::new(exponential_buckets(0.0005, 2.0, 16)), "Duration of one Redis commit script (bounded by redis.max_commit_ms)";
    /// Writes Redis refused (a key of another type, …), by reason; the rest applied.
    redis_conflicts: Family<ReasonLabel, Counter> = Default::default(), "Writes Redis refused (key of another type, non-numeric field, overflow, reserved key); the rest of the commit applied";
    /// Redis's clock minus this host's, as last measured.
    clock_skew_seconds: FloatGauge = Default::default(), "Redis's clock minus this host's; anchorflow corrects its processing time by it";
    sink_commits: Family<SinkLabel, Counter> = Default::default(), "Checkpoints committed by each sink";
    /// Commits a fence check refused (zombie, replay, or Redis lost its state).
    commits_rejected: Family<RejectionLabel, Counter> = Default::default(), "Sink commits refused by the fence check, by sink and reason";
    /// 1 while Redis has lost anchorflow's fences and an operator must recover.
    redis_state_lost: Gauge = Default::default(), "Whether Redis has lost the fences (restarted empty): 1 until an operator recovers; see docs/exactly-once.md";
    parquet_rows: Family<TableLabel, Counter> = Default::default(), "Rows written to published Parquet files";
    /// Rows the warehouse sink took in (appended to open files, published at a later roll).
    warehouse_rows: Counter = Default::default(), "Rows the warehouse sink appended to its open files (all tables; published at a later roll)";
    parquet_files: Family<TableLabel, Counter> = Default::default(), "Parquet files published";
    parquet_bytes: Family<TableLabel, Counter> = Default::default(), "Bytes of published Parquet files";
    mailbox_depth: Family<ActorLabel, Gauge> = Default::default(), "Messages waiting in an actor kind's mailboxes";
    backpressure_seconds: Family<ActorLabel, FloatCounter> = Default::default(), "Time an actor kind spent waiting for room in a full downstream mailbox";
    consumer_lag_records: Family<PartitionLabel, Gauge> = Default::default(), "Records between the committed offset and the end, per assigned partition";
    /// 1 while `/readyz` would answer 200 (set at each scrape, `src/http.rs`).
    ready: Gauge = Default::default(), "Whether the process is ready (1) or not (0); /readyz says why not";
    /// `pipeline.memory_budget_mb` in bytes, for alerts on resident memory.
    memory_budget_bytes: Gauge = Default::default(), "The memory budget the process holds its resident memory near (pipeline.memory_budget_mb)";
    /// 1, labelled with the version: which build runs where.
    build_info: Family<BuildLabel, Gauge> = Default::default(), "The running build: always 1, labelled with its version";
    /// Wall-clock now minus the partition's watermark.
    watermark_lag_seconds: Family<PartitionLabel, FloatGauge> = Default::default(), "Wall-clock time minus the partition's event-time watermark";
    /// The instance watermark (Unix seconds).
    watermark_timestamp_seconds: FloatGauge = Default::default(), "The instance's event-time watermark (minimum over non-idle partitions), Unix time";
    idle_partitions: Gauge = Default::default(), "Assigned partitions without records for time.idle_timeout_ms";
    /// Assigned partitions with records not processed yet (never idle, see `held.rs`).
    held_partitions: Gauge = Default::default(), "Assigned partitions with records not processed yet (paused by backpressure, behind the broker, or behind a silent broker): never idle";
    /// Partitions the source paused, by why: `reader_full` or `uncommitted` (see `source/flow.rs`).
    paused_partitions: Family<ReasonLabel, Gauge> = Default::default(), "Assigned partitions the source paused, by reason: reader_full (its reader's mailbox is full) or uncommitted (at the uncommitted bound: a sink is slower than the input, or stalled)";
    /// Readers with input they have not finished (see `source/held.rs`).
    readers_busy: Gauge = Default::default(), "Partition readers with input they have not finished (working, or waiting for room downstream)";
    partitions_assigned: Gauge = Default::default(), "Kafka partitions assigned to this instance";
    /// Events whose window had already closed for their partition (series path).
    late_events: Counter = Default::default(), "Events whose event-time window had already closed; they amend it";
    /// (window, businessId, state) results emitted to the series hash.
    windows_closed: Counter = Default::default(), "Window results (window, template, state) emitted to the series hash";
    /// Warehouse folders committed (`_SUCCESS` written, hook run), per table.
    partitions_committed: Family<TableLabel, Counter> = Default::default(), "Warehouse folders marked complete with _SUCCESS";
    /// Partition-commit hook runs that failed or timed out (retried later).
    partition_commit_hook_failures: Counter = Default::default(), "Partition-commit hook runs that failed or timed out";
    partition_pauses: Counter = Default::default(), "Times a partition was paused because its reader was full";
    /// Pauses at `pipeline.max_uncommitted_records` (a sink is slower than the input, or stalled).
    uncommitted_pauses: Counter = Default::default(), "Times a partition was paused because it reached pipeline.max_uncommitted_records";
    checkpoints: Counter = Default::default(), "Checkpoints completed by every sink";
    checkpoint_seconds: Histogram = Histogram::new(exponential_buckets(0.001, 2.0, 16)), "Time from triggering a checkpoint to its completion";
    last_checkpoint_timestamp_seconds: FloatGauge = Default::default(), "Unix time of the last completed checkpoint";
    actor_restarts: Family<ActorLabel, Counter> = Default::default(), "Supervised actor restarts";
}

/// The supervised actors, as labelled in `anchorflow_actor_restarts_total`.
pub const SUPERVISED_ACTORS: [&str; 5] = [
    "partition_reader",
    "redis_sink",
    "warehouse_sink",
    "timer",
    "partition_committer",
];

impl Metrics {
    /// Every labelled series whose labels are known in advance is exported from the
    /// start, at zero, so that a dashboard or an alert sees 0 rather than no data.
    fn export_from_start(&self) {
        self.build_info
            .get_or_create(&BuildLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        for reason in crate::logic::decode::DecodeError::REASONS {
            drop(self.dead_letters.get_or_create(&ReasonLabel { reason }));
        }
        for actor in SUPERVISED_ACTORS {
            drop(self.actor_restarts.get_or_create(&ActorLabel { actor }));
        }
        for sink in ["redis", "warehouse"] {
            drop(self.sink_commits.get_or_create(&SinkLabel { sink }));
            for reason in crate::protocol::reply::Rejection::REASONS {
                drop(
                    self.commits_rejected
                        .get_or_create(&RejectionLabel { sink, reason }),
                );
            }
        }
        for reason in [
            "wrong_type",
            "not_an_integer",
            "overflow",
            "reserved_key",
            "other",
        ] {
            drop(self.redis_conflicts.get_or_create(&ReasonLabel { reason }));
        }
        for reason in ["reader_full", "uncommitted"] {
            drop(
                self.paused_partitions
                    .get_or_create(&ReasonLabel { reason }),
            );
        }
        for outcome in ["reread", "not_in_log"] {
            drop(self.offset_gaps.get_or_create(&OutcomeLabel { outcome }));
        }
        for table in crate::logic::tables::Table::ALL {
            let table = TableLabel {
                table: table.name(),
            };
            drop(self.parquet_rows.get_or_create(&table));
            drop(self.parquet_files.get_or_create(&table));
            drop(self.parquet_bytes.get_or_create(&table));
            drop(self.partitions_committed.get_or_create(&table));
        }
    }

    /// A partition left this instance: its per-partition series go with it, so a
    /// dashboard does not show the lag of a partition another instance reads now.
    pub fn forget_partition(&self, partition: i32) {
        let label = PartitionLabel { partition };
        self.consumer_lag_records.remove(&label);
        self.watermark_lag_seconds.remove(&label);
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

    /// Records one completed checkpoint's duration.
    pub fn checkpoint_completed(&self, took: Duration) {
        self.checkpoints.inc();
        self.checkpoint_seconds.observe(took.as_secs_f64());
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
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

    /// A fresh process already exports what dashboards and alerts read: process
    /// metrics under their standard names, the build, and every labelled family whose
    /// labels are known, at zero; a revoked partition's series go.
    #[test]
    fn series_are_there_from_the_start_and_go_with_their_partition() {
        let metrics = Metrics::new();
        let text = metrics.encode();
        for series in [
            "process_resident_memory_bytes ",
            "process_cpu_seconds_total ",
            "process_open_fds ",
            "process_start_time_seconds ",
            &format!(
                "anchorflow_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
            r#"anchorflow_actor_restarts_total{actor="redis_sink"} 0"#,
            r#"anchorflow_sink_commits_total{sink="warehouse"} 0"#,
            r#"anchorflow_commits_rejected_total{sink="redis",reason="stale_epoch"} 0"#,
            r#"anchorflow_redis_conflicts_total{reason="wrong_type"} 0"#,
            r#"anchorflow_paused_partitions{reason="uncommitted"} 0"#,
            r#"anchorflow_offset_gaps_total{outcome="reread"} 0"#,
            r#"anchorflow_parquet_rows_total{table="ods_anchor_log"} 0"#,
            "anchorflow_stalled_partitions 0",
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
        let p = PartitionLabel { partition: 3 };
        metrics.consumer_lag_records.get_or_create(&p).set(9);
        assert!(metrics
            .encode()
            .contains(r#"anchorflow_consumer_lag_records{partition="3"} 9"#));
        metrics.forget_partition(3);
        assert!(!metrics.encode().contains(r#"partition="3""#));
    }

    /// Every series the shipped Grafana dashboard queries is one we export.
    #[test]
    fn the_dashboard_queries_only_exported_metrics() {
        let dashboard = include_str!("../../config/grafana-dashboard.json");
        // Families are encoded only once they have a series; give each one.
        let metrics = Metrics::new();
        let p = PartitionLabel { partition: 0 };
        metrics.consumer_lag_records.get_or_create(&p).set(0);
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
