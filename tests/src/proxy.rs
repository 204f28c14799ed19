//! A throttling TCP proxy for the slow-link chaos scenario: forwards every connection to an
//! upstream address at a fixed rate in each direction, like a slow link between a cloud worker
//! and its coordinator. Loopback only; stops when dropped.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A running proxy. `addr` is where clients connect.
pub struct Throttle {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Throttle {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream` at `bytes_per_s` each way.
    pub async fn start(upstream: SocketAddr, bytes_per_s: u64) -> std::io::Result<Throttle> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, bytes_per_s), pump(sr, cw, bytes_per_s));
                });
            }
        });
        Ok(Throttle { addr, task })
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
/// at `bytes_per_s`.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    bytes_per_s: u64,
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
        tokio::time::sleep(Duration::from_secs_f64(n as f64 / bytes_per_s as f64)).await;
    }
    let _ = to.shutdown().await;
}
