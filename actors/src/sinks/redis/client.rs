//! The Redis sink's connection: one multiplexed async connection, opened on first use
//! and again after any error, whose first use (and every minute after) also reads
//! Redis's clock, so that processing time follows Redis's and not this host's
//! (`runtime/clock.rs`), and whose every tenth second reads the server's `INFO`
//! ([`ServerWatch`]: evictions, the eviction policy). One deadline,
//! `redis.command_timeout_secs`, bounds every step.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use redis::aio::MultiplexedConnection;
use redis::{ErrorKind, ServerErrorKind, Value};
use tracing::{error, warn};

use crate::checkpoint::claim::SinkKind;
use crate::config::RedisConfig;
use crate::metrics::Metrics;
use crate::protocol::commit_args;
use crate::protocol::commit_args::Mode;
use crate::protocol::keys::FenceKeys;
use crate::protocol::reply::{self, Reply};
use crate::protocol::reply::{Conflict, Rejection};
use crate::protocol::scripts::ConflictArgs;
use crate::protocol::scripts::{self, Args};
use crate::protocol::server::ServerInfo;
use crate::protocol::verdict::{self, Verdict};
use crate::runtime::clock::{self, Clock};
use crate::runtime::health::Health;
use crate::sinks::redis::transaction::{day_end_at, day_end_wait, Transaction, DAY_END_MARGIN_MS};
use rustc_hash::FxHashSet;
use std::collections::BTreeSet;

/// How often Redis's clock is read again (it is also read on every new connection).
const CLOCK_CHECK: Duration = Duration::from_secs(60);

/// How often the server's `INFO` is read (evictions, the eviction policy).
const SERVER_CHECK: Duration = Duration::from_secs(10);

/// What the sink learns of the server every 10 s (`SERVER_CHECK`), reported: keys Redis
/// evicted (an error, `anchorflow_redis_evicted_keys`), and a policy that may evict
/// anchorflow's bookkeeping (not ready, unless `redis.allow_evicting_policy`), see
/// `protocol/server.rs`.
pub struct ServerWatch {
    metrics: Metrics,
    health: Health,
    allow_evicting: bool,
    /// Redis's `evicted_keys` at the last look.
    evicted: Option<u64>,
    /// The policy at the last look, to log a change once.
    policy: Option<String>,
    checked: Option<Instant>,
}

impl ServerWatch {
    pub fn new(metrics: &Metrics, health: &Health, allow_evicting: bool) -> Self {
        ServerWatch {
            metrics: metrics.clone(),
            health: health.clone(),
            allow_evicting,
            evicted: None,
            policy: None,
            checked: None,
        }
    }

    fn due(&self) -> bool {
        self.checked.is_none_or(|at| at.elapsed() >= SERVER_CHECK)
    }

    /// Reports what one look at `INFO` found.
    pub fn observe(&mut self, info: &ServerInfo) {
        self.checked = Some(Instant::now());
        self.metrics
            .redis_evicted_keys
            .set(info.evicted_keys as i64);
        if let Some(before) = self.evicted.filter(|&before| info.evicted_keys > before) {
            error!(
                evicted = info.evicted_keys - before,
                policy = info.policy,
                maxmemory = info.maxmemory,
                "Redis evicted keys since the last look: at maxmemory it drops data (austin keys, and under an allkeys-* policy possibly anchorflow's fences)"
            );
        }
        self.evicted = Some(info.evicted_keys);
        let unsafe_policy = info.may_evict_bookkeeping();
        let changed = self.policy.as_deref() != Some(info.policy.as_str());
        self.policy = Some(info.policy.clone());
        match (&unsafe_policy, self.allow_evicting) {
            (Some(why), false) => {
                if changed {
                    error!("{why}");
                }
                self.health.set_evicting(Some(why.clone()));
            }
            (Some(why), true) => {
                if changed {
                    warn!("{why} (allowed by redis.allow_evicting_policy)");
                }
                self.health.set_evicting(None);
            }
            (None, _) => self.health.set_evicting(None),
        }
    }
}

/// The connection and what lives with it. The sink lends it to each commit.
pub struct SinkConnection {
    redis: RedisConfig,
    timeout: Duration,
    conn: Option<MultiplexedConnection>,
    script: redis::Script,
    conflicts_script: redis::Script,
    /// Names this connection's deadline key (`transaction.rs`).
    nonce: String,
    /// The server, as its last `INFO` described it.
    server_info: Option<ServerInfo>,
    /// Data keys this connection saw written with the type it writes
    /// ([`key_hash`](crate::sinks::redis::transaction::key_hash)): a transaction does not check their type again.
    known: FxHashSet<u64>,
    /// The receivers' day end `known` holds keys for.
    known_until: Option<i64>,
    pub clock: Clock,
    clock_read: Option<Instant>,
    server: ServerWatch,
}

impl SinkConnection {
    pub fn new(config: &RedisConfig, clock: Clock, server: ServerWatch) -> Self {
        SinkConnection {
            redis: config.clone(),
            timeout: Duration::from_secs(config.command_timeout_secs),
            conn: None,
            script: scripts::commit_script(),
            conflicts_script: scripts::conflicts_script(),
            nonce: format!(
                "{}-{}",
                std::process::id(),
                chrono::Utc::now().timestamp_micros()
            ),
            server_info: None,
            known: FxHashSet::default(),
            known_until: None,
            clock,
            clock_read: None,
            server,
        }
    }

    /// Drops the connection: the next use opens a new one.
    pub fn reset(&mut self) {
        self.conn = None;
    }

    /// Bounds `step` by the deadline; on any failure the connection is dropped (a
    /// late answer must never be read as the next command's).
    async fn bounded<T>(
        &mut self,
        what: &str,
        step: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        let result = match tokio::time::timeout(self.timeout, step).await {
            Ok(result) => result.with_context(|| what.to_string()),
            Err(_) => Err(anyhow::anyhow!(
                "redis did not answer within {:?} ({what})",
                self.timeout
            )),
        };
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    async fn connection(&mut self) -> anyhow::Result<MultiplexedConnection> {
        if let Some(conn) = &self.conn {
            return Ok(conn.clone());
        }
        let client = self.redis.client()?;
        // The client's own response timeout defaults to 500 ms, shorter than a large
        // commit script runs; one deadline, ours, governs.
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let fresh = self
            .bounded("connecting to redis", async {
                Ok(client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?)
            })
            .await?;
        self.conn = Some(fresh.clone());
        self.known.clear();
        self.clock_read = None;
        Ok(fresh)
    }

    /// Connects if needed, and reads the clock and the server's `INFO` when due.
    async fn prepare(&mut self) -> anyhow::Result<MultiplexedConnection> {
        let conn = self.connection().await?;
        if self.clock_read.is_none_or(|at| at.elapsed() >= CLOCK_CHECK) {
            let clock = self.clock.clone();
            let mut measured_on = conn.clone();
            self.bounded("reading redis's clock", async move {
                clock::measure_async(&clock, &mut measured_on).await
            })
            .await?;
            self.clock_read = Some(Instant::now());
        }
        if self.server.due() {
            let mut asked = conn.clone();
            let text: String = self
                .bounded("reading redis's INFO", async move {
                    Ok(redis::cmd("INFO").query_async(&mut asked).await?)
                })
                .await?;
            let info = ServerInfo::parse(&text);
            self.server.observe(&info);
            self.server_info = Some(info);
        }
        Ok(conn)
    }

    /// One attempt at one commit script: connect if needed, read the clock when due,
    /// run the script.
    pub async fn apply(&mut self, keys: &FenceKeys, args: &Args) -> anyhow::Result<Reply> {
        let mut conn = self.prepare().await?;
        let script = self.script.clone();
        let value = self
            .bounded("running the commit script", async move {
                let command = commit_args::commit_command(&script, keys, args);
                match command.query_async(&mut conn).await {
                    Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                        script.load_async(&mut conn).await?;
                        Ok(command.query_async::<redis::Value>(&mut conn).await?)
                    }
                    reply => Ok(reply?),
                }
            })
            .await?;
        reply::parse(&value)
    }

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
            let mut chosen = Vec::with_capacity(day_ends.len());
            let mut wait_ms = 0;
            let estimate = self.clock.now_ms() + skew_ms;
            for ends in &day_ends {
                let (wait, at) = day_end_wait(*ends, estimate);
                wait_ms = wait_ms.max(wait);
                chosen.push((*ends, at));
            }
            if wait_ms > 0 {
                tokio::time::sleep(Duration::from_millis(wait_ms as u64)).await;
            }
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
            match verdict::verdict(commit.checkpoint, &commit.ranges, &read.fences)? {
                Verdict::Apply => {}
                Verdict::AppliedBefore => {
                    self.unwatch(&conn).await?;
                    return Ok(Reply::AppliedBefore);
                }
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
                    if set == Value::Nil {
                        continue;
                    }
                    return Ok(Reply::Rejected(Rejection::FencesMissing { partition }));
                }
                Verdict::Rejected(rejection) => {
                    self.unwatch(&conn).await?;
                    return Ok(Reply::Rejected(rejection));
                }
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
            let mut outcome = tx.outcome(&sent, &answers, &foreign);
            if commit.mode == Mode::Final {
                outcome
                    .conflicts
                    .extend(commit.refused.iter().map(|(key, lost)| Conflict {
                        key: key.clone(),
                        reason: "reserved_key".into(),
                        lost: *lost,
                    }));
            }
            self.record_conflicts(&mut conn, keys, commit.conflicts_ttl_ms, &outcome.conflicts)
                .await;
            let total = outcome.conflicts.len() as i64;
            outcome.conflicts.truncate(REPLY_CONFLICTS);
            return Ok(Reply::Applied {
                ops: outcome.ops,
                conflicts: total,
                first: outcome.conflicts,
            });
        }
        anyhow::bail!(
            "the fences changed under {WATCH_ATTEMPTS} commit transactions in a row (another writer of {}?)",
            keys.fences
        )
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

/// Keys per `EXISTS` of the type check.
const EXISTS_CHUNK: usize = 1_000;

/// Keys a connection remembers as written (a hash each: 8 bytes and the set's
/// overhead); past this it forgets them all and checks again.
const KNOWN_KEYS: usize = 1 << 20;

/// Conflicts named in a reply (as the script's reply names at most 100).
const REPLY_CONFLICTS: usize = 100;
