//! Offsets a fetch jumped over, and the search that tells a broker which skipped
//! records from offsets that hold none.
//!
//! A fetch at offset *x* must return the records from *x* on: Kafka answers with the
//! whole batch that holds *x* and the client drops what lies before it. A broker that
//! answers with the batches *after* the one holding *x* (tansu 0.6.0 does), or with
//! nothing when that batch is the partition's last, makes the client deliver a later
//! offset, or nothing at all, although the records are in the log. Every read that
//! resumes at an offset of anchorflow's choosing can start inside a batch: a claim at
//! the fences, a resume after a pause, a seek. Taking the jump as the log's own gap
//! (compaction, transaction markers) moved the fences over records that were never
//! read, in both sinks at once; and a partition whose last batch was never delivered
//! stopped short of its end for good, with no error.
//!
//! So a jump is not believed at once. The source reads again from further back, by a
//! first step, then twice as far, four times, and so on ([`GapSearch`]), skipping
//! what it already had,
//! until the record it expects arrives (the broker had skipped it: nothing is lost) or
//! the search reaches the log's start with the jump still there: then the offsets hold
//! no records (compaction, aborted transactions, transaction markers) and reading goes
//! on past them, counted and logged. A partition that gets nothing at all while the
//! broker says it has records for it is searched the same way. The first step is the
//! jump's own length (the batch that holds the expected record ends where the jump
//! lands, and batches of one producer are of a size), or the step that found the
//! records the last time, so most searches read once or twice.
//!
//! With `source.verify_offset_gaps = false` (a compacted or transactional topic, whose
//! gaps are many and real) a jump inside the log is taken at once, still counted.

use std::ops::Range;

/// Longest step back a search takes: a jump still there after re-reading this many
/// records before the expected one is taken as the log's own.
pub const MAX_STEP_BACK: i64 = 1 << 20;

/// The search for one partition's jump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GapSearch {
    /// The offset the partition is due to deliver next.
    pub expected: i64,
    /// The log's first offset, when the search began.
    log_start: i64,
    /// How far back the last read started (0 before the first).
    step: i64,
    /// How far back the first read starts.
    first_step: i64,
}

/// What to do next about a jump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Read again from this offset: the records before `expected` are skipped, being
    /// had already.
    ReadFrom(i64),
    /// Every read from further back jumped the same way, down to the log's start (or
    /// [`MAX_STEP_BACK`]): these offsets hold no records.
    NotInLog(Range<i64>),
}

impl GapSearch {
    /// A search for the record at `expected`, whose first read starts `first_step`
    /// before it (at least one).
    pub fn new(expected: i64, log_start: i64, first_step: i64) -> Self {
        GapSearch {
            expected,
            log_start,
            step: 0,
            first_step: first_step.clamp(1, MAX_STEP_BACK),
        }
    }

    /// The first step for a jump from `expected` to `delivered` (`None`: nothing
    /// came) when the last search found its records `hint` back.
    pub fn first_step_for(expected: i64, delivered: Option<i64>, hint: i64) -> i64 {
        let jump = delivered.map_or(1, |d| (d - expected).max(1));
        jump.max(hint).min(MAX_STEP_BACK)
    }

    /// The log's first offset, as the search began.
    pub fn log_start(&self) -> i64 {
        self.log_start
    }

    /// How far back the last read started.
    pub fn step(&self) -> i64 {
        self.step
    }

    /// The read jumped again: to `delivered`, or delivered nothing (`None`). Returns
    /// where to read next, or that the offsets up to `delivered` are not in the log.
    pub fn jumped(&mut self, delivered: Option<i64>) -> Next {
        let last_from = self.expected - self.step;
        if self.step > 0 && (last_from <= self.log_start || self.step >= MAX_STEP_BACK) {
            let end = delivered.unwrap_or(self.expected);
            return Next::NotInLog(self.expected..end);
        }
        self.step = if self.step == 0 {
            self.first_step
        } else {
            (self.step * 2).min(MAX_STEP_BACK)
        };
        Next::ReadFrom(self.reading_from())
    }

    /// Where the last read of the search started (the expected offset before the
    /// first).
    pub fn reading_from(&self) -> i64 {
        (self.expected - self.step).max(self.log_start).max(0)
    }

    /// How many reads the search has made so far.
    pub fn reads(&self) -> u32 {
        if self.step == 0 {
            0
        } else {
            (self.step / self.first_step).max(1).ilog2() + 1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A broker that answers a read starting inside a batch with the next batch: the
    /// search steps back until a read starts at or before the batch's first offset.
    #[test]
    fn a_search_steps_back_until_the_batch_that_holds_the_expected_record() {
        // Batches of ten from offset 0; the fences say 25 (inside batch 20..30).
        let batch_start = |from: i64| (from + 9) / 10 * 10;
        let mut search = GapSearch::new(25, 0, 1);
        let mut reads = Vec::new();
        let mut from = 25;
        while batch_start(from) > 25 {
            match search.jumped(Some(batch_start(from))) {
                Next::ReadFrom(next) => {
                    reads.push(next);
                    from = next;
                }
                Next::NotInLog(range) => panic!("gave up at {range:?}"),
            }
        }
        assert_eq!(reads, [24, 23, 21, 17], "one, two, four, eight back");
        assert_eq!(batch_start(17), 20, "the read from 17 gets batch 20..30");
        assert_eq!(search.reads(), 4);
    }

    /// Offsets that hold no records jump the same way however far back the read
    /// starts: once a read from the log's start jumped too, they are the log's own.
    #[test]
    fn a_jump_that_stays_down_to_the_log_start_is_not_in_the_log() {
        let mut search = GapSearch::new(10, 4, 1);
        let mut next = Vec::new();
        loop {
            match search.jumped(Some(15)) {
                Next::ReadFrom(from) => next.push(from),
                Next::NotInLog(range) => {
                    assert_eq!(range, 10..15);
                    break;
                }
            }
        }
        assert_eq!(
            next,
            [9, 8, 6, 4],
            "clamped at the log start, then given up"
        );
    }

    /// A partition that gets nothing is searched the same way; a search at the log's
    /// start that still gets nothing names no range past the expected offset.
    #[test]
    fn a_partition_that_gets_nothing_is_searched_down_to_the_log_start() {
        let mut search = GapSearch::new(3, 0, 1);
        assert_eq!(search.jumped(None), Next::ReadFrom(2));
        assert_eq!(search.jumped(None), Next::ReadFrom(1));
        assert_eq!(search.jumped(None), Next::ReadFrom(0));
        assert_eq!(search.jumped(None), Next::NotInLog(3..3));
    }

    /// The jump's own length is the first step: a batch of ten that holds the
    /// expected record ends where the jump lands, so one read from ten back gets it.
    #[test]
    fn the_first_step_is_the_jump_or_the_last_searchs() {
        assert_eq!(GapSearch::first_step_for(25, Some(30), 1), 5);
        assert_eq!(GapSearch::first_step_for(25, Some(30), 16), 16, "the hint");
        assert_eq!(GapSearch::first_step_for(25, None, 1), 1);
        let mut search = GapSearch::new(25, 0, GapSearch::first_step_for(25, Some(30), 1));
        assert_eq!(search.jumped(Some(30)), Next::ReadFrom(20));
        assert_eq!((search.step(), search.reads()), (5, 1));
        assert_eq!(search.jumped(Some(30)), Next::ReadFrom(15));
        assert_eq!(search.reads(), 2);
    }

    #[test]
    fn a_search_gives_up_after_its_longest_step() {
        let mut search = GapSearch::new(10 * MAX_STEP_BACK, 0, 1);
        let mut steps = 0;
        while let Next::ReadFrom(_) = search.jumped(Some(10 * MAX_STEP_BACK + 1)) {
            steps += 1;
        }
        assert_eq!(steps, MAX_STEP_BACK.trailing_zeros() + 1);
    }
}
