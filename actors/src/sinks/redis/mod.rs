//! The Redis sink: the actor (`redis_sink.rs`), the plan of one checkpoint's commit
//! (`commit.rs`) and its connection (`client.rs`).

pub mod client;
pub mod commit;
pub mod redis_sink;
