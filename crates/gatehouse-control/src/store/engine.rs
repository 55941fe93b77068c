//! The storage engine behind the Raft log and state machine: a small trait
//! of ours, so the engine can be swapped, and its sled implementation.
//!
//! sled makes writes durable only on flush, and its flush is weaker than an
//! fsync on power loss (sled issues #654, #1452): see docs/operations.md.

use std::future::Future;
use std::path::Path;

/// A failure of the storage engine.
#[derive(Debug, Clone, thiserror::Error)]
#[error("storage engine: {0}")]
pub struct EngineError(pub String);

/// A set of writes applied atomically to one tree.
#[derive(Debug, Default)]
pub struct Batch {
    pub(crate) ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Batch {
    pub fn insert(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), Some(value.into())));
    }

    pub fn remove(&mut self, key: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), None));
    }
}

/// A key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// A database of named, ordered key-value trees.
pub trait Engine: Clone + Send + Sync + 'static {
    type Tree: Tree;
    fn tree(&self, name: &str) -> Result<Self::Tree, EngineError>;
}

/// One ordered key-value tree. Writes become durable at `flush`.
pub trait Tree: Clone + Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError>;
    /// Entries with `start <= key < end` (no upper bound when `end` is `None`), in key order.
    fn range(&self, start: &[u8], end: Option<&[u8]>) -> Result<Vec<KeyValue>, EngineError>;
    fn last(&self) -> Result<Option<KeyValue>, EngineError>;
    fn write(&self, batch: Batch) -> Result<(), EngineError>;
    /// Returns once every earlier write is on disk.
    fn flush(&self) -> impl Future<Output = Result<(), EngineError>> + Send;
}

/// The sled engine.
#[derive(Clone)]
pub struct SledEngine(sled::Db);

impl SledEngine {
    pub fn open(path: &Path) -> Result<Self, EngineError> {
        sled::Config::new()
            .path(path)
            .open()
            .map(SledEngine)
            .map_err(|e| EngineError(format!("cannot open {}: {e}", path.display())))
    }
}

fn err(e: sled::Error) -> EngineError {
    EngineError(e.to_string())
}

impl Engine for SledEngine {
    type Tree = SledTree;

    fn tree(&self, name: &str) -> Result<SledTree, EngineError> {
        self.0.open_tree(name).map(SledTree).map_err(err)
    }
}

#[derive(Clone)]
pub struct SledTree(sled::Tree);

impl Tree for SledTree {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self.0.get(key).map_err(err)?.map(|v| v.to_vec()))
    }

    fn range(&self, start: &[u8], end: Option<&[u8]>) -> Result<Vec<KeyValue>, EngineError> {
        let iter = match end {
            Some(end) => self.0.range(start..end),
            None => self.0.range(start..),
        };
        iter.map(|kv| kv.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(err))
            .collect()
    }

    fn last(&self) -> Result<Option<KeyValue>, EngineError> {
        Ok(self
            .0
            .last()
            .map_err(err)?
            .map(|(k, v)| (k.to_vec(), v.to_vec())))
    }

    fn write(&self, batch: Batch) -> Result<(), EngineError> {
        let mut b = sled::Batch::default();
        for (k, v) in batch.ops {
            match v {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        self.0.apply_batch(b).map_err(err)
    }

    async fn flush(&self) -> Result<(), EngineError> {
        self.0.flush_async().await.map(|_| ()).map_err(err)
    }
}
