//! The rdkafka side of the source: [`SourceContext`] receives librdkafka's callbacks
//! (logs, errors, statistics, rebalances) and forwards them: statistics to [`Held`]
//! and the lag metric, an assignment to the [`Claimer`] and then the [`SourceState`],
//! a revocation to a final checkpoint. Rebalance callbacks run inside `poll`, on the
//! source's own thread, when the actor holds no lock.
//!
//! A revocation checkpoints the revoked partitions first (bounded by
//! `pipeline.revoke_timeout_ms`). A lost assignment (the group moved on without us)
//! commits nothing and stops the process: the new owner's claim has already fenced
//! anything this instance still had in flight.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use tracing::{debug, error, info, warn};

use crate::metrics::{Metrics, PartitionLabel};
use crate::protocol::fences::ClaimError;
use crate::runtime::exit;
use crate::runtime::repeats::{kind_of, Repeats};
use crate::source::assignment::{Claimer, Claims};
use crate::source::control::{OffsetCommit, PartitionControl};
use crate::source::flow::SourceState;
use crate::source::held::Held;

/// How long a seek or a watermark query may block the poll thread.
pub(super) const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

pub type SourceConsumer = BaseConsumer<SourceContext>;

pub struct SourceContext {
    pub state: Mutex<SourceState>,
    pub metrics: Metrics,
    pub claimer: Claimer,
    pub revoke_timeout: Duration,
    /// Whether a partition without fences or committed offset starts at its end.
    pub start_at_latest: bool,
    /// Shared with the timer: partitions that are not idle whatever their silence.
    pub held: Held,
    /// librdkafka's repeated errors and warnings, logged once per window.
    pub repeats: Repeats,
}

impl SourceContext {
    pub fn lock(&self) -> MutexGuard<'_, SourceState> {
        // A panic while holding this lock already took the process down with it (it
        // can only happen in librdkafka's callbacks, which abort); recovering the
        // guard keeps shutdown working.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn topic(&self) -> &str {
        &self.claimer.topic
    }
}

fn single(topic: &str, partition: i32) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    tpl
}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

impl PartitionControl for SourceConsumer {
    fn pause(&self, partition: i32) {
        if let Err(e) = Consumer::pause(self, &single(self.context().topic(), partition)) {
            warn!(partition, error = %e, "could not pause partition");
        }
    }

    fn resume(&self, partition: i32, next_offset: i64) {
        let topic = self.context().topic();
        if let Err(e) = Consumer::resume(self, &single(topic, partition)) {
            warn!(partition, error = %e, "could not resume partition");
        }
        // Records below `next_offset` that still arrive are skipped on poll.
        if next_offset >= 0 {
            if let Err(e) = self.seek(
                topic,
                partition,
                Offset::Offset(next_offset),
                BROKER_TIMEOUT,
            ) {
                warn!(partition, offset = next_offset, error = %e, "could not seek after resume");
            }
        }
    }

    fn commit(&self, offsets: &BTreeMap<i32, i64>, commit: OffsetCommit) -> anyhow::Result<()> {
        let mut tpl = TopicPartitionList::new();
        for (&partition, &offset) in offsets {
            tpl.add_partition_offset(self.context().topic(), partition, Offset::Offset(offset))
                .context("expressing an offset")?;
        }
        let mode = match commit {
            OffsetCommit::Wait => CommitMode::Sync,
            OffsetCommit::Send => CommitMode::Async,
        };
        Consumer::commit(self, &tpl, mode).context("committing offsets to the group")
    }
}

impl ClientContext for SourceContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        let loud = !matches!(
            level,
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info | RDKafkaLogLevel::Debug
        );
        let repeated = match loud {
            true => match self
                .repeats
                .admit(&kind_of(fac, log_message), Instant::now())
            {
                Some(held) => held,
                None => return,
            },
            false => 0,
        };
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                error!(target: "librdkafka", facility = fac, repeated, "{log_message}")
            }
            RDKafkaLogLevel::Warning => {
                warn!(target: "librdkafka", facility = fac, repeated, "{log_message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                info!(target: "librdkafka", facility = fac, "{log_message}")
            }
            RDKafkaLogLevel::Debug => debug!(target: "librdkafka", facility = fac, "{log_message}"),
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if !is_client_error(&error) {
            debug!(target: "librdkafka", error = %error, reason, "kafka client event");
            return;
        }
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown) {
            // Until statistics show a broker answering again, nothing assigned is idle.
            self.held
                .set_unreachable(self.lock().assigned().into_iter().collect());
        }
        // The same error comes at every poll while it lasts: once, then a count.
        let kind = kind_of("error", &error.to_string());
        if let Some(repeated) = self.repeats.admit(&kind, Instant::now()) {
            error!(target: "librdkafka", error = %error, reason, repeated, "kafka client error");
        }
    }

    fn stats(&self, statistics: Statistics) {
        self.held.update(&statistics);
        self.note_offsets(&statistics);
        // Only partitions assigned here: statistics go on naming revoked ones for a
        // while, and their series were removed on revocation.
        let assigned = self.lock().assigned();
        for topic in statistics.topics.values() {
            for (id, partition) in &topic.partitions {
                if !assigned.contains(id) {
                    continue; // revoked, or librdkafka's internal "unassigned" partition
                }
                let lag = partition_lag(
                    partition.consumer_lag,
                    partition.hi_offset,
                    partition.lo_offset,
                    partition.app_offset,
                );
                if let Some(lag) = lag {
                    self.metrics
                        .consumer_lag_records
                        .get_or_create(&PartitionLabel { partition: *id })
                        .set(lag);
                }
            }
        }
    }
}

/// Records between the end of a partition and where this group will continue.
/// librdkafka's `consumer_lag` is -1 until an offset has been committed; fall back to
/// the high watermark minus the position the application has read to.
fn partition_lag(
    consumer_lag: i64,
    hi_offset: i64,
    lo_offset: i64,
    app_offset: i64,
) -> Option<i64> {
    if consumer_lag >= 0 {
        return Some(consumer_lag);
    }
    if hi_offset < 0 {
        return None;
    }
    Some((hi_offset - app_offset.max(lo_offset).max(0)).max(0))
}

impl SourceContext {
    /// Where partitions without fences start: the group's committed offset if there
    /// is one (the cold-start fallback, e.g. after moving from another consumer),
    /// otherwise the beginning or the end as `auto.offset.reset` says.
    fn cold_start(
        &self,
        consumer: &SourceConsumer,
        partitions: &[i32],
    ) -> anyhow::Result<BTreeMap<i32, i64>> {
        let mut tpl = TopicPartitionList::new();
        for &p in partitions {
            tpl.add_partition(self.topic(), p);
        }
        let timeout = self.claimer.redis_timeout;
        let committed = consumer
            .committed_offsets(tpl, timeout)
            .context("reading the group's committed offsets")?;
        let mut out = BTreeMap::new();
        for &partition in partitions {
            let committed = committed
                .find_partition(self.topic(), partition)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) if o >= 0 => Some(o),
                    _ => None,
                });
            let offset = match committed {
                Some(offset) => {
                    warn!(partition, offset, "no fences in Redis for this partition: starting at the group's committed offset (cold-start fallback)");
                    offset
                }
                None => {
                    let (low, high) = consumer
                        .fetch_watermarks(self.topic(), partition, timeout)
                        .context("reading the partition's watermarks")?;
                    let offset = if self.start_at_latest { high } else { low };
                    info!(
                        partition,
                        offset, "first run on this partition: fences initialised"
                    );
                    offset
                }
            };
            out.insert(partition, offset);
        }
        Ok(out)
    }

    /// Claims newly assigned partitions and starts their readers; stops the process
    /// when they cannot be claimed (a restart tries again).
    fn on_assign(&self, consumer: &SourceConsumer, tpl: &mut TopicPartitionList) {
        let partitions = partitions_of(tpl);
        info!(?partitions, "partitions assigned; claiming them");
        let deadline = Instant::now() + self.revoke_timeout;
        let claimed = self
            .claimer
            .claim_with_retries(&partitions, deadline, |fresh| {
                self.cold_start(consumer, fresh)
            });
        let claims = match claimed {
            Ok(claims) => claims,
            Err(error) => return self.claim_failed(&partitions, error),
        };
        self.start_reading(tpl, claims);
    }

    fn claim_failed(&self, partitions: &[i32], error: ClaimError) {
        let health = self.lock().health.clone();
        health.failed();
        match error {
            ClaimError::StateLost { marker } => {
                self.metrics.redis_state_lost.set(1);
                health.set_state_lost(true);
                error!(%marker, "Redis has lost anchorflow's fences");
                exit::stop(
                    exit::STATE_LOST,
                    "not reading until an operator recovers them (docs/exactly-once.md)",
                );
            }
            ClaimError::Other(e) => {
                error!(
                    ?partitions,
                    error = format!("{e:#}"),
                    "could not claim assigned partitions"
                );
                exit::stop(exit::FENCED, "exiting so that a restart tries again");
            }
            ClaimError::Unpublishable(e) => {
                error!(
                    ?partitions,
                    error = format!("{e:#}"),
                    "rows below the fences were recorded but cannot be published"
                );
                exit::stop(exit::IO_ERROR, "not reading (docs/exactly-once.md)");
            }
        }
    }

    fn start_reading(&self, tpl: &mut TopicPartitionList, claims: Claims) {
        let mut state = self.lock();
        for (partition, (claim, windows)) in claims {
            info!(
                partition,
                epoch = claim.epoch,
                redis_fence = claim.redis,
                warehouse_fence = claim.warehouse,
                "partition claimed"
            );
            if let Err(e) =
                tpl.set_partition_offset(self.topic(), partition, Offset::Offset(claim.start()))
            {
                error!(partition, error = %e, "cannot set the start offset");
            }
            state.assign(partition, claim, windows);
        }
    }

    /// Checkpoints revoked partitions before they go; a lost assignment stops the
    /// process instead (the group moved on: nothing may be committed).
    fn on_revoke(&self, consumer: &SourceConsumer, tpl: &TopicPartitionList) {
        let partitions = partitions_of(tpl);
        let assigned = self.lock().assigned();
        if !partitions.iter().any(|p| assigned.contains(p)) {
            // Released by a shutdown (`KafkaSource::finish`), whose final checkpoint
            // already ran, or failed: the revocation librdkafka runs while the consumer
            // closes has nothing left to commit, and must not wait for that checkpoint.
            debug!(?partitions, "revoked partitions were already released");
            return;
        }
        if consumer.assignment_lost() {
            error!(
                ?partitions,
                "assignment lost: the group moved on before we checkpointed"
            );
            exit::stop(
                exit::FENCED,
                "exiting so that a restart resumes from the stored fences",
            );
            return;
        }
        info!(?partitions, "partitions revoked; checkpointing them first");
        let mut state = self.lock();
        match state.final_checkpoint(consumer, self.revoke_timeout, OffsetCommit::Wait) {
            Ok(()) => info!(?partitions, "revoked partitions checkpointed"),
            Err(e) => {
                // The shards and the sinks still hold the revoked partitions' part of a
                // checkpoint that can never complete, and their open files hold rows the
                // next owner reads again: only a restart from the fences is consistent.
                error!(
                    ?partitions,
                    error = format!("{e:#}"),
                    "revocation checkpoint incomplete"
                );
                exit::stop(
                    exit::FENCED,
                    "exiting so that a restart resumes from the stored fences",
                );
            }
        }
        for partition in partitions {
            state.unassign(partition);
        }
    }
}

impl ConsumerContext for SourceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.on_assign(consumer, tpl);
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                // librdkafka keeps a partition's pause across revocation and a later
                // assignment to this consumer; a partition revoked while paused (its
                // drainer or checkpoint still pending) would never be fetched again,
                // silently. Every slot starts unpaused, so the consumer must too.
                assigned.and_then(|()| Consumer::resume(consumer, tpl))
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.on_revoke(consumer, tpl);
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                error!(error = ?other, "rebalance error");
                Ok(())
            }
        };
        if let Err(e) = result {
            error!(error = %e, "applying the rebalance failed");
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            warn!(error = %e, "offset commit failed");
        }
    }
}

/// Whether an error event librdkafka reports is one: rust-rdkafka hands every error
/// event to the context, partition EOF included, which with `enable.partition.eof`
/// (the end-of-backlog trigger, `kafka_source.rs`) is news, not a failure. Logged as an
/// error, it put an ERROR line in the log at every partition's end.
fn is_client_error(error: &rdkafka::error::KafkaError) -> bool {
    !matches!(error, rdkafka::error::KafkaError::PartitionEOF(_))
        && error.rdkafka_error_code() != Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
}

#[cfg(test)]
mod tests {
    use super::{is_client_error, partition_lag};
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;

    #[test]
    fn a_partition_end_is_not_a_client_error() {
        assert!(!is_client_error(&KafkaError::Global(
            RDKafkaErrorCode::PartitionEOF
        )));
        assert!(!is_client_error(&KafkaError::PartitionEOF(3)));
        assert!(is_client_error(&KafkaError::Global(
            RDKafkaErrorCode::AllBrokersDown
        )));
    }

    #[test]
    fn lag_falls_back_to_the_high_watermark() {
        assert_eq!(partition_lag(7, 100, 0, 93), Some(7));
        assert_eq!(
            partition_lag(-1, 100, 0, -1),
            Some(100),
            "nothing read or committed yet"
        );
        assert_eq!(partition_lag(-1, 100, 40, 60), Some(40));
        assert_eq!(partition_lag(-1, 0, 0, -1), Some(0), "empty partition");
        assert_eq!(partition_lag(-1, -1, -1, -1), None, "watermarks unknown");
    }
}
