//! What Redis itself says about a run: its CPU seconds (`INFO cpu`), from which the
//! benchmark derives how busy Redis was and what each event cost it, and its SLOWLOG,
//! which gives the longest single command (a commit script, a `MULTI`/`EXEC`) it ran.

use anyhow::Context as _;

/// Slower commands than this are logged by Redis while the probe watches.
const SLOWLOG_THRESHOLD_MICROS: u64 = 1000;

pub struct RedisProbe {
    conn: redis::Connection,
    /// The settings found before [`RedisProbe::watch_slowlog`], put back on drop.
    saved: Option<(String, String)>,
}

/// The longest command Redis logged.
pub struct Longest {
    pub command: String,
    pub millis: f64,
}

impl RedisProbe {
    pub fn connect(url: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url).context("parsing the Redis URL")?;
        let conn = client
            .get_connection()
            .with_context(|| format!("connecting to {url}"))?;
        Ok(RedisProbe { conn, saved: None })
    }

    /// Redis's CPU seconds so far (user + system of the main process).
    pub fn cpu_seconds(&mut self) -> anyhow::Result<f64> {
        let info: String = redis::cmd("INFO")
            .arg("cpu")
            .query(&mut self.conn)
            .context("INFO cpu")?;
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        Ok(field("used_cpu_user") + field("used_cpu_sys"))
    }

    /// Keys in the benchmark's database (it must start empty).
    pub fn keys(&mut self) -> anyhow::Result<u64> {
        redis::cmd("DBSIZE").query(&mut self.conn).context("DBSIZE")
    }

    /// Empties the benchmark's database (between the reference job and the pipeline).
    pub fn flush(&mut self) -> anyhow::Result<()> {
        redis::cmd("FLUSHDB")
            .query::<()>(&mut self.conn)
            .context("FLUSHDB")
    }

    /// Starts logging every command over 1 ms, with an empty log.
    pub fn watch_slowlog(&mut self) -> anyhow::Result<()> {
        if self.saved.is_none() {
            let get = |conn: &mut redis::Connection, name: &str| -> anyhow::Result<String> {
                let pair: Vec<String> = redis::cmd("CONFIG").arg("GET").arg(name).query(conn)?;
                Ok(pair.get(1).cloned().unwrap_or_default())
            };
            let threshold = get(&mut self.conn, "slowlog-log-slower-than")?;
            let length = get(&mut self.conn, "slowlog-max-len")?;
            self.saved = Some((threshold, length));
        }
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("slowlog-log-slower-than")
            .arg(SLOWLOG_THRESHOLD_MICROS)
            .arg("slowlog-max-len")
            .arg(4096)
            .query::<()>(&mut self.conn)
            .context("configuring the SLOWLOG")?;
        redis::cmd("SLOWLOG")
            .arg("RESET")
            .query::<()>(&mut self.conn)
            .context("SLOWLOG RESET")
    }

    /// The longest command logged since [`RedisProbe::watch_slowlog`]; `None` when
    /// none took over a millisecond.
    pub fn longest(&mut self) -> anyhow::Result<Option<Longest>> {
        let entries: Vec<redis::Value> = redis::cmd("SLOWLOG")
            .arg("GET")
            .arg(4096)
            .query(&mut self.conn)
            .context("SLOWLOG GET")?;
        let mut longest: Option<Longest> = None;
        for entry in entries {
            let redis::Value::Array(fields) = entry else {
                continue;
            };
            let micros = match fields.get(2) {
                Some(redis::Value::Int(us)) => *us as f64,
                _ => continue,
            };
            let command = match fields.get(3) {
                Some(redis::Value::Array(args)) => match args.first() {
                    Some(redis::Value::BulkString(name)) => String::from_utf8_lossy(name).into(),
                    _ => "?".into(),
                },
                _ => "?".into(),
            };
            if longest.as_ref().is_none_or(|l| micros / 1000.0 > l.millis) {
                longest = Some(Longest {
                    command,
                    millis: micros / 1000.0,
                });
            }
        }
        Ok(longest)
    }
}

impl Drop for RedisProbe {
    fn drop(&mut self) {
        if let Some((threshold, length)) = self.saved.take() {
            let _ = redis::cmd("CONFIG")
                .arg("SET")
                .arg("slowlog-log-slower-than")
                .arg(threshold)
                .arg("slowlog-max-len")
                .arg(length)
                .query::<()>(&mut self.conn);
        }
    }
}
