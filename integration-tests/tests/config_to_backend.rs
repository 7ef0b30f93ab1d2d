//! From endpoints.yml text to events on disk, through the registry, as a user's program does it.

use std::path::PathBuf;

use broker_config::{configure, default_registry, parse_str};
use broker_core::memory::MemoryBackend;
use broker_core::{
    Backend, BackendFactory, ConfigError, Configured, Event, Options, SourceOptions, StartFrom, async_trait,
};
use broker_testkit::Target;

/// Backends built from endpoints.yml text, each writing its own file.
struct FromEndpoints {
    dir: tempfile::TempDir,
}

#[async_trait]
impl Target for FromEndpoints {
    fn name(&self) -> String {
        "file via endpoints.yml".into()
    }
    async fn fresh(&self) -> Box<dyn Backend> {
        let path = tempfile::Builder::new().suffix(".log").tempfile_in(self.dir.path()).unwrap().into_temp_path();
        let path: PathBuf = path.keep().unwrap();
        let yaml = format!("event_broker:\n  type: file\n  path: {}\n  max_event_bytes: 65536\n", path.display());
        let section = parse_str(&yaml, None).unwrap().unwrap();
        configure(section, &default_registry()).unwrap().backend
    }
    fn poison(&self) -> Option<Event> {
        Some(broker_testkit::oversized_event(100_000))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_backend_configured_from_yaml_conforms() {
    broker_testkit::run_all(&FromEndpoints { dir: tempfile::tempdir().unwrap() }).await;
}

/// A backend from "another crate": registered by name, configured from YAML, no fork needed.
#[derive(Clone)]
struct Recorder {
    backend: MemoryBackend,
}

impl BackendFactory for Recorder {
    fn name(&self) -> &'static str {
        "recorder"
    }
    fn configure(&self, mut options: Options) -> Result<Configured, ConfigError> {
        let label = options.take_str("label")?.unwrap_or_default();
        let warnings = options.finish("recorder", &["label"])?;
        assert_eq!(label, "demo");
        Ok(Configured::new(Box::new(self.backend.clone()), warnings))
    }
}

#[tokio::test]
async fn a_third_party_backend_is_chosen_by_type_name() -> anyhow::Result<()> {
    let recorder = Recorder { backend: MemoryBackend::new() };
    let mut registry = default_registry();
    registry.register(recorder.clone());

    let section = parse_str("event_broker:\n  type: Recorder\n  label: demo\n", None)?.expect("a section");
    let configured = configure(section, &registry)?;
    let broker = configured.backend.connect().await?;
    let line = br#"{"sender_id": "x", "event": "session_started", "timestamp": 1.0}"#;
    broker.publish(Event::from_json(line)?).await?.await?;
    broker.close().await?;
    assert_eq!(recorder.backend.lines(), vec![line.to_vec()]);

    let mut source = configured.backend.source(&SourceOptions::from(StartFrom::Beginning).follow(false)).await?;
    assert_eq!(source.next().await?.map(|r| r.raw), Some(line.to_vec()));

    // Without registering it, the error lists what is registered.
    let section = parse_str("event_broker:\n  type: recorder\n", None)?.expect("a section");
    let err = configure(section, &default_registry()).unwrap_err();
    assert!(err.to_string().contains("registered types: memory, file"), "{err}");
    Ok(())
}
