//! `Timer`: drives periodic checkpoints and keeps the event-time watermarks. It keeps
//! its deadlines in a `BTreeMap` and sleeps until the earliest one (`run_later`); it
//! never spins. Each scheduled wake-up carries a generation so a superseded one is
//! ignored. Partition readers report the largest event time of every batch
//! ([`WatermarkUpdate`]); once a second the timer exports the watermarks (per-partition
//! lag, idle partitions, the instance watermark).
//!
//! Every checkpoint trigger carries the instance watermark; the barriers of that
//! checkpoint close the windows it passed. Window closes are deadlines in event time:
//! whenever the watermark moves (a report, or processing time while every partition is
//! idle, checked at each export) past the next window's `end + allowed_lateness`, the
//! timer triggers a checkpoint at once instead of waiting for the next tick. Tests run
//! it on paused tokio time.

use std::collections::BTreeMap;
use std::time::Duration;

use actix::prelude::*;
use tokio::time::Instant;
use tracing::debug;

use crate::logic::watermark::{InstanceMark, Watermarks};
use crate::logic::window::WindowSpec;
use crate::messages::TriggerCheckpoint;
use crate::messages::WatermarkUpdate;
use crate::metrics::{Metrics, PartitionLabel};
use crate::runtime::clock::Clock;
use crate::runtime::fault;
use crate::runtime::health::Health;
use crate::runtime::mailbox::Mailbox;
use crate::runtime::supervision::{self, Failure, Restarts};
use crate::source::held::Held;

/// Mailbox capacity: watermark updates arrive with `try_send`, one per record batch;
/// an update that finds the mailbox full is dropped, and the next one of the same
/// partition supersedes it (event-time maxima only grow), so a short queue suffices.
pub const TIMER_MAILBOX: usize = 64;

/// How often the watermark metrics are refreshed.
const WATERMARK_EXPORT: Duration = Duration::from_secs(1);

/// What a deadline is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Deadline {
    Checkpoint,
    WatermarkExport,
}

/// Counters of the timer, for tests and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimerCounters {
    /// Checkpoint triggers sent.
    pub checkpoints: u64,
    /// Triggers skipped because the source's mailbox was full.
    pub skipped: u64,
    /// Of the checkpoints, those triggered early because a window close came due.
    pub closes: u64,
}

pub struct Timer {
    /// Where checkpoint triggers go: the source, once it exists ([`TriggersTo`]); the
    /// readers it starts need the timer's address first.
    checkpoints: Option<Mailbox<TriggerCheckpoint>>,
    /// Set when the timer runs supervised (a panic restarts it with its state).
    restarts: Option<Restarts>,
    interval: Duration,
    watermarks: Option<(Watermarks, Metrics)>,
    windows: Option<WindowSpec>,
    /// The event-time deadline of the next window close.
    next_close: Option<i64>,
    deadlines: BTreeMap<(Instant, Deadline), ()>,
    generation: u64,
    /// Processing time, which no watermark passes.
    clock: Clock,
    /// Partitions with records still to read (never idle).
    held: Held,
    counters: TimerCounters,
}

impl Timer {
    pub fn new(interval: Duration) -> Self {
        Timer {
            checkpoints: None,
            restarts: None,
            interval,
            watermarks: None,
            windows: None,
            next_close: None,
            deadlines: BTreeMap::new(),
            generation: 0,
            clock: Clock::default(),
            held: Held::default(),
            counters: TimerCounters::default(),
        }
    }

    /// Sends checkpoint triggers to `source` from the start.
    pub fn with_triggers(mut self, source: Mailbox<TriggerCheckpoint>) -> Self {
        self.checkpoints = Some(source);
        self
    }

    pub fn counters(&self) -> TimerCounters {
        self.counters
    }

    /// Keeps watermarks from the readers' reports and exports them to `metrics`.
    pub fn with_watermarks(mut self, watermarks: Watermarks, metrics: Metrics) -> Self {
        self.watermarks = Some((watermarks, metrics));
        self
    }

    /// Reads processing time from `clock` (Redis's time; the default is this host's).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Never lets the partitions `held` marks turn idle.
    pub fn with_held(mut self, held: Held) -> Self {
        self.held = held;
        self
    }

    /// Runs under a supervisor: a panic in a handler restarts the timer, which keeps its
    /// watermarks (they only grow) and re-arms its deadlines.
    pub fn supervised(mut self, metrics: &Metrics, health: &Health) -> Self {
        self.restarts = Some(Restarts::new("timer", metrics, health));
        self
    }

    /// Triggers a checkpoint as soon as the watermark passes a window close.
    pub fn with_windows(mut self, windows: WindowSpec) -> Self {
        self.windows = Some(windows);
        self
    }

    /// Marks held partitions active: a partition with records waiting is not idle.
    fn touch_held(&mut self, now: Instant) {
        if let Some((watermarks, _)) = self.watermarks.as_mut() {
            for partition in self.held.partitions() {
                watermarks.touch(partition, now);
            }
        }
    }

    fn watermark(&mut self) -> Option<InstanceMark> {
        let now = Instant::now();
        self.touch_held(now);
        let (watermarks, _) = self.watermarks.as_ref()?;
        watermarks.instance_mark(now, self.clock.now_ms())
    }

    fn trigger(&mut self) -> bool {
        // Off the data path: a trigger that finds the source busy is skipped, the next
        // tick will do (and carry a newer watermark).
        let watermark = self.watermark();
        let Some(source) = &self.checkpoints else {
            return false; // not connected yet
        };
        match source.try_send(TriggerCheckpoint { watermark }) {
            Ok(()) => {
                self.counters.checkpoints += 1;
                true
            }
            Err(_) => {
                self.counters.skipped += 1;
                debug!("checkpoint trigger skipped: source busy");
                false
            }
        }
    }

    /// Checkpoints now if the watermark has passed the next window close.
    fn close_if_due(&mut self) {
        let (Some(spec), Some(InstanceMark { ms: mark, .. })) = (self.windows, self.watermark())
        else {
            return;
        };
        if self.next_close.is_some_and(|due| mark < due) {
            return;
        }
        if self.trigger() {
            self.counters.closes += 1;
            self.next_close = Some(spec.next_close_after(mark));
        }
    }

    fn export_watermarks(&mut self) {
        let now = Instant::now();
        self.touch_held(now);
        let Some((watermarks, metrics)) = &self.watermarks else {
            return;
        };
        let wall_ms = self.clock.now_ms();
        metrics
            .idle_partitions
            .set(watermarks.idle_partitions(now) as i64);
        metrics
            .held_partitions
            .set(self.held.partitions().len() as i64);
        metrics.readers_busy.set(self.held.busy_readers() as i64);
        if let Some(instance) = watermarks.instance(now, wall_ms) {
            metrics
                .watermark_timestamp_seconds
                .set(instance as f64 / 1000.0);
        }
        for partition in watermarks.partitions() {
            if let Some(mark) = watermarks.partition(partition, wall_ms) {
                metrics
                    .watermark_lag_seconds
                    .get_or_create(&PartitionLabel { partition })
                    .set((wall_ms - mark) as f64 / 1000.0);
            }
        }
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
                    self.trigger();
                    self.deadlines
                        .insert((at + self.interval, Deadline::Checkpoint), ());
                }
                Deadline::WatermarkExport => {
                    self.export_watermarks();
                    self.close_if_due();
                    self.deadlines
                        .insert((at + WATERMARK_EXPORT, Deadline::WatermarkExport), ());
                }
            }
        }
        self.arm(ctx);
    }
}

impl Actor for Timer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(crate::runtime::mailbox::actix_capacity(TIMER_MAILBOX));
        if let Some(restarts) = &self.restarts {
            restarts.started(ctx);
        }
        // After a restart the old deadlines' wake-ups are gone: arm afresh.
        self.deadlines.clear();
        let now = Instant::now();
        self.deadlines
            .insert((now + self.interval, Deadline::Checkpoint), ());
        if self.watermarks.is_some() {
            self.deadlines
                .insert((now + WATERMARK_EXPORT, Deadline::WatermarkExport), ());
        }
        self.arm(ctx);
    }
}

impl Timer {
    fn on_update(&mut self, update: WatermarkUpdate) {
        fault::panic_point(fault::TIMER_UPDATE);
        let Some((watermarks, metrics)) = &mut self.watermarks else {
            return;
        };
        let now = Instant::now();
        match update {
            WatermarkUpdate::Assigned {
                partition,
                restored,
            } => watermarks.assign(partition, now, restored),
            WatermarkUpdate::Observed {
                partition,
                max_event_ms,
            } => watermarks.observe(partition, max_event_ms, now),
            WatermarkUpdate::Revoked { partition } => {
                watermarks.revoke(partition);
                metrics
                    .watermark_lag_seconds
                    .remove(&PartitionLabel { partition });
            }
        }
        self.close_if_due();
    }
}

impl Supervised for Timer {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        if let Some(restarts) = &mut self.restarts {
            restarts.restarting();
        }
    }
}

impl Handler<WatermarkUpdate> for Timer {
    type Result = ();

    fn handle(&mut self, update: WatermarkUpdate, ctx: &mut Self::Context) {
        let handled = supervision::catch(|| self.on_update(update));
        match (handled, &mut self.restarts) {
            (Ok(()), Some(restarts)) => restarts.succeeded(),
            (Ok(()), None) => {}
            (Err(panic), Some(restarts)) => restarts.fail(ctx, Failure::Panic(panic)),
            (Err(panic), None) => supervision::stateful_panic("timer", &panic),
        }
    }
}

/// Connects the timer to the source it triggers checkpoints on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct TriggersTo(pub Mailbox<TriggerCheckpoint>);

impl Handler<TriggersTo> for Timer {
    type Result = ();

    fn handle(&mut self, TriggersTo(source): TriggersTo, _ctx: &mut Self::Context) {
        self.checkpoints = Some(source);
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

    fn triggers(recipient: Recipient<TriggerCheckpoint>) -> Mailbox<TriggerCheckpoint> {
        Mailbox::for_recipient(recipient, 4, Metrics::new().mailbox("source"))
    }

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

    /// Records the watermark of every trigger.
    struct Recorder(Arc<std::sync::Mutex<Vec<Option<i64>>>>);
    impl Actor for Recorder {
        type Context = Context<Self>;
    }
    impl Handler<TriggerCheckpoint> for Recorder {
        type Result = ();
        fn handle(&mut self, trigger: TriggerCheckpoint, _: &mut Self::Context) {
            self.0.lock().unwrap().push(trigger.watermark.map(|m| m.ms));
        }
    }

    /// Window closes are event-time deadlines: a checkpoint is triggered the moment
    /// the watermark reaches a window's end, not a millisecond before; a partition that
    /// goes quiet holds closes back for exactly the idle timeout.
    #[actix::test]
    async fn triggers_a_checkpoint_when_the_watermark_reaches_a_window_close() {
        tokio::time::pause();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let recorder = Recorder(seen.clone()).start();
        let watermarks = Watermarks::new(Duration::from_secs(5), Duration::from_secs(30));
        // Periodic ticks far apart, so every trigger seen here is a window close.
        let timer = Timer::new(Duration::from_secs(3_600))
            .with_triggers(triggers(recorder.recipient()))
            .with_watermarks(watermarks, Metrics::new())
            .with_windows(WindowSpec::new(60_000, 0, chrono_tz::UTC))
            .start();
        let observe = |partition, ms| WatermarkUpdate::Observed {
            partition,
            max_event_ms: Some(ms),
        };
        for partition in [0, 1] {
            timer
                .send(WatermarkUpdate::Assigned {
                    partition,
                    restored: None,
                })
                .await
                .unwrap();
        }
        timer.send(observe(0, 100_000)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            seen.lock().unwrap().is_empty(),
            "partition 1 unknown: no watermark"
        );
        // The first watermark (59 s) triggers once; the next close is at 60 s.
        timer.send(observe(1, 64_000)).await.unwrap();
        timer.send(observe(1, 64_999)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(*seen.lock().unwrap(), vec![Some(59_000)]);
        timer.send(observe(1, 65_000)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(*seen.lock().unwrap(), vec![Some(59_000), Some(60_000)]);
        // Partition 1 goes quiet; partition 0 delivers every second. Until partition 1
        // is idle its 60 s watermark holds the next close (120 s) back.
        for _ in 0..29 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            timer.send(observe(0, 200_000)).await.unwrap();
        }
        assert_eq!(
            seen.lock().unwrap().len(),
            2,
            "held back before the idle timeout"
        );
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            timer.send(observe(0, 200_000)).await.unwrap();
        }
        assert_eq!(
            *seen.lock().unwrap(),
            vec![Some(59_000), Some(60_000), Some(195_000)]
        );
        let counters = timer.send(GetTimerCounters).await.unwrap();
        assert_eq!(counters.closes, 3);
    }

    #[actix::test]
    async fn triggers_once_per_interval_on_simulated_time() {
        tokio::time::pause();
        let seen = Arc::new(AtomicU64::new(0));
        let capture = Capture(seen.clone()).start();
        let timer = Timer::new(Duration::from_secs(1))
            .with_triggers(triggers(capture.recipient()))
            .start();
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
                skipped: 0,
                closes: 0
            }
        );
    }

    #[actix::test]
    async fn exports_watermarks_and_idle_partitions_on_simulated_time() {
        tokio::time::pause();
        let capture = Capture(Arc::default()).start();
        let metrics = Metrics::new();
        let watermarks = Watermarks::new(Duration::from_secs(5), Duration::from_secs(30));
        let timer = Timer::new(Duration::from_secs(1))
            .with_triggers(triggers(capture.recipient()))
            .with_watermarks(watermarks, metrics.clone())
            .start();
        let now_ms = chrono::Utc::now().timestamp_millis();
        for partition in [0, 1] {
            timer
                .send(WatermarkUpdate::Assigned {
                    partition,
                    restored: None,
                })
                .await
                .unwrap();
        }
        let partition_0_delivers = WatermarkUpdate::Observed {
            partition: 0,
            max_event_ms: Some(now_ms),
        };
        timer.send(partition_0_delivers).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(metrics.idle_partitions.get(), 0);
        let lag = metrics
            .watermark_lag_seconds
            .get_or_create(&PartitionLabel { partition: 0 })
            .get();
        assert!((5.0..10.0).contains(&lag), "lag {lag}");
        assert_eq!(
            metrics.watermark_timestamp_seconds.get(),
            0.0,
            "partition 1 has not spoken: no instance watermark yet"
        );
        // Partition 1 stays silent past the idle timeout and stops holding it back,
        // while partition 0 keeps delivering.
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            timer.send(partition_0_delivers).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(metrics.idle_partitions.get(), 1);
        assert_eq!(
            metrics.watermark_timestamp_seconds.get(),
            (now_ms - 5_000) as f64 / 1000.0
        );
        timer
            .send(WatermarkUpdate::Revoked { partition: 1 })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(metrics.idle_partitions.get(), 0);
    }
}
