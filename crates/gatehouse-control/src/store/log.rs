//! The Raft log on a [`Tree`]: entries keyed by big-endian index, plus the
//! vote, the committed id and the last purged id. An append is acknowledged
//! to openraft only after the engine has flushed it.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{AnyError, StorageIOError, Vote};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::engine::{Batch, Engine, EngineError, Tree};
use crate::types::{Entry, LogId, NodeId, StorageError, TypeConfig};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

/// The log store; clones share the same trees.
#[derive(Clone)]
pub struct LogStore<E: Engine> {
    logs: E::Tree,
    meta: E::Tree,
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn io_read(e: &(impl std::error::Error + 'static)) -> StorageError {
    StorageIOError::read_logs(AnyError::new(e)).into()
}

fn io_write(e: &(impl std::error::Error + 'static)) -> StorageError {
    StorageIOError::write_logs(AnyError::new(e)).into()
}

impl<E: Engine> LogStore<E> {
    pub fn open(engine: &E) -> Result<Self, EngineError> {
        Ok(LogStore {
            logs: engine.tree("raft_log")?,
            meta: engine.tree("raft_meta")?,
        })
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        match self.meta.get(key).map_err(|e| io_read(&e))? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| io_read(&e)),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &[u8], value: &T) -> Result<(), StorageError> {
        let mut batch = Batch::default();
        batch.insert(key, serde_json::to_vec(value).map_err(|e| io_write(&e))?);
        self.meta.write(batch).map_err(|e| io_write(&e))
    }

    /// Removes the entries with `start <= index < end`.
    fn remove_range(&self, start: u64, end: Option<u64>) -> Result<(), StorageError> {
        let end = end.map(key);
        let keys = self
            .logs
            .range(&key(start), end.as_ref().map(|k| &k[..]))
            .map_err(|e| io_read(&e))?;
        let mut batch = Batch::default();
        for (k, _) in keys {
            batch.remove(k);
        }
        self.logs.write(batch).map_err(|e| io_write(&e))
    }

    async fn flush(&self) -> Result<(), StorageError> {
        self.logs.flush().await.map_err(|e| io_write(&e))
    }
}

impl<E: Engine> RaftLogReader<TypeConfig> for LogStore<E> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Some(key(i + 1)),
            Bound::Excluded(i) => Some(key(*i)),
            Bound::Unbounded => None,
        };
        self.logs
            .range(&key(start), end.as_ref().map(|k| &k[..]))
            .map_err(|e| io_read(&e))?
            .into_iter()
            .map(|(_, v)| serde_json::from_slice(&v).map_err(|e| io_read(&e)))
            .collect()
    }
}

impl<E: Engine> RaftLogStorage<TypeConfig> for LogStore<E> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.get_meta(LAST_PURGED)?;
        let last = match self.logs.last().map_err(|e| io_read(&e))? {
            Some((_, v)) => Some(
                serde_json::from_slice::<Entry>(&v)
                    .map_err(|e| io_read(&e))?
                    .log_id,
            ),
            None => None,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta(VOTE, vote)?;
        self.meta
            .flush()
            .await
            .map_err(|e| StorageIOError::write_vote(AnyError::new(&e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.put_meta(COMMITTED, &committed)?;
        // Flushed in the background, off the write path: losing the last one
        // only means a restarted node re-applies a little less until a leader
        // tells it the commit index, but without a flush a node killed soon
        // after a commit would restart with none of its state applied.
        let meta = self.meta.clone();
        tokio::spawn(async move {
            if let Err(e) = meta.flush().await {
                tracing::warn!(error = %e, "flushing the committed index failed");
            }
        });
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut batch = Batch::default();
        for entry in entries {
            let bytes = serde_json::to_vec(&entry).map_err(|e| io_write(&e))?;
            batch.insert(key(entry.log_id.index), bytes);
        }
        if let Err(e) = self.logs.write(batch) {
            callback.log_io_completed(Err(std::io::Error::other(e.clone())));
            return Err(io_write(&e));
        }
        // The acknowledgement openraft waits for: only after the data is on disk.
        match self.logs.flush().await {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.clone())));
                Err(io_write(&e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.remove_range(log_id.index, None)?;
        self.flush().await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point first: a crash between the two writes leaves
        // extra entries, never a hole.
        self.put_meta(LAST_PURGED, &log_id)?;
        self.remove_range(0, Some(log_id.index + 1))?;
        self.flush().await
    }
}
