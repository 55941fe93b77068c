//! The config stream client: follows the configuration from any of the
//! listed control-plane nodes, hands each new revision to an [`Apply`], and
//! acknowledges it. It reconnects with backoff and jitter, moving on to the
//! next node, and never goes back to an older revision.
//!
//! It follows one cluster only: it says in its hello which cluster it
//! belongs to (a node of another cluster refuses the stream), checks the
//! cluster each node says it belongs to before taking anything from it, and
//! learns its cluster from the first node it applies configuration from
//! when it had none.

use std::sync::Arc;
use std::time::Duration;

use gatehouse_model::{ConfigState, Object, ObjectRef};
use gatehouse_proto::pb;
use gatehouse_proto::pb::config_stream_client::ConfigStreamClient;
use gatehouse_proto::pb::watch_response::Msg;
use tokio::sync::{mpsc, watch};
use tonic::transport::Endpoint;

/// How a revision arrived.
#[derive(Clone, Copy, Debug)]
pub enum Update<'a> {
    /// A whole configuration (a snapshot, or the last-known-good file).
    Full,
    /// The revision `from_revision` with the objects `changed` put or removed.
    Delta {
        from_revision: u64,
        changed: &'a [ObjectRef],
    },
}

/// Takes a revision into service.
pub trait Apply: Send + Sync + 'static {
    /// Compiles and serves `state`. On error the previous revision keeps
    /// serving, and the error is reported to the control plane. `update`
    /// tells what changed, so the previous revision can be patched.
    fn apply(&self, state: &ConfigState, update: Update<'_>) -> Result<(), String>;

    /// Told when the stream connects (`true`) and when it breaks.
    fn stream_state(&self, _connected: bool) {}

    /// Told how many data planes the control plane reports.
    fn data_planes(&self, _count: u64) {}

    /// Told the cluster of the control-plane node whose revision is applied
    /// next (called before that `apply`, once the node's cluster matched
    /// this data plane's or was learnt from it), so that the revision is
    /// kept with its cluster id in the last-known-good file.
    fn cluster_learnt(&self, _cluster_id: &str) {}

    /// Told when a control-plane node was not followed because it belongs
    /// to another cluster; `message` says which node and both clusters.
    fn wrong_cluster(&self, _message: &str) {}
}

/// Where and as whom to watch.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    /// Control-plane admin addresses (`host:port`), tried in turn.
    pub endpoints: Vec<String>,
    pub node_name: String,
    /// Sent with the watch: a token with role `data_plane` (or `admin`).
    pub token: gatehouse_proto::BearerToken,
    /// Mutual TLS to the control plane: its CA, and this data plane's certificate.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// No message (not even a heartbeat) for this long: reconnect.
    pub idle_timeout: Duration,
    pub max_backoff: Duration,
    /// The cluster this data plane belongs to (pinned, or from the
    /// last-known-good file); `None`: learnt from the first control-plane
    /// node it applies configuration from.
    pub cluster_id: Option<String>,
}

/// Why one connection ended.
#[derive(Debug, thiserror::Error)]
enum StreamEnd {
    #[error("connect: {0}")]
    Connect(String),
    #[error("stream: {0}")]
    Status(#[from] tonic::Status),
    #[error("no message for {0:?}")]
    Idle(Duration),
    #[error("the stream ended")]
    Closed,
    #[error("{0}")]
    Protocol(String),
    /// An object or change this version cannot decode (as one with a field
    /// a newer control plane added): asking again at once gets the same.
    #[error("{0}")]
    Undecodable(String),
    #[error("the control-plane node belongs to cluster {node}; this data plane belongs to cluster {own}")]
    WrongCluster { node: String, own: String },
    #[error("shutting down")]
    Shutdown,
}

/// Follows the stream until `shutdown` turns true. `held` is the revision
/// already being served (from the last-known-good file), if any.
pub async fn watch(
    cfg: WatchConfig,
    mut held: Option<ConfigState>,
    apply: Arc<dyn Apply>,
    mut shutdown: watch::Receiver<bool>,
) {
    if cfg.endpoints.is_empty() {
        tracing::error!("no control-plane endpoints to watch");
        return;
    }
    let mut next = rand::random::<u32>() as usize % cfg.endpoints.len();
    let mut failures: u32 = 0;
    let mut cluster = cfg.cluster_id.clone();
    loop {
        let endpoint = &cfg.endpoints[next % cfg.endpoints.len()];
        next += 1;
        let mut progressed = false;
        let end = tokio::select! {
            end = follow(endpoint, &cfg, &mut held, &mut cluster, apply.as_ref(), &mut progressed) => end,
            () = stopped(&mut shutdown) => StreamEnd::Shutdown,
        };
        if matches!(end, StreamEnd::Shutdown) || *shutdown.borrow() {
            return;
        }
        failures = failures_after(&end, progressed, failures);
        let backoff = backoff(failures, cfg.max_backoff);
        match &end {
            StreamEnd::WrongCluster { node, own } => {
                let serving = held.as_ref().map_or("nothing yet".to_string(), |h| {
                    format!("revision {}", h.revision())
                });
                let message = format!(
                    "control-plane node {endpoint} belongs to cluster {node}; this data plane belongs to cluster {own}: not following it (serving {serving}; check --control-plane)"
                );
                tracing::error!(control_plane = %endpoint, node_cluster = %node, data_plane_cluster = %own, retry_in = ?backoff, "{message}");
                apply.wrong_cluster(&message);
            }
            _ => {
                tracing::warn!(control_plane = %endpoint, reason = %end, retry_in = ?backoff, "config stream interrupted");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stopped(&mut shutdown) => return,
        }
    }
}

/// Failed attempts in a row after a stream ended with `end`. A stream that
/// got past the cluster check resets the count, unless it ended on an
/// object or change this version cannot decode (as one from a newer
/// control plane): reconnecting at once would fetch the same again, so that
/// backs off as a failure does. Other protocol ends (a delta that does not
/// follow what is held) reset it: a fresh snapshot mends them.
fn failures_after(end: &StreamEnd, progressed: bool, failures: u32) -> u32 {
    if progressed && !matches!(end, StreamEnd::Undecodable(_)) {
        0
    } else {
        failures.saturating_add(1)
    }
}

/// Exponential backoff from 100 ms with full jitter in its upper half, so
/// data planes that lost the same node do not come back in step.
fn backoff(failures: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(100)
        .saturating_mul(1u32 << failures.min(10))
        .min(max);
    let jitter = rand::random::<f64>() * 0.5 + 0.5;
    base.mul_f64(jitter)
}

fn objects(list: Vec<pb::Object>) -> Result<Vec<Object>, String> {
    list.into_iter()
        .map(|o| Object::try_from(o).map_err(|e| format!("invalid object in stream: {e}")))
        .collect()
}

/// Why a control-plane node is not followed: it refused a data plane of
/// another cluster (`status`, with its own id in [`gatehouse_proto::CLUSTER_ID`]).
fn refusal(status: tonic::Status, own: Option<&str>) -> StreamEnd {
    let node = status
        .metadata()
        .get(gatehouse_proto::CLUSTER_ID)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    match (status.code(), node, own) {
        (tonic::Code::FailedPrecondition, Some(node), Some(own)) => StreamEnd::WrongCluster {
            node,
            own: own.to_string(),
        },
        _ => StreamEnd::Status(status),
    }
}

/// Checks the cluster a node says it belongs to against this data plane's
/// (`own`); on success `stated` is the node's cluster (`None`: it said none).
fn check_node_cluster(
    info: &pb::ClusterInfo,
    own: Option<&str>,
    stated: &mut Option<String>,
) -> Result<(), StreamEnd> {
    if info.cluster_id.is_empty() {
        // A node that has not joined a cluster yet: it ends the stream when it does.
        return Ok(());
    }
    gatehouse_proto::check_cluster_id(&info.cluster_id)
        .map_err(|e| StreamEnd::Protocol(format!("cluster id {:?}: {e}", info.cluster_id)))?;
    if let Some(own) = own {
        if own != info.cluster_id {
            return Err(StreamEnd::WrongCluster {
                node: info.cluster_id.clone(),
                own: own.to_string(),
            });
        }
    }
    *stated = Some(info.cluster_id.clone());
    Ok(())
}

async fn follow(
    endpoint: &str,
    cfg: &WatchConfig,
    held: &mut Option<ConfigState>,
    cluster: &mut Option<String>,
    apply: &dyn Apply,
    progressed: &mut bool,
) -> StreamEnd {
    let scheme = if cfg.tls.is_some() { "https" } else { "http" };
    let mut channel = match Endpoint::from_shared(format!("{scheme}://{endpoint}")) {
        Ok(e) => e.connect_timeout(Duration::from_secs(2)).tcp_nodelay(true),
        Err(e) => return StreamEnd::Connect(e.to_string()),
    };
    if let Some(tls) = &cfg.tls {
        let domain = gatehouse_proto::tls::host_of(endpoint).to_string();
        channel = match channel.tls_config(tls.clone().domain_name(domain)) {
            Ok(c) => c,
            Err(e) => return StreamEnd::Connect(e.to_string()),
        };
    }
    let channel = match channel.connect().await {
        Ok(c) => c,
        Err(e) => return StreamEnd::Connect(e.to_string()),
    };
    let mut client = ConfigStreamClient::with_interceptor(channel, cfg.token.clone())
        .max_decoding_message_size(gatehouse_proto::MAX_ADMIN_RESPONSE_BYTES);
    let (tx, rx) = mpsc::channel(16);
    let hello = pb::WatchRequest {
        msg: Some(pb::watch_request::Msg::Hello(pb::Hello {
            node_name: cfg.node_name.clone(),
            revision: held.as_ref().map_or(0, ConfigState::revision),
            cluster_id: cluster.clone().unwrap_or_default(),
        })),
    };
    if tx.send(hello).await.is_err() {
        return StreamEnd::Closed;
    }
    let mut inbound = match client
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => return refusal(s, cluster.as_deref()),
    };
    tracing::info!(control_plane = %endpoint, "config stream connected");
    apply.stream_state(true);
    let end = read_stream(
        &mut inbound,
        endpoint,
        &tx,
        cfg,
        held,
        cluster,
        apply,
        progressed,
    )
    .await;
    apply.stream_state(false);
    end
}

#[allow(clippy::too_many_arguments)]
async fn read_stream(
    inbound: &mut tonic::Streaming<pb::WatchResponse>,
    endpoint: &str,
    tx: &mpsc::Sender<pb::WatchRequest>,
    cfg: &WatchConfig,
    held: &mut Option<ConfigState>,
    cluster: &mut Option<String>,
    apply: &dyn Apply,
    progressed: &mut bool,
) -> StreamEnd {
    // Objects are decoded chunk by chunk as they arrive: a large snapshot is
    // never held twice (encoded and decoded) in full.
    let mut pending: Option<(u64, Vec<Object>)> = None;
    // The cluster the node said it belongs to (`None`: it said none).
    let mut stated: Option<String> = None;
    // The node said it belongs to no cluster yet: it has nothing to send.
    let mut said_none = false;
    let mut first = true;
    loop {
        let msg = match tokio::time::timeout(cfg.idle_timeout, inbound.message()).await {
            Err(_) => return StreamEnd::Idle(cfg.idle_timeout),
            Ok(Err(s)) => return StreamEnd::Status(s),
            Ok(Ok(None)) => return StreamEnd::Closed,
            Ok(Ok(Some(m))) => m,
        };
        match &msg.msg {
            Some(Msg::Cluster(info)) => {
                if let Err(end) = check_node_cluster(info, cluster.as_deref(), &mut stated) {
                    return end;
                }
                said_none = info.cluster_id.is_empty();
            }
            _ if first && cluster.is_some() => {
                tracing::warn!(control_plane = %endpoint, "the control-plane node does not say which cluster it belongs to (a version before cluster ids): following it unchecked");
            }
            _ => {}
        }
        first = false;
        // Only past the cluster check is this progress (which resets the
        // backoff): against a node of another cluster the backoff keeps growing.
        *progressed = true;
        let update = match msg.msg {
            Some(Msg::Heartbeat(beat)) => {
                if beat.data_planes > 0 {
                    apply.data_planes(beat.data_planes);
                }
                continue;
            }
            None | Some(Msg::Cluster(_)) => continue,
            Some(Msg::Snapshot(chunk)) => {
                let (revision, objs) = pending.get_or_insert_with(|| (chunk.revision, Vec::new()));
                if *revision != chunk.revision {
                    return StreamEnd::Protocol(format!(
                        "snapshot chunk for revision {} inside one for {}",
                        chunk.revision, revision
                    ));
                }
                match objects(chunk.objects) {
                    Ok(decoded) => objs.extend(decoded),
                    Err(e) => return StreamEnd::Undecodable(e),
                }
                if !chunk.last {
                    continue;
                }
                let (revision, objs) = pending.take().expect("pending snapshot");
                if held.as_ref().is_some_and(|h| h.revision() > revision) {
                    // Never go back: wait for this node to catch up.
                    continue;
                }
                Ok((ConfigState::from_objects(revision, objs), None))
            }
            Some(Msg::Delta(delta)) => {
                let Some(current) = held.as_ref() else {
                    return StreamEnd::Protocol("a delta before any snapshot".into());
                };
                if delta.from_revision != current.revision() {
                    return StreamEnd::Protocol(format!(
                        "a delta from revision {} while holding {}",
                        delta.from_revision,
                        current.revision()
                    ));
                }
                let changes: Result<Vec<(ObjectRef, Option<Object>)>, String> = delta
                    .changes
                    .into_iter()
                    .map(|c| {
                        let target = c
                            .target
                            .ok_or("a change without a target")?
                            .try_into()
                            .map_err(|e| format!("invalid change target: {e}"))?;
                        let object = match c.object {
                            Some(o) => Some(
                                Object::try_from(o)
                                    .map_err(|e| format!("invalid object in stream: {e}"))?,
                            ),
                            None => None,
                        };
                        Ok((target, object))
                    })
                    .collect();
                changes.map(|changes| {
                    let targets: Vec<ObjectRef> = changes.iter().map(|(t, _)| t.clone()).collect();
                    let mut next = current.clone();
                    next.apply_changes(delta.revision, changes);
                    (next, Some((delta.from_revision, targets)))
                })
            }
        };
        let (revision, error) = match update {
            Ok((state, delta)) => {
                let revision = state.revision();
                let how = match &delta {
                    None => Update::Full,
                    Some((from_revision, changed)) => Update::Delta {
                        from_revision: *from_revision,
                        changed,
                    },
                };
                // A node of no cluster holds revision 0 only; anything else
                // from it is another cluster's (it joined one meanwhile).
                if said_none && revision > 0 {
                    return StreamEnd::Protocol(format!(
                        "the control-plane node said it belongs to no cluster, then sent revision {revision}"
                    ));
                }
                if let Some(id) = &stated {
                    if cluster.is_none() {
                        tracing::info!(control_plane = %endpoint, cluster_id = %id, "this data plane belongs to cluster {id} from now on");
                        *cluster = Some(id.clone());
                    }
                    // The revision is the cluster's: kept with its id.
                    apply.cluster_learnt(id);
                }
                let error = apply.apply(&state, how).err().unwrap_or_default();
                // Hold it even when it failed to compile: later deltas build on it.
                *held = Some(state);
                (revision, error)
            }
            Err(e) => return StreamEnd::Undecodable(e),
        };
        if !error.is_empty() {
            tracing::warn!(revision, error = %error, "could not apply configuration; serving the previous revision");
        }
        let ack = pb::WatchRequest {
            msg: Some(pb::watch_request::Msg::Ack(pb::Ack { revision, error })),
        };
        if tx.send(ack).await.is_err() {
            return StreamEnd::Closed;
        }
    }
}

/// Resolves once `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::sync::Mutex;

    use gatehouse_proto::pb::config_stream_server::{ConfigStream, ConfigStreamServer};

    /// A control-plane node that says it belongs to `cluster` and sends one
    /// snapshot at `revision`, or refuses every stream with `refuse`; it
    /// records the cluster id of each hello.
    struct FakeNode {
        cluster: String,
        revision: u64,
        refuse: Option<tonic::Status>,
        hellos: Arc<Mutex<Vec<String>>>,
        /// The JSON spec of the one consumer it sends.
        spec_json: String,
        /// When each hello arrived.
        hello_times: Arc<Mutex<Vec<tokio::time::Instant>>>,
    }

    type Responses =
        Pin<Box<dyn futures::Stream<Item = Result<pb::WatchResponse, tonic::Status>> + Send>>;

    #[tonic::async_trait]
    impl ConfigStream for FakeNode {
        type WatchStream = Responses;

        async fn watch(
            &self,
            request: tonic::Request<tonic::Streaming<pb::WatchRequest>>,
        ) -> Result<tonic::Response<Responses>, tonic::Status> {
            let mut inbound = request.into_inner();
            if let Some(pb::WatchRequest {
                msg: Some(pb::watch_request::Msg::Hello(hello)),
            }) = inbound.message().await?
            {
                self.hellos.lock().unwrap().push(hello.cluster_id);
                self.hello_times
                    .lock()
                    .unwrap()
                    .push(tokio::time::Instant::now());
            }
            if let Some(status) = &self.refuse {
                return Err(status.clone());
            }
            let consumer = pb::Object {
                kind: "consumer".into(),
                name: format!("from-{}", self.cluster),
                labels: Default::default(),
                revision: self.revision,
                spec_json: self.spec_json.clone(),
            };
            let msgs = vec![
                Msg::Cluster(pb::ClusterInfo {
                    cluster_id: self.cluster.clone(),
                }),
                Msg::Snapshot(pb::SnapshotChunk {
                    revision: self.revision,
                    objects: vec![consumer],
                    last: true,
                }),
            ];
            let msgs = msgs
                .into_iter()
                .map(|m| Ok(pb::WatchResponse { msg: Some(m) }));
            // Then stays open, as a node does between changes.
            let stream =
                futures::StreamExt::chain(tokio_stream::iter(msgs), futures::stream::pending());
            Ok(tonic::Response::new(Box::pin(stream)))
        }
    }

    /// Starts `node` on a free loopback port; its address.
    async fn serve(node: FakeNode) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ConfigStreamServer::new(node))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        addr.to_string()
    }

    fn fake(cluster: &str, revision: u64) -> (FakeNode, Arc<Mutex<Vec<String>>>) {
        let hellos = Arc::new(Mutex::new(Vec::new()));
        let node = FakeNode {
            cluster: cluster.into(),
            revision,
            refuse: None,
            hellos: hellos.clone(),
            spec_json: r#"{"groups":["x"]}"#.into(),
            hello_times: Arc::default(),
        };
        (node, hellos)
    }

    /// Records what the client tells its `Apply`, in order.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Recorder {
        fn events(&self) -> Vec<String> {
            self.0.lock().unwrap().clone()
        }
    }

    impl Apply for Recorder {
        fn apply(&self, state: &ConfigState, _update: Update<'_>) -> Result<(), String> {
            let names: Vec<String> = state.list_all().map(|o| o.name().to_string()).collect();
            self.0
                .lock()
                .unwrap()
                .push(format!("apply {} {}", state.revision(), names.join(",")));
            Ok(())
        }

        fn cluster_learnt(&self, cluster_id: &str) {
            self.0.lock().unwrap().push(format!("learnt {cluster_id}"));
        }

        fn wrong_cluster(&self, message: &str) {
            self.0.lock().unwrap().push(format!("wrong {message}"));
        }
    }

    fn config(endpoints: Vec<String>, cluster: Option<&str>) -> WatchConfig {
        WatchConfig {
            endpoints,
            node_name: "dp-test".into(),
            token: gatehouse_proto::BearerToken::default(),
            tls: None,
            idle_timeout: Duration::from_secs(5),
            max_backoff: Duration::from_millis(200),
            cluster_id: cluster.map(str::to_string),
        }
    }

    fn held_at(revision: u64) -> ConfigState {
        ConfigState::from_objects(revision, [])
    }

    #[tokio::test]
    async fn a_node_of_another_cluster_is_not_followed_even_when_it_does_not_refuse() {
        let (node, hellos) = fake("bbbb", 9);
        let addr = serve(node).await;
        let cfg = config(vec![addr.clone()], Some("aaaa"));
        let recorder = Recorder::default();
        let (mut held, mut cluster, mut progressed) =
            (Some(held_at(4)), cfg.cluster_id.clone(), false);
        let end = follow(
            &addr,
            &cfg,
            &mut held,
            &mut cluster,
            &recorder,
            &mut progressed,
        )
        .await;
        assert!(
            matches!(&end, StreamEnd::WrongCluster { node, own } if node == "bbbb" && own == "aaaa"),
            "{end:?}"
        );
        assert_eq!(
            *hellos.lock().unwrap(),
            ["aaaa"],
            "the hello names its cluster"
        );
        assert!(recorder.events().is_empty(), "{:?}", recorder.events());
        assert_eq!(held.map(|h| h.revision()), Some(4), "keeps what it had");
        assert_eq!(cluster.as_deref(), Some("aaaa"));
        assert!(!progressed, "no progress: the backoff keeps growing");
    }

    /// Follows `node` until it has sent everything (the fake then stays open).
    async fn follow_briefly(
        addr: &str,
        cfg: &WatchConfig,
        recorder: &Recorder,
    ) -> (Option<StreamEnd>, Option<ConfigState>) {
        let (mut held, mut cluster, mut progressed) = (None, cfg.cluster_id.clone(), false);
        let end = tokio::time::timeout(
            Duration::from_secs(2),
            follow(
                addr,
                cfg,
                &mut held,
                &mut cluster,
                recorder,
                &mut progressed,
            ),
        )
        .await
        .ok();
        (end, held)
    }

    #[tokio::test]
    async fn a_node_of_no_cluster_is_not_followed_past_revision_0() {
        // What a node that joined another cluster right after saying it had
        // none could send.
        let (node, _) = fake("", 9);
        let addr = serve(node).await;
        let cfg = config(vec![addr.clone()], Some("aaaa"));
        let recorder = Recorder::default();
        let (end, held) = follow_briefly(&addr, &cfg, &recorder).await;
        let end = end.expect("the stream ends");
        assert_eq!(
            end.to_string(),
            "the control-plane node said it belongs to no cluster, then sent revision 9"
        );
        assert!(recorder.events().is_empty(), "{:?}", recorder.events());
        assert!(held.is_none());
    }

    #[tokio::test]
    async fn a_pinned_data_plane_keeps_each_revision_with_its_cluster() {
        let (node, _) = fake("aaaa", 9);
        let addr = serve(node).await;
        let cfg = config(vec![addr.clone()], Some("aaaa"));
        let recorder = Recorder::default();
        let (end, _) = follow_briefly(&addr, &cfg, &recorder).await;
        assert!(end.is_none(), "{end:?}");
        assert_eq!(recorder.events(), ["learnt aaaa", "apply 9 from-aaaa"]);
    }

    #[tokio::test]
    async fn a_refusal_of_another_cluster_names_both() {
        let (mut node, _) = fake("bbbb", 9);
        let mut status = tonic::Status::failed_precondition(
            "this control-plane node belongs to cluster bbbb; the data plane belongs to cluster aaaa",
        );
        status
            .metadata_mut()
            .insert(gatehouse_proto::CLUSTER_ID, "bbbb".parse().unwrap());
        node.refuse = Some(status);
        let addr = serve(node).await;
        let cfg = config(vec![addr.clone()], Some("aaaa"));
        let recorder = Recorder::default();
        let (mut held, mut cluster, mut progressed) = (None, cfg.cluster_id.clone(), false);
        let end = follow(
            &addr,
            &cfg,
            &mut held,
            &mut cluster,
            &recorder,
            &mut progressed,
        )
        .await;
        assert_eq!(
            end.to_string(),
            "the control-plane node belongs to cluster bbbb; this data plane belongs to cluster aaaa"
        );
    }

    #[tokio::test]
    async fn the_cluster_is_learnt_from_the_first_node_applied_from() {
        let (node, hellos) = fake("aaaa", 9);
        let addr = serve(node).await;
        let cfg = config(vec![addr.clone()], None);
        let recorder = Recorder::default();
        let (mut held, mut cluster, mut progressed) = (None, None, false);
        // The fake stays open after its snapshot: stop once it is applied.
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            follow(
                &addr,
                &cfg,
                &mut held,
                &mut cluster,
                &recorder,
                &mut progressed,
            ),
        )
        .await;
        assert_eq!(*hellos.lock().unwrap(), [""], "no cluster yet");
        assert_eq!(recorder.events(), ["learnt aaaa", "apply 9 from-aaaa"]);
        assert_eq!(cluster.as_deref(), Some("aaaa"));
    }

    #[tokio::test]
    async fn it_moves_on_from_a_node_of_another_cluster_to_one_of_its_own() {
        let (other, _) = fake("bbbb", 50);
        let (own, own_hellos) = fake("aaaa", 9);
        let endpoints = vec![serve(other).await, serve(own).await];
        let cfg = config(endpoints.clone(), Some("aaaa"));
        let recorder = Arc::new(Recorder::default());
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(watch(cfg, Some(held_at(4)), recorder.clone(), shutdown));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        // It starts at a random one of the two: wait for both to be seen.
        while !(recorder.events().iter().any(|e| e.starts_with("wrong "))
            && recorder.events().iter().any(|e| e.starts_with("apply ")))
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?}",
                recorder.events()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.send(true).unwrap();
        task.await.unwrap();
        let events = recorder.events();
        assert!(
            events.contains(&"apply 9 from-aaaa".to_string()),
            "{events:?}"
        );
        assert!(
            !events.iter().any(|e| e.contains("from-bbbb")),
            "{events:?}"
        );
        let wrong = events.iter().find(|e| e.starts_with("wrong ")).unwrap();
        let expected = format!(
            "wrong control-plane node {} belongs to cluster bbbb; this data plane belongs to cluster aaaa: not following it (serving revision ",
            endpoints[0]
        );
        assert!(wrong.starts_with(&expected), "{wrong}");
        assert!(own_hellos.lock().unwrap().iter().all(|h| h == "aaaa"));
    }

    /// A node that sends an object this version cannot decode (a field a
    /// newer version added): nothing is applied, the held config stays, and
    /// the data plane asks again after a growing pause, not at once. Only
    /// lower bounds on the pauses are checked: a slow machine makes them
    /// longer, never shorter.
    #[tokio::test]
    async fn an_undecodable_snapshot_is_refused_and_asked_for_again_with_backoff() {
        let (mut node, _) = fake("aaaa", 9);
        node.spec_json = r#"{"groups":["x"],"a_field_from_a_newer_version":true}"#.into();
        let times = node.hello_times.clone();
        let mut cfg = config(vec![serve(node).await], Some("aaaa"));
        cfg.max_backoff = Duration::from_secs(5);
        let recorder = Arc::new(Recorder::default());
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(watch(cfg, Some(held_at(4)), recorder.clone(), shutdown));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while times.lock().unwrap().len() < 4 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "fewer than 4 streams in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.send(true).unwrap();
        task.await.unwrap();
        assert_eq!(recorder.events(), Vec::<String>::new(), "nothing applied");
        // The pause after the n-th failure is 100 ms × 2^n, jittered in its
        // upper half: at least 100, 200 and 400 ms. Reconnecting at once
        // (every 50-100 ms) would not reach the last two.
        let t = times.lock().unwrap().clone();
        let gaps: Vec<Duration> = t.windows(2).map(|w| w[1] - w[0]).collect();
        for (gap, least) in gaps.iter().zip([100, 200, 400]) {
            assert!(
                *gap >= Duration::from_millis(least),
                "pauses between streams: {gaps:?}"
            );
        }
    }

    #[test]
    fn a_stream_that_ends_on_what_it_cannot_use_backs_off_like_a_failure() {
        let max = Duration::from_secs(5);
        let mut failures = 0;
        for _ in 0..6 {
            let undecodable =
                StreamEnd::Undecodable("invalid object in stream: unknown field".into());
            failures = failures_after(&undecodable, true, failures);
        }
        assert_eq!(failures, 6);
        // 100 ms × 2^6 is past the 5 s cap: at least half of the cap.
        assert!(backoff(failures, max) >= max / 2);
        // A stream that was followed and then closed starts over, as does
        // one that ended on a delta a fresh snapshot mends.
        assert_eq!(failures_after(&StreamEnd::Closed, true, failures), 0);
        let gap = StreamEnd::Protocol("a delta from revision 7 while holding 9".into());
        assert_eq!(failures_after(&gap, true, failures), 0);
        let status = StreamEnd::Status(tonic::Status::unavailable("leader changed"));
        assert_eq!(failures_after(&status, true, failures), 0);
        // One that never got past connecting counts as a failure.
        let refused = StreamEnd::Connect("connection refused".into());
        assert_eq!(failures_after(&refused, false, failures), 7);
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let max = Duration::from_secs(5);
        for failures in 0..20 {
            let b = backoff(failures, max);
            let base = Duration::from_millis(100)
                .saturating_mul(1u32 << failures.min(10))
                .min(max);
            assert!(
                b >= base / 2 && b <= base,
                "{failures}: {b:?} outside [{:?}, {base:?}]",
                base / 2
            );
        }
    }
}
