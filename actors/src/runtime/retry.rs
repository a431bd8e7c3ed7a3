//! The one retry loop: an attempt repeated with capped exponential backoff
//! ([`Backoff::DEFAULT`]) while its error is worth retrying, each failure logged with
//! what was being done and when the next attempt comes.

use std::fmt::Display;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::runtime::backoff::Backoff;

/// How long to keep trying.
#[derive(Clone, Copy, Debug)]
pub enum Until {
    /// As long as it takes (an outage pauses progress; nothing is lost).
    Forever,
    /// Give up once this instant has passed (someone is waiting, e.g. a rebalance).
    Deadline(Instant),
}

/// Runs `attempt` until it succeeds, its error is not `retryable`, or `until` passes;
/// sleeps this thread between attempts. `on_error` sees every failure (metrics).
pub fn blocking<T, E: Display>(
    what: &str,
    until: Until,
    mut attempt: impl FnMut() -> Result<T, E>,
    retryable: impl Fn(&E) -> bool,
    mut on_error: impl FnMut(&E),
) -> Result<T, E> {
    let mut failures = 0u32;
    loop {
        let error = match attempt() {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        on_error(&error);
        let delay = Backoff::DEFAULT.delay(failures);
        let out_of_time = match until {
            Until::Forever => false,
            Until::Deadline(at) => Instant::now() + delay > at,
        };
        if !retryable(&error) || out_of_time {
            return Err(error);
        }
        log_retry(what, failures, delay, &error);
        std::thread::sleep(delay);
        failures = failures.saturating_add(1);
    }
}

/// The same loop for async work: waits without blocking the thread.
pub async fn until_done<T, E: Display, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    mut attempt: impl FnMut() -> F,
    retryable: impl Fn(&E) -> bool,
    mut on_error: impl FnMut(&E),
) -> Result<T, E> {
    let mut failures = 0u32;
    loop {
        let error = match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        on_error(&error);
        if !retryable(&error) {
            return Err(error);
        }
        let delay = Backoff::DEFAULT.delay(failures);
        log_retry(what, failures, delay, &error);
        tokio::time::sleep(delay).await;
        failures = failures.saturating_add(1);
    }
}

fn log_retry(what: &str, failures: u32, delay: Duration, error: &impl Display) {
    warn!(
        attempt = failures + 1,
        retry_in_ms = delay.as_millis() as u64,
        error = %error,
        "{what} failed; retrying"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_what_is_retryable_until_it_succeeds() {
        let mut calls = 0;
        let mut seen = 0;
        let out: Result<u32, String> = blocking(
            "test",
            Until::Forever,
            || {
                calls += 1;
                if calls < 3 {
                    Err(format!("failure {calls}"))
                } else {
                    Ok(calls)
                }
            },
            |_| true,
            |_| seen += 1,
        );
        assert_eq!(out, Ok(3));
        assert_eq!(seen, 2);
        let fatal: Result<(), &str> =
            blocking("test", Until::Forever, || Err("fatal"), |_| false, |_| {});
        assert_eq!(fatal, Err("fatal"));
        let late: Result<(), &str> = blocking(
            "test",
            Until::Deadline(Instant::now()),
            || Err("down"),
            |_| true,
            |_| {},
        );
        assert_eq!(late, Err("down"), "no time left for a retry");
    }

    #[tokio::test(start_paused = true)]
    async fn async_retries_wait_with_backoff() {
        let started = tokio::time::Instant::now();
        let mut calls = 0;
        let out: Result<(), String> = until_done(
            "test",
            || {
                calls += 1;
                let result = if calls < 4 {
                    Err("down".to_string())
                } else {
                    Ok(())
                };
                async move { result }
            },
            |_| true,
            |_| {},
        )
        .await;
        assert_eq!(out, Ok(()));
        // 100 + 200 + 400 ms of backoff, on paused time.
        assert_eq!(started.elapsed(), Duration::from_millis(700));
    }
}
