//! Who this node is: its id, the incarnation of its data directory, and the
//! cluster it belongs to. Raft traffic is accepted only when it names all
//! three correctly, so a wiped node (new incarnation) or a node of another
//! cluster refuses to take part until an operator re-adds it.

use std::sync::{Arc, Mutex, RwLock};

use futures::future::BoxFuture;
use thiserror::Error;

use crate::store::engine::{Batch, Engine, EngineError, Tree};
use crate::types::NodeId;

const NODE_ID: &[u8] = b"node_id";
const INCARNATION: &[u8] = b"incarnation";
const CLUSTER_ID: &[u8] = b"cluster_id";
const BOOTSTRAP_HASH: &[u8] = b"bootstrap_token_hash";

/// Why raft traffic or a join was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdentityError {
    #[error("this is node {actual}, the request is for node {expected}")]
    WrongNode { expected: NodeId, actual: NodeId },
    #[error("node {node}'s data directory is not the one that joined the cluster (incarnation {actual}, the cluster knows {expected}): it was wiped or replaced; remove the node from the cluster and add it again")]
    WrongIncarnation {
        node: NodeId,
        expected: String,
        actual: String,
    },
    #[error("node {node} belongs to cluster {actual}, the request comes from cluster {expected}")]
    WrongCluster {
        node: NodeId,
        expected: String,
        actual: String,
    },
    #[error("node {node} has not joined any cluster; add it with `gatehousectl cluster add`")]
    NotJoined { node: NodeId },
}

/// Makes the identity durable (flushes the engine) before a join is acknowledged.
pub type FlushFn = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

type StoreFn = Box<dyn Fn(&str, &str) -> Result<(), EngineError> + Send + Sync>;

/// This node's identity, persisted in the engine.
pub struct Identity {
    pub node_id: NodeId,
    pub incarnation: String,
    cluster_id: RwLock<Option<String>>,
    /// SHA-256 of the cluster's bootstrap admin token, learnt with the cluster id.
    bootstrap_hash: RwLock<Option<String>>,
    last_refusal: Mutex<Option<String>>,
    store: StoreFn,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("node_id", &self.node_id)
            .field("incarnation", &self.incarnation)
            .field("cluster_id", &self.cluster_id())
            .finish()
    }
}

fn random_id() -> String {
    hex::encode(rand::random::<[u8; 12]>())
}

impl Identity {
    /// Loads the identity, creating it on first start. Refuses a data
    /// directory that belongs to another node id.
    pub async fn open<E: Engine>(engine: &E, node_id: NodeId) -> Result<Identity, EngineError> {
        let tree = engine.tree("identity")?;
        let stored_id = tree
            .get(NODE_ID)?
            .map(|b| String::from_utf8_lossy(&b).parse::<NodeId>());
        match stored_id {
            Some(Ok(id)) if id != node_id => {
                return Err(EngineError(format!(
                    "the data directory belongs to node {id}, not node {node_id}"
                )))
            }
            Some(Err(_)) => return Err(EngineError("the stored node id is corrupt".into())),
            _ => {}
        }
        let incarnation = match tree.get(INCARNATION)? {
            Some(b) => String::from_utf8_lossy(&b).into_owned(),
            None => {
                let fresh = random_id();
                let mut batch = Batch::default();
                batch.insert(NODE_ID, node_id.to_string());
                batch.insert(INCARNATION, fresh.as_bytes());
                tree.write(batch)?;
                tree.flush().await?;
                fresh
            }
        };
        let cluster_id = tree
            .get(CLUSTER_ID)?
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let bootstrap_hash = tree
            .get(BOOTSTRAP_HASH)?
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let store_tree = tree.clone();
        Ok(Identity {
            node_id,
            incarnation,
            cluster_id: RwLock::new(cluster_id),
            bootstrap_hash: RwLock::new(bootstrap_hash),
            last_refusal: Mutex::new(None),
            store: Box::new(move |id: &str, bootstrap: &str| {
                let mut batch = Batch::default();
                batch.insert(CLUSTER_ID, id.as_bytes());
                batch.insert(BOOTSTRAP_HASH, bootstrap.as_bytes());
                store_tree.write(batch)
            }),
        })
    }

    pub fn cluster_id(&self) -> Option<String> {
        self.cluster_id
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The SHA-256 of the cluster's bootstrap admin token, once this node has a cluster.
    pub fn bootstrap_hash(&self) -> Option<String> {
        self.bootstrap_hash
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Joins a cluster: sets the cluster id (and the hash of its bootstrap
    /// token) once; the same id again is fine. The caller flushes the engine
    /// before answering.
    pub fn join(&self, cluster_id: &str, bootstrap_hash: &str) -> Result<(), IdentityError> {
        let mut current = self.cluster_id.write().unwrap_or_else(|p| p.into_inner());
        match current.as_deref() {
            Some(c) if c == cluster_id => Ok(()),
            Some(c) => Err(IdentityError::WrongCluster {
                node: self.node_id,
                expected: cluster_id.to_string(),
                actual: c.to_string(),
            }),
            None => {
                (self.store)(cluster_id, bootstrap_hash)
                    .map_err(|_| IdentityError::NotJoined { node: self.node_id })?;
                *current = Some(cluster_id.to_string());
                *self
                    .bootstrap_hash
                    .write()
                    .unwrap_or_else(|p| p.into_inner()) = Some(bootstrap_hash.to_string());
                Ok(())
            }
        }
    }

    /// Starts a new cluster with a fresh id (bootstrap and `cluster init`),
    /// whose bootstrap admin token has the hash `bootstrap_hash`.
    pub fn found_cluster(&self, bootstrap_hash: &str) -> Result<String, IdentityError> {
        if let Some(id) = self.cluster_id() {
            return Ok(id);
        }
        let id = random_id();
        self.join(&id, bootstrap_hash)?;
        Ok(id)
    }

    /// Checks that raft traffic is meant for this very node and cluster.
    pub fn check(
        &self,
        cluster_id: &str,
        target: NodeId,
        incarnation: &str,
    ) -> Result<(), IdentityError> {
        let result = if target != self.node_id {
            Err(IdentityError::WrongNode {
                expected: target,
                actual: self.node_id,
            })
        } else if incarnation != self.incarnation {
            Err(IdentityError::WrongIncarnation {
                node: self.node_id,
                expected: incarnation.to_string(),
                actual: self.incarnation.clone(),
            })
        } else {
            match self.cluster_id().as_deref() {
                None => Err(IdentityError::NotJoined { node: self.node_id }),
                Some(c) if c != cluster_id => Err(IdentityError::WrongCluster {
                    node: self.node_id,
                    expected: cluster_id.to_string(),
                    actual: c.to_string(),
                }),
                Some(_) => Ok(()),
            }
        };
        let mut last = self.last_refusal.lock().unwrap_or_else(|p| p.into_inner());
        *last = result.as_ref().err().map(ToString::to_string);
        result
    }

    /// The reason the last raft request was refused, if the last one was.
    pub fn last_refusal(&self) -> Option<String> {
        self.last_refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
