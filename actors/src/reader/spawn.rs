//! How readers are started: one supervised `PartitionReader` per claimed partition,
//! spread over the reader threads in turn. The pipeline's wiring builds the
//! [`ReaderSpawner`] and hands it to the source, which asks for a reader each time it
//! claims a partition (`source/flow.rs`).

use std::sync::Arc;

use actix::prelude::*;

use crate::checkpoint::claim::Claim;
use crate::protocol::fences::StoredWindows;
use crate::reader::links::ReaderContext;
use crate::reader::partition_reader::{PartitionReader, READER_MAILBOX};
use crate::runtime::mailbox::Mailbox;
use crate::source::flow::{StartReader, StartedReader};

pub struct ReaderSpawner {
    context: ReaderContext,
    /// The reader threads; partitions go to them in turn.
    arbiters: Arc<[ArbiterHandle]>,
    next: usize,
}

impl ReaderSpawner {
    pub fn new(context: ReaderContext, threads: usize) -> Self {
        ReaderSpawner {
            context,
            arbiters: (0..threads.max(1))
                .map(|_| Arbiter::new().handle())
                .collect(),
            next: 0,
        }
    }
}

impl StartReader for ReaderSpawner {
    fn start(&mut self, partition: i32, claim: Claim, windows: StoredWindows) -> StartedReader {
        let arbiter = self.arbiters[self.next % self.arbiters.len()].clone();
        self.next += 1;
        let context = self.context.clone();
        let reader = Supervisor::start_in_arbiter(&arbiter, move |_| {
            PartitionReader::new(context, partition, claim, windows)
        });
        let mailbox = Mailbox::new(
            reader,
            READER_MAILBOX,
            self.context.metrics.mailbox("partition_reader"),
        );
        StartedReader {
            busy: Box::new(mailbox.busy_probe(READER_MAILBOX)),
            mailbox,
            arbiter,
        }
    }
}
