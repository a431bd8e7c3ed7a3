//! Window series staged by a Redis `final` script (too many for one script within
//! `redis.max_commit_ms`) and the `unstage` scripts that apply them
//! (`scripts/redis_commit.lua`, `docs/exactly-once.md`). The Redis sink unstages its
//! own right after its final; a crash in between leaves the list pending, and
//! [`unstage_pending`] finishes it at every claim, whoever staged it, as claims complete
//! recorded warehouse commits.

use anyhow::Context as _;

use crate::checkpoint::claim::SinkKind;
use crate::protocol::commit_args::Mode;
use crate::protocol::keys::{FenceKeys, CONFLICTS_TTL_MS};
use crate::protocol::reply::Reply;
use crate::protocol::scripts::{self, invoke_fenced, Args};

/// Part of one series hash in a staged batch: its key, TTL in ms, and fields with their
/// increments.
pub type SeriesPart<'a> = (&'a str, i64, &'a [(String, i64)]);

/// One batch of staged series, as `unstage` decodes it: a JSON array of hashes, each
/// `[key, TTL ms, field, increment, …]`, all strings.
pub fn staged_batch<'a>(
    hashes: impl IntoIterator<Item = (&'a str, i64, &'a [(String, i64)])>,
) -> String {
    let mut batch = String::from("[");
    for (n, (key, ttl_ms, fields)) in hashes.into_iter().enumerate() {
        if n > 0 {
            batch.push(',');
        }
        batch.push('[');
        push_json_str(&mut batch, key);
        batch.push_str(&format!(",\"{ttl_ms}\""));
        for (field, increment) in fields {
            batch.push(',');
            push_json_str(&mut batch, field);
            batch.push_str(&format!(",\"{increment}\""));
        }
        batch.push(']');
    }
    batch.push(']');
    batch
}

fn push_json_str(out: &mut String, text: &str) {
    out.push_str(&serde_json::Value::from(text).to_string());
}

/// `redis_commit.lua` in `unstage` mode: applies the first batch staged on `list` and
/// pops it, removing the list from `pending` once it is empty.
pub struct UnstageArgs<'a> {
    /// The checkpoint whose final staged the list (logs only: no fence is checked).
    pub checkpoint: u64,
    pub units_prefix: &'a str,
    pub conflicts_ttl_ms: i64,
    pub list: &'a str,
    pub pending: &'a str,
}

impl UnstageArgs<'_> {
    pub fn encode(&self) -> Args {
        let mut args = Args::fenced(SinkKind::Redis, self.checkpoint, &[]);
        args.push(Mode::Unstage.name());
        args.push(self.units_prefix);
        args.push(self.conflicts_ttl_ms);
        args.push(self.list);
        args.push(self.pending);
        args.finish()
    }

    /// Runs it on a blocking connection (claims unstage what a crash left staged).
    pub fn invoke(
        &self,
        script: &redis::Script,
        conn: &mut redis::Connection,
        keys: &FenceKeys,
    ) -> anyhow::Result<Reply> {
        invoke_fenced(
            script,
            conn,
            &keys.commit_keys(),
            &self.encode(),
            "running an unstage script",
        )
    }
}

/// What [`unstage_pending`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unstaged {
    /// Staging lists found pending.
    pub lists: usize,
    /// Writes Redis refused on the way (recorded in the conflicts hash).
    pub conflicts: i64,
}

/// The staging lists not yet unstaged.
pub fn pending_lists(
    conn: &mut redis::Connection,
    keys: &FenceKeys,
) -> anyhow::Result<Vec<String>> {
    redis::cmd("SMEMBERS")
        .arg(&keys.staged)
        .query(conn)
        .context("reading the staged window series")
}

/// Unstages every pending staging list, a batch per script (sized by the sink that
/// staged it), until each is gone. Safe beside anyone else unstaging it: each script
/// pops the batch it applies.
pub fn unstage_pending(conn: &mut redis::Connection, keys: &FenceKeys) -> anyhow::Result<Unstaged> {
    let script = scripts::commit_script();
    let lists = pending_lists(conn, keys)?;
    let mut unstaged = Unstaged {
        lists: lists.len(),
        conflicts: 0,
    };
    for list in &lists {
        loop {
            let args = UnstageArgs {
                checkpoint: 0,
                units_prefix: &keys.units_prefix,
                conflicts_ttl_ms: CONFLICTS_TTL_MS,
                list,
                pending: &keys.staged,
            };
            match args.invoke(&script, conn, keys)? {
                Reply::Applied { conflicts, .. } => unstaged.conflicts += conflicts,
                Reply::AppliedBefore => break,
                Reply::Rejected(rejection) => {
                    anyhow::bail!("unstaging {list} was refused: {rejection}")
                }
            }
        }
    }
    Ok(unstaged)
}
