//! [`Repeats`]: one log line for a failure that repeats, not one per occurrence. With
//! the broker down librdkafka reports the same error at every poll; an operator needs
//! the first line at once and then a count ("…, 40 more times in the last 10 s"), not a
//! flood that buries everything else. Time is passed in, so tests run on their own.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a repeated line is held back before it is logged again with its count.
pub const WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct Repeats {
    /// Per kind of line: when it was last logged, and how often held back since.
    seen: Mutex<HashMap<String, (Instant, u64)>>,
}

impl Repeats {
    /// Whether a line of this `kind` is to be logged at `now`: `Some(held back since
    /// the last one)` if so, `None` while it repeats within [`WINDOW`].
    pub fn admit(&self, kind: &str, now: Instant) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match seen.get_mut(kind) {
            Some((last, held)) if now.saturating_duration_since(*last) < WINDOW => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                let count = *held;
                (*last, *held) = (now, 0);
                Some(count)
            }
            None => {
                // Many kinds only come from hostile or broken input; keep the map small.
                if seen.len() >= 1024 {
                    seen.clear();
                }
                seen.insert(kind.to_string(), (now, 0));
                Some(0)
            }
        }
    }
}

/// A line's kind: its text without the digits (the same failure at another time, port
/// or count is the same kind).
pub fn kind_of(facility: &str, text: &str) -> String {
    let mut kind = String::with_capacity(facility.len() + 1 + text.len().min(120));
    kind.push_str(facility);
    kind.push(' ');
    kind.extend(text.chars().filter(|c| !c.is_ascii_digit()).take(120));
    kind
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeating_line_is_logged_once_per_window_with_its_count() {
        let repeats = Repeats::default();
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        assert_eq!(repeats.admit("down", at(0)), Some(0), "the first at once");
        for ms in (20..10_000).step_by(20) {
            assert_eq!(repeats.admit("down", at(ms)), None);
        }
        assert_eq!(repeats.admit("other", at(100)), Some(0), "kinds apart");
        assert_eq!(
            repeats.admit("down", at(10_000)),
            Some(499),
            "then with its count"
        );
        assert_eq!(repeats.admit("down", at(10_020)), None);
        assert_eq!(
            kind_of("FAIL", "127.0.0.1:1 failed after 12ms"),
            kind_of("FAIL", "127.0.0.1:1 failed after 3ms")
        );
    }
}
