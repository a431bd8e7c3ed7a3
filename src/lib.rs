//! anchorflow: austin trace events from Kafka into exact Redis aggregates and a
//! Parquet warehouse in Hive layout, as one binary.
//!
//! Where things live:
//! - `actors/` (crate `anchorflow_actors`): every actor, one file each, the typed
//!   messages between them, decoding, warehouse tables, metrics and config types.
//! - [`settings`]: loading config from TOML, `ANCHORFLOW_*` variables and `--set`
//!   flags; exit code 78 for invalid config.
//! - [`pipeline`]: wiring of the actor system (threads, links, supervision, shutdown).
//! - [`fences_cli`]: `anchorflow fences show|recover`, the operator's view of fences.
//! - [`status`]: `anchorflow status`, per-partition progress and lag;
//!   [`doctor`]: `anchorflow check-config --connect`, every dependency reached once.
//! - [`output`]: command output on stdout (a closed stdout ends it quietly).
//! - [`http`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`generator`]: realistic trace events for the demo, the benchmark and tests.
//! - [`demo`]: `anchorflow demo`, the product end to end on an in-process mock cluster.
//! - [`bench`](mod@bench): `anchorflow bench`, throughput and memory figures.
//! - `src/main.rs`: the command line.

pub mod bench;
pub mod demo;
pub mod doctor;
pub mod fences_cli;
pub mod generator;
pub mod http;
pub mod output;
pub mod pipeline;
pub mod settings;
pub mod status;
