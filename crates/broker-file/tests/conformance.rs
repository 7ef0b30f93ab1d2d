//! The file backend runs the shared conformance suite and the consumer scenarios of a file
//! (resume at a byte offset, rotation by rename, deletion, truncation, a file that appears late).

use std::path::PathBuf;

use broker_core::{Backend, Event, Received, SourceOptions, async_trait};
use broker_file::{FileBackend, FileConfig};
use broker_testkit::Target;
use broker_testkit::scenario::{Hooks, Rotation, Scene, Skip};

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn path(&self) -> PathBuf {
        let path = tempfile::Builder::new().prefix("events-").suffix(".log").tempfile_in(self.dir.path()).unwrap();
        path.keep().unwrap().1
    }
}

fn backend(path: &std::path::Path) -> Box<dyn Backend> {
    Box::new(FileBackend::new(FileConfig::new(path).max_event_bytes(64 * 1024)))
}

#[async_trait]
impl Target for Files {
    fn name(&self) -> String {
        "file".into()
    }
    async fn fresh(&self) -> Box<dyn Backend> {
        backend(&self.path())
    }
    fn poison(&self) -> Option<Event> {
        Some(broker_testkit::oversized_event(100_000))
    }
    async fn scene(&self) -> Scene {
        let path = self.path();
        Scene { backend: backend(&path), hooks: Box::new(FileHooks { path }) }
    }
}

/// What a file's consumer and logrotate do to it.
struct FileHooks {
    path: PathBuf,
}

#[async_trait]
impl Hooks for FileHooks {
    fn resume(&self, after: Option<&Received>) -> Result<SourceOptions, Skip> {
        Ok(broker_testkit::scenario::resume_by_position(after))
    }
    async fn rotate(&self, how: Rotation) -> Result<(), Skip> {
        match how {
            Rotation::Rename => std::fs::rename(&self.path, self.path.with_extension("log.1")).unwrap(),
            Rotation::Delete => std::fs::remove_file(&self.path).unwrap(),
            Rotation::Truncate => std::fs::OpenOptions::new().write(true).open(&self.path).unwrap().set_len(0).unwrap(),
            other => return Err(format!("{other:?} is not a file rotation here")),
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_backend_conforms() {
    broker_testkit::run_all(&Files { dir: tempfile::tempdir().unwrap() }).await;
}
