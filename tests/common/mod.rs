//! Shared helpers of the integration tests: the services started by
//! `scripts/test-env.sh`, producing, running the pipeline, reading Redis and Parquet
//! back, and the oracle, which computes the expected outputs from the produced bytes
//! with its own small parser (it shares no code with the pipeline's decoder).

#![allow(dead_code)]

pub mod bucket;
pub mod child;
pub mod servers;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anchorflow::demo::{parquet_files, produce};
use anchorflow_actors::config::Config;
use arrow_array::{
    Array, BinaryArray, Int32Array, Int64Array, ListArray, RecordBatch, StringArray,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::ClientConfig;
use serde_json::Value;

/// Reads a service address exported by `scripts/test-env.sh`. Missing means the suite
/// was started the wrong way: fail loudly rather than skip.
pub fn service(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the suite with scripts/test.sh, which starts Redis and the Kafka broker")
    })
}

/// Shows the pipeline's warnings and errors in a failing test's output.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("ANCHORFLOW_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

pub fn redis_url(db: u32) -> String {
    init_logs();
    format!("{}/{db}", service("ANCHORFLOW_TEST_REDIS_URL"))
}

pub fn brokers() -> String {
    service("ANCHORFLOW_TEST_BROKERS")
}

pub fn unique(name: &str) -> String {
    format!(
        "{name}-{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_micros()
    )
}

pub fn create_topic(topic: &str, partitions: i32) {
    create_topic_on(&brokers(), topic, partitions)
}

pub fn create_topic_on(brokers: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let results = runtime
        .block_on(admin.create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        ))
        .expect("create topics");
    for result in results {
        result.expect("topic created");
    }
}

pub fn flush_db(url: &str) {
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_connection()
        .expect("redis connection");
    redis::cmd("FLUSHDB").query::<()>(&mut conn).unwrap();
}

/// A pipeline config for tests: fast checkpoints and rolls, a private Redis db and
/// warehouse.
pub fn config(topic: &str, redis_url: &str, warehouse: &Path) -> Config {
    let mut config = Config::default();
    config.kafka.0.insert("bootstrap.servers".into(), brokers());
    config.source.topic = topic.into();
    config.source.group_id = format!("{topic}-group");
    config.source.batch_max_records = 256;
    config.redis.url = redis_url.into();
    config.warehouse.root = warehouse.to_string_lossy().into_owned();
    config.warehouse.roll_interval_secs = 1;
    config.pipeline.checkpoint_interval_ms = 200;
    config.pipeline.aggregator_shards = 3;
    config.decode.max_ids = 40;
    config.metrics.listen = String::new();
    if let Ok(debug) = std::env::var("ANCHORFLOW_TEST_KAFKA_DEBUG") {
        // librdkafka's own debug contexts (e.g. `fetch,consumer`) for diagnosing a test.
        config.kafka.0.insert("debug".into(), debug);
    }
    config.validate().expect("test config is valid");
    config
}

/// Generated records: realistic events with about 4 % malformed ones.
pub fn generate(seed: u64, count: usize, max_ids: usize) -> Vec<Option<Vec<u8>>> {
    let defaults = anchorflow::generator::GeneratorConfig::default();
    generate_spread(seed, count, max_ids, defaults.start_ms, defaults.step_ms)
}

/// A connection to the test Redis whose calls time out, so that a check made while a
/// test has Redis paused fails instead of hanging the suite.
pub fn connect(url: &str) -> redis::Connection {
    let timeout = std::time::Duration::from_secs(10);
    let conn = redis::Client::open(url)
        .unwrap()
        .get_connection_with_timeout(timeout)
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    conn.set_read_timeout(Some(timeout)).unwrap();
    conn.set_write_timeout(Some(timeout)).unwrap();
    conn
}

/// Stored fences per partition, as `(epoch, redis, warehouse)` with -1 for absent.
pub fn stored_fences(
    url: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> BTreeMap<i32, (i64, i64, i64)> {
    let keys = anchorflow_actors::protocol::keys::FenceKeys::new(group, topic);
    let mut conn = connect(url);
    let all: Vec<i32> = (0..partitions).collect();
    anchorflow_actors::protocol::fences::read(&mut conn, &keys, &all)
        .unwrap()
        .into_iter()
        .map(|(p, (e, r, w))| (p, (e.unwrap_or(-1), r.unwrap_or(-1), w.unwrap_or(-1))))
        .collect()
}

/// The offsets the consumer group `group` has committed in the broker, per partition
/// (absent where it has none).
pub fn group_offsets(
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> BTreeMap<i32, i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut wanted = rdkafka::TopicPartitionList::new();
    for partition in 0..partitions {
        wanted.add_partition(topic, partition);
    }
    let committed = consumer
        .committed_offsets(wanted, Duration::from_secs(30))
        .expect("the group's committed offsets");
    committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            rdkafka::Offset::Offset(offset) => Some((e.partition(), offset)),
            _ => None,
        })
        .collect()
}

/// Whether both sinks' fences of every partition reached the end of what was produced.
pub fn fenced_to_end(url: &str, group: &str, topic: &str, produced: &Produced) -> bool {
    let fences = stored_fences(url, group, topic, produced.len() as i32);
    produced.iter().all(|(p, records)| {
        let end = records.len() as i64;
        fences
            .get(p)
            .is_some_and(|(_, r, w)| *r == end && *w == end)
    })
}

/// Produced records, by partition, in offset order (the broker's offsets start at 0).
pub type Produced = BTreeMap<i32, Vec<Option<Vec<u8>>>>;

pub fn produce_records(topic: &str, partitions: i32, records: Vec<Option<Vec<u8>>>) -> Produced {
    produce_records_on(&brokers(), topic, partitions, records)
}

pub fn produce_records_on(
    brokers: &str,
    topic: &str,
    partitions: i32,
    records: Vec<Option<Vec<u8>>>,
) -> Produced {
    produce(brokers, topic, partitions, records.into_iter(), true).expect("produce")
}

/// Appends `more` to `into`, as a second production to the same partitions would.
pub fn extend(into: &mut Produced, more: Produced) {
    for (p, records) in more {
        into.entry(p).or_default().extend(records);
    }
}

/// One event as the oracle understands it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Event {
    pub biz_id: Option<String>,
    pub message_id: Option<String>,
    pub ids: Vec<String>,
    pub state: i64,
    pub business_id: i64,
    pub log_timestamp: i64,
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

/// Events further than this ahead of the clock are dead letters
/// (`time.max_future_ms`, one hour by default, as Kafka bounds its record timestamps).
pub const MAX_FUTURE_MS: i64 = 3_600_000;

/// Text that marks a record processing panics on (with `ANCHORFLOW_FAULT_POISON`
/// set to it, see `tests/supervision.rs`): such a record is a dead letter.
pub const POISON: &str = "poison-record-of-the-supervision-test";

/// The oracle's reading of a record: `Some(event)` if valid.
pub fn oracle_parse(value: &Option<Vec<u8>>, max_ids: usize) -> Option<Event> {
    let bytes = value.as_ref()?;
    if bytes.windows(POISON.len()).any(|w| w == POISON.as_bytes()) {
        return None;
    }
    let object = serde_json::from_slice::<Value>(bytes).ok()?;
    let object = object.as_object()?;
    let ids: Vec<String> = object
        .get("ids")?
        .as_array()?
        .iter()
        .map(text)
        .collect::<Option<_>>()?;
    if ids.len() > max_ids {
        return None;
    }
    let state = int(object.get("state")?)?;
    i32::try_from(state).ok()?;
    let optional = |k: &str| -> Option<Option<String>> {
        match object.get(k) {
            None | Some(Value::Null) => Some(None),
            Some(v) => text(v).map(Some),
        }
    };
    let log_timestamp = int(object.get("logTimestamp")?)?;
    if log_timestamp > chrono::Utc::now().timestamp_millis() + MAX_FUTURE_MS {
        return None;
    }
    Some(Event {
        biz_id: optional("bizId")?,
        message_id: optional("messageId")?,
        ids,
        state,
        business_id: int(object.get("businessId")?)?,
        log_timestamp,
    })
}

/// Expected Redis contents: list keys to multisets of values, hash keys to fields.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RedisContents {
    pub lists: BTreeMap<String, BTreeMap<String, usize>>,
    pub hashes: BTreeMap<String, BTreeMap<String, i64>>,
}

pub fn expected_redis(produced: &Produced, max_ids: usize) -> RedisContents {
    let mut out = RedisContents::default();
    for records in produced.values() {
        for event in records.iter().filter_map(|r| oracle_parse(r, max_ids)) {
            let value = format!(
                r#"{{"state":{},"businessId":{},"timestamp":{}}}"#,
                event.state, event.business_id, event.log_timestamp
            );
            for id in &event.ids {
                *out.lists
                    .entry(id.clone())
                    .or_default()
                    .entry(value.clone())
                    .or_default() += 1;
            }
            if let Some(m) = &event.message_id {
                *out.lists
                    .entry(format!("Austin:MessageId:{m}"))
                    .or_default()
                    .entry(value.clone())
                    .or_default() += 1;
            }
            *out.hashes
                .entry(event.business_id.to_string())
                .or_default()
                .entry(event.state.to_string())
                .or_default() += event.ids.len() as i64;
        }
    }
    out
}

/// Everything in the Redis db, with each key's remaining TTL in ms.
pub fn read_redis(url: &str) -> (RedisContents, BTreeMap<String, i64>) {
    read_redis_except(url, &[])
}

/// [`read_redis`] without the `foreign` keys (written by someone else).
pub fn read_redis_except(url: &str, foreign: &[String]) -> (RedisContents, BTreeMap<String, i64>) {
    let mut conn = connect(url);
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    keys.retain(|k| !foreign.contains(k));
    let mut out = RedisContents::default();
    let mut ttls = BTreeMap::new();
    // anchorflow's own bookkeeping (fences, publish records) is checked separately.
    for key in keys.into_iter().filter(|k| !k.starts_with("anchorflow:")) {
        let kind: String = redis::cmd("TYPE").arg(&key).query(&mut conn).unwrap();
        match kind.as_str() {
            "list" => {
                let values: Vec<String> = redis::cmd("LRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query(&mut conn)
                    .unwrap();
                let entry = out.lists.entry(key.clone()).or_default();
                for v in values {
                    *entry.entry(v).or_default() += 1;
                }
            }
            "hash" => {
                let fields: BTreeMap<String, i64> =
                    redis::cmd("HGETALL").arg(&key).query(&mut conn).unwrap();
                out.hashes.insert(key.clone(), fields);
            }
            other => panic!("unexpected key {key} of type {other}"),
        }
        let ttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut conn).unwrap();
        ttls.insert(key, ttl);
    }
    (out, ttls)
}

/// Compares the Redis db with the oracle: every list as a multiset, every hash field,
/// and every TTL (receivers until local midnight in Asia/Shanghai, message lists 3
/// days, template hashes 30 days). `since_ms` is when the test began writing: keys
/// written early have less TTL left by the time a long test checks them.
pub fn check_redis(url: &str, produced: &Produced, max_ids: usize, since_ms: i64) {
    check_redis_except(url, produced, max_ids, since_ms, &[])
}

/// [`check_redis`] for a Redis where the `foreign` keys belong to someone else: they
/// must keep their content, and nothing anchorflow would have written to them is
/// expected there.
pub fn check_redis_except(
    url: &str,
    produced: &Produced,
    max_ids: usize,
    since_ms: i64,
    foreign: &[String],
) {
    let mut expected = expected_redis(produced, max_ids);
    for key in foreign {
        expected.lists.remove(key);
        expected.hashes.remove(key);
    }
    // The day's end as seen before the keys are read: every receiver list's time to
    // live, read after, is at most this (Redis's clock is this host's).
    let before_read = chrono::Utc::now().timestamp_millis();
    let (actual, ttls) = read_redis_except(url, foreign);
    assert_same("template hashes", &actual.hashes, &expected.hashes);
    assert_eq!(
        actual.lists.len(),
        expected.lists.len(),
        "number of list keys"
    );
    for (key, values) in &expected.lists {
        assert_eq!(actual.lists.get(key), Some(values), "list {key}");
    }
    // TTLs: receivers until local midnight (Asia/Shanghai), messages 3 days, templates 30 days.
    let now = chrono::Utc::now().timestamp_millis();
    let to_midnight = 86_400_000 - (before_read + 8 * 3_600_000).rem_euclid(86_400_000);
    let elapsed = now - since_ms + 60_000;
    for (key, ttl) in ttls {
        let (low, high) = if expected.hashes.contains_key(&key) {
            (30 * 86_400_000 - elapsed, 30 * 86_400_000)
        } else if key.starts_with("Austin:MessageId:") {
            (3 * 86_400_000 - elapsed, 3 * 86_400_000)
        } else {
            // Midnight may have passed since the commit: then the key is gone or the
            // next midnight applies, so only the upper bound is firm. It is exact: the
            // script takes the time to live from Redis's clock when it runs, so a
            // commit that waited (a stalled Redis) cannot carry a list past midnight;
            // the slack covers rounding only.
            (1, to_midnight.max(1) + 1_000)
        };
        assert!(
            (low..=high).contains(&ttl),
            "ttl of {key} is {ttl} ms, expected {low}..={high}"
        );
    }
}

/// A warehouse row: which record it came from and what it says.
#[derive(Clone, Debug)]
pub struct Row {
    pub partition: i32,
    pub offset: i64,
    pub folder: PathBuf,
    /// `Ok(event)` for `ods_anchor_log`, `Err(reason)` for `dead_letter`.
    pub content: Result<Event, (String, Option<Vec<u8>>)>,
}

fn batches(path: &Path) -> Vec<RecordBatch> {
    ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap())
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

fn col<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> &'a T {
    batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("column {name}"))
        .as_any()
        .downcast_ref::<T>()
        .unwrap()
}

pub fn read_warehouse(root: &Path) -> Vec<Row> {
    let mut rows = Vec::new();
    for path in parquet_files(root) {
        // Window results have no Kafka coordinates; `read_dws` reads them.
        if path
            .strip_prefix(root)
            .is_ok_and(|p| p.starts_with("dws_template_state_1m"))
        {
            continue;
        }
        let folder = path
            .parent()
            .unwrap()
            .strip_prefix(root)
            .unwrap()
            .to_path_buf();
        let is_ods = folder.starts_with("ods_anchor_log");
        for batch in batches(&path) {
            let partitions = col::<Int32Array>(&batch, "kafka_partition");
            let offsets = col::<Int64Array>(&batch, "kafka_offset");
            for i in 0..batch.num_rows() {
                let content = if is_ods {
                    let ids = col::<ListArray>(&batch, "ids").value(i);
                    let ids = ids.as_any().downcast_ref::<StringArray>().unwrap();
                    let ts = batch.column_by_name("log_timestamp").unwrap();
                    let ts = arrow_array::cast::as_primitive_array::<
                        arrow_array::types::TimestampMillisecondType,
                    >(ts);
                    let opt = |name: &str| {
                        let c = col::<StringArray>(&batch, name);
                        c.is_valid(i).then(|| c.value(i).to_string())
                    };
                    Ok(Event {
                        biz_id: opt("biz_id"),
                        message_id: opt("message_id"),
                        ids: (0..ids.len()).map(|j| ids.value(j).to_string()).collect(),
                        state: col::<Int32Array>(&batch, "state").value(i) as i64,
                        business_id: col::<Int64Array>(&batch, "business_id").value(i),
                        log_timestamp: ts.value(i),
                    })
                } else {
                    let raw = col::<BinaryArray>(&batch, "raw");
                    Err((
                        col::<StringArray>(&batch, "reason").value(i).to_string(),
                        raw.is_valid(i).then(|| raw.value(i).to_vec()),
                    ))
                };
                rows.push(Row {
                    partition: partitions.value(i),
                    offset: offsets.value(i),
                    folder: folder.clone(),
                    content,
                });
            }
        }
    }
    rows
}

/// Files whose name marks them in progress, anywhere under root.
pub fn hidden_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.path().is_dir() {
                stack.push(entry.path());
            } else if entry.file_name().to_string_lossy().starts_with('.') {
                out.push(entry.path());
            }
        }
    }
    out
}

/// `dt=…/hour=…` of an event time in Asia/Shanghai (UTC+8, no DST), computed by hand.
pub fn shanghai_folder(ts_ms: i64) -> String {
    let local = chrono::DateTime::from_timestamp_millis(ts_ms + 8 * 3_600_000).unwrap();
    local
        .format("ods_anchor_log/dt=%Y-%m-%d/hour=%H")
        .to_string()
}

/// `(partition, offset)` pairs in order, as one `partition: from..to` per run of
/// consecutive offsets: a loss reads as the ranges it hit.
pub fn ranges(pairs: impl IntoIterator<Item = (i32, i64)>) -> Vec<String> {
    let mut runs: Vec<(i32, i64, i64)> = Vec::new();
    for (p, o) in pairs {
        match runs.last_mut() {
            Some((lp, _, to)) if *lp == p && *to == o => *to = o + 1,
            _ => runs.push((p, o, o + 1)),
        }
    }
    runs.iter()
        .map(|(p, a, b)| format!("{p}: {a}..{b}"))
        .collect()
}

/// Compares the warehouse with what was produced: every (partition, offset) exactly
/// once, valid records as ods rows with the right content and folder, the others as
/// dead letters with their raw bytes. Returns the number of duplicate rows.
pub fn check_warehouse(
    root: &Path,
    produced: &Produced,
    max_ids: usize,
    allow_duplicates: bool,
) -> usize {
    let rows = read_warehouse(root);
    let mut seen: BTreeMap<(i32, i64), usize> = BTreeMap::new();
    for row in &rows {
        *seen.entry((row.partition, row.offset)).or_default() += 1;
        let record = produced
            .get(&row.partition)
            .and_then(|r| r.get(row.offset as usize))
            .unwrap_or_else(|| panic!("row for unknown record {}:{}", row.partition, row.offset));
        match (&row.content, oracle_parse(record, max_ids)) {
            (Ok(event), Some(expected)) => {
                assert_eq!(event, &expected, "ods row {}:{}", row.partition, row.offset);
                assert_eq!(
                    row.folder,
                    PathBuf::from(shanghai_folder(expected.log_timestamp))
                );
            }
            (Err((reason, raw)), None) => {
                assert!(!reason.is_empty());
                assert_eq!(
                    raw, record,
                    "dead letter {}:{} keeps the raw bytes",
                    row.partition, row.offset
                );
                assert!(row.folder.starts_with("dead_letter"));
            }
            (content, expected) => {
                panic!(
                    "record {}:{} landed as {content:?}, oracle says {expected:?}",
                    row.partition, row.offset
                )
            }
        }
    }
    let all: BTreeSet<(i32, i64)> = produced
        .iter()
        .flat_map(|(p, r)| (0..r.len() as i64).map(move |o| (*p, o)))
        .collect();
    let missing = ranges(all.iter().filter(|k| !seen.contains_key(k)).copied());
    assert!(
        missing.is_empty(),
        "records missing from the warehouse, as partition: offsets: {missing:?}"
    );
    assert_eq!(seen.len(), all.len(), "distinct (partition, offset) pairs");
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    if !allow_duplicates {
        assert_eq!(duplicates, 0, "duplicate warehouse rows");
    }
    assert!(
        hidden_files(root).is_empty(),
        "in-progress files left: {:?}",
        hidden_files(root)
    );
    duplicates
}

/// Generated records whose event times start at `start_ms` and advance `step_ms` per
/// send, so that a test spans several windows, hours or a midnight.
pub fn generate_spread(
    seed: u64,
    count: usize,
    max_ids: usize,
    start_ms: i64,
    step_ms: i64,
) -> Vec<Option<Vec<u8>>> {
    let config = anchorflow::generator::GeneratorConfig {
        seed,
        bad_per_mille: 40,
        max_ids,
        start_ms,
        step_ms,
        ..Default::default()
    };
    anchorflow::generator::Generator::new(config)
        .take(count)
        .map(|g| g.value)
        .collect()
}

/// `(window start, businessId, state)`.
pub type WindowKey = (i64, i64, i64);

/// `(events, receivers)` per window key.
pub type WindowCounts = BTreeMap<WindowKey, (i64, i64)>;

/// Start of the one-minute window (the default size) holding `ts`, computed by hand.
pub fn minute_of(ts: i64) -> i64 {
    ts - ts.rem_euclid(60_000)
}

/// Compares two maps and, when they differ, fails with only the differing entries
/// (a whole-map dump of thousands of keys hides the few that matter).
pub fn assert_same<K: Ord + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
    what: &str,
    actual: &BTreeMap<K, V>,
    expected: &BTreeMap<K, V>,
) {
    let mut differing: Vec<String> = Vec::new();
    for (key, want) in expected {
        match actual.get(key) {
            Some(got) if got == want => {}
            got => differing.push(format!("{key:?}: got {got:?}, expected {want:?}")),
        }
    }
    for (key, got) in actual {
        if !expected.contains_key(key) {
            differing.push(format!("{key:?}: got {got:?}, expected nothing"));
        }
    }
    assert!(
        differing.is_empty(),
        "{what}: {} of {} keys differ, first 20:\n{}",
        differing.len(),
        expected.len(),
        differing
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The oracle's window counts: `(events, receivers)` per tumbling window of
/// `window_ms` (aligned on the epoch), businessId and state, over every valid record
/// produced.
pub fn expected_windows(
    produced: &Produced,
    max_ids: usize,
    window_ms: i64,
) -> BTreeMap<WindowKey, (i64, i64)> {
    let mut out: BTreeMap<WindowKey, (i64, i64)> = BTreeMap::new();
    for records in produced.values() {
        for event in records.iter().filter_map(|r| oracle_parse(r, max_ids)) {
            let entry = out
                .entry((
                    event.log_timestamp - event.log_timestamp.rem_euclid(window_ms),
                    event.business_id,
                    event.state,
                ))
                .or_default();
            entry.0 += 1;
            entry.1 += event.ids.len() as i64;
        }
    }
    out
}

/// The window series hashes (`anchorflow:series:{B}`, field `{start}:{state}`) and
/// their TTLs, read in one transaction with the stored open windows of every partition.
pub struct SeriesSnapshot {
    pub series: BTreeMap<WindowKey, i64>,
    pub ttls: BTreeMap<String, i64>,
    /// Per partition, the decoded `series:{p}` and `dws:{p}` open-window states.
    pub windows: BTreeMap<String, String>,
}

pub fn read_series(url: &str, group: &str, topic: &str) -> SeriesSnapshot {
    let mut conn = connect(url);
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("anchorflow:series:*")
        .query(&mut conn)
        .unwrap();
    let windows_key = anchorflow_actors::protocol::keys::FenceKeys::new(group, topic).windows;
    let mut pipe = redis::pipe();
    pipe.atomic();
    for key in &keys {
        pipe.cmd("HGETALL").arg(key).cmd("PTTL").arg(key);
    }
    pipe.cmd("HGETALL").arg(&windows_key);
    let mut replies: Vec<redis::Value> = pipe.query(&mut conn).unwrap();
    let windows: BTreeMap<String, String> =
        redis::from_redis_value(replies.pop().unwrap()).unwrap();
    let mut out = SeriesSnapshot {
        series: BTreeMap::new(),
        ttls: BTreeMap::new(),
        windows,
    };
    for (key, pair) in keys.iter().zip(replies.chunks(2)) {
        let business_id: i64 = key["anchorflow:series:".len()..].parse().unwrap();
        let fields: BTreeMap<String, i64> = redis::from_redis_value(pair[0].clone()).unwrap();
        for (field, n) in fields {
            let (start, state) = field.split_once(':').expect("field {start}:{state}");
            out.series.insert(
                (start.parse().unwrap(), business_id, state.parse().unwrap()),
                n,
            );
        }
        out.ttls.insert(
            key.clone(),
            redis::from_redis_value(pair[1].clone()).unwrap(),
        );
    }
    out
}

/// Sums the open windows stored for one owner (`series` or `dws`) over partitions,
/// with each partition's closed-through watermark. Decoded by hand: lines
/// `c <ms|->`, `m <ms>` (ignored) and `w <start> <businessId> <state> <events> <receivers>`.
pub fn stored_open_windows(
    windows: &BTreeMap<String, String>,
    owner: &str,
) -> (WindowCounts, BTreeMap<i32, Option<i64>>) {
    let mut open: BTreeMap<WindowKey, (i64, i64)> = BTreeMap::new();
    let mut closed = BTreeMap::new();
    for (field, text) in windows {
        let Some(p) = field.strip_prefix(&format!("{owner}:")) else {
            continue;
        };
        let p: i32 = p.parse().unwrap();
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            match f[0] {
                "c" => {
                    let c = f[1].parse::<i64>().ok();
                    let entry = closed.entry(p).or_insert(c);
                    *entry = (*entry).max(c);
                }
                "m" => {}
                "w" => {
                    let n = |i: usize| f[i].parse::<i64>().unwrap();
                    let entry = open.entry((n(1), n(2), n(3))).or_default();
                    entry.0 += n(4);
                    entry.1 += n(5);
                }
                other => panic!("unexpected window state line {other:?}"),
            }
        }
    }
    (open, closed)
}

/// One `dws_template_state_1m` row.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DwsRow {
    pub key: WindowKey,
    pub window_end: i64,
    pub events: i64,
    pub receivers: i64,
    pub is_correction: bool,
    /// `dt=…` folder below the table.
    pub folder: String,
}

pub fn read_dws(root: &Path) -> Vec<DwsRow> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::TimestampMillisecondType;
    let mut out = Vec::new();
    for path in parquet_files(&root.join("dws_template_state_1m")) {
        let folder = path
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        for batch in batches(&path) {
            let ts = |name: &str| {
                batch
                    .column_by_name(name)
                    .unwrap()
                    .as_primitive::<TimestampMillisecondType>()
                    .clone()
            };
            let (starts, ends) = (ts("window_start"), ts("window_end"));
            for i in 0..batch.num_rows() {
                out.push(DwsRow {
                    key: (
                        starts.value(i),
                        col::<Int64Array>(&batch, "business_id").value(i),
                        col::<Int32Array>(&batch, "state").value(i) as i64,
                    ),
                    window_end: ends.value(i),
                    events: col::<Int64Array>(&batch, "events").value(i),
                    receivers: col::<Int64Array>(&batch, "receivers").value(i),
                    is_correction: col::<arrow_array::BooleanArray>(&batch, "is_correction")
                        .value(i),
                    folder: folder.clone(),
                });
            }
        }
    }
    out.sort();
    out
}

/// What [`check_windows`] expects of the `dws_template_state_1m` side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dws {
    /// Rows plus stored open windows equal the oracle.
    Complete,
    /// After `fences recover`, which cannot restore the dws windows open when Redis
    /// lost them: no key holds more than the oracle (nothing duplicated; shares of
    /// those windows missing).
    NoMoreThanOracle,
}

/// The window size the children ran with, and what to expect of the dws side.
#[derive(Clone, Copy, Debug)]
pub struct WindowRules {
    pub window_ms: i64,
    pub dws: Dws,
}

/// The shipped defaults: one-minute windows, every dws share present.
pub const MINUTE_WINDOWS: WindowRules = WindowRules {
    window_ms: 60_000,
    dws: Dws::Complete,
};

/// What the window outputs hold once every partition is fenced at its end.
pub struct WindowOutputs {
    pub series: SeriesSnapshot,
    pub dws: Vec<DwsRow>,
    /// Closed-through watermark per partition, per owner.
    pub series_closed: BTreeMap<i32, Option<i64>>,
    pub dws_closed: BTreeMap<i32, Option<i64>>,
}

/// Conservation of every event in the windowed outputs, whatever closed when: per
/// (window, businessId, state), the series hash plus the open series windows stored
/// in Redis equals the oracle's events, and the `dws_template_state_1m` rows plus the
/// stored open dws windows equal the oracle's events and receivers. A duplicate or a
/// loss anywhere breaks an equality. Also checks the series TTLs (30 days) and that
/// every dws row sits in the `dt=` folder of its window start in Asia/Shanghai.
pub fn check_windows(
    url: &str,
    root: &Path,
    group: &str,
    topic: &str,
    produced: &Produced,
    max_ids: usize,
    rules: WindowRules,
) -> WindowOutputs {
    let WindowRules {
        window_ms,
        dws: dws_expectation,
    } = rules;
    let expected = expected_windows(produced, max_ids, window_ms);
    let staged: Vec<String> = redis::cmd("SMEMBERS")
        .arg(anchorflow_actors::protocol::keys::FenceKeys::new(group, topic).staged)
        .query(&mut connect(url))
        .unwrap();
    assert_eq!(
        staged,
        Vec::<String>::new(),
        "series staged and never published"
    );
    let series = read_series(url, group, topic);
    let (open_series, series_closed) = stored_open_windows(&series.windows, "series");
    let (open_dws, dws_closed) = stored_open_windows(&series.windows, "dws");
    let mut from_series: BTreeMap<WindowKey, i64> = series.series.clone();
    for (key, (events, _)) in &open_series {
        *from_series.entry(*key).or_default() += events;
    }
    let expected_events: BTreeMap<WindowKey, i64> =
        expected.iter().map(|(k, (e, _))| (*k, *e)).collect();
    assert_same(
        "series hash + open series windows = the oracle's events",
        &from_series,
        &expected_events,
    );
    let dws = read_dws(root);
    let mut from_dws: BTreeMap<WindowKey, (i64, i64)> = open_dws;
    for row in &dws {
        let entry = from_dws.entry(row.key).or_default();
        entry.0 += row.events;
        entry.1 += row.receivers;
        assert_eq!(
            row.window_end,
            row.key.0 + window_ms,
            "window end of {row:?}"
        );
        let local = chrono::DateTime::from_timestamp_millis(row.key.0 + 8 * 3_600_000).unwrap();
        assert_eq!(
            row.folder,
            local.format("dt=%Y-%m-%d").to_string(),
            "{row:?}"
        );
    }
    if dws_expectation == Dws::Complete {
        assert_same(
            "dws rows + open dws windows = the oracle's events and receivers",
            &from_dws,
            &expected,
        );
    } else {
        for (key, (events, receivers)) in &from_dws {
            let (e, r) = expected.get(key).copied().unwrap_or_default();
            assert!(
                *events <= e && *receivers <= r,
                "dws of {key:?} holds ({events}, {receivers}), more than the oracle's ({e}, {r})"
            );
        }
    }
    for (key, ttl) in &series.ttls {
        assert!(
            (29 * 86_400_000..=30 * 86_400_000).contains(ttl),
            "ttl of {key} is {ttl} ms"
        );
    }
    WindowOutputs {
        series,
        dws,
        series_closed,
        dws_closed,
    }
}

/// Files published into a folder after its `_SUCCESS` marker was written: a folder
/// committed too early. A rename (or link) into place changes a file's ctime, so a
/// part file whose ctime is later than the marker's arrived after the commit.
pub fn published_after_success(root: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    let ctime = |path: &Path| {
        let meta = std::fs::metadata(path).unwrap();
        (meta.ctime(), meta.ctime_nsec())
    };
    let mut late = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        let marker = dir.join("_SUCCESS");
        let committed = marker.exists().then(|| ctime(&marker));
        for path in entries {
            if path.is_dir() {
                stack.push(path);
            } else if let Some(committed) = committed {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                if name.starts_with("part-") && ctime(&path) > committed {
                    late.push(path);
                }
            }
        }
    }
    late
}

/// Every `_SUCCESS` file below the warehouse root, as folders relative to it.
pub fn success_markers(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if entry.file_name() == "_SUCCESS" {
                let folder = path.parent().unwrap().strip_prefix(root).unwrap();
                out.insert(folder.to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// The value of one series in a Prometheus text exposition (`name{labels}`), if any.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
