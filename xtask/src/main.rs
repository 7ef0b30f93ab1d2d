//! Project automation, in Rust so it runs wherever cargo does (rust-analyzer's `xtask` pattern).
//!
//! - `cargo xtask ci`: everything CI checks, in order: rustfmt, the MSRV claim, broker-cli with
//!   one backend at a time (and no librdkafka without `kafka`), `cargo package` of the crates
//!   (verified from their tarballs), clippy with
//!   warnings as errors, the whole test suite, and the docs with warnings as errors.
//! - `cargo xtask msrv`: each publishable crate's `rust-version` is at least the highest
//!   `rust-version` among the crates it needs to build (normal and build dependencies, all
//!   features), read from `cargo metadata` (one toolchain here, so no old compiler is run).
//! - `cargo xtask bench [BACKEND...]`: release build, then each backend against its raw-client
//!   baseline (docs/contract.md §F); results in `target/bench/<backend>.json`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

mod msrv;

const USAGE: &str = "usage: cargo xtask <ci | msrv | features | package | python | bench [BACKEND...]>\n\
    ci     rustfmt --check, msrv, clippy -D warnings, the whole test suite, docs with -D warnings\n\
    msrv   each crate's rust-version covers what its dependencies need\n\
    features  broker-cli builds with one backend at a time, no librdkafka without kafka\n\
    package   cargo package of every publishable crate, then verified from its tarball\n\
    python the Python package's pytest suite inside Rasa 3.6.21 (venv from .ci/python-env.sh)\n\
    bench  benchmark backends (default: all that this release has: file, sql, kafka, pika;\n\
           `export`: broker export against Rasa 3.6.21's rasa export on a 100,000-event store)";

/// The workspace members that are never published (`publish = false`), left out of `package`.
const UNPUBLISHED: &[&str] = &[
    "--exclude",
    "xtask",
    "--exclude",
    "integration-tests",
    "--exclude",
    "broker-bench",
    "--exclude",
    "broker-example-redis",
    "--exclude",
    "broker-python",
];

/// The backends `bench` knows.
const BACKENDS: &[&str] = &["file", "sql", "kafka", "pika"];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = root()?;
    match args.first().map(String::as_str) {
        Some("ci") => ci(&root),
        Some("msrv") => msrv::check(&root),
        Some("features") => features(&root),
        Some("package") => package(&root),
        Some("python") => python(&root),
        Some("bench") => bench(&root, &args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => bail!("{USAGE}"),
    }
}

fn root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_owned).context("xtask lives one level below the workspace root")
}

fn run(root: &Path, what: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {what}");
    let status = cmd.current_dir(root).status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn ci(root: &Path) -> Result<()> {
    run(root, "rustfmt", cargo().args(["fmt", "--all", "--", "--check"]))?;
    msrv::check(root)?;
    features(root)?;
    package(root)?;
    run(root, "clippy", cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    run(root, "tests", cargo().args(["test", "--workspace", "--no-fail-fast"]))?;
    python(root)?;
    // As docs.rs builds them: every feature but broker-kafka's gssapi (it needs libsasl2).
    let features =
        "broker-config/file broker-config/sql broker-config/kafka broker-config/pika broker-testkit/containers";
    run(
        root,
        "docs",
        cargo()
            .args(["doc", "--workspace", "--no-deps", "--features", features])
            .env("RUSTDOCFLAGS", "-D warnings --cfg docsrs"),
    )?;
    eprintln!("xtask: ci passed");
    Ok(())
}

/// The Python package's suite (crates/broker-python), inside Rasa 3.6.21: the venv from
/// `.ci/python-env.sh` (`BROKER_PYTHON_VENV`, default `.venv-rasa`), `pip install` of the
/// package (maturin, dev profile: it shares the test build's artifacts), then pytest with the
/// `broker` binary the tests built (its `check` messages are compared).
fn python(root: &Path) -> Result<()> {
    let venv = std::env::var_os("BROKER_PYTHON_VENV").map(PathBuf::from).unwrap_or_else(|| root.join(".venv-rasa"));
    run(root, "python env (Rasa 3.6.21)", Command::new("bash").arg(".ci/python-env.sh").arg(&venv))?;
    let bin = venv.join("bin");
    run(
        root,
        "pip install ./crates/broker-python",
        Command::new(bin.join("pip"))
            .args(["install", "-q", "--force-reinstall", "--no-deps", "./crates/broker-python"])
            .env("MATURIN_PEP517_ARGS", "--profile dev"),
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let mut pytest = Command::new(bin.join("python"));
    pytest.args(["-W", "ignore", "-m", "pytest", "-q", "-p", "no:cacheprovider", "crates/broker-python/tests"]);
    let cli = target.join("debug").join("broker");
    if cli.exists() {
        pytest.env("BROKER_CLI", cli);
    }
    run(root, "pytest (crates/broker-python, inside Rasa 3.6.21)", &mut pytest)
}

/// `broker-cli` builds with only some backends, and without `kafka` pulls in no librdkafka (a C
/// build) and without `pika` no amqprs.
fn features(root: &Path) -> Result<()> {
    let tree = cargo()
        .args(["tree", "-p", "broker-cli", "--no-default-features", "--features", "sql,file", "-e", "normal,build"])
        .args(["--prefix", "none"])
        .current_dir(root)
        .output()
        .context("running cargo tree")?;
    if !tree.status.success() {
        bail!("cargo tree failed: {}", String::from_utf8_lossy(&tree.stderr));
    }
    let tree = String::from_utf8_lossy(&tree.stdout);
    for unwanted in ["rdkafka", "amqprs"] {
        if let Some(line) = tree.lines().find(|l| l.starts_with(unwanted)) {
            bail!("broker-cli with --features sql,file still depends on {line}");
        }
    }
    for features in ["sql,file", "file", "kafka", "pika"] {
        run(
            root,
            &format!("broker-cli with only {features}"),
            cargo().args(["check", "-q", "-p", "broker-cli", "--no-default-features", "--features", features]),
        )?;
    }
    Ok(())
}

/// The library crates as crates.io would get them: `cargo package` of the workspace (the files
/// each crate ships, its manifest), then each one built and its doc tests run from its tarball
/// alone (`cargo package` verifies by building the packaged copy).
fn package(root: &Path) -> Result<()> {
    run(
        root,
        "package --no-verify",
        cargo().args(["package", "--workspace", "--no-verify", "--allow-dirty", "-q"]).args(UNPUBLISHED),
    )?;
    run(root, "package (verified)", cargo().args(["package", "--workspace", "--allow-dirty", "-q"]).args(UNPUBLISHED))?;
    Ok(())
}

fn bench(root: &Path, backends: &[String]) -> Result<()> {
    let chosen: Vec<&str> =
        if backends.is_empty() { BACKENDS.to_vec() } else { backends.iter().map(String::as_str).collect() };
    for b in &chosen {
        if !BACKENDS.contains(b) && *b != "export" {
            bail!("unknown backend {b:?}; this release benchmarks: {}, export", BACKENDS.join(", "));
        }
    }
    run(root, "release build", cargo().args(["build", "--release", "-p", "broker-bench", "-p", "broker-cli"]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
    let exe = target.join("release").join("broker-bench");
    for b in chosen {
        if b == "export" {
            // Against Rasa's own exporter: its code runs in the venv the Python tests use.
            let venv =
                std::env::var_os("BROKER_PYTHON_VENV").map(PathBuf::from).unwrap_or_else(|| root.join(".venv-rasa"));
            run(root, "python env (Rasa 3.6.21)", Command::new("bash").arg(".ci/python-env.sh").arg(&venv))?;
            let mut script = Command::new(venv.join("bin").join("python"));
            script.args(["-W", "ignore", "crates/broker-python/bench/bench_export.py", "--cli"]);
            script.arg(target.join("release").join("broker"));
            run(root, "bench export (broker export vs rasa export)", &mut script)?;
            continue;
        }
        run(root, &format!("bench {b}"), Command::new(&exe).arg(b))?;
    }
    Ok(())
}
