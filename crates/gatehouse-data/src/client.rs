//! The config stream client: follows the configuration from any of the
//! listed control-plane nodes, hands each new revision to an [`Apply`], and
//! acknowledges it. It reconnects with backoff and jitter, moving on to the
//! next node, and never goes back to an older revision.

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
    loop {
        let endpoint = &cfg.endpoints[next % cfg.endpoints.len()];
        next += 1;
        let mut progressed = false;
        let end = tokio::select! {
            end = follow(endpoint, &cfg, &mut held, apply.as_ref(), &mut progressed) => end,
            () = stopped(&mut shutdown) => StreamEnd::Shutdown,
        };
        if matches!(end, StreamEnd::Shutdown) || *shutdown.borrow() {
            return;
        }
        failures = if progressed {
            0
        } else {
            failures.saturating_add(1)
        };
        let backoff = backoff(failures, cfg.max_backoff);
        tracing::warn!(control_plane = %endpoint, reason = %end, retry_in = ?backoff, "config stream interrupted");
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stopped(&mut shutdown) => return,
        }
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

async fn follow(
    endpoint: &str,
    cfg: &WatchConfig,
    held: &mut Option<ConfigState>,
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
            cluster_id: String::new(),
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
        Err(s) => return StreamEnd::Status(s),
    };
    tracing::info!(control_plane = %endpoint, "config stream connected");
    apply.stream_state(true);
    let end = read_stream(&mut inbound, &tx, cfg, held, apply, progressed).await;
    apply.stream_state(false);
    end
}

async fn read_stream(
    inbound: &mut tonic::Streaming<pb::WatchResponse>,
    tx: &mpsc::Sender<pb::WatchRequest>,
    cfg: &WatchConfig,
    held: &mut Option<ConfigState>,
    apply: &dyn Apply,
    progressed: &mut bool,
) -> StreamEnd {
    // Objects are decoded chunk by chunk as they arrive: a large snapshot is
    // never held twice (encoded and decoded) in full.
    let mut pending: Option<(u64, Vec<Object>)> = None;
    loop {
        let msg = match tokio::time::timeout(cfg.idle_timeout, inbound.message()).await {
            Err(_) => return StreamEnd::Idle(cfg.idle_timeout),
            Ok(Err(s)) => return StreamEnd::Status(s),
            Ok(Ok(None)) => return StreamEnd::Closed,
            Ok(Ok(Some(m))) => m,
        };
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
                    Err(e) => return StreamEnd::Protocol(e),
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
                let error = apply.apply(&state, how).err().unwrap_or_default();
                // Hold it even when it failed to compile: later deltas build on it.
                *held = Some(state);
                (revision, error)
            }
            Err(e) => return StreamEnd::Protocol(e),
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
