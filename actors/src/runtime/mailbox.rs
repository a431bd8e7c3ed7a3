//! [`Mailbox`]: how one actor reaches another on the data path, with the receiver's
//! capacity enforced by a semaphore that every sender shares.
//!
//! Why not actix's own bound: actix counts a mailbox's messages, and a sender that finds
//! it full is *parked*: its message is queued anyway, and its next `send` returns
//! `Pending` without registering a waker, to be woken when the receiver happens to pop a
//! message for it. Senders that share one `Addr` (every reader sending to one shard)
//! share one parked state, and a parked `send` whose task nothing else wakes never
//! completes: after a long Redis stall the readers' drainers hung forever with their
//! partitions paused. A tokio [`Semaphore`] wakes waiters in order and never loses a
//! wakeup, so capacity is counted here, and the actor's actix mailbox is made larger
//! than any count a `Mailbox` allows ([`actix_capacity`]), so actix never parks.
//!
//! A message holds its unit of room until the receiving handler has finished with it
//! (for an `AtomicResponse`, until its future completes), so the capacity bounds
//! "queued or being handled".

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::dev::ToEnvelope;
use actix::prelude::*;
use tokio::sync::Semaphore;

use crate::metrics::MailboxMeter;

/// The actix mailbox capacity an actor behind a [`Mailbox`] of `capacity` sets: larger
/// than anything the semaphore lets through, with room for its control messages.
pub const fn actix_capacity(capacity: usize) -> usize {
    capacity * 2 + 16
}

/// Waits shorter than this are a handoff, not backpressure, and are not metered.
const BLOCKED_THRESHOLD: Duration = Duration::from_micros(200);

/// A bounded link to one actor for messages of type `M`; clones share the bound.
pub struct Mailbox<M>
where
    M: Message + Send,
    M::Result: Send,
{
    recipient: Recipient<M>,
    room: Arc<Semaphore>,
    meter: MailboxMeter,
}

impl<M> Clone for Mailbox<M>
where
    M: Message + Send,
    M::Result: Send,
{
    fn clone(&self) -> Self {
        Mailbox {
            recipient: self.recipient.clone(),
            room: self.room.clone(),
            meter: self.meter.clone(),
        }
    }
}

impl<M> Mailbox<M>
where
    M: Message + Send + 'static,
    M::Result: Send,
{
    /// A link to `addr`, whose actix mailbox capacity must be at least
    /// [`actix_capacity`]`(capacity)`.
    pub fn new<A>(addr: Addr<A>, capacity: usize, meter: MailboxMeter) -> Self
    where
        A: Actor + Handler<M>,
        A::Context: ToEnvelope<A, M>,
    {
        Self::for_recipient(addr.recipient(), capacity, meter)
    }

    pub fn for_recipient(recipient: Recipient<M>, capacity: usize, meter: MailboxMeter) -> Self {
        Mailbox {
            recipient,
            room: Arc::new(Semaphore::new(capacity.max(1))),
            meter,
        }
    }

    /// Waits for room (the wait is metered as backpressure), delivers `msg`, and waits
    /// until the receiver has handled it. Fails only when the receiver is gone.
    pub async fn send(&self, msg: M) -> Result<M::Result, MailboxError> {
        let started = Instant::now();
        let permit = self
            .room
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| MailboxError::Closed)?;
        let waited = started.elapsed();
        if waited > BLOCKED_THRESHOLD {
            self.meter.blocked_for(waited);
        }
        self.meter.sent();
        let result = self.recipient.send(msg).await;
        self.meter.received();
        drop(permit);
        result
    }

    /// Delivers `msg` if there is room now and returns at once; the room is given back
    /// when the receiver has handled it, by a task on the current arbiter. Returns the
    /// message when there is no room.
    pub fn try_send(&self, msg: M) -> Result<(), M> {
        self.try_send_on(msg, &actix::Arbiter::current())
    }

    /// [`Mailbox::try_send`] for a caller whose own thread may block (the Kafka source
    /// waits inside librdkafka's callbacks): the task that gives the room back runs on
    /// `arbiter`, which must not be the caller's.
    pub fn try_send_on(&self, msg: M, arbiter: &ArbiterHandle) -> Result<(), M> {
        let Ok(permit) = self.room.clone().try_acquire_owned() else {
            return Err(msg);
        };
        self.meter.sent();
        let request = self.recipient.send(msg);
        let meter = self.meter.clone();
        arbiter.spawn(async move {
            let _ = request.await;
            meter.received();
            drop(permit);
        });
        Ok(())
    }

    /// Whether the receiving actor is still running.
    pub fn connected(&self) -> bool {
        self.recipient.connected()
    }

    /// Room left right now (for tests and diagnostics).
    pub fn room(&self) -> usize {
        self.room.available_permits()
    }

    /// Whether any message sent through this link is not finished yet; answered by a
    /// closure that can live elsewhere (see `held.rs`).
    pub fn busy_probe(&self, capacity: usize) -> impl Fn() -> bool + Send + 'static {
        let room = self.room.clone();
        move || room.available_permits() < capacity.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Handles a message only once its gate opens, and counts what it handled.
    struct Slow {
        handled: Arc<AtomicUsize>,
        gate: Arc<tokio::sync::Notify>,
    }
    impl Actor for Slow {
        type Context = Context<Self>;
        fn started(&mut self, ctx: &mut Self::Context) {
            ctx.set_mailbox_capacity(actix_capacity(2));
        }
    }
    #[derive(Message)]
    #[rtype(result = "()")]
    struct Item;
    impl Handler<Item> for Slow {
        type Result = AtomicResponse<Self, ()>;
        fn handle(&mut self, _: Item, _: &mut Self::Context) -> Self::Result {
            let (handled, gate) = (self.handled.clone(), self.gate.clone());
            AtomicResponse::new(Box::pin(
                async move {
                    gate.notified().await;
                    handled.fetch_add(1, Ordering::SeqCst);
                }
                .into_actor(self),
            ))
        }
    }

    /// Many senders sharing one bounded link to a blocked actor: they all wait, none
    /// is lost, and every one completes once the actor moves again. (Through actix's
    /// own bound, senders sharing an `Addr` were parked and some never woke.)
    #[actix::test]
    async fn shared_senders_all_complete_after_a_stall() {
        let handled = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let addr = Slow {
            handled: handled.clone(),
            gate: gate.clone(),
        }
        .start();
        let mailbox = Mailbox::new(addr, 2, crate::metrics::Metrics::new().mailbox("slow"));
        let senders: Vec<_> = (0..8)
            .map(|_| {
                let mailbox = mailbox.clone();
                actix::spawn(async move {
                    for _ in 0..5 {
                        mailbox.send(Item).await.unwrap();
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            mailbox.room(),
            0,
            "the bound holds while the actor is stuck"
        );
        assert!(mailbox.try_send(Item).is_err(), "no room for a try");
        // Release the actor one message at a time until everything went through.
        while handled.load(Ordering::SeqCst) < 40 {
            gate.notify_one();
            tokio::task::yield_now().await;
        }
        for sender in senders {
            sender.await.unwrap();
        }
        assert_eq!(mailbox.room(), 2);
    }
}
