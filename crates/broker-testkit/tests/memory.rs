//! The in-memory reference backend passes the conformance suite.

use broker_core::{Backend, Event, async_trait, memory::MemoryBackend};
use broker_testkit::Target;

struct Memory;

#[async_trait]
impl Target for Memory {
    fn name(&self) -> String {
        "memory".into()
    }
    async fn fresh(&self) -> Box<dyn Backend> {
        Box::new(MemoryBackend::new().with_max_event_bytes(64 * 1024))
    }
    fn poison(&self) -> Option<Event> {
        Some(broker_testkit::oversized_event(100_000))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_backend_conforms() {
    broker_testkit::run_all(&Memory).await;
}
