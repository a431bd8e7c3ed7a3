//! `Timer`: drives periodic checkpoints. It keeps its deadlines in a `BTreeMap` and
//! sleeps until the earliest one (`run_later`); it never spins. Each scheduled wake-up
//! carries a generation so a superseded one is ignored. Tests run it on paused tokio
//! time.

use std::collections::BTreeMap;
use std::time::Duration;

use actix::prelude::*;
use tokio::time::Instant;
use tracing::debug;

use crate::kafka_source::TriggerCheckpoint;

/// What a deadline is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Deadline {
    Checkpoint,
}

/// Counters of the timer, for tests and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimerCounters {
    /// Checkpoint triggers sent.
    pub checkpoints: u64,
    /// Triggers skipped because the source's mailbox was full.
    pub skipped: u64,
}

pub struct Timer {
    checkpoints: Recipient<TriggerCheckpoint>,
    interval: Duration,
    deadlines: BTreeMap<(Instant, Deadline), ()>,
    generation: u64,
    counters: TimerCounters,
}

impl Timer {
    pub fn new(checkpoints: Recipient<TriggerCheckpoint>, interval: Duration) -> Self {
        Timer {
            checkpoints,
            interval,
            deadlines: BTreeMap::new(),
            generation: 0,
            counters: TimerCounters::default(),
        }
    }

    pub fn counters(&self) -> TimerCounters {
        self.counters
    }

    fn arm(&mut self, ctx: &mut Context<Self>) {
        self.generation += 1;
        let generation = self.generation;
        let Some(&(at, _)) = self.deadlines.keys().next() else {
            return;
        };
        ctx.run_later(
            at.saturating_duration_since(Instant::now()),
            move |timer, ctx| {
                if timer.generation == generation {
                    timer.fire(ctx);
                }
            },
        );
    }

    fn fire(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        while let Some(entry) = self.deadlines.first_entry() {
            let (at, deadline) = *entry.key();
            if at > now {
                break;
            }
            entry.remove();
            match deadline {
                Deadline::Checkpoint => {
                    // Off the data path: a trigger that finds the source busy is skipped,
                    // the next tick will do.
                    match self.checkpoints.try_send(TriggerCheckpoint) {
                        Ok(()) => self.counters.checkpoints += 1,
                        Err(_) => {
                            self.counters.skipped += 1;
                            debug!("checkpoint trigger skipped: source busy");
                        }
                    }
                    self.deadlines
                        .insert((at + self.interval, Deadline::Checkpoint), ());
                }
            }
        }
        self.arm(ctx);
    }
}

impl Actor for Timer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.deadlines
            .insert((Instant::now() + self.interval, Deadline::Checkpoint), ());
        self.arm(ctx);
    }
}

/// Asks the timer for its counters.
#[derive(Message)]
#[rtype(result = "TimerCounters")]
pub struct GetTimerCounters;

impl Handler<GetTimerCounters> for Timer {
    type Result = MessageResult<GetTimerCounters>;

    fn handle(&mut self, _: GetTimerCounters, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.counters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    struct Capture(Arc<AtomicU64>);
    impl Actor for Capture {
        type Context = Context<Self>;
    }
    impl Handler<TriggerCheckpoint> for Capture {
        type Result = ();
        fn handle(&mut self, _: TriggerCheckpoint, _: &mut Self::Context) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[actix::test]
    async fn triggers_once_per_interval_on_simulated_time() {
        tokio::time::pause();
        let seen = Arc::new(AtomicU64::new(0));
        let capture = Capture(seen.clone()).start();
        let timer = Timer::new(capture.recipient(), Duration::from_secs(1)).start();
        tokio::time::sleep(Duration::from_millis(999)).await;
        assert_eq!(seen.load(Ordering::SeqCst), 0);
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(seen.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(seen.load(Ordering::SeqCst), 11);
        let counters = timer.send(GetTimerCounters).await.unwrap();
        assert_eq!(
            counters,
            TimerCounters {
                checkpoints: 11,
                skipped: 0
            }
        );
    }
}
