//! Where the binaries' admin tokens come from: the bootstrap token of a
//! control-plane node, and the token a data plane watches the config stream
//! with. Tokens are read from the environment or a file, never from a flag
//! (a flag would show in process listings), and never logged.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use gatehouse_model::admintoken;

/// The environment variable holding a control-plane node's bootstrap token.
pub const BOOTSTRAP_ENV: &str = "GATEHOUSE_BOOTSTRAP_TOKEN";
/// The environment variable holding a data plane's (or gatehousectl's) token.
pub const TOKEN_ENV: &str = "GATEHOUSE_TOKEN";

fn check(token: &str, source: &str) -> Result<String> {
    let token = token.trim();
    if !admintoken::well_formed(token) {
        bail!(
            "{source}: not an admin token (expected `{}` and {} letters or digits; make one with `gatehouse token generate`)",
            admintoken::PREFIX,
            admintoken::SECRET_LEN
        );
    }
    Ok(token.to_string())
}

/// Writes `contents` to a file that must not exist yet (`private`: mode
/// 0600 on Unix) and syncs it: never another file someone left there.
pub fn write_new(path: &Path, contents: &str, private: bool) -> Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = options
        .open(path)
        .with_context(|| format!("cannot create {} (it must not exist yet)", path.display()))?;
    f.write_all(contents.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Reads a token file (one line).
pub fn read_file(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read token file {}", path.display()))?;
    check(&text, &format!("token file {}", path.display()))
}

fn from_env(var: &str) -> Result<Option<String>> {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => check(&v, var).map(Some),
        _ => Ok(None),
    }
}

/// A fresh token from the operating system's CSPRNG.
pub fn generate() -> String {
    admintoken::generate(&mut rand::random::<u8>)
}

/// A control-plane node's bootstrap token: `GATEHOUSE_BOOTSTRAP_TOKEN`, else
/// `file`, else `<data_dir>/bootstrap-token`, made (mode 0600) when missing.
pub fn bootstrap(file: Option<&Path>, data_dir: &Path) -> Result<String> {
    if let Some(token) = from_env(BOOTSTRAP_ENV)? {
        return Ok(token);
    }
    if let Some(path) = file {
        return read_file(path);
    }
    let path: PathBuf = data_dir.join("bootstrap-token");
    if path.exists() {
        return read_file(&path);
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let token = generate();
    write_new(&path, &format!("{token}\n"), true)?;
    tracing::info!(file = %path.display(), "generated a bootstrap admin token (accepted until the cluster holds admin tokens; then it is admin_token \"bootstrap\")");
    Ok(token)
}

/// A client token: `GATEHOUSE_TOKEN`, else `file`.
pub fn client(file: Option<&Path>) -> Result<Option<String>> {
    if let Some(token) = from_env(TOKEN_ENV)? {
        return Ok(Some(token));
    }
    file.map(read_file).transpose()
}

/// The environment variable holding the secrets key itself.
pub const SECRETS_KEY_ENV: &str = "GATEHOUSE_SECRETS_KEY";

/// The key that seals key material at rest: `GATEHOUSE_SECRETS_KEY`, else
/// the file. 64 hex digits or the base64 of 32 bytes.
pub fn secrets_key(file: Option<&Path>) -> Result<Option<gatehouse_model::seal::SealKey>> {
    use gatehouse_model::seal::SealKey;
    let hint = "expected 64 hex digits or the base64 of 32 bytes; make one with `gatehouse secrets generate-key`";
    if let Ok(text) = std::env::var(SECRETS_KEY_ENV) {
        if !text.trim().is_empty() {
            return SealKey::parse(&text)
                .map(Some)
                .ok_or_else(|| anyhow::anyhow!("{SECRETS_KEY_ENV}: not a secrets key ({hint})"));
        }
    }
    let Some(path) = file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read secrets key file {}", path.display()))?;
    SealKey::parse(&text).map(Some).ok_or_else(|| {
        anyhow::anyhow!(
            "secrets key file {}: not a secrets key ({hint})",
            path.display()
        )
    })
}

/// Reads `path`, or makes it (mode 0600) with a new key when missing: for standalone.
pub fn secrets_key_or_new(path: &Path) -> Result<gatehouse_model::seal::SealKey> {
    if let Some(key) = secrets_key(None)? {
        return Ok(key);
    }
    if !path.exists() {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let key = gatehouse_model::seal::SealKey::generate_text();
        write_new(path, &format!("{key}\n"), true)?;
        tracing::info!(file = %path.display(), "generated a secrets key for key material at rest");
    }
    secrets_key(Some(path))?.ok_or_else(|| anyhow::anyhow!("{}: no key", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_bootstrap_token_is_kept_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = bootstrap(None, dir.path()).unwrap();
        assert!(admintoken::well_formed(&first));
        let path = dir.path().join("bootstrap-token");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(bootstrap(None, dir.path()).unwrap(), first);
    }

    #[test]
    fn a_token_file_with_something_else_is_refused_without_echoing_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        std::fs::write(&path, "hunter2\n").unwrap();
        let err = format!("{:#}", read_file(&path).unwrap_err());
        assert!(err.contains("not an admin token"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}
