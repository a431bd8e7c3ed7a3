//! The Redis sink: the actor (`redis_sink.rs`), the plan of one checkpoint's commit
//! (`commit.rs`), its connection (`client.rs`) and the report of writes Redis refused
//! (`conflicts.rs`).

pub mod client;
pub mod commit;
pub mod conflicts;
pub mod redis_sink;
