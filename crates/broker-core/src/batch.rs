//! Publishing many events at once ([`EventBroker::publish_batch`]): one receipt for all their
//! outcomes, in publish order, instead of one receipt each (docs/contract.md §A).
//!
//! The outcomes still come one per event; what is shared is the bookkeeping: one allocation and
//! one wake-up per batch instead of a channel per event, so a bulk publisher (the CLI, an export)
//! spends its time on the events, not on their receipts.
//!
//! [`EventBroker::publish_batch`]: crate::EventBroker::publish_batch

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use crate::broker::{Outcome, Receipt, Settle};
use crate::error::Error;
use crate::event::Event;
use crate::event::EventId;

/// What [`EventBroker::publish_batch`] did: a receipt for the events it accepted (the first
/// [`BatchReceipt::len`] of them, in order) and, when it did not accept them all, why, with the
/// others handed back.
///
/// [`EventBroker::publish_batch`]: crate::EventBroker::publish_batch
#[derive(Debug)]
#[must_use = "the receipt tells whether the events were delivered, and refused events are handed back"]
pub struct BatchPublished {
    /// The outcomes of the accepted events.
    pub receipt: BatchReceipt,
    /// Set when some events were not accepted.
    pub refused: Option<Refused>,
}

/// Events a publish did not accept, handed back, and why.
#[derive(Debug)]
pub struct Refused {
    /// Why (e.g. [`Error::Closed`], [`Error::BufferFull`]).
    pub error: Error,
    /// The events not accepted, in order.
    pub events: Vec<Event>,
}

/// The outcomes of events published together, in publish order; a future of every outcome.
///
/// Like a [`Receipt`], awaiting it is optional: dropping it cancels nothing.
#[derive(Debug)]
#[must_use = "a receipt tells whether the events were delivered; drop it explicitly if you do not care"]
pub struct BatchReceipt {
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    /// Settled by the backend into shared slots.
    Shared(Arc<Slots>),
    /// One receipt per event (brokers without their own batch path).
    Each { receipts: Vec<Receipt>, outcomes: Vec<Outcome> },
}

impl BatchReceipt {
    /// The receipt of events that were each published on their own.
    pub fn from_receipts(receipts: Vec<Receipt>) -> BatchReceipt {
        let outcomes = Vec::with_capacity(receipts.len());
        BatchReceipt { inner: Inner::Each { receipts, outcomes } }
    }

    /// A receipt for events `ids` (in order) and the [`Settle`] of each, for a layer that
    /// settles a batch's events itself (a disk spool in front of a backend): one allocation and
    /// one wake-up for the batch, not a channel per event.
    pub fn settles(ids: impl ExactSizeIterator<Item = EventId>) -> (BatchReceipt, Vec<Settle>) {
        let (receipt, slots) = BatchReceipt::shared(ids.len());
        let settles = ids.enumerate().map(|(i, id)| Settle::slot(id, &slots, i, None)).collect();
        (receipt, settles)
    }

    /// Only the first `n` events were accepted (the others were handed back): the receipt is for
    /// those, and does not wait for the others.
    pub fn truncate(&mut self, n: usize) {
        match &mut self.inner {
            Inner::Shared(slots) => slots.truncate(n),
            Inner::Each { receipts, outcomes } => {
                receipts.truncate(n);
                outcomes.truncate(n);
            }
        }
    }

    /// How many events it is for.
    pub fn len(&self) -> usize {
        match &self.inner {
            Inner::Shared(slots) => slots.state().outcomes.len(),
            Inner::Each { receipts, .. } => receipts.len(),
        }
    }

    /// Whether it is for no event.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The outcomes known now, in order; `None` where an event is still open. For a caller
    /// that stops waiting (a deadline, a signal) and must still account for each event.
    pub fn settled_so_far(&mut self) -> Vec<Option<Outcome>> {
        match &mut self.inner {
            Inner::Shared(slots) => slots.state().outcomes.clone(),
            Inner::Each { receipts, outcomes } => {
                // In order, up to the first open one (a receipt is not asked again once it has
                // answered); those after it count as open.
                let mut cx = Context::from_waker(Waker::noop());
                while let Some(next) = receipts.get_mut(outcomes.len()) {
                    match Pin::new(next).poll(&mut cx) {
                        Poll::Ready(o) => outcomes.push(o),
                        Poll::Pending => break,
                    }
                }
                let mut known: Vec<Option<Outcome>> = outcomes.iter().cloned().map(Some).collect();
                known.resize(receipts.len(), None);
                known
            }
        }
    }

    /// Shared slots for `n` events, and the receipt reading them.
    pub(crate) fn shared(n: usize) -> (BatchReceipt, Arc<Slots>) {
        let slots = Arc::new(Slots { state: Mutex::new(State { outcomes: vec![None; n], left: n, waker: None }) });
        (BatchReceipt { inner: Inner::Shared(slots.clone()) }, slots)
    }
}

impl Future for BatchReceipt {
    type Output = Vec<Outcome>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Vec<Outcome>> {
        match &mut self.get_mut().inner {
            Inner::Shared(slots) => {
                let mut state = slots.state();
                if state.left > 0 {
                    state.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                let outcomes = std::mem::take(&mut state.outcomes);
                Poll::Ready(outcomes.into_iter().map(|o| o.unwrap_or_else(|| Err(gone()))).collect())
            }
            Inner::Each { receipts, outcomes } => {
                while outcomes.len() < receipts.len() {
                    let next = &mut receipts[outcomes.len()];
                    match Pin::new(next).poll(cx) {
                        Poll::Ready(o) => outcomes.push(o),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                Poll::Ready(std::mem::take(outcomes))
            }
        }
    }
}

/// The outcomes of one batch, filled in by the backend's [`crate::broker::Settle`]s.
#[derive(Debug)]
pub(crate) struct Slots {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    outcomes: Vec<Option<Outcome>>,
    /// Slots not filled yet.
    left: usize,
    waker: Option<Waker>,
}

impl Slots {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fills slot `index` (once).
    pub(crate) fn fill(&self, index: usize, outcome: Outcome) {
        let waker = {
            let mut state = self.state();
            if !Slots::fill_locked(&mut state, index, outcome) {
                return;
            }
            state.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Fills slot `index` with the lock held; true when that was the last open one.
    fn fill_locked(state: &mut State, index: usize, outcome: Outcome) -> bool {
        match state.outcomes.get_mut(index) {
            Some(slot @ None) => *slot = Some(outcome),
            _ => return false,
        }
        state.left -= 1;
        state.left == 0
    }

    /// Fills `first`, then each of `rest` while it is a slot of these same slots, under one
    /// lock and with one wake-up; the first settle of another batch (or receipt) is left in
    /// `rest` (looked at in place, not moved out and back).
    pub(crate) fn fill_run(
        self: &Arc<Slots>,
        first: (usize, Outcome),
        rest: &mut std::vec::IntoIter<(Settle, Outcome)>,
    ) {
        let waker = {
            let mut state = self.state();
            let mut done = Slots::fill_locked(&mut state, first.0, first.1);
            while let Some(index) = rest.as_slice().first().and_then(|(s, _)| s.slot_index_in(self)) {
                let Some((mut settle, outcome)) = rest.next() else { break };
                // Filled here, under the lock taken once for the run.
                drop(settle.take_to(&outcome));
                done |= Slots::fill_locked(&mut state, index, outcome);
            }
            if done { state.waker.take() } else { None }
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Only the first `n` events were accepted: the rest will never be filled.
    pub(crate) fn truncate(&self, n: usize) {
        let waker = {
            let mut state = self.state();
            if n >= state.outcomes.len() {
                return;
            }
            let open_dropped = state.outcomes[n..].iter().filter(|o| o.is_none()).count();
            state.outcomes.truncate(n);
            state.left -= open_dropped;
            if state.left > 0 {
                return;
            }
            state.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The outcome of an event whose backend stopped before reporting it.
pub(crate) fn gone() -> Error {
    Error::Io {
        backend: "broker",
        operation: "delivering".into(),
        reason: "the backend stopped before reporting this event's outcome".into(),
        cause: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Delivered;

    #[tokio::test]
    async fn outcomes_come_in_order_once_all_are_settled_and_a_dropped_settle_is_a_failure() {
        let (mut receipt, slots) = BatchReceipt::shared(3);
        let ids: Vec<EventId> = (0..3).map(|_| EventId::generate()).collect();
        let mut settles: Vec<Settle> =
            ids.iter().enumerate().map(|(i, id)| Settle::slot(*id, &slots, i, None)).collect();
        assert_eq!(receipt.len(), 3);
        let third = settles.pop().unwrap();
        let second = settles.pop().unwrap();
        let first = settles.pop().unwrap();
        third.delivered(None);
        assert!(futures_poll(&mut receipt).is_none(), "not ready while two are open");
        assert!(matches!(receipt.settled_so_far().as_slice(), [None, None, Some(Ok(_))]));
        drop(second);
        first.settle(Err(Error::Closed));
        let outcomes = receipt.await;
        assert!(matches!(outcomes[0], Err(Error::Closed)));
        assert!(matches!(&outcomes[1], Err(Error::Io { reason, .. }) if reason.contains("stopped before reporting")));
        assert_eq!(outcomes[2].as_ref().ok(), Some(&Delivered::new(ids[2], None)));
    }

    #[tokio::test]
    async fn settle_all_fills_runs_of_batches_and_single_receipts_in_one_go() {
        let a: Vec<EventId> = (0..3).map(|_| EventId::generate()).collect();
        let b: Vec<EventId> = (0..2).map(|_| EventId::generate()).collect();
        let (ra, sa) = BatchReceipt::settles(a.iter().copied());
        let (rb, sb) = BatchReceipt::settles(b.iter().copied());
        let (one, so) = Receipt::channel(EventId::generate());
        let mut sa = sa.into_iter();
        let mut sb = sb.into_iter();
        let ok = |id: EventId| -> Outcome { Ok(Delivered::new(id, None)) };
        // Two of batch a, one of b, the single receipt, then the rest of a and b, out of order.
        let settled = vec![
            (sa.next().unwrap(), ok(a[0])),
            (sa.next().unwrap(), Err(Error::Closed)),
            (sb.next().unwrap(), ok(b[0])),
            (so, ok(EventId::from_u128(7))),
            (sa.next().unwrap(), ok(a[2])),
            (sb.next().unwrap(), ok(b[1])),
        ];
        Settle::settle_all(settled);
        let outcomes = ra.await;
        assert_eq!(outcomes[0].as_ref().ok(), Some(&Delivered::new(a[0], None)));
        assert!(matches!(outcomes[1], Err(Error::Closed)));
        assert_eq!(outcomes[2].as_ref().ok(), Some(&Delivered::new(a[2], None)));
        assert_eq!(rb.await.iter().filter(|o| o.is_ok()).count(), 2);
        assert!(one.await.is_ok());
    }

    #[tokio::test]
    async fn a_truncated_batch_resolves_with_the_accepted_events() {
        let (receipt, slots) = BatchReceipt::shared(4);
        let first = Settle::slot(EventId::generate(), &slots, 0, None);
        slots.truncate(1);
        first.delivered(None);
        let outcomes = receipt.await;
        assert_eq!(outcomes.len(), 1);
        assert!(outcomes[0].is_ok());
    }

    #[tokio::test]
    async fn settles_made_outside_resolve_the_receipt_and_a_truncate_forgets_the_rest() {
        let ids: Vec<EventId> = (0..3).map(|_| EventId::generate()).collect();
        let (mut receipt, mut settles) = BatchReceipt::settles(ids.iter().copied());
        assert_eq!((receipt.len(), settles.len()), (3, 3));
        drop(settles.pop());
        receipt.truncate(2);
        for s in settles {
            s.delivered(None);
        }
        let outcomes = receipt.await;
        assert_eq!(outcomes.len(), 2);
        assert_eq!(outcomes[1].as_ref().ok(), Some(&Delivered::new(ids[1], None)));
    }

    fn futures_poll(r: &mut BatchReceipt) -> Option<Vec<Outcome>> {
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(r).poll(&mut cx) {
            Poll::Ready(o) => Some(o),
            Poll::Pending => None,
        }
    }
}
