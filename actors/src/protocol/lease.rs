//! A lease in Redis that names the live run of an instance id: before an instance
//! deletes in-progress files of earlier runs of its id (`sinks::warehouse::publish::remove_orphans`),
//! it makes sure no other run of the same id is alive, so that a second process
//! started by mistake with the same `source.instance_id` (on another host, or twice on
//! this one) cannot delete the files the first one is writing.
//!
//! The lease is `anchorflow:{group}:{topic}:instance:{id}` = `{host}:{pid}:{run}`, set
//! for [`LEASE`] and renewed every [`RENEW`] from the warehouse sink's checkpoints. A
//! run takes the lease when it is free, or when its holder is a process of this host
//! that no longer exists (a restart after `kill -9` need not wait for the expiry).
//! Until it holds the lease, a run leaves every in-progress file alone; it cleans up
//! once it gets it.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use tracing::warn;

use crate::protocol::scripts::LeaseArgs;

/// How long a lease lasts without renewal.
pub const LEASE: Duration = Duration::from_secs(30);

/// How often the holder renews it.
pub const RENEW: Duration = Duration::from_secs(10);

use crate::config::hostname;

/// The host and process id a lease value (`{host}:{pid}:{run}`) names.
fn holder_process(holder: &str) -> Option<(&str, u32)> {
    let mut parts = holder.splitn(3, ':');
    let host = parts.next()?;
    let pid = parts.next()?.parse().ok()?;
    Some((host, pid))
}

/// Whether a lease value names a process of this host that is gone.
fn holder_is_gone(holder: &str, host: &str) -> bool {
    holder_process(holder).is_some_and(|(holder_host, pid)| {
        holder_host == host
            && pid != std::process::id()
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
    })
}

/// Whether a lease value names this very process.
fn holder_is_this_process(holder: &str, host: &str) -> bool {
    holder_process(holder) == Some((host, std::process::id()))
}

/// The run holding `instance`'s lease now, if it may be alive: a lease that expired,
/// or whose holder is a process of this host that is gone, names no one; nor does a
/// run of this process (a process runs one pipeline at a time, so that run has
/// stopped: the demo, the bench and tests start one after another). A new run refuses
/// to start while one does (`pipeline.rs`).
pub fn live_holder(
    conn: &mut redis::Connection,
    keys: &crate::protocol::keys::FenceKeys,
    instance: &str,
) -> anyhow::Result<Option<String>> {
    let holder: Option<String> = redis::cmd("GET")
        .arg(format!("{}{instance}", keys.instances_prefix))
        .query(conn)
        .context("reading the instance lease")?;
    let host = hostname();
    Ok(holder.filter(|h| !holder_is_gone(h, &host) && !holder_is_this_process(h, &host)))
}

/// Hands `instance`'s lease back when this process holds it; returns whether it did.
/// After a clean stop nothing of the run writes any more, so another host may start the
/// id at once instead of waiting out [`LEASE`]. A lease another run holds is left alone
/// (`WATCH` makes the check and the delete one step).
pub fn release_held_here(
    conn: &mut redis::Connection,
    keys: &crate::protocol::keys::FenceKeys,
    instance: &str,
) -> anyhow::Result<bool> {
    let key = format!("{}{instance}", keys.instances_prefix);
    let host = hostname();
    redis::transaction(conn, &[&key], |conn, pipe| {
        let holder: Option<String> = redis::cmd("GET").arg(&key).query(conn)?;
        if holder.is_some_and(|h| holder_is_this_process(&h, &host)) {
            let deleted: Option<()> = pipe.del(&key).ignore().query(conn)?;
            Ok(deleted.map(|()| true))
        } else {
            Ok(Some(false))
        }
    })
    .context("releasing the instance lease")
}

pub struct InstanceLease {
    key: String,
    host: String,
    value: String,
    held: bool,
    renewed: Option<Instant>,
}

impl InstanceLease {
    pub fn new(keys: &crate::protocol::keys::FenceKeys, instance: &str, run: &str) -> Self {
        let host = hostname();
        InstanceLease {
            key: format!("{}{instance}", keys.instances_prefix),
            value: format!("{host}:{}:{run}", std::process::id()),
            host,
            held: false,
            renewed: None,
        }
    }

    pub fn held(&self) -> bool {
        self.held
    }

    /// Whether it is time to renew (or to try again to take) the lease.
    pub fn due(&self) -> bool {
        self.renewed.is_none_or(|at| at.elapsed() >= RENEW)
    }

    /// Renewing failed (Redis out): this run may have lost the lease, so it counts as
    /// not held; the next try comes after [`RENEW`].
    pub fn failed(&mut self) {
        self.held = false;
        self.renewed = Some(Instant::now());
    }

    /// Takes or renews the lease; returns whether this run holds it now.
    pub fn refresh(&mut self, conn: &mut redis::Connection) -> anyhow::Result<bool> {
        let take = |expected: &str, conn: &mut redis::Connection| {
            LeaseArgs {
                key: &self.key,
                expected,
                holder: &self.value,
                lease_ms: LEASE.as_millis() as u64,
            }
            .invoke(conn)
        };
        let mut holder = take(&self.value, conn).context("taking the instance lease")?;
        if let Some(stale) = holder.clone().filter(|h| holder_is_gone(h, &self.host)) {
            holder = take(&stale, conn)
                .context("taking over the instance lease of a run that is gone")?;
        }
        if let Some(holder) = &holder {
            if self.held || self.renewed.is_none() {
                warn!(
                    lease = self.key,
                    holder,
                    "another run of this instance id looks alive: its in-progress files are left alone (is source.instance_id unique?)"
                );
            }
        }
        self.held = holder.is_none();
        self.renewed = Some(Instant::now());
        Ok(self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_on_this_host_that_is_gone_is_stale() {
        let host = hostname();
        assert!(
            holder_is_gone(&format!("{host}:4194303:run"), &host),
            "no such pid"
        );
        let me = format!("{host}:{}:run", std::process::id());
        assert!(!holder_is_gone(&me, &host), "this process");
        assert!(
            !holder_is_gone("elsewhere:4194303:run", &host),
            "another host: wait"
        );
        assert!(!holder_is_gone("garbage", &host));
        assert!(holder_is_this_process(&me, &host));
        assert!(!holder_is_this_process(
            &format!("{host}:4194303:run"),
            &host
        ));
        assert!(!holder_is_this_process(
            &format!("elsewhere:{}:run", std::process::id()),
            &host
        ));
    }
}
