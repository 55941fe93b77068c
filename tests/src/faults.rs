//! A fault-injecting TCP proxy for the links between control-plane nodes.
//!
//! Every node is reached by its peers through a [`Proxy`] (one for its Raft
//! port, one for its admin port, advertised with `--advertise-raft` and
//! `--advertise-admin`), and every node opens its own connections from a
//! loopback address of its own, `127.0.1.N` (`--peer-source-ip`). A proxy
//! therefore knows, for each connection, which node opened it (the source)
//! and which node it leads to (its own), and applies the [`Fault`] that the
//! [`FaultNet`] holds for each direction of that pair:
//!
//! - bytes from the opener to the proxy's node follow the rule `src -> dst`,
//! - bytes back (the replies) follow the rule `dst -> src`,
//!
//! so a rule is about a direction of traffic between two nodes, whichever of
//! them opened the connection, as with packets on a real network. Rules can be
//! changed at any time and act on open connections at once.
//!
//! Connections from other addresses (the test's own clients on 127.0.0.1)
//! are "node 0" and follow the rules for 0 like any other, which by default
//! pass.
//!
//! The proxies run on a runtime of their own, so a test that blocks its own
//! threads (waiting for a process, running `gatehousectl`) never stalls the
//! cluster's traffic.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// What happens to the bytes of one direction between two nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forwarded as they come.
    Pass,
    /// Forwarded after this delay, in order.
    Delay(Duration),
    /// Accepted and never forwarded: the connection stays open and silent.
    /// A connection that lost bytes this way is closed once the rule is
    /// lifted, since its byte stream has a gap (TCP would have given up too).
    Blackhole,
    /// Connections are closed, and new ones closed as soon as accepted. A
    /// connection carries both directions, so this cuts the pair both ways
    /// for connections; use [`Fault::Blackhole`] for a one-way cut.
    Drop,
}

/// The loopback address node `id` opens its peer connections from.
pub fn source_ip(id: u64) -> IpAddr {
    assert!(
        (1..=254).contains(&id),
        "node ids 1..=254 have a source address"
    );
    IpAddr::V4(Ipv4Addr::new(127, 0, 1, id as u8))
}

/// The node a connection comes from: `127.0.1.N` is node N, anything else 0.
fn node_of(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) if v4.octets()[..3] == [127, 0, 1] => u64::from(v4.octets()[3]),
        _ => 0,
    }
}

/// The rules for every directed pair of nodes, and the proxies' runtime.
pub struct FaultNet {
    rules: Mutex<HashMap<(u64, u64), Fault>>,
    /// Bumped on every change, so open connections look at the rules again.
    generation: watch::Sender<u64>,
    /// Taken by [`FaultNet::shutdown`]: its tasks hold this value, so
    /// dropping the last handle alone would never end them.
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    /// Connections closed or starved by a rule, for the drills' figures.
    pub cut_connections: AtomicU64,
}

impl FaultNet {
    pub fn new() -> Result<Arc<FaultNet>> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fault-proxy")
            .enable_all()
            .build()?;
        Ok(Arc::new(FaultNet {
            rules: Mutex::new(HashMap::new()),
            generation: watch::channel(0).0,
            runtime: Mutex::new(Some(runtime)),
            cut_connections: AtomicU64::new(0),
        }))
    }

    /// The rule for bytes from `src` to `dst` (`Pass` unless set).
    pub fn rule(&self, src: u64, dst: u64) -> Fault {
        let rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        rules.get(&(src, dst)).copied().unwrap_or(Fault::Pass)
    }

    /// Sets the rule for bytes from `src` to `dst`.
    pub fn set(&self, src: u64, dst: u64, fault: Fault) {
        self.rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((src, dst), fault);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Sets `fault` both ways between every node of `a` and every node of `b`.
    pub fn partition(&self, a: &[u64], b: &[u64], fault: Fault) {
        {
            let mut rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
            for x in a {
                for y in b {
                    rules.insert((*x, *y), fault);
                    rules.insert((*y, *x), fault);
                }
            }
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// Every rule back to `Pass`.
    pub fn heal(&self) {
        self.rules.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.generation.send_modify(|g| *g += 1);
    }

    /// Stops every proxy and closes every connection through them.
    pub fn shutdown(&self) {
        let rt = self
            .runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(rt) = rt {
            rt.shutdown_background();
        }
    }

    /// Starts a proxy on a free loopback port in front of node `dst`; it
    /// refuses connections until [`Proxy::set_target`] says where `dst` is.
    pub fn proxy(self: &Arc<Self>, dst: u64) -> Result<Proxy> {
        let rt = self
            .runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|rt| rt.handle().clone())
            .ok_or_else(|| anyhow::anyhow!("the fault network was shut down"))?;
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let target = Arc::new(Mutex::new(None));
        let net = self.clone();
        let task_target = target.clone();
        let task = rt.spawn(async move {
            let Ok(listener) = TcpListener::from_std(std_listener) else {
                return;
            };
            loop {
                let Ok((client, peer)) = listener.accept().await else {
                    continue;
                };
                let to = *task_target.lock().unwrap_or_else(|p| p.into_inner());
                let Some(to) = to else { continue };
                let net = net.clone();
                tokio::spawn(async move {
                    net.serve(client, node_of(peer.ip()), dst, to).await;
                });
            }
        });
        Ok(Proxy { addr, target, task })
    }

    /// One connection from node `src` to node `dst` (listening at `to`).
    async fn serve(self: Arc<Self>, client: TcpStream, src: u64, dst: u64, to: SocketAddr) {
        if self.rule(src, dst) == Fault::Drop || self.rule(dst, src) == Fault::Drop {
            self.cut_connections.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Ok(server) = TcpStream::connect(to).await else {
            return;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (client_r, client_w) = client.into_split();
        let (server_r, server_w) = server.into_split();
        let lost_up = Arc::new(AtomicBool::new(false));
        let lost_down = Arc::new(AtomicBool::new(false));
        let up = self.pump(client_r, server_w, (src, dst), lost_up.clone());
        let down = self.pump(server_r, client_w, (dst, src), lost_down.clone());
        let mut generation = self.generation.subscribe();
        let watcher = async {
            loop {
                if generation.changed().await.is_err() {
                    return;
                }
                let (there, back) = (self.rule(src, dst), self.rule(dst, src));
                let gap = (lost_up.load(Ordering::Relaxed) && there != Fault::Blackhole)
                    || (lost_down.load(Ordering::Relaxed) && back != Fault::Blackhole);
                if there == Fault::Drop || back == Fault::Drop || gap {
                    self.cut_connections.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        };
        // Whichever ends first ends the connection: dropping the halves closes it.
        tokio::select! {
            _ = up => {}
            _ = down => {}
            _ = watcher => {}
        }
    }

    /// Copies one direction under the rule for `link`, read when each chunk
    /// arrives; sets `lost` when a chunk is swallowed.
    async fn pump(
        &self,
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        link: (u64, u64),
        lost: Arc<AtomicBool>,
    ) {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
        let reader = async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match from.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let at = match self.rule(link.0, link.1) {
                    Fault::Pass => Instant::now(),
                    Fault::Delay(d) => Instant::now() + d,
                    Fault::Blackhole => {
                        lost.store(true, Ordering::Relaxed);
                        continue;
                    }
                    Fault::Drop => return,
                };
                if tx.send((at, buf[..n].to_vec())).is_err() {
                    return;
                }
            }
        };
        let writer = async move {
            while let Some((at, bytes)) = rx.recv().await {
                tokio::time::sleep_until(at).await;
                if to.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            let _ = to.shutdown().await;
        };
        // The writer drains what the reader queued before an EOF.
        let (_, _) = tokio::join!(reader, writer);
    }
}

/// A proxy in front of one node's port.
pub struct Proxy {
    /// Where peers connect (what the node advertises).
    pub addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Where the node really listens.
    pub fn set_target(&self, to: SocketAddr) {
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = Some(to);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server, a proxy in front of it as node 2, and a client
    /// connecting from node 1's address.
    async fn setup(net: &Arc<FaultNet>) -> (Proxy, TcpStream) {
        let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let echo_addr = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in echo.incoming() {
                let Ok(mut s) = stream else { return };
                std::thread::spawn(move || {
                    let mut r = s.try_clone().unwrap();
                    let _ = std::io::copy(&mut r, &mut s);
                });
            }
        });
        let proxy = net.proxy(2).unwrap();
        proxy.set_target(echo_addr);
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source_ip(1), 0)).unwrap();
        let stream = socket.connect(proxy.addr).await.unwrap();
        (proxy, stream)
    }

    async fn round_trip(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
        let started = std::time::Instant::now();
        stream.write_all(b"ping").await.ok()?;
        let mut buf = [0u8; 4];
        match tokio::time::timeout(within, stream.read_exact(&mut buf)).await {
            Ok(Ok(_)) if &buf == b"ping" => Some(started.elapsed()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn passes_delays_blackholes_and_drops() {
        let net = FaultNet::new().unwrap();
        let (_proxy, mut stream) = setup(&net).await;
        // Ends every proxy task, which hold the net, when the test ends.
        struct Shutdown(Arc<FaultNet>);
        impl Drop for Shutdown {
            fn drop(&mut self) {
                self.0.shutdown();
            }
        }
        let _shutdown = Shutdown(net.clone());
        assert!(round_trip(&mut stream, Duration::from_secs(2))
            .await
            .is_some());

        net.set(1, 2, Fault::Delay(Duration::from_millis(300)));
        let took = round_trip(&mut stream, Duration::from_secs(2))
            .await
            .unwrap();
        assert!(took >= Duration::from_millis(300), "{took:?}");

        // One way only: the replies (2 -> 1) are swallowed.
        net.set(1, 2, Fault::Pass);
        net.set(2, 1, Fault::Blackhole);
        assert!(round_trip(&mut stream, Duration::from_millis(500))
            .await
            .is_none());
        // Lifting it closes the connection that lost bytes.
        net.heal();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");

        // A new connection works again, and is closed by Drop.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source_ip(1), 0)).unwrap();
        let mut stream = socket.connect(_proxy.addr).await.unwrap();
        assert!(round_trip(&mut stream, Duration::from_secs(2))
            .await
            .is_some());
        net.partition(&[1], &[2], Fault::Drop);
        let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        assert!(net.cut_connections.load(Ordering::Relaxed) >= 2);

        // A client from 127.0.0.1 is node 0, not cut by the 1-2 partition.
        let mut outside = TcpStream::connect(_proxy.addr).await.unwrap();
        assert!(round_trip(&mut outside, Duration::from_secs(2))
            .await
            .is_some());
    }
}
