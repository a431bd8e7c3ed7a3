//! Where a partition reader's output goes, and how it is handed on: every send waits
//! for room (`send().await`), so a slow downstream actor holds the reader back.

use std::sync::Arc;

use actix::prelude::*;

use crate::checkpoint::barrier::Barrier;
use crate::logic::decode::{DecodeLimits, TimeBounds};
use crate::logic::route::shard_of;
use crate::logic::window::WindowSpec;
use crate::messages::{DetailBatch, EventBatch, ShardInput, WarehouseInput, WatermarkUpdate};
use crate::metrics::Metrics;
use crate::protocol::fences::StoredWindows;
use crate::runtime::clock::Clock;
use crate::runtime::health::Health;
use crate::runtime::mailbox::Mailbox;

/// Where a reader sends its output. Every reader holds clones of the same links, so
/// each bound is shared by all the readers that send to one actor.
#[derive(Clone)]
pub struct ReaderOutputs {
    pub shards: Arc<[Mailbox<ShardInput>]>,
    pub warehouse: Mailbox<WarehouseInput>,
    /// Event-time reports (`try_send`: a dropped report is superseded by the next).
    pub timer: Mailbox<WatermarkUpdate>,
}

/// What every reader of this process shares: where output goes and how records are
/// read. Cheap to clone.
#[derive(Clone)]
pub struct ReaderContext {
    pub topic: Arc<str>,
    pub limits: DecodeLimits,
    pub bounds: TimeBounds,
    pub tz: chrono_tz::Tz,
    pub windows: WindowSpec,
    pub links: ReaderOutputs,
    pub metrics: Metrics,
    pub health: Health,
    /// Processing time, by Redis's clock.
    pub clock: Clock,
}

pub async fn forward_data(
    links: &ReaderOutputs,
    routed: Vec<EventBatch>,
    detail: DetailBatch,
) -> Result<(), MailboxError> {
    for (shard, events) in routed.into_iter().enumerate() {
        if !events.events.is_empty() {
            links.shards[shard].send(ShardInput::Events(events)).await?;
        }
    }
    if !detail.parts.is_empty() {
        links.warehouse.send(WarehouseInput::Rows(detail)).await?;
    }
    Ok(())
}

/// Hands a claimed partition's stored open windows to their owners (every shard gets
/// its part, possibly empty, which also drops whatever it held from an earlier claim).
pub async fn forward_restore(
    links: &ReaderOutputs,
    partition: i32,
    stored: StoredWindows,
) -> Result<(), MailboxError> {
    let shards = links.shards.len();
    for (index, shard) in links.shards.iter().enumerate() {
        let mut windows = stored.series.clone();
        windows.retain(|business_id| shard_of(business_id, shards) == index);
        let unit_fences = stored.unit_fences.clone();
        shard
            .send(ShardInput::Restore {
                partition,
                windows,
                unit_fences,
            })
            .await?;
    }
    links
        .warehouse
        .send(WarehouseInput::Restore {
            partition,
            windows: stored.dws,
        })
        .await
}

pub async fn forward_barrier(links: &ReaderOutputs, barrier: Barrier) -> Result<(), MailboxError> {
    for shard in links.shards.iter() {
        shard.send(ShardInput::Barrier(barrier.clone())).await?;
    }
    links.warehouse.send(WarehouseInput::Barrier(barrier)).await
}
