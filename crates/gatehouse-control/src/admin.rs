//! The admin API: reads and writes of configuration objects, and cluster
//! membership. Every node serves it; writes and linearizable reads that
//! reach a follower are forwarded to the leader once.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use gatehouse_model::audit::Origin;
use gatehouse_model::object::{AdminRole, AdminToken, ApiKey};
use gatehouse_model::seal::{self, SealKey};
use gatehouse_model::selector::Selector;
use gatehouse_model::{admintoken, apikey, audit};
use gatehouse_model::{Command, Kind, Object, ObjectRef, Op, WriteError, WriteOk};
use gatehouse_proto::pb::admin_client::AdminClient;
use gatehouse_proto::pb::raft_client::RaftClient;
use gatehouse_proto::{
    pb, FORWARDED, LEADER_HINT, MAX_ADMIN_REQUEST_BYTES, MAX_ADMIN_RESPONSE_BYTES, NOT_APPLIED,
};
use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::{ChangeMembers, Membership, RaftMetrics, ServerState};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::auth::{Auth, Caller, Need};
use crate::identity::{FlushFn, Identity};
use crate::network::Channels;
use crate::store::Shared;
use crate::stream::Registry;
use crate::types::{NodeId, NodeInfo, Raft};

/// How long a forwarded call or a status probe of another node may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The admin service of one node.
pub struct AdminService {
    pub raft: Raft,
    pub sm: Arc<Shared>,
    pub identity: Arc<Identity>,
    pub info: NodeInfo,
    pub channels: Channels,
    /// The data planes watching this node.
    pub data_planes: Arc<Registry>,
    /// Makes the identity durable before a join is acknowledged.
    pub flush: FlushFn,
    pub auth: Arc<Auth>,
    /// Seals key material before it enters the log (secrets at rest).
    pub seal: Option<SealKey>,
    pub metrics: Arc<crate::ops::Metrics>,
}

/// How long a linearizable read waits for the leader to apply its log.
const READ_CATCH_UP: Duration = Duration::from_secs(10);

/// Why a call could not be served here.
enum Failure {
    /// Only the leader can serve it; here is what is known of the leader.
    NotLeader(Option<NodeId>, Option<NodeInfo>),
    Status(Status),
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        Failure::Status(s)
    }
}

impl Failure {
    fn into_status(self) -> Status {
        match self {
            Failure::Status(s) => s,
            Failure::NotLeader(id, node) => {
                let mut status = Status::unavailable(match id {
                    Some(id) => format!("node {id} is the leader; ask it directly"),
                    None => {
                        "no leader is known yet (an election may be in progress); retry shortly"
                            .to_string()
                    }
                });
                if let Some(addr) = node.and_then(|n| n.admin_addr.parse().ok()) {
                    status.metadata_mut().insert(LEADER_HINT, addr);
                }
                status
                    .metadata_mut()
                    .insert(NOT_APPLIED, "1".parse().expect("ascii"));
                status
            }
        }
    }
}

pub fn write_status(e: &WriteError) -> Status {
    Status::new(gatehouse_proto::grpc_code(e.code()), e.to_string())
}

fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

fn fatal(e: impl std::fmt::Display) -> Status {
    Status::internal(format!("raft is not running on this node: {e}"))
}

fn is_forwarded<T>(req: &Request<T>) -> bool {
    req.metadata().contains_key(FORWARDED)
}

fn put_op(msg: pb::PutRequest) -> Result<Op, Status> {
    let object = msg
        .object
        .ok_or_else(|| Status::invalid_argument("object: is required"))?;
    Ok(Op::Put {
        object: Object::try_from(object).map_err(invalid)?,
        expected_revision: msg.expected_revision,
    })
}

fn delete_op(msg: pb::DeleteRequest) -> Result<Op, Status> {
    let target = msg
        .target
        .ok_or_else(|| Status::invalid_argument("target: is required"))?;
    Ok(Op::Delete {
        target: ObjectRef::try_from(target).map_err(invalid)?,
        expected_revision: msg.expected_revision,
    })
}

fn write_response(ok: WriteOk) -> Response<pb::WriteResponse> {
    Response::new(pb::WriteResponse {
        revision: ok.revision,
        changed: ok.changed as u32,
    })
}

fn member(id: NodeId, n: &NodeInfo) -> pb::Member {
    pb::Member {
        id,
        raft_addr: n.raft_addr.clone(),
        admin_addr: n.admin_addr.clone(),
    }
}

fn membership_response(log_index: u64, m: &Membership<NodeId, NodeInfo>) -> pb::MembershipResponse {
    let voters: BTreeSet<NodeId> = m.voter_ids().collect();
    let (mut v, mut l) = (Vec::new(), Vec::new());
    for (id, node) in m.nodes() {
        if voters.contains(id) {
            v.push(member(*id, node));
        } else {
            l.push(member(*id, node));
        }
    }
    pb::MembershipResponse {
        log_index,
        voters: v,
        learners: l,
    }
}

fn check_member(m: &pb::Member) -> Result<(), Status> {
    for (field, addr) in [("raft_addr", &m.raft_addr), ("admin_addr", &m.admin_addr)] {
        addr.parse::<std::net::SocketAddr>()
            .map(|_| ())
            .or_else(|_| {
                addr.rsplit_once(':')
                    .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
                    .map(|_| ())
                    .ok_or(())
            })
            .map_err(|_| {
                Status::invalid_argument(format!(
                    "member {}: {field}: {addr:?} is not host:port",
                    m.id
                ))
            })?;
    }
    Ok(())
}

fn role(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

impl AdminService {
    fn metrics(&self) -> RaftMetrics<NodeId, NodeInfo> {
        self.raft.metrics().borrow().clone()
    }

    /// `Ok` when this node is the leader, or what is known of the leader.
    fn ensure_leader(&self) -> Result<(), Failure> {
        let m = self.metrics();
        if m.state == ServerState::Leader && m.current_leader == Some(self.identity.node_id) {
            return Ok(());
        }
        let node = m
            .current_leader
            .and_then(|id| m.membership_config.membership().get_node(&id).cloned());
        Err(Failure::NotLeader(m.current_leader, node))
    }

    async fn client(&self, addr: &str) -> Result<AdminClient<Channel>, Status> {
        Ok(AdminClient::new(self.channels.get(addr)?)
            .max_decoding_message_size(MAX_ADMIN_RESPONSE_BYTES)
            .max_encoding_message_size(MAX_ADMIN_REQUEST_BYTES))
    }

    /// Records a membership change in the audit log, in a command of its own
    /// after the change (a change whose record fails is logged here instead).
    async fn record_membership(&self, caller: &Caller, action: audit::Action, nodes: Vec<NodeId>) {
        let cmd = Command {
            membership: Some(audit::MembershipChange { action, nodes }),
            ..Command::default()
        };
        if self.write(caller, cmd).await.is_err() {
            tracing::warn!(actor = %caller.actor, ?action, "membership changed, but its audit record could not be written");
        }
    }

    /// Authenticates the caller and checks it may do `need`. A token made
    /// moments ago may be in this node's log but not applied yet: then wait
    /// (briefly) for the log to be applied before calling the token unknown.
    async fn caller<T>(&self, request: &Request<T>, need: Need) -> Result<Caller, Status> {
        if let Ok(caller) = self.auth.lookup(request) {
            caller.require(need)?;
            return Ok(caller);
        }
        let m = self.metrics();
        let applied = m.last_applied.map(|l| l.index);
        if m.last_log_index > applied {
            let _ = self
                .raft
                .wait(Some(Duration::from_secs(2)))
                .applied_index_at_least(m.last_log_index, "token lookup")
                .await;
        }
        self.auth.check(request, need)
    }

    /// Sends the call to the leader, marked so that it is not forwarded again.
    async fn forward<T, R, F, Fut>(
        &self,
        leader: &NodeInfo,
        credentials: Option<(&'static str, MetadataValue<Ascii>)>,
        msg: T,
        call: F,
    ) -> Result<Response<R>, Status>
    where
        F: FnOnce(AdminClient<Channel>, Request<T>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        let client = self.client(&leader.admin_addr).await?;
        let mut request = Request::new(msg);
        request
            .metadata_mut()
            .insert(FORWARDED, "1".parse().expect("ascii"));
        // The leader checks the caller's token again, against its own state.
        if let Some((key, value)) = credentials {
            request.metadata_mut().insert(key, value);
        }
        request.set_timeout(FORWARD_TIMEOUT);
        call(client, request).await.map_err(|s| match s.code() {
            // Trouble on the way to the leader: say where it happened.
            tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded => {
                let mut wrapped = Status::new(
                    s.code(),
                    format!(
                        "forwarding to the leader at {}: {}",
                        leader.admin_addr,
                        s.message()
                    ),
                );
                *wrapped.metadata_mut() = s.metadata().clone();
                wrapped
            }
            _ => s,
        })
    }

    /// Commits a command through Raft on this node, which must be the leader,
    /// recording `caller` and this node's clock for the audit log.
    async fn write(&self, caller: &Caller, mut cmd: Command) -> Result<WriteOk, Failure> {
        // Key material is checked in the clear, then sealed for the log.
        for op in &mut cmd.ops {
            if let Op::Put { object, .. } = op {
                seal::open_object(object, self.seal.as_ref()).map_err(invalid)?;
            }
        }
        cmd.validate_standalone().map_err(|e| write_status(&e))?;
        // The cluster's first write through the bootstrap token also stores
        // the token (as the node itself does when idle), so creating another
        // token first does not lock the bootstrap token out.
        if caller.unstored_bootstrap {
            let bootstrap = ObjectRef {
                kind: Kind::AdminToken,
                name: crate::auth::BOOTSTRAP_TOKEN_NAME.to_string(),
            };
            let hash = self.identity.bootstrap_hash().filter(|h| !h.is_empty());
            // Decided now, not when the caller signed in: a token stored or
            // revoked meanwhile must not be written again.
            let none_stored = self
                .sm
                .read(|d| d.config.list(Kind::AdminToken).next().is_none());
            let touched = cmd.ops.iter().any(|op| op.target() == bootstrap);
            if let (Some(hash), true, false) = (hash, none_stored, touched) {
                let token = AdminToken {
                    name: bootstrap.name,
                    labels: Default::default(),
                    revision: 0,
                    role: AdminRole::Admin,
                    token_hash: hash,
                };
                cmd.ops.insert(
                    0,
                    Op::Put {
                        object: token.into(),
                        expected_revision: Some(0),
                    },
                );
            }
        }
        if let Some(key) = &self.seal {
            for op in &mut cmd.ops {
                if let Op::Put { object, .. } = op {
                    seal::seal_object(object, key).map_err(|e| Status::internal(e.to_string()))?;
                }
            }
        }
        self.ensure_leader()?;
        cmd.origin = Some(Origin {
            actor: caller.actor.clone(),
            at_ms: now_ms(),
        });
        let _timer = crate::ops::CommitTimer::start(&self.metrics);
        match self.raft.client_write(cmd).await {
            Ok(resp) => resp.data.map_err(|e| write_status(&e).into()),
            // Leadership moved after the entry was proposed: it may yet commit,
            // so forwarding could apply it twice. Tell the truth instead.
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(Status::unavailable(
                "leadership changed while the write was in flight; its outcome is unknown: read before retrying",
            )
            .into()),
            Err(RaftError::APIError(e)) => Err(Status::failed_precondition(e.to_string()).into()),
            Err(RaftError::Fatal(e)) => Err(fatal(e).into()),
        }
    }

    /// Waits until this node's state is current (a linearizable read), unless `stale`.
    ///
    /// `ensure_linearizable` confirms leadership and waits for the log up to
    /// the first entry of the leader's term, or the commit index if later.
    /// A leader restarted with its term keeps that first entry from before
    /// the restart and starts from the commit index it last wrote down,
    /// which can be behind writes it acknowledged (it is saved off the write
    /// path): a read then could miss them. So the read also waits until
    /// everything in the leader's log is applied. The leader's log holds
    /// every committed entry, and its entries commit within a round trip
    /// once leadership is confirmed (a quorum answered).
    async fn read_barrier(&self, stale: bool) -> Result<(), Failure> {
        if stale {
            return Ok(());
        }
        match self.raft.ensure_linearizable().await {
            Ok(_) => {
                let me = self.identity.node_id;
                let last = self.raft.metrics().borrow().last_log_index;
                // Applied, or no longer the leader (its unapplied tail may
                // then never be: the read goes to the new leader).
                let caught_up = self
                    .raft
                    .wait(Some(READ_CATCH_UP))
                    .metrics(
                        |m| m.last_applied.map(|l| l.index) >= last || m.current_leader != Some(me),
                        "a linearizable read",
                    )
                    .await;
                match caught_up {
                    Ok(m) if m.current_leader != Some(me) => {
                        Err(Failure::NotLeader(m.current_leader, None))
                    }
                    Ok(_) => Ok(()),
                    Err(openraft::metrics::WaitError::ShuttingDown) => {
                        Err(fatal("raft is shutting down").into())
                    }
                    Err(e) => {
                        // The error holds the node's metrics: logged, not sent.
                        tracing::warn!(error = %e, "a linearizable read waited too long for the leader to apply its log");
                        Err(Status::unavailable(format!(
                            "the leader has not applied its log within {READ_CATCH_UP:?}; retry"
                        ))
                        .into())
                    }
                }
            }
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(Failure::NotLeader(f.leader_id, f.leader_node))
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => {
                Err(Status::unavailable(format!("the leader cannot reach a quorum: {e}")).into())
            }
            Err(RaftError::Fatal(e)) => Err(fatal(e).into()),
        }
    }

    fn local_status(&self) -> pb::NodeStatus {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let initialized = membership.nodes().next().is_some();
        let mut error = String::new();
        if let Err(e) = &m.running_state {
            error = format!("raft stopped: {e}");
        } else if let Some(refusal) = self.identity.last_refusal() {
            error = format!("refusing raft traffic: {refusal}");
        } else if !initialized {
            error = "not a member of any cluster yet".to_string();
        }
        pb::NodeStatus {
            id: self.identity.node_id,
            raft_addr: self.info.raft_addr.clone(),
            admin_addr: self.info.admin_addr.clone(),
            role: role(m.state).to_string(),
            voter: membership.voter_ids().any(|v| v == self.identity.node_id),
            term: m.current_term,
            leader_id: m.current_leader.unwrap_or_default(),
            last_log_index: m.last_log_index.unwrap_or_default(),
            last_applied: m.last_applied.map(|l| l.index).unwrap_or_default(),
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or_default(),
            purged_index: m.purged.map(|l| l.index).unwrap_or_default(),
            config_revision: self.sm.read(|d| d.config.revision()),
            initialized,
            error,
            data_planes: self
                .data_planes
                .status(self.identity.node_id, self.sm.read(|d| d.config.revision())),
            cluster_id: self.identity.cluster_id().unwrap_or_default(),
        }
    }

    /// Asks `node` to join this cluster and returns what the cluster will know of it.
    async fn join(&self, m: &pb::Member, cluster_id: &str) -> Result<NodeInfo, Status> {
        check_member(m)?;
        let mut client = RaftClient::new(self.channels.get(&m.raft_addr)?);
        let mut request = Request::new(pb::JoinRequest {
            cluster_id: cluster_id.to_string(),
            node_id: m.id,
            bootstrap_token_hash: self.identity.bootstrap_hash().unwrap_or_default(),
        });
        request.set_timeout(PROBE_TIMEOUT);
        let reply = client.join(request).await.map_err(|s| {
            Status::new(
                s.code(),
                format!(
                    "node {} at {} cannot join: {}",
                    m.id,
                    m.raft_addr,
                    s.message()
                ),
            )
        })?;
        Ok(NodeInfo {
            raft_addr: m.raft_addr.clone(),
            admin_addr: m.admin_addr.clone(),
            incarnation: reply.into_inner().incarnation,
        })
    }

    fn cluster_id(&self) -> Result<String, Status> {
        self.identity.cluster_id().ok_or_else(|| {
            Status::failed_precondition("this node has no cluster id; initialize the cluster first")
        })
    }

    async fn change(
        &self,
        change: ChangeMembers<NodeId, NodeInfo>,
    ) -> Result<pb::MembershipResponse, Status> {
        match self.raft.change_membership(change, false).await {
            Ok(resp) => {
                let m = resp
                    .membership
                    .clone()
                    .unwrap_or_else(|| self.metrics().membership_config.membership().clone());
                Ok(membership_response(resp.log_id.index, &m))
            }
            Err(RaftError::APIError(e)) => Err(Status::failed_precondition(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(fatal(e)),
        }
    }
}

/// Runs `$body` (which yields `Result<_, Failure>`); a `NotLeader` failure of a
/// call that was not forwarded yet is sent on to the leader with `$method`,
/// with the caller's token (`$auth`).
macro_rules! leader_or_forward {
    ($self:ident, $fwd:expr, $auth:expr, $msg:expr, $method:ident, $body:expr) => {{
        match $body {
            Ok(r) => Ok(r),
            Err(Failure::NotLeader(_, Some(leader))) if !$fwd => {
                $self
                    .forward(&leader, $auth, $msg, |mut c, r| async move {
                        c.$method(r).await
                    })
                    .await
            }
            Err(f) => Err(f.into_status()),
        }
    }};
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a forwarded call carries to stand for its caller: the caller's own
/// token, or (for a caller known by certificate) who it is, which the leader
/// believes because this node's certificate says `control_plane`.
fn credentials<T>(
    request: &Request<T>,
    caller: &Caller,
) -> Option<(&'static str, MetadataValue<Ascii>)> {
    // By how the caller signed in, not by which headers it happened to send.
    if !caller.actor.starts_with("cert:") {
        return request
            .metadata()
            .get("authorization")
            .map(|token| ("authorization", token.clone()));
    }
    let role = serde_json::to_value(caller.role).ok()?;
    format!("{} {}", role.as_str()?, caller.actor)
        .parse()
        .ok()
        .map(|v| (crate::auth::ON_BEHALF_OF, v))
}

/// An object as `caller` may see it: key material only for those who may
/// change configuration (sealed, when the cluster has a secrets key).
fn shown(object: &Object, caller: &Caller) -> pb::Object {
    let mut o = pb::Object::from(object);
    if !crate::auth::allows(caller.role, Need::Config) {
        if let Ok(mut spec) = serde_json::from_str::<serde_json::Value>(&o.spec_json) {
            gatehouse_model::secret::redact_json(object.kind(), &mut Vec::new(), &mut spec);
            o.spec_json = spec.to_string();
        }
    }
    o
}

/// What writing `ops` needs: managing tokens when any op touches one.
fn need_for(ops: &[Op]) -> Need {
    if ops.iter().any(|op| op.target().kind == Kind::AdminToken) {
        Need::Tokens
    } else {
        Need::Config
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let caller = self.caller(&request, Need::Read).await?;
        let fwd = is_forwarded(&request);
        let auth = credentials(&request, &caller);
        let msg = request.into_inner();
        let kind = gatehouse_proto::parse_kind("kind", &msg.kind).map_err(invalid)?;
        if kind == Kind::AdminToken {
            caller.require(Need::Tokens)?;
        }
        leader_or_forward!(
            self,
            fwd,
            auth,
            msg.clone(),
            get,
            async {
                self.read_barrier(msg.stale).await?;
                let (object, revision) = self
                    .sm
                    .read(|d| (d.config.get(kind, &msg.name).cloned(), d.config.revision()));
                let object = object.ok_or_else(|| {
                    Status::not_found(format!(
                        "{} not found",
                        ObjectRef {
                            kind,
                            name: msg.name.clone()
                        }
                    ))
                })?;
                Ok(Response::new(pb::GetResponse {
                    object: Some(shown(&object, &caller)),
                    config_revision: revision,
                }))
            }
            .await
        )
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let caller = self.caller(&request, Need::Read).await?;
        let fwd = is_forwarded(&request);
        let auth = credentials(&request, &caller);
        let msg = request.into_inner();
        let kinds: Vec<Kind> = if msg.kind.is_empty() {
            Kind::ALL.to_vec()
        } else {
            vec![gatehouse_proto::parse_kind("kind", &msg.kind).map_err(invalid)?]
        };
        let selector = Selector::parse(&msg.selector).map_err(invalid)?;
        leader_or_forward!(
            self,
            fwd,
            auth,
            msg.clone(),
            list,
            async {
                self.read_barrier(msg.stale).await?;
                let state = self.sm.read(|d| d.config.frozen());
                // Admin tokens are shown only to those who may manage them.
                let tokens_visible = crate::auth::allows(caller.role, Need::Tokens);
                let objects: Vec<pb::Object> = kinds
                    .iter()
                    .filter(|k| **k != Kind::AdminToken || tokens_visible)
                    .flat_map(|k| state.list(*k))
                    .filter(|o| selector.matches(o.labels()))
                    .map(|o| shown(o, &caller))
                    .collect();
                let revision = state.revision();
                Ok(Response::new(pb::ListResponse {
                    objects,
                    config_revision: revision,
                }))
            }
            .await
        )
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let caller = self.caller(&request, Need::Config).await?;
        let fwd = is_forwarded(&request);
        let auth = credentials(&request, &caller);
        let msg = request.into_inner();
        let op = put_op(msg.clone())?;
        caller.require(need_for(std::slice::from_ref(&op)))?;
        leader_or_forward!(
            self,
            fwd,
            auth,
            msg,
            put,
            self.write(&caller, op.into()).await.map(write_response)
        )
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let caller = self.caller(&request, Need::Config).await?;
        let fwd = is_forwarded(&request);
        let auth = credentials(&request, &caller);
        let msg = request.into_inner();
        let op = delete_op(msg.clone())?;
        caller.require(need_for(std::slice::from_ref(&op)))?;
        leader_or_forward!(
            self,
            fwd,
            auth,
            msg,
            delete,
            self.write(&caller, op.into()).await.map(write_response)
        )
    }

    async fn apply(
        &self,
        request: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::WriteResponse>, Status> {
        let caller = self.caller(&request, Need::Config).await?;
        let fwd = is_forwarded(&request);
        let auth = credentials(&request, &caller);
        let msg = request.into_inner();
        let ops = msg
            .ops
            .iter()
            .enumerate()
            .map(|(i, op)| {
                match op.op.clone() {
                    Some(pb::operation::Op::Put(p)) => put_op(p),
                    Some(pb::operation::Op::Delete(d)) => delete_op(d),
                    None => Err(Status::invalid_argument("op: is required")),
                }
                .map_err(|s| Status::invalid_argument(format!("ops[{i}]: {}", s.message())))
            })
            .collect::<Result<Vec<_>, _>>()?;
        caller.require(need_for(&ops))?;
        leader_or_forward!(
            self,
            fwd,
            auth,
            msg.clone(),
            apply,
            async {
                let cmd = Command {
                    ops,
                    expected_config_revision: msg.expected_config_revision,
                    origin: None,
                    membership: None,
                };
                self.write(&caller, cmd).await.map(write_response)
            }
            .await
        )
    }

    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let caller = self.caller(&request, Need::Config).await?;
        let fwd = is_forwarded(&request);
        let auth = credentials(&request, &caller);
        let msg = request.into_inner();
        leader_or_forward!(
            self,
            fwd,
            auth,
            msg.clone(),
            create_api_key,
            async {
                // Made on the leader, in memory only: the log, the snapshots
                // and every data plane see the hash of the secret, never it.
                let expires_at = match msg.expires_at {
                    None => None,
                    Some(s) => Some(
                        std::time::UNIX_EPOCH
                            .checked_add(Duration::from_secs(s))
                            .ok_or_else(|| Status::invalid_argument("expires_at: out of range"))?,
                    ),
                };
                let (id, secret) = apikey::generate(&mut rand::random::<u8>);
                let key = ApiKey {
                    name: id.clone(),
                    labels: msg.labels.clone().into_iter().collect(),
                    revision: 0,
                    consumer: msg.consumer.clone(),
                    key_hash: apikey::hash_secret(&secret),
                    expires_at,
                    revoked: false,
                };
                let ok = self
                    .write(&caller, Command::put(key.into(), Some(0)))
                    .await?;
                Ok(Response::new(pb::CreateApiKeyResponse {
                    key: apikey::format_key(&id, &secret),
                    id,
                    revision: ok.revision,
                }))
            }
            .await
        )
    }

    async fn cluster_init(
        &self,
        request: Request<pb::ClusterInitRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let caller = self.caller(&request, Need::Cluster).await?;
        if self.raft.is_initialized().await.map_err(fatal)? {
            return Err(Status::already_exists("the cluster is already initialized"));
        }
        let mut members = request.into_inner().members;
        if members.is_empty() {
            members.push(member(self.identity.node_id, &self.info));
        }
        if !members.iter().any(|m| m.id == self.identity.node_id) {
            return Err(Status::invalid_argument(format!(
                "members must include this node ({})",
                self.identity.node_id
            )));
        }
        let cluster_id = self
            .identity
            .found_cluster(self.auth.local_bootstrap_hash())
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        (self.flush)().await.map_err(Status::internal)?;
        let mut nodes = BTreeMap::new();
        for m in &members {
            let info = if m.id == self.identity.node_id {
                self.info.clone()
            } else {
                self.join(m, &cluster_id).await?
            };
            if nodes.insert(m.id, info).is_some() {
                return Err(Status::invalid_argument(format!(
                    "member {} is listed twice",
                    m.id
                )));
            }
        }
        let nodes_initialized: Vec<NodeId> = nodes.keys().copied().collect();
        match self.raft.initialize(nodes).await {
            Ok(()) => {}
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                return Err(Status::already_exists("the cluster is already initialized"))
            }
            Err(RaftError::APIError(e)) => return Err(Status::failed_precondition(e.to_string())),
            Err(RaftError::Fatal(e)) => return Err(fatal(e)),
        }
        // Answer once the new cluster holds its bootstrap token (the leader,
        // whichever node it is, stores it), so the first write cannot race it.
        let stored = crate::node::await_bootstrap_stored(
            &self.raft,
            &self.sm,
            &self.identity,
            Duration::from_secs(10),
        )
        .await;
        if !stored {
            tracing::warn!(
                "the bootstrap admin token is not stored yet; it is accepted until it is"
            );
        }
        self.record_membership(&caller, audit::Action::InitCluster, nodes_initialized)
            .await;
        let m = self.metrics();
        Ok(Response::new(membership_response(
            m.last_log_index.unwrap_or_default(),
            m.membership_config.membership(),
        )))
    }

    async fn add_node(
        &self,
        request: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let caller = self.caller(&request, Need::Cluster).await?;
        let fwd = is_forwarded(&request);
        let auth = credentials(&request, &caller);
        let msg = request.into_inner();
        let m = msg
            .member
            .clone()
            .ok_or_else(|| Status::invalid_argument("member: is required"))?;
        check_member(&m)?;
        tracing::info!(actor = %caller.actor, node = m.id, "membership: adding a node");
        leader_or_forward!(
            self,
            fwd,
            auth,
            msg.clone(),
            add_node,
            async {
                self.ensure_leader()?;
                let current = self.metrics().membership_config.membership().clone();
                if current.get_node(&m.id).is_some() {
                    let is_voter = current.voter_ids().any(|v| v == m.id);
                    if is_voter || msg.learner_only {
                        return Err(Status::already_exists(format!(
                            "node {} is already a {}; to replace it, remove it first",
                            m.id,
                            if is_voter { "voter" } else { "learner" }
                        ))
                        .into());
                    }
                } else {
                    let info = self.join(&m, &self.cluster_id()?).await?;
                    // Blocks until the learner has caught up (possibly through a snapshot).
                    self.raft.add_learner(m.id, info, true).await.map_err(|e| {
                        Status::failed_precondition(format!("adding node {} as learner: {e}", m.id))
                    })?;
                }
                let resp = if msg.learner_only {
                    let membership = self.metrics().membership_config.membership().clone();
                    membership_response(
                        self.metrics().last_log_index.unwrap_or_default(),
                        &membership,
                    )
                } else {
                    self.change(ChangeMembers::AddVoterIds([m.id].into()))
                        .await?
                };
                self.record_membership(&caller, audit::Action::AddNode, vec![m.id])
                    .await;
                Ok(Response::new(resp))
            }
            .await
        )
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let caller = self.caller(&request, Need::Cluster).await?;
        let fwd = is_forwarded(&request);
        let auth = credentials(&request, &caller);
        let msg = request.into_inner();
        tracing::info!(actor = %caller.actor, node = msg.id, "membership: removing a node");
        leader_or_forward!(
            self,
            fwd,
            auth,
            msg,
            remove_node,
            async {
                self.ensure_leader()?;
                let current = self.metrics().membership_config.membership().clone();
                if current.get_node(&msg.id).is_none() {
                    return Err(
                        Status::not_found(format!("node {} is not a member", msg.id)).into(),
                    );
                }
                let voters: BTreeSet<NodeId> = current.voter_ids().collect();
                let change = if voters.contains(&msg.id) {
                    if voters.len() == 1 {
                        return Err(Status::failed_precondition(format!(
                            "node {} is the only voter; a cluster cannot remove its last voter",
                            msg.id
                        ))
                        .into());
                    }
                    ChangeMembers::RemoveVoters([msg.id].into())
                } else {
                    ChangeMembers::RemoveNodes([msg.id].into())
                };
                let resp = self.change(change).await?;
                self.record_membership(&caller, audit::Action::RemoveNode, vec![msg.id])
                    .await;
                Ok(Response::new(resp))
            }
            .await
        )
    }

    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let caller = self.caller(&request, Need::Read).await?;
        let auth = credentials(&request, &caller);
        let m = self.metrics();
        let membership = m.membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let probes = membership.nodes().map(|(id, node)| {
            let (id, node) = (*id, node.clone());
            let voter = voters.contains(&id);
            let auth = auth.clone();
            async move {
                let mut status = if id == self.identity.node_id {
                    self.local_status()
                } else {
                    let probe = async {
                        let mut client = self.client(&node.admin_addr).await?;
                        let mut req = Request::new(pb::NodeStatusRequest {});
                        req.set_timeout(PROBE_TIMEOUT);
                        if let Some((key, value)) = auth {
                            req.metadata_mut().insert(key, value);
                        }
                        client.local_status(req).await.map(Response::into_inner)
                    };
                    match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => unreachable_status(id, &node, e.message()),
                        Err(_) => unreachable_status(id, &node, "no answer in time"),
                    }
                };
                if status.id != id {
                    status =
                        unreachable_status(id, &node, &format!("answered as node {}", status.id));
                }
                // The cluster's view of voting decides; a wiped node does not know it.
                status.voter = voter;
                status
            }
        });
        let nodes = futures::future::join_all(probes).await;
        let data_planes = nodes.iter().flat_map(|n| n.data_planes.clone()).collect();
        Ok(Response::new(pb::ClusterStatusResponse {
            leader_id: m.current_leader.unwrap_or_default(),
            term: m.current_term,
            config_revision: self.sm.read(|d| d.config.revision()),
            nodes,
            data_planes,
            cluster_id: self.identity.cluster_id().unwrap_or_default(),
        }))
    }

    async fn local_status(
        &self,
        request: Request<pb::NodeStatusRequest>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        self.caller(&request, Need::Read).await?;
        Ok(Response::new(self.local_status()))
    }

    async fn create_admin_token(
        &self,
        request: Request<pb::CreateAdminTokenRequest>,
    ) -> Result<Response<pb::CreateAdminTokenResponse>, Status> {
        let caller = self.caller(&request, Need::Tokens).await?;
        let fwd = is_forwarded(&request);
        let auth = credentials(&request, &caller);
        let msg = request.into_inner();
        let role: AdminRole = serde_json::from_value(serde_json::Value::String(msg.role.clone()))
            .map_err(|_| {
            Status::invalid_argument(format!(
                "role: {:?} is not one of admin, editor, viewer, data_plane",
                msg.role
            ))
        })?;
        leader_or_forward!(
            self,
            fwd,
            auth,
            msg.clone(),
            create_admin_token,
            async {
                // Made on the leader, in memory only: the log and the
                // snapshots hold the token's hash, never the token.
                let token = admintoken::generate(&mut rand::random::<u8>);
                let object = AdminToken {
                    name: msg.name.clone(),
                    labels: msg.labels.clone().into_iter().collect(),
                    revision: 0,
                    role,
                    token_hash: admintoken::hash(&token),
                };
                let ok = self
                    .write(&caller, Command::put(object.into(), Some(0)))
                    .await?;
                Ok(Response::new(pb::CreateAdminTokenResponse {
                    name: msg.name.clone(),
                    token,
                    revision: ok.revision,
                }))
            }
            .await
        )
    }

    async fn audit(
        &self,
        request: Request<pb::AuditRequest>,
    ) -> Result<Response<pb::AuditResponse>, Status> {
        let caller = self.caller(&request, Need::Read).await?;
        let fwd = is_forwarded(&request);
        let auth = credentials(&request, &caller);
        let msg = request.into_inner();
        let filter = audit::Filter {
            actor: (!msg.actor.is_empty()).then(|| msg.actor.clone()),
            kind: match msg.kind.as_str() {
                "" => None,
                audit::MEMBER_KIND => Some(audit::MEMBER_KIND.to_string()),
                k => Some(
                    gatehouse_proto::parse_kind("kind", k)
                        .map_err(invalid)?
                        .to_string(),
                ),
            },
            since_ms: msg.since_ms,
            until_ms: msg.until_ms,
            // Admin tokens are shown only to those who may manage them.
            hidden_kinds: if crate::auth::allows(caller.role, Need::Tokens) {
                Vec::new()
            } else {
                vec![Kind::AdminToken.to_string()]
            },
        };
        let limit = match msg.limit {
            0 => DEFAULT_AUDIT_LIMIT,
            n => n as usize,
        };
        leader_or_forward!(
            self,
            fwd,
            auth,
            msg.clone(),
            audit,
            async {
                self.read_barrier(msg.stale).await?;
                let (records, revision) = self
                    .sm
                    .read(|d| (d.config.audit(&filter, limit), d.config.revision()));
                Ok(Response::new(pb::AuditResponse {
                    records: records
                        .into_iter()
                        .map(|r| pb::AuditRecord {
                            revision: r.revision,
                            at_ms: r.at_ms,
                            actor: r.actor,
                            action: r.action.as_str().to_string(),
                            kind: r.kind.to_string(),
                            name: r.name,
                            digest: r.digest,
                        })
                        .collect(),
                    config_revision: revision,
                }))
            }
            .await
        )
    }

    async fn plan(
        &self,
        request: Request<pb::PlanRequest>,
    ) -> Result<Response<pb::PlanResponse>, Status> {
        self.plan_rpc(request).await
    }
}

/// Audit records answered when the request sets no limit.
const DEFAULT_AUDIT_LIMIT: usize = 1000;

fn unreachable_status(id: NodeId, node: &NodeInfo, why: &str) -> pb::NodeStatus {
    pb::NodeStatus {
        id,
        raft_addr: node.raft_addr.clone(),
        admin_addr: node.admin_addr.clone(),
        role: "unreachable".into(),
        error: why.to_string(),
        ..Default::default()
    }
}

// ------------------------------------------------------------------ plan

impl AdminService {
    /// The declarative plan, made on the leader (forwarded there) after a
    /// read barrier, on one frozen copy of the state, so the changes and the
    /// revision they were made at belong together.
    async fn plan_rpc(
        &self,
        request: Request<pb::PlanRequest>,
    ) -> Result<Response<pb::PlanResponse>, Status> {
        // A plan compares secrets in the clear: only who may change them may ask.
        let caller = self.caller(&request, Need::Config).await?;
        let fwd = is_forwarded(&request);
        let auth = credentials(&request, &caller);
        let msg = request.into_inner();
        let mut desired = msg
            .objects
            .iter()
            .enumerate()
            .map(|(i, o)| {
                Object::try_from(o.clone())
                    .map_err(|e| Status::invalid_argument(format!("objects[{i}]: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Compare key material in the clear: a sealed value differs at every sealing.
        for object in &mut desired {
            seal::open_object(object, self.seal.as_ref()).map_err(invalid)?;
        }
        leader_or_forward!(
            self,
            fwd,
            auth,
            msg.clone(),
            plan,
            async {
                self.ensure_leader()?;
                self.read_barrier(false).await?;
                let mut state = self.sm.read(|d| d.config.frozen());
                if let Some(key) = &self.seal {
                    state = opened(&state, key).map_err(invalid)?;
                }
                let plan =
                    gatehouse_model::diff::plan(&state, &desired, msg.prune_owner.as_deref())
                        .map_err(|e| write_status(&e))?;
                Ok(Response::new(plan_response(&plan)))
            }
            .await
        )
    }
}

/// `state` with its sealed key material opened, for comparing with files.
fn opened(
    state: &gatehouse_model::ConfigState,
    key: &SealKey,
) -> Result<gatehouse_model::ConfigState, seal::SealError> {
    let objects = state
        .list_all()
        .map(|mut o| {
            if seal::has_sealed(&o) {
                seal::open_object(&mut o, Some(key))?;
            }
            Ok(o)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(gatehouse_model::ConfigState::from_objects(
        state.revision(),
        objects,
    ))
}

fn plan_response(plan: &gatehouse_model::diff::Plan) -> pb::PlanResponse {
    pb::PlanResponse {
        config_revision: plan.revision,
        changes: plan
            .changes
            .iter()
            .map(|c| pb::PlanChange {
                action: c.action.as_str().to_string(),
                target: Some(pb::ObjectRef::from(&c.target)),
                fields: c
                    .fields
                    .iter()
                    .map(|f| pb::FieldChange {
                        path: f.path.clone(),
                        before: f.before.clone(),
                        after: f.after.clone(),
                        secret: f.secret,
                    })
                    .collect(),
            })
            .collect(),
    }
}
