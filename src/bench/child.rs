//! The pipeline under measurement, as `anchorflow run` in a process of its own: its
//! RSS is its own (not the benchmark's preloaded payloads), and what counts as
//! committed is read where it is durable, the fences in Redis: per partition the lower
//! of the Redis and warehouse fences, summed (the topic starts at offset 0).

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anchorflow_actors::protocol::fences;
use anchorflow_actors::protocol::keys::FenceKeys;
use anyhow::{bail, Context as _};

pub struct PipelineChild {
    child: Child,
    metrics: String,
    log: PathBuf,
    conn: redis::Connection,
    keys: FenceKeys,
    partitions: Vec<i32>,
}

/// Resident set size and its peak, in bytes, of process `pid` (`self` for this one).
pub fn rss_of(pid: &str) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU seconds (user + system) a process has used so far, from `/proc/{pid}/stat`,
/// whose times are in clock ticks (`sysconf(_SC_CLK_TCK)`, 100 on Linux); 0 if gone.
pub fn cpu_of(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces; fields count from after its `)`.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |n: usize| {
        fields
            .get(n)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15: the 12th and 13th after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// `GET path` on a local HTTP endpoint; the body.
fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_string()))
}

impl PipelineChild {
    /// Starts `anchorflow run` with `sets` (as `--set` overrides); logs go to `dir`.
    pub fn start(
        sets: &[String],
        redis_url: &str,
        (group, topic, partitions): (&str, &str, i32),
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let metrics = format!("127.0.0.1:{port}");
        let log = dir.join("pipeline.log");
        let exe = std::env::current_exe().context("locating the anchorflow binary")?;
        let mut command = Command::new(exe);
        command.arg("run");
        for set in sets {
            command.arg("--set").arg(set);
        }
        command
            .arg("--set")
            .arg(format!("metrics.listen={metrics}"));
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting `anchorflow run`")?;
        let redis = anchorflow_actors::config::RedisConfig {
            url: redis_url.to_string(),
            ..Default::default()
        };
        let conn = fences::connect(&redis, Duration::from_secs(10))?;
        Ok(PipelineChild {
            child,
            metrics,
            log,
            conn,
            keys: FenceKeys::new(group, topic),
            partitions: (0..partitions).collect(),
        })
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Fails with the pipeline's log when it has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("the pipeline exited ({status}):\n{}", tail.join("\n"));
        }
        Ok(())
    }

    /// Waits until the group assigned partitions to the pipeline.
    pub fn wait_assigned(&mut self, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            self.check_running()?;
            let body = http_get(&self.metrics, "/metrics").unwrap_or_default();
            let assigned = body
                .lines()
                .find_map(|l| l.strip_prefix("anchorflow_partitions_assigned "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
            if assigned > 0.0 {
                return Ok(());
            }
            if started.elapsed() > limit {
                bail!("no partition assigned within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Records durable in both sinks, from the fences.
    pub fn committed(&mut self) -> anyhow::Result<i64> {
        Ok(self.fenced()?.0)
    }

    /// Records durable in both sinks, and in Redis, from the fences.
    pub fn fenced(&mut self) -> anyhow::Result<(i64, i64)> {
        let stored = fences::read(&mut self.conn, &self.keys, &self.partitions)?;
        let redis = |r: &Option<i64>| r.unwrap_or(0);
        Ok(stored.values().fold((0, 0), |(both, in_redis), (_, r, w)| {
            (both + redis(r).min(redis(w)), in_redis + redis(r))
        }))
    }

    /// Durations (ms) of the pipeline's recent checkpoints.
    pub fn checkpoints(&self) -> Vec<f64> {
        http_get(&self.metrics, "/checkpoints")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// A value of the pipeline's metrics (a series without labels).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let body = http_get(&self.metrics, "/metrics").ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Stops the pipeline gracefully (SIGTERM) and returns its exit code.
    pub fn stop(mut self) -> anyhow::Result<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait()?;
        Ok(status.code().unwrap_or(-1))
    }
}

impl Drop for PipelineChild {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
