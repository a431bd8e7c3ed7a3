//! Supervision (issue 10): each row makes one actor fail inside the running binary,
//! through a compile-time fault point (`runtime/fault.rs`), under a restart loop like
//! systemd's, against a real Redis and a real Kafka-protocol broker. It checks what
//! the failure means for that actor (`runtime/supervision.rs`): a restart in place
//! (the process never exits, `anchorflow_actor_restarts_total` moves), or a process
//! exit with 70 that the loop restarts; and then the oracle finds everything exactly
//! once.

mod common;

use common::child::*;
use common::servers::free_port;
use common::*;

/// The restarts the child counted for `actor`.
fn restarts(metrics: &str, actor: &str) -> f64 {
    let (_, text) = http_get(metrics, "/metrics").expect("metrics");
    let series = format!(r#"anchorflow_actor_restarts_total{{actor="{actor}"}}"#);
    metric(&text, &series).unwrap_or(0.0)
}

/// Runs `name` with `env` over a backlog, waits for the end, and returns the runs'
/// exits and the restarts `actor` counted.
fn run_with(
    name: &str,
    db: u32,
    env: &[(&str, &str)],
    actor: &str,
    records: Vec<Option<Vec<u8>>>,
) -> (Setup, Produced, Vec<Exit>, f64) {
    let setup = Setup::new(name, 3, redis_url(db));
    let produced = setup.produce_records(records);
    let metrics = format!("127.0.0.1:{}", free_port());
    let run = setup.supervise(name, env, &metrics);
    setup.wait_drained(&produced);
    let counted = restarts(&metrics, actor);
    let exits = run.stop();
    (setup, produced, exits, counted)
}

/// A reader whose handler panics once: it restarts, processes that batch again record
/// by record, and its partition goes on; nothing else stops.
#[test]
fn a_reader_that_panics_restarts_in_place_and_loses_nothing() {
    let env = [
        ("ANCHORFLOW_FAULT", "reader_batch"),
        ("ANCHORFLOW_FAULT_AFTER", "4"),
    ];
    let records = generate(1_001, 6_000, MAX_IDS);
    let (setup, produced, exits, counted) =
        run_with("reader-panic", 40, &env, "partition_reader", records);
    assert_eq!(exits.len(), 1, "the process never exited: {exits:?}");
    assert_eq!(exits[0].code, Some(0));
    assert!(counted >= 1.0, "the reader's restart is counted");
    setup.check(&produced);
}

/// A record that makes processing panic every time: after the restart it is
/// processed alone, panics again, and goes to the dead-letter table with reason
/// `processing_panic`, instead of a crash loop or a stuck partition.
#[test]
fn a_record_that_always_panics_is_dead_lettered_not_a_crash_loop() {
    let mut records = generate(1_002, 3_000, MAX_IDS);
    let poison = format!(
        r#"{{"ids":["r1"],"state":10,"businessId":7,"logTimestamp":{},"messageId":"{POISON}"}}"#,
        chrono::Utc::now().timestamp_millis()
    );
    records.insert(1_500, Some(poison.clone().into_bytes()));
    let env = [("ANCHORFLOW_FAULT_POISON", POISON)];
    let (setup, produced, exits, counted) =
        run_with("poison-panic", 41, &env, "partition_reader", records);
    assert_eq!(exits.len(), 1, "the process never exited: {exits:?}");
    assert!(counted >= 1.0, "the reader's restart is counted");
    setup.check(&produced);
    let dead: Vec<Row> = read_warehouse(setup.warehouse.path())
        .into_iter()
        .filter(|r| matches!(&r.content, Err((reason, _)) if reason == "processing_panic"))
        .collect();
    assert_eq!(dead.len(), 1, "exactly the poison record: {dead:?}");
    let Err((_, raw)) = &dead[0].content else {
        unreachable!()
    };
    assert_eq!(raw.as_deref(), Some(poison.as_bytes()));
}

/// The timer panics handling a watermark report: it restarts with its watermarks, and
/// windows still close (the oracle checks the series and `dws_template_state_1m`).
#[test]
fn a_timer_that_panics_restarts_and_windows_still_close() {
    let env = [
        ("ANCHORFLOW_FAULT", "timer_update"),
        ("ANCHORFLOW_FAULT_AFTER", "10"),
    ];
    let records = generate(1_003, 6_000, MAX_IDS);
    let (setup, produced, exits, counted) = run_with("timer-panic", 42, &env, "timer", records);
    assert_eq!(exits.len(), 1, "the process never exited: {exits:?}");
    assert!(counted >= 1.0, "the timer's restart is counted");
    setup.check(&produced);
}

/// An aggregator shard panics: its state holds uncommitted work of every partition,
/// so the process stops with 70 (not a silently dead thread), the loop restarts it,
/// and it resumes from the fences.
#[test]
fn an_aggregator_that_panics_stops_the_process_with_70_and_loses_nothing() {
    let once = tempfile::tempdir().unwrap();
    let marker = once.path().join("fired");
    let marker = marker.to_str().unwrap();
    let env = [
        ("ANCHORFLOW_FAULT", "aggregator_input"),
        ("ANCHORFLOW_FAULT_AFTER", "20"),
        ("ANCHORFLOW_FAULT_ONCE", marker),
    ];
    let records = generate(1_004, 6_000, MAX_IDS);
    let (setup, produced, exits, _) = run_with("aggregator-panic", 43, &env, "aggregator", records);
    let codes: Vec<Option<i32>> = exits.iter().map(|e| e.code).collect();
    assert_eq!(codes.first(), Some(&Some(70)), "{exits:?}");
    assert_eq!(codes.last(), Some(&Some(0)), "{exits:?}");
    setup.check(&produced);
}
