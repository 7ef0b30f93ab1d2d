//! Containers for the tests (feature `containers`, needs a Docker engine).
//!
//! Every container lives on the kit's own runtime, whatever runtime each test has (a Docker
//! client works only on the runtime it was made on), so the tests of one binary can share one
//! container ([`shared`]) and a restart test can stop and start its own ([`container`] with a
//! fixed host port, so the URL survives the restart). Every container started is removed when
//! the test binary exits.

use std::future::Future;
use std::net::TcpListener;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use testcontainers_modules::testcontainers::core::IntoContainerPort;
use testcontainers_modules::testcontainers::runners::AsyncRunner;
use testcontainers_modules::testcontainers::{ContainerAsync, Image, ImageExt};

use super::images;

type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A running container: where to reach it, and its handle for [`Container::stop`] and
/// [`Container::start`]. Clones share the container.
#[derive(Clone)]
pub struct Container {
    /// The URL (or `host:port`) built from the container's host and mapped port.
    pub url: String,
    node: Arc<dyn Control>,
}

impl std::fmt::Debug for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Container").finish_non_exhaustive()
    }
}

impl Container {
    /// Stops the container (SIGTERM, then SIGKILL after 10 s), as a service outage.
    pub async fn stop(&self) -> Result<(), String> {
        self.node.stop().await
    }

    /// Starts the stopped container again.
    pub async fn start(&self) -> Result<(), String> {
        self.node.start().await
    }
}

trait Control: Send + Sync {
    fn stop(&self) -> Boxed<Result<(), String>>;
    fn start(&self) -> Boxed<Result<(), String>>;
}

struct Node<I: Image>(Arc<ContainerAsync<I>>);

impl<I: Image + 'static> Control for Node<I> {
    fn stop(&self) -> Boxed<Result<(), String>> {
        let node = self.0.clone();
        Box::pin(on_runtime(async move {
            node.stop_with_timeout(Some(10)).await.map_err(|e| format!("the container did not stop: {e}"))
        }))
    }

    fn start(&self) -> Boxed<Result<(), String>> {
        let node = self.0.clone();
        Box::pin(on_runtime(async move { node.start().await.map_err(|e| format!("the container did not start: {e}")) }))
    }
}

/// The kit's runtime, made on first use (which also arranges the removal at exit).
fn runtime() -> Result<&'static tokio::runtime::Runtime, String> {
    static RUNTIME: OnceLock<Result<tokio::runtime::Runtime, String>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            at_exit::register();
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("broker-testkit-containers")
                .enable_all()
                .build()
                .map_err(|e| format!("cannot make the containers' runtime: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Runs `work` on the kit's runtime and waits for it from any runtime.
async fn on_runtime<T: Send + 'static>(
    work: impl Future<Output = Result<T, String>> + Send + 'static,
) -> Result<T, String> {
    runtime()?.spawn(work).await.map_err(|e| format!("the container task failed: {e}"))?
}

/// Every container started by this process, removed at exit.
static STARTED: Mutex<Vec<Arc<dyn std::any::Any + Send + Sync>>> = Mutex::new(Vec::new());

fn remove_all() {
    let all = std::mem::take(&mut *STARTED.lock().unwrap_or_else(|p| p.into_inner()));
    if all.is_empty() {
        return;
    }
    let Ok(runtime) = runtime() else { return };
    // A container removes itself when its last handle is dropped on a runtime's worker thread.
    let removal = runtime.spawn(async move { drop(all) });
    let _ = runtime.block_on(tokio::time::timeout(Duration::from_secs(60), removal));
}

#[allow(unsafe_code)]
mod at_exit {
    extern "C" fn remove_all() {
        super::remove_all();
    }

    pub(super) fn register() {
        // SAFETY: atexit(3) asks for a function pointer that stays valid until the program ends;
        // `remove_all` is a plain `extern "C" fn()` of this binary, valid for its whole life.
        let _ = unsafe { libc::atexit(remove_all) };
    }
}

/// Starts `image` (as [`images::chosen`] names it) and builds the URL from the container's host and
/// its host port for `port`. With `fixed_port`, the host port is chosen here and stays the same
/// across a stop and start (for restart tests); otherwise Docker picks one.
pub async fn container<I>(
    image: I,
    pinned: (&str, &str, &str),
    what: &str,
    port: u16,
    fixed_port: bool,
    url: impl Fn(&str, u16) -> String,
) -> Result<Container, String>
where
    I: Image + 'static,
{
    let (name, tag) = images::chosen(pinned);
    let mut request = image.with_name(name.clone()).with_tag(tag.clone());
    if fixed_port {
        let free = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port for the {what} container: {e}"))?;
        request = request.with_mapped_port(free.port(), port.tcp());
    }
    let what = what.to_owned();
    let (host, host_port, node) = on_runtime(async move {
        let node =
            request.start().await.map_err(|e| format!("testcontainers could not start {what} ({name}:{tag}): {e}"))?;
        let host = node.get_host().await.map_err(|e| format!("the {what} container has no host: {e}"))?;
        let host_port =
            node.get_host_port_ipv4(port).await.map_err(|e| format!("the {what} container has no port: {e}"))?;
        Ok((host.to_string(), host_port, Arc::new(node)))
    })
    .await?;
    STARTED.lock().unwrap_or_else(|p| p.into_inner()).push(node.clone());
    Ok(Container { url: url(&host, host_port), node: Arc::new(Node(node)) })
}

/// The container in `cell`, started by `start` for the first test of the binary that asks and
/// shared by the others (a failure to start is shared too: every test says why).
pub async fn shared(
    cell: &'static tokio::sync::OnceCell<Result<Container, String>>,
    start: impl Future<Output = Result<Container, String>>,
) -> Result<Container, String> {
    cell.get_or_init(|| start).await.clone()
}
