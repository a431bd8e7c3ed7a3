//! Exactly-once, proven by killing the process (issue 3, `docs/exactly-once.md`): the `anchorflow`
//! binary runs as child processes against the real Redis and tansu of
//! `scripts/test-env.sh`; they are killed with SIGKILL at random moments, crashed at
//! the protocol's dangerous instants (fault points, compiled in by the test script),
//! frozen with SIGSTOP into zombies, and joined and removed in a consumer group. After
//! the topic is drained, Redis and the warehouse must equal the oracle exactly: no
//! loss, no double count, every (partition, offset) once.

mod common;

use std::os::unix::process::ExitStatusExt as _;
use std::time::Duration;

use common::child::*;
use common::servers::free_port;
use common::*;

#[test]
fn kill_9_at_random_moments_loses_and_duplicates_nothing() {
    kill_9_loop(Setup::new("kill9", 3, redis_url(4)), 20);
}

/// The kill -9 loop with the Redis sink committing by `WATCH`/`MULTI`/`EXEC`
/// (`redis.commit = "transaction"`).
#[test]
fn kill_9_at_random_moments_loses_and_duplicates_nothing_with_transactions() {
    let mut setup = Setup::new("kill9-tx", 3, redis_url(57));
    setup.set("redis.commit=transaction");
    kill_9_loop(setup, 10);
}

/// The kill -9 loop with the warehouse in an S3 bucket (SeaweedFS): multipart uploads
/// recorded before they are completed, completed again by the next run.
#[test]
fn kill_9_at_random_moments_loses_and_duplicates_nothing_on_s3() {
    kill_9_loop(Setup::new("kill9-s3", 3, redis_url(46)).on_s3(), 10);
}

fn kill_9_loop(setup: Setup, default_iterations: usize) {
    let iterations: usize = std::env::var("ANCHORFLOW_KILL_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_iterations);
    let mut seed: u64 = std::env::var("ANCHORFLOW_KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| chrono::Utc::now().timestamp_micros() as u64 | 1);
    println!("kill loop: {iterations} iterations, seed {seed} (ANCHORFLOW_KILL_SEED reproduces the moments)");
    let mut produced = setup.produce(100, 1500);
    let producer = setup.producer(1_000, 150, Duration::from_millis(200), 100_000);
    let mut kills_with_progress = 0;
    for i in 0..iterations {
        let before = setup.epochs();
        let mut instance = setup.spawn("kill9", &[], "");
        // Kill only once it owns its partitions, at a random moment after that: before
        // the claim there is nothing at stake.
        setup.wait_until(
            "the instance claimed its partitions",
            Duration::from_secs(60),
            || setup.epochs() >= before + 3 || instance.child.try_wait().ok().flatten().is_some(),
        );
        let progress = setup.progress();
        let wait = Duration::from_millis(next_random(&mut seed) % 2_500);
        std::thread::sleep(wait);
        if let Ok(Some(status)) = instance.child.try_wait() {
            panic!(
                "iteration {i}: instance exited by itself ({status}); log:\n{}",
                instance.tail()
            );
        }
        instance.kill9();
        if setup.progress() > progress {
            kills_with_progress += 1;
        }
        println!(
            "iteration {i}: killed {} ms after the claim",
            wait.as_millis()
        );
    }
    extend(&mut produced, producer.finish());
    let last = setup.spawn("kill9", &[], "");
    setup.wait_drained(&produced);
    last.stop();
    let total: usize = produced.values().map(Vec::len).sum();
    println!("{total} records; {kills_with_progress} of {iterations} kills came after some progress in that run");
    assert!(
        kills_with_progress > 0,
        "no kill landed after a commit: the loop tested nothing"
    );
    setup.check(&produced);
}

#[test]
fn crashes_at_the_dangerous_instants_lose_and_duplicate_nothing() {
    dangerous_instants(Setup::new("faults", 2, redis_url(5)));
}

#[test]
fn crashes_at_the_dangerous_instants_lose_and_duplicate_nothing_on_s3() {
    dangerous_instants(Setup::new("faults-s3", 2, redis_url(47)).on_s3());
}

/// The dangerous instants with the Redis sink committing by transactions.
#[test]
fn crashes_at_the_dangerous_instants_lose_and_duplicate_nothing_with_transactions() {
    let mut setup = Setup::new("faults-tx", 2, redis_url(58));
    setup.set("redis.commit=transaction");
    dangerous_instants(setup);
}

fn dangerous_instants(setup: Setup) {
    let mut produced = Produced::new();
    let points = [
        ("after_redis_commit", "4"),
        ("after_warehouse_record", "2"),
        ("between_publishes", "2"),
        ("before_forgetting_record", "2"),
        ("after_sinks_committed", "4"),
    ];
    for (n, (point, after)) in points.iter().enumerate() {
        // Records keep arriving until the crash, so it lands with work in flight.
        let producer = setup.producer(10 * n as u64, 100, Duration::from_millis(100), 100_000);
        // One instance name throughout, as a restarted service has: it cleans up its
        // own orphaned in-progress files.
        let mut instance = setup.spawn(
            "faults",
            &[
                ("ANCHORFLOW_FAULT", point),
                ("ANCHORFLOW_FAULT_AFTER", after),
            ],
            "",
        );
        let status = instance.wait_exit(Duration::from_secs(120));
        assert_eq!(
            status.signal(),
            Some(6),
            "{point}: the instance must abort at the fault point (is the fault-points feature on?); log:\n{}",
            instance.tail()
        );
        assert!(instance
            .tail()
            .contains(&format!("fault point {point} reached")));
        if *point == "after_warehouse_record" {
            // The crash fell between recording a commit and renaming its files.
            let mut conn = redis::Client::open(setup.url.as_str())
                .unwrap()
                .get_connection()
                .unwrap();
            let keys =
                anchorflow_actors::protocol::keys::FenceKeys::new(&setup.group, &setup.topic);
            let pending =
                anchorflow_actors::protocol::publish::pending_publishes(&mut conn, &keys).unwrap();
            assert_eq!(pending.len(), 1, "one recorded, unpublished commit");
            // On a folder its files are still hidden; in a bucket the record names
            // their uploads.
            use anchorflow_actors::sinks::warehouse::storage::FileHandle;
            let recorded = |handle: &FileHandle| match (handle, &setup.s3_prefix) {
                (FileHandle::InProgress(hidden), None) => hidden.exists(),
                (FileHandle::Upload(upload), Some(_)) => !upload.parts.is_empty(),
                _ => false,
            };
            assert!(
                pending[0].files.iter().all(|(hidden, _)| recorded(hidden)),
                "its files are still hidden: {:?}",
                pending[0].files
            );
        }
        extend(&mut produced, producer.finish());
    }
    let last = setup.spawn("faults", &[], "");
    setup.wait_drained(&produced);
    last.stop();
    setup.check(&produced);
}

#[test]
fn a_frozen_zombie_is_fenced_off() {
    let setup = Setup::on_mock_cluster("zombie", 4, redis_url(6));
    let producer = setup.producer(300, 100, Duration::from_millis(100), 100_000);
    let zombie = setup.spawn("zombie", &[], "");
    setup.wait_until(
        "the first instance claimed all partitions",
        Duration::from_secs(60),
        || setup.epochs() >= 4,
    );
    let mut other = setup.spawn("other", &[], "");
    setup.wait_until(
        "the group rebalanced onto two instances",
        Duration::from_secs(60),
        || setup.epochs() >= 8,
    );
    let progress = setup.progress();
    setup.wait_until("both make progress", Duration::from_secs(60), || {
        setup.progress() > progress + 200
    });

    // Freeze the zombie until the group hands all its partitions to the other instance.
    zombie.signal("STOP");
    let frozen_at = setup.fences();
    setup.wait_until(
        "every partition was claimed again",
        Duration::from_secs(90),
        || {
            let now = setup.fences();
            frozen_at.iter().all(|(p, (e, _, _))| now[p].0 > *e)
        },
    );
    let progress = setup.progress();
    setup.wait_until(
        "the other instance progresses alone",
        Duration::from_secs(60),
        || setup.progress() > progress + 200,
    );

    // Wake it: whatever it still holds must be refused, and it must leave.
    let mut zombie = zombie;
    zombie.signal("CONT");
    let status = zombie.wait_exit(Duration::from_secs(60));
    let log = zombie.tail();
    assert_eq!(
        status.code(),
        Some(75),
        "the zombie exits as fenced; log:\n{log}"
    );
    println!(
        "zombie noticed by: {}",
        if log.contains("commit rejected") {
            "a rejected commit"
        } else {
            "the lost assignment"
        }
    );
    assert!(
        other.child.try_wait().unwrap().is_none(),
        "the other instance keeps running"
    );
    // systemd restarts it (Restart=on-failure): it rejoins, claims afresh and removes
    // the in-progress files its refused commit left.
    let restarted = setup.spawn("zombie", &[], "");
    let produced = producer.finish();
    setup.wait_drained(&produced);
    restarted.stop();
    other.stop();
    setup.check(&produced);
}

#[test]
fn instances_joining_leaving_and_dying_lose_and_duplicate_nothing() {
    group_churn(Setup::on_mock_cluster("group3", 6, redis_url(7)));
}

/// Group churn (zombies, instances joining, leaving and dying) with the Redis sink
/// committing by transactions: a zombie's transaction is refused by what it read under
/// `WATCH`, or aborted when a claim bumps an epoch before its `EXEC`.
#[test]
fn instances_joining_leaving_and_dying_lose_and_duplicate_nothing_with_transactions() {
    let mut setup = Setup::on_mock_cluster("group3-tx", 6, redis_url(59));
    setup.set("redis.commit=transaction");
    group_churn(setup);
}

/// Three instances (three ids, as on three hosts) share one bucket and one group.
#[test]
fn instances_joining_leaving_and_dying_lose_and_duplicate_nothing_on_s3() {
    group_churn(Setup::on_mock_cluster("group3-s3", 6, redis_url(48)).on_s3());
}

fn group_churn(setup: Setup) {
    let producer = setup.producer(500, 120, Duration::from_millis(100), 100_000);
    let a = setup.spawn("a", &[], "");
    setup.wait_until("a claimed all partitions", Duration::from_secs(60), || {
        setup.epochs() >= 6
    });
    let progress = setup.progress();
    setup.wait_until("a makes progress", Duration::from_secs(60), || {
        setup.progress() > progress + 300
    });

    let b = setup.spawn("b", &[], "");
    let mut c = setup.spawn("c", &[], "");
    let epochs = setup.epochs();
    setup.wait_until("b and c joined", Duration::from_secs(90), || {
        setup.epochs() >= epochs + 6
    });
    let progress = setup.progress();
    setup.wait_until(
        "three instances make progress",
        Duration::from_secs(60),
        || setup.progress() > progress + 300,
    );

    b.stop();
    c.kill9();
    let progress = setup.progress();
    setup.wait_until("a continues alone", Duration::from_secs(60), || {
        setup.progress() > progress + 300
    });
    // systemd restarts the killed one: it cleans up its own in-progress files.
    let c = setup.spawn("c", &[], "");
    let produced = producer.finish();
    setup.wait_drained(&produced);
    c.stop();
    a.stop();
    setup.check(&produced);
}

fn lost_marker(url: &str, setup: &Setup) -> Option<String> {
    let mut conn = redis::Client::open(url).ok()?.get_connection().ok()?;
    let keys = anchorflow_actors::protocol::keys::FenceKeys::new(&setup.group, &setup.topic);
    anchorflow_actors::protocol::fences::lost_marker(&mut conn, &keys).ok()?
}

#[test]
fn redis_restarted_empty_is_detected_and_recovered_exactly() {
    redis_restarted_empty(false);
}

/// The same with the warehouse in the bucket: `fences recover` must find the published
/// files and the publish marks there, or it would send the warehouse back to offset 0
/// and every row would be written twice.
#[test]
fn redis_restarted_empty_is_detected_and_recovered_exactly_on_s3() {
    redis_restarted_empty(true);
}

fn redis_restarted_empty(on_s3: bool) {
    // A redis-server of the test's own, so that it can restart it empty.
    let redis = anchorflow::demo::start_throwaway_redis()
        .expect("redis-server (installed by scripts/test-env.sh)");
    let (url, port) = (redis.url.clone(), redis.port);
    let setup = Setup::new("lost", 2, url.clone());
    let setup = if on_s3 { setup.on_s3() } else { setup };
    let mut produced = setup.produce(700, 1500);
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut instance = setup.spawn("lost", &[], &metrics);
    setup.wait_drained(&produced);
    let ready = http_get(&metrics, "/readyz");
    assert_eq!(
        ready.as_ref().map(|r| r.0),
        Some(200),
        "ready while healthy: {ready:?}"
    );

    // Redis comes back empty under the running pipeline, and more records arrive.
    drop(redis);
    let redis = anchorflow::demo::start_redis_on(port).expect("redis-server restarts");
    extend(&mut produced, setup.produce(701, 500));
    setup.wait_until(
        "the pipeline reports the loss",
        Duration::from_secs(60),
        || {
            http_get(&metrics, "/metrics")
                .is_some_and(|(_, text)| text.lines().any(|l| l == "anchorflow_redis_state_lost 1"))
        },
    );
    assert_eq!(
        http_get(&metrics, "/readyz").map(|r| r.0),
        Some(503),
        "not ready while state is lost"
    );
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query(
            &mut redis::Client::open(url.as_str())
                .unwrap()
                .get_connection()
                .unwrap(),
        )
        .unwrap();
    assert!(
        lost_marker(&url, &setup).is_some(),
        "the loss is marked in Redis for every instance; keys: {keys:?}"
    );
    let (_, text) = http_get(&metrics, "/metrics").unwrap();
    assert!(
        text.contains(
            "anchorflow_commits_rejected_total{sink=\"redis\",reason=\"fences_missing\"}"
        ),
        "{text}"
    );
    // Nothing partial was written: the held commits stay held.
    let (contents, _) = read_redis(&url);
    assert!(
        contents.hashes.is_empty() && contents.lists.is_empty(),
        "no partial counts: {contents:?}"
    );

    // The documented recovery: rebuild the counts from the oldest retained record; the
    // warehouse continues after its published files.
    let (status, out) = setup.fences_command(&["recover", "--redis-from", "earliest"]);
    assert!(status.success(), "{out}");
    let status = instance.wait_exit(Duration::from_secs(60));
    assert_eq!(
        status.code(),
        Some(75),
        "the held commit is refused after recovery; log:\n{}",
        instance.tail()
    );
    let last = setup.spawn("lost", &[], &metrics);
    setup.wait_drained(&produced);
    setup.wait_until("ready again", Duration::from_secs(30), || {
        http_get(&metrics, "/readyz").is_some_and(|(code, _)| code == 200)
    });
    last.stop();
    // The dws windows open when Redis lost its data cannot be restored by
    // `fences recover` (docs/event-time.md, Limits); the series is rebuilt exactly.
    setup.check_with(&produced, Dws::NoMoreThanOracle);
    drop(redis);
}
