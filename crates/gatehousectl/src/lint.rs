//! `gatehousectl lint`: the model's security lint over files, offline.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use gatehouse_model::file::Loaded;
use gatehouse_model::secret::Resolve;

/// Findings were reported.
pub const EXIT_FINDINGS: u8 = 2;

pub fn run(path: &Path) -> Result<ExitCode> {
    // References are read but not resolved: lint never needs a secret's value.
    let loaded = Loaded::read_with(path, Resolve::Placeholders)?;
    let findings = gatehouse_model::lint::lint(&loaded.objects, &loaded.secrets);
    for f in &findings {
        let file = loaded
            .source_of(&f.target)
            .map(|p| format!("{}: ", p.display()))
            .unwrap_or_default();
        println!("{file}{f}");
    }
    if findings.is_empty() {
        println!(
            "ok: no findings in {} objects in {}",
            loaded.objects.len(),
            path.display()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{} findings", findings.len());
        Ok(ExitCode::from(EXIT_FINDINGS))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use gatehouse_model::file::Loaded;
    use gatehouse_model::secret::Resolve;
    use gatehouse_model::ConfigState;

    /// The example team files of deploy/ci stay valid and lint-clean, as docs/ci.md says.
    #[test]
    fn the_deploy_example_is_valid_and_clean() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/ci/gateway");
        let loaded = Loaded::read_with(&dir, Resolve::Placeholders).unwrap();
        assert!(loaded.objects.len() >= 5);
        ConfigState::default()
            .apply(1, &loaded.to_command())
            .unwrap();
        let findings = gatehouse_model::lint::lint(&loaded.objects, &loaded.secrets);
        assert!(findings.is_empty(), "{findings:?}");
        // Its secret is a reference, not a value.
        assert!(!loaded.secrets.is_empty());
        assert!(loaded
            .secrets
            .iter()
            .all(|s| s.source != gatehouse_model::secret::SecretSource::Inline));
    }
}
