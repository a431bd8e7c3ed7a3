//! What every actor runs on.

pub mod backoff;
pub mod clock;
pub mod exit;
pub mod fault;
pub mod health;
pub mod mailbox;
pub mod memory;
pub mod repeats;
pub mod retry;
pub mod supervision;
