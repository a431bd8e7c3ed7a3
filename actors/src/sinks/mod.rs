//! The sinks.

pub mod fenced;
pub mod redis;
pub mod warehouse;
