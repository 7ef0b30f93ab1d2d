//! A TCP proxy on loopback between a backend and its real service, for fault tests: it forwards
//! until told to [`refuse`](Proxy::refuse) (close every connection and refuse new ones, like a
//! service that is down) or to [`black_hole`](Proxy::black_hole) (keep connections open and
//! accept new ones, but never move another byte: packets dropped, no RST), and again after
//! [`restore`](Proxy::restore). Usable by third-party backends' tests too.
//!
//! It listens on 127.0.0.1 only and forwards only to the address it was given.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

const FORWARD: u8 = 0;
const REFUSE: u8 = 1;
const BLACK_HOLE: u8 = 2;

/// A fault-injecting TCP proxy (see the module docs). Stops when dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        if let Ok(conns) = self.conns.try_lock() {
            for c in conns.iter() {
                c.abort();
            }
        }
    }
}

async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, mode: Arc<AtomicU8>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Bounded by the connection: it ends when either side closes or the task is aborted.
        while mode.load(Ordering::Acquire) == BLACK_HOLE {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bytes read just as the hole opened are held back too.
        while mode.load(Ordering::Acquire) == BLACK_HOLE {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    /// A proxy to `upstream` (`host:port`, a loopback service) on a free port of 127.0.0.1.
    pub async fn start(upstream: &str) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mode = Arc::new(AtomicU8::new(FORWARD));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let upstream = upstream.to_owned();
        let accept = {
            let (mode, conns) = (mode.clone(), conns.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    match mode.load(Ordering::Acquire) {
                        REFUSE => {
                            drop(client);
                            continue;
                        }
                        BLACK_HOLE => {
                            // Accepted, and never answered: held until the proxy goes.
                            conns.lock().await.push(tokio::spawn(async move {
                                let _held = client;
                                std::future::pending::<()>().await;
                            }));
                            continue;
                        }
                        _ => {}
                    }
                    let Ok(server) = TcpStream::connect(&upstream).await else { continue };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let mut conns = conns.lock().await;
                    if mode.load(Ordering::Acquire) == REFUSE {
                        // Refused while the upstream connection was being made: `refuse` has
                        // closed the others already, so this one is closed here.
                        continue;
                    }
                    conns.push(tokio::spawn(pump(cr, sw, mode.clone())));
                    conns.push(tokio::spawn(pump(sr, cw, mode.clone())));
                }
            })
        };
        Ok(Proxy { addr, mode, conns, accept })
    }

    /// Where to connect instead of the service.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Closes every connection and refuses new ones (a service that is down).
    pub async fn refuse(&self) {
        self.mode.store(REFUSE, Ordering::Release);
        for c in self.conns.lock().await.drain(..) {
            c.abort();
        }
    }

    /// Stops moving bytes on every connection and accepts new ones without answering (a black
    /// hole: no RST, no data).
    pub fn black_hole(&self) {
        self.mode.store(BLACK_HOLE, Ordering::Release);
    }

    /// Forwards again (connections held in the black hole go on; refused ones are gone).
    pub fn restore(&self) {
        self.mode.store(FORWARD, Ordering::Release);
    }
}
