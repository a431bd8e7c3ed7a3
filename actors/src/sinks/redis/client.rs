//! The Redis sink's connection: one multiplexed async connection, opened on first use
//! and again after any error, whose first use (and every minute after) also reads
//! Redis's clock, so that processing time follows Redis's and not this host's
//! (`runtime/clock.rs`), and whose every tenth second reads the server's `INFO`
//! ([`ServerWatch`]: evictions, the eviction policy). One deadline,
//! `redis.command_timeout_secs`, bounds every step.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use redis::aio::MultiplexedConnection;
use redis::{ErrorKind, ServerErrorKind};
use tracing::{error, warn};

use crate::config::RedisConfig;
use crate::metrics::Metrics;
use crate::protocol::commit_args;
use crate::protocol::keys::FenceKeys;
use crate::protocol::reply::{self, Reply};
use crate::protocol::scripts::{self, Args};
use crate::protocol::server::ServerInfo;
use crate::runtime::clock::{self, Clock};
use crate::runtime::health::Health;

mod transact;
use rustc_hash::FxHashSet;

/// A commit script's answer to come ([`SinkConnection::send`]).
pub type Sent = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<redis::Value>>>>;

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
        let result = within(self.timeout, what, step).await;
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
        let sent = self.send(keys, args).await?;
        let value = sent.await;
        if value.is_err() {
            self.reset();
        }
        reply::parse(&value?)
    }

    /// Sends one commit script (connecting if needed, reading the clock when due) and
    /// returns its answer to come, bounded by the deadline, which owns what it needs:
    /// several can be outstanding on the connection. On its failure the caller drops
    /// the connection ([`SinkConnection::reset`]), as for any step.
    pub async fn send(&mut self, keys: &FenceKeys, args: &Args) -> anyhow::Result<Sent> {
        let mut conn = self.prepare().await?;
        let script = self.script.clone();
        let command = commit_args::commit_command(&script, keys, args);
        let timeout = self.timeout;
        Ok(Box::pin(within(
            timeout,
            "running the commit script",
            async move {
                match command.query_async(&mut conn).await {
                    Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                        script.load_async(&mut conn).await?;
                        Ok(command.query_async::<redis::Value>(&mut conn).await?)
                    }
                    reply => Ok(reply?),
                }
            },
        )))
    }
}

/// `step`, failed if it takes longer than `timeout`.
async fn within<T>(
    timeout: Duration,
    what: &str,
    step: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(timeout, step).await {
        Ok(result) => result.with_context(|| what.to_string()),
        Err(_) => Err(anyhow::anyhow!(
            "redis did not answer within {timeout:?} ({what})"
        )),
    }
}
