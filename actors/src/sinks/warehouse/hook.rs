//! The partition-commit hook (`warehouse.partition_commit_hook`): run with `sh -c` in a
//! process group of its own and a minimal environment (`PATH`, `HOME`, `LANG`,
//! `LC_ALL`, `TZ`, `TMPDIR` and the `ANCHORFLOW_*` variables that describe the folder):
//! nothing of anchorflow's own environment, where secrets such as
//! `ANCHORFLOW_KAFKA__SASL_PASSWORD` may live, reaches it. At
//! `partition_commit_hook_timeout_secs` its whole process group is killed.

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tracing::error;

use crate::config::WarehouseConfig;
use crate::logic::tables::{self, Table};

/// The process group of the hook running now (0: none), so that a stopping process
/// does not leave it behind ([`kill_running_hook`]).
static RUNNING_HOOK: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Kills the process group of a hook still running (at shutdown).
pub fn kill_running_hook() {
    let group = RUNNING_HOOK.swap(0, std::sync::atomic::Ordering::SeqCst);
    if group > 0 {
        // SAFETY: killpg only sends a signal; the group is the hook's own.
        unsafe { libc::killpg(group, libc::SIGKILL) };
    }
}

/// Variables of anchorflow's environment a hook may see.
const HOOK_ENV: [&str; 6] = ["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"];

/// Runs the partition-commit hook, if one is configured, with the folder in its
/// environment; kills its process group after the configured timeout.
pub fn run_hook(
    config: &WarehouseConfig,
    table: Table,
    path: &Path,
    below: &str,
) -> anyhow::Result<()> {
    if config.partition_commit_hook.trim().is_empty() {
        return Ok(());
    }
    let (date, hour) = tables::parse_folder(below).context("not a dt/hour folder")?;
    let inherited = HOOK_ENV
        .iter()
        .filter_map(|name| Some((*name, std::env::var_os(name)?)));
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(&config.partition_commit_hook)
        .env_clear()
        .envs(inherited)
        .env("ANCHORFLOW_TABLE", table.name())
        .env("ANCHORFLOW_PARTITION_PATH", path)
        .env("ANCHORFLOW_DT", date.format("%Y-%m-%d").to_string())
        .env(
            "ANCHORFLOW_HOUR",
            hour.map(|h| format!("{h:02}")).unwrap_or_default(),
        )
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting the partition commit hook")?;
    let group = i32::try_from(child.id()).context("a process id")?;
    RUNNING_HOOK.store(group, std::sync::atomic::Ordering::SeqCst);
    let outcome = wait_for_hook(&mut child, group, config.partition_commit_hook_timeout_secs);
    RUNNING_HOOK.store(0, std::sync::atomic::Ordering::SeqCst);
    outcome
}

/// Waits for the hook; at the timeout, kills its whole process group (the hook's own
/// children, a metastore client or a `sleep`, go with it).
fn wait_for_hook(
    child: &mut std::process::Child,
    group: i32,
    timeout_secs: u64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(timeout_secs);
    loop {
        if let Some(status) = child.try_wait().context("waiting for the hook")? {
            anyhow::ensure!(status.success(), "the hook exited with {status}");
            return Ok(());
        }
        if Instant::now() >= deadline {
            // SAFETY: killpg only sends a signal; the group is the hook's own.
            if unsafe { libc::killpg(group, libc::SIGKILL) } != 0 {
                error!(group, "could not kill the hook's process group");
            }
            let _ = child.wait();
            anyhow::bail!(
                "the hook ran longer than {timeout_secs} s; its process group was killed"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
