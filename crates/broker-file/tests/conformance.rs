//! The file backend passes the conformance suite on real files.

use broker_core::{Backend, Event, async_trait};
use broker_file::{FileBackend, FileConfig};
use broker_testkit::Target;

struct Files {
    dir: tempfile::TempDir,
}

#[async_trait]
impl Target for Files {
    fn name(&self) -> String {
        "file".into()
    }
    async fn fresh(&self) -> Box<dyn Backend> {
        let path = tempfile::Builder::new().prefix("events-").suffix(".log").tempfile_in(self.dir.path()).unwrap();
        let (_, path) = path.keep().unwrap();
        Box::new(FileBackend::new(FileConfig::new(path).max_event_bytes(64 * 1024)))
    }
    fn poison(&self) -> Option<Event> {
        Some(broker_testkit::oversized_event(100_000))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_backend_conforms() {
    broker_testkit::run_all(&Files { dir: tempfile::tempdir().unwrap() }).await;
}
