//! The declarative file format: parsing with errors that point at the line,
//! reading directories, round trips, and `plan`.

use std::time::Duration;

use super::*;
use crate::fixtures;
use crate::state::{ConfigState, WriteError};
use crate::validate::validate_object;

/// Every kind a file may hold, with most optional fields set.
const FULL: &str = r#"version: 1
certificates:
  - name: api-cert
    labels: { team: platform }
    server_names: [api.example.com, "*.example.org"]
    certificate_pem: |
      -----BEGIN CERTIFICATE-----
      MIIBszCCAVmgAwIBAgIU
      -----END CERTIFICATE-----
    private_key_pem: |
      -----BEGIN PRIVATE KEY-----
      MIGHAgEAMBMGByqGSM49
      -----END PRIVATE KEY-----
upstreams:
  - name: billing
    labels: { team: payments }
    targets:
      - address: "10.0.0.1:8080"
        weight: 10
      - address: "[2001:db8::1]:443"
    balancer: consistent_hash
    hash_header: x-user-id
    health_check:
      path: /healthz
      interval: 10s
      timeout: 1s 500ms
    connect_timeout: 250ms
    request_timeout: 2m
    retries: { attempts: 3, non_idempotent: true }
    circuit_breaker: { consecutive_failures: 5, open_for: 30s }
    tls:
      server_name: billing.internal.example.com
  - name: orders
    targets: [{ address: "orders.internal:9000" }]
jwt_issuers:
  - name: corp
    issuer: https://idp.example.com/
    audiences: [gatehouse]
    algorithms: [RS256, ES256]
    jwks_url: https://idp.example.com/.well-known/jwks.json
    leeway: 1m
policies:
  - name: strict
    authentication: [api_key, jwt]
    api_key: { header: x-api-key, query_param: api_key }
    jwt: { issuers: [corp] }
    authorization:
      groups: [admins]
      scopes: ["billing:read"]
      claims:
        - { claim: tenant, equals: acme }
        - { claim: region, one_of: [eu, us] }
    rate_limits:
      - name: per-consumer
        scope: cluster
        key: [consumer]
        limit: 100
        window: 1m
        burst: 20
        on_store_failure: closed
    firewall:
      allow_ips: [10.0.0.0/8, "2001:db8::/32"]
      deny_ips: [10.6.6.6]
      max_body_bytes: 1048576
      sql_injection: block
      xss: detect
      cors:
        allowed_origins: ["https://app.example.com"]
        allow_credentials: true
routes:
  - name: billing
    hosts: [api.example.com]
    paths: [{ prefix: /billing }]
    methods: [GET, POST]
    upstream: billing
    strip_prefix: true
    policy: strict
  - name: orders
    paths:
      - exact: /orders
      - regex: "^/orders/[0-9]+$"
    upstream: orders
consumers:
  - name: acme
    groups: [admins]
    metadata: { email: ops@example.com }
api_keys:
  - name: acme-key-1
    consumer: acme
    key_hash: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
    expires_at: 2033-05-18T03:33:20Z
"#;

fn parse(text: &str) -> Result<ConfigFile, FileError> {
    ConfigFile::parse(text, Path::new("conf/gatehouse.yaml"))
}

/// Parses `text`, which must fail with a syntax error; returns its line and message.
#[track_caller]
fn syntax_error(text: &str) -> (Option<usize>, String, String) {
    match parse(text) {
        Err(e @ FileError::Syntax { .. }) => {
            let display = e.to_string();
            let FileError::Syntax {
                path,
                line,
                message,
            } = e
            else {
                unreachable!()
            };
            assert_eq!(path, Path::new("conf/gatehouse.yaml"));
            (line, message, display)
        }
        other => panic!("expected a syntax error, got {other:?}"),
    }
}

#[test]
fn a_full_file_with_every_kind_parses() {
    let file = parse(FULL).unwrap();
    assert_eq!(file.version, FILE_VERSION);
    let objects = file.clone().into_objects();
    let refs: Vec<String> = objects.iter().map(|o| o.object_ref().to_string()).collect();
    assert_eq!(
        refs,
        [
            r#"certificate "api-cert""#,
            r#"upstream "billing""#,
            r#"upstream "orders""#,
            r#"jwt_issuer "corp""#,
            r#"policy "strict""#,
            r#"route "billing""#,
            r#"route "orders""#,
            r#"consumer "acme""#,
            r#"api_key "acme-key-1""#,
        ]
    );

    // Values, including durations and defaults, arrive as written.
    let billing = &file.upstreams[0];
    assert_eq!(billing.targets[0].weight, 10);
    assert_eq!(billing.targets[1].weight, 1, "default weight");
    let hc = billing.health_check.as_ref().unwrap();
    assert_eq!(hc.timeout, Duration::from_millis(1500));
    assert_eq!(hc.healthy_threshold, 2, "default threshold");
    assert_eq!(billing.request_timeout, Duration::from_secs(120));
    let orders = &file.upstreams[1];
    assert_eq!(orders.balancer, Balancer::RoundRobin);
    assert_eq!(orders.connect_timeout, Duration::from_secs(5));
    assert_eq!(orders.retries, Retries::default());
    assert_eq!(file.jwt_issuers[0].consumer_claim, "sub");
    assert_eq!(
        file.policies[0].rate_limits[0].on_store_failure,
        StoreFailure::Closed
    );
    assert_eq!(
        file.api_keys[0].expires_at,
        Some(std::time::UNIX_EPOCH + Duration::from_secs(2_000_000_000))
    );
    assert!(file.certificates[0]
        .certificate_pem
        .starts_with("-----BEGIN CERTIFICATE-----\n"));

    // Every object is valid, and together they apply to an empty state.
    for o in &objects {
        validate_object(o).unwrap_or_else(|e| panic!("{e}"));
    }
    let mut state = ConfigState::default();
    let mut loaded = Loaded::default();
    loaded.add(file, Path::new("conf/gatehouse.yaml")).unwrap();
    state.apply(1, &loaded.to_command()).unwrap();
    assert_eq!(state.len(), 9);
}

#[test]
fn an_unknown_top_level_key_names_the_key_and_line() {
    let (line, message, display) = syntax_error("version: 1\nupstrem:\n  - name: billing\n");
    assert_eq!(line, Some(2));
    assert!(message.contains("unknown field `upstrem`"), "{message}");
    assert!(
        message.contains("`upstreams`"),
        "suggests the known keys: {message}"
    );
    assert!(display.starts_with("conf/gatehouse.yaml: "), "{display}");
    assert!(display.contains("line 2"), "{display}");
}

#[test]
fn an_unknown_nested_key_names_the_object_path_and_line() {
    let text =
        "version: 1\nupstreams:\n  - name: billing\n    taregts:\n      - address: 127.0.0.1:80\n";
    let (line, message, _) = syntax_error(text);
    assert_eq!(line, Some(4));
    assert!(message.starts_with("upstreams[0]: "), "{message}");
    assert!(message.contains("unknown field `taregts`"), "{message}");

    let text = "version: 1\nroutes:\n  - name: a\n    paths: [{ prefix: /a }]\n    upstream: u\n  - name: b\n    paths: [{ prefx: /b }]\n    upstream: u\n";
    let (line, message, _) = syntax_error(text);
    assert_eq!(line, Some(7));
    assert!(message.starts_with("routes[1].paths[0]: "), "{message}");
    assert!(message.contains("unknown field `prefx`"), "{message}");
}

#[test]
fn admin_tokens_cannot_be_declared_in_a_file() {
    let text = "version: 1\nadmin_tokens:\n  - name: ci\n    role: admin\n";
    let (line, message, _) = syntax_error(text);
    assert_eq!(line, Some(2));
    assert!(
        message.contains("unknown field `admin_tokens`"),
        "{message}"
    );
}

#[test]
fn a_bad_value_names_the_field_and_line() {
    let text = "version: 1\nupstreams:\n  - name: a\n    targets: [{ address: \"h:1\" }]\n    balancer: random\n";
    let (line, message, _) = syntax_error(text);
    assert_eq!(line, Some(5));
    assert!(
        message.starts_with("upstreams[0].balancer: unknown variant `random`"),
        "{message}"
    );

    let text = "version: 1\nupstreams:\n  - name: a\n    targets: [{ address: \"h:1\" }]\n    connect_timeout: 5 parsecs\n";
    let (line, message, _) = syntax_error(text);
    assert_eq!(line, Some(5));
    assert!(message.contains("connect_timeout"), "{message}");
    assert!(message.contains("5 parsecs"), "{message}");
}

#[test]
fn a_missing_version_is_an_error() {
    let (_, message, display) = syntax_error("upstreams: []\n");
    assert_eq!(message, "missing field `version`");
    assert_eq!(display, "conf/gatehouse.yaml: missing field `version`");
    // An empty file has no version either.
    let (_, message, _) = syntax_error("");
    assert_eq!(message, "missing field `version`");
}

#[test]
fn an_unsupported_version_is_an_error() {
    let err = parse("version: 2\n").unwrap_err();
    assert!(
        matches!(err, FileError::Version { found: 2, .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "conf/gatehouse.yaml: version 2 is not supported (this build reads version 1)"
    );
    let (line, message, _) = syntax_error("version: one\n");
    assert_eq!(line, Some(1));
    assert!(message.starts_with("version: invalid type"), "{message}");
}

#[test]
fn malformed_yaml_is_an_error_with_its_line() {
    // Over-indented key under a list item.
    let text = "version: 1\nupstreams:\n  - name: a\n      targets: []\n";
    let (line, message, _) = syntax_error(text);
    assert_eq!(line, Some(4));
    assert!(message.contains("line 4"), "{message}");

    // An unterminated flow sequence.
    let text = "version: 1\nroutes:\n  - name: r\n    paths: [{ prefix: /a }\n    upstream: u\n";
    let (line, _, _) = syntax_error(text);
    assert_eq!(line, Some(5));

    // A tab used for indentation.
    let (line, _, _) = syntax_error("version: 1\nupstreams:\n\t- name: a\n");
    assert_eq!(line, Some(3));

    // A key given twice.
    let (_, message, _) = syntax_error("version: 1\nupstreams: []\nupstreams: []\n");
    assert!(message.contains("duplicate field `upstreams`"), "{message}");
}

#[test]
fn revisions_in_a_file_are_cleared() {
    let text = "version: 1\nupstreams:\n  - name: a\n    revision: 42\n    targets: [{ address: \"h:1\" }]\n";
    let file = parse(text).unwrap();
    assert_eq!(file.upstreams[0].revision, 42);
    let objects = file.into_objects();
    assert_eq!(objects[0].revision(), 0);
}

// ---------------------------------------------------------------- round trip

fn assert_round_trips(objects: &[Object]) {
    let yaml = ConfigFile::from_objects(objects).to_yaml();
    let back = parse(&yaml)
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"))
        .into_objects();
    assert_eq!(back, objects, "\n{yaml}");
}

#[test]
fn objects_round_trip_through_yaml() {
    let mut objects: Vec<Object> = fixtures::one_of_each()
        .into_iter()
        .filter(|o| o.kind() != Kind::AdminToken)
        .collect();
    objects.push(fixtures::jwks_issuer("partner").into());
    objects.push(fixtures::regex_route("zz-regex", "billing").into());
    // Put them in the order a file is written: by kind, then name.
    objects.sort_by_key(|o| {
        let rank = Kind::ALL.iter().position(|k| *k == o.kind()).unwrap();
        (rank, o.name().to_string())
    });
    assert_round_trips(&objects);
}

#[test]
fn strings_that_look_like_other_yaml_round_trip() {
    let mut c = fixtures::consumer("acme");
    for (i, v) in [
        "true",
        "no",
        "null",
        "~",
        "0755",
        "1e3",
        "0x1F",
        "- item",
        "key: value",
        "# comment",
        "'quoted'",
        "\"dq\"",
        "",
        " leading space",
        "trailing space ",
        "multi\nline\n",
        "tab\there",
        "{a: 1}",
        "[1, 2]",
        "*alias",
        "&anchor",
        "!tag",
        "%directive",
        "@at",
        "`tick`",
        "ünïcödé",
        "2033-05-18T03:33:20Z",
        ".inf",
        "-.5",
        "=",
        "<<",
    ]
    .into_iter()
    .enumerate()
    {
        c.metadata.insert(format!("k{i:02}"), v.to_string());
    }
    let object: Object = c.into();
    validate_object(&object).unwrap();
    assert_round_trips(&[object]);
}

#[test]
fn from_objects_groups_by_kind_sorted_by_name_and_leaves_out_admin_tokens() {
    let objects: Vec<Object> = vec![
        fixtures::route("b", "u").into(),
        fixtures::admin_token("ci").into(),
        fixtures::upstream("u").into(),
        fixtures::route("a", "u").into(),
        fixtures::certificate("c").into(),
    ];
    let file = ConfigFile::from_objects(&objects);
    assert_eq!(file.version, FILE_VERSION);
    let refs: Vec<String> = file
        .into_objects()
        .iter()
        .map(|o| o.object_ref().to_string())
        .collect();
    assert_eq!(
        refs,
        [
            r#"certificate "c""#,
            r#"upstream "u""#,
            r#"route "a""#,
            r#"route "b""#
        ]
    );
}

#[test]
fn to_yaml_writes_version_first_and_omits_empty_lists() {
    let yaml = ConfigFile::from_objects(&[fixtures::upstream("u").into()]).to_yaml();
    assert!(yaml.starts_with("version: 1\n"), "{yaml}");
    assert!(!yaml.contains("routes"), "{yaml}");
    assert!(!yaml.contains("revision"), "{yaml}");
}

// ---------------------------------------------------------------- reading files and directories

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path
}

fn upstream_yaml(names: &[&str]) -> String {
    let mut text = "version: 1\nupstreams:\n".to_string();
    for n in names {
        text.push_str(&format!(
            "  - name: {n}\n    targets: [{{ address: \"127.0.0.1:80\" }}]\n"
        ));
    }
    text
}

#[test]
fn a_directory_is_read_in_sorted_order_and_only_yaml() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let b = write(d, "b.yml", &upstream_yaml(&["from-b"]));
    let a = write(d, "a.yaml", &upstream_yaml(&["from-a-1", "from-a-2"]));
    let c = write(d, "c/nested.yaml", &upstream_yaml(&["from-c"]));
    // Not configuration: ignored, though unreadable as such.
    write(d, "README.md", "version: 1\nnot: configuration\n");
    write(d, "a.yaml.bak", "garbage: [");
    write(d, "yaml", "garbage: [");

    let loaded = Loaded::read(d).unwrap();
    let names: Vec<&str> = loaded.objects.iter().map(Object::name).collect();
    assert_eq!(names, ["from-a-1", "from-a-2", "from-b", "from-c"]);
    let source = |n: &str| {
        loaded.source_of(&ObjectRef {
            kind: Kind::Upstream,
            name: n.to_string(),
        })
    };
    assert_eq!(source("from-a-2"), Some(a.as_path()));
    assert_eq!(source("from-b"), Some(b.as_path()));
    assert_eq!(source("from-c"), Some(c.as_path()));
    assert_eq!(source("missing"), None);

    // One named file is read whatever its extension.
    let one = write(d, "single.conf", &upstream_yaml(&["x"]));
    assert_eq!(Loaded::read(&one).unwrap().objects.len(), 1);
}

#[test]
fn an_error_in_a_file_names_that_file() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &upstream_yaml(&["ok"]));
    let bad = write(dir.path(), "b.yaml", "version: 1\nupstrem: []\n");
    match Loaded::read(dir.path()).unwrap_err() {
        FileError::Syntax {
            path,
            line,
            message,
        } => {
            assert_eq!(path, bad);
            assert_eq!(line, Some(2));
            assert!(message.contains("upstrem"), "{message}");
        }
        other => panic!("expected a syntax error, got {other:?}"),
    }
}

#[test]
fn an_object_defined_in_two_files_names_both() {
    let dir = tempfile::tempdir().unwrap();
    let first = write(
        dir.path(),
        "10-base.yaml",
        &upstream_yaml(&["billing", "orders"]),
    );
    let second = write(dir.path(), "20-extra.yaml", &upstream_yaml(&["billing"]));
    let err = Loaded::read(dir.path()).unwrap_err();
    let FileError::Duplicate {
        target,
        first: f,
        second: s,
    } = &err
    else {
        panic!("expected a duplicate, got {err:?}")
    };
    assert_eq!(target.to_string(), r#"upstream "billing""#);
    assert_eq!((f, s), (&first, &second));
    assert_eq!(
        err.to_string(),
        format!(
            r#"upstream "billing" is defined twice: in {} and in {}"#,
            first.display(),
            second.display()
        )
    );
}

#[test]
fn an_object_defined_twice_in_one_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "a.yaml",
        &upstream_yaml(&["billing", "billing"]),
    );
    let err = Loaded::read(&file).unwrap_err();
    assert!(
        matches!(&err, FileError::Duplicate { first, second, .. } if *first == file && *second == file),
        "{err:?}"
    );
    // The same name in two kinds is fine.
    let text = format!(
        "{}routes:\n  - name: billing\n    paths: [{{ prefix: /b }}]\n    upstream: billing\n",
        upstream_yaml(&["billing"])
    );
    write(dir.path(), "a.yaml", &text);
    assert_eq!(Loaded::read(&file).unwrap().objects.len(), 2);
}

#[test]
fn an_empty_or_missing_directory_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "notes.txt", "hello");
    let err = Loaded::read(dir.path()).unwrap_err();
    assert!(matches!(err, FileError::Empty { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("{}: no .yaml or .yml files found", dir.path().display())
    );
    let missing = dir.path().join("nope");
    let err = Loaded::read(&missing).unwrap_err();
    assert!(
        matches!(&err, FileError::Io { path, .. } if *path == missing),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with(&format!("{}: ", missing.display())),
        "{err}"
    );
}

#[test]
fn to_command_puts_every_loaded_object_unconditionally() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &upstream_yaml(&["a", "b"]));
    let cmd = Loaded::read(dir.path()).unwrap().to_command();
    assert_eq!(cmd.expected_config_revision, None);
    assert_eq!(cmd.ops.len(), 2);
    for op in &cmd.ops {
        assert!(
            matches!(op, Op::Put { expected_revision: None, object } if object.revision() == 0)
        );
    }
}

// ---------------------------------------------------------------- plan

#[test]
fn plan_creates_new_objects_only_if_still_absent() {
    let desired = vec![Object::from(fixtures::upstream("billing"))];
    let ops = plan(&desired, |_| None);
    assert_eq!(
        ops,
        [Op::Put {
            object: desired[0].clone(),
            expected_revision: Some(0)
        }]
    );
}

#[test]
fn plan_leaves_unchanged_objects_alone() {
    let mut state = ConfigState::default();
    let desired = vec![Object::from(fixtures::upstream("billing"))];
    state
        .apply(4, &Command::put(desired[0].clone(), None))
        .unwrap();
    // The stored copy has revision 4, the desired one 0: still the same content.
    assert_eq!(state.get(Kind::Upstream, "billing").unwrap().revision(), 4);
    assert!(plan(&desired, |r| state.get(r.kind, &r.name)).is_empty());
    // Even when the desired copy carries some other revision.
    let mut with_rev = desired[0].clone();
    with_rev.set_revision(99);
    assert!(plan(&[with_rev], |r| state.get(r.kind, &r.name)).is_empty());
}

#[test]
fn plan_replaces_changed_objects_at_the_revision_read() {
    let mut state = ConfigState::default();
    state
        .apply(4, &Command::put(fixtures::upstream("billing").into(), None))
        .unwrap();
    state
        .apply(6, &Command::put(fixtures::upstream("orders").into(), None))
        .unwrap();
    let mut changed = fixtures::upstream("billing");
    changed.retries.attempts = 4;
    changed.revision = 1; // ignored: the plan sends revision 0
    let desired = vec![
        Object::from(fixtures::upstream("orders")),
        changed.clone().into(),
        fixtures::upstream("new").into(),
    ];
    let ops = plan(&desired, |r| state.get(r.kind, &r.name));
    changed.revision = 0;
    assert_eq!(
        ops,
        [
            Op::Put {
                object: changed.into(),
                expected_revision: Some(4)
            },
            Op::Put {
                object: fixtures::upstream("new").into(),
                expected_revision: Some(0)
            },
        ]
    );
    // The plan applies; run again afterwards it is empty.
    let cmd = Command {
        ops,
        expected_config_revision: None,
        origin: None,
        membership: None,
    };
    state.apply(7, &cmd).unwrap();
    assert!(plan(&desired, |r| state.get(r.kind, &r.name)).is_empty());
    // A plan made before someone else's write fails as a whole.
    state
        .apply(8, &Command::put(fixtures::upstream("billing").into(), None))
        .unwrap();
    let stale = Command {
        ops: vec![cmd.ops[0].clone()],
        expected_config_revision: None,
        origin: None,
        membership: None,
    };
    let before = state.clone();
    assert!(matches!(
        state.apply(9, &stale),
        Err(WriteError::Conflict {
            expected: 4,
            actual: 8,
            ..
        })
    ));
    assert_eq!(state, before);
}

// ---------------------------------------------------------------- secret references

#[test]
fn references_resolve_and_round_trip_through_export() {
    let dir = tempfile::tempdir().unwrap();
    let mut file = ConfigFile::from_objects(&[
        Object::from(fixtures::certificate("api")),
        Object::from(fixtures::jwt_issuer("corp")),
    ]);
    file.certificates[0].revision = 0;
    // Exported with file references, one secret file each.
    let text = file.to_yaml_with_refs(|target, field| {
        let name = format!("{}-{}-{}", target.kind, target.name, field);
        SecretRef::File(PathBuf::from("secrets").join(name))
    });
    assert!(!text.contains("MIGHAgEAMBMGByqGSM49"), "{text}");
    assert!(!text.contains(fixtures::HMAC_SECRET), "{text}");
    assert!(
        text.contains("file: secrets/certificate-api-private_key_pem"),
        "{text}"
    );
    std::fs::create_dir(dir.path().join("secrets")).unwrap();
    std::fs::write(
        dir.path().join("secrets/certificate-api-private_key_pem"),
        fixtures::KEY_PEM,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("secrets/jwt_issuer-corp-keys[0].secret"),
        fixtures::HMAC_SECRET,
    )
    .unwrap();
    let path = dir.path().join("all.yaml");
    std::fs::write(&path, &text).unwrap();
    let loaded = Loaded::read(dir.path()).unwrap();
    assert_eq!(loaded.objects, file.clone().into_objects());
    assert_eq!(loaded.secrets.len(), 2);
    assert!(loaded
        .secrets
        .iter()
        .all(|s| matches!(s.source, crate::secret::SecretSource::Ref(_))));
    // Missing: the error names the file, the object and the field.
    std::fs::remove_file(dir.path().join("secrets/certificate-api-private_key_pem")).unwrap();
    let e = Loaded::read(dir.path()).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "{}: certificate \"api\": private_key_pem: cannot read secret file",
            path.display()
        )),
        "{e}"
    );
    // Lint reads references without their values.
    let loaded = Loaded::read_with(dir.path(), Resolve::Placeholders).unwrap();
    assert_eq!(loaded.objects.len(), 2);
}

#[test]
fn errors_in_a_file_with_references_still_name_the_field() {
    let text = "version: 1\ncertificates:\n  - name: api\n    server_names: [a.example]\n    certificate_pem: x\n    private_key_pem: { env: GH_TEST_FILE_UNSET }\n    colour: blue\n";
    let e = ConfigFile::parse_with_secrets(text, Path::new("c.yaml"), Resolve::Placeholders)
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("c.yaml: "), "{e}");
    assert!(e.contains("unknown field `colour`"), "{e}");
}

#[test]
fn placeholders_pass_validation_so_the_rest_can_be_checked_without_secrets() {
    let text = "version: 1\ncertificates:\n  - name: api\n    server_names: [a.example]\n    certificate_pem: \"-----BEGIN CERTIFICATE-----\"\n    private_key_pem: { env: GH_TEST_FILE_UNSET }\njwt_issuers:\n  - name: corp\n    issuer: https://idp.example/\n    audiences: [a]\n    algorithms: [HS256]\n    keys: [{ secret: { file: nope } }]\n";
    let (file, _) =
        ConfigFile::parse_with_secrets(text, Path::new("c.yaml"), Resolve::Placeholders).unwrap();
    for object in file.into_objects() {
        validate_object(&object).unwrap();
    }
}
