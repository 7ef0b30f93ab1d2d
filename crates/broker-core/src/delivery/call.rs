//! One bounded call into a sink: a timeout, and a panic turned into a value.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// How a call into a sink ended.
pub(crate) enum Call<T> {
    Done(T),
    TimedOut(Duration),
    Panicked(String),
}

/// Polls a boxed future, turning a panic inside it into a value.
pub(crate) struct CatchUnwind<'a, T>(pub(crate) Pin<Box<dyn Future<Output = T> + Send + 'a>>);

impl<T> Future for CatchUnwind<'_, T> {
    type Output = Result<T, String>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(payload) => Poll::Ready(Err(panic_message(payload.as_ref()))),
        }
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Runs `fut` for at most `limit`, catching a panic.
pub(crate) async fn call<'a, T>(fut: Pin<Box<dyn Future<Output = T> + Send + 'a>>, limit: Duration) -> Call<T> {
    match tokio::time::timeout(limit, CatchUnwind(fut)).await {
        Ok(Ok(v)) => Call::Done(v),
        Ok(Err(message)) => Call::Panicked(message),
        Err(_) => Call::TimedOut(limit),
    }
}
