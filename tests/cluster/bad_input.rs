//! Bad input at the admin API and in files: a precise error, and nothing changes.

use gatehouse_e2e::{consumer, ctl, put, Cluster, Options};
use gatehouse_proto::pb;
use tonic::Code;

const UPSTREAM: &str =
    "version: 1\nupstreams:\n  - name: billing\n    targets: [{ address: \"127.0.0.1:9000\" }]\n";

/// Everything the node holds, with the configuration revision.
async fn snapshot(cluster: &Cluster) -> anyhow::Result<(u64, Vec<pb::Object>)> {
    let reply = cluster
        .client(1)
        .await?
        .list(pb::ListRequest::default())
        .await?
        .into_inner();
    Ok((reply.config_revision, reply.objects))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_files_fail_apply_with_the_file_line_and_field_and_change_nothing() -> anyhow::Result<()>
{
    let cluster = Cluster::start(1, Options::default()).await?;
    let server = cluster.node(1).admin.clone();
    let dir = tempfile::tempdir()?;
    let good = dir.path().join("good.yaml");
    std::fs::write(&good, UPSTREAM)?;
    assert!(ctl(&server, &["apply", "-f", good.to_str().unwrap()])
        .status
        .success());
    let before = snapshot(&cluster).await?;

    let cases: &[(&str, String, &str)] = &[
        ("malformed.yaml", "version: 1\nroutes:\n  - name: x\n\tpaths: []\n".into(), "line 4"),
        (
            "unknown-key.yaml",
            "version: 1\nupstreams:\n  - name: billing\n    taregts: []\n".into(),
            "unknown field `taregts`, expected one of",
        ),
        ("no-version.yaml", "upstreams: []\n".into(), "missing field `version`"),
        ("future.yaml", "version: 2\n".into(), "version 2 is not supported"),
        (
            "dangling.yaml",
            "version: 1\nroutes:\n  - name: r\n    paths: [{ prefix: / }]\n    upstream: nope\n".into(),
            "route \"r\": upstream: references unknown upstream \"nope\"",
        ),
        (
            "regex.yaml",
            "version: 1\nroutes:\n  - name: r\n    paths: [{ regex: \"^/(a\" }]\n    upstream: billing\n".into(),
            "route \"r\": paths[0].regex: invalid regex",
        ),
        (
            "huge.yaml",
            format!(
                "version: 1\ncertificates:\n  - name: big\n    server_names: [a.example]\n    certificate_pem: \"-----BEGIN CERTIFICATE-----{}\"\n    private_key_pem: \"-----BEGIN PRIVATE KEY-----\"\n",
                "A".repeat(70_000)
            ),
            "certificate \"big\": (object): is ",
        ),
        (
            "duplicate.yaml",
            "version: 1\nupstreams:\n  - name: billing\n    targets: [{ address: \"127.0.0.1:9001\" }]\n  - name: billing\n    targets: [{ address: \"127.0.0.1:9002\" }]\n".into(),
            "upstream \"billing\" is defined twice",
        ),
    ];
    for (file, text, expected) in cases {
        let path = dir.path().join(file);
        std::fs::write(&path, text)?;
        let out = ctl(&server, &["apply", "-f", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{file} was accepted");
        assert!(
            stderr.contains(expected),
            "{file}: expected {expected:?} in {stderr:?}"
        );
        assert!(
            stderr.contains(file),
            "{file}: the error names the file: {stderr:?}"
        );
        // The offline check says the same.
        let out = ctl(&server, &["validate", "-f", path.to_str().unwrap()]);
        assert!(
            !out.status.success() && String::from_utf8_lossy(&out.stderr).contains(expected),
            "{file}"
        );
    }
    // An unknown key is named with its line.
    let out = ctl(
        &server,
        &[
            "validate",
            "-f",
            dir.path().join("unknown-key.yaml").to_str().unwrap(),
        ],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("at line 4 column 5"));
    assert_eq!(snapshot(&cluster).await?, before, "nothing changed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_precise_grpc_errors_and_change_nothing() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, Options::default()).await?;
    let server = cluster.node(1).admin.clone();
    let first = put(&server, consumer("acme")).await?;
    put(&server, consumer("acme")).await?;
    let before = snapshot(&cluster).await?;
    let mut client = cluster.client(1).await?;

    // A stale expected revision is a conflict.
    let err = client
        .put(pb::PutRequest {
            object: Some(consumer("acme")),
            expected_revision: Some(first),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    assert!(
        err.message()
            .starts_with("consumer \"acme\" is at revision"),
        "{}",
        err.message()
    );
    assert!(err
        .message()
        .contains(&format!("the write expected {first}")));

    // A batch whose last operation is invalid: all or nothing.
    let mut bad = consumer("Bad_Name");
    bad.spec_json = "{}".into();
    let err = client
        .apply(pb::ApplyRequest {
            ops: [consumer("fresh"), bad]
                .into_iter()
                .map(|o| pb::Operation {
                    op: Some(pb::operation::Op::Put(pb::PutRequest {
                        object: Some(o),
                        expected_revision: None,
                    })),
                })
                .collect(),
            expected_config_revision: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("consumer \"Bad_Name\": name:"),
        "{}",
        err.message()
    );

    // Malformed objects at the edge.
    let cases = [
        (
            pb::Object {
                kind: "router".into(),
                ..consumer("x")
            },
            "object.kind: unknown kind \"router\"",
        ),
        (
            pb::Object {
                spec_json: "{not json".into(),
                ..consumer("x")
            },
            "object.spec_json: is not JSON",
        ),
        (
            pb::Object {
                spec_json: r#"{"grups":[]}"#.into(),
                ..consumer("x")
            },
            "unknown field `grups`",
        ),
        (
            pb::Object {
                kind: "certificate".into(),
                spec_json: serde_json::json!({
                    "server_names": ["a.example"],
                    "certificate_pem": format!("-----BEGIN CERTIFICATE-----{}", "A".repeat(70_000)),
                    "private_key_pem": "-----BEGIN PRIVATE KEY-----",
                })
                .to_string(),
                ..consumer("big")
            },
            "certificate \"big\": (object): is ",
        ),
    ];
    for (object, expected) in cases {
        let err = client
            .put(pb::PutRequest {
                object: Some(object),
                expected_revision: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
        assert!(
            err.message().contains(expected),
            "expected {expected:?} in {:?}",
            err.message()
        );
    }

    // A request over the admin API's 16 MiB cap is refused before it is decoded.
    let huge = pb::Object {
        spec_json: format!(r#"{{"groups":["{}"]}}"#, "g".repeat(17 * 1024 * 1024)),
        ..consumer("huge")
    };
    let err = client
        .put(pb::PutRequest {
            object: Some(huge),
            expected_revision: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{}", err.message());
    assert!(
        err.message().contains("message length too large"),
        "{}",
        err.message()
    );
    let mut client = cluster.client(1).await?;

    // Deleting what does not exist, and an unknown expected config revision.
    let err = client
        .delete(pb::DeleteRequest {
            target: Some(pb::ObjectRef {
                kind: "route".into(),
                name: "ghost".into(),
            }),
            expected_revision: None,
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::NotFound, "route \"ghost\" not found")
    );
    let err = client
        .apply(pb::ApplyRequest {
            ops: vec![],
            expected_config_revision: Some(1),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);

    assert_eq!(snapshot(&cluster).await?, before, "nothing changed");
    Ok(())
}
