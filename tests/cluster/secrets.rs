//! Secrets at rest: key material is sealed before it enters the replicated
//! log and opened only by the data plane that uses it.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use gatehouse_e2e::data::{get, DataPlaneProc, Upstream};
use gatehouse_e2e::{bin, dir_contains, eventually, Cluster, Options, TOKEN};

/// `gatehousectl` as the sandbox admin, with `env` for secret references.
fn ctl_env(server: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("gatehousectl"));
    cmd.env("GATEHOUSE_TOKEN", TOKEN)
        .env_remove("GATEHOUSE_TOKEN_FILE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.arg("--server")
        .arg(server)
        .args(args)
        .output()
        .expect("run gatehousectl")
}

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn secrets_key(path: &Path) -> anyhow::Result<()> {
    let o = Command::new(bin("gatehouse"))
        .args(["secrets", "generate-key"])
        .output()?;
    anyhow::ensure!(o.status.success(), "generate-key: {}", out(&o));
    std::fs::write(path, &o.stdout)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_material_is_sealed_everywhere_but_where_it_is_used() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let key_file = dir.path().join("secrets.key");
    secrets_key(&key_file)?;
    let cluster = Cluster::start(
        3,
        Options {
            secrets_key: Some(key_file.clone()),
            ..Options::default()
        },
    )
    .await?;
    let leader = cluster.leader().await?;
    let server = cluster.node(leader).admin.clone();
    let cps: Vec<String> = (1..=3).map(|i| cluster.node(i).admin.clone()).collect();
    let upstream = Upstream::start("app").await?;

    let pki = crate::protocols::pki(&["api.test"]);
    let (_, cert_pem, key_pem, _) = pki.leaves[0].clone();
    // A line from the middle of the private key, and the HMAC secret: what must not leak.
    let key_line = key_pem.lines().nth(1).expect("a PEM body").to_string();
    let hmac = "an-hmac-secret-of-more-than-32-bytes-0123456789";

    let files = dir.path().join("gateway");
    std::fs::create_dir_all(&files)?;
    std::fs::write(
        files.join("gateway.yaml"),
        format!(
            "version: 1
certificates:
  - name: api
    server_names: [api.test]
    certificate_pem: |
{}
    private_key_pem: {{ env: API_KEY_PEM }}
jwt_issuers:
  - name: corp
    issuer: https://id.corp.example
    audiences: [gatehouse]
    algorithms: [HS256]
    keys:
      - kid: k1
        secret: {{ env: CORP_HMAC }}
upstreams:
  - name: app
    targets: [{{ address: \"{}\" }}]
routes:
  - name: app
    paths: [{{ prefix: / }}]
    upstream: app
",
            cert_pem
                .lines()
                .map(|l| format!("      {l}"))
                .collect::<Vec<_>>()
                .join("\n"),
            upstream.addr
        ),
    )?;
    let env = [("API_KEY_PEM", key_pem.as_str()), ("CORP_HMAC", hmac)];
    let files_arg = files.display().to_string();
    let applied = ctl_env(&server, &env, &["apply", "-f", &files_arg]);
    assert!(applied.status.success(), "{}", out(&applied));

    // The data plane with the key opens it and serves the certificate.
    let with_key = [
        "--secrets-key-file".to_string(),
        key_file.display().to_string(),
        "--tls-listen".to_string(),
        "127.0.0.1:0".to_string(),
    ];
    let dp = DataPlaneProc::start_custom("dp-1", &cps, dir.path(), &with_key, Some(TOKEN))?;
    let tls_addr = dp.tls.clone().expect("a TLS listener");
    eventually(
        Duration::from_secs(15),
        "the certificate served over TLS",
        || async {
            crate::protocols::connect(&tls_addr, "api.test", &pki.ca, &[b"http/1.1"])
                .await
                .ok()
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", dp.log_tail()))?;
    assert_eq!(
        get(&format!("http://{}/x", dp.proxy), &[]).await?.status,
        200
    );
    dp.wait_persisted().await?;

    // A data plane without the key cannot open it: it says so, and serves nothing.
    let no_key = DataPlaneProc::start_custom("dp-2", &cps, dir.path(), &[], Some(TOKEN))?;
    eventually(
        Duration::from_secs(15),
        "the data plane without the key to refuse the revision",
        || async {
            no_key
                .log_tail()
                .contains("is sealed, and no secrets key is configured here")
                .then_some(())
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", no_key.log_tail()))?;
    assert_ne!(no_key.ready_status().await, 200);

    // Nothing a user can read holds the key material in the clear.
    let yaml = ctl_env(&server, &[], &["get", "all", "-o", "yaml"]);
    assert!(yaml.status.success(), "{}", out(&yaml));
    assert!(
        out(&yaml).contains("gatehouse:sealed:v1:"),
        "{}",
        out(&yaml)
    );
    let audit = ctl_env(&server, &[], &["audit", "-o", "json"]);
    assert!(audit.status.success(), "{}", out(&audit));
    // diff against the same files: nothing to change (compared in the clear on the leader).
    let diff = ctl_env(&server, &env, &["diff", "-f", &files_arg]);
    assert_eq!(diff.status.code(), Some(0), "{}", out(&diff));
    // A changed secret shows as changed, not as its value.
    let rotated = "another-hmac-secret-of-more-than-32-bytes-98765";
    let diff = ctl_env(
        &server,
        &[("API_KEY_PEM", &key_pem), ("CORP_HMAC", rotated)],
        &["diff", "-f", &files_arg],
    );
    assert_eq!(diff.status.code(), Some(2), "{}", out(&diff));
    assert!(out(&diff).contains("secret"), "{}", out(&diff));
    for (what, text) in [
        ("get -o yaml", out(&yaml)),
        ("audit", out(&audit)),
        ("diff", out(&diff)),
    ] {
        assert!(!text.contains(&key_line), "{what} shows the private key");
        assert!(
            !text.contains(hmac) && !text.contains(rotated),
            "{what} shows the HMAC secret"
        );
    }
    for n in 1..=3 {
        let node = cluster.node(n);
        for secret in [key_line.as_str(), hmac] {
            assert!(
                !dir_contains(&node.data_dir, secret.as_bytes())?,
                "node {n}'s data dir holds a secret"
            );
            assert!(
                !node.log_tail().contains(secret),
                "node {n}'s log holds a secret"
            );
        }
    }
    for secret in [key_line.as_str(), hmac] {
        assert!(
            !dir_contains(&dp.state_dir, secret.as_bytes())?,
            "the last-known-good file holds a secret"
        );
        assert!(
            !dp.log_tail().contains(secret),
            "the data plane's log holds a secret"
        );
    }
    Ok(())
}
