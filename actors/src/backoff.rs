//! Capped exponential backoff, shared by supervised restarts and sink retries.

use std::time::Duration;

/// `initial * 2^attempt`, capped at `max`. Attempt 0 waits `initial`.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The schedule used by supervisors and sinks: 100 ms doubling up to 30 s.
    pub const DEFAULT: Backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(30),
    };

    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps() {
        let b = Backoff::DEFAULT;
        let delays: Vec<_> = (0..12).map(|a| b.delay(a).as_millis()).collect();
        assert_eq!(
            delays,
            vec![100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000]
        );
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(30));
    }
}

/// Restart bookkeeping for a supervised actor. actix's `Supervisor` restarts an actor
/// that stopped by calling `restarting()` and then `started()` on the same struct; the
/// actor calls [`RestartBackoff::restarting`] from the first and
/// [`RestartBackoff::started`] from the second, which makes the restarted actor wait
/// (its mailbox untouched, so senders feel backpressure) before handling anything.
#[derive(Clone, Copy, Debug, Default)]
pub struct RestartBackoff {
    restarts: u32,
}

impl RestartBackoff {
    pub fn restarting(&mut self) {
        self.restarts = self.restarts.saturating_add(1);
    }

    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// The wait before a restarted actor resumes: none on the first start.
    pub fn delay(&self) -> Option<Duration> {
        self.restarts
            .checked_sub(1)
            .map(|attempt| Backoff::DEFAULT.delay(attempt))
    }

    pub fn started<A>(&self, ctx: &mut actix::Context<A>)
    where
        A: actix::Actor<Context = actix::Context<A>>,
    {
        use actix::AsyncContext;
        if let Some(delay) = self.delay() {
            ctx.wait(actix::fut::wrap_future::<_, A>(tokio::time::sleep(delay)));
        }
    }
}

#[cfg(test)]
mod restart_tests {
    use super::*;
    use actix::prelude::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// Stops itself on `Fail`, counts the `Work` it handles.
    struct Flaky {
        backoff: RestartBackoff,
        handled: Arc<AtomicU32>,
    }
    impl Actor for Flaky {
        type Context = Context<Self>;
        fn started(&mut self, ctx: &mut Self::Context) {
            self.backoff.started(ctx);
        }
    }
    impl Supervised for Flaky {
        fn restarting(&mut self, _: &mut Self::Context) {
            self.backoff.restarting();
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
            ctx.stop();
        }
    }
    impl Handler<Work> for Flaky {
        type Result = ();
        fn handle(&mut self, _: Work, _: &mut Self::Context) {
            self.handled.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[actix::test]
    async fn supervised_restarts_wait_with_growing_backoff() {
        tokio::time::pause();
        let handled = Arc::new(AtomicU32::new(0));
        let counter = handled.clone();
        let addr = Supervisor::start(move |_| Flaky {
            backoff: RestartBackoff::default(),
            handled: counter,
        });
        addr.send(Work).await.unwrap();
        assert_eq!(
            handled.load(Ordering::SeqCst),
            1,
            "first start does not wait"
        );

        for (restart, delay_ms) in [(1u32, 100u64), (2, 200), (3, 400)] {
            addr.do_send(Fail); // test control message; capacity is irrelevant here
            tokio::task::yield_now().await;
            let before = handled.load(Ordering::SeqCst);
            let pending = addr.send(Work);
            let started = tokio::time::Instant::now();
            pending.await.unwrap();
            let waited = started.elapsed();
            assert_eq!(handled.load(Ordering::SeqCst), before + 1);
            assert!(
                waited >= Duration::from_millis(delay_ms)
                    && waited < Duration::from_millis(delay_ms * 2),
                "restart {restart} waited {waited:?}, expected {delay_ms} ms"
            );
        }
    }
}
