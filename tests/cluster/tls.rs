//! TLS between the cluster's parts: Raft over mutual TLS, the admin API and
//! the config stream over TLS, identities from client certificates.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use gatehouse_e2e::data::DataPlaneProc;
use gatehouse_e2e::{admin_tls, bin, eventually, make_certs, Cluster, Options, TOKEN};
use gatehouse_proto::pb;
use gatehouse_proto::pb::raft_client::RaftClient;
use tonic::Code;

/// `gatehousectl` against a TLS server: `env` on top of a clean environment.
fn ctl_env(env: &[(&str, &Path)], token: Option<&str>, server: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("gatehousectl"));
    cmd.env_remove("GATEHOUSE_TOKEN")
        .env_remove("GATEHOUSE_TOKEN_FILE")
        .env_remove("GATEHOUSE_CA")
        .env_remove("GATEHOUSE_CERT")
        .env_remove("GATEHOUSE_KEY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(t) = token {
        cmd.env("GATEHOUSE_TOKEN", t);
    }
    cmd.arg("--server")
        .arg(server)
        .args(["--timeout", "5"])
        .args(args)
        .output()
        .expect("run gatehousectl")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_talks_tls_and_knows_data_planes_and_admins_by_their_certificates(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    make_certs(&certs, 3, &["dp-1", "dp-2"], &["alice", "grafana:viewer"])?;
    // A CA the cluster does not trust, with a data plane of its own.
    let rogue = dir.path().join("rogue");
    make_certs(&rogue, 1, &["dp-1"], &["alice"])?;

    // Three nodes form a cluster over mutual TLS (joins and Raft included).
    let cluster = Cluster::start(
        3,
        Options {
            tls: Some(certs.clone()),
            ..Options::default()
        },
    )
    .await?;
    let leader = cluster.leader().await?;
    let follower = if leader == 1 { 2 } else { 1 };
    let at_follower = cluster.node(follower).admin.clone();
    let ca = certs.join("ca.pem");

    // gatehousectl with the CA and a token.
    let out = ctl_env(
        &[("GATEHOUSE_CA", &ca)],
        Some(TOKEN),
        &at_follower,
        &["cluster", "status"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(text(&out).matches("follower").count(), 2, "{}", text(&out));

    // A plaintext client on the TLS port gets nowhere.
    let out = ctl_env(&[], Some(TOKEN), &at_follower, &["get", "routes"]);
    assert!(!out.status.success(), "{}", text(&out));
    // Nor does a client that trusts another CA.
    let out = ctl_env(
        &[("GATEHOUSE_CA", &rogue.join("ca.pem"))],
        Some(TOKEN),
        &at_follower,
        &["get", "routes"],
    );
    assert!(!out.status.success(), "{}", text(&out));

    // A client certificate stands in for a token, with the role it names,
    // also when a follower forwards the write to the leader.
    let alice = [
        ("GATEHOUSE_CA", ca.as_path()),
        ("GATEHOUSE_CERT", &certs.join("alice.pem")),
        ("GATEHOUSE_KEY", &certs.join("alice-key.pem")),
    ];
    let out = ctl_env(
        &alice,
        None,
        &at_follower,
        &["tokens", "create", "ci", "--role", "editor"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let grafana = [
        ("GATEHOUSE_CA", ca.as_path()),
        ("GATEHOUSE_CERT", &certs.join("grafana.pem")),
        ("GATEHOUSE_KEY", &certs.join("grafana-key.pem")),
    ];
    let out = ctl_env(
        &grafana,
        None,
        &at_follower,
        &["tokens", "create", "x", "--role", "admin"],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cert:grafana has role viewer"),
        "{}",
        text(&out)
    );
    // A viewer sees no token records in the audit log; an admin does.
    let out = ctl_env(
        &grafana,
        None,
        &at_follower,
        &["audit", "--kind", "admin_token", "-o", "json"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "");
    let out = ctl_env(
        &alice,
        None,
        &at_follower,
        &["audit", "--kind", "admin_token", "-o", "json"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let created_by: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["name"] == "ci")
        .map(|r| r["actor"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(created_by, ["cert:alice"]);

    // A data plane with its certificate and no token watches and serves; the
    // cluster knows it by the certificate's name, not the one it claims.
    let cps: Vec<String> = (1..=3).map(|i| cluster.node(i).admin.clone()).collect();
    let tls_flags = |dir: &Path, name: &str| -> Vec<String> {
        vec![
            "--control-plane-ca".into(),
            certs.join("ca.pem").display().to_string(),
            "--control-plane-cert".into(),
            dir.join(format!("{name}.pem")).display().to_string(),
            "--control-plane-key".into(),
            dir.join(format!("{name}-key.pem")).display().to_string(),
        ]
    };
    let dp = DataPlaneProc::start_custom(
        "claims-another-name",
        &cps[..1],
        dir.path(),
        &tls_flags(&certs, "dp-1"),
        None,
    )?;
    eventually(
        Duration::from_secs(15),
        "the data plane ready over mutual TLS",
        || async { (dp.ready_status().await == 200).then_some(()) },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", dp.log_tail()))?;
    let out = ctl_env(
        &[("GATEHOUSE_CA", &ca)],
        Some(TOKEN),
        &at_follower,
        &["cluster", "status"],
    );
    let status = text(&out);
    assert!(status.contains("dp-1"), "{status}");
    assert!(!status.contains("claims-another-name"), "{status}");

    // A second data plane on another node: control-plane nodes add up each
    // other's data planes over mutual TLS, and both data planes hear 2.
    let dp2 = DataPlaneProc::start_custom(
        "dp-2",
        &cps[2..],
        dir.path(),
        &tls_flags(&certs, "dp-2"),
        None,
    )?;
    for d in [&dp, &dp2] {
        eventually(
            Duration::from_secs(20),
            "the cluster-wide data-plane count",
            || async {
                let m = gatehouse_e2e::data::get(&format!("http://{}/metrics", d.ops), &[])
                    .await
                    .ok()?;
                String::from_utf8_lossy(&m.body)
                    .contains("gatehouse_data_planes_reported 2")
                    .then_some(())
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", d.log_tail()))?;
    }
    drop(dp2);

    // Without a client certificate, even with a data_plane token, no watch.
    let mut c = admin_tls(&certs, Some(TOKEN), None, &at_follower).await?;
    let token = c
        .create_admin_token(pb::CreateAdminTokenRequest {
            name: "edge".into(),
            role: "data_plane".into(),
            labels: Default::default(),
        })
        .await?
        .into_inner()
        .token;
    let ca_only = vec!["--control-plane-ca".to_string(), ca.display().to_string()];
    let no_cert = DataPlaneProc::start_custom("no-cert", &cps, dir.path(), &ca_only, Some(&token))?;
    // A certificate from another CA does not get through the handshake.
    let rogue_dp = DataPlaneProc::start_custom(
        "rogue",
        &cps,
        dir.path(),
        &{
            let mut f = tls_flags(&rogue, "dp-1");
            f[1] = ca.display().to_string();
            f
        },
        None,
    )?;
    eventually(
        Duration::from_secs(15),
        "both refused data planes to log a refusal",
        || async {
            let refused = no_cert.log_tail().contains("needs a client certificate");
            let rogue_failed = rogue_dp.log_tail().contains("config stream");
            (refused && rogue_failed).then_some(())
        },
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}\n--- no-cert:\n{}\n--- rogue:\n{}",
            no_cert.log_tail(),
            rogue_dp.log_tail()
        )
    })?;
    assert_ne!(no_cert.ready_status().await, 200);
    assert_ne!(rogue_dp.ready_status().await, 200);
    let status = text(&ctl_env(
        &[("GATEHOUSE_CA", &ca)],
        Some(TOKEN),
        &at_follower,
        &["cluster", "status"],
    ));
    assert!(
        !status.contains("no-cert") && !status.contains("rogue"),
        "{status}"
    );

    // Raft takes no traffic from a certificate that is not a control plane's.
    let files = gatehouse_proto::tls::ClientTlsFiles {
        ca: ca.clone(),
        cert: Some(certs.join("alice.pem")),
        key: Some(certs.join("alice-key.pem")),
    };
    let raft_addr = cluster.node(follower).raft.clone();
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{raft_addr}"))?
        .tls_config(files.load()?.domain_name("127.0.0.1"))?
        .connect()
        .await?;
    let err = RaftClient::new(channel)
        .vote(pb::RaftRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("control-plane certificate"),
        "{err:?}"
    );
    Ok(())
}
