//! Who may use the admin API: tokens, roles, revocation, the audit log, and
//! the config stream's credentials.

use std::time::Duration;

use gatehouse_e2e::{admin_as, consumer, ctl, ctl_as, eventually, Cluster, Options, TOKEN};
use gatehouse_proto::pb;
use gatehouse_proto::pb::config_stream_client::ConfigStreamClient;
use tonic::Code;

/// `gatehousectl tokens create NAME --role ROLE` as the bootstrap admin; the token.
fn create_token(server: &str, name: &str, role: &str) -> String {
    let out = ctl(server, &["tokens", "create", name, "--role", role]);
    assert!(
        out.status.success(),
        "tokens create {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Opens a config stream with `token` and says hello; the first answer or the refusal.
async fn watch_with(addr: &str, token: Option<&str>) -> Result<(), tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = ConfigStreamClient::with_interceptor(
        channel,
        gatehouse_proto::BearerToken::new(token).unwrap(),
    );
    let hello = pb::WatchRequest {
        msg: Some(pb::watch_request::Msg::Hello(pb::Hello {
            node_name: "probe".into(),
            revision: 0,
            cluster_id: String::new(),
        })),
    };
    let mut inbound = client
        .watch(tokio_stream::iter(vec![hello]))
        .await?
        .into_inner();
    inbound.message().await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_decide_what_each_token_may_do_and_the_audit_log_names_who_did_it(
) -> anyhow::Result<()> {
    let cluster = Cluster::start(3, Options::default()).await?;
    let leader = cluster.leader().await?;
    let follower = if leader == 1 { 2 } else { 1 };
    let at_leader = cluster.node(leader).admin.clone();
    let at_follower = cluster.node(follower).admin.clone();

    // The bootstrap token became admin token "bootstrap".
    let listed = eventually(
        Duration::from_secs(10),
        "the bootstrap token stored",
        || async {
            let out = ctl(&at_leader, &["tokens", "list"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.contains("bootstrap").then_some(text)
        },
    )
    .await?;
    assert!(listed.contains("admin"), "{listed}");

    // Tokens made on the leader work at once on a follower.
    let editor = create_token(&at_leader, "ci", "editor");
    let viewer = create_token(&at_leader, "dashboard", "viewer");
    let data_plane = create_token(&at_leader, "edge", "data_plane");
    assert!(editor.starts_with("ght_") && editor.len() == 44, "{editor}");

    // No token, a malformed one, an unknown one: UNAUTHENTICATED, nothing written.
    for token in [
        None,
        Some("not-a-token"),
        Some("ght_0000000000000000000000000000000000000000"),
    ] {
        let mut c = admin_as(token, &at_follower).await?;
        let err = c
            .put(pb::PutRequest {
                object: Some(consumer("intruder")),
                expected_revision: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}: {err:?}");
        let err = c.list(pb::ListRequest::default()).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}: {err:?}");
    }
    let out = ctl_as("", &at_follower, &["get", "consumers"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no admin token"), "{}", stderr(&out));

    // The editor writes configuration (through a follower, forwarded to the leader) ...
    let mut as_editor = admin_as(Some(&editor), &at_follower).await?;
    as_editor
        .put(pb::PutRequest {
            object: Some(consumer("alice")),
            expected_revision: None,
        })
        .await?;
    // ... but may not touch tokens or membership.
    let err = as_editor
        .create_admin_token(pb::CreateAdminTokenRequest {
            name: "sneaky".into(),
            role: "admin".into(),
            labels: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("token:ci has role editor"),
        "{err:?}"
    );
    let out = ctl_as(&editor, &at_leader, &["tokens", "revoke", "dashboard"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("may not manage admin tokens"),
        "{}",
        stderr(&out)
    );
    let err = as_editor
        .remove_node(pb::RemoveNodeRequest { id: follower })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // Admin tokens are not even listed to an editor.
    let all = as_editor
        .list(pb::ListRequest::default())
        .await?
        .into_inner();
    assert!(all.objects.iter().all(|o| o.kind != "admin_token"));
    assert!(all.objects.iter().any(|o| o.name == "alice"));

    // The viewer reads but cannot write.
    let out = ctl_as(&viewer, &at_follower, &["get", "consumers"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("alice"));
    let mut as_viewer = admin_as(Some(&viewer), &at_follower).await?;
    let err = as_viewer
        .delete(pb::DeleteRequest {
            target: Some(pb::ObjectRef {
                kind: "consumer".into(),
                name: "alice".into(),
            }),
            expected_revision: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // Key material is shown to those who may change it, not to a viewer.
    let hmac = "a-shared-hmac-secret-of-at-least-32-bytes";
    as_editor
        .put(pb::PutRequest {
            object: Some(pb::Object {
                kind: "jwt_issuer".into(),
                name: "corp".into(),
                labels: Default::default(),
                revision: 0,
                spec_json: format!(
                    r#"{{"issuer":"https://id.example","audiences":["gw"],"algorithms":["HS256"],"keys":[{{"kid":"k1","secret":"{hmac}"}}]}}"#
                ),
            }),
            expected_revision: None,
        })
        .await?;
    let get_issuer = |token: &str| {
        let out = ctl_as(
            token,
            &at_leader,
            &["get", "jwt_issuer", "corp", "-o", "json"],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(get_issuer(&editor).contains(hmac));
    let seen = get_issuer(&viewer);
    assert!(!seen.contains(hmac) && seen.contains("(secret)"), "{seen}");
    let listed = ctl_as(&viewer, &at_follower, &["get", "all", "-o", "json"]);
    assert!(!String::from_utf8_lossy(&listed.stdout).contains(hmac));
    // A plan compares secrets in the clear, so a viewer may not ask for one.
    let err = as_viewer
        .plan(pb::PlanRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // The data-plane token watches the config stream and nothing else; others may not watch.
    watch_with(&at_follower, Some(&data_plane)).await?;
    let mut as_dp = admin_as(Some(&data_plane), &at_follower).await?;
    let err = as_dp.list(pb::ListRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = watch_with(&at_follower, Some(&viewer)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = watch_with(&at_follower, None).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // The last admin token cannot be revoked; a revoked token is refused everywhere.
    let out = ctl(&at_leader, &["tokens", "revoke", "bootstrap"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("last admin role"), "{}", stderr(&out));
    let out = ctl(&at_leader, &["tokens", "revoke", "ci"]);
    assert!(out.status.success(), "{}", stderr(&out));
    eventually(
        Duration::from_secs(10),
        "the revoked token refused on every node",
        || async {
            for n in 1..=3 {
                let out = ctl_as(
                    &editor,
                    &cluster.node(n).admin,
                    &["get", "consumers", "--stale"],
                );
                if out.status.success() {
                    return None;
                }
            }
            Some(())
        },
    )
    .await?;

    // The audit log names who did what.
    let out = ctl_as(&viewer, &at_follower, &["audit", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let viewer_sees = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(viewer_sees.contains("\"alice\""), "{viewer_sees}");
    assert!(
        !viewer_sees.contains("admin_token"),
        "a viewer sees no token records"
    );
    let out = ctl(&at_follower, &["audit", "-o", "json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let who = |kind: &str, name: &str, action: &str| -> Vec<String> {
        lines
            .iter()
            .filter(|l| l["kind"] == kind && l["name"] == name && l["action"] == action)
            .map(|l| l["actor"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        who("admin_token", "bootstrap", "create"),
        ["system:bootstrap"]
    );
    assert_eq!(who("admin_token", "ci", "create"), ["token:bootstrap"]);
    assert_eq!(who("consumer", "alice", "create"), ["token:ci"]);
    assert_eq!(who("admin_token", "ci", "delete"), ["token:bootstrap"]);
    assert!(who("consumer", "intruder", "create").is_empty());
    // Membership changes are audited too (the sandbox added nodes 2 and 3).
    assert_eq!(who("member", "2", "add_node"), ["token:bootstrap"]);
    assert_eq!(who("member", "3", "add_node"), ["token:bootstrap"]);
    let by_ci = ctl(&at_leader, &["audit", "--actor", "token:ci", "-o", "json"]);
    // token:ci wrote consumer alice and jwt_issuer corp.
    assert_eq!(String::from_utf8_lossy(&by_ci.stdout).lines().count(), 2);

    // No node keeps a token in the clear: not in its data directory, not in its log.
    for n in 1..=3 {
        let node = cluster.node(n);
        for token in [TOKEN, editor.as_str(), viewer.as_str(), data_plane.as_str()] {
            let secret = &token[4..];
            assert!(
                !gatehouse_e2e::dir_contains(&node.data_dir, secret.as_bytes())?,
                "node {n}'s data dir holds a token"
            );
            assert!(
                !node.log_tail().contains(secret),
                "node {n}'s log holds a token"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_keeps_guessing_is_refused_for_a_while() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, Options::default()).await?;
    let addr = cluster.node(1).admin.clone();
    let guess = "ght_0000000000000000000000000000000000000001";
    let mut refused_early = None;
    for i in 0..30 {
        let mut c = admin_as(Some(guess), &addr).await?;
        let err = c.list(pb::ListRequest::default()).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        if err.message().contains("too many failed") {
            refused_early = Some(i);
            break;
        }
    }
    assert_eq!(
        refused_early,
        Some(20),
        "the 21st guess is refused outright"
    );
    // Now even the right token is refused from this peer, until the window ends.
    let mut c = admin_as(Some(TOKEN), &addr).await?;
    let err = c.list(pb::ListRequest::default()).await.unwrap_err();
    assert!(err.message().contains("too many failed"), "{err:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reports_its_health_and_counts_admin_calls_by_code() -> anyhow::Result<()> {
    use gatehouse_e2e::data::get;
    let cluster = Cluster::start(
        1,
        Options {
            ops: true,
            ..Options::default()
        },
    )
    .await?;
    let node = cluster.node(1);
    let ops = node.ops.clone().expect("an ops listener");
    let ready = get(&format!("http://{ops}/readyz"), &[]).await?;
    assert_eq!(ready.status, 200);
    assert!(String::from_utf8_lossy(&ready.body).starts_with("ready: term "));

    let first = ctl(&node.admin, &["tokens", "create", "v", "--role", "viewer"]);
    assert!(
        first.status.success(),
        "{}\n{}",
        stderr(&first),
        node.log_tail()
    );
    let viewer_out = ctl(&node.admin, &["tokens", "create", "w", "--role", "viewer"]);
    assert!(viewer_out.status.success(), "{}", stderr(&viewer_out));
    let viewer = String::from_utf8(viewer_out.stdout)?.trim().to_string();
    let denied = ctl_as(&viewer, &node.admin, &["delete", "admin_token", "v"]);
    assert!(!denied.status.success());

    let metrics = get(&format!("http://{ops}/metrics"), &[]).await?;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    for line in [
        "gatehouse_cp_raft_is_leader 1",
        "gatehouse_cp_admin_requests_total{method=\"CreateAdminToken\",code=\"Ok\"} 2",
        "gatehouse_cp_admin_requests_total{method=\"Delete\",code=\"PermissionDenied\"} 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing in:\n{text}"
        );
    }
    // The two token writes went through the admin API and were timed (the
    // bootstrap token is stored by the node itself).
    let commits = text
        .lines()
        .find_map(|l| l.strip_prefix("gatehouse_cp_write_commit_seconds_count "))
        .expect("the commit histogram");
    assert_eq!(commits, "2", "{text}");
    let missing = get(&format!("http://{ops}/nope"), &[]).await?;
    assert_eq!(missing.status, 404);
    Ok(())
}
