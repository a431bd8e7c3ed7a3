//! anchorflow's bookkeeping in Redis.

pub mod claim_script;
pub mod commit_args;
pub mod fences;
pub mod keys;
pub mod lease;
pub mod publish;
pub mod reply;
pub mod scripts;
pub mod server;
pub mod skipped;
pub mod staged;
pub mod units;
pub mod verdict;
