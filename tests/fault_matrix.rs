//! The fault matrix (issue 9): every row runs the `anchorflow` binary under a restart
//! loop, as systemd does, against a real Redis and a real Kafka-protocol broker, injects
//! one production fault, and then compares Redis and the warehouse with the oracle:
//! lists as multisets, hashes, TTLs, every Parquet row and (partition, offset) exactly
//! once, the window series and `dws_template_state_1m`. `docs/exactly-once.md` lists
//! the rows with what anchorflow does about each fault.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::child::*;
use common::servers::*;
use common::*;

/// 2023-11-21 00:00 in Asia/Shanghai, an hour (and day) boundary in event time.
const SHANGHAI_MIDNIGHT: i64 = 1_700_496_000_000;

/// In-order events (every partition's event times only grow, apart from the
/// generator's sub-second funnel jitter) from `start_ms`, `step_ms` apart per send.
fn in_order(seed: u64, count: usize, start_ms: i64, step_ms: i64) -> Vec<Option<Vec<u8>>> {
    generate_spread(seed, count, MAX_IDS, start_ms, step_ms)
}

/// When to inject a fault, as a percentage of the backlog committed: `default` in CI,
/// drawn from `ANCHORFLOW_SOAK_SEED` (and the row's name) when `scripts/soak.sh` runs
/// the matrix in a loop.
fn fault_moment(row: &str, default: i64) -> i64 {
    let Ok(seed) = std::env::var("ANCHORFLOW_SOAK_SEED") else {
        return default;
    };
    let mut state = row
        .bytes()
        .fold(seed.parse::<u64>().unwrap_or(1) | 1, |h, b| {
            h.rotate_left(5) ^ u64::from(b)
        });
    let percent = 5 + (next_random(&mut state) % 56) as i64;
    println!("{row}: fault at {percent} % of the backlog (ANCHORFLOW_SOAK_SEED={seed})");
    percent
}

/// Short timeouts so that a fault of a few seconds outlasts every one of them.
fn short_timeouts(setup: &mut Setup) {
    setup
        .set("redis.command_timeout_secs=2")
        .set("time.idle_timeout_ms=3000")
        .set("time.window_size_ms=5000");
}

/// The instance watermark the child exports, in Unix milliseconds.
/// The highest instance watermark that `read` records, processed, can justify when no
/// partition is idle: some partition has processed at most `read / partitions` of its
/// records, and the watermark is at most the largest event time among those.
fn watermark_bound(produced: &Produced) -> impl Fn(usize) -> Option<i64> {
    let running_max: Vec<Vec<i64>> = produced
        .values()
        .map(|records| {
            let mut max = i64::MIN;
            records
                .iter()
                .map(|r| {
                    let ts = oracle_parse(r, MAX_IDS).map_or(i64::MIN, |e| e.log_timestamp);
                    max = max.max(ts);
                    max
                })
                .collect()
        })
        .collect();
    move |read| {
        let each = read / running_max.len().max(1);
        running_max
            .iter()
            .filter_map(|maxima| maxima.get(each.checked_sub(1)?.min(maxima.len() - 1)))
            .copied()
            .max()
    }
}

/// Redis fails (`fault`) for longer than every timeout while a backlog of in-order
/// events around an hour boundary is read, then recovers (`heal`). The partitions
/// blocked behind it are held, not idle: the watermark moves only with records processed
/// (before, it ran on with processing time and closed windows and hours early),
/// and afterwards the oracle finds everything exactly once, no correction row and no
/// file published into a folder after its `_SUCCESS`.
fn redis_outage(name: &str, fault: impl FnOnce(&mut TestRedis), heal: impl FnOnce(&mut TestRedis)) {
    let mut redis = TestRedis::start();
    let mut setup = Setup::new(name, 4, redis.url(1));
    short_timeouts(&mut setup);
    // A bound on uncommitted records far below the backlog: the outage stops reading
    // mid-backlog (without it the shards and open files took in all 150,000 while
    // Redis was out, the partitions read to their ends turned idle, and the watermark
    // ran on: this row hung on its check of that).
    setup
        .set("time.idle_timeout_ms=5000")
        .set("pipeline.max_uncommitted_records=5000")
        .set("pipeline.stall_timeout_secs=5");
    // 150,000 events over 150 s of event time around an hour boundary.
    let produced = setup.produce_records(in_order(901, 150_000, SHANGHAI_MIDNIGHT - 60_000, 4));
    let total: i64 = produced.values().map(|r| r.len() as i64).sum();
    let metrics = format!("127.0.0.1:{}", free_port());
    let run = setup.supervise(name, &[], &metrics);
    let moment = fault_moment(name, 10);
    setup.wait_until("the fault moment", Duration::from_secs(120), || {
        setup.progress() > total * moment / 100
    });
    fault(&mut redis);
    // Sampled through the outage until the readers have processed nothing for three
    // idle timeouts (they work on for a while behind the restarting sinks, and the
    // records they finish rightly move the watermark): no partition turns idle, and the
    // watermark never passes what the records processed so far justify. Before the
    // fix, the partitions turned idle and it ran on with processing time, years past
    // the data.
    let bound = watermark_bound(&produced);
    let outage = std::time::Instant::now();
    let (mut samples, mut last_read, mut quiet_since) = (Vec::new(), None, outage);
    while quiet_since.elapsed() < Duration::from_secs(15) {
        let text = http_get(&metrics, "/metrics")
            .map(|r| r.1)
            .unwrap_or_default();
        let read = metric(&text, "anchorflow_records_read_total").unwrap_or(0.0) as usize;
        let sample = (
            metric(&text, "anchorflow_idle_partitions"),
            metric(&text, "anchorflow_watermark_timestamp_seconds")
                .map(|s| (s * 1000.0).round() as i64),
            read,
            bound(read),
        );
        let ok = sample.0 == Some(0.0) && sample.1.is_none_or(|w| sample.3.is_some_and(|b| w <= b));
        assert!(
            ok && outage.elapsed() < Duration::from_secs(150),
            "(idle partitions, watermark ms, records read, bound) {sample:?} after {:?} of \
             outage; the samples before: {:?}",
            outage.elapsed(),
            &samples[samples.len().saturating_sub(20)..]
        );
        if last_read != Some(read) {
            (last_read, quiet_since) = (Some(read), std::time::Instant::now());
        }
        samples.push(sample);
        std::thread::sleep(Duration::from_millis(250));
    }
    println!(
        "{name}: readers stopped {:?} into the outage; last sample {:?}",
        quiet_since - outage,
        samples.last()
    );
    // Loud, not silent: the sink is restarting, the partitions waiting for it are
    // stalled, and the process says it is not ready, and why.
    let (ready, why) = http_get(&metrics, "/readyz").unwrap_or_default();
    assert_eq!(ready, 503, "ready while Redis is out");
    assert!(
        why.contains("is restarting") && why.contains("is stalled"),
        "/readyz says why: {why}"
    );
    let stalled = http_get(&metrics, "/metrics")
        .and_then(|(_, text)| metric(&text, "anchorflow_stalled_partitions"));
    assert!(
        stalled >= Some(1.0),
        "stalled partitions exported: {stalled:?}"
    );
    heal(&mut redis);
    assert!(
        samples.iter().any(|s| s.1.is_some()),
        "the watermark was known during the outage: {samples:?}"
    );
    setup.wait_drained(&produced);
    // Both sinks talk to Redis (the warehouse keeps its commit record there): which of
    // them notices the outage first depends on where the checkpoint was.
    let restarted = http_get(&metrics, "/metrics").map(|(_, text)| {
        ["redis_sink", "warehouse_sink"]
            .map(|actor| {
                metric(
                    &text,
                    &format!(r#"anchorflow_actor_restarts_total{{actor="{actor}"}}"#),
                )
                .unwrap_or(0.0)
            })
            .iter()
            .sum::<f64>()
    });
    let stalled = http_get(&metrics, "/metrics")
        .and_then(|(_, text)| metric(&text, "anchorflow_stalled_partitions"));
    let exits = run.stop();
    println!("runs: {exits:?}");
    assert_eq!(
        exits.len(),
        1,
        "the sink restarted, not the process: {exits:?}"
    );
    assert!(
        restarted >= Some(1.0),
        "the sinks' restarts are counted: {restarted:?}"
    );
    assert_eq!(stalled, Some(0.0), "no partition stalled once drained");
    let log = std::fs::read_to_string(&exits[0].log).unwrap_or_default();
    assert!(
        log.contains("partition stalled") && log.contains("a stalled partition moves again"),
        "the stall and its end are logged"
    );
    setup.check_in_order(&produced);
}

#[test]
fn redis_paused_mid_backlog_loses_nothing_and_closes_nothing_early() {
    redis_outage("redis-pause", |redis| redis.pause(), |redis| redis.resume());
}

#[test]
fn redis_refusing_connections_mid_backlog_loses_nothing_and_closes_nothing_early() {
    redis_outage("redis-down", |redis| redis.stop(), |redis| redis.restart());
}

/// Redis misbehaves without going away while a backlog of in-order events drains:
/// `fault` runs every `every` for `lasting`, then `heal` once. The pipeline keeps
/// running (the sinks restart, the process does not), and afterwards the oracle finds
/// every record exactly once in both sinks, no correction row and no file published
/// into a folder after its `_SUCCESS`.
fn redis_misbehaving_mid_backlog(
    name: &str,
    every: Duration,
    lasting: Duration,
    mut fault: impl FnMut(&TestRedis, &mut redis::Connection),
    heal: impl FnOnce(&TestRedis, &mut redis::Connection),
) {
    let redis = TestRedis::start();
    let mut setup = Setup::new(name, 4, redis.url(1));
    if std::env::var("XPROD").is_ok() {
        setup
            .set("source.batch_max_records=4096")
            .set("pipeline.checkpoint_interval_ms=1000")
            .set("warehouse.roll_interval_secs=60")
            .set("pipeline.aggregator_shards=0")
            .set("pipeline.reader_threads=0")
            .set("redis.command_timeout_secs=30");
    } else {
        short_timeouts(&mut setup);
        setup
            .set("time.idle_timeout_ms=5000")
            .set("pipeline.max_uncommitted_records=5000");
    }
    let produced = setup.produce_batched(in_order(905, 150_000, SHANGHAI_MIDNIGHT - 60_000, 4));
    let total: i64 = produced.values().map(|r| r.len() as i64).sum();
    let metrics = format!("127.0.0.1:{}", free_port());
    let run = setup.supervise(name, &[], &metrics);
    let moment = fault_moment(name, 5);
    setup.wait_until("the fault moment", Duration::from_secs(120), || {
        setup.progress() > total * moment / 100
    });
    let mut admin = redis.admin();
    let started = std::time::Instant::now();
    while started.elapsed() < lasting {
        fault(&redis, &mut admin);
        std::thread::sleep(every);
    }
    heal(&redis, &mut admin);
    println!("{name}: fault over at progress {}", setup.progress());
    setup.wait_drained(&produced);
    let exits = run.stop();
    println!("runs: {exits:?}");
    assert_eq!(
        exits.len(),
        1,
        "the sinks restarted, not the process: {exits:?}"
    );
    setup.check_in_order(&produced);
}

/// A Redis configured as a cache (`maxmemory-policy allkeys-lru`) may evict the fences,
/// claims and publish records, and exactly-once with them: `run` refuses it at start
/// with exit 78 naming the setting that allows it; a policy changed to one while
/// running makes the process not ready, saying why; keys Redis evicts are logged and
/// exported. Before, such a Redis ran green and said nothing.
#[test]
fn a_redis_that_may_evict_anchorflows_keys_is_refused_or_flagged() {
    let redis = TestRedis::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let mut admin = redis.admin();
    let setup = Setup::new("evicting", 2, redis.url(1));
    let produced = setup.produce(908, 2_000);
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut refused = setup.spawn("evicting", &[], &metrics);
    let status = refused.wait_exit(Duration::from_secs(60));
    let log = refused.tail();
    assert_eq!(status.code(), Some(78), "refused at start: {log}");
    assert!(
        log.contains("allkeys-lru") && log.contains("redis.allow_evicting_policy"),
        "the refusal names the policy and the setting: {log}"
    );
    drop(refused);

    let set_policy = |admin: &mut redis::Connection, policy: &str| {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory-policy")
            .arg(policy)
            .query::<()>(admin)
            .unwrap();
    };
    set_policy(&mut admin, "noeviction");
    let run = setup.supervise("evicting", &[], &metrics);
    setup.wait_drained(&produced);
    let readyz = || http_get(&metrics, "/readyz").unwrap_or_default();
    setup.wait_until("ready", Duration::from_secs(30), || readyz().0 == 200);
    set_policy(&mut admin, "allkeys-lru");
    // The sink reads INFO every 10 s at a commit; commits run every checkpoint.
    setup.wait_until("not ready, saying why", Duration::from_secs(60), || {
        let (status, body) = readyz();
        status == 503 && body.contains("maxmemory-policy is allkeys-lru")
    });
    set_policy(&mut admin, "noeviction");
    setup.wait_until("ready again", Duration::from_secs(60), || readyz().0 == 200);
    setup.check(&produced);

    // Keys of someone else's with a time to live, evicted under volatile-lru once the
    // limit is below what the data set uses (the austin keys may go too: the oracle
    // has had its look).
    set_policy(&mut admin, "volatile-lru");
    for n in 0..2_000 {
        redis::cmd("SET")
            .arg(format!("someone-else:{n}"))
            .arg("x".repeat(512))
            .arg("EX")
            .arg(3_600)
            .query::<()>(&mut admin)
            .unwrap();
    }
    let used: String = redis::cmd("INFO").arg("memory").query(&mut admin).unwrap();
    let used: u64 = used
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory");
    redis.set_maxmemory(&mut admin, used - 200_000);
    // A write makes Redis evict down to the limit.
    redis::cmd("SET")
        .arg("someone-else:trigger")
        .arg("x")
        .query::<()>(&mut admin)
        .unwrap();
    setup.wait_until("the evictions exported", Duration::from_secs(60), || {
        http_get(&metrics, "/metrics")
            .and_then(|(_, text)| metric(&text, "anchorflow_redis_evicted_keys"))
            .is_some_and(|n| n > 0.0)
    });
    redis.set_maxmemory(&mut admin, 0);
    let exits = run.stop();
    let log = std::fs::read_to_string(&exits[0].log).unwrap_or_default();
    assert!(
        log.contains("Redis evicted keys since the last look"),
        "the evictions are logged"
    );
}

/// Reading that resumes inside a producer's batch (after every pause at a small
/// uncommitted bound) loses nothing. tansu answers a fetch inside a batch with the
/// batches after it: before the fix the source took the jump for the log's own gap and
/// the fences moved over the rest of the batch in both sinks, silently. The last
/// records are produced one per batch, so that only the jumps are tried here (the
/// partition that gets nothing at its end is the Redis rows' case).
#[test]
fn reading_that_resumes_inside_a_batch_loses_nothing() {
    let mut setup = Setup::new("inside-a-batch", 2, redis_url(28));
    setup.set("pipeline.max_uncommitted_records=300");
    let mut produced = setup.produce_batched(generate(906, 20_000, MAX_IDS));
    extend(
        &mut produced,
        setup.produce_records(generate(907, 20, MAX_IDS)),
    );
    let metrics = format!("127.0.0.1:{}", free_port());
    let run = setup.supervise("inside-a-batch", &[], &metrics);
    setup.wait_drained(&produced);
    let (_, text) = http_get(&metrics, "/metrics").expect("metrics");
    run.stop();
    setup.check(&produced);
    assert!(
        metric(&text, r#"anchorflow_offset_gaps_total{outcome="reread"}"#) >= Some(1.0),
        "the jumps were read again, and counted"
    );
}

/// Redis drops every client connection about twice a second for 40 s (a failover, a
/// proxy's idle timeout, `CLIENT KILL`): scripts die in flight, replies are lost, both
/// sinks restart again and again. Before the fix whole offset ranges vanished from
/// both sinks while the fences moved past them.
#[test]
fn redis_dropping_connections_mid_backlog_loses_nothing() {
    redis_misbehaving_mid_backlog(
        "redis-kill-clients",
        Duration::from_millis(
            std::env::var("XKILLMS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(500),
        ),
        Duration::from_secs(40),
        |redis, admin| {
            redis.kill_clients(admin);
        },
        |_, _| {},
    );
}

/// Redis at `maxmemory` (`noeviction`) for 30 s mid-backlog: every write is refused
/// with `OOM`, then the limit is lifted. Before the fix records went missing from both
/// sinks, and one partition stopped for good short of its end.
#[test]
fn redis_at_maxmemory_mid_backlog_loses_nothing_and_every_partition_finishes() {
    let mut limited = false;
    redis_misbehaving_mid_backlog(
        "redis-maxmemory",
        Duration::from_secs(1),
        Duration::from_secs(30),
        |redis, admin| {
            if !limited {
                redis.set_maxmemory(admin, 1 << 20);
                limited = true;
            }
        },
        |redis, admin| redis.set_maxmemory(admin, 0),
    );
}

/// A Redis sink far slower than the input, with the warehouse sink keeping up: nothing
/// but `pipeline.max_uncommitted_records` stops the readers (one checkpoint is in
/// flight at a time, so the shards never wait for the sink), and at no moment has a
/// partition read more than the bound (plus the batch in hand) beyond what Redis made
/// durable (the fence the bound is held to). Before the bound, the shards took in the
/// whole backlog.
#[test]
fn a_slow_redis_sink_holds_reading_at_the_uncommitted_bound() {
    const BOUND: i64 = 1_000;
    let mut setup = Setup::new("slow-sink", 4, redis_url(44));
    setup
        .set(format!("pipeline.max_uncommitted_records={BOUND}"))
        .set("redis.slowdown_factor=20");
    let produced = setup.produce_records(generate(1_005, 40_000, MAX_IDS));
    let metrics = format!("127.0.0.1:{}", free_port());
    let run = setup.supervise("slow-sink", &[], &metrics);
    let read = |metrics: &str| {
        http_get(metrics, "/metrics")
            .and_then(|(_, text)| metric(&text, "anchorflow_records_read_total"))
            .map(|n| n as i64)
    };
    let mut worst = 0;
    setup.wait_until(
        "every partition is durable",
        Duration::from_secs(180),
        || {
            // Read before the fences: the fences only move on, so the bound holds for
            // this pair too.
            if let Some(read) = read(&metrics) {
                let durable: i64 = setup.fences().values().map(|(_, r, _)| (*r).max(0)).sum();
                worst = worst.max(read - durable);
            }
            fenced_to_end(&setup.url, &setup.group, &setup.topic, &produced)
        },
    );
    let throttled = http_get(&metrics, "/metrics")
        .and_then(|(_, text)| metric(&text, "anchorflow_uncommitted_pauses_total"));
    let exits = run.stop();
    println!(
        "at most {worst} records read beyond the durable fences; {throttled:?} pauses at the bound"
    );
    assert_eq!(exits.len(), 1, "{exits:?}");
    assert!(
        throttled >= Some(1.0),
        "the bound paused reading: {throttled:?}"
    );
    let batch = 256;
    assert!(
        worst <= 4 * (BOUND + 2 * batch),
        "{worst} records were read beyond the durable fences (bound {BOUND} per partition)"
    );
    setup.check(&produced);
}

/// Issue 11: the memory budget holds a slow sink's backlog in bytes, whatever
/// `pipeline.max_uncommitted_records` says. 32 MiB gives the uncommitted input a share
/// of 32 MiB × 3/8 / EXPANSION, split over 4 partitions: about 500 KB, ~420 of these
/// records (padded to ~1.2 KB with a field the decoder ignores), per partition. Without
/// the budget (`ANCHORFLOW_TEST_BUDGET_MB=100000`, which is what the code did before)
/// the mailboxes alone hold ~9,000 records ahead of the fences and this fails.
#[test]
fn a_slow_redis_sink_holds_reading_within_the_memory_budget() {
    let budget = std::env::var("ANCHORFLOW_TEST_BUDGET_MB").unwrap_or_else(|_| "32".into());
    let mut setup = Setup::new("slow-budget", 4, redis_url(45));
    setup
        .set("pipeline.max_uncommitted_records=1000000")
        .set(format!("pipeline.memory_budget_mb={budget}"))
        .set("redis.slowdown_factor=20");
    let pad = format!("{{\"pad\":\"{}\",", "p".repeat(1000));
    let records: Vec<Option<Vec<u8>>> = generate(1_006, 20_000, MAX_IDS)
        .into_iter()
        .map(|r| match r {
            Some(v) if v.starts_with(b"{\"") => Some([pad.as_bytes(), &v[1..]].concat()),
            other => other,
        })
        .collect();
    let bytes: usize = records
        .iter()
        .map(|r| r.as_ref().map_or(0, Vec::len) + 64)
        .sum();
    let per_record = bytes as f64 / records.len() as f64;
    let produced = setup.produce_records(records);
    let metrics = format!("127.0.0.1:{}", free_port());
    let run = setup.supervise("slow-budget", &[], &metrics);
    let mut worst = 0;
    setup.wait_until(
        "every partition is durable",
        Duration::from_secs(180),
        || {
            if let Some(read) = http_get(&metrics, "/metrics")
                .and_then(|(_, text)| metric(&text, "anchorflow_records_read_total"))
            {
                let durable: i64 = setup.fences().values().map(|(_, r, _)| (*r).max(0)).sum();
                worst = worst.max(read as i64 - durable);
            }
            fenced_to_end(&setup.url, &setup.group, &setup.topic, &produced)
        },
    );
    let throttled = http_get(&metrics, "/metrics")
        .and_then(|(_, text)| metric(&text, "anchorflow_uncommitted_pauses_total"));
    let exits = run.stop();
    // The share per partition in records of the average size (a partition stops at
    // its share; 10 % for partitions whose records run larger than the average).
    let share = anchorflow_actors::runtime::memory::MemoryBudget::from_mb(32).uncommitted_bytes(4);
    let bound = 1.1 * 4.0 * share as f64 / per_record + 100.0;
    println!("at most {worst} records read beyond the durable fences (bound {bound:.0}); {throttled:?} pauses");
    assert_eq!(exits.len(), 1, "{exits:?}");
    assert!(
        throttled >= Some(1.0),
        "the budget paused reading: {throttled:?}"
    );
    assert!(
        (worst as f64) <= bound,
        "{worst} records were read beyond the durable fences (budget allows {bound:.0})"
    );
    setup.check(&produced);
}

/// Issue 11: the uncommitted bound is held against the Redis sink, not the warehouse.
/// Here the warehouse publishes nothing during the run (`roll_interval_secs` of ten
/// minutes), as it publishes once a minute by default. Before, every partition stopped
/// at the bound (1,000 records here) until the warehouse rolled, so the Redis side
/// trailed by the roll interval (at the defaults the bench committed 1,640 records/s
/// where 50,000 were possible). Now Redis reaches the end of every partition while the
/// warehouse has published nothing, memory stays bounded (its row groups are held to
/// their share), and the graceful stop publishes the rest exactly once.
#[test]
fn a_warehouse_that_publishes_rarely_does_not_hold_reading_back() {
    let mut setup = Setup::new("rare-roll", 4, redis_url(49));
    setup
        .set("pipeline.max_uncommitted_records=1000")
        .set("warehouse.roll_interval_secs=600");
    let produced = setup.produce_records(generate(1_007, 20_000, MAX_IDS));
    let ends: std::collections::BTreeMap<i32, i64> = produced
        .iter()
        .map(|(p, records)| (*p, records.len() as i64))
        .collect();
    let run = setup.supervise("rare-roll", &[], "");
    setup.wait_until(
        "Redis is fenced at the end of every partition",
        Duration::from_secs(120),
        || {
            let fences = setup.fences();
            ends.iter()
                .all(|(p, end)| fences.get(p).is_some_and(|(_, redis, _)| redis >= end))
        },
    );
    let published: i64 = setup.fences().values().map(|(_, _, w)| (*w).max(0)).sum();
    let total: i64 = ends.values().sum();
    assert!(
        published < total,
        "the warehouse published nothing yet ({published} of {total}), so it held nothing back"
    );
    let exits = run.stop();
    assert_eq!(exits.len(), 1, "{exits:?}");
    setup.check(&produced);
}

/// The other side of holding the uncommitted bound against Redis alone: a warehouse far
/// slower than the input (a slow disk or bucket: 40 ms per batch of rows here) with
/// Redis keeping up and no record bound to speak of. Reading is held back by the
/// handoff itself (a reader's `send().await` returns only once the warehouse handled
/// the batch, and every barrier waits behind the rows before it), so the records read
/// never run more than the batches in flight ahead of the rows the warehouse took in,
/// and the result is exact. A reader counts a batch as read and then waits until the
/// warehouse handled it, so each reader is at most one batch ahead, two between the
/// metric's two samples (measured: one; with the handoff made fire-and-forget, a
/// mutation, three, which fails the row).
#[test]
fn a_slow_warehouse_holds_reading_back_and_loses_nothing() {
    const BATCH: i64 = 256; // `source.batch_max_records` of the test setup
    const PARTITIONS: i64 = 4;
    let mut setup = Setup::new("slow-warehouse", PARTITIONS as i32, redis_url(50));
    setup.set("pipeline.max_uncommitted_records=1000000");
    let produced = setup.produce_records(generate(1_008, 30_000, MAX_IDS));
    let metrics = format!("127.0.0.1:{}", free_port());
    let run = setup.supervise(
        "slow-warehouse",
        &[("ANCHORFLOW_FAULT_WAREHOUSE_DELAY_MS", "40")],
        &metrics,
    );
    let mut worst = 0;
    setup.wait_until(
        "every partition is durable",
        Duration::from_secs(240),
        || {
            // Rows first: they only grow, so the pair never overstates the gap.
            let sample = http_get(&metrics, "/metrics").and_then(|(_, text)| {
                let rows = metric(&text, "anchorflow_warehouse_rows_total")?;
                let read = metric(&text, "anchorflow_records_read_total")?;
                Some(read - rows)
            });
            worst = worst.max(sample.map_or(0, |gap| gap as i64));
            fenced_to_end(&setup.url, &setup.group, &setup.topic, &produced)
        },
    );
    let exits = run.stop();
    // Per reader (one per partition): the batch it counted and waits to hand over, and
    // one more counted between the two samples (rows first). Every record is at least
    // one row.
    let bound = PARTITIONS * 2 * BATCH;
    println!("at most {worst} records read beyond the rows the warehouse took in (bound {bound})");
    assert_eq!(exits.len(), 1, "{exits:?}");
    assert!(
        worst <= bound,
        "{worst} records were read beyond what the slow warehouse took in (bound {bound})"
    );
    setup.check(&produced);
}

/// Issue 9, item 2: a receiver key that already holds a string (a shared Redis, or a
/// receiver id equal to another key). Before, the commit script failed halfway with
/// its fences moved, every retry was refused as not contiguous, and every restart
/// resumed from fences whose output was only partly written.
#[test]
fn a_key_of_another_type_is_reported_and_the_rest_applies_exactly() {
    let mut setup = Setup::new("wrongtype", 2, redis_url(20));
    let produced = setup.produce(2_000, 3_000);
    let taken = produced
        .values()
        .flat_map(|records| records.iter().filter_map(|r| oracle_parse(r, MAX_IDS)))
        .map(|e| e.ids[0].clone())
        .next()
        .expect("a receiver");
    let mut conn = redis::Client::open(setup.url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    redis::cmd("SET")
        .arg(&taken)
        .arg("someone else's")
        .query::<()>(&mut conn)
        .unwrap();
    setup.foreign.push(taken.clone());
    let metrics = format!("127.0.0.1:{}", free_port());
    let run = setup.supervise("wrongtype", &[], &metrics);
    setup.wait_drained(&produced);
    let (_, text) = http_get(&metrics, "/metrics").expect("metrics");
    let exits = run.stop();
    assert_eq!(exits.len(), 1, "no restart was needed: {exits:?}");
    assert!(
        metric(
            &text,
            r#"anchorflow_redis_conflicts_total{reason="wrong_type"}"#
        ) >= Some(1.0),
        "the conflict is counted"
    );
    setup.check(&produced);
    let kept: String = redis::cmd("GET").arg(&taken).query(&mut conn).unwrap();
    assert_eq!(kept, "someone else's");
    let conflicts: BTreeMap<String, i64> = redis::cmd("HGETALL")
        .arg(
            anchorflow_actors::protocol::keys::FenceKeys::new(&setup.group, &setup.topic).conflicts,
        )
        .query(&mut conn)
        .unwrap();
    assert!(
        conflicts.contains_key(&format!("wrong_type {taken}")),
        "recorded for the operator: {conflicts:?}"
    );
}

/// Issue 9, item 3: two instances on one warehouse root, `anchorflow` and
/// `anchorflow-2`. Before, restarting the first deleted the second's in-progress files
/// as its own orphans, and rows the fences had passed were never published.
#[test]
fn instance_ids_sharing_a_prefix_keep_their_files_apart() {
    let mut setup = Setup::on_mock_cluster("prefix", 4, redis_url(21));
    // Files stay in progress for seconds, so the second always has some.
    setup.set("warehouse.roll_interval_secs=3");
    let producer = setup.producer(2_100, 100, Duration::from_millis(100), 100_000);
    let first = setup.supervise("anchorflow", &[], "");
    setup.wait_until(
        "the first claimed everything",
        Duration::from_secs(60),
        || setup.epochs() >= 4,
    );
    let second = setup.supervise("anchorflow-2", &[], "");
    setup.wait_until(
        "the group rebalanced onto both",
        Duration::from_secs(90),
        || setup.epochs() >= 8,
    );
    let root = setup.warehouse.path().to_path_buf();
    setup.wait_until(
        "the second has files in progress",
        Duration::from_secs(60),
        || {
            hidden_files(&root).iter().any(|f| {
                f.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(".anchorflow-2")
            })
        },
    );
    // The first restarts (as after a crash) while the second's files are open.
    kill9(first.pid());
    let epochs = setup.epochs();
    setup.wait_until("the first is back", Duration::from_secs(90), || {
        setup.epochs() > epochs
    });
    let progress = setup.progress();
    setup.wait_until("both make progress", Duration::from_secs(60), || {
        setup.progress() > progress + 300
    });
    let produced = producer.finish();
    setup.wait_drained(&produced);
    let (a, b) = (first.stop(), second.stop());
    assert!(
        b.iter().all(|exit| exit.code == Some(0)),
        "the second never failed: {b:?}"
    );
    println!("first: {a:?}");
    setup.check(&produced);
}

/// Issue 9, item 4: one valid record ten years ahead (a producer with a broken clock)
/// on a one-partition topic. Before, the watermark jumped with it and `_SUCCESS` and
/// the hook fired for an hour the data had not left.
#[test]
fn a_timestamp_years_ahead_is_dead_lettered_and_commits_nothing_early() {
    let setup = Setup::new("poison", 1, redis_url(22));
    // 23:30 to 23:40 local, then the poison, then more of the same hour.
    let mut records = in_order(2_200, 2_000, SHANGHAI_MIDNIGHT - 30 * 60_000, 300);
    let ahead = chrono::Utc::now().timestamp_millis() + 10 * 365 * 86_400_000;
    let poison = format!(
        r#"{{"ids":["p1"],"state":10,"businessId":1000001220231120,"logTimestamp":{ahead}}}"#
    );
    records.insert(1_000, Some(poison.into_bytes()));
    let produced = setup.produce_records(records);
    let run = setup.supervise("poison", &[], "");
    setup.wait_drained(&produced);
    run.stop();
    setup.check(&produced);
    let markers = success_markers(setup.warehouse.path());
    assert!(markers.is_empty(), "no folder is complete yet: {markers:?}");
    let poisoned = read_warehouse(setup.warehouse.path())
        .into_iter()
        .find(|row| row.offset == 1_000)
        .expect("the poison's row");
    assert!(
        matches!(&poisoned.content, Err((reason, _)) if reason == "timestamp_in_future"),
        "{poisoned:?}"
    );
}

/// Issue 9, item 5: after a restart with no new records, the windows restored from the
/// fences must still close. Before, restored partitions had no watermark, so quiet
/// streams closed their windows only in an uninterrupted process.
#[test]
fn windows_restored_after_a_restart_close_without_new_records() {
    let mut setup = Setup::new("restore-close", 2, redis_url(23));
    setup
        .set("time.idle_timeout_ms=2000")
        .set("time.window_size_ms=5000");
    let produced = setup.produce_records(in_order(2_300, 1_000, SHANGHAI_MIDNIGHT - 60_000, 50));
    let first = setup.supervise("restore", &[], "");
    setup.wait_drained(&produced);
    first.stop();
    let open = |setup: &Setup| {
        let windows = read_series(&setup.url, &setup.group, &setup.topic).windows;
        stored_open_windows(&windows, "series").0.len()
            + stored_open_windows(&windows, "dws").0.len()
    };
    assert!(open(&setup) > 0, "the first run stopped with windows open");
    let second = setup.supervise("restore", &[], "");
    setup.wait_until(
        "every restored window closed",
        Duration::from_secs(60),
        || open(&setup) == 0,
    );
    second.stop();
    setup.check(&produced);
}

/// Issue 9, item 6: the broker no longer holds the offset a fence points at (retention
/// trimmed the log while the instance was down). The skipped range must be counted,
/// logged and shown by `fences show`, not only be a librdkafka warning.
#[test]
fn records_the_broker_dropped_before_they_were_read_are_counted_and_shown() {
    let setup = Setup::on_mock_cluster("trimmed", 1, redis_url(24));
    let mut produced = setup.produce(2_400, 200);
    let run = setup.supervise("trimmed", &[], "");
    setup.wait_drained(&produced);
    run.stop();
    // While it is down, far more than the mock cluster keeps per partition (~5 MB)
    // arrives: the log start moves past the fence.
    let big: Vec<Option<Vec<u8>>> = (0..60)
        .map(|n| Some(vec![b'a' + (n % 26) as u8; 200_000]))
        .collect();
    extend(&mut produced, setup.produce_records(big));
    let low = log_start(&setup.brokers, &setup.topic, 0);
    assert!(low > 200, "the broker trimmed the log (log start {low})");
    let metrics = format!("127.0.0.1:{}", free_port());
    let run = setup.supervise("trimmed", &[], &metrics);
    setup.wait_drained(&produced);
    let (_, text) = http_get(&metrics, "/metrics").expect("metrics");
    let (status, shown) = setup.fences_command(&["show"]);
    run.stop();
    assert_eq!(
        metric(
            &text,
            r#"anchorflow_records_skipped_total{partition="0",reason="offset_out_of_range"}"#
        ),
        Some((low - 200) as f64),
        "{text}"
    );
    assert!(status.success(), "{shown}");
    assert!(shown.contains(&format!("skipped {}", low - 200)), "{shown}");
    // Everything the broker still held arrived exactly once.
    let offsets: Vec<i64> = read_warehouse(setup.warehouse.path())
        .iter()
        .map(|r| r.offset)
        .collect();
    let expected: Vec<i64> = (0..200).chain(low..produced[&0].len() as i64).collect();
    let mut sorted = offsets.clone();
    sorted.sort();
    assert_eq!(sorted, expected);
}

fn kill9(pid: u32) {
    assert!(pid != 0, "the instance is running");
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The first offset a broker still holds for a partition.
fn log_start(brokers: &str, topic: &str, partition: i32) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .unwrap()
        .0
}

/// Redis restarted from an older snapshot (an RDB taken earlier, a stale replica
/// promoted): its fences are behind what the warehouse already published. The running
/// instance's next commit is refused, the restart's claim finds the fences behind the
/// warehouse's own record of what it published, marks the loss (not ready, exit 76),
/// and waits; `fences recover --redis-from keep` keeps the snapshot's Redis counts
/// (consistent with its fences) and takes the warehouse fences from the warehouse.
/// No row is ever published twice.
#[test]
fn redis_restored_from_an_older_snapshot_is_detected_and_recovered_exactly() {
    let mut redis = TestRedis::start();
    let setup = Setup::new("snapshot", 2, redis.url(1));
    let mut produced = setup.produce(3_000, 1_500);
    let metrics = format!("127.0.0.1:{}", free_port());
    let run = setup.supervise("snapshot", &[], &metrics);
    setup.wait_drained(&produced);
    let snapshot = redis.snapshot();
    extend(&mut produced, setup.produce(3_001, 1_500));
    setup.wait_drained(&produced);
    redis.restore(&snapshot);
    extend(&mut produced, setup.produce(3_002, 500));
    setup.wait_until("the loss is reported", Duration::from_secs(90), || {
        http_get(&metrics, "/metrics")
            .is_some_and(|(_, text)| metric(&text, "anchorflow_redis_state_lost") == Some(1.0))
    });
    assert_eq!(http_get(&metrics, "/readyz").map(|r| r.0), Some(503));
    let duplicates = check_no_duplicates(setup.warehouse.path());
    assert_eq!(
        duplicates, 0,
        "no row was published twice while Redis was behind"
    );
    let (status, out) = setup.fences_command(&["recover", "--redis-from", "keep"]);
    assert!(status.success(), "{out}");
    setup.wait_drained(&produced);
    let exits = run.stop();
    assert!(
        exits.iter().any(|e| e.code == Some(76)),
        "a claim found the loss: {exits:?}"
    );
    // The dws windows open at the snapshot's fence are dropped with it (docs).
    setup.check_with(&produced, Dws::NoMoreThanOracle);
}

/// How many warehouse rows repeat a (partition, offset) another row has.
fn check_no_duplicates(root: &std::path::Path) -> usize {
    let mut seen = std::collections::BTreeMap::<(i32, i64), usize>::new();
    for row in read_warehouse(root) {
        *seen.entry((row.partition, row.offset)).or_default() += 1;
    }
    seen.values().map(|n| n - 1).sum()
}

/// The broker freezes for a minute mid-backlog (SIGSTOP: connections stay open,
/// nothing answers). Its partitions are not idle meanwhile; afterwards everything
/// arrives exactly once and nothing closed early.
#[test]
fn a_broker_paused_for_a_minute_loses_nothing_and_closes_nothing_early() {
    let broker = TestBroker::start();
    let mut setup = Setup::on_brokers("broker-pause", &broker.brokers(), 4, redis_url(25));
    short_timeouts(&mut setup);
    // The session outlasts the pause. With the suite's 6 s the member's session ran
    // out during it, the process exited 75 as it must, and its restart then waited
    // for ever on tansu 0.6.0, which never expires the dead member (seen once). A
    // lost session is the group rows' business, on the mock cluster.
    setup.set("kafka.session.timeout.ms=120000");
    let produced = setup.produce_records(in_order(3_100, 60_000, SHANGHAI_MIDNIGHT - 30_000, 4));
    let total: i64 = produced.values().map(|r| r.len() as i64).sum();
    let run = setup.supervise("broker-pause", &[], "");
    let moment = fault_moment("broker-pause", 20);
    setup.wait_until("the fault moment", Duration::from_secs(120), || {
        setup.progress() > total * moment / 100
    });
    broker.pause();
    std::thread::sleep(Duration::from_secs(60));
    broker.resume();
    setup.wait_drained(&produced);
    let exits = run.stop();
    println!("runs: {exits:?}");
    setup.check_in_order(&produced);
}

/// `anchorflow_records_read_total` of the child whose metrics listen on `metrics`.
fn records_read(metrics: &str) -> Option<f64> {
    http_get(metrics, "/metrics")
        .and_then(|(_, text)| metric(&text, "anchorflow_records_read_total"))
}

/// How often `text` occurs in the log at `path`.
fn logged(path: &std::path::Path, text: &str) -> usize {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    log.matches(text).count()
}

/// After a stop: a second run (with the fault healed) drains the topic, and the oracle
/// finds everything exactly once.
fn a_second_run_finishes_exactly(setup: &Setup, instance: &str, produced: &Produced) {
    let run = setup.supervise(instance, &[], "");
    setup.wait_drained(produced);
    run.stop();
    setup.check_in_order(produced);
}

/// SIGTERM while the broker is frozen (SIGSTOP), with records read but not yet
/// checkpointed: the final checkpoint needs only the sinks, so the process commits it
/// and exits 0 within `pipeline.shutdown_timeout_secs`, although the group can be told
/// neither the offsets nor the leave. Those are progress reports only; the next run,
/// with the broker back, resumes from the fences: everything exactly once.
#[test]
fn a_graceful_stop_while_the_broker_is_frozen_exits_0_and_loses_nothing() {
    let broker = TestBroker::start();
    let mut setup = Setup::on_brokers("stop-frozen", &broker.brokers(), 2, redis_url(60));
    short_timeouts(&mut setup);
    // No periodic checkpoint: the final one has records to commit, and so offsets to
    // report.
    // The stopped member cannot leave the group, so the next run is assigned its
    // partitions once the session expires. tansu 0.6.0 did so after a session of 30 s
    // or 120 s; with the suite's 6 s, which ran out during the freeze, never.
    setup
        .set("kafka.session.timeout.ms=30000")
        .set("pipeline.checkpoint_interval_ms=600000")
        .set("pipeline.shutdown_timeout_secs=20");
    let produced = setup.produce_records(in_order(3_150, 20_000, SHANGHAI_MIDNIGHT - 30_000, 4));
    a_stop_with_the_broker_out(
        &setup,
        "stop-frozen",
        &produced,
        (&|| broker.pause(), &|| broker.resume()),
        None,
    );
}

/// SIGTERM while the broker refuses connections (librdkafka's mock cluster takes its
/// broker down: open connections are closed, new ones refused), with records read but
/// not yet checkpointed: as with a frozen broker, the final checkpoint needs only the
/// sinks, so the process exits 0 within its deadline; the offsets it could not report
/// are only progress. The next run, with the broker back, finishes exactly once.
#[test]
fn a_graceful_stop_while_the_broker_refuses_connections_exits_0_and_loses_nothing() {
    let mut setup = Setup::on_mock_cluster("stop-refused", 2, redis_url(61));
    short_timeouts(&mut setup);
    // Taken down, the mock broker first stops answering and closes its connections up
    // to ~5 s later: with the suite's 6 s session the group dropped the member before
    // the stop (exit 75, seen once), which is the group rows' business.
    setup
        .set("kafka.session.timeout.ms=30000")
        .set("pipeline.checkpoint_interval_ms=600000")
        .set("pipeline.shutdown_timeout_secs=20");
    let produced = setup.produce_records(in_order(3_190, 20_000, SHANGHAI_MIDNIGHT - 30_000, 4));
    let cluster = setup.mock().expect("a mock cluster");
    a_stop_with_the_broker_out(
        &setup,
        "stop-refused",
        &produced,
        (&|| cluster.broker_down(1).expect("broker down"), &|| {
            cluster.broker_up(1).expect("broker up")
        }),
        // Taken down, the mock broker has closed its connections once the child's
        // client fails to open one again.
        Some("Connection refused"),
    );
}

/// Runs a first instance, takes the broker `out` at a moment when it has read records
/// beyond the Redis fences, and stops it with SIGTERM: it must exit 0 (past
/// `pipeline.shutdown_timeout_secs` it exits 1) with the fences moved by exactly the
/// records it read. Then the broker is `back` and a second run finishes exactly. With
/// `evidence`, the stop waits until the child's log shows it once more after `out`.
fn a_stop_with_the_broker_out(
    setup: &Setup,
    instance: &str,
    produced: &Produced,
    (out, back): (&dyn Fn(), &dyn Fn()),
    evidence: Option<&str>,
) {
    let metrics = format!("127.0.0.1:{}", free_port());
    let read = || records_read(&metrics).unwrap_or(0.0) as i64;
    let first = setup.spawn(instance, &[], &metrics);
    // Out mid-backlog with records read beyond the Redis fences (the input running dry
    // starts checkpoints, so a moment is tried until one holds such).
    let mut attempts = 0;
    let uncommitted = loop {
        setup.wait_until("1,000 more records read", Duration::from_secs(120), || {
            read() >= setup.progress() + 1_000
        });
        let seen = evidence.map(|evidence| (evidence, logged(&first.log, evidence)));
        out();
        if let Some((evidence, seen)) = seen {
            setup.wait_until(
                "the broker's client to see it out",
                Duration::from_secs(30),
                || logged(&first.log, evidence) > seen,
            );
        }
        let settled = read();
        std::thread::sleep(Duration::from_secs(1));
        let (now, committed) = (read(), setup.progress());
        if now == settled && now > committed {
            break now - committed;
        }
        attempts += 1;
        assert!(
            attempts < 10,
            "no moment with records read beyond the fences"
        );
        back();
    };
    let before = setup.progress();
    println!("{instance}: {uncommitted} records read beyond the fences at the stop");
    first.stop();
    back();
    assert_eq!(
        setup.progress(),
        before + uncommitted,
        "the final checkpoint commits every record read: {:?}",
        setup.fences()
    );
    a_second_run_finishes_exactly(setup, instance, produced);
}

/// SIGTERM while Redis is frozen, with records read since the last checkpoint: the
/// final checkpoint cannot commit, and the process says so (an error, exit 1) at
/// `pipeline.shutdown_timeout_secs` instead of hanging on the frozen connection or
/// claiming a clean stop. Nothing was made durable that is not fenced: the next run, with
/// Redis back, reads the rest again and the oracle finds everything exactly once.
#[test]
fn a_graceful_stop_while_redis_is_frozen_exits_1_at_its_deadline_and_loses_nothing() {
    use std::os::unix::process::ExitStatusExt as _;
    let redis = TestRedis::start();
    let mut setup = Setup::new("stop-redis-frozen", 2, redis.url(1));
    short_timeouts(&mut setup);
    setup
        .set("pipeline.checkpoint_interval_ms=600000")
        .set("pipeline.shutdown_timeout_secs=5");
    let produced = setup.produce_records(in_order(3_170, 6_000, SHANGHAI_MIDNIGHT - 30_000, 4));
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut first = setup.spawn("stop-redis-frozen", &[], &metrics);
    setup.wait_until(
        "records read beyond the fences",
        Duration::from_secs(120),
        || records_read(&metrics).is_some_and(|read| read as i64 > setup.progress() + 500),
    );
    redis.pause();
    first.signal("TERM");
    let status = first.wait_exit(Duration::from_secs(60));
    redis.resume();
    let log = std::fs::read_to_string(&first.log).unwrap_or_default();
    assert_eq!(
        (status.code(), status.signal()),
        (Some(1), None),
        "exit 1 at the deadline; log:\n{}",
        first.tail()
    );
    assert!(
        log.contains("final checkpoint failed") && log.contains("did not complete within 5s"),
        "the failed final checkpoint is logged as an error, with its deadline; log:\n{}",
        first.tail()
    );
    a_second_run_finishes_exactly(&setup, "stop-redis-frozen", &produced);
}

/// Fetch and metadata requests fail for a while (librdkafka's mock cluster injects
/// the errors): the consumer retries, nothing is lost or doubled.
#[test]
fn fetch_and_metadata_errors_lose_nothing() {
    use rdkafka::types::RDKafkaApiKey;
    use rdkafka::types::RDKafkaRespErr;
    let setup = Setup::on_mock_cluster("broker-errors", 3, redis_url(26));
    let producer = setup.producer(3_200, 100, Duration::from_millis(100), 100_000);
    let run = setup.supervise("broker-errors", &[], "");
    setup.wait_until("progress", Duration::from_secs(60), || {
        setup.progress() > 300
    });
    let cluster = setup.mock().expect("a mock cluster");
    let errors = [
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_BROKER_NOT_AVAILABLE,
    ];
    let burst: Vec<RDKafkaRespErr> = errors.iter().copied().cycle().take(60).collect();
    cluster.request_errors(RDKafkaApiKey::Fetch, &burst);
    cluster.request_errors(RDKafkaApiKey::Metadata, &burst[..12]);
    let progress = setup.progress();
    setup.wait_until("progress after the errors", Duration::from_secs(90), || {
        setup.progress() > progress + 600
    });
    let produced = producer.finish();
    setup.wait_drained(&produced);
    run.stop();
    setup.check(&produced);
}

/// Runs a child as `nobody` (file permissions then count) on a warehouse `prepare`d
/// with a fault; checks that it fails loudly (exit 74, `evidence` in its log) while
/// the fault lasts, that nothing is published meanwhile that the oracle would not
/// accept, and that once `clear` removes the fault everything arrives exactly once.
fn warehouse_fault(
    name: &str,
    db: u32,
    prepare: impl FnOnce(&std::path::Path),
    evidence: &str,
    clear: impl FnOnce(&std::path::Path),
) {
    let setup = Setup::new(name, 2, redis_url(db));
    let root = setup.warehouse.path().to_path_buf();
    prepare(&root);
    let produced = setup.produce(3_300, 2_000);
    let run = Supervised::start(setup.launcher(name, &[], "").wrapped(&AS_NOBODY));
    setup.wait_until(
        "the fault stopped it loudly",
        Duration::from_secs(90),
        || {
            run.exits().iter().any(|e| {
                e.code == Some(74)
                    && std::fs::read_to_string(&e.log).is_ok_and(|log| log.contains(evidence))
            })
        },
    );
    assert_eq!(
        check_no_duplicates(&root),
        0,
        "nothing published twice while failing"
    );
    clear(&root);
    setup.wait_drained(&produced);
    let exits = run.stop();
    println!("{name}: {} runs", exits.len());
    setup.check(&produced);
}

#[test]
fn a_full_disk_stops_loudly_and_loses_nothing() {
    let disk = std::cell::OnceCell::new();
    warehouse_fault(
        "disk-full",
        28,
        |root| {
            let _ = disk.set(Tmpfs::mount(root, "40k", 10_000));
            give_to_nobody(root);
        },
        "No space left on device",
        |_| disk.get().unwrap().remount("256m", 10_000),
    );
}

#[test]
fn too_few_inodes_stop_loudly_and_lose_nothing() {
    let disk = std::cell::OnceCell::new();
    warehouse_fault(
        "inodes",
        29,
        |root| {
            let _ = disk.set(Tmpfs::mount(root, "256m", 4));
            give_to_nobody(root);
        },
        "No space left on device",
        |_| disk.get().unwrap().remount("256m", 100_000),
    );
}

#[test]
fn a_read_only_table_folder_stops_loudly_and_loses_nothing() {
    warehouse_fault(
        "read-only",
        30,
        |root| {
            let table = root.join("ods_anchor_log");
            std::fs::create_dir(&table).unwrap();
            give_to_nobody(root);
            chmod(&table, 0o555);
        },
        "Permission denied",
        |root| chmod(&root.join("ods_anchor_log"), 0o755),
    );
}

#[test]
fn an_unreadable_entry_at_start_stops_loudly_and_loses_nothing() {
    warehouse_fault(
        "unreadable",
        31,
        |root| {
            give_to_nobody(root);
            // Root's, mode 700: `nobody` cannot look inside.
            let hidden = root.join("dead_letter/dt=2023-01-01");
            std::fs::create_dir_all(&hidden).unwrap();
            give_to_nobody(&root.join("dead_letter"));
            let status = std::process::Command::new("chown")
                .args(["0:0"])
                .arg(&hidden)
                .status()
                .unwrap();
            assert!(status.success());
            chmod(&hidden, 0o700);
        },
        "dt=2023-01-01",
        |root| {
            give_to_nobody(&root.join("dead_letter/dt=2023-01-01"));
        },
    );
}

/// A partition-commit hook that hangs every time (and whose children would hang too):
/// data keeps flowing to the end while the hook times out, is killed with its whole
/// process group and is retried; it never sees anchorflow's secrets.
#[test]
fn a_hook_that_hangs_every_time_holds_nothing_up_and_leaves_nothing_behind() {
    let mut setup = Setup::new("hook-hangs", 2, redis_url(36));
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("hook.env");
    setup
        .set("time.idle_timeout_ms=2000")
        .set("warehouse.partition_commit_hook_timeout_secs=1")
        .set(format!(
            "warehouse.partition_commit_hook=env > {}; sleep 987654 & sleep 987654",
            env_file.display()
        ));
    let produced = setup.produce_records(in_order(3_600, 3_000, SHANGHAI_MIDNIGHT - 120_000, 100));
    let metrics = format!("127.0.0.1:{}", free_port());
    let run = setup.supervise(
        "hook-hangs",
        &[("ANCHORFLOW_KAFKA__SASL_PASSWORD", "hunter2")],
        &metrics,
    );
    setup.wait_drained(&produced);
    setup.wait_until("the hook failed twice", Duration::from_secs(60), || {
        http_get(&metrics, "/metrics").is_some_and(|(_, text)| {
            metric(&text, "anchorflow_partition_commit_hook_failures_total") >= Some(2.0)
        })
    });
    let exits = run.stop();
    assert_eq!(exits.len(), 1, "no restart: {exits:?}");
    let left = std::process::Command::new("pgrep")
        .args(["-f", "sleep 987654"])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "the hook's processes are gone: {}",
        String::from_utf8_lossy(&left.stdout)
    );
    let env = std::fs::read_to_string(&env_file).expect("the hook ran");
    assert!(env.contains("ANCHORFLOW_PARTITION_PATH="), "{env}");
    assert!(
        !env.contains("hunter2"),
        "a secret reached the hook:\n{env}"
    );
    setup.check(&produced);
}

/// anchorflow's host clock wrong against Redis's (a fault point shifts every wall
/// clock read of the binary; libfaketime does not work with librdkafka's and Redis's
/// own timing): receiver lists expire at the end of the day by Redis's clock, neither
/// early nor late. Before, their TTL was an absolute end of day by the host's clock: a
/// host a day behind made them expire at once.
fn skewed_host_clock(name: &str, db: u32, offset_ms: i64) {
    let setup = Setup::new(name, 2, redis_url(db));
    let produced = setup.produce(3_700, 1_500);
    let metrics = format!("127.0.0.1:{}", free_port());
    let offset = offset_ms.to_string();
    let run = setup.supervise(
        name,
        &[("ANCHORFLOW_FAULT_CLOCK_OFFSET_MS", offset.as_str())],
        &metrics,
    );
    setup.wait_drained(&produced);
    let (_, text) = http_get(&metrics, "/metrics").expect("metrics");
    run.stop();
    let skew = metric(&text, "anchorflow_clock_skew_seconds").unwrap_or_default();
    let expected = -(offset_ms as f64) / 1000.0;
    assert!(
        (skew - expected).abs() < 5.0,
        "measured skew {skew} s, expected {expected}"
    );
    setup.check(&produced);
    // Exactly until the next local midnight (Asia/Shanghai), by the real clock.
    let now = chrono::Utc::now().timestamp_millis();
    let to_midnight = 86_400_000 - (now + 8 * 3_600_000).rem_euclid(86_400_000);
    if to_midnight > 600_000 {
        let (contents, ttls) = read_redis(&setup.url);
        for key in contents.lists.keys().filter(|k| !k.starts_with("Austin:")) {
            let ttl = ttls[key];
            assert!(
                (to_midnight - 180_000..=to_midnight + 1_000).contains(&ttl),
                "{key} expires in {ttl} ms, the day ends in {to_midnight} ms"
            );
        }
    }
}

#[test]
fn a_host_clock_a_day_behind_does_not_expire_receiver_lists_early() {
    skewed_host_clock("clock-behind", 37, -86_400_000);
}

#[test]
fn a_host_clock_hours_ahead_does_not_expire_receiver_lists_early() {
    skewed_host_clock("clock-ahead", 39, 5 * 3_600_000);
}

/// A backlog of events with 10,000 receivers each: commits are split so that no
/// single Redis script runs long (austin-web reads the same Redis). Redis's own slow
/// log (threshold four times the configured bound) must not list one.
#[test]
fn huge_checkpoints_commit_in_scripts_that_stay_short() {
    let redis = TestRedis::start_with(&["--slowlog-log-slower-than", "100000"]);
    let mut setup = Setup::new("huge", 2, redis.url(1));
    setup
        .set("decode.max_ids=10000")
        .set("redis.max_commit_ms=25");
    let receivers: Vec<String> = (0..10_000).map(|n| format!("\"r{n}\"")).collect();
    let ids = receivers.join(",");
    let records: Vec<Option<Vec<u8>>> = (0..60)
        .map(|n| {
            Some(
                format!(
                    r#"{{"ids":[{ids}],"state":10,"businessId":1000001220231120,"logTimestamp":{},"messageId":"m{n}"}}"#,
                    SHANGHAI_MIDNIGHT + n * 1_000
                )
                .into_bytes(),
            )
        })
        .collect();
    let produced = setup.produce_records(records);
    let run = setup.supervise("huge", &[], "");
    setup.wait_drained(&produced);
    run.stop();
    let mut conn = redis::Client::open(redis.url(1).as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let scripts = slow_scripts(&mut conn);
    assert!(scripts.is_empty(), "slow commit scripts: {scripts:?}");
    setup.check(&produced);
}

/// The scripts in Redis's slow log, each shortened to its first arguments.
fn slow_scripts(conn: &mut redis::Connection) -> Vec<String> {
    let slow: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(100)
        .query(conn)
        .unwrap();
    slow.iter()
        .map(|entry| format!("{entry:?}"))
        .filter(|e| e.contains("EVAL"))
        .map(|e| e.chars().take(200).collect())
        .collect()
}

/// Issue 11: a backlog spread over tens of thousands of one-minute windows closes them
/// at one checkpoint. Their series, far more than one script may carry, are staged by
/// the final script and unstaged after it in scripts within the bound: Redis's slow
/// log (threshold four times the bound) lists none. The first run dies between a final
/// and its first unstage; the next run unstages what was staged, each field once.
/// Newest first: every later record is a window of its own that the first barrier
/// closes (with ten templates, ~40,000 series fields): so many that the final script
/// stages them and `unstage` scripts apply them.
fn many_windows() -> Vec<Option<Vec<u8>>> {
    (0..40_000i64)
        .map(|n| {
            Some(
                format!(
                    r#"{{"ids":["s{n}"],"state":10,"businessId":{},"logTimestamp":{}}}"#,
                    1000001220231120i64 + (n % 10) * 100_000_000,
                    SHANGHAI_MIDNIGHT - n * 60_000
                )
                .into_bytes(),
            )
        })
        .collect()
}

/// Whether no staged series list is pending.
fn nothing_staged(conn: &mut redis::Connection, setup: &Setup) -> bool {
    let keys = anchorflow_actors::protocol::keys::FenceKeys::new(&setup.group, &setup.topic);
    redis::cmd("SCARD")
        .arg(&keys.staged)
        .query::<i64>(conn)
        .is_ok_and(|n| n == 0)
}

#[test]
fn series_of_many_windows_commit_in_short_scripts_and_survive_a_crash_before_publishing() {
    use std::os::unix::process::ExitStatusExt as _;
    let redis = TestRedis::start_with(&["--slowlog-log-slower-than", "100000"]);
    let mut setup = Setup::new("spread-series", 2, redis.url(1));
    setup
        .set("redis.max_commit_ms=25")
        .set("pipeline.checkpoint_interval_ms=60000");
    let produced = setup.produce_records(many_windows());
    let point = "before_series_unstage";
    let mut first = setup.spawn("spread", &[("ANCHORFLOW_FAULT", point)], "");
    let status = first.wait_exit(Duration::from_secs(240));
    assert_eq!(
        status.signal(),
        Some(6),
        "the run must abort at {point} (is the fault-points feature on?); log:\n{}",
        first.tail()
    );
    let mut conn = redis::Client::open(redis.url(1).as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let keys = anchorflow_actors::protocol::keys::FenceKeys::new(&setup.group, &setup.topic);
    let staged: Vec<String> = redis::cmd("SMEMBERS")
        .arg(&keys.staged)
        .query(&mut conn)
        .unwrap();
    assert_eq!(
        staged.len(),
        1,
        "one final staged series and died: {staged:?}"
    );

    // The next run's claim unstages the pending list.
    let run = setup.supervise("spread", &[], "");
    setup.wait_drained(&produced);
    setup.wait_until(
        "the staged series are unstaged",
        Duration::from_secs(60),
        || nothing_staged(&mut conn, &setup),
    );
    run.stop();
    let scripts = slow_scripts(&mut conn);
    assert!(scripts.is_empty(), "slow commit scripts: {scripts:?}");
    setup.check(&produced);
}

/// Redis freezes or goes down between two `unstage` scripts of series staged by a final
/// script (the third unstage is held at a fault point until the fault is in place, then
/// sent into it): the unstage in flight applies with its reply lost, or not at all. The
/// sink says so (not ready, errors counted), restarts in place and unstages on; every
/// staged batch applies once (each `unstage` pops the batch it applies) and the oracle
/// finds the series exact.
fn redis_outage_mid_publish(
    name: &str,
    fault: impl FnOnce(&mut TestRedis),
    heal: impl FnOnce(&mut TestRedis),
) {
    let mut redis = TestRedis::start();
    let mut setup = Setup::new(name, 2, redis.url(1));
    setup
        .set("redis.command_timeout_secs=2")
        .set("redis.max_commit_ms=25")
        .set("pipeline.checkpoint_interval_ms=60000");
    let produced = setup.produce_records(many_windows());
    let hold = setup.logs.join("hold");
    let once = setup.logs.join("held-once");
    let env = [
        ("ANCHORFLOW_FAULT", "before_series_unstage"),
        ("ANCHORFLOW_FAULT_AFTER", "3"),
        ("ANCHORFLOW_FAULT_HOLD", hold.to_str().unwrap()),
        ("ANCHORFLOW_FAULT_ONCE", once.to_str().unwrap()),
    ];
    let metrics = format!("127.0.0.1:{}", free_port());
    let run = setup.supervise(name, &env, &metrics);
    setup.wait_until(
        "the third unstage is held",
        Duration::from_secs(240),
        || hold.exists(),
    );
    fault(&mut redis);
    std::fs::remove_file(&hold).unwrap();
    setup.wait_until(
        "the sink fails on the unstage",
        Duration::from_secs(60),
        || {
            http_get(&metrics, "/metrics")
                .and_then(|(_, text)| metric(&text, "anchorflow_redis_errors_total"))
                .is_some_and(|errors| errors >= 1.0)
        },
    );
    let ready = http_get(&metrics, "/readyz").map(|r| r.0);
    assert_eq!(ready, Some(503), "ready while Redis is out mid-unstage");
    heal(&mut redis);
    setup.wait_drained(&produced);
    let mut conn = connect(&redis.url(1));
    setup.wait_until(
        "the staged series are unstaged",
        Duration::from_secs(60),
        || nothing_staged(&mut conn, &setup),
    );
    let exits = run.stop();
    assert_eq!(
        exits.len(),
        1,
        "the sink restarted, not the process: {exits:?}"
    );
    setup.check(&produced);
}

#[test]
fn redis_paused_mid_unstage_of_staged_series_applies_every_batch_once() {
    redis_outage_mid_publish(
        "unstage-pause",
        |redis| redis.pause(),
        |redis| redis.resume(),
    );
}

#[test]
fn redis_refusing_connections_mid_unstage_of_staged_series_applies_every_batch_once() {
    redis_outage_mid_publish(
        "unstage-down",
        |redis| redis.stop(),
        |redis| redis.restart(),
    );
}

/// Hostile input with hundreds of distinct unknown state codes: every event still
/// counts, and the metric of unknown states keeps a bounded number of labels.
#[test]
fn unknown_states_keep_metric_labels_bounded() {
    let setup = Setup::new("states", 2, redis_url(38));
    let records: Vec<Option<Vec<u8>>> = (0..600)
        .map(|n| {
            Some(
                format!(
                    r#"{{"ids":["u{n}"],"state":{},"businessId":1000001220231120,"logTimestamp":{}}}"#,
                    1_000 + n,
                    SHANGHAI_MIDNIGHT + n
                )
                .into_bytes(),
            )
        })
        .collect();
    let produced = setup.produce_records(records);
    let metrics = format!("127.0.0.1:{}", free_port());
    let run = setup.supervise("states", &[], &metrics);
    setup.wait_drained(&produced);
    let (_, text) = http_get(&metrics, "/metrics").expect("metrics");
    run.stop();
    let series = text
        .lines()
        .filter(|l| l.starts_with("anchorflow_unknown_state_events_total{"))
        .count();
    assert_eq!(series, 33, "32 codes and `other`");
    assert_eq!(
        metric(
            &text,
            r#"anchorflow_unknown_state_events_total{state="other"}"#
        ),
        Some(600.0 - 32.0)
    );
    setup.check(&produced);
}
