//! What the driver holds: the accepted events not settled yet, in publish order, and the flush
//! markers behind them. Apart from the sink, so the driver can take new events while it writes.

use std::collections::VecDeque;
use std::time::Instant;

use tokio::sync::oneshot;

use super::pipeline::{Command, Inbox, Pending, event_of};
use super::sink::Record;
use crate::broker::Settle;
use crate::error::Error;
use crate::event::Event;

/// One accepted event's receipt, held until its verdict.
pub(crate) struct Held {
    pub(crate) seq: u64,
    pub(crate) settle: Settle,
    /// Write it on its own (it was in a batch the service refused).
    pub(crate) alone: bool,
}

/// An event sent and waiting for the service's confirmation ([`super::Verdict::Sent`]).
pub(crate) struct Sent {
    pub(crate) record: Record,
    pub(crate) held: Held,
    pub(crate) at: Instant,
}

pub(crate) struct Window {
    pub(crate) backend: &'static str,
    pub(crate) batch_size: usize,
    pub(crate) max_event_bytes: Option<usize>,
    /// Events not sent yet, in order (records and receipts side by side).
    pub(crate) records: VecDeque<Record>,
    pub(crate) held: VecDeque<Held>,
    /// Events sent and awaiting confirmation, in the order sent; all before `records`.
    pub(crate) sent: VecDeque<Sent>,
    pub(crate) flushes: VecDeque<(u64, oneshot::Sender<()>)>,
    pub(crate) next_seq: u64,
    /// Commands taken from the inbox at once, kept between takes: a fresh buffer of this size
    /// each time is fresh memory from the system, zeroed page by page.
    taken: Vec<Command>,
}

impl Window {
    pub(crate) fn new(backend: &'static str, batch_size: usize, max_event_bytes: Option<usize>) -> Window {
        Window {
            backend,
            batch_size,
            max_event_bytes,
            records: VecDeque::new(),
            held: VecDeque::new(),
            sent: VecDeque::new(),
            flushes: VecDeque::new(),
            next_seq: 0,
            taken: Vec::new(),
        }
    }

    /// Nothing held: no event waits to be sent, written or confirmed (receipts are in `held`
    /// while their records are being written).
    pub(crate) fn is_empty(&self) -> bool {
        self.held.is_empty() && self.sent.is_empty()
    }

    /// Takes queued commands until one batch waits beyond `in_flight` events being written.
    pub(crate) fn take_beyond(&mut self, inbox: &mut Inbox, in_flight: usize) {
        let room = (self.batch_size + in_flight).saturating_sub(self.held.len());
        if room == 0 {
            return;
        }
        let mut cmds = std::mem::take(&mut self.taken);
        cmds.reserve(room.min(4096));
        inbox.try_recv_batch(&mut cmds, room);
        for cmd in cmds.drain(..) {
            self.on_command(cmd);
        }
        self.taken = cmds;
    }

    pub(crate) fn take(&mut self, inbox: &mut Inbox) {
        self.take_beyond(inbox, 0);
    }

    pub(crate) fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Publish(p) => self.accept(p),
            Command::Flush(tx) => {
                if self.is_empty() {
                    let _ = tx.send(());
                } else {
                    self.flushes.push_back((self.next_seq, tx));
                }
            }
        }
    }

    fn accept(&mut self, p: Pending) {
        if let Some(max) = self.max_event_bytes.filter(|m| p.json.len() > *m) {
            let len = p.json.len();
            p.reject(self.backend, format!("{len} bytes is over max_event_bytes {max}"));
            return;
        }
        let Pending { id, json, sender_id, headers, settle } = p;
        self.records.push_back(Record { id, json, sender_id, headers });
        self.held.push_back(Held { seq: self.next_seq, settle, alone: false });
        self.next_seq += 1;
    }

    /// Answers the flush markers every event before which is settled.
    pub(crate) fn answer_flushes(&mut self) {
        if self.flushes.is_empty() {
            return;
        }
        // An event sent again after a refusal may follow later ones in `sent`: take the lowest.
        let in_flight = self.sent.iter().map(|s| s.held.seq).min();
        let unsent = self.held.front().map(|h| h.seq);
        let low = match (in_flight, unsent) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(self.next_seq),
        };
        while self.flushes.front().is_some_and(|(barrier, _)| *barrier <= low) {
            if let Some((_, tx)) = self.flushes.pop_front() {
                let _ = tx.send(());
            }
        }
    }

    /// Puts events back among the events to send, in publish order (`events` may come in any
    /// order; those to send stay sorted by publish order).
    pub(crate) fn requeue(&mut self, mut events: Vec<(Record, Held)>) {
        let Some(last) = events.iter().map(|(_, h)| h.seq).max() else { return };
        while self.held.front().is_some_and(|h| h.seq < last) {
            if let (Some(r), Some(h)) = (self.records.pop_front(), self.held.pop_front()) {
                events.push((r, h));
            }
        }
        events.sort_by_key(|(_, h)| h.seq);
        for (r, h) in events.into_iter().rev() {
            self.records.push_front(r);
            self.held.push_front(h);
        }
    }

    /// Every event in flight goes back to be sent again (its link is gone), before the rest.
    pub(crate) fn abandon_sent(&mut self) {
        let sent: Vec<(Record, Held)> = self.sent.drain(..).map(|s| (s.record, s.held)).collect();
        self.requeue(sent);
    }

    /// Fails every held event with `error`, in publish order, listing it in `undelivered`.
    pub(crate) fn give_up(&mut self, error: &Error, undelivered: &mut Vec<Event>) {
        self.abandon_sent();
        for (record, h) in self.records.drain(..).zip(self.held.drain(..)) {
            if let Some(e) = event_of(record.id, &record.json) {
                undelivered.push(e);
            }
            h.settle.settle(Err(error.clone()));
        }
        self.answer_flushes();
    }
}
