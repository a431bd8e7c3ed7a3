//! What `anchorflow bench` prints of the pipeline run: the headline (records durable
//! in both sinks), the Redis side alone, Redis busy and CPU per event, checkpoints, the
//! longest command, pauses and memory against the budget (docs/benchmarks.md).

use anchorflow_actors::config::Config;

use super::{mib, redis_probe, BenchOptions};

/// What the pipeline run measured.
pub(super) struct PipelineRun {
    pub(super) committed_per_sec: f64,
    pub(super) drain_secs: f64,
    /// From assignment until every Redis fence reached the end.
    pub(super) redis_drain_secs: f64,
    pub(super) join_secs: f64,
    pub(super) redis_cpu_secs: f64,
    /// The pipeline process's own CPU seconds over the same span.
    pub(super) own_cpu_secs: f64,
    /// The mock broker's CPU seconds over the same span (none for `--brokers`).
    pub(super) broker_cpu_secs: Option<f64>,
    pub(super) rss_samples: Vec<u64>,
    pub(super) peak_rss: u64,
    pub(super) checkpoints: Vec<f64>,
    pub(super) longest: Option<redis_probe::Longest>,
    pub(super) uncommitted_pauses: f64,
    pub(super) exit_code: i32,
}

/// The `q` quantile of `sorted` values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * q).ceil() as usize).saturating_sub(1))
        .copied()
        .unwrap_or(f64::NAN)
}

pub(super) fn report_pipeline(
    options: &BenchOptions,
    config: &Config,
    run: &PipelineRun,
    bare: f64,
) {
    let events = options.events as f64;
    println!(
        "pipeline_committed_events_per_sec: {:.0}   (headline: {} records durable in both sinks in {:.2} s after assignment; group join {:.2} s not counted)",
        run.committed_per_sec, options.events, run.drain_secs, run.join_secs
    );
    println!(
        "pipeline_redis_fenced_events_per_sec: {:.0}   (every Redis fence at the end {:.2} s after assignment: the real-time side, whatever warehouse.roll_interval_secs holds back)",
        events / run.redis_drain_secs,
        run.redis_drain_secs
    );
    println!(
        "ratio_committed_to_bare_consumer: {:.2}",
        run.committed_per_sec / bare
    );
    println!(
        "redis_busy_while_draining: {:.0} %   ({:.2} Redis CPU-s over {:.2} s)",
        100.0 * run.redis_cpu_secs / run.drain_secs,
        run.redis_cpu_secs,
        run.drain_secs
    );
    println!(
        "redis_cpu_us_per_event_pipeline: {:.2}",
        run.redis_cpu_secs * 1e6 / events
    );
    println!(
        "pipeline_cpu_us_per_event: {:.2}   (anchorflow's own {:.2} CPU-s over the same {:.2} s: what it leaves Redis of the machine's cores)",
        run.own_cpu_secs * 1e6 / events,
        run.own_cpu_secs,
        run.drain_secs
    );
    if let Some(broker) = run.broker_cpu_secs {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        println!(
            "broker_cpu_us_per_event: {:.2}   (the mock broker's {broker:.2} CPU-s; with anchorflow and Redis, {:.2} of the machine's {cores} cores busy while draining)",
            broker * 1e6 / events,
            (run.own_cpu_secs + run.redis_cpu_secs + broker) / run.drain_secs,
        );
    }
    let mut sorted = run.checkpoints.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "checkpoint_duration_ms: p50 {:.1} p99 {:.1} max {:.1} over {} checkpoints (interval {} ms)",
        quantile(&sorted, 0.5),
        quantile(&sorted, 0.99),
        quantile(&sorted, 1.0),
        sorted.len(),
        options.checkpoint_interval_ms
    );
    match &run.longest {
        Some(l) => println!(
            "longest_redis_command_ms: {:.1} ({}; redis.max_commit_ms = {})",
            l.millis, l.command, config.redis.max_commit_ms
        ),
        None => println!(
            "longest_redis_command_ms: < 1 (none logged; redis.max_commit_ms = {})",
            config.redis.max_commit_ms
        ),
    }
    println!("uncommitted_pauses: {}", run.uncommitted_pauses);
    let shown: Vec<String> = run
        .rss_samples
        .iter()
        .map(|b| format!("{:.0}", mib(*b)))
        .collect();
    println!("pipeline_rss_mib_every_500ms: [{}]", shown.join(", "));
    let budget = options
        .memory_budget_mb
        .unwrap_or(config.pipeline.memory_budget_mb);
    println!(
        "pipeline_peak_rss_mib: {:.1} of a {budget} MiB budget ({:.0} %)",
        mib(run.peak_rss),
        100.0 * mib(run.peak_rss) / budget as f64
    );
    println!("pipeline_exit_code: {}", run.exit_code);
}
