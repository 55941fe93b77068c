//! Raft RPCs over gRPC: the client side openraft drives, and the service
//! that hands incoming messages to the local Raft.
//!
//! openraft's messages travel as JSON inside `RaftRequest.data`, with the
//! target's identity beside them (see [`crate::identity`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gatehouse_proto::pb;
use gatehouse_proto::pb::raft_client::RaftClient;
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status};

use crate::identity::{FlushFn, Identity};
use crate::types::{NodeId, NodeInfo, Raft, TypeConfig};

/// Lazily connected channels, one per address, shared by all clients; over
/// mutual TLS when the node has certificates.
#[derive(Clone, Default)]
pub struct Channels {
    map: Arc<Mutex<HashMap<String, Channel>>>,
    tls: Arc<Mutex<Option<ClientTlsConfig>>>,
    /// The local address connections to other nodes are opened from
    /// (`--peer-source-ip`); the system's choice when `None`.
    source_ip: Option<IpAddr>,
}

impl Channels {
    /// Channels whose connections are opened from `source_ip`, when given.
    pub fn with_source_ip(source_ip: Option<IpAddr>) -> Channels {
        Channels {
            source_ip,
            ..Channels::default()
        }
    }

    /// A channel to `addr` (host:port); connects on first use, reconnects after failures.
    pub fn get(&self, addr: &str) -> Result<Channel, Status> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let tls = self.tls.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| Status::invalid_argument(format!("address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .local_address(self.source_ip);
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config(tls.domain_name(gatehouse_proto::tls::host_of(addr)))
                .map_err(|e| Status::internal(format!("TLS for {addr}: {e}")))?;
        }
        let channel = endpoint.connect_lazy();
        map.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// Uses `tls` for new connections from now on (after a reload, too).
    pub fn set_tls(&self, tls: ClientTlsConfig) {
        *self.tls.lock().unwrap_or_else(|p| p.into_inner()) = Some(tls);
        self.map.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// Makes openraft's per-target clients.
#[derive(Clone)]
pub struct Network {
    pub identity: Arc<Identity>,
    pub channels: Channels,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Connection {
        Connection {
            target,
            incarnation: node.incarnation.clone(),
            cluster_id: self.identity.cluster_id().unwrap_or_default(),
            channel: self.channels.get(&node.raft_addr),
        }
    }
}

/// A client for one target node.
pub struct Connection {
    target: NodeId,
    incarnation: String,
    cluster_id: String,
    channel: Result<Channel, Status>,
}

#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    Snapshot,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>;

impl Connection {
    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        option: RPCOption,
        entries: usize,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let channel = self
            .channel
            .clone()
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let data = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        // Over the message limit: ask openraft to send fewer entries at once
        // (one entry always fits: admin requests are capped well below it).
        if data.len() > gatehouse_proto::MAX_RAFT_MESSAGE_BYTES * 3 / 4 && entries > 1 {
            return Err(RPCError::PayloadTooLarge(
                PayloadTooLarge::new_entries_hint((entries / 2) as u64),
            ));
        }
        let mut request = Request::new(pb::RaftRequest {
            cluster_id: self.cluster_id.clone(),
            target_id: self.target,
            target_incarnation: self.incarnation.clone(),
            data,
        });
        request.set_timeout(option.hard_ttl());
        let mut client = RaftClient::new(channel)
            .max_decoding_message_size(gatehouse_proto::MAX_RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(gatehouse_proto::MAX_RAFT_MESSAGE_BYTES);
        let reply = match rpc {
            Rpc::Append => client.append_entries(request).await,
            Rpc::Vote => client.vote(request).await,
            Rpc::Snapshot => client.install_snapshot(request).await,
        };
        let reply = reply.map_err(|status| match status.code() {
            // Not reachable, or it refuses us as it is (wiped, another cluster): back off.
            tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::FailedPrecondition => RPCError::Unreachable(Unreachable::new(&status)),
            _ => RPCError::Network(NetworkError::new(&status)),
        })?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            serde_json::from_slice(&reply.into_inner().data)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        let entries = rpc.entries.len();
        self.call(Rpc::Append, &rpc, option, entries).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(Rpc::Snapshot, &rpc, option, 0).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call(Rpc::Vote, &rpc, option, 0).await
    }
}

/// The gRPC service that receives raft traffic for the local node.
pub struct RaftService {
    pub raft: Raft,
    pub identity: Arc<Identity>,
    /// Makes a join durable before it is acknowledged.
    pub flush: FlushFn,
    /// With TLS, only peers whose certificate says `control_plane` may talk Raft.
    pub tls: bool,
    /// The data planes connected here, which peers ask for.
    pub data_planes: Arc<crate::stream::Registry>,
}

fn decode<T: DeserializeOwned>(req: &pb::RaftRequest) -> Result<T, Status> {
    serde_json::from_slice(&req.data)
        .map_err(|e| Status::invalid_argument(format!("malformed raft message: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<Response<pb::RaftReply>, Status> {
    serde_json::to_vec(value)
        .map(|data| Response::new(pb::RaftReply { data }))
        .map_err(|e| Status::internal(format!("cannot encode raft reply: {e}")))
}

impl RaftService {
    /// With TLS, the peer's certificate (verified against the cluster CA)
    /// must be a control-plane node's: a data plane's or an admin's may not.
    fn admit_peer<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if !self.tls {
            return Ok(());
        }
        match gatehouse_proto::tls::peer_identity(request) {
            Some(peer) if peer.role == "control_plane" => Ok(()),
            Some(peer) => Err(Status::permission_denied(format!(
                "raft traffic needs a control-plane certificate; {} has role {}",
                peer.name, peer.role
            ))),
            None => Err(Status::unauthenticated(
                "raft traffic needs a control-plane client certificate",
            )),
        }
    }

    fn admit(&self, req: &pb::RaftRequest) -> Result<(), Status> {
        self.identity
            .check(&req.cluster_id, req.target_id, &req.target_incarnation)
            .map_err(|e| {
                tracing::warn!(error = %e, "refusing raft traffic");
                Status::failed_precondition(e.to_string())
            })
    }
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        self.admit_peer(&request)?;
        let req = request.into_inner();
        self.admit(&req)?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(&req)?;
        encode(&self.raft.append_entries(rpc).await)
    }

    async fn vote(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        self.admit_peer(&request)?;
        let req = request.into_inner();
        self.admit(&req)?;
        let rpc: VoteRequest<NodeId> = decode(&req)?;
        encode(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        self.admit_peer(&request)?;
        let req = request.into_inner();
        self.admit(&req)?;
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(&req)?;
        encode(&self.raft.install_snapshot(rpc).await)
    }

    async fn data_planes(
        &self,
        request: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        self.admit_peer(&request)?;
        self.admit(request.get_ref())?;
        encode(&self.data_planes.names())
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinReply>, Status> {
        self.admit_peer(&request)?;
        let req = request.into_inner();
        if req.node_id != self.identity.node_id {
            return Err(Status::failed_precondition(format!(
                "this is node {}, not node {}",
                self.identity.node_id, req.node_id
            )));
        }
        if req.cluster_id.is_empty() {
            return Err(Status::invalid_argument("cluster_id: is required"));
        }
        self.identity
            .join(&req.cluster_id, &req.bootstrap_token_hash)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        (self.flush)().await.map_err(Status::internal)?;
        Ok(Response::new(pb::JoinReply {
            incarnation: self.identity.incarnation.clone(),
        }))
    }
}

/// How often a node adds up the data planes of the whole cluster.
pub const DATA_PLANE_COUNT_INTERVAL: Duration = Duration::from_secs(2);

/// Adds up, every [`DATA_PLANE_COUNT_INTERVAL`], the distinct data planes
/// (by name) connected to this node and to every other member it reaches,
/// and records the sum in `registry`, which the config stream's heartbeats
/// carry to the data planes (the divisor of the `local` failure mode's
/// share). A member that does not answer in time counts for none of its
/// data planes this round, so the count may dip, never exceed the truth
/// (a data plane counted on two nodes while it moves counts once).
pub async fn count_cluster_data_planes(
    raft: Raft,
    identity: Arc<Identity>,
    channels: Channels,
    registry: Arc<crate::stream::Registry>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let members: Vec<(NodeId, NodeInfo)> = {
            let m = raft.metrics();
            let m = m.borrow();
            m.membership_config
                .membership()
                .nodes()
                .map(|(id, n)| (*id, n.clone()))
                .collect()
        };
        let cluster_id = identity.cluster_id().unwrap_or_default();
        let asks = members
            .into_iter()
            .filter(|(id, _)| *id != identity.node_id)
            .map(|(id, node)| {
                let channel = channels.get(&node.raft_addr);
                let cluster_id = cluster_id.clone();
                async move {
                    let mut request = Request::new(pb::RaftRequest {
                        cluster_id,
                        target_id: id,
                        target_incarnation: node.incarnation.clone(),
                        data: Vec::new(),
                    });
                    request.set_timeout(Duration::from_secs(1));
                    let mut client = RaftClient::new(channel.ok()?);
                    let reply =
                        tokio::time::timeout(Duration::from_secs(1), client.data_planes(request))
                            .await
                            .ok()?
                            .ok()?;
                    serde_json::from_slice::<Vec<String>>(&reply.into_inner().data).ok()
                }
            });
        let mut names: std::collections::HashSet<String> = registry.names().into_iter().collect();
        for theirs in futures::future::join_all(asks).await.into_iter().flatten() {
            names.extend(theirs);
        }
        registry.set_cluster_count(names.len() as u64);
        tokio::select! {
            () = tokio::time::sleep(DATA_PLANE_COUNT_INTERVAL) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}
