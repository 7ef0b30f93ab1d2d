//! The blocking twin of [`Sink`], for backends whose client is synchronous (a file, SQLite):
//! [`on_thread`] runs a [`BlockingSink`] on a thread of its own and hands the driver a [`Sink`]
//! whose calls are bounded by the driver's timeouts like any other. A call that outlives its
//! timeout keeps running on the thread; the next call waits for it first, so the sink is never
//! used by two calls at once.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc as std_mpsc;

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::sink::{Batch, Failure, Sink, Verdict};
use crate::error::Error;

/// A sink whose calls block (see [`Sink`] for what each call means).
pub trait BlockingSink: Send + 'static {
    /// Writes `batch` and says what happened to each event (see [`Sink::write`]).
    fn write(&mut self, batch: &Batch) -> Result<Vec<Verdict>, Error>;

    /// Re-establishes what a failure broke (see [`Sink::recover`]).
    fn recover(&mut self, _failure: &Failure) -> Result<(), Error> {
        Ok(())
    }

    /// Checks the service while idle (see [`Sink::ping`]).
    fn ping(&mut self) -> Result<(), Error> {
        Ok(())
    }

    /// Releases the resources after the last write.
    fn close(&mut self) {}
}

enum Job {
    Write(Batch),
    Recover(Failure),
    Ping,
    Close,
}

enum Answer {
    Written(Result<Vec<Verdict>, Error>),
    Done(Result<(), Error>),
    Panicked(Box<dyn Any + Send>),
}

/// A [`BlockingSink`] on its own thread, as a [`Sink`].
pub struct OnThread {
    jobs: std_mpsc::Sender<(u64, Job)>,
    answers: mpsc::UnboundedReceiver<(u64, Answer)>,
    next: u64,
    /// The job whose answer has not been read yet (its caller gave up waiting).
    outstanding: Option<u64>,
    name: &'static str,
}

impl std::fmt::Debug for OnThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnThread").field("name", &self.name).finish_non_exhaustive()
    }
}

/// Starts `sink` on a thread named `name`.
pub fn on_thread<B: BlockingSink>(name: &'static str, mut sink: B) -> Result<OnThread, Error> {
    let (jobs, job_rx) = std_mpsc::channel::<(u64, Job)>();
    let (answer_tx, answers) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            while let Ok((id, job)) = job_rx.recv() {
                let closing = matches!(job, Job::Close);
                let answer = std::panic::catch_unwind(AssertUnwindSafe(|| match job {
                    Job::Write(batch) => Answer::Written(sink.write(&batch)),
                    Job::Recover(f) => Answer::Done(sink.recover(&f)),
                    Job::Ping => Answer::Done(sink.ping()),
                    Job::Close => {
                        sink.close();
                        Answer::Done(Ok(()))
                    }
                }))
                .unwrap_or_else(Answer::Panicked);
                let panicked = matches!(answer, Answer::Panicked(_));
                let _ = answer_tx.send((id, answer));
                if closing || panicked {
                    return;
                }
            }
        })
        .map_err(|e| Error::io("broker", format!("starting the thread {name}"), e))?;
    Ok(OnThread { jobs, answers, next: 0, outstanding: None, name })
}

impl OnThread {
    async fn run(&mut self, job: Job) -> Answer {
        // An abandoned call is still running: its answer comes first.
        if let Some(old) = self.outstanding {
            loop {
                match self.answers.recv().await {
                    Some((id, _)) if id == old => break,
                    Some(_) => continue,
                    None => return self.gone(),
                }
            }
            self.outstanding = None;
        }
        let id = self.next;
        self.next += 1;
        if self.jobs.send((id, job)).is_err() {
            return self.gone();
        }
        self.outstanding = Some(id);
        loop {
            match self.answers.recv().await {
                Some((got, answer)) if got == id => {
                    self.outstanding = None;
                    return answer;
                }
                Some(_) => continue,
                None => return self.gone(),
            }
        }
    }

    fn gone(&self) -> Answer {
        let what = format!("the thread {} stopped", self.name);
        Answer::Panicked(Box::new(what))
    }
}

fn unwrap_done(answer: Answer) -> Result<(), Error> {
    match answer {
        Answer::Done(r) => r,
        Answer::Written(r) => r.map(|_| ()),
        Answer::Panicked(p) => std::panic::resume_unwind(p),
    }
}

#[async_trait]
impl Sink for OnThread {
    async fn write(&mut self, batch: &Batch) -> Result<Vec<Verdict>, Error> {
        match self.run(Job::Write(batch.share())).await {
            Answer::Written(r) => r,
            Answer::Done(r) => r.map(|()| Vec::new()),
            // The driver catches it and reports the writer's events.
            Answer::Panicked(p) => std::panic::resume_unwind(p),
        }
    }

    async fn recover(&mut self, failure: &Failure) -> Result<(), Error> {
        unwrap_done(self.run(Job::Recover(failure.clone())).await)
    }

    async fn ping(&mut self) -> Result<(), Error> {
        unwrap_done(self.run(Job::Ping).await)
    }

    async fn close(&mut self) {
        let _ = unwrap_done(self.run(Job::Close).await);
    }
}
