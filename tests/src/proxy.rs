//! Proxies that break the link between a client and a coordinator in one controlled way:
//!
//! - [`Throttle`], a TCP proxy for the slow-link chaos scenario: forwards every connection to
//!   an upstream address at a fixed rate in each direction, like a slow link between a cloud
//!   worker and its coordinator;
//! - [`LoseFirstReply`], a gRPC proxy in front of a coordinator's JobService that lets the first
//!   call of one method reach the coordinator and then loses its reply (the client sees
//!   UNAVAILABLE, as when a connection breaks after the request went out), for tests of
//!   retries that must not do the work twice.
//!
//! Loopback only; each stops when dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tonic::body::Body;
use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::transport::Channel;

/// A running proxy. `addr` is where clients connect.
pub struct Throttle {
    pub addr: SocketAddr,
    /// Bytes carried from clients to the upstream, all connections together.
    sent_upstream: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Throttle {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream` at `bytes_per_s` each way.
    pub async fn start(upstream: SocketAddr, bytes_per_s: u64) -> std::io::Result<Throttle> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let sent_upstream = Arc::new(AtomicU64::new(0));
        let counter = sent_upstream.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(
                        pump(cr, sw, bytes_per_s, Some(&counter)),
                        pump(sr, cw, bytes_per_s, None)
                    );
                });
            }
        });
        Ok(Throttle {
            addr,
            sent_upstream,
            task,
        })
    }

    /// How many bytes clients have sent through the proxy so far (requests, uploads included).
    pub fn bytes_sent_upstream(&self) -> u64 {
        self.sent_upstream.load(Ordering::Relaxed)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` in chunks of at most 4 KiB, sleeping after each so that the rate stays
/// at `bytes_per_s`; adds what it copied to `carried`, if given.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    bytes_per_s: u64,
    carried: Option<&AtomicU64>,
) {
    let mut buf = vec![0u8; 4096];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        if let Some(c) = carried {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_secs_f64(n as f64 / bytes_per_s as f64)).await;
    }
    let _ = to.shutdown().await;
}

/// A JobService proxy that loses the reply to the first call of one method.
pub struct LoseFirstReply {
    pub addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl LoseFirstReply {
    /// Listens on 127.0.0.1 (a free port) and forwards JobService calls to `upstream` (a URL
    /// such as `http://127.0.0.1:50051`); the first call of `method` (for example `SubmitJob`)
    /// is answered UNAVAILABLE after the coordinator has answered it.
    pub async fn start(upstream: &str, method: &str) -> anyhow::Result<LoseFirstReply> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let calls = Arc::new(AtomicUsize::new(0));
        let service = Lossy {
            upstream: Channel::from_shared(upstream.to_owned())?.connect_lazy(),
            path: format!("/{}/{method}", Lossy::NAME),
            calls: calls.clone(),
        };
        let task = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        Ok(LoseFirstReply { addr, calls, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many calls of the method came through (the lost one included).
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Drop for LoseFirstReply {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct Lossy {
    upstream: Channel,
    /// `/trainq.v1.JobService/<method>`.
    path: String,
    calls: Arc<AtomicUsize>,
}

impl NamedService for Lossy {
    const NAME: &'static str = "trainq.v1.JobService";
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl Service<http::Request<Body>> for Lossy {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let lose =
            request.uri().path() == self.path && self.calls.fetch_add(1, Ordering::SeqCst) == 0;
        let mut upstream = self.upstream.clone();
        Box::pin(async move {
            let unavailable = |why: String| tonic::Status::unavailable(why).into_http();
            if let Err(e) = std::future::poll_fn(|cx| upstream.poll_ready(cx)).await {
                return Ok(unavailable(format!("proxy: upstream not ready: {e}")));
            }
            match upstream.call(request).await {
                // The coordinator has answered (its work is committed); the client never hears.
                Ok(_) if lose => Ok(unavailable("proxy: the reply was lost".into())),
                Ok(response) => Ok(response),
                Err(e) => Ok(unavailable(format!("proxy: upstream failed: {e}"))),
            }
        })
    }
}

/// A TCP load balancer in front of several coordinator replicas, as a Kubernetes Service (kube-
/// proxy) or an L4 balancer is: each new connection goes to the next replica in turn that
/// accepts one; a replica that refuses (it is down) is skipped. A connection stays on its
/// replica until either side closes it, so when a replica dies its clients see their
/// connections end and reconnect, through the balancer, to the others.
pub struct Balancer {
    pub addr: SocketAddr,
    /// How many connections went to each backend so far, in the order given.
    connections: Arc<Vec<AtomicU64>>,
    task: JoinHandle<()>,
}

impl Balancer {
    /// Listens on 127.0.0.1 (a free port) and spreads connections over `backends`.
    pub async fn start(backends: Vec<SocketAddr>) -> std::io::Result<Balancer> {
        assert!(!backends.is_empty(), "a balancer needs a backend");
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let connections: Arc<Vec<AtomicU64>> =
            Arc::new(backends.iter().map(|_| AtomicU64::new(0)).collect());
        let counts = connections.clone();
        let task = tokio::spawn(async move {
            let next = Arc::new(AtomicUsize::new(0));
            while let Ok((mut client, _)) = listener.accept().await {
                let (backends, counts, next) = (backends.clone(), counts.clone(), next.clone());
                tokio::spawn(async move {
                    let first = next.fetch_add(1, Ordering::Relaxed);
                    for k in 0..backends.len() {
                        let i = (first + k) % backends.len();
                        let Ok(mut server) = TcpStream::connect(backends[i]).await else {
                            continue;
                        };
                        counts[i].fetch_add(1, Ordering::Relaxed);
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        return;
                    }
                });
            }
        });
        Ok(Balancer {
            addr,
            connections,
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections each backend has been given so far, in the order of `start`'s list.
    pub fn connections(&self) -> Vec<u64> {
        self.connections
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
