//! anchorflow's Lua scripts (`actors/src/protocol/scripts/`) against the real Redis of
//! `scripts/test-env.sh`, each driven through its typed argument builder
//! (`protocol/scripts.rs`) and read back through its typed reply: a commit applies only
//! under the current epoch and from the stored fence, a refused commit writes nothing
//! at all (for any partition), a retry of an applied commit is recognised, a key Redis
//! refuses does not take the rest of the commit down, a split commit leaves unit
//! fences that a claim returns and a replay never lowers, a retried commit that moves no
//! fence is recognised, series staged by a final script unstage exactly once, lost
//! fences are marked, a warehouse record stores what
//! it says, an instance lease has one holder, and arguments that do not match a
//! script's layout fail it with nothing written. The commit tests run twice: with Lua
//! scripts and with `WATCH`/`MULTI`/`EXEC` transactions (`redis.commit`), which must
//! give the same replies and leave the same keys.

mod common;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Arc;

use anchorflow_actors::checkpoint::barrier::{CheckpointKind, CheckpointSpec};
use anchorflow_actors::checkpoint::claim::{Claim, FenceRange};
use anchorflow_actors::config::RedisConfig;
use anchorflow_actors::logic::decode::TraceValue;
use anchorflow_actors::logic::window::{Counts, WindowKey as SeriesKey};
use anchorflow_actors::messages::{ListPush, PartitionDelta, ShardFlush};
use anchorflow_actors::metrics::Metrics;
use anchorflow_actors::protocol::claim_script::{ClaimArgs, ClaimReply};
use anchorflow_actors::protocol::commit_args::{commit_command, Expiry, Mode};
use anchorflow_actors::protocol::fences::{self, ClaimError};
use anchorflow_actors::protocol::keys::{series_field, FenceKeys, KeyLayout, SERIES_KEY_PREFIX};
use anchorflow_actors::protocol::publish::{pending_publishes, publish_done, PublishRecord};
use anchorflow_actors::protocol::reply::{self, Rejection, Reply};
use anchorflow_actors::protocol::scripts::{commit_script, record_script, Args, RecordArgs};
use anchorflow_actors::protocol::staged;
use anchorflow_actors::protocol::units::unit_of;
use anchorflow_actors::runtime::clock::Clock;
use anchorflow_actors::runtime::health::Health;
use anchorflow_actors::sinks::redis::client::{ServerWatch, SinkConnection};
use anchorflow_actors::sinks::redis::commit::{self, Body, CommitInput, CommitPlan, Script, Ttls};
use common::*;

/// The template all commits of these tests count into (hash key = its number).
const TEMPLATE: i64 = 1000001220231120;

/// A checkpoint of the Redis sink: `ranges`, with partition `ranges[0]` adding `delta`
/// receivers to [`TEMPLATE`] state 10 and pushing one value per receiver in `lists`.
fn plan(
    keys: &FenceKeys,
    ranges: &[FenceRange],
    delta: i64,
    lists: &[&str],
    budget: usize,
) -> CommitPlan {
    let value = TraceValue {
        state: 10,
        business_id: TEMPLATE,
        timestamp: 1,
    };
    let deltas = ranges
        .iter()
        .enumerate()
        .map(|(n, r)| PartitionDelta {
            partition: r.partition,
            next_offset: r.to,
            claim: Claim {
                epoch: r.epoch,
                redis: r.from,
                warehouse: 0,
            },
            template_counts: if n == 0 {
                vec![(TEMPLATE, 10, delta)]
            } else {
                vec![]
            },
            receiver_lists: if n == 0 {
                lists
                    .iter()
                    .map(|key| ListPush {
                        key: (*key).into(),
                        values: [value].into_iter().collect(),
                    })
                    .collect()
            } else {
                vec![]
            },
            message_lists: vec![],
            series: vec![],
            windows: String::new(),
        })
        .collect();
    plan_of(keys, 1, deltas, budget)
}

/// Plans checkpoint `id` of these deltas as the Redis sink does.
fn plan_of(keys: &FenceKeys, id: u64, deltas: Vec<PartitionDelta>, budget: usize) -> CommitPlan {
    let ttls = Ttls {
        receiver: Expiry::After(60_000),
        // Apart from the receivers', so that the lists form two expiry classes.
        message: Expiry::After(120_000),
        template_ms: 60_000,
        series_ms: 60_000,
        conflicts_ms: 60_000,
    };
    plan_with(keys, id, deltas, budget, ttls)
}

/// [`plan_of`] with the keys' expiries given.
fn plan_with(
    keys: &FenceKeys,
    id: u64,
    deltas: Vec<PartitionDelta>,
    budget: usize,
    ttls: Ttls,
) -> CommitPlan {
    let flush = ShardFlush {
        shard: 0,
        spec: Arc::new(CheckpointSpec {
            id,
            partitions: deltas.iter().map(|d| d.partition).collect(),
            kind: CheckpointKind::Periodic,
            watermark: None,
        }),
        partitions: deltas,
    };
    let input = CommitInput {
        layout: &KeyLayout::default(),
        ttls,
        tracked: &BTreeMap::new(),
        keys,
        budget_ops: budget,
        unstage_fields: budget,
        transactions: TRANSACTIONS.with(Cell::get),
        now_ms: chrono::Utc::now().timestamp_millis(),
    };
    commit::plan(&input, vec![flush]).expect("a plan")
}

thread_local! {
    /// Whether this test's plans send part and final scripts as transactions
    /// (`redis.commit = "transaction"`) rather than Lua scripts.
    static TRANSACTIONS: Cell<bool> = const { Cell::new(false) };
    /// The database this test's connections use (a transaction opens its own).
    static DB: Cell<u32> = const { Cell::new(0) };
}

/// Runs `test` with Lua scripts, then with transactions: the same assertions hold for
/// both ways of committing.
fn in_both_modes(test: impl Fn()) {
    for transactions in [false, true] {
        eprintln!(
            "commits as {}",
            if transactions {
                "transactions"
            } else {
                "scripts"
            }
        );
        TRANSACTIONS.with(|t| t.set(transactions));
        test();
    }
    TRANSACTIONS.with(|t| t.set(false));
}

/// Runs one script of a plan as the Redis sink does: a Lua script's `EVALSHA`, or a
/// transaction on the sink's own connection type.
fn run(conn: &mut redis::Connection, keys: &FenceKeys, script: &Script) -> Reply {
    match &script.body {
        Body::Lua(args) => run_args(conn, keys, args),
        Body::Transaction(tx) => {
            let config = RedisConfig {
                url: redis_url(DB.with(Cell::get)),
                ..Default::default()
            };
            let (metrics, health) = (Metrics::new(), Health::new());
            let mut link = SinkConnection::new(
                &config,
                Clock::default(),
                ServerWatch::new(&metrics, &health, false),
            );
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(link.transact(keys, tx))
                .expect("transaction runs")
        }
    }
}

/// Runs a Lua commit script's arguments, loading the script when Redis does not have it.
fn run_args(conn: &mut redis::Connection, keys: &FenceKeys, args: &Args) -> Reply {
    let reply = evalsha(conn, keys, args).expect("script runs");
    reply::parse(&reply).expect("well-formed reply")
}

fn evalsha(
    conn: &mut redis::Connection,
    keys: &FenceKeys,
    args: &Args,
) -> redis::RedisResult<redis::Value> {
    let script = commit_script();
    let command = commit_command(&script, keys, args);
    match command.query(conn) {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            script.load(conn)?;
            command.query(conn)
        }
        reply => reply,
    }
}

/// Runs every script of a one-script commit; returns its reply.
fn commit(
    conn: &mut redis::Connection,
    keys: &FenceKeys,
    ranges: &[FenceRange],
    delta: i64,
) -> Reply {
    let commit = plan(keys, ranges, delta, &[], 100_000);
    assert_eq!(commit.scripts.len(), 1);
    run(conn, keys, &commit.scripts[0])
}

fn applied(ops: i64) -> Reply {
    Reply::Applied {
        ops,
        conflicts: 0,
        first: vec![],
    }
}

fn rejected(rejection: Rejection) -> Reply {
    Reply::Rejected(rejection)
}

fn count(conn: &mut redis::Connection) -> i64 {
    redis::cmd("HGET")
        .arg(TEMPLATE.to_string())
        .arg("10")
        .query::<Option<i64>>(conn)
        .unwrap()
        .unwrap_or(0)
}

/// A fresh database of the test Redis and the keys of one (group, topic).
fn fresh_db(db: u32) -> (redis::Connection, FenceKeys) {
    flush_db(&redis_url(db));
    connect_db(db)
}

/// Another connection to a database of the test Redis, as is.
fn connect_db(db: u32) -> (redis::Connection, FenceKeys) {
    DB.with(|d| d.set(db));
    let conn = redis::Client::open(redis_url(db).as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    (conn, FenceKeys::new("g", "t"))
}

/// Receiver keys `r0`, `r1`, …: enough of them spread over many key-hash units.
fn receivers(n: usize) -> Vec<String> {
    (0..n).map(|n| format!("r{n}")).collect()
}

fn range(partition: i32, epoch: i64, from: i64, to: i64) -> FenceRange {
    FenceRange {
        partition,
        epoch,
        from,
        to,
    }
}

fn claim_fresh(conn: &mut redis::Connection, keys: &FenceKeys, partitions: &[i32], at: i64) {
    fences::claim(conn, keys, partitions, |fresh| {
        Ok(fresh.iter().map(|p| (*p, at)).collect())
    })
    .unwrap();
}

#[test]
fn commits_apply_only_under_the_current_epoch_and_from_the_stored_fence() {
    in_both_modes(|| {
        let (mut conn, keys) = fresh_db(8);
        let first = fences::claim(&mut conn, &keys, &[0, 1], |fresh| {
            Ok(fresh.iter().map(|p| (*p, 5)).collect())
        })
        .unwrap();
        let claim = first[&0].claim;
        assert_eq!(
            (claim.epoch, claim.redis, claim.warehouse),
            (1, 5, 5),
            "fences start at the cold-start offset"
        );

        assert_eq!(
            commit(
                &mut conn,
                &keys,
                &[range(0, 1, 5, 10), range(1, 1, 5, 7)],
                3
            ),
            applied(2),
            "one HINCRBY and one PEXPIRE"
        );
        assert_eq!(count(&mut conn), 3);
        // A retry of the same commit (its reply lost) is recognised and not applied again.
        assert_eq!(
            commit(
                &mut conn,
                &keys,
                &[range(0, 1, 5, 10), range(1, 1, 5, 7)],
                3
            ),
            Reply::AppliedBefore
        );
        assert_eq!(count(&mut conn), 3);
        // A replay that overlaps the stored fence is refused and changes nothing.
        assert_eq!(
            commit(&mut conn, &keys, &[range(0, 1, 5, 12)], 3),
            rejected(Rejection::NotContiguous {
                partition: 0,
                stored: 10
            })
        );
        assert_eq!(count(&mut conn), 3);

        // Another instance claims partition 1: the old owner's next commit is refused
        // whole, including its part for partition 0, which it still owns.
        let second = fences::claim(&mut conn, &keys, &[1], |_| {
            panic!("fences exist; no cold start")
        })
        .unwrap();
        assert_eq!((second[&1].claim.epoch, second[&1].claim.redis), (2, 7));
        assert_eq!(
            commit(
                &mut conn,
                &keys,
                &[range(0, 1, 10, 12), range(1, 1, 7, 9)],
                100
            ),
            rejected(Rejection::StaleEpoch {
                partition: 1,
                stored: 2
            })
        );
        assert_eq!(count(&mut conn), 3);
        let stored = fences::read(&mut conn, &keys, &[0, 1]).unwrap();
        assert_eq!(
            stored[&0],
            (Some(1), Some(10), Some(5)),
            "partition 0 did not move"
        );
        assert_eq!(stored[&1], (Some(2), Some(7), Some(5)));
        // The new owner continues from the fence.
        assert_eq!(
            commit(&mut conn, &keys, &[range(1, 2, 7, 9)], 4),
            applied(2)
        );
        assert_eq!(count(&mut conn), 7);
    });
}

/// A transaction writes only if nothing it read under `WATCH` changed before its
/// `EXEC`: another writer of the fences hash in between (the warehouse sink, a claim),
/// or its deadline key expiring (Redis's clock passed the instant just before the day
/// end its lists expire at) leaves `EXEC` empty and nothing written. The sink then
/// reads again and decides again (`SinkConnection::transact`).
#[test]
fn a_transaction_writes_nothing_when_what_it_read_changed_or_its_deadline_passed() {
    let (mut conn, keys) = fresh_db(56);
    claim_fresh(&mut conn, &keys, &[0], 0);
    TRANSACTIONS.with(|t| t.set(true));
    let commit = plan(&keys, &[range(0, 1, 0, 4)], 5, &["r1"], 100_000);
    TRANSACTIONS.with(|t| t.set(false));
    let Body::Transaction(tx) = &commit.scripts[0].body else {
        panic!("a transaction");
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = redis::Client::open(redis_url(56).as_str()).unwrap();
    let mut async_conn = runtime
        .block_on(client.get_multiplexed_async_connection())
        .unwrap();
    let mut attempt = |between: &mut dyn FnMut(&mut redis::Connection), deadline: Option<i64>| {
        let key = format!("{}test", keys.deadline_prefix);
        let values: Vec<redis::Value> = runtime
            .block_on(
                tx.read_step(&keys, deadline.map(|at| (key.as_str(), at)))
                    .query_async(&mut async_conn),
            )
            .unwrap();
        let read = tx.read(values).unwrap();
        between(&mut conn);
        let (pipe, _) = tx.write_step(&keys, &read, &Default::default(), &Default::default());
        runtime
            .block_on(pipe.query_async::<redis::Value>(&mut async_conn))
            .unwrap()
    };
    let another_writer = |conn: &mut redis::Connection| {
        redis::cmd("HSET")
            .arg(&keys.fences)
            .arg("warehouse-at:0")
            .arg(1)
            .query::<()>(conn)
            .unwrap()
    };
    assert_eq!(attempt(&mut { another_writer }, None), redis::Value::Nil);
    let now: i64 = chrono::Utc::now().timestamp_millis();
    let expires =
        |_: &mut redis::Connection| std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        attempt(&mut { expires }, Some(now + 150)),
        redis::Value::Nil,
        "the deadline key expired between WATCH and EXEC"
    );
    let (mut conn, _) = connect_db(56);
    assert_eq!(count(&mut conn), 0, "nothing written");
    assert_eq!(fences::read(&mut conn, &keys, &[0]).unwrap()[&0].1, Some(0));
    let answered = attempt(&mut |_: &mut redis::Connection| {}, Some(now + 60_000));
    assert!(matches!(answered, redis::Value::Array(_)), "{answered:?}");
    assert_eq!(count(&mut conn), 5, "undisturbed, it applies");
    assert_eq!(fences::read(&mut conn, &keys, &[0]).unwrap()[&0].1, Some(4));
}

/// Checkpoint `id` of a quiet input: partition 0 read nothing since offset 10, but the
/// watermark passed a window's end (idleness, a tick), so the commit closes it into the
/// series and stores the open windows left.
fn window_close(keys: &FenceKeys, id: u64, events: i64) -> CommitPlan {
    let window = ((60_000 * id as i64, TEMPLATE, 10), events);
    plan_of(keys, id, vec![closing(id, 1, vec![window])], 100_000)
}

/// Partition 0 (owner epoch `epoch`) at checkpoint `id`, reading nothing since offset
/// 10 and closing `windows` (key, events) into the series.
fn closing(id: u64, epoch: i64, windows: Vec<(SeriesKey, i64)>) -> PartitionDelta {
    PartitionDelta {
        partition: 0,
        next_offset: 10,
        claim: Claim {
            epoch,
            redis: 10,
            warehouse: 0,
        },
        template_counts: vec![],
        receiver_lists: vec![],
        message_lists: vec![],
        series: windows
            .into_iter()
            .map(|(key, events)| {
                let counts = Counts {
                    events,
                    receivers: events,
                };
                (key, counts)
            })
            .collect(),
        windows: format!("w {id}\n"),
    }
}

fn series(conn: &mut redis::Connection) -> BTreeMap<String, i64> {
    redis::cmd("HGETALL")
        .arg(format!("{SERIES_KEY_PREFIX}{TEMPLATE}"))
        .query(conn)
        .unwrap()
}

/// A commit that moves no fence (every range empty) is recognised on retry all the
/// same: CI once saw a window's series doubled after Redis, stopped mid-script,
/// applied a commit whose reply the sink had given up on, and the sink's retry applied
/// it again. Later such commits still apply.
#[test]
fn a_retried_commit_that_moves_no_fence_is_not_applied_twice() {
    in_both_modes(|| {
        let (mut conn, keys) = fresh_db(18);
        claim_fresh(&mut conn, &keys, &[0], 10);
        let first = window_close(&keys, 1, 4);
        assert_eq!(first.scripts.len(), 1);
        assert!(matches!(
            run(&mut conn, &keys, &first.scripts[0]),
            Reply::Applied { .. }
        ));
        assert_eq!(
            run(&mut conn, &keys, &first.scripts[0]),
            Reply::AppliedBefore,
            "the retry of the same commit"
        );
        assert_eq!(series(&mut conn), [("60000:10".to_string(), 4)].into());
        let second = window_close(&keys, 2, 5);
        assert!(matches!(
            run(&mut conn, &keys, &second.scripts[0]),
            Reply::Applied { .. }
        ));
        assert_eq!(
            series(&mut conn),
            [("60000:10".to_string(), 4), ("120000:10".to_string(), 5)].into()
        );
        let windows: Option<String> = redis::cmd("HGET")
            .arg(&keys.windows)
            .arg(series_field(0))
            .query(&mut conn)
            .unwrap();
        assert_eq!(windows.as_deref(), Some("w 2\n"));
    });
}

/// Checkpoint `id` of partition 0 (epoch `epoch`) closing `windows` one-minute windows
/// of [`TEMPLATE`] state 10, window `w` counting `w + 1` events: more series fields
/// than a small budget takes.
fn many_windows_close(keys: &FenceKeys, id: u64, epoch: i64, windows: i64) -> CommitPlan {
    let closed = (0..windows)
        .map(|w| ((60_000 * w, TEMPLATE, 10), w + 1))
        .collect();
    plan_of(keys, id, vec![closing(id, epoch, closed)], 100)
}

/// The series hash [`many_windows_close`] leaves once applied: field `{start}:10`.
fn many_windows_series(windows: i64) -> BTreeMap<String, i64> {
    (0..windows)
        .map(|w| (format!("{}:10", 60_000 * w), w + 1))
        .collect()
}

fn staged_lists(conn: &mut redis::Connection, keys: &FenceKeys) -> Vec<String> {
    redis::cmd("SMEMBERS")
        .arg(&keys.staged)
        .query(conn)
        .unwrap()
}

/// Series too many for one script within the budget are staged by the final script
/// (with the fences) and applied by `unstage` scripts, a batch within the budget each: a
/// retried final stages nothing twice, a retried unstage takes the next batch instead
/// of the same one, and an unstage that finds the list gone says so. Whoever unstages (the
/// sink after its final, or the next claim after a crash), every field applies exactly
/// once. A final refused by the fence check stages nothing.
#[test]
fn series_staged_by_a_final_script_are_unstaged_exactly_once() {
    in_both_modes(|| {
        let (mut conn, keys) = fresh_db(51);
        claim_fresh(&mut conn, &keys, &[0], 10);
        let commit = many_windows_close(&keys, 1, 1, 300);
        let (first, unstages) = commit.scripts.split_first().unwrap();
        assert_eq!(first.mode, Mode::Final);
        assert!(
            first.ops <= 100,
            "the final stays within the budget: {}",
            first.ops
        );
        assert!(unstages.len() >= 3, "{} unstage scripts", unstages.len());
        assert!(unstages
            .iter()
            .all(|p| p.mode == Mode::Unstage && p.ops <= 100));
        assert_eq!(unstages.iter().map(|p| p.ops).sum::<usize>(), 300);
        assert!(matches!(
            run(&mut conn, &keys, first),
            Reply::Applied { .. }
        ));
        let list = keys.staged_list(0, 1, 1);
        assert_eq!(staged_lists(&mut conn, &keys), vec![list.clone()]);
        assert_eq!(
            series(&mut conn),
            BTreeMap::new(),
            "staged, not applied yet"
        );
        let staged_len: i64 = redis::cmd("LLEN").arg(&list).query(&mut conn).unwrap();
        assert_eq!(
            staged_len,
            unstages.len() as i64,
            "a batch per unstage script"
        );
        assert_eq!(run(&mut conn, &keys, first), Reply::AppliedBefore);
        let after_retry: i64 = redis::cmd("LLEN").arg(&list).query(&mut conn).unwrap();
        assert_eq!(
            after_retry, staged_len,
            "a retried final stages nothing again"
        );

        // The first unstage twice (its reply lost, say): the retry takes the next batch.
        for script in [&unstages[0]].into_iter().chain(unstages) {
            run(&mut conn, &keys, script);
        }
        let expected = many_windows_series(300);
        assert_eq!(series(&mut conn), expected);
        assert_eq!(staged_lists(&mut conn, &keys), Vec::<String>::new());
        assert_eq!(
            run(&mut conn, &keys, &unstages[0]),
            Reply::AppliedBefore,
            "the list is gone"
        );
        let ttl: i64 = redis::cmd("PTTL")
            .arg(format!("{SERIES_KEY_PREFIX}{TEMPLATE}"))
            .query(&mut conn)
            .unwrap();
        assert!(ttl > 0 && ttl <= 60_000, "{ttl}");

        // A zombie: partition 0 claimed again, the old owner's final is refused and stages
        // nothing.
        claim_fresh(&mut conn, &keys, &[0], 10);
        let zombie = many_windows_close(&keys, 2, 1, 300);
        assert!(matches!(
            run(&mut conn, &keys, &zombie.scripts[0]),
            Reply::Rejected(Rejection::StaleEpoch { .. })
        ));
        assert_eq!(staged_lists(&mut conn, &keys), Vec::<String>::new());
        assert_eq!(series(&mut conn), expected);

        // The new owner's final staged its series and the process died: the next claim
        // unstages the pending list.
        let crashed = many_windows_close(&keys, 3, 2, 300);
        assert!(matches!(
            run(&mut conn, &keys, &crashed.scripts[0]),
            Reply::Applied { .. }
        ));
        assert_eq!(staged_lists(&mut conn, &keys).len(), 1);
        assert_eq!(
            staged::unstage_pending(&mut conn, &keys).unwrap(),
            staged::Unstaged {
                lists: 1,
                conflicts: 0
            }
        );
        let doubled: BTreeMap<String, i64> =
            expected.iter().map(|(k, n)| (k.clone(), 2 * n)).collect();
        assert_eq!(series(&mut conn), doubled);
        assert_eq!(staged_lists(&mut conn, &keys), Vec::<String>::new());
    });
}

/// Lists of both TTL classes (receivers, message ids) with one value, a few, and more
/// than one `LPUSH` carries (1,000 values each) apply exactly: every list holds its
/// values newest first, with its class's TTL.
#[test]
fn lists_of_every_shape_apply_exactly_with_their_class_ttl() {
    in_both_modes(|| {
        let (mut conn, keys) = fresh_db(54);
        claim_fresh(&mut conn, &keys, &[0], 0);
        let values = |n: i64| -> Vec<TraceValue> {
            (0..n)
                .map(|timestamp| TraceValue {
                    state: 10,
                    business_id: TEMPLATE,
                    timestamp,
                })
                .collect()
        };
        let push = |key: &str, n: i64| ListPush {
            key: key.into(),
            values: values(n).into_iter().collect(),
        };
        let delta = PartitionDelta {
            partition: 0,
            next_offset: 5,
            claim: Claim {
                epoch: 1,
                redis: 0,
                warehouse: 0,
            },
            template_counts: vec![],
            receiver_lists: vec![push("r1", 1), push("r3", 3), push("r2500", 2500)],
            message_lists: vec![push("m1", 1), push("m2", 2)],
            series: vec![],
            windows: String::new(),
        };
        let commit = plan_of(&keys, 1, vec![delta], 100_000);
        assert_eq!(commit.scripts.len(), 1);
        assert!(matches!(
            run(&mut conn, &keys, &commit.scripts[0]),
            Reply::Applied { .. }
        ));
        let layout = KeyLayout::default();
        let lists = [
            (layout.receiver("r1"), 1, 60_000),
            (layout.receiver("r3"), 3, 60_000),
            (layout.receiver("r2500"), 2500, 60_000),
            (layout.message("m1"), 1, 120_000),
            (layout.message("m2"), 2, 120_000),
        ];
        for (key, n, ttl_ms) in lists {
            let stored: Vec<String> = redis::cmd("LRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query(&mut conn)
                .unwrap();
            let newest_first: Vec<String> = values(n).iter().rev().map(|v| v.to_json()).collect();
            assert_eq!(stored, newest_first, "{key}");
            let pttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut conn).unwrap();
            assert!(
                pttl > ttl_ms - 30_000 && pttl <= ttl_ms,
                "{key}: PTTL {pttl}"
            );
        }
    });
}

/// A receiver list expires at the end of the day by Redis's clock when the script
/// runs, not when the commit was planned: a commit that waited past a day end it was
/// planned for takes the next one, and one that waited past both takes whole days
/// after the second. (Before, the time to live was fixed at planning, and a commit held
/// up by a stalled Redis kept its lists past midnight by as long as it waited.)
#[test]
fn a_receiver_list_expires_at_the_day_end_redis_sees_when_the_script_runs() {
    in_both_modes(|| {
        let (mut conn, keys) = fresh_db(55);
        claim_fresh(&mut conn, &keys, &[0], 0);
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query(&mut conn).unwrap();
        let now = secs * 1000 + micros / 1000;
        const DAY: i64 = 86_400_000;
        let cases = [
            ("ahead", [now + 30_000, now + 30_000 + DAY], 30_000),
            ("first passed", [now - 1_000, now + 60_000], 60_000),
            (
                "both passed",
                [now - 2 * DAY + 5_000, now - DAY + 5_000],
                5_000,
            ),
        ];
        for (n, (case, day_ends, expected)) in cases.into_iter().enumerate() {
            let key = format!("day-end-{n}");
            let delta = PartitionDelta {
                partition: 0,
                next_offset: n as i64 + 1,
                // Each case's range starts where the one before ended.
                claim: Claim {
                    epoch: 1,
                    redis: n as i64,
                    warehouse: 0,
                },
                template_counts: vec![],
                receiver_lists: vec![ListPush {
                    key: key.as_str().into(),
                    values: [TraceValue {
                        state: 10,
                        business_id: TEMPLATE,
                        timestamp: 1,
                    }]
                    .into_iter()
                    .collect(),
                }],
                message_lists: vec![],
                series: vec![],
                windows: String::new(),
            };
            let ttls = Ttls {
                receiver: Expiry::DayEnd(day_ends),
                message: Expiry::After(120_000),
                template_ms: 60_000,
                series_ms: 60_000,
                conflicts_ms: 60_000,
            };
            let commit = plan_with(&keys, n as u64 + 1, vec![delta], 100_000, ttls);
            assert!(matches!(
                run(&mut conn, &keys, &commit.scripts[0]),
                Reply::Applied { .. }
            ));
            let pttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut conn).unwrap();
            assert!(
                pttl > expected - 5_000 && pttl <= expected,
                "{case}: PTTL {pttl}, expected about {expected}"
            );
        }
    });
}

/// Three instances claiming at once unstage the same pending list side by side (each
/// claim runs `unstage_pending`): every batch applies once, whoever pops it, and all
/// three finish without an error, the list gone.
#[test]
fn concurrent_unstagers_apply_every_staged_batch_once() {
    in_both_modes(|| {
        let (mut conn, keys) = fresh_db(53);
        claim_fresh(&mut conn, &keys, &[0], 10);
        let commit = many_windows_close(&keys, 1, 1, 3000);
        assert!(
            commit.scripts.len() > 20,
            "{} scripts",
            commit.scripts.len()
        );
        assert!(matches!(
            run(&mut conn, &keys, &commit.scripts[0]),
            Reply::Applied { .. }
        ));
        let unstagers: Vec<_> = (0..3)
            .map(|_| {
                let keys = keys.clone();
                std::thread::spawn(move || {
                    let (mut conn, _) = connect_db(53);
                    staged::unstage_pending(&mut conn, &keys)
                })
            })
            .collect();
        for unstager in unstagers {
            let unstaged = unstager.join().unwrap().expect("unstaging beside others");
            assert_eq!(unstaged.conflicts, 0);
        }
        let expected = many_windows_series(3000);
        assert_eq!(series(&mut conn), expected);
        assert_eq!(staged_lists(&mut conn, &keys), Vec::<String>::new());
    });
}

/// A series key of another type found while unstaging a staged batch: its fields are
/// refused and reported as conflicts (counted in the conflicts hash), the batch is
/// still popped and the list finished, and the foreign key is left as it was.
#[test]
fn a_staged_series_key_of_another_type_is_a_conflict_not_a_stuck_list() {
    in_both_modes(|| {
        let (mut conn, keys) = fresh_db(52);
        claim_fresh(&mut conn, &keys, &[0], 10);
        let series_key = format!("{SERIES_KEY_PREFIX}{TEMPLATE}");
        redis::cmd("SET")
            .arg(&series_key)
            .arg("a string")
            .query::<()>(&mut conn)
            .unwrap();
        let commit = many_windows_close(&keys, 1, 1, 300);
        let mut conflicts = 0;
        for script in &commit.scripts {
            match run(&mut conn, &keys, script) {
                Reply::Applied { conflicts: c, .. } => conflicts += c,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(conflicts, 300, "one per field");
        assert_eq!(staged_lists(&mut conn, &keys), Vec::<String>::new());
        let recorded: BTreeMap<String, i64> = redis::cmd("HGETALL")
            .arg(&keys.conflicts)
            .query(&mut conn)
            .unwrap();
        assert_eq!(
            recorded,
            BTreeMap::from([(format!("wrong_type {series_key}"), 300 * 301 / 2)])
        );
        let kept: String = redis::cmd("GET").arg(&series_key).query(&mut conn).unwrap();
        assert_eq!(kept, "a string");
    });
}

/// A key of another type (a shared Redis, or a receiver id equal to another key) is
/// refused by Redis; before, the script failed halfway with its fences moved. Now the
/// rest applies, the fences move once, and the refusal is recorded.
#[test]
fn a_key_of_another_type_is_a_conflict_not_a_partial_commit() {
    in_both_modes(|| {
        let (mut conn, keys) = fresh_db(10);
        claim_fresh(&mut conn, &keys, &[0], 0);
        redis::cmd("SET")
            .arg("taken")
            .arg("a string")
            .query::<()>(&mut conn)
            .unwrap();
        let commit = plan(
            &keys,
            &[range(0, 1, 0, 4)],
            5,
            &["before", "taken", "after", "anchorflow:g:t:fences"],
            100_000,
        );
        let Reply::Applied {
            conflicts, first, ..
        } = run(&mut conn, &keys, &commit.scripts[0])
        else {
            panic!("the commit applies");
        };
        assert_eq!(conflicts, 2, "{first:?}");
        let mut reasons: Vec<(String, String)> = first
            .iter()
            .map(|c| (c.key.clone(), c.reason.clone()))
            .collect();
        reasons.sort();
        assert_eq!(
            reasons,
            vec![
                (
                    "anchorflow:g:t:fences".to_string(),
                    "reserved_key".to_string()
                ),
                ("taken".to_string(), "wrong_type".to_string())
            ]
        );
        assert_eq!(count(&mut conn), 5);
        for key in ["before", "after"] {
            let n: i64 = redis::cmd("LLEN").arg(key).query(&mut conn).unwrap();
            assert_eq!(n, 1, "{key}");
        }
        let kept: String = redis::cmd("GET").arg("taken").query(&mut conn).unwrap();
        assert_eq!(kept, "a string", "the foreign key is untouched");
        let ttl: i64 = redis::cmd("PTTL").arg("taken").query(&mut conn).unwrap();
        assert_eq!(ttl, -1, "not even its TTL");
        assert_eq!(fences::read(&mut conn, &keys, &[0]).unwrap()[&0].1, Some(4));
        let recorded: BTreeMap<String, i64> = redis::cmd("HGETALL")
            .arg(&keys.conflicts)
            .query(&mut conn)
            .unwrap();
        assert_eq!(
            recorded,
            BTreeMap::from([
                ("reserved_key anchorflow:g:t:fences".to_string(), 1),
                ("wrong_type taken".to_string(), 1)
            ])
        );
    });
}

/// A fresh database with partition 0 claimed, 300 receivers, and a commit of one
/// value per receiver over offsets 0..50, split into parts and a final.
fn split_commit(db: u32) -> (redis::Connection, FenceKeys, Vec<String>, CommitPlan) {
    let (mut conn, keys) = fresh_db(db);
    claim_fresh(&mut conn, &keys, &[0], 0);
    let receivers = receivers(300);
    let refs: Vec<&str> = receivers.iter().map(String::as_str).collect();
    let split = plan(&keys, &[range(0, 1, 0, 50)], 1, &refs, 120);
    (conn, keys, receivers, split)
}

/// The keys of `refs` whose unit has no fence: what a replay still writes.
fn unfenced<'a>(refs: &[&'a str], fenced: &BTreeMap<u16, i64>) -> Vec<&'a str> {
    refs.iter()
        .copied()
        .filter(|key| !fenced.contains_key(&unit_of(key.as_bytes())))
        .collect()
}

/// A commit bigger than the budget runs as parts and a final. A crash after a part
/// leaves that part's unit fences, which the next claim returns; a retried part is not
/// applied twice; the final drops the unit fences it passed.
#[test]
fn a_split_commit_leaves_unit_fences_until_its_final_script() {
    in_both_modes(|| {
        let (mut conn, keys, receivers, split) = split_commit(11);
        let refs: Vec<&str> = receivers.iter().map(String::as_str).collect();
        let (last, parts) = split.scripts.split_last().unwrap();
        assert!(parts.len() >= 2, "{} scripts", split.scripts.len());
        assert_eq!(last.mode, Mode::Final);
        assert!(matches!(
            run(&mut conn, &keys, &parts[0]),
            Reply::Applied { .. }
        ));
        // The part's reply is lost; it runs again and changes nothing.
        assert_eq!(run(&mut conn, &keys, &parts[0]), applied(0));
        let pushed = |conn: &mut redis::Connection| -> i64 {
            refs.iter()
                .map(|k| redis::cmd("LLEN").arg(k).query::<i64>(conn).unwrap())
                .sum()
        };
        let after_one_part = pushed(&mut conn);
        assert!(after_one_part > 0 && after_one_part < 300);
        // A crash here: the partition's fence has not moved, its applied units are fenced.
        let claimed = fences::claim(&mut conn, &keys, &[0], |_| panic!("fences exist")).unwrap();
        assert_eq!(claimed[&0].claim.redis, 0);
        assert!(!claimed[&0].unit_fences.is_empty());
        assert!(claimed[&0].unit_fences.values().all(|f| *f == 50));
        // Its new owner replays the range, leaving out the keys of fenced units (as the
        // aggregators do), in one script: every list then holds its value exactly once,
        // and the final script drops the unit fences.
        let fenced = &claimed[&0].unit_fences;
        let left = unfenced(&refs, fenced);
        assert_eq!(left.len() as i64, 300 - after_one_part);
        let epoch = claimed[&0].claim.epoch;
        let replay = plan(&keys, &[range(0, epoch, 0, 50)], 1, &left, 100_000);
        assert_eq!(replay.scripts.len(), 1);
        assert!(matches!(
            run(&mut conn, &keys, &replay.scripts[0]),
            Reply::Applied { .. }
        ));
        assert_eq!(pushed(&mut conn), 300);
        let claimed = fences::claim(&mut conn, &keys, &[0], |_| panic!("fences exist")).unwrap();
        assert_eq!(claimed[&0].claim.redis, 50);
        assert!(claimed[&0].unit_fences.is_empty());
    });
}

/// The sink keeps two parts of a split commit outstanding, so they may apply in any
/// order, and a crash may leave a later part applied and an earlier one not: the claim
/// returns the later part's unit fences, a replay leaves its units out, and every list
/// holds its values once.
#[test]
fn the_parts_of_a_split_commit_apply_in_any_order() {
    in_both_modes(|| {
        let (mut conn, keys, receivers, split) = split_commit(19);
        let refs: Vec<&str> = receivers.iter().map(String::as_str).collect();
        let (_, parts) = split.scripts.split_last().unwrap();
        assert!(parts.len() >= 3, "{} scripts", split.scripts.len());
        let last = parts.last().unwrap();
        assert!(matches!(run(&mut conn, &keys, last), Reply::Applied { .. }));
        let claimed = fences::claim(&mut conn, &keys, &[0], |_| panic!("fences exist")).unwrap();
        assert_eq!(claimed[&0].claim.redis, 0);
        let fenced = &claimed[&0].unit_fences;
        let left = unfenced(&refs, fenced);
        assert!(!left.is_empty() && left.len() < refs.len());
        // The new owner's replay, split too, runs its parts last first.
        let epoch = claimed[&0].claim.epoch;
        let replay = plan(&keys, &[range(0, epoch, 0, 50)], 1, &left, 120);
        let (final_script, parts) = replay.scripts.split_last().unwrap();
        assert!(parts.len() >= 2, "{} scripts", replay.scripts.len());
        for part in parts.iter().rev() {
            assert!(matches!(run(&mut conn, &keys, part), Reply::Applied { .. }));
        }
        assert!(matches!(
            run(&mut conn, &keys, final_script),
            Reply::Applied { .. }
        ));
        for key in &refs {
            let len: i64 = redis::cmd("LLEN").arg(key).query(&mut conn).unwrap();
            assert_eq!(len, 1, "{key}");
        }
        let claimed = fences::claim(&mut conn, &keys, &[0], |_| panic!("fences exist")).unwrap();
        assert_eq!(claimed[&0].claim.redis, 50);
        assert!(claimed[&0].unit_fences.is_empty());
    });
}

/// A part stores its unit fence once per partition, over the run of units it carries
/// (`first-last`): a few fields per checkpoint, not one per unit and partition. A claim
/// returns one fence per unit of every run ahead of the Redis fence, the highest where
/// runs overlap, and still reads a single-unit field (how fences were stored before).
#[test]
fn a_part_fences_its_run_of_units_once_per_partition() {
    let (mut conn, keys) = fresh_db(17);
    claim_fresh(&mut conn, &keys, &[0, 1], 0);
    let receivers = receivers(300);
    let refs: Vec<&str> = receivers.iter().map(String::as_str).collect();
    let split = plan(
        &keys,
        &[range(0, 1, 0, 50), range(1, 1, 0, 20)],
        1,
        &refs,
        120,
    );
    let part = &split.scripts[0];
    assert_eq!(part.mode, Mode::Part);
    let carried: Vec<u16> = refs
        .iter()
        .filter(|key| part.args().unwrap().iter().any(|arg| arg == **key))
        .map(|key| unit_of(key.as_bytes()))
        .collect();
    let (lo, hi) = (
        *carried.iter().min().unwrap(),
        *carried.iter().max().unwrap(),
    );
    assert!(matches!(run(&mut conn, &keys, part), Reply::Applied { .. }));
    for (p, to) in [(0, 50), (1, 20)] {
        let stored: BTreeMap<String, i64> = redis::cmd("HGETALL")
            .arg(format!("{}{p}", keys.units_prefix))
            .query(&mut conn)
            .unwrap();
        assert_eq!(stored, BTreeMap::from([(format!("{lo}-{hi}"), to)]));
    }
    // A single-unit field, and a run overlapping the part's with a higher fence.
    redis::cmd("HSET")
        .arg(format!("{}0", keys.units_prefix))
        .arg("1000")
        .arg(70)
        .arg(format!("{hi}-{}", hi + 2))
        .arg(60)
        .query::<()>(&mut conn)
        .unwrap();
    let claimed = fences::claim(&mut conn, &keys, &[0, 1], |_| panic!("fences exist")).unwrap();
    let mut expected: BTreeMap<u16, i64> = (lo..hi).map(|u| (u, 50)).collect();
    expected.extend((hi..=hi + 2).map(|u| (u, 60)));
    expected.insert(1000, 70);
    assert_eq!(claimed[&0].unit_fences, expected);
    let expected: BTreeMap<u16, i64> = (lo..=hi).map(|u| (u, 20)).collect();
    assert_eq!(claimed[&1].unit_fences, expected);
}

/// A replay never lowers a unit fence. A crashed run's part fenced some units of
/// partition 0 at 50; the new owner's checkpoint ends partition 0 at 30 and also carries
/// partition 1, whose events touch the same units, so a part applies them (partition 1
/// needs them) while partition 0's records in them are left out. The part must move
/// partition 1's unit fences and leave partition 0's at 50: lowered to 30, the next
/// replay of partition 0 from 30 would write its records between 30 and 50 again.
#[test]
fn a_replay_never_lowers_a_unit_fence() {
    in_both_modes(|| {
        let (mut conn, keys) = fresh_db(12);
        claim_fresh(&mut conn, &keys, &[0, 1], 0);
        let receivers = receivers(300);
        let refs: Vec<&str> = receivers.iter().map(String::as_str).collect();
        let crashed = plan(&keys, &[range(0, 1, 0, 50)], 1, &refs, 120);
        assert!(matches!(
            run(&mut conn, &keys, &crashed.scripts[0]),
            Reply::Applied { .. }
        ));
        let claimed = fences::claim(&mut conn, &keys, &[0, 1], |_| panic!("fences exist")).unwrap();
        let fenced: BTreeMap<u16, i64> = claimed[&0].unit_fences.clone();
        assert!(!fenced.is_empty() && fenced.values().all(|f| *f == 50));
        let epoch = claimed[&0].claim.epoch;

        // Partition 1's records touch every unit; partition 0 ends at 30.
        let replay = plan(
            &keys,
            &[range(1, epoch, 0, 10), range(0, epoch, 0, 30)],
            1,
            &refs,
            120,
        );
        let (_, parts) = replay.scripts.split_last().unwrap();
        let mut touched = 0;
        for part in parts {
            assert!(matches!(run(&mut conn, &keys, part), Reply::Applied { .. }));
            touched += 1;
        }
        assert!(touched >= 2, "the replay is split: {touched} parts");
        let claimed = fences::claim(&mut conn, &keys, &[0, 1], |_| panic!("fences exist")).unwrap();
        for (unit, fence) in &fenced {
            assert_eq!(
                claimed[&0].unit_fences.get(unit),
                Some(fence),
                "partition 0's unit {unit} fence was lowered"
            );
        }
        assert!(
            claimed[&1].unit_fences.values().all(|f| *f == 10),
            "partition 1's units move to its range end: {:?}",
            claimed[&1].unit_fences
        );
        assert!(!claimed[&1].unit_fences.is_empty());
    });
}

#[test]
fn lost_fences_are_refused_and_marked() {
    in_both_modes(|| {
        let (mut conn, keys) = fresh_db(9);
        claim_fresh(&mut conn, &keys, &[0], 0);
        redis::cmd("FLUSHDB").query::<()>(&mut conn).unwrap();

        assert_eq!(
            commit(&mut conn, &keys, &[range(0, 1, 0, 4)], 1),
            rejected(Rejection::FencesMissing { partition: 0 })
        );
        assert_eq!(count(&mut conn), 0, "nothing partial");
        assert!(fences::lost_marker(&mut conn, &keys).unwrap().is_some());
        // No instance may claim (and so read from a stale Kafka offset) until recovery.
        assert!(matches!(
            fences::claim(&mut conn, &keys, &[0], |_| Ok(Default::default())),
            Err(ClaimError::StateLost { .. })
        ));
        let old = fences::read(&mut conn, &keys, &[0]).unwrap();
        fences::reset(&mut conn, &keys, &[(0, (0, 0))].into_iter().collect(), &old).unwrap();
        assert!(fences::lost_marker(&mut conn, &keys).unwrap().is_none());
        let claim = fences::claim(&mut conn, &keys, &[0], |_| panic!("fences exist")).unwrap();
        assert_eq!((claim[&0].claim.redis, claim[&0].claim.warehouse), (0, 0));
    });
}

/// Issue 9, item 3: a second process started with the same instance id must not take
/// the lease (and so delete the first one's in-progress files); a holder of this host
/// that is gone (kill -9) is taken over at once; a run hands back only its own.
#[test]
fn one_live_run_holds_an_instance_lease() {
    use anchorflow_actors::protocol::lease::InstanceLease;
    let (mut conn, keys) = fresh_db(13);
    let mut first = InstanceLease::new(&keys, "a", "run1");
    let mut second = InstanceLease::new(&keys, "a", "run2");
    let mut other = InstanceLease::new(&keys, "ab", "run3");
    assert!(first.refresh(&mut conn).unwrap());
    assert!(!second.refresh(&mut conn).unwrap(), "the first is alive");
    assert!(
        other.refresh(&mut conn).unwrap(),
        "another id, even a longer one"
    );
    assert!(first.refresh(&mut conn).unwrap(), "renewal");

    // A holder on this host whose process is gone.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let lease_key = format!("{}a", keys.instances_prefix);
    redis::cmd("SET")
        .arg(&lease_key)
        .arg(format!("{}:4194303:dead", host.trim()))
        .query::<()>(&mut conn)
        .unwrap();
    assert!(second.refresh(&mut conn).unwrap(), "taken over");
    assert!(
        !first.refresh(&mut conn).unwrap(),
        "the second holds it now"
    );
    let ttl: i64 = redis::cmd("PTTL").arg(&lease_key).query(&mut conn).unwrap();
    assert!(ttl > 0 && ttl <= 30_000, "{ttl}");

    // A clean stop hands back the lease this process holds, and no one else's.
    use anchorflow_actors::protocol::lease::release_held_here;
    assert!(release_held_here(&mut conn, &keys, "a").unwrap(), "its own");
    let held: Option<String> = redis::cmd("GET").arg(&lease_key).query(&mut conn).unwrap();
    assert_eq!(held, None);
    redis::cmd("SET")
        .arg(&lease_key)
        .arg("elsewhere:1:run4")
        .query::<()>(&mut conn)
        .unwrap();
    assert!(
        !release_held_here(&mut conn, &keys, "a").unwrap(),
        "another host's"
    );
    let held: Option<String> = redis::cmd("GET").arg(&lease_key).query(&mut conn).unwrap();
    assert_eq!(held.as_deref(), Some("elsewhere:1:run4"));
}

/// `claim.lua` through [`ClaimArgs`]: each claim bumps the epoch and returns the
/// fences; a partition without fences needs a cold-start offset; the lost marker
/// stops every claim.
#[test]
fn the_claim_script_round_trips() {
    let (mut conn, keys) = fresh_db(14);
    let claim = |conn: &mut redis::Connection, partitions: &[(i32, i64)]| {
        ClaimArgs {
            units_prefix: &keys.units_prefix,
            partitions,
        }
        .invoke(conn, &keys)
        .unwrap()
    };
    assert_eq!(claim(&mut conn, &[(0, -1)]), ClaimReply::Vanished(0));
    let ClaimReply::Claimed(first) = claim(&mut conn, &[(0, 40), (1, 0)]) else {
        panic!("claimed");
    };
    assert_eq!(
        first[&0].claim,
        Claim {
            epoch: 1,
            redis: 40,
            warehouse: 40
        }
    );
    assert_eq!(first[&1].claim.epoch, 1);
    let ClaimReply::Claimed(again) = claim(&mut conn, &[(0, -1)]) else {
        panic!("claimed");
    };
    assert_eq!(
        again[&0].claim,
        Claim {
            epoch: 2,
            redis: 40,
            warehouse: 40
        }
    );
    fences::mark_lost(&mut conn, &keys, "test").unwrap();
    assert_eq!(claim(&mut conn, &[(0, -1)]), ClaimReply::StateLost);
}

/// Arguments that do not match a script's layout fail it before its first write: one
/// value missing from the middle of a commit, or one too many, changes nothing.
#[test]
fn arguments_that_do_not_match_a_script_fail_it_with_nothing_written() {
    let (mut conn, keys) = fresh_db(15);
    claim_fresh(&mut conn, &keys, &[0], 0);
    let commit = plan(&keys, &[range(0, 1, 0, 5)], 3, &["r1", "r2"], 100_000);
    let args = commit.scripts[0].args().unwrap();
    let items: Vec<&str> = args.iter().collect();
    let mut short = items.clone();
    short.remove(items.len() / 2);
    let mut long = items.clone();
    long.insert(items.len() - 1, "extra");
    for broken in [short, long] {
        let mut broken_args = Args::default();
        for item in broken {
            broken_args.push(item);
        }
        let error = evalsha(&mut conn, &keys, &broken_args).expect_err("a mismatched layout fails");
        assert!(
            error.to_string().contains("do not match their layout")
                || error.to_string().contains("number"),
            "{error}"
        );
    }
    assert_eq!(count(&mut conn), 0, "nothing written");
    assert_eq!(fences::read(&mut conn, &keys, &[0]).unwrap()[&0].1, Some(0));
    assert_eq!(
        run_args(&mut conn, &keys, args),
        applied(6),
        "the right arguments apply"
    );
    assert_eq!(count(&mut conn), 3);
}

/// `warehouse_record.lua` through [`RecordArgs`]: the fences move, the record is
/// kept for publishing (a record without files keeps nothing: there is nothing to
/// roll forward), the folders await their commit unless committed, the watermark
/// only grows, the open windows are stored; a retry is recognised.
#[test]
fn the_record_script_round_trips() {
    let (mut conn, keys) = fresh_db(16);
    claim_fresh(&mut conn, &keys, &[0, 1], 0);
    let script = record_script();
    let ranges = [range(0, 1, 0, 10), range(1, 1, 0, 4)];
    let record = PublishRecord {
        id: "a.run.1".into(),
        files: vec![(
            anchorflow_actors::sinks::warehouse::storage::FileHandle::InProgress(
                "/w/.f.inprogress".into(),
            ),
            "/w/part-f.parquet".into(),
        )],
        ranges: ranges.to_vec(),
    };
    redis::cmd("SADD")
        .arg(&keys.committed)
        .arg("ods_anchor_log/dt=2023-11-20/hour=10")
        .query::<()>(&mut conn)
        .unwrap();
    let folders: std::collections::BTreeSet<String> = [
        "ods_anchor_log/dt=2023-11-20/hour=10",
        "ods_anchor_log/dt=2023-11-20/hour=11",
    ]
    .map(String::from)
    .into();
    let states: BTreeMap<i32, String> = [(0, "w 1\n".to_string())].into();
    let args = RecordArgs {
        checkpoint: 1,
        ranges: &ranges,
        record: &record,
        folders: &folders,
        watermark: Some(5_000),
        states: &states,
    };
    assert_eq!(args.invoke(&script, &mut conn, &keys).unwrap(), applied(1));
    assert_eq!(
        args.invoke(&script, &mut conn, &keys).unwrap(),
        Reply::AppliedBefore
    );
    let stored = fences::read(&mut conn, &keys, &[0, 1]).unwrap();
    assert_eq!((stored[&0].2, stored[&1].2), (Some(10), Some(4)));
    assert_eq!(
        pending_publishes(&mut conn, &keys).unwrap(),
        vec![record.clone()]
    );
    let pending: Vec<String> = redis::cmd("SMEMBERS")
        .arg(&keys.folders)
        .query(&mut conn)
        .unwrap();
    assert_eq!(
        pending,
        vec!["ods_anchor_log/dt=2023-11-20/hour=11"],
        "the committed one is not pending again"
    );
    let marks: BTreeMap<String, i64> = redis::cmd("HGETALL")
        .arg(&keys.watermarks)
        .query(&mut conn)
        .unwrap();
    assert_eq!(
        marks,
        [("0".to_string(), 5_000), ("1".to_string(), 5_000)].into()
    );
    let windows: Option<String> = redis::cmd("HGET")
        .arg(&keys.windows)
        .arg("dws:0")
        .query(&mut conn)
        .unwrap();
    assert_eq!(windows.as_deref(), Some("w 1\n"));

    // A record without files, with an older watermark: fences move, nothing to publish.
    publish_done(&mut conn, &keys, &record.id).unwrap();
    let quiet_ranges = [range(0, 1, 10, 12)];
    let quiet = PublishRecord {
        id: "a.run.2".into(),
        files: vec![],
        ranges: quiet_ranges.to_vec(),
    };
    let args = RecordArgs {
        checkpoint: 2,
        ranges: &quiet_ranges,
        record: &quiet,
        folders: &Default::default(),
        watermark: Some(4_000),
        states: &Default::default(),
    };
    assert_eq!(args.invoke(&script, &mut conn, &keys).unwrap(), applied(1));
    assert!(
        pending_publishes(&mut conn, &keys).unwrap().is_empty(),
        "no record kept"
    );
    assert_eq!(
        fences::read(&mut conn, &keys, &[0]).unwrap()[&0].2,
        Some(12)
    );
    let mark: i64 = redis::cmd("HGET")
        .arg(&keys.watermarks)
        .arg("0")
        .query(&mut conn)
        .unwrap();
    assert_eq!(mark, 5_000, "a watermark never goes back");
}
