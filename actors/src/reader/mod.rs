//! The partition reader (`partition_reader.rs`): what it makes of a batch
//! (`output.rs`) and where that goes (`links.rs`).

pub mod links;
pub mod output;
pub mod partition_reader;
