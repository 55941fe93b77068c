//! The config stream server: every control-plane node, leader or follower,
//! streams its applied configuration to the data planes that watch it, and
//! keeps a registry of them and the revisions they acknowledged.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use gatehouse_model::state::Change;
use gatehouse_model::{ConfigState, Kind};
use gatehouse_proto::pb;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Auth;
use crate::identity::Identity;
use crate::store::Shared;
use crate::types::NodeId;

/// Objects per snapshot chunk, so a large configuration never makes one huge message.
const SNAPSHOT_CHUNK: usize = 1000;
/// How long a data plane has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What this node knows of one connected data plane.
#[derive(Clone, Debug)]
struct Entry {
    node_name: String,
    applied_revision: u64,
    last_error: String,
    last_seen: Instant,
}

/// The data planes connected to this node.
#[derive(Debug, Default)]
pub struct Registry {
    next_id: AtomicU64,
    entries: Mutex<HashMap<u64, Entry>>,
    /// Distinct data planes connected to any node of the cluster, as this
    /// node last added them up (0 until it did).
    cluster: AtomicU64,
}

impl Registry {
    fn update(&self, id: u64, f: impl FnOnce(&mut Entry)) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = entries.get_mut(&id) {
            f(e);
            e.last_seen = Instant::now();
        }
    }

    /// How many data planes are connected.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many data planes are connected to this node.
    pub fn count(&self) -> u64 {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.len() as u64
    }

    /// The names of the data planes connected to this node.
    pub fn names(&self) -> Vec<String> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.values().map(|e| e.node_name.clone()).collect()
    }

    /// Records how many distinct data planes the whole cluster has.
    pub fn set_cluster_count(&self, n: u64) {
        self.cluster.store(n, Ordering::Relaxed);
    }

    /// The data-plane count the config stream tells data planes (the
    /// divisor of their `local` share): the whole cluster's, and never
    /// fewer than are connected here.
    pub fn reported(&self) -> u64 {
        self.count().max(self.cluster.load(Ordering::Relaxed))
    }

    /// Every connected data plane, as the status API reports it.
    pub fn status(&self, node_id: NodeId, revision: u64) -> Vec<pb::DataPlaneStatus> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<pb::DataPlaneStatus> = entries
            .values()
            .map(|e| pb::DataPlaneStatus {
                node_name: e.node_name.clone(),
                connected_to: node_id,
                applied_revision: e.applied_revision,
                lag: revision.saturating_sub(e.applied_revision),
                last_error: e.last_error.clone(),
                idle_seconds: e.last_seen.elapsed().as_secs(),
            })
            .collect();
        all.sort_by(|a, b| a.node_name.cmp(&b.node_name));
        all
    }
}

/// Removes a connection from the registry when its stream ends, however it ends.
struct Registration {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut entries = self
            .registry
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        entries.remove(&self.id);
    }
}

/// The `ConfigStream` service of one node.
pub struct ConfigStreamService {
    pub node_id: NodeId,
    pub sm: Arc<Shared>,
    pub registry: Arc<Registry>,
    pub heartbeat: Duration,
    pub auth: Arc<Auth>,
    /// The cluster this node belongs to: a data plane of another one is refused.
    pub identity: Arc<Identity>,
    /// Set when the node shuts down: streams end, so that the server's
    /// graceful shutdown is not held up by data planes that stay connected.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

/// Data planes never receive admin tokens: they are the control plane's own.
fn streamed(kind: Kind) -> bool {
    kind != Kind::AdminToken
}

fn streamed_object(o: &&gatehouse_model::Object) -> bool {
    streamed(o.kind())
}

fn check_name(name: &str) -> Result<(), Status> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(
            "hello.node_name: must be 1 to 128 characters of a-z, A-Z, 0-9, '-', '_', '.' and ':'",
        ))
    }
}

/// Refuses a data plane that says it belongs to another cluster than this
/// node (`own`; `None` until the node joined one, when any is accepted). An
/// empty `hello` id (a new data plane, or one of an older version) is accepted.
fn check_cluster(own: Option<&str>, hello: &str) -> Result<(), Status> {
    if hello.is_empty() {
        return Ok(());
    }
    gatehouse_proto::check_cluster_id(hello)
        .map_err(|e| Status::invalid_argument(format!("hello.cluster_id: {e}")))?;
    match own {
        Some(own) if own != hello => {
            let mut status = Status::failed_precondition(format!(
                "this control-plane node belongs to cluster {own}; the data plane belongs to cluster {hello}"
            ));
            if let Ok(value) = own.parse() {
                status
                    .metadata_mut()
                    .insert(gatehouse_proto::CLUSTER_ID, value);
            }
            Err(status)
        }
        _ => Ok(()),
    }
}

/// What to send a data plane that holds `held` (`None`: nothing yet).
enum Update {
    Snapshot(ConfigState),
    Delta {
        from: u64,
        revision: u64,
        changes: Vec<Change>,
    },
}

fn next_update(sm: &Shared, held: Option<u64>) -> Option<Update> {
    sm.read(|d| {
        let revision = d.config.revision();
        match held {
            None => Some(Update::Snapshot(d.config.frozen())),
            // Never send what is older than what the data plane holds: a
            // lagging node makes it wait.
            Some(held) if held >= revision => None,
            Some(held) => match d.config.changes_since(held) {
                Some(changes) => Some(Update::Delta {
                    from: held,
                    revision,
                    changes,
                }),
                None => Some(Update::Snapshot(d.config.frozen())),
            },
        }
    })
}

/// Sends `update` on `tx`. A snapshot is encoded one chunk at a time as the
/// data plane takes them: a configuration of a million objects is never held
/// encoded in full, and encoding it does not hold up this runtime's other tasks.
async fn send_update(
    tx: &mpsc::Sender<Result<pb::WatchResponse, Status>>,
    update: Update,
) -> Result<(), ()> {
    use pb::watch_response::Msg;
    match update {
        Update::Snapshot(state) => {
            let revision = state.revision();
            let mut objects = state.objects().filter(streamed_object).peekable();
            loop {
                let chunk: Vec<pb::Object> = objects
                    .by_ref()
                    .take(SNAPSHOT_CHUNK)
                    .map(pb::Object::from)
                    .collect();
                let last = objects.peek().is_none();
                let msg = pb::WatchResponse {
                    msg: Some(Msg::Snapshot(pb::SnapshotChunk {
                        revision,
                        objects: chunk,
                        last,
                    })),
                };
                tx.send(Ok(msg)).await.map_err(|_| ())?;
                if last {
                    return Ok(());
                }
                tokio::task::yield_now().await;
            }
        }
        Update::Delta {
            from,
            revision,
            changes,
        } => {
            let msg = pb::WatchResponse {
                msg: Some(Msg::Delta(pb::Delta {
                    from_revision: from,
                    revision,
                    changes: changes
                        .iter()
                        .filter(|c| streamed(c.target.kind))
                        .map(|c| pb::Change {
                            target: Some(pb::ObjectRef::from(&c.target)),
                            object: c.object.as_ref().map(pb::Object::from),
                        })
                        .collect(),
                })),
            };
            tx.send(Ok(msg)).await.map_err(|_| ())
        }
    }
}

#[tonic::async_trait]
impl pb::config_stream_server::ConfigStream for ConfigStreamService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<WatchStream>, Status> {
        // A data plane's token (role data_plane) or an admin's.
        let caller = self.auth.check_stream(&request)?;
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Err(_) => return Err(Status::deadline_exceeded("no hello within 10s")),
            Ok(Err(status)) => return Err(status),
            Ok(Ok(None)) => return Err(Status::cancelled("the stream ended before hello")),
            Ok(Ok(Some(pb::WatchRequest {
                msg: Some(pb::watch_request::Msg::Hello(hello)),
            }))) => hello,
            Ok(Ok(Some(_))) => {
                return Err(Status::invalid_argument(
                    "the first message must be a hello",
                ))
            }
        };
        check_name(&hello.node_name)?;
        let own_cluster = self.identity.cluster_id();
        if let Err(refusal) = check_cluster(own_cluster.as_deref(), &hello.cluster_id) {
            tracing::warn!(data_plane = %hello.node_name, data_plane_cluster = %hello.cluster_id, error = %refusal.message(), "refused the config stream of a data plane");
            return Err(refusal);
        }
        let mut hello = hello;
        // With mutual TLS the certificate says who the data plane is.
        if let Some(cert_name) = caller.actor.strip_prefix("cert:") {
            if cert_name != hello.node_name {
                tracing::info!(hello = %hello.node_name, certificate = %cert_name, "a data plane named itself differently from its certificate; using the certificate's name");
                hello.node_name = cert_name.to_string();
            }
        }
        let id = self.registry.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut entries = self
                .registry
                .entries
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            entries.insert(
                id,
                Entry {
                    node_name: hello.node_name.clone(),
                    applied_revision: hello.revision,
                    last_error: String::new(),
                    last_seen: Instant::now(),
                },
            );
        }
        let registration = Registration {
            registry: self.registry.clone(),
            id,
        };
        tracing::info!(data_plane = %hello.node_name, revision = hello.revision, "data plane connected");

        let (tx, rx) = mpsc::channel::<Result<pb::WatchResponse, Status>>(16);
        let sm = self.sm.clone();
        let heartbeat = self.heartbeat;
        let name = hello.node_name.clone();
        // A data plane that holds revision 0 has nothing yet: it gets a snapshot.
        let held = (hello.revision > 0).then_some(hello.revision);
        let mut shutdown = self.shutdown.clone();
        let identity = self.identity.clone();
        tokio::spawn(async move {
            let _registration = registration;
            let mut held = held;
            let mut revisions = sm.subscribe();
            let registry = _registration.registry.clone();
            // Before any configuration: which cluster this node belongs to.
            let info = pb::WatchResponse {
                msg: Some(pb::watch_response::Msg::Cluster(pb::ClusterInfo {
                    cluster_id: own_cluster.clone().unwrap_or_default(),
                })),
            };
            if tx.send(Ok(info)).await.is_err() {
                return;
            }
            loop {
                // A node that had no cluster at hello may have joined one
                // since: the data plane must watch again to be checked.
                if let Some(joined) = identity.cluster_id().filter(|_| own_cluster.is_none()) {
                    let _ = tx
                        .send(Err(Status::unavailable(format!(
                            "this control-plane node joined cluster {joined} after the stream began; watch again"
                        ))))
                        .await;
                    return;
                }
                if let Some(update) = next_update(&sm, held) {
                    let revision = match &update {
                        Update::Snapshot(s) => s.revision(),
                        Update::Delta { revision, .. } => *revision,
                    };
                    if send_update(&tx, update).await.is_err() {
                        return;
                    }
                    held = Some(revision);
                    // Tell the data-plane count at once, not at the next idle beat.
                    let beat = pb::WatchResponse {
                        msg: Some(pb::watch_response::Msg::Heartbeat(pb::Heartbeat {
                            revision,
                            data_planes: registry.reported(),
                        })),
                    };
                    if tx.send(Ok(beat)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    _ = async { shutdown.wait_for(|s| *s).await.map(|_| ()) } => {
                        let _ = tx
                            .send(Err(Status::unavailable("this control-plane node is shutting down; watch another")))
                            .await;
                        return;
                    }
                    changed = revisions.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    () = tokio::time::sleep(heartbeat) => {
                        let revision = sm.read(|d| d.config.revision());
                        let beat = pb::WatchResponse {
                            msg: Some(pb::watch_response::Msg::Heartbeat(pb::Heartbeat {
                                revision,
                                data_planes: registry.reported(),
                            })),
                        };
                        if tx.send(Ok(beat)).await.is_err() {
                            return;
                        }
                    }
                    msg = inbound.message() => match msg {
                        Ok(Some(pb::WatchRequest { msg: Some(pb::watch_request::Msg::Ack(ack)) })) => {
                            registry.update(id, |e| {
                                if ack.error.is_empty() {
                                    e.applied_revision = e.applied_revision.max(ack.revision);
                                } else {
                                    e.last_error = format!("revision {}: {}", ack.revision, ack.error);
                                }
                            });
                        }
                        Ok(Some(_)) => registry.update(id, |_| {}),
                        Ok(None) | Err(_) => {
                            tracing::info!(data_plane = %name, "data plane disconnected");
                            return;
                        }
                    },
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_plane_of_another_cluster_is_refused_with_both_ids() {
        let refusal = check_cluster(Some("aaaa1111"), "bbbb2222").unwrap_err();
        assert_eq!(refusal.code(), tonic::Code::FailedPrecondition);
        assert_eq!(
            refusal.message(),
            "this control-plane node belongs to cluster aaaa1111; the data plane belongs to cluster bbbb2222"
        );
        assert_eq!(
            refusal
                .metadata()
                .get(gatehouse_proto::CLUSTER_ID)
                .and_then(|v| v.to_str().ok()),
            Some("aaaa1111")
        );
    }

    #[test]
    fn the_same_cluster_a_new_data_plane_or_a_node_without_cluster_is_accepted() {
        assert!(check_cluster(Some("aaaa1111"), "aaaa1111").is_ok());
        assert!(check_cluster(Some("aaaa1111"), "").is_ok(), "no id yet");
        assert!(check_cluster(None, "bbbb2222").is_ok(), "not joined yet");
        assert!(check_cluster(None, "").is_ok());
    }

    #[test]
    fn a_malformed_cluster_id_in_hello_is_an_invalid_argument() {
        let err = check_cluster(Some("aaaa1111"), "bad id\n").unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().starts_with("hello.cluster_id: "), "{err:?}");
    }
}
