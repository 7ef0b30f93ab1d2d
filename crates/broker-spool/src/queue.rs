//! The forwarder's queue: spooled events waiting to be sent, in sequence order, kept in the runs
//! the writer handed over (one publish's events each). A run goes to the backend as it is, so
//! an event is not copied from one buffer into the next on its way; only runs of a few events
//! (single publishes) are gathered into one batch. A run taken a few events at a time (a backend
//! that takes one event per publish) gives them from its front: each event is moved once.

use std::collections::VecDeque;

use crate::spooled::Forward;

/// A front run at least this long is sent on its own, without gathering the next ones.
const GATHER_BELOW: usize = 256;

/// Runs of spooled events, in order, none empty.
#[derive(Default)]
pub(crate) struct Queue {
    runs: VecDeque<VecDeque<Forward>>,
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
        self.runs.front().and_then(|r| r.front())
    }

    /// Appends a run (after everything waiting).
    pub(crate) fn push_back(&mut self, run: Vec<Forward>) {
        if !run.is_empty() {
            self.len += run.len();
            self.runs.push_back(VecDeque::from(run));
        }
    }

    /// Puts a run before everything waiting.
    pub(crate) fn push_front(&mut self, run: Vec<Forward>) {
        if !run.is_empty() {
            self.len += run.len();
            self.runs.push_front(VecDeque::from(run));
        }
    }

    /// The events waiting, in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Forward> {
        self.runs.iter().flatten()
    }

    /// The events waiting, in order, to fill in their bodies.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut Forward> {
        self.runs.iter_mut().flatten()
    }

    /// How many of the first `max` events to send in one batch: those from the front on that
    /// `together` says can go with the first, and only from the front run when it is long
    /// enough to go on its own.
    pub(crate) fn batch_len(&self, max: usize, together: impl Fn(&Forward) -> bool) -> usize {
        match self.runs.front() {
            Some(run) if run.len() >= GATHER_BELOW => run.iter().take(max).take_while(|f| together(f)).count(),
            _ => self.iter().take(max).take_while(|f| together(f)).count(),
        }
    }

    /// Takes the first `n` events out: a whole run without copying it, part of one from its
    /// front (the events taken are moved, the rest stay where they are).
    pub(crate) fn take(&mut self, n: usize) -> Vec<Forward> {
        let n = n.min(self.len);
        let mut batch: Vec<Forward> = match self.runs.front_mut() {
            None => return Vec::new(),
            Some(run) if run.len() <= n => self.runs.pop_front().map(Vec::from).unwrap_or_default(),
            Some(run) => run.drain(..n).collect(),
        };
        while batch.len() < n {
            let Some(run) = self.runs.front_mut() else { break };
            let want = n - batch.len();
            if run.len() > want {
                batch.extend(run.drain(..want));
            } else {
                batch.extend(run.drain(..));
                self.runs.pop_front();
            }
        }
        self.len -= batch.len();
        batch
    }

    /// Takes out the events with these sequences (`seqs` sorted); the others keep their order.
    pub(crate) fn remove(&mut self, seqs: &[u64]) -> Vec<Forward> {
        let mut removed = Vec::new();
        for run in self.runs.iter_mut() {
            let (Some(first), Some(last)) = (run.front().map(|f| f.seq), run.back().map(|f| f.seq)) else { continue };
            // A run is in sequence order: one with none of them in its range is left as it is.
            if seqs.get(seqs.partition_point(|s| *s < first)).is_none_or(|s| *s > last) {
                continue;
            }
            let mut kept = VecDeque::with_capacity(run.len());
            for f in run.drain(..) {
                if seqs.binary_search(&f.seq).is_ok() { removed.push(f) } else { kept.push_back(f) }
            }
            *run = kept;
        }
        self.runs.retain(|r| !r.is_empty());
        self.len -= removed.len();
        removed
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
        assert_eq!(q.batch_len(2048, |_| true), 300, "a long front run goes on its own");
        assert_eq!(q.batch_len(100, |_| true), 100);
        assert_eq!(q.batch_len(2048, |f| f.seq < 42), 42, "up to the first that cannot go along");
        assert_eq!(seqs(&q.take(100)), (0..100).collect::<Vec<_>>());
        assert_eq!(seqs(&q.take(200)), (100..300).collect::<Vec<_>>());
        assert_eq!(q.batch_len(2048, |_| true), 20, "short runs are gathered");
        assert_eq!(seqs(&q.take(15)), (300..315).collect::<Vec<_>>());
        q.push_front(run(299..300));
        assert_eq!(q.iter().map(|f| f.seq).collect::<Vec<_>>(), (299..300).chain(315..320).collect::<Vec<_>>());
        q.push_front(run(290..299));
        assert_eq!(q.len(), 15);
        assert_eq!(q.take_all().map(|f| f.seq).collect::<Vec<_>>(), (290..300).chain(315..320).collect::<Vec<_>>());
        assert!(q.is_empty() && q.front().is_none());
    }

    #[test]
    fn a_long_run_taken_one_at_a_time_and_removals_keep_the_order() {
        let mut q = Queue::default();
        q.push_back(run(0..10_000));
        q.push_back(run(10_000..10_003));
        for seq in 0..5_000 {
            assert_eq!(seqs(&q.take(1)), vec![seq]);
        }
        assert_eq!(q.len(), 5_003);
        let removed = q.remove(&[5_000, 7_000, 10_001, 20_000]);
        assert_eq!(seqs(&removed), vec![5_000, 7_000, 10_001]);
        assert_eq!(q.len(), 5_000);
        let rest: Vec<u64> = q.take(6_000).iter().map(|f| f.seq).collect();
        let want: Vec<u64> = (5_001..10_003).filter(|s| ![7_000, 10_001].contains(s)).collect();
        assert_eq!(rest, want);
        assert!(q.is_empty());
    }
}
