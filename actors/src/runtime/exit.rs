//! Every exit code of the process, in one place (a distinct code per cause,
//! so that a supervisor such as systemd restarts on what a restart cures and stops on
//! what it does not; `config/anchorflow.service` lists `RestartPreventExitStatus=78`).

use tracing::error;

/// The final checkpoint did not complete within `pipeline.shutdown_timeout_secs`.
pub const SHUTDOWN_TIMEOUT: i32 = 1;

/// An actor kept failing after its restarts (EX_SOFTWARE): a bug, not an outage.
pub const SOFTWARE: i32 = 70;

/// A warehouse file cannot be written or published (EX_IOERR): the open files of every
/// partition are suspect, and a restart resumes from the stored fences.
pub const IO_ERROR: i32 = 74;

/// A commit was refused because this instance no longer owns a partition, or the group
/// took the partitions away before they were checkpointed (EX_TEMPFAIL): a restart
/// rejoins the group and resumes from the stored fences.
pub const FENCED: i32 = 75;

/// Redis has lost anchorflow's fences; the next start waits, not ready, until an
/// operator recovers them (`docs/exactly-once.md`).
pub const STATE_LOST: i32 = 76;

/// Another live run holds this instance id's lease (EX_CANTCREAT): two processes with
/// one `source.instance_id`. A restart is refused again while the other lives, and
/// starts once its lease (30 s) has expired.
pub const DUPLICATE: i32 = 73;

/// Invalid configuration (EX_CONFIG): a restart cannot cure it.
pub const CONFIG: i32 = 78;

/// Stops the actor system of this thread with `code`, after logging `why`.
pub fn stop(code: i32, why: &str) {
    error!(code, "{why}");
    actix::System::current().stop_with_code(code);
}
