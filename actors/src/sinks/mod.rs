//! The sinks.

pub mod fenced;
pub mod redis;
#[cfg(test)]
pub mod test_redis;
pub mod warehouse;
