//! A Kafka-protocol broker of a test's own: tansu (from `BROKER_TEST_TANSU_ROOT`, which `.ci/run`
//! sets) started on a free loopback port with `.ci/kafka-broker.sh` in a temporary directory, and
//! stopped by PID when dropped. For a test that needs the broker's address to be a proxy's (a
//! fault test), or users and TLS of its own.

use std::path::PathBuf;
use std::process::Command;

/// A tansu broker of the test's own, stopped when dropped.
#[derive(Debug)]
pub struct Tansu {
    /// Where its data and PID file live.
    pub dir: tempfile::TempDir,
    /// The tansu installation (`BROKER_TEST_TANSU_ROOT`).
    pub root: String,
    /// The plaintext port on 127.0.0.1.
    pub port: u16,
    /// What the broker tells clients to connect to (`host:port`).
    pub advertised: String,
}

/// A free port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

impl Tansu {
    /// `BROKER_TEST_TANSU_ROOT`, or `None` (a skip, except under `CI=true`); also `None` when
    /// the start script is missing (a packaged crate has no `.ci/`).
    pub fn root(test: &str) -> Option<String> {
        let root = crate::services::var(test, "BROKER_TEST_TANSU_ROOT")?;
        if !Self::script().exists() {
            let why = format!("{} is missing (set BROKER_TEST_KAFKA_SCRIPT)", Self::script().display());
            crate::services::skip(test, &why);
            return None;
        }
        Some(root)
    }

    /// A broker (not started yet) advertising `advertised` (default: its own address).
    pub fn new(root: String, advertised: Option<String>) -> Tansu {
        let port = free_port();
        let advertised = advertised.unwrap_or_else(|| format!("127.0.0.1:{port}"));
        Tansu { dir: tempfile::tempdir().expect("temp dir"), root, port, advertised }
    }

    /// `BROKER_TEST_KAFKA_SCRIPT`, else the repository's `.ci/kafka-broker.sh`.
    fn script() -> PathBuf {
        std::env::var_os("BROKER_TEST_KAFKA_SCRIPT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.ci/kafka-broker.sh"))
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("TANSU_ROOT", &self.root)
            .env("KAFKA_DIR", self.dir.path())
            .env("KAFKA_PORT", self.port.to_string())
            .env("KAFKA_ADVERTISED", format!("tcp://{}", self.advertised));
        c
    }

    /// Runs `kafka-broker.sh ARGS` (`start ENGINE [FLAGS]`, `stop`).
    pub fn run(&self, args: &[&str]) {
        let out = self.command("bash").arg(Self::script()).args(args).output().expect("run kafka-broker.sh");
        assert!(
            out.status.success(),
            "kafka-broker.sh {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Creates a SCRAM user (`scram256` or `scram512`) over the Kafka protocol; the broker must
    /// run without `--authentication`.
    pub fn create_user(&self, mechanism: &str, user: &str, password: &str) {
        let tansu = format!("{}/bin/tansu", self.root);
        let out = Command::new(&tansu)
            .args(["user", "create", "--broker", &format!("tcp://127.0.0.1:{}", self.port), "--mechanism", mechanism])
            .args([user, password])
            .output()
            .expect("run tansu user create");
        assert!(
            out.status.success(),
            "tansu user create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.command("bash").arg(Self::script()).arg("stop").output();
    }
}
