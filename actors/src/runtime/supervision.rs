//! Supervision: what a failure means for each actor, and the restart that follows.
//!
//! actix's `Supervisor` restarts an actor that stopped by calling `restarting()` and
//! then `started()` on the same struct, with its mailbox untouched, so senders simply
//! wait (backpressure) while it is down. [`Restarts`] is the bookkeeping each
//! supervised actor keeps: [`Restarts::fail`] logs the failure, marks the process not
//! ready and stops the actor; [`Restarts::started`] makes the restarted actor wait out
//! a capped exponential backoff before it handles anything; [`Restarts::succeeded`]
//! ends the episode (readiness comes back with the next checkpoint).
//!
//! | actor | failure | what happens |
//! |---|---|---|
//! | partition reader | a panic while processing a batch | restart; the batch is processed again record by record, and a record that panics again is dead-lettered (`processing_panic`) |
//! | Redis sink | Redis unreachable, timing out, or without fences | restart; the commit in flight is kept and applied first |
//! | warehouse sink | Redis unreachable or timing out | restart; the record in flight is kept and written first |
//! | timer, partition committer | a panic | restart with their state (watermarks only grow; folders are re-read from Redis) |
//! | aggregator, either sink | a panic | exit 70: they hold uncommitted work of every partition, which only a re-read from the fences rebuilds |
//! | warehouse sink | a file cannot be written | exit 74 (same reason) |
//! | any | [`MAX_PANICS`] panics within [`PANIC_WINDOW`] | exit 70: restarts are not curing it |
//!
//! A panic anywhere else (outside [`catch`]) is a bug nothing can contain: the panic
//! hook ([`install_panic_hook`]) stops the process with exit 70 rather than leave an
//! actor silently dead; systemd restarts it, and the fences make that lose nothing.

use std::cell::Cell;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use actix::prelude::*;
use prometheus_client::metrics::counter::Counter;
use tracing::{error, warn};

use crate::metrics::{ActorLabel, Metrics};
use crate::runtime::backoff::Backoff;
use crate::runtime::exit;
use crate::runtime::health::Health;

/// Panics an actor may have within [`PANIC_WINDOW`] before the process stops.
pub const MAX_PANICS: usize = 5;

/// The window of [`MAX_PANICS`].
pub const PANIC_WINDOW: Duration = Duration::from_secs(600);

/// Why a supervised actor stops.
#[derive(Debug)]
pub enum Failure {
    /// A dependency failed (Redis unreachable, a timeout): restarts go on as long as
    /// it lasts; nothing is lost meanwhile.
    Dependency(anyhow::Error),
    /// A handler panicked; counted against [`MAX_PANICS`].
    Panic(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Dependency(error) => write!(f, "{error:#}"),
            Failure::Panic(message) => write!(f, "panicked: {message}"),
        }
    }
}

/// Restart bookkeeping of one supervised actor.
pub struct Restarts {
    actor: &'static str,
    counter: Counter,
    health: Health,
    /// Failures since the last success: the backoff's exponent.
    in_a_row: u32,
    restarts: u32,
    panics: VecDeque<Instant>,
}

impl Restarts {
    pub fn new(actor: &'static str, metrics: &Metrics, health: &Health) -> Self {
        Restarts {
            actor,
            counter: metrics
                .actor_restarts
                .get_or_create(&ActorLabel { actor })
                .clone(),
            health: health.clone(),
            in_a_row: 0,
            restarts: 0,
            panics: VecDeque::new(),
        }
    }

    /// Restarts so far.
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// Whether the actor is between a failure and its next success.
    pub fn recovering(&self) -> bool {
        self.in_a_row > 0
    }

    /// Stops the actor after `failure`; its `Supervisor` restarts it. Too many panics
    /// stop the process instead.
    pub fn fail<A>(&mut self, ctx: &mut Context<A>, failure: Failure)
    where
        A: Actor<Context = Context<A>>,
    {
        self.health.set_restarting(self.actor, true);
        self.health.failed();
        self.in_a_row = self.in_a_row.saturating_add(1);
        if let Failure::Panic(_) = failure {
            let now = Instant::now();
            self.panics.push_back(now);
            while self
                .panics
                .front()
                .is_some_and(|at| now.duration_since(*at) > PANIC_WINDOW)
            {
                self.panics.pop_front();
            }
            if self.panics.len() >= MAX_PANICS {
                error!(actor = self.actor, %failure, panics = self.panics.len(), "an actor keeps panicking");
                exit::stop(
                    exit::SOFTWARE,
                    "restarts are not curing it: stopping the process",
                );
                return;
            }
        }
        warn!(
            actor = self.actor,
            failures = self.in_a_row,
            %failure,
            "actor failed; restarting it"
        );
        ctx.stop();
    }

    /// Call from `Supervised::restarting`.
    pub fn restarting(&mut self) {
        self.restarts = self.restarts.saturating_add(1);
        self.counter.inc();
    }

    /// Call from `Actor::started`: a restarted actor waits out its backoff before it
    /// handles anything (its mailbox fills meanwhile, and senders wait).
    pub fn started<A>(&self, ctx: &mut Context<A>)
    where
        A: Actor<Context = Context<A>>,
    {
        self.started_then(ctx, |_, _| Box::pin(actix::fut::ready(())));
    }

    /// Like [`Self::started`], then runs `work` (made once the backoff is over) before
    /// the mailbox: what the actor must finish first after a restart. One future,
    /// because actix runs `wait` futures last-in first-out.
    pub fn started_then<A>(
        &self,
        ctx: &mut Context<A>,
        work: impl FnOnce(&mut A, &mut Context<A>) -> ResponseActFuture<A, ()> + 'static,
    ) where
        A: Actor<Context = Context<A>>,
    {
        let delay = self.delay().unwrap_or(Duration::ZERO);
        ctx.wait(
            actix::fut::wrap_future::<_, A>(tokio::time::sleep(delay))
                .then(move |(), actor, ctx| work(actor, ctx)),
        );
    }

    /// The wait before a restarted actor resumes: none before its first failure.
    pub fn delay(&self) -> Option<Duration> {
        self.in_a_row
            .checked_sub(1)
            .map(|attempt| Backoff::DEFAULT.delay(attempt))
    }

    /// The actor did its work again.
    pub fn succeeded(&mut self) {
        if self.in_a_row > 0 {
            self.in_a_row = 0;
            self.health.set_restarting(self.actor, false);
        }
    }
}

/// A panic in an actor whose state only a re-read from the fences rebuilds (it holds
/// uncommitted work of every partition): stops the process, which systemd restarts.
pub fn stateful_panic(actor: &'static str, message: &str) {
    error!(actor, panic = message, "a handler panicked");
    exit::stop(
        exit::SOFTWARE,
        "its state cannot be rebuilt in place: stopping so that a restart resumes from the stored fences",
    );
}

thread_local! {
    /// Whether this thread is inside [`catch`], so the panic hook leaves it alone.
    static CATCHING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, turning a panic into an error with its message.
pub fn catch<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    let outer = CATCHING.with(|c| c.replace(true));
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(outer));
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into())
    })
}

/// Makes a panic outside [`catch`] stop the process with exit code 70 (after the usual
/// report), instead of leaving a dead thread behind. Installed by the binary.
pub fn install_panic_hook() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        if !CATCHING.with(Cell::get) {
            error!(%info, "a panic no supervisor can contain: stopping the process");
            std::process::exit(exit::SOFTWARE);
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// Fails on `Fail`, counts the `Work` it handles.
    struct Flaky {
        restarts: Restarts,
        handled: Arc<AtomicU32>,
    }
    impl Actor for Flaky {
        type Context = Context<Self>;
        fn started(&mut self, ctx: &mut Self::Context) {
            self.restarts.started(ctx);
        }
    }
    impl Supervised for Flaky {
        fn restarting(&mut self, _: &mut Self::Context) {
            self.restarts.restarting();
        }
    }
    #[derive(Message)]
    #[rtype(result = "()")]
    struct Fail;
    #[derive(Message)]
    #[rtype(result = "()")]
    struct Work;
    impl Handler<Fail> for Flaky {
        type Result = ();
        fn handle(&mut self, _: Fail, ctx: &mut Self::Context) {
            let failure = catch(|| panic!("boom")).unwrap_err();
            self.restarts.fail(ctx, Failure::Panic(failure));
        }
    }
    impl Handler<Work> for Flaky {
        type Result = ();
        fn handle(&mut self, _: Work, _: &mut Self::Context) {
            self.handled.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[actix::test]
    async fn restarts_wait_with_growing_backoff_and_count() {
        tokio::time::pause();
        let metrics = Metrics::new();
        let health = Health::new();
        health.checkpoint_completed(Duration::ZERO, &Default::default());
        let handled = Arc::new(AtomicU32::new(0));
        let counter = handled.clone();
        let (m, h) = (metrics.clone(), health.clone());
        let addr = Supervisor::start(move |_| Flaky {
            restarts: Restarts::new("flaky", &m, &h),
            handled: counter,
        });
        addr.send(Work).await.unwrap();
        assert_eq!(
            handled.load(Ordering::SeqCst),
            1,
            "first start does not wait"
        );
        for (restart, delay_ms) in [(1u64, 100u64), (2, 200), (3, 400)] {
            addr.send(Fail).await.unwrap();
            assert!(!health.is_ready(), "not ready while restarting");
            let started = tokio::time::Instant::now();
            addr.send(Work).await.unwrap();
            let waited = started.elapsed();
            assert!(
                waited >= Duration::from_millis(delay_ms)
                    && waited < Duration::from_millis(delay_ms * 2),
                "restart {restart} waited {waited:?}, expected {delay_ms} ms"
            );
            let restarts = metrics
                .actor_restarts
                .get_or_create(&ActorLabel { actor: "flaky" })
                .get();
            assert_eq!(restarts, restart);
        }
        assert_eq!(health.restarting(), vec!["flaky"]);
    }

    #[test]
    fn catch_returns_the_panic_message() {
        assert_eq!(catch(|| 3), Ok(3));
        assert_eq!(catch(|| panic!("bad {}", 7)), Err::<(), _>("bad 7".into()));
    }
}
