//! The Raft state machine: the configuration in memory, snapshots on disk.
//!
//! Applying an entry runs [`ConfigState::apply`], the same deterministic
//! function `gatehousectl validate` runs. The state itself is kept in memory
//! and rebuilt at start from the last snapshot plus the log after it, which
//! openraft re-applies; snapshots are written to the engine and flushed.

use std::io::Cursor;
use std::sync::{Arc, RwLock};

use gatehouse_model::{ConfigState, WriteOk};
use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{AnyError, EntryPayload, RaftSnapshotBuilder, StorageIOError, StoredMembership};
use tokio::sync::watch;

use super::engine::{Batch, Engine, EngineError, Tree};
use crate::types::{Entry, LogId, NodeId, NodeInfo, Response, StorageError, TypeConfig};

const SNAPSHOT_META: &[u8] = b"meta";
const SNAPSHOT_DATA: &[u8] = b"data";

/// The applied state, readable by the admin API.
#[derive(Debug, Default)]
pub struct SmData {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership<NodeId, NodeInfo>,
    pub config: ConfigState,
}

/// The state machine's data, shared with readers. The lock is held only
/// for the duration of an apply or a copy, never across an await.
#[derive(Debug)]
pub struct Shared {
    data: RwLock<SmData>,
    revision: watch::Sender<u64>,
}

impl Shared {
    pub fn read<R>(&self, f: impl FnOnce(&SmData) -> R) -> R {
        f(&self.data.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Follows the configuration revision as entries are applied.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }
}

/// The state machine store; clones share the data.
#[derive(Clone)]
pub struct StateMachineStore<E: Engine> {
    shared: Arc<Shared>,
    snapshots: E::Tree,
}

fn snap_err(e: &(impl std::error::Error + 'static)) -> StorageError {
    StorageIOError::read_snapshot(None, AnyError::new(e)).into()
}

fn snap_write_err(e: &(impl std::error::Error + 'static)) -> StorageError {
    StorageIOError::write_snapshot(None, AnyError::new(e)).into()
}

impl<E: Engine> StateMachineStore<E> {
    /// Opens the store and restores the last snapshot, if there is one.
    pub fn open(engine: &E, history_limit: usize) -> Result<Self, EngineError> {
        let snapshots = engine.tree("snapshot")?;
        let mut data = SmData {
            config: ConfigState::with_history_limit(history_limit),
            ..SmData::default()
        };
        if let (Some(meta), Some(bytes)) =
            (snapshots.get(SNAPSHOT_META)?, snapshots.get(SNAPSHOT_DATA)?)
        {
            let meta: SnapshotMeta<NodeId, NodeInfo> = serde_json::from_slice(&meta)
                .map_err(|e| EngineError(format!("snapshot metadata is corrupt: {e}")))?;
            let mut config = ConfigState::from_snapshot(&bytes)
                .map_err(|e| EngineError(format!("snapshot data is corrupt: {e}")))?;
            config.set_history_limit(history_limit);
            data = SmData {
                last_applied: meta.last_log_id,
                membership: meta.last_membership,
                config,
            };
        }
        let (revision, _) = watch::channel(data.config.revision());
        Ok(StateMachineStore {
            shared: Arc::new(Shared {
                data: RwLock::new(data),
                revision,
            }),
            snapshots,
        })
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    async fn save_snapshot(
        &self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        bytes: &[u8],
    ) -> Result<(), StorageError> {
        let mut batch = Batch::default();
        batch.insert(
            SNAPSHOT_META,
            serde_json::to_vec(meta).map_err(|e| snap_write_err(&e))?,
        );
        batch.insert(SNAPSHOT_DATA, bytes);
        self.snapshots
            .write(batch)
            .map_err(|e| snap_write_err(&e))?;
        self.snapshots.flush().await.map_err(|e| snap_write_err(&e))
    }
}

impl<E: Engine> RaftSnapshotBuilder<TypeConfig> for StateMachineStore<E> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // Copy under the lock in O(1), serialize outside it: applying writes
        // must not wait for a large state to be encoded.
        let (frozen, last_log_id, last_membership) = self
            .shared
            .read(|d| (d.config.frozen(), d.last_applied, d.membership.clone()));
        let bytes = frozen.to_snapshot();
        let snapshot_id = match last_log_id {
            Some(id) => format!(
                "{}-{}-{}",
                id.leader_id.term,
                id.index,
                rand::random::<u32>()
            ),
            None => format!("empty-{}", rand::random::<u32>()),
        };
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        self.save_snapshot(&meta, &bytes).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl<E: Engine> RaftStateMachine<TypeConfig> for StateMachineStore<E> {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, NodeInfo>), StorageError> {
        Ok(self.shared.read(|d| (d.last_applied, d.membership.clone())))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let (responses, revision) = {
            let mut d = self.shared.data.write().unwrap_or_else(|p| p.into_inner());
            let mut responses = Vec::new();
            for entry in entries {
                d.last_applied = Some(entry.log_id);
                let response = match entry.payload {
                    EntryPayload::Normal(cmd) => d.config.apply(entry.log_id.index, &cmd),
                    EntryPayload::Membership(m) => {
                        d.membership = StoredMembership::new(Some(entry.log_id), m);
                        Ok(WriteOk {
                            revision: d.config.revision(),
                            changed: 0,
                        })
                    }
                    EntryPayload::Blank => Ok(WriteOk {
                        revision: d.config.revision(),
                        changed: 0,
                    }),
                };
                responses.push(response);
            }
            (responses, d.config.revision())
        };
        self.shared.revision.send_if_modified(|r| {
            let changed = *r != revision;
            *r = revision;
            changed
        });
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        // The receiver hands the cursor back positioned at its end: take the whole buffer.
        let bytes = snapshot.into_inner();
        let mut config = ConfigState::from_snapshot(&bytes).map_err(|e| snap_err(&e))?;
        self.save_snapshot(meta, &bytes).await?;
        let revision = {
            let mut d = self.shared.data.write().unwrap_or_else(|p| p.into_inner());
            config.set_history_limit(d.config.history_limit());
            d.config = config;
            d.last_applied = meta.last_log_id;
            d.membership = meta.last_membership.clone();
            d.config.revision()
        };
        self.shared.revision.send_replace(revision);
        // Worth an operator's notice: this node fell behind the leader's log.
        tracing::info!(
            last_log_index = meta.last_log_id.map_or(0, |l| l.index),
            revision,
            "installed a snapshot from the leader"
        );
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let meta = self
            .snapshots
            .get(SNAPSHOT_META)
            .map_err(|e| snap_err(&e))?;
        let data = self
            .snapshots
            .get(SNAPSHOT_DATA)
            .map_err(|e| snap_err(&e))?;
        match (meta, data) {
            (Some(meta), Some(data)) => Ok(Some(Snapshot {
                meta: serde_json::from_slice(&meta).map_err(|e| snap_err(&e))?,
                snapshot: Box::new(Cursor::new(data)),
            })),
            _ => Ok(None),
        }
    }
}
