//! The fence protocol's Lua scripts against the real Redis of `scripts/test-env.sh`:
//! a commit applies only under the current epoch and from the stored fence, a refused
//! commit writes nothing at all (for any partition), and lost fences are marked.

mod common;

use anchorflow_actors::fences::{self, ClaimError, FenceKeys, FenceRange, Rejection};
use anchorflow_actors::messages::SinkKind;
use anchorflow_actors::redis_sink::commit_script;
use common::*;

/// Runs the Redis sink's commit script: `ranges`, then one HINCRBY of `hash`/`field`.
fn commit(
    conn: &mut redis::Connection,
    keys: &FenceKeys,
    ranges: &[FenceRange],
    hash: &str,
    delta: i64,
) -> Result<i64, Rejection> {
    let mut args = Vec::new();
    fences::push_ranges(&mut args, SinkKind::Redis, ranges);
    for arg in ["0", "1", hash, "60000", "1", "10"] {
        args.push(arg.as_bytes().to_vec());
    }
    args.push(delta.to_string().into_bytes());
    args.push(b"0".to_vec()); // no open-window states
    let script = commit_script();
    let mut invocation = script.key(&keys.fences);
    invocation.key(&keys.lost).key(&keys.windows);
    for arg in &args {
        invocation.arg(arg.as_slice());
    }
    let reply: Vec<i64> = invocation.invoke(conn).expect("script runs");
    fences::outcome(&reply).expect("well-formed reply")
}

fn count(conn: &mut redis::Connection, hash: &str) -> i64 {
    redis::cmd("HGET")
        .arg(hash)
        .arg("10")
        .query::<Option<i64>>(conn)
        .unwrap()
        .unwrap_or(0)
}

/// A fresh database of the test Redis and the keys of one (group, topic).
fn fresh_db(db: u32) -> (redis::Connection, FenceKeys) {
    let url = redis_url(db);
    flush_db(&url);
    let conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    (conn, FenceKeys::new("g", "t"))
}

fn range(partition: i32, epoch: i64, from: i64, to: i64) -> FenceRange {
    FenceRange {
        partition,
        epoch,
        from,
        to,
    }
}

#[test]
fn commits_apply_only_under_the_current_epoch_and_from_the_stored_fence() {
    let (mut conn, keys) = fresh_db(8);
    let first = fences::claim(&mut conn, &keys, &[0, 1], |fresh| {
        Ok(fresh.iter().map(|p| (*p, 5)).collect())
    })
    .unwrap();
    assert_eq!(
        (first[&0].epoch, first[&0].redis, first[&0].warehouse),
        (1, 5, 5),
        "fences start at the cold-start offset"
    );

    assert_eq!(
        commit(
            &mut conn,
            &keys,
            &[range(0, 1, 5, 10), range(1, 1, 5, 7)],
            "h",
            3
        ),
        Ok(2),
        "one HINCRBY and one PEXPIRE"
    );
    assert_eq!(count(&mut conn, "h"), 3);
    // A replay of the same range is refused and changes nothing.
    assert_eq!(
        commit(&mut conn, &keys, &[range(0, 1, 5, 10)], "h", 3),
        Err(Rejection::NotContiguous {
            partition: 0,
            stored: 10
        })
    );
    assert_eq!(count(&mut conn, "h"), 3);

    // Another instance claims partition 1: the old owner's next commit is refused
    // whole, including its part for partition 0, which it still owns.
    let second = fences::claim(&mut conn, &keys, &[1], |_| {
        panic!("fences exist; no cold start")
    })
    .unwrap();
    assert_eq!((second[&1].epoch, second[&1].redis), (2, 7));
    assert_eq!(
        commit(
            &mut conn,
            &keys,
            &[range(0, 1, 10, 12), range(1, 1, 7, 9)],
            "h",
            100
        ),
        Err(Rejection::StaleEpoch {
            partition: 1,
            stored: 2
        })
    );
    assert_eq!(count(&mut conn, "h"), 3);
    let stored = fences::read(&mut conn, &keys, &[0, 1]).unwrap();
    assert_eq!(
        stored[&0],
        (Some(1), Some(10), Some(5)),
        "partition 0 did not move"
    );
    assert_eq!(stored[&1], (Some(2), Some(7), Some(5)));
    // The new owner continues from the fence.
    assert_eq!(
        commit(&mut conn, &keys, &[range(1, 2, 7, 9)], "h", 4).map(|_| ()),
        Ok(())
    );
    assert_eq!(count(&mut conn, "h"), 7);
}

#[test]
fn lost_fences_are_refused_and_marked() {
    let (mut conn, keys) = fresh_db(9);
    fences::claim(&mut conn, &keys, &[0], |fresh| {
        Ok(fresh.iter().map(|p| (*p, 0)).collect())
    })
    .unwrap();
    redis::cmd("FLUSHDB").query::<()>(&mut conn).unwrap();

    assert_eq!(
        commit(&mut conn, &keys, &[range(0, 1, 0, 4)], "h", 1),
        Err(Rejection::FencesMissing { partition: 0 })
    );
    assert_eq!(count(&mut conn, "h"), 0, "nothing partial");
    assert!(fences::lost_marker(&mut conn, &keys).unwrap().is_some());
    // No instance may claim (and so read from a stale Kafka offset) until recovery.
    assert!(matches!(
        fences::claim(&mut conn, &keys, &[0], |_| Ok(Default::default())),
        Err(ClaimError::StateLost { .. })
    ));
    fences::reset(&mut conn, &keys, &[(0, (0, 0))].into_iter().collect()).unwrap();
    assert!(fences::lost_marker(&mut conn, &keys).unwrap().is_none());
    let claim = fences::claim(&mut conn, &keys, &[0], |_| panic!("fences exist")).unwrap();
    assert_eq!((claim[&0].redis, claim[&0].warehouse), (0, 0));
}
