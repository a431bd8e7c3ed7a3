//! The process's own metrics, under the names every Prometheus client library uses
//! (`process_resident_memory_bytes`, `process_cpu_seconds_total`, …), read from `/proc`
//! at each scrape: the memory budget is a headline promise, and this is where an
//! operator sees it kept. Where `/proc` is missing (not Linux) the series are absent.

use std::sync::OnceLock;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

#[derive(Debug, Default)]
pub struct ProcessCollector;

/// What `/proc/self` says now.
#[derive(Debug, Default, PartialEq)]
struct Reading {
    resident_bytes: Option<i64>,
    virtual_bytes: Option<i64>,
    cpu_seconds: Option<f64>,
    start_seconds: Option<f64>,
    open_fds: Option<i64>,
    max_fds: Option<i64>,
}

fn ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    // SAFETY: sysconf only reads a system constant.
    *TICKS.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        n if n > 0 => n as f64,
        _ => 100.0,
    })
}

fn page_bytes() -> i64 {
    // SAFETY: sysconf only reads a system constant.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n,
        _ => 4096,
    }
}

/// The fields of `/proc/self/stat` after the command name (which may hold spaces).
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default()
}

fn read() -> Reading {
    let mut reading = Reading::default();
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // After the name: state is field 3 (index 0 here), utime 14, stime 15,
        // starttime 22, vsize 23, rss 24 (in pages).
        let fields = stat_fields(&stat);
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        let ticks = ticks_per_second();
        reading.cpu_seconds = field(14).zip(field(15)).map(|(u, s)| (u + s) / ticks);
        reading.virtual_bytes = field(23).map(|v| v as i64);
        reading.resident_bytes = field(24).map(|pages| pages as i64 * page_bytes());
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        reading.start_seconds = boot.zip(field(22)).map(|(b, t)| b + t / ticks);
    }
    reading.open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|entries| entries.count() as i64);
    reading.max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        });
    reading
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = read();
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                now.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                now.virtual_bytes,
            ),
            ("process_open_fds", "Open file descriptors", now.open_fds),
            (
                "process_max_fds",
                "Most file descriptors the process may open",
                now.max_fds,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(value) = value {
                let gauge = ConstGauge::new(value);
                gauge.encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    gauge.metric_type(),
                )?)?;
            }
        }
        if let Some(start) = now.start_seconds {
            let gauge = ConstGauge::new(start);
            let help = "Start time of the process since the Unix epoch in seconds";
            gauge.encode(encoder.encode_descriptor(
                "process_start_time_seconds",
                help,
                None,
                gauge.metric_type(),
            )?)?;
        }
        if let Some(cpu) = now.cpu_seconds {
            let counter = ConstCounter::new(cpu);
            let help = "User and system CPU time spent in seconds";
            counter.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_reads_as_itself() {
        let now = read();
        assert!(now.resident_bytes.is_some_and(|b| b > 1 << 20), "{now:?}");
        assert!(now.open_fds.is_some_and(|n| n >= 3), "{now:?}");
        assert!(now.cpu_seconds.is_some_and(|s| s >= 0.0), "{now:?}");
        let started = now.start_seconds.expect("start time");
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            started <= wall + 1.0 && started > wall - 86_400.0,
            "{started} vs {wall}"
        );
        assert_eq!(stat_fields("1 (a b) S 2 3"), ["S", "2", "3"]);
    }
}
