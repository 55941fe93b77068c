//! The last-known-good configuration file: what a data plane serves when it
//! starts and no control-plane node answers.
//!
//! The file is one header line with a SHA-256 of the body, then the body
//! (JSON). It is written to a temporary file, synced, and renamed over the
//! old one, so a crash leaves either the old file or the new one, never half
//! of one; a file whose checksum does not match is refused as corrupt.
//!
//! The body also names the cluster the configuration came from
//! (`cluster_id`), so that a restarted data plane never follows a
//! control-plane node of another cluster. Files written before it was kept
//! have no `cluster_id` and read as "no cluster yet".

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use gatehouse_model::{ConfigState, Object};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const MAGIC: &str = "gatehouse-lkg v1 sha256=";

#[derive(Deserialize)]
struct Body {
    revision: u64,
    #[serde(default)]
    cluster_id: Option<String>,
    objects: Vec<Object>,
}

/// What a last-known-good file holds.
#[derive(Clone, Debug)]
pub struct Saved {
    pub state: ConfigState,
    /// The cluster the configuration came from; `None` in files written
    /// before it was kept (or before the data plane learnt it).
    pub cluster_id: Option<String>,
}

/// A last-known-good file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LkgError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: corrupt last-known-good file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// The body as written: the objects are serialized where they are, not
/// copied (a million-key state would otherwise be held twice).
#[derive(Serialize)]
struct BodyRef<'a> {
    revision: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_id: Option<&'a str>,
    objects: Objects<'a>,
}

struct Objects<'a>(&'a ConfigState);

impl Serialize for Objects<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.objects())
    }
}

/// Hashes what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `state`, which came from cluster `cluster_id` (when known),
/// atomically to `path`. The body is streamed to a temporary
/// file through the hash, after a header of the same length as the real
/// one; the real header is written over it once the digest is known, then
/// the file is synced and renamed over the old one.
pub fn write(path: &Path, state: &ConfigState, cluster_id: Option<&str>) -> Result<(), LkgError> {
    let io = |source| LkgError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = path.with_extension("tmp");
    {
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        let placeholder = "0".repeat(64);
        writeln!(file, "{MAGIC}{placeholder}").map_err(io)?;
        let mut body = Hashing {
            inner: std::io::BufWriter::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
        };
        serde_json::to_writer(
            &mut body,
            &BodyRef {
                revision: state.revision(),
                cluster_id,
                objects: Objects(state),
            },
        )
        .map_err(|e| io(std::io::Error::other(e)))?;
        body.flush().map_err(io)?;
        let Hashing { inner, hasher } = body;
        let mut file = inner.into_inner().map_err(|e| io(e.into_error()))?;
        let digest = hex::encode(hasher.finalize());
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "{MAGIC}{digest}").map_err(io)?;
        file.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    // Make the rename itself durable.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads the file: `Ok(None)` when there is none, an error when it is corrupt.
pub fn read(path: &Path) -> Result<Option<Saved>, LkgError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(LkgError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let corrupt = |reason: &str| LkgError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let newline = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| corrupt("no header line"))?;
    let header =
        std::str::from_utf8(&bytes[..newline]).map_err(|_| corrupt("header is not text"))?;
    let expected = header
        .strip_prefix(MAGIC)
        .ok_or_else(|| corrupt("unknown header"))?;
    let body = &bytes[newline + 1..];
    if hex::encode(Sha256::digest(body)) != expected {
        return Err(corrupt("checksum mismatch"));
    }
    let body: Body = serde_json::from_slice(body).map_err(|e| corrupt(&format!("body: {e}")))?;
    let cluster_id = body.cluster_id.filter(|id| !id.is_empty());
    if let Some(id) = &cluster_id {
        gatehouse_proto::check_cluster_id(id).map_err(|e| corrupt(&format!("cluster_id: {e}")))?;
    }
    Ok(Some(Saved {
        state: ConfigState::from_objects(body.revision, body.objects),
        cluster_id,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gatehouse_model::object::Consumer;

    fn state() -> ConfigState {
        let consumer = Object::Consumer(Consumer {
            name: "acme".into(),
            labels: Default::default(),
            revision: 4,
            groups: vec!["gold".into()],
            metadata: Default::default(),
        });
        ConfigState::from_objects(4, [consumer])
    }

    #[test]
    fn a_written_file_reads_back_the_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lkg.json");
        assert!(read(&path).unwrap().is_none(), "no file yet");
        write(&path, &state(), Some("5d0c2e9a41f7b3c86e12ad04")).unwrap();
        let back = read(&path).unwrap().unwrap();
        assert_eq!(back.state.revision(), 4);
        assert_eq!(
            back.state.list_all().collect::<Vec<_>>(),
            state().list_all().collect::<Vec<_>>()
        );
        assert_eq!(back.cluster_id.as_deref(), Some("5d0c2e9a41f7b3c86e12ad04"));
        // Without a cluster id (not learnt yet) it reads back as none.
        write(&path, &state(), None).unwrap();
        let back = read(&path).unwrap().unwrap();
        assert_eq!(back.state.revision(), 4);
        assert_eq!(back.cluster_id, None);
    }

    /// A file as data planes wrote it before the cluster id was kept.
    fn write_old_format(path: &Path, body: &serde_json::Value) {
        let body = serde_json::to_vec(body).unwrap();
        let mut file = format!("{MAGIC}{}\n", hex::encode(Sha256::digest(&body))).into_bytes();
        file.extend_from_slice(&body);
        std::fs::write(path, file).unwrap();
    }

    #[test]
    fn a_file_from_before_the_cluster_id_loads_with_no_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lkg.json");
        let state = state();
        let objects: Vec<&Object> = state.objects().collect();
        write_old_format(
            &path,
            &serde_json::json!({ "revision": 4, "objects": objects }),
        );
        let back = read(&path).unwrap().unwrap();
        assert_eq!(back.state.revision(), 4);
        assert_eq!(
            back.state.list_all().collect::<Vec<_>>(),
            state.list_all().collect::<Vec<_>>()
        );
        assert_eq!(back.cluster_id, None);
    }

    #[test]
    fn a_malformed_cluster_id_makes_the_file_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lkg.json");
        write_old_format(
            &path,
            &serde_json::json!({ "revision": 4, "cluster_id": "a b", "objects": [] }),
        );
        let err = read(&path).unwrap_err().to_string();
        assert!(
            err.contains("corrupt last-known-good file: cluster_id: "),
            "{err}"
        );
    }

    #[test]
    fn a_changed_byte_or_a_truncated_file_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lkg.json");
        write(&path, &state(), Some("5d0c2e9a41f7b3c86e12ad04")).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(
            err.ends_with("corrupt last-known-good file: checksum mismatch"),
            "{err}"
        );
        std::fs::write(&path, &bytes[..10]).unwrap();
        assert!(read(&path)
            .unwrap_err()
            .to_string()
            .contains("no header line"));
        std::fs::write(&path, b"").unwrap();
        assert!(read(&path).is_err());
    }
}
