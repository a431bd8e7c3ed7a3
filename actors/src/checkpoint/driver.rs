//! The checkpoint driver: the one place where checkpoints are started, where every
//! report that travels back up the pipeline arrives, and where a final checkpoint is
//! waited for.
//!
//! It owns the [`Coordinator`] and the receiving end of the [`Ack`] channel. What
//! reports to it holds a typed handle made here: each sink a [`SinkAcks`] (given in its
//! constructor by the pipeline's wiring), each drainer task a [`DrainAcks`]. The Kafka
//! source holds the driver and turns its [`Event`]s into flow control and offset
//! commits (`source/flow.rs`); the final-checkpoint wait runs on the source's thread,
//! which may be inside librdkafka's rebalance callback, so the acks travel over a std
//! channel that can be waited on there.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::checkpoint::barrier::{CheckpointKind, CheckpointSpec};
use crate::checkpoint::claim::SinkKind;
use crate::checkpoint::coordinator::{CheckpointDone, Coordinator};
use crate::messages::Ack;

/// A sink's handle for reporting the checkpoints it made durable.
#[derive(Clone)]
pub struct SinkAcks {
    sink: SinkKind,
    acks: Sender<Ack>,
}

impl SinkAcks {
    /// Everything before `fences[p]` is durable in this sink for `checkpoint`. The
    /// source may already be gone during teardown; there is nothing to do then.
    pub fn committed(&self, checkpoint: u64, fences: Vec<(i32, i64)>) {
        let _ = self.acks.send(Ack::SinkCommitted {
            sink: self.sink,
            checkpoint,
            fences,
        });
    }

    /// A handle whose reports arrive at `acks`, for a sink tested alone.
    pub fn to(sink: SinkKind, acks: Sender<Ack>) -> Self {
        SinkAcks { sink, acks }
    }
}

/// A drainer task's handle for saying that a paused partition's queue was delivered.
#[derive(Clone)]
pub struct DrainAcks(Sender<Ack>);

impl DrainAcks {
    pub fn drained(&self, partition: i32) {
        let _ = self.0.send(Ack::Drained { partition });
    }
}

/// What an ack means to the source.
#[derive(Debug)]
pub enum Event {
    /// A paused partition's queued items reached its reader.
    Drained(i32),
    /// Checkpoints every sink has now committed, oldest first.
    Completed(Vec<CheckpointDone>),
}

pub struct CheckpointDriver {
    coordinator: Coordinator,
    acks: Receiver<Ack>,
    sender: Sender<Ack>,
    /// The last checkpoint completed; a final checkpoint's wait looks here.
    completed: Option<u64>,
}

impl Default for CheckpointDriver {
    fn default() -> Self {
        let (sender, acks) = mpsc::channel();
        CheckpointDriver {
            coordinator: Coordinator::default(),
            acks,
            sender,
            completed: None,
        }
    }
}

/// What the driver needs of the source while it waits: starting a checkpoint places
/// barriers in the partitions' streams, and each event it receives meanwhile is
/// applied (drained partitions resume; completed checkpoints commit offsets).
pub trait Driven {
    fn driver(&mut self) -> &mut CheckpointDriver;
    fn start(&mut self, kind: CheckpointKind) -> Option<u64>;
    fn apply(&mut self, event: Event);
}

impl CheckpointDriver {
    pub fn sink_acks(&self, sink: SinkKind) -> SinkAcks {
        SinkAcks::to(sink, self.sender.clone())
    }

    pub fn drain_acks(&self) -> DrainAcks {
        DrainAcks(self.sender.clone())
    }

    /// Starts a checkpoint over `partitions`, if one may start (`coordinator.rs`).
    pub fn start(
        &mut self,
        partitions: Vec<i32>,
        kind: CheckpointKind,
    ) -> Option<Arc<CheckpointSpec>> {
        self.coordinator.start(partitions, kind)
    }

    /// Whether a periodic checkpoint may start now.
    pub fn may_start_periodic(&self) -> bool {
        self.coordinator.may_start(CheckpointKind::Periodic)
    }

    pub fn in_flight(&self) -> bool {
        self.coordinator.in_flight().is_some()
    }

    /// The oldest checkpoint in flight and how long it has been.
    pub fn running(&self) -> Option<(u64, Duration)> {
        self.coordinator.running()
    }

    /// Keeps the timer's latest watermark; checkpoints close the windows it passed.
    pub fn set_watermark(&mut self, watermark: Option<crate::logic::watermark::InstanceMark>) {
        self.coordinator.set_watermark(watermark);
    }

    /// The source applied a completed checkpoint.
    pub fn finished(&mut self, id: u64) {
        self.completed = Some(id);
    }

    /// The event an ack stands for; `None` for a sink's report that belongs to no
    /// checkpoint in flight, or one that completes nothing yet.
    fn event(&mut self, ack: Ack) -> Option<Event> {
        match ack {
            Ack::Drained { partition } => Some(Event::Drained(partition)),
            Ack::SinkCommitted {
                sink,
                checkpoint,
                fences,
            } => match self.coordinator.sink_committed(sink, checkpoint, fences) {
                Ok(done) if done.is_empty() => None,
                Ok(done) => Some(Event::Completed(done)),
                Err(stale) => {
                    warn!(
                        checkpoint = stale.checkpoint,
                        current = stale.current,
                        sink = sink.name(),
                        "stale sink commit ignored"
                    );
                    None
                }
            },
        }
    }

    /// The events of the acks that arrived, without waiting.
    pub fn arrived(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        while let Ok(ack) = self.acks.try_recv() {
            events.extend(self.event(ack));
        }
        events
    }

    /// Waits for the next event until `deadline`.
    fn next_until(&mut self, deadline: Instant) -> anyhow::Result<Option<Event>> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.acks.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(ack) => Ok(self.event(ack)),
            Err(RecvTimeoutError::Timeout) if Instant::now() >= deadline => {
                anyhow::bail!("deadline passed")
            }
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => anyhow::bail!("the sinks are gone"),
        }
    }
}

/// Applies events until `done` holds or `deadline` passes.
fn wait(
    source: &mut impl Driven,
    deadline: Instant,
    done: impl Fn(&CheckpointDriver) -> bool,
) -> anyhow::Result<()> {
    while !done(source.driver()) {
        if let Some(event) = source.driver().next_until(deadline)? {
            source.apply(event);
        }
    }
    Ok(())
}

/// Runs a final checkpoint and waits for it (revocation and shutdown): a periodic one
/// in flight finishes first, since a final checkpoint starts only when none is.
pub fn final_checkpoint(source: &mut impl Driven, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let late = |what: &str| format!("{what} did not complete within {timeout:?}");
    wait(source, deadline, |d| !d.in_flight())
        .map_err(|e| e.context(late("the checkpoint before the final one")))?;
    let Some(id) = source.start(CheckpointKind::Final) else {
        return Ok(());
    };
    wait(source, deadline, |d| d.completed == Some(id))
        .map_err(|e| e.context(late("the final checkpoint")))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The source as far as the driver sees it: partitions 0 and 1, whose sinks ack
    /// each checkpoint the moment it starts when `answering`, and a record of what was
    /// applied.
    struct Source {
        driver: CheckpointDriver,
        sinks: Vec<SinkAcks>,
        answering: bool,
        applied: Vec<String>,
    }

    impl Source {
        fn new(answering: bool) -> Self {
            let driver = CheckpointDriver::default();
            let sinks = SinkKind::ALL.iter().map(|s| driver.sink_acks(*s)).collect();
            Source {
                driver,
                sinks,
                answering,
                applied: Vec::new(),
            }
        }

        fn ack_all(&self, checkpoint: u64, fence: i64) {
            for sink in &self.sinks {
                sink.committed(checkpoint, vec![(0, fence), (1, fence)]);
            }
        }
    }

    impl Driven for Source {
        fn driver(&mut self) -> &mut CheckpointDriver {
            &mut self.driver
        }

        fn start(&mut self, kind: CheckpointKind) -> Option<u64> {
            let spec = self.driver.start(vec![0, 1], kind)?;
            if self.answering {
                self.ack_all(spec.id, 10 * spec.id as i64);
            }
            Some(spec.id)
        }

        fn apply(&mut self, event: Event) {
            match event {
                Event::Drained(p) => self.applied.push(format!("drained {p}")),
                Event::Completed(done) => {
                    for done in done {
                        self.applied.push(format!("completed {}", done.id));
                        self.driver.finished(done.id);
                    }
                }
            }
        }
    }

    /// A checkpoint completes once every sink acked it; a drainer's ack is its own
    /// event; an ack for no checkpoint in flight is dropped.
    #[test]
    fn acks_become_events_once_every_sink_reported() {
        let mut source = Source::new(false);
        let id = source.start(CheckpointKind::Periodic).unwrap();
        source.sinks[0].committed(id, vec![(0, 5), (1, 5)]);
        source.driver.drain_acks().drained(1);
        source.sinks[0].committed(id + 7, vec![(0, 5)]);
        let events = source.driver.arrived();
        assert!(
            matches!(events[..], [Event::Drained(1)]),
            "one sink is not enough: {events:?}"
        );
        source.sinks[1].committed(id, vec![(0, 5), (1, 4)]);
        let events = source.driver.arrived();
        let [Event::Completed(done)] = &events[..] else {
            panic!("{events:?}");
        };
        assert_eq!(done[0].id, id);
        assert_eq!(done[0].durable, BTreeMap::from([(0, 5), (1, 4)]));
    }

    /// The final checkpoint waits for the periodic one in flight, then for itself,
    /// applying every event on the way.
    #[test]
    fn a_final_checkpoint_waits_for_the_one_in_flight_then_for_itself() {
        let mut source = Source::new(true);
        source.answering = false;
        let periodic = source.start(CheckpointKind::Periodic).unwrap();
        source.answering = true;
        source.ack_all(periodic, 3);
        final_checkpoint(&mut source, Duration::from_secs(5)).unwrap();
        assert_eq!(source.applied, ["completed 1", "completed 2"]);
        assert!(!source.driver.in_flight());
    }

    /// Sinks that never answer: the wait ends at its deadline with an error naming
    /// which checkpoint did not complete.
    #[test]
    fn a_final_checkpoint_no_sink_answers_fails_at_the_deadline() {
        let mut source = Source::new(false);
        let error = final_checkpoint(&mut source, Duration::from_millis(50)).unwrap_err();
        assert!(
            format!("{error:#}").contains("the final checkpoint did not complete"),
            "{error:#}"
        );
    }
}
