//! The CI scenario of docs/ci.md with real processes: export, edit, diff,
//! apply as one revision, concurrent applies from one base, ownership-scoped
//! pruning, an invalid file, and no secret in any output.

use std::path::Path;
use std::process::{Command, Output};

use gatehouse_e2e::{bin, Cluster, Options};
use gatehouse_proto::pb;

/// Key material that must never be printed.
const KEY_V1: &str = "CIFLOWKEYMATERIALVERSIONONE0123456789";
const KEY_V2: &str = "CIFLOWKEYMATERIALVERSIONTWO9876543210";
const CERT: &str =
    "-----BEGIN CERTIFICATE-----\\nMIIBszCCAVmgAwIBAgIU\\n-----END CERTIFICATE-----\\n";

fn key_pem(body: &str) -> String {
    format!("-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n")
}

/// `gatehousectl` with `args`, with `CI_TLS_KEY` set to the first key.
fn ctl(server: &str, args: &[&str]) -> Output {
    Command::new(bin("gatehousectl"))
        .arg("--server")
        .arg(server)
        .args(args)
        .env("CI_TLS_KEY", key_pem(KEY_V1))
        .env("GATEHOUSE_TOKEN", gatehouse_e2e::TOKEN)
        .output()
        .expect("run gatehousectl")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn no_secret(what: &str, out: &str) {
    for key in [KEY_V1, KEY_V2] {
        assert!(!out.contains(key), "{what} printed key material: {out}");
    }
}

/// Every object with the configuration revision.
async fn snapshot(cluster: &Cluster) -> anyhow::Result<(u64, Vec<pb::Object>)> {
    let reply = cluster
        .client(1)
        .await?
        .list(pb::ListRequest::default())
        .await?
        .into_inner();
    Ok((reply.config_revision, reply.objects))
}

fn revision_of(objects: &[pb::Object], kind: &str, name: &str) -> Option<u64> {
    objects
        .iter()
        .find(|o| o.kind == kind && o.name == name)
        .map(|o| o.revision)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The payments team's files: two upstreams, a route, a certificate whose
/// key comes from `CI_TLS_KEY`.
fn payments() -> String {
    format!(
        r#"version: 1
certificates:
  - name: pay-cert
    labels: {{ gatehouse.io/owner: payments }}
    server_names: [pay.example.com]
    certificate_pem: "{CERT}"
    private_key_pem: {{ env: CI_TLS_KEY }}
upstreams:
  - name: pay-a
    labels: {{ gatehouse.io/owner: payments }}
    targets: [{{ address: "127.0.0.1:9001" }}]
  - name: pay-b
    labels: {{ gatehouse.io/owner: payments }}
    targets: [{{ address: "127.0.0.1:9002" }}]
routes:
  - name: orders
    labels: {{ gatehouse.io/owner: payments }}
    hosts: [pay.example.com]
    paths: [{{ prefix: /orders }}]
    upstream: pay-a
  - name: refunds
    labels: {{ gatehouse.io/owner: payments }}
    hosts: [pay.example.com]
    paths: [{{ prefix: /refunds }}]
    upstream: pay-a
"#
    )
}

const SEARCH: &str = r#"version: 1
upstreams:
  - name: search
    labels: { gatehouse.io/owner: search }
    targets: [{ address: "127.0.0.1:9100" }]
routes:
  - name: search
    labels: { gatehouse.io/owner: search }
    paths: [{ prefix: /search }]
    upstream: search
consumers:
  - name: unowned
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ci_workflow_export_diff_apply_prune_and_conflicts() -> anyhow::Result<()> {
    let cluster = Cluster::start(1, Options::default()).await?;
    let server = cluster.node(1).admin.clone();
    let work = tempfile::tempdir()?;
    let seed = work.path().join("seed");
    std::fs::create_dir_all(seed.join("search"))?;
    std::fs::write(seed.join("payments.yaml"), payments())?;
    std::fs::write(seed.join("search/search.yaml"), SEARCH)?;
    let out = ctl(&server, &["apply", "-f", path(&seed)]);
    assert!(out.status.success(), "seed: {:?}", text(&out));
    no_secret("apply", &text(&out).0);

    // Export the payments team's objects: the key as a file reference.
    let exported = work.path().join("exported");
    let out = ctl(
        &server,
        &[
            "export",
            "-o",
            path(&exported),
            "-l",
            "gatehouse.io/owner=payments",
        ],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "export: {stderr}");
    no_secret("export", &stdout);
    no_secret("export", &stderr);
    assert!(
        stdout.starts_with("exported 5 objects at revision"),
        "{stdout}"
    );
    let certs = std::fs::read_to_string(exported.join("certificates.yaml"))?;
    no_secret("the exported YAML", &certs);
    assert!(
        certs.contains("file: secrets/certificate.pay-cert.private_key_pem"),
        "{certs}"
    );
    let key_file = exported.join("secrets/certificate.pay-cert.private_key_pem");
    assert_eq!(std::fs::read_to_string(&key_file)?, key_pem(KEY_V1));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file)?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "secret file mode {mode:o}");
    }

    // Lint sees the key as a reference (no GH006), and flags the unguarded routes.
    let out = ctl(&server, &["lint", "-f", path(&exported)]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains("GH001 route \"orders\": policy: has no policy"),
        "{stdout}"
    );
    assert!(!stdout.contains("GH006"), "{stdout}");
    let inline = work.path().join("inline.yaml");
    std::fs::write(
        &inline,
        payments().replace("{ env: CI_TLS_KEY }", &format!("{:?}", key_pem(KEY_V1))),
    )?;
    let out = ctl(&server, &["lint", "-f", path(&inline)]);
    let (stdout, _) = text(&out);
    assert!(
        stdout
            .contains("GH006 certificate \"pay-cert\": private_key_pem: holds key material inline"),
        "{stdout}"
    );
    no_secret("lint", &stdout);

    // The export round-trips: no differences, exit 0.
    let out = ctl(&server, &["diff", "-f", path(&exported)]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.starts_with("no changes"), "{stdout}");

    // Edit: point a route at the other upstream and rotate the key.
    let routes = exported.join("routes.yaml");
    let edited =
        std::fs::read_to_string(&routes)?.replacen("upstream: pay-a", "upstream: pay-b", 1);
    std::fs::write(&routes, edited)?;
    std::fs::write(&key_file, key_pem(KEY_V2))?;
    let out = ctl(&server, &["diff", "-f", path(&exported)]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    let (base, _) = snapshot(&cluster).await?;
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            format!("plan against revision {base}: 0 to create, 2 to update, 0 to delete").as_str(),
            "~ certificate \"pay-cert\": private_key_pem: (secret changed)",
            "~ route \"orders\": upstream: \"pay-a\" -> \"pay-b\"",
        ]
    );
    no_secret("diff", &stdout);
    no_secret("diff", &stderr);
    // The same plan as JSON, for tools.
    let out = ctl(&server, &["diff", "-o", "json", "-f", path(&exported)]);
    assert_eq!(out.status.code(), Some(2));
    let json = text(&out).0;
    no_secret("diff -o json", &json);
    let plan: serde_json::Value = serde_json::from_str(&json)?;
    assert_eq!(plan["revision"], base);
    assert_eq!(plan["changes"][0]["action"], "update");
    assert_eq!(plan["changes"][0]["target"]["kind"], "certificate");
    assert_eq!(plan["changes"][0]["fields"][0]["secret"], true);
    assert_eq!(plan["changes"][1]["fields"][0]["before"], "\"pay-a\"");

    // A dry run writes nothing.
    let out = ctl(&server, &["apply", "--dry-run", "-f", path(&exported)]);
    assert!(out.status.success(), "{:?}", text(&out));
    assert!(text(&out).0.contains("nothing was written"));
    assert_eq!(snapshot(&cluster).await?.0, base);

    // Apply: both changes in one revision, then no differences.
    let out = ctl(
        &server,
        &[
            "apply",
            "-f",
            path(&exported),
            "--expected-revision",
            &base.to_string(),
        ],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "apply: {stderr}");
    no_secret("apply", &stdout);
    assert!(stdout.contains("applied 2 changes at revision"), "{stdout}");
    let (after, objects) = snapshot(&cluster).await?;
    assert!(after > base);
    assert_eq!(revision_of(&objects, "route", "orders"), Some(after));
    assert_eq!(
        revision_of(&objects, "certificate", "pay-cert"),
        Some(after)
    );
    assert!(
        revision_of(&objects, "route", "refunds").unwrap() < after,
        "an unchanged object keeps its revision"
    );
    let out = ctl(&server, &["diff", "-f", path(&exported)]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));

    // Two concurrent applies from the same reviewed base: exactly one wins.
    let one = work.path().join("one");
    let two = work.path().join("two");
    for (dir, method) in [(&one, "GET"), (&two, "POST")] {
        std::fs::create_dir_all(dir)?;
        let routes = std::fs::read_to_string(exported.join("routes.yaml"))?.replacen(
            "upstream: pay-b",
            &format!("upstream: pay-b\n  methods: [{method}]"),
            1,
        );
        std::fs::write(dir.join("routes.yaml"), routes)?;
    }
    let base = after;
    let run = |dir: std::path::PathBuf, server: String| {
        std::thread::spawn(move || {
            ctl(
                &server,
                &[
                    "apply",
                    "-f",
                    dir.to_str().unwrap(),
                    "--expected-revision",
                    &base.to_string(),
                ],
            )
        })
    };
    let (a, b) = (run(one, server.clone()), run(two, server.clone()));
    let outs = [a.join().unwrap(), b.join().unwrap()];
    let codes: Vec<Option<i32>> = outs.iter().map(|o| o.status.code()).collect();
    assert!(
        codes == [Some(0), Some(3)] || codes == [Some(3), Some(0)],
        "{codes:?}: {:?}",
        outs.iter().map(text).collect::<Vec<_>>()
    );
    let loser = outs.iter().find(|o| o.status.code() == Some(3)).unwrap();
    let (_, stderr) = text(loser);
    assert!(stderr.contains("conflict"), "{stderr}");
    assert!(stderr.contains("nothing was written"), "{stderr}");
    let (now, objects) = snapshot(&cluster).await?;
    assert!(now > base);
    assert_eq!(revision_of(&objects, "route", "orders"), Some(now));
    // Exactly one write landed: the winner's.
    let out = ctl(&server, &["get", "route", "orders", "-o", "yaml"]);
    let route = text(&out).0;
    assert!(
        route.contains("- GET") != route.contains("- POST"),
        "one method, the winner's: {route}"
    );

    // The same race without --expected-revision, at the admin API the CLI
    // uses: two plans made at one revision, both applied with it as the guard.
    let mut client = cluster.client(1).await?;
    let (base, objects) = snapshot(&cluster).await?;
    let orders = objects
        .iter()
        .find(|o| o.kind == "route" && o.name == "orders")
        .unwrap()
        .clone();
    let mut plans = Vec::new();
    for method in ["PUT", "PATCH"] {
        let mut object = orders.clone();
        object.revision = 0;
        let mut spec: serde_json::Value = serde_json::from_str(&object.spec_json)?;
        spec["methods"] = serde_json::json!([method]);
        object.spec_json = spec.to_string();
        let plan = client
            .plan(pb::PlanRequest {
                objects: vec![object.clone()],
                prune_owner: None,
            })
            .await?
            .into_inner();
        assert_eq!(plan.config_revision, base);
        assert_eq!(plan.changes.len(), 1);
        plans.push((object, plan.config_revision));
    }
    let mut results = Vec::new();
    for (object, revision) in plans {
        let put = pb::Operation {
            op: Some(pb::operation::Op::Put(pb::PutRequest {
                object: Some(object),
                expected_revision: None,
            })),
        };
        results.push(
            client
                .apply(pb::ApplyRequest {
                    ops: vec![put],
                    expected_config_revision: Some(revision),
                })
                .await,
        );
    }
    assert!(results[0].is_ok(), "{:?}", results[0]);
    let lost = results[1].as_ref().unwrap_err();
    assert_eq!(lost.code(), tonic::Code::Aborted);
    assert!(
        lost.message()
            .contains(&format!("the write expected {base}")),
        "{}",
        lost.message()
    );
    let (now, _) = snapshot(&cluster).await?;
    let out = ctl(&server, &["get", "route", "orders", "-o", "yaml"]);
    let route = text(&out).0;
    assert!(
        route.contains("- PUT") && !route.contains("- PATCH"),
        "{route}"
    );
    assert!(now > base);

    // Prune: drop "refunds" from the files; the other team's objects and the
    // unowned consumer stay.
    let routes = std::fs::read_to_string(exported.join("routes.yaml"))?;
    let cut = routes
        .find("- name: refunds")
        .expect("refunds in the export");
    std::fs::write(exported.join("routes.yaml"), &routes[..cut])?;
    let out = ctl(&server, &["diff", "--prune", "-f", path(&exported)]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert!(stdout.contains("- route \"refunds\""), "{stdout}");
    let out = ctl(&server, &["apply", "--prune", "-f", path(&exported)]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "prune: {stderr}");
    assert!(stdout.contains("route \"refunds\" deleted"), "{stdout}");
    let (_, objects) = snapshot(&cluster).await?;
    assert_eq!(revision_of(&objects, "route", "refunds"), None);
    for (kind, name) in [
        ("route", "search"),
        ("upstream", "search"),
        ("consumer", "unowned"),
        ("route", "orders"),
    ] {
        assert!(
            revision_of(&objects, kind, name).is_some(),
            "{kind} {name} survived"
        );
    }
    // A file without the owner label cannot prune at all.
    let out = ctl(
        &server,
        &["apply", "--prune", "-f", path(&seed.join("search"))],
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("consumer \"unowned\": labels: pruning for owner \"search\"")
            && stderr.contains("search.yaml"),
        "{stderr}"
    );

    // An invalid file: the file, the object and the field are named, and nothing is written.
    let before = snapshot(&cluster).await?;
    let bad = work.path().join("bad");
    std::fs::create_dir_all(&bad)?;
    std::fs::copy(exported.join("upstreams.yaml"), bad.join("upstreams.yaml"))?;
    std::fs::write(
        bad.join("routes.yaml"),
        "version: 1\nroutes:\n  - name: broken\n    paths: [{ prefix: /x }]\n    upstream: pay-c\n",
    )?;
    let out = ctl(&server, &["apply", "-f", path(&bad)]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("route \"broken\": upstream: references unknown upstream \"pay-c\"")
            && stderr.contains("routes.yaml"),
        "{stderr}"
    );
    // A missing secret: named too, and nothing sent.
    std::fs::remove_file(&key_file)?;
    let out = ctl(&server, &["diff", "-f", path(&exported)]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains(
            "certificates.yaml: certificate \"pay-cert\": private_key_pem: cannot read secret file"
        ),
        "{stderr}"
    );
    assert_eq!(snapshot(&cluster).await?, before, "nothing changed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_forwards_the_plan_to_the_leader() -> anyhow::Result<()> {
    let cluster = Cluster::start(3, Options::default()).await?;
    let leader = cluster.leader().await?;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let server = cluster.node(follower).admin.clone();
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("search.yaml"), SEARCH)?;
    let out = ctl(&server, &["diff", "-f", path(dir.path())]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(stdout.contains("+ route \"search\""), "{stdout}");
    let out = ctl(&server, &["apply", "-f", path(dir.path())]);
    assert!(out.status.success(), "{:?}", text(&out));
    let out = ctl(&server, &["diff", "-f", path(dir.path())]);
    assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    Ok(())
}
