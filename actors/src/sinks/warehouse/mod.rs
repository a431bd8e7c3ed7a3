//! The warehouse sink: the actor (`warehouse_sink.rs`), when a checkpoint publishes
//! (`roll.rs`), the files being written (`writer.rs`), publishing and crash cleanup
//! (`publish.rs`), what each instance published (`marks.rs`), `_SUCCESS` and the hook
//! (`partition_committer.rs`, `hook.rs`), and where the files live (`storage.rs`).

pub mod hook;
pub mod marks;
pub mod partition_committer;
pub mod publish;
pub mod roll;
pub mod storage;
pub mod warehouse_sink;
pub mod writer;
