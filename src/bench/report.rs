//! What `anchorflow bench` prints of the pipeline run: the headline (records durable
//! in both sinks), the Redis side alone, Redis busy and CPU per event, checkpoints, the
//! longest command, pauses and memory against the budget (docs/benchmarks.md).

use anchorflow_actors::config::Config;

use super::reference::Writes;
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
    /// Seconds a commit script was outstanding (sent, its reply not yet read).
    pub(super) script_secs: f64,
    pub(super) rss_samples: Vec<u64>,
    pub(super) peak_rss: u64,
    pub(super) checkpoints: Vec<f64>,
    pub(super) longest: Option<redis_probe::Longest>,
    pub(super) uncommitted_pauses: f64,
    pub(super) exit_code: i32,
}

/// The cores this machine offers the run (the bench, Redis and the broker share them).
fn machine_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
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
        "redis_waiting_with_no_script: {:.0} %   (of the {:.2} s drain, the share with no commit script sent and unanswered; one was outstanding for {:.2} s, the network and reading its reply included)",
        100.0 * (1.0 - run.script_secs / run.drain_secs).max(0.0),
        run.drain_secs,
        run.script_secs,
    );
    println!(
        "redis_cpu_us_per_event_pipeline: {:.2}",
        run.redis_cpu_secs * 1e6 / events
    );
    println!(
        "pipeline_cpu_us_per_event: {:.2}   (anchorflow's own {:.2} CPU-s over the same {:.2} s, {:.2} cores busy: what it leaves Redis of the machine's cores)",
        run.own_cpu_secs * 1e6 / events,
        run.own_cpu_secs,
        run.drain_secs,
        run.own_cpu_secs / run.drain_secs,
    );
    if let Some(broker) = run.broker_cpu_secs {
        let cores = machine_cores();
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

/// Prints the pipeline against each reference run (`(writes, committed ev/s, Redis CPU
/// s)`) and, from the floor, the most one Redis core could commit; returns the floor's
/// Redis CPU seconds per event.
pub(super) fn report_references(
    events: usize,
    bare: f64,
    run: &PipelineRun,
    references: Vec<(Writes, f64, f64)>,
) -> Option<f64> {
    let events = events as f64;
    let mut floor_secs = None;
    for (writes, rate, cpu) in references {
        if writes == Writes::Floor {
            // No job on one Redis can commit faster than one fully busy core at this
            // cost.
            let bound = events / cpu;
            println!(
                "redis_bound_events_per_sec: {bound:.0}   (one Redis core 100 % busy at the floor's cost per event)"
            );
            println!("ratio_redis_bound_to_bare_consumer: {:.2}", bound / bare);
            floor_secs = Some(cpu / events);
            continue;
        }
        println!(
            "ratio_committed_to_reference_{writes:?}: {:.2}",
            run.committed_per_sec / rate
        );
        println!(
            "ratio_redis_cpu_per_event_pipeline_to_reference_{writes:?}: {:.2}",
            run.redis_cpu_secs / cpu
        );
    }
    floor_secs
}

/// Cores a job needs to commit `rate` events per second if it did nothing but decode
/// them (the straight loop, `straight_per_core` events per second on one core) and pay
/// Redis `redis_secs_per_event` for their writes, as (decode, Redis): a lower bound,
/// since reading from Kafka, the warehouse and the fences are left out.
pub(super) fn cores_needed(
    rate: f64,
    straight_per_core: f64,
    redis_secs_per_event: f64,
) -> (f64, f64) {
    (rate / straight_per_core, rate * redis_secs_per_event)
}

/// Prints the cores goal 3 (half the bare consumer) needs at this run's reference costs,
/// against the machine's: whether the goal can be met here at all, by any job.
pub(super) fn report_cores_needed(bare: f64, straight_per_core: f64, redis_secs_per_event: f64) {
    let cores = machine_cores();
    let (decode, redis) = cores_needed(bare / 2.0, straight_per_core, redis_secs_per_event);
    println!(
        "cores_needed_at_half_the_bare_consumer: {:.1}   (at {:.0} ev/s: the straight loop's decode, {decode:.2} cores, plus Redis at the floor's cost per event, {redis:.2} cores, of which one Redis server runs on one; reading Kafka, the warehouse and the fences not counted; this machine has {cores})",
        decode + redis,
        bare / 2.0,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1M events per second: decode at 2M per core is half a core, Redis at 2 µs per
    /// event is two cores' worth.
    #[test]
    fn cores_needed_adds_decode_and_redis_per_event() {
        assert_eq!(cores_needed(1e6, 2e6, 2e-6), (0.5, 2.0));
        assert_eq!(cores_needed(0.0, 2e6, 2e-6), (0.0, 0.0));
    }
}
