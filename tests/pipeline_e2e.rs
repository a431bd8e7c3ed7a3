//! End to end against the real services of `scripts/test-env.sh`: a private
//! redis-server and the tansu Kafka broker. Known events (valid, lenient-typed and
//! malformed) go into several partitions; the pipeline runs; every Redis key and every
//! Parquet row is read back and compared exactly with the oracle in `common`.

mod common;

use std::time::Duration;

use anchorflow::demo::wait_for_commits;
use anchorflow::pipeline::PipelineHandle;
use anchorflow_actors::metrics::Metrics;
use common::*;

const PARTITIONS: i32 = 3;

/// A test's private topic, Redis database and warehouse.
struct Fixture {
    /// When the test began (Unix ms), for TTL checks.
    started: i64,
    topic: String,
    url: String,
    warehouse: tempfile::TempDir,
    config: anchorflow_actors::config::Config,
}

fn fixture(name: &str, partitions: i32, redis_db: u32) -> Fixture {
    let started = chrono::Utc::now().timestamp_millis();
    let topic = unique(name);
    create_topic(&topic, partitions);
    let url = redis_url(redis_db);
    flush_db(&url);
    let warehouse = tempfile::tempdir().unwrap();
    let config = config(&topic, &url, warehouse.path());
    Fixture {
        started,
        topic,
        url,
        warehouse,
        config,
    }
}

/// Waits until every partition is committed to its end. Progress is the later of
/// several runs' commits per partition: a partition one run finished gets nothing new
/// in another.
fn wait_for_ends(runs: &[&Metrics], produced: &Produced) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let mut committed = std::collections::BTreeMap::new();
        for metrics in runs {
            for (p, o) in metrics.committed_offsets.lock().unwrap().iter() {
                let entry = committed.entry(*p).or_insert(*o);
                *entry = (*entry).max(*o);
            }
        }
        if produced
            .iter()
            .all(|(p, r)| committed.get(p) == Some(&(r.len() as i64)))
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "runs did not finish the topic: {committed:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn redis_and_warehouse_equal_the_oracle() {
    let Fixture {
        started,
        topic,
        url,
        warehouse,
        config,
    } = fixture("e2e", PARTITIONS, 1);
    let produced = produce_records(&topic, PARTITIONS, generate(7, 3000, config.decode.max_ids));
    let total: usize = produced.values().map(Vec::len).sum();

    let handle = PipelineHandle::spawn(config.clone(), Metrics::new());
    wait_for_commits(&handle, total as i64, Duration::from_secs(120))
        .expect("all records committed");
    let metrics = handle.metrics.clone();
    // Event-time watermark: every partition is active, so the instance watermark is the
    // lowest over partitions of (largest valid event time - 5 s).
    let expected_watermark = produced
        .values()
        .filter_map(|records| {
            records
                .iter()
                .filter_map(|r| oracle_parse(r, config.decode.max_ids))
                .map(|e| e.log_timestamp)
                .max()
        })
        .min()
        .unwrap()
        - 5_000;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metrics.watermark_timestamp_seconds.get() != expected_watermark as f64 / 1000.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "instance watermark {} s, expected {} ms",
            metrics.watermark_timestamp_seconds.get(),
            expected_watermark
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(metrics.idle_partitions.get(), 0);
    assert_eq!(handle.stop().expect("stops"), 0);

    check_redis(&url, &produced, config.decode.max_ids, started);
    check_warehouse(warehouse.path(), &produced, config.decode.max_ids, false);
    // Both sinks' fences stand at the end of every partition, under the first claim.
    let fences = stored_fences(&url, &config.source.group_id, &topic, PARTITIONS);
    for (p, records) in &produced {
        let end = records.len() as i64;
        assert_eq!(
            fences[p],
            (1, end, end),
            "epoch and fences of partition {p}"
        );
    }
    let text = metrics.encode();
    assert!(
        text.contains(&format!("anchorflow_records_read_total {total}")),
        "{text}"
    );
    assert!(metrics.redis_commands.get() > 0);
    // Far fewer network commands than austin's 2 + 2·len(ids) per event.
    assert!(
        (metrics.redis_commands.get() as usize) < total / 10,
        "{} commands",
        metrics.redis_commands.get()
    );
}

#[test]
fn graceful_restart_loses_and_duplicates_nothing() {
    let Fixture {
        started,
        topic,
        url,
        warehouse,
        config,
    } = fixture("restart", PARTITIONS, 2);
    let mut produced = produce_records(
        &topic,
        PARTITIONS,
        generate(11, 1500, config.decode.max_ids),
    );

    // First run: stop gracefully while records are still arriving.
    let handle = PipelineHandle::spawn(config.clone(), Metrics::new());
    let more = std::thread::spawn({
        let topic = topic.clone();
        let max_ids = config.decode.max_ids;
        move || produce_records(&topic, PARTITIONS, generate(12, 1500, max_ids))
    });
    wait_for_commits(&handle, 500, Duration::from_secs(120)).expect("first run makes progress");
    let first = handle.metrics.clone();
    assert_eq!(handle.stop().expect("stops"), 0);
    extend(&mut produced, more.join().unwrap());
    let total: usize = produced.values().map(Vec::len).sum();

    // Second run resumes from the committed offsets and finishes the topic.
    let handle = PipelineHandle::spawn(config.clone(), Metrics::new());
    wait_for_ends(&[&first, &handle.metrics], &produced);
    assert_eq!(handle.stop().expect("stops"), 0);
    assert!(total >= 3000);

    // A graceful stop commits a final checkpoint, so even at-least-once delivery must
    // show no duplicate here; the count is printed for the record.
    let duplicates = check_warehouse(warehouse.path(), &produced, config.decode.max_ids, false);
    println!("duplicates after graceful restart: {duplicates}");
    check_redis(&url, &produced, config.decode.max_ids, started);
}

#[test]
fn a_second_instance_joining_mid_stream_loses_and_duplicates_nothing() {
    let Fixture {
        started,
        topic,
        url,
        warehouse,
        config: base,
    } = fixture("rebalance", 4, 3);
    let mut produced = produce_records(&topic, 4, generate(21, 2000, base.decode.max_ids));

    let mut first_config = base.clone();
    first_config.source.instance_id = "first".into();
    let first = PipelineHandle::spawn(first_config, Metrics::new());
    wait_for_commits(&first, 400, Duration::from_secs(120)).expect("first instance makes progress");

    // The second instance joins the same group: the first must checkpoint what it
    // holds for revoked partitions before they move.
    let mut second_config = base.clone();
    second_config.source.instance_id = "second".into();
    let second = PipelineHandle::spawn(second_config, Metrics::new());
    let joined = std::time::Instant::now() + Duration::from_secs(90);
    while second.metrics.partitions_assigned.get() == 0 {
        assert!(
            std::time::Instant::now() < joined,
            "the second instance never got partitions"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        first.metrics.partitions_assigned.get() < 4,
        "the first instance gave partitions up"
    );
    extend(
        &mut produced,
        produce_records(&topic, 4, generate(22, 2000, base.decode.max_ids)),
    );

    wait_for_ends(&[&first.metrics, &second.metrics], &produced);
    let (a, b) = (first.metrics.clone(), second.metrics.clone());
    assert_eq!(first.stop().expect("first stops"), 0);
    assert_eq!(second.stop().expect("second stops"), 0);
    assert!(
        a.records_read.get() > 0 && b.records_read.get() > 0,
        "both instances read records"
    );

    check_warehouse(warehouse.path(), &produced, base.decode.max_ids, false);
    check_redis(&url, &produced, base.decode.max_ids, started);
}
