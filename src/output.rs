//! A command's answer on stdout. A reader that went away (`anchorflow status | head -1`)
//! ends the output quietly: the rest is dropped, nothing panics, and the command's exit
//! code is its own.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether stdout was found closed; nothing more is written then.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes `text` to stdout as it is.
pub fn text(text: &str) {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if out
        .write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        CLOSED.store(true, Ordering::Relaxed);
    }
}

/// Writes one line to stdout.
pub fn line(args: std::fmt::Arguments<'_>) {
    text(&format!("{args}\n"));
}

/// `println!` for command output: `say!("{x} records")`.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))
    };
}
