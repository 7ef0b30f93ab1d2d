//! The forwarder's queue: spooled events waiting to be sent, in sequence order, kept in the runs
//! the writer handed over (one publish's events each). A run goes to the backend as it is, so
//! an event is not copied from one buffer into the next on its way; only runs of a few events
//! (single publishes) are gathered into one batch.

use std::collections::VecDeque;

use crate::spooled::Forward;

/// A front run at least this long is sent on its own, without gathering the next ones.
const GATHER_BELOW: usize = 256;

/// Runs of spooled events, in order, none empty.
#[derive(Default)]
pub(crate) struct Queue {
    runs: VecDeque<Vec<Forward>>,
    /// Events in all runs.
    len: usize,
}

impl Queue {
    /// Events waiting.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first event waiting.
    pub(crate) fn front(&self) -> Option<&Forward> {
        self.runs.front().and_then(|r| r.first())
    }

    /// Appends a run (after everything waiting).
    pub(crate) fn push_back(&mut self, run: Vec<Forward>) {
        if !run.is_empty() {
            self.len += run.len();
            self.runs.push_back(run);
        }
    }

    /// Puts a run before everything waiting.
    pub(crate) fn push_front(&mut self, run: Vec<Forward>) {
        if !run.is_empty() {
            self.len += run.len();
            self.runs.push_front(run);
        }
    }

    /// Puts `other`'s runs before everything waiting, in their order.
    pub(crate) fn prepend(&mut self, mut other: Queue) {
        other.runs.append(&mut self.runs);
        other.len += self.len;
        *self = other;
    }

    /// The events waiting, in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Forward> {
        self.runs.iter().flatten()
    }

    /// The events waiting, in order, to fill in their bodies.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Forward> {
        self.runs.iter_mut().flatten()
    }

    /// How many of the first `max` events to send in one batch: at most `fits` of them (those
    /// the caller can send together), and only the front run when it is long enough to go on
    /// its own.
    pub(crate) fn batch_len(&self, max: usize, fits: usize) -> usize {
        let front = self.runs.front().map_or(0, Vec::len);
        let n = fits.min(max);
        if front >= GATHER_BELOW { n.min(front) } else { n }
    }

    /// Takes the first `n` events out: a whole run without copying it.
    pub(crate) fn take(&mut self, n: usize) -> Vec<Forward> {
        let n = n.min(self.len);
        let Some(mut batch) = self.runs.pop_front() else { return Vec::new() };
        if batch.len() > n {
            let rest = batch.split_off(n);
            self.runs.push_front(rest);
        }
        while batch.len() < n {
            let Some(mut run) = self.runs.pop_front() else { break };
            let want = n - batch.len();
            if run.len() > want {
                let rest = run.split_off(want);
                self.runs.push_front(rest);
            }
            batch.append(&mut run);
        }
        self.len -= batch.len();
        batch
    }

    /// Takes every event out, in order.
    pub(crate) fn take_all(&mut self) -> impl Iterator<Item = Forward> + use<> {
        self.len = 0;
        std::mem::take(&mut self.runs).into_iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seqs: std::ops::Range<u64>) -> Vec<Forward> {
        seqs.map(|seq| Forward { seq, body: None, settle: None }).collect()
    }

    fn seqs(batch: &[Forward]) -> Vec<u64> {
        batch.iter().map(|f| f.seq).collect()
    }

    #[test]
    fn runs_go_out_whole_or_in_parts_in_order() {
        let mut q = Queue::default();
        q.push_back(run(0..300));
        q.push_back(run(300..310));
        q.push_back(run(310..320));
        assert_eq!((q.len(), q.front().map(|f| f.seq)), (320, Some(0)));
        assert_eq!(q.batch_len(2048, 320), 300, "a long front run goes on its own");
        assert_eq!(q.batch_len(100, 320), 100);
        assert_eq!(seqs(&q.take(100)), (0..100).collect::<Vec<_>>());
        assert_eq!(seqs(&q.take(200)), (100..300).collect::<Vec<_>>());
        assert_eq!(q.batch_len(2048, 20), 20, "short runs are gathered");
        assert_eq!(seqs(&q.take(15)), (300..315).collect::<Vec<_>>());
        q.push_front(run(299..300));
        assert_eq!(q.iter().map(|f| f.seq).collect::<Vec<_>>(), (299..300).chain(315..320).collect::<Vec<_>>());
        let mut front = Queue::default();
        front.push_back(run(290..299));
        q.prepend(front);
        assert_eq!(q.len(), 15);
        assert_eq!(q.take_all().map(|f| f.seq).collect::<Vec<_>>(), (290..300).chain(315..320).collect::<Vec<_>>());
        assert!(q.is_empty() && q.front().is_none());
    }

}
