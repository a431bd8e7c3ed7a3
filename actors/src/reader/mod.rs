//! The partition reader (`partition_reader.rs`): what it makes of a batch
//! (`output.rs`), where that goes (`links.rs`), and how readers are started
//! (`spawn.rs`).

pub mod links;
pub mod output;
pub mod partition_reader;
pub mod spawn;
