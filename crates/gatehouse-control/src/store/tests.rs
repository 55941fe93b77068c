//! openraft's own storage conformance suite, run against the sled store.

use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;

use super::engine::SledEngine;
use super::{LogStore, StateMachineStore};
use crate::types::{StorageError, TypeConfig};

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore<SledEngine>, StateMachineStore<SledEngine>, TempDir>
    for SledBuilder
{
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore<SledEngine>, StateMachineStore<SledEngine>), StorageError> {
        let dir = TempDir::new().expect("temp dir");
        let engine = SledEngine::open(dir.path()).expect("open sled");
        let log = LogStore::open(&engine).expect("log store");
        let sm = StateMachineStore::open(&engine, 100).expect("state machine");
        Ok((dir, log, sm))
    }
}

/// A plain test: the suite runs its own tokio runtime per case.
#[test]
fn sled_store_passes_the_openraft_storage_suite() -> Result<(), StorageError> {
    Suite::test_all(SledBuilder)
}
