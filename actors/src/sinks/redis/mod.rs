//! The Redis sink: the actor (`redis_sink.rs`), the plan of one checkpoint's commit
//! (`commit.rs`) and the budget its scripts are sized to (`budget.rs`), applying a plan
//! (`apply.rs`), its connection (`client.rs`), a script's writes as a `WATCH`/`MULTI`/`EXEC` transaction
//! (`transaction.rs`) and the report of writes Redis refused (`conflicts.rs`).

pub mod apply;
pub mod budget;
pub mod client;
pub mod commit;
pub mod conflicts;
pub mod redis_sink;
pub mod transaction;
