//! The Redis sink's transactions on its connection (`transaction.rs` builds them and
//! reads their answers): the keys of another type found first, the two steps under
//! `WATCH` repeated while a watched key changed, and the refused writes recorded.

use std::collections::BTreeSet;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::Value;
use tracing::error;

use super::SinkConnection;
use crate::checkpoint::claim::SinkKind;
use crate::protocol::commit_args::{day_end_at, day_end_wait, DAY_END_MARGIN_MS};
use crate::protocol::keys::FenceKeys;
use crate::protocol::reply::{Conflict, Rejection, Reply};
use crate::protocol::scripts::ConflictArgs;
use crate::protocol::server::ServerInfo;
use crate::protocol::verdict::{self, Verdict};
use crate::sinks::redis::transaction::{Outcome, Transaction};

impl SinkConnection {
    /// One attempt at one commit transaction (`transaction.rs` has the steps): read the
    /// fences under `WATCH`, decide, write under `MULTI` and start over while a watched
    /// key changed in between; then record the writes Redis refused.
    pub async fn transact(&mut self, keys: &FenceKeys, tx: &Transaction) -> anyhow::Result<Reply> {
        let commit = &tx.commit;
        let mut conn = self.prepare().await?;
        if let Some(why) = self
            .server_info
            .as_ref()
            .and_then(ServerInfo::lacks_transactions)
        {
            anyhow::bail!("{why}");
        }
        let deadline_key = format!("{}{}", keys.deadline_prefix, self.nonce);
        let day_ends = tx.day_ends();
        let foreign = self.foreign_keys(&conn, tx).await?;
        // Redis's clock minus the estimate, as the last read showed it.
        let mut skew_ms = 0;
        for _ in 0..WATCH_ATTEMPTS {
            let chosen = day_ends_ahead(&day_ends, self.clock.now_ms() + skew_ms).await;
            let deadline = chosen
                .iter()
                .map(|(_, at)| at - DAY_END_MARGIN_MS)
                .min()
                .map(|at| (deadline_key.as_str(), at));
            let step = tx.read_step(keys, deadline);
            let mut on = conn.clone();
            let values: Vec<Value> = self
                .bounded("reading the fences", async move {
                    Ok(step.query_async(&mut on).await?)
                })
                .await?;
            let read = tx.read(values)?;
            // The deadline key was alive when watched, and the day ends are those
            // Redis's clock gives: else choose again by it.
            let early = deadline.is_some_and(|(_, at)| read.now_ms >= at)
                || chosen
                    .iter()
                    .any(|(ends, at)| day_end_at(*ends, read.now_ms) != *at);
            if early {
                skew_ms = read.now_ms - self.clock.now_ms();
                self.unwatch(&conn).await?;
                continue;
            }
            let verdict = verdict::verdict(commit.checkpoint, &commit.ranges, &read.fences)?;
            match self.settle(&conn, keys, verdict).await? {
                Settled::Write => {}
                Settled::Done(reply) => return Ok(reply),
                Settled::Again => continue,
            }
            let skip = tx.applied_units(&read);
            let (pipe, sent) = tx.write_step(keys, &read, &skip, &foreign);
            let mut on = conn.clone();
            let answer: Value = self
                .bounded("running the commit transaction", async move {
                    Ok(pipe.query_async(&mut on).await?)
                })
                .await?;
            let answers = match answer {
                Value::Nil => continue,
                Value::Array(answers) => answers,
                other => anyhow::bail!("unexpected answer to a commit transaction: {other:?}"),
            };
            self.know(tx.applied_keys(&sent, &answers), &chosen);
            let conflicts = tx.outcome(&sent, &answers, &foreign);
            self.record_conflicts(
                &mut conn,
                keys,
                commit.conflicts_ttl_ms,
                &conflicts.conflicts,
            )
            .await;
            return Ok(applied(conflicts));
        }
        anyhow::bail!(
            "the fences changed under {WATCH_ATTEMPTS} commit transactions in a row (another writer of {}?)",
            keys.fences
        )
    }

    /// What a verdict read under `WATCH` leads to: write, answer without writing, or
    /// (the lost marker's `EXEC` found a watched key changed) read again.
    async fn settle(
        &mut self,
        conn: &MultiplexedConnection,
        keys: &FenceKeys,
        verdict: Verdict,
    ) -> anyhow::Result<Settled> {
        match verdict {
            Verdict::Apply => Ok(Settled::Write),
            Verdict::Rejected(Rejection::FencesMissing { partition }) => {
                // The lost marker, only if the fences are still missing.
                let mut pipe = redis::pipe();
                pipe.atomic()
                    .cmd("SET")
                    .arg(&keys.lost)
                    .arg(format!("{}:{partition}", SinkKind::Redis.name()));
                let mut on = conn.clone();
                let set: Value = self
                    .bounded("marking the fences lost", async move {
                        Ok(pipe.query_async(&mut on).await?)
                    })
                    .await?;
                Ok(if set == Value::Nil {
                    Settled::Again
                } else {
                    Settled::Done(Reply::Rejected(Rejection::FencesMissing { partition }))
                })
            }
            Verdict::AppliedBefore => {
                self.unwatch(conn).await?;
                Ok(Settled::Done(Reply::AppliedBefore))
            }
            Verdict::Rejected(rejection) => {
                self.unwatch(conn).await?;
                Ok(Settled::Done(Reply::Rejected(rejection)))
            }
        }
    }

    /// The keys of `tx` that hold another type than it writes (by index): their
    /// writes are left out and reported, so that not even their time to live changes
    /// (a `PEXPIRE` in a transaction applies whatever the key's type). Keys this
    /// connection saw written are not asked again; of the others, one `EXISTS` per
    /// thousand says whether any is there at all, and `TYPE` names which.
    async fn foreign_keys(
        &mut self,
        conn: &MultiplexedConnection,
        tx: &Transaction,
    ) -> anyhow::Result<BTreeSet<usize>> {
        let unknown = tx.unknown_keys(&self.known);
        if unknown.is_empty() {
            return Ok(BTreeSet::new());
        }
        let names: Vec<String> = unknown.iter().map(|&k| tx.key_name(k)).collect();
        let mut exists = redis::pipe();
        for chunk in names.chunks(EXISTS_CHUNK) {
            exists.cmd("EXISTS").arg(chunk);
        }
        let mut on = conn.clone();
        let counts: Vec<i64> = self
            .bounded("checking the keys' types", async move {
                Ok(exists.query_async(&mut on).await?)
            })
            .await?;
        let asked: Vec<usize> = counts
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .flat_map(|(chunk, _)| {
                let start = chunk * EXISTS_CHUNK;
                start..(start + EXISTS_CHUNK).min(names.len())
            })
            .collect();
        if asked.is_empty() {
            return Ok(BTreeSet::new());
        }
        let mut types = redis::pipe();
        for &at in &asked {
            types.cmd("TYPE").arg(&names[at]);
        }
        let mut on = conn.clone();
        let found: Vec<String> = self
            .bounded("checking the keys' types", async move {
                Ok(types.query_async(&mut on).await?)
            })
            .await?;
        Ok(asked
            .iter()
            .zip(&found)
            .filter(|(&at, type_name)| !tx.writable(unknown[at], type_name))
            .map(|(&at, _)| unknown[at])
            .collect())
    }

    /// Remembers keys whose writes applied. A receiver list expires at its day's end,
    /// and another program may then create a key of that name and another type: the
    /// keys are forgotten when the day end the lists get moves on, on a new
    /// connection (a Redis restarted or flushed), and when there are too many.
    fn know(&mut self, applied: impl Iterator<Item = u64>, chosen: &[([i64; 2], i64)]) {
        let day_end = chosen.iter().map(|(_, at)| *at).min();
        if day_end.is_some() && day_end != self.known_until {
            self.known.clear();
            self.known_until = day_end;
        }
        self.known.extend(applied);
        if self.known.len() > KNOWN_KEYS {
            self.known.clear();
        }
    }

    async fn unwatch(&mut self, conn: &MultiplexedConnection) -> anyhow::Result<()> {
        let mut on = conn.clone();
        self.bounded("UNWATCH", async move {
            Ok(redis::cmd("UNWATCH").query_async::<()>(&mut on).await?)
        })
        .await
    }

    /// Records refused writes in the conflicts hash. The commit applied whatever
    /// happens here: a failure is logged, and the refusals are still counted and
    /// logged by the caller.
    async fn record_conflicts(
        &mut self,
        conn: &mut MultiplexedConnection,
        keys: &FenceKeys,
        ttl_ms: i64,
        found: &[Conflict],
    ) {
        if found.is_empty() {
            return;
        }
        let args = ConflictArgs {
            ttl_ms,
            conflicts: found,
        }
        .encode();
        let script = self.conflicts_script.clone();
        let mut invocation = script.key(&keys.conflicts);
        for arg in args.iter() {
            invocation.arg(arg);
        }
        let recorded: anyhow::Result<i64> = self
            .bounded("recording refused writes", async {
                Ok(invocation.invoke_async(conn).await?)
            })
            .await;
        if let Err(error) = recorded {
            error!(error = format!("{error:#}"), conflicts = found.len(), conflicts_key = keys.conflicts, "a commit applied, but the writes Redis refused in it could not be recorded in the conflicts hash");
        }
    }
}

/// Transactions in a row whose watched keys changed before `EXEC` before the attempt
/// fails (and the sink restarts after its backoff): a sink and its warehouse sink
/// share the fences hash, so one now and then is expected, many in a row are not.
const WATCH_ATTEMPTS: usize = 20;

/// What [`SinkConnection::settle`] decided.
enum Settled {
    Write,
    Done(Reply),
    Again,
}

/// The reply of an applied transaction: its figure, and its conflicts (the first
/// [`REPLY_CONFLICTS`] named, as a script names them).
fn applied(mut outcome: Outcome) -> Reply {
    let total = outcome.conflicts.len() as i64;
    outcome.conflicts.truncate(REPLY_CONFLICTS);
    Reply::Applied {
        ops: outcome.ops,
        conflicts: total,
        first: outcome.conflicts,
    }
}

/// The day end each of `day_ends` gives lists written at `now_ms`, after waiting past
/// any that is nearer than the margin.
async fn day_ends_ahead(day_ends: &BTreeSet<[i64; 2]>, now_ms: i64) -> Vec<([i64; 2], i64)> {
    let mut wait_ms = 0;
    let mut chosen = Vec::with_capacity(day_ends.len());
    for ends in day_ends {
        let (wait, at) = day_end_wait(*ends, now_ms);
        wait_ms = wait_ms.max(wait);
        chosen.push((*ends, at));
    }
    if wait_ms > 0 {
        tokio::time::sleep(Duration::from_millis(wait_ms as u64)).await;
    }
    chosen
}

/// Keys per `EXISTS` of the type check.
const EXISTS_CHUNK: usize = 1_000;

/// Keys a connection remembers as written (a hash each: 8 bytes and the set's
/// overhead); past this it forgets them all and checks again.
const KNOWN_KEYS: usize = 1 << 20;

/// Conflicts named in a reply (as the script's reply names at most 100).
const REPLY_CONFLICTS: usize = 100;
