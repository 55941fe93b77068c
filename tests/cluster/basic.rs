//! A cluster forms, and a write through a follower is readable everywhere.

use gatehouse_e2e::{consumer, ctl, put, Cluster, Options};
use gatehouse_proto::pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_form_and_a_follower_write_is_read_linearizably_everywhere(
) -> anyhow::Result<()> {
    let cluster = Cluster::start(3, Options::default()).await?;
    let leader = cluster.leader().await?;
    let follower = cluster.nodes.iter().find(|n| n.id != leader).unwrap();

    // Through the CLI, as an operator would see it.
    let status = ctl(&follower.admin, &["cluster", "status", "-o", "json"]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&status.stdout)?;
    assert_eq!(status["leader_id"], leader);
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    assert!(
        nodes.iter().all(|n| n["voter"] == true && n["error"] == ""),
        "{nodes:?}"
    );

    let revision = put(&follower.admin, consumer("written-via-follower"))
        .await
        .map_err(|s| anyhow::anyhow!("put through follower: {}", s.message()))?;
    assert!(revision > 0);

    // Linearizable reads (the default) from every node, without waiting first.
    for node in &cluster.nodes {
        let got = cluster
            .client(node.id)
            .await?
            .get(pb::GetRequest {
                kind: "consumer".into(),
                name: "written-via-follower".into(),
                stale: false,
            })
            .await?
            .into_inner();
        let object = got.object.expect("object");
        assert_eq!(object.revision, revision, "node {}", node.id);
        assert!(got.config_revision >= revision);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_get_and_delete_through_gatehousectl() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, Options::default()).await?;
    let server = &cluster.node(1).admin;
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("billing.yaml"),
        "version: 1\nupstreams:\n  - name: billing\n    labels: { team: payments }\n    targets: [{ address: \"127.0.0.1:9000\" }]\nroutes:\n  - name: billing\n    paths: [{ prefix: /billing }]\n    upstream: billing\n",
    )?;
    let path = dir.path().to_str().unwrap();

    let out = ctl(server, &["apply", "-f", path]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("upstream \"billing\" created"), "{stdout}");
    assert!(stdout.contains("applied 2 changes at revision"), "{stdout}");

    // Applying the same files again changes nothing.
    let out = ctl(server, &["apply", "-f", path]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("no changes"));

    let out = ctl(
        server,
        &["get", "upstreams", "-l", "team=payments", "-o", "yaml"],
    );
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert!(
        yaml.contains("name: billing") && yaml.contains("127.0.0.1:9000"),
        "{yaml}"
    );
    let out = ctl(server, &["get", "upstreams", "-l", "team=other"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        1,
        "only the header"
    );

    // The export of every object applies back as "no changes" (backup round trip).
    let out = ctl(server, &["get", "all", "-o", "yaml"]);
    assert!(out.status.success());
    let export = dir.path().join("export.yml");
    std::fs::write(&export, &out.stdout)?;
    let out = ctl(server, &["apply", "-f", export.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("no changes"),
        "{out:?}"
    );

    // Still referenced by the route: refused, with the reason.
    let out = ctl(server, &["delete", "upstream", "billing"]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: upstream \"billing\" cannot be deleted: route \"billing\" references it"
    );
    let out = ctl(server, &["delete", "route", "billing"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = ctl(server, &["delete", "upstream", "billing"]);
    assert!(out.status.success());
    let out = ctl(server, &["get", "route", "billing"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: route \"billing\" not found"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gatehousectl_exits_quietly_when_its_reader_stops_early() -> anyhow::Result<()> {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let cluster = gatehouse_e2e::Cluster::start(1, gatehouse_e2e::Options::default()).await?;
    let server = cluster.node(1).admin.clone();
    // More output than a pipe holds (64 KiB), so the writer meets the closed pipe.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("many.yaml");
    let consumers: String = (0..2000)
        .map(|i| format!("  - name: reader-with-a-long-name-{i:05}\n"))
        .collect();
    std::fs::write(&file, format!("version: 1\nconsumers:\n{consumers}"))?;
    gatehouse_e2e::apply(&server, file.to_str().unwrap());
    // Like `gatehousectl get consumers | head -c 16`: read a little, then close the pipe.
    let mut child = Command::new(gatehouse_e2e::bin("gatehousectl"))
        .env("GATEHOUSE_TOKEN", gatehouse_e2e::TOKEN)
        .args(["--server", &server, "get", "consumers"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut first = [0u8; 16];
    stdout.read_exact(&mut first)?;
    drop(stdout);
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(out.status.code(), Some(101), "{stderr}");
    Ok(())
}
