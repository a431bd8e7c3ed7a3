//! The straight-line reference job the headline is compared with: what a careful
//! engineer writes without a framework. One thread reads every partition, decodes each
//! record, collects austin's writes for one second (values per list key, counts per
//! (template, state)), then sends them as one plain Lua script (`reference.lua`) or one
//! `MULTI`/`EXEC`, writes the second's rows to one Parquet writer, and commits the
//! offsets: at-least-once, no fences, no windows, no dead-letter table, no actors.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anchorflow_actors::config::Config;
use anchorflow_actors::logic::decode::{decode, TraceValue};
use anchorflow_actors::logic::tables::{end_of_day_ms, ods_schema, OdsRows};
use anchorflow_actors::protocol::keys::KeyLayout;
use anchorflow_actors::runtime::clock::wall_ms;
use anyhow::{bail, Context as _};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

/// How often the reference job writes what it collected.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// What one second of input turns into.
#[derive(Default)]
struct Pending {
    lists: HashMap<String, Vec<String>>,
    counts: HashMap<(i64, i32), i64>,
    rows: OdsRows,
    records: usize,
    offsets: HashMap<i32, i64>,
}

/// How the reference job sends a second's writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writes {
    /// One plain script (what anchorflow's commit is compared with, Redis CPU per event).
    Script,
    /// One `MULTI`/`EXEC` of plain commands.
    Multi,
    /// The same commands as `Multi`, pipelined without `MULTI`, and sent once, for the
    /// whole input: every key is written once, the least work Redis can be given for
    /// this input (`redis_floor_cpu_us_per_event`).
    Floor,
}

/// Where the reference job writes.
pub struct Target<'a> {
    pub writes: Writes,
    pub brokers: &'a str,
    pub topic: &'a str,
    pub partitions: i32,
    pub redis_url: &'a str,
    pub warehouse: &'a Path,
}

/// Runs the reference job over `expected` records; returns its committed records per
/// second (first record read until the last second's writes returned).
pub fn run(config: &Config, target: &Target, expected: usize) -> anyhow::Result<f64> {
    let group = format!("bench-reference-{}", std::process::id());
    let consumer =
        super::broker::assigned_consumer(target.brokers, target.topic, target.partitions, &group)?;
    let mut conn = redis::Client::open(target.redis_url)?.get_connection()?;
    let file = std::fs::File::create(target.warehouse.join("reference.parquet"))?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut writer = ArrowWriter::try_new(file, ods_schema(), Some(properties))?;
    let keys = KeyLayout::new(&config.redis);
    let tz: chrono_tz::Tz = config.time.timezone.parse().unwrap_or(chrono_tz::UTC);
    let (mut pending, mut committed) = (Pending::default(), 0usize);
    let mut started: Option<Instant> = None;
    let mut last_flush = Instant::now();
    let flush_every = match target.writes {
        Writes::Floor => Duration::MAX,
        Writes::Script | Writes::Multi => FLUSH_EVERY,
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    while committed < expected {
        if Instant::now() > deadline {
            bail!("the reference job committed only {committed} of {expected} records");
        }
        if let Some(message) = consumer.poll(Duration::from_millis(50)) {
            let message = message?;
            started.get_or_insert_with(Instant::now);
            pending.records += 1;
            pending
                .offsets
                .insert(message.partition(), message.offset() + 1);
            if let Ok(event) = decode(message.payload(), &config.decode) {
                let value = TraceValue {
                    state: event.state,
                    business_id: event.business_id,
                    timestamp: event.log_timestamp,
                }
                .to_json();
                for id in &event.ids {
                    let list = pending.lists.entry(keys.receiver(id)).or_default();
                    list.push(value.clone());
                }
                if let Some(id) = &event.message_id {
                    let list = pending.lists.entry(keys.message(id)).or_default();
                    list.push(value);
                }
                *pending
                    .counts
                    .entry((event.business_id, event.state))
                    .or_default() += event.ids.len() as i64;
                let (topic, partition) = (target.topic, message.partition());
                pending
                    .rows
                    .append(&event, topic, partition, message.offset(), wall_ms());
            }
        }
        let due = last_flush.elapsed() >= flush_every || committed + pending.records >= expected;
        if due && pending.records > 0 {
            let receiver_ttl = ((end_of_day_ms(tz, chrono::Utc::now()) - wall_ms()) / 1000).max(1);
            let ttls = (
                receiver_ttl,
                config.redis.message_ttl_secs,
                config.redis.template_ttl_secs,
            );
            let batch = std::mem::take(&mut pending);
            let out = (&mut conn, &mut writer, &consumer);
            committed += flush(batch, &keys, ttls, target, out)?;
            last_flush = Instant::now();
        }
    }
    writer.close()?;
    let took = started.map_or(Duration::ZERO, |s| s.elapsed());
    Ok(committed as f64 / took.as_secs_f64())
}

type Outputs<'a> = (
    &'a mut redis::Connection,
    &'a mut ArrowWriter<std::fs::File>,
    &'a BaseConsumer,
);

/// Sends a batch's Redis writes as plain commands, in one `MULTI`/`EXEC` if `atomic`.
fn send_commands(
    batch: &Pending,
    keys: &KeyLayout,
    (receiver_ttl, message_ttl, template_ttl): (i64, u64, u64),
    conn: &mut redis::Connection,
    atomic: bool,
) -> anyhow::Result<()> {
    let mut pipe = redis::pipe();
    if atomic {
        pipe.atomic();
    }
    for (key, values) in &batch.lists {
        let ttl = if key.starts_with(&keys.message_prefix) {
            message_ttl as i64
        } else {
            receiver_ttl
        };
        pipe.cmd("LPUSH").arg(key).arg(values).ignore();
        pipe.cmd("EXPIRE").arg(key).arg(ttl).ignore();
    }
    for ((business_id, state), count) in &batch.counts {
        let key = keys.template(*business_id);
        pipe.cmd("HINCRBY").arg(&key).arg(state).arg(count).ignore();
        pipe.cmd("EXPIRE").arg(&key).arg(template_ttl).ignore();
    }
    pipe.query::<()>(conn)
        .context("the reference job's commands")
}

/// Sends a second's Redis writes as one call of `reference.lua`.
fn send_script(
    batch: &Pending,
    keys: &KeyLayout,
    (receiver_ttl, message_ttl, template_ttl): (i64, u64, u64),
    conn: &mut redis::Connection,
) -> anyhow::Result<()> {
    let script = redis::Script::new(include_str!("reference.lua"));
    let mut call = script.prepare_invoke();
    call.arg(batch.lists.len());
    for (key, values) in &batch.lists {
        let ttl = if key.starts_with(&keys.message_prefix) {
            message_ttl as i64
        } else {
            receiver_ttl
        };
        call.arg(key).arg(ttl).arg(values.len()).arg(values);
    }
    let mut hashes: HashMap<i64, Vec<(i32, i64)>> = HashMap::new();
    for ((business_id, state), count) in &batch.counts {
        hashes
            .entry(*business_id)
            .or_default()
            .push((*state, *count));
    }
    call.arg(hashes.len());
    for (business_id, fields) in &hashes {
        call.arg(keys.template(*business_id))
            .arg(template_ttl)
            .arg(fields.len());
        for (state, count) in fields {
            call.arg(state).arg(count);
        }
    }
    call.invoke::<i64>(conn)
        .context("the reference job's script")?;
    Ok(())
}

/// Writes one second's worth; returns its records.
fn flush(
    mut batch: Pending,
    keys: &KeyLayout,
    ttls: (i64, u64, u64),
    target: &Target,
    (conn, writer, consumer): Outputs,
) -> anyhow::Result<usize> {
    match target.writes {
        Writes::Script => send_script(&batch, keys, ttls, conn)?,
        Writes::Multi => send_commands(&batch, keys, ttls, conn, true)?,
        Writes::Floor => send_commands(&batch, keys, ttls, conn, false)?,
    }
    let topic = target.topic;
    writer.write(&batch.rows.finish())?;
    writer.flush()?;
    let mut tpl = TopicPartitionList::new();
    for (partition, next) in &batch.offsets {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*next))?;
    }
    consumer.commit(&tpl, CommitMode::Sync)?;
    Ok(batch.records)
}
