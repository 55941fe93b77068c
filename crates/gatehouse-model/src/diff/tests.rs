//! Plans: actions, field-level changes, redaction, ownership and pruning.

use super::*;
use crate::fixtures::{self, labels};

fn state_with(objects: &[Object]) -> ConfigState {
    let mut state = ConfigState::default();
    let cmd = Command {
        ops: objects
            .iter()
            .map(|o| Op::Put {
                object: o.clone(),
                expected_revision: None,
            })
            .collect(),
        expected_config_revision: None,
        origin: None,
        membership: None,
    };
    state.apply(5, &cmd).unwrap();
    state
}

fn lines(plan: &Plan) -> Vec<String> {
    plan.changes
        .iter()
        .flat_map(|c| {
            c.to_string()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn a_plan_names_creates_and_field_level_updates() {
    let state = state_with(&[
        fixtures::upstream("a").into(),
        fixtures::upstream("b").into(),
        fixtures::route("orders", "a").into(),
    ]);
    let mut orders = fixtures::route("orders", "b");
    orders.methods = vec!["GET".into()];
    let desired: Vec<Object> = vec![
        fixtures::upstream("a").into(),
        fixtures::upstream("b").into(),
        orders.into(),
        fixtures::upstream("c").into(),
    ];
    let plan = plan(&state, &desired, None).unwrap();
    assert_eq!(plan.revision, 5);
    assert_eq!(
        lines(&plan),
        [
            "~ route \"orders\": methods: (none) -> [\"GET\"]",
            "~ route \"orders\": upstream: \"a\" -> \"b\"",
            "+ upstream \"c\"",
        ]
    );
    assert_eq!(plan.summary(), "1 to create, 1 to update, 0 to delete");
    // Carried out, the plan leaves nothing to do, and its command is guarded.
    let cmd = plan.command(&desired);
    assert_eq!(cmd.expected_config_revision, Some(5));
    assert_eq!(cmd.ops.len(), 2);
    let mut after = state.clone();
    after.apply(6, &cmd).unwrap();
    assert!(super::plan(&after, &desired, None).unwrap().is_empty());
    // The same command a revision later fails as a whole.
    assert!(matches!(
        after.apply(7, &cmd),
        Err(WriteError::ConfigConflict {
            expected: 5,
            actual: 6
        })
    ));
}

#[test]
fn a_plan_is_validated_against_the_state_like_a_write() {
    let state = state_with(&[fixtures::upstream("a").into()]);
    let desired: Vec<Object> = vec![fixtures::route("orders", "nope").into()];
    let e = plan(&state, &desired, None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "route \"orders\": upstream: references unknown upstream \"nope\""
    );
    let token: Vec<Object> = vec![fixtures::admin_token("ci").into()];
    assert!(plan(&state, &token, None)
        .unwrap_err()
        .to_string()
        .contains("admin tokens are managed through the admin API"));
}

#[test]
fn secrets_never_appear_in_a_plan() {
    let state = state_with(&[
        fixtures::certificate("api").into(),
        fixtures::jwt_issuer("corp").into(),
    ]);
    let mut cert = fixtures::certificate("api");
    cert.private_key_pem = fixtures::KEY_PEM.replace("MIGH", "ZZZZ");
    let mut issuer = fixtures::jwt_issuer("corp");
    issuer.keys[0].secret = Some("another-secret-another-secret-12345".into());
    issuer.keys.push(crate::object::JwtKey {
        kid: Some("hmac-2".into()),
        pem: None,
        secret: Some("third-secret-third-secret-third-99".into()),
    });
    let desired: Vec<Object> = vec![cert.into(), issuer.into()];
    let plan = plan(&state, &desired, None).unwrap();
    let text = lines(&plan).join("\n");
    assert_eq!(
        lines(&plan),
        [
            "~ certificate \"api\": private_key_pem: (secret changed)",
            "~ jwt_issuer \"corp\": keys[0].secret: (secret changed)",
            "~ jwt_issuer \"corp\": keys[2]: (none) -> {\"kid\":\"hmac-2\",\"secret\":\"(secret)\"}",
        ],
    );
    for secret in [
        "ZZZZ",
        "another-secret",
        "third-secret",
        fixtures::HMAC_SECRET,
    ] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
}

fn owned<T: Into<Object>>(o: T, owner: &str) -> Object {
    let mut o: Object = o.into();
    let l = labels(&[(OWNER_LABEL, owner)]);
    match &mut o {
        Object::Upstream(x) => x.labels = l,
        Object::Route(x) => x.labels = l,
        Object::Consumer(x) => x.labels = l,
        _ => unreachable!("tests own upstreams, routes and consumers"),
    }
    o
}

#[test]
fn prune_deletes_only_the_owners_objects() {
    let state = state_with(&[
        owned(fixtures::upstream("pay-a"), "payments"),
        owned(fixtures::upstream("pay-old"), "payments"),
        owned(fixtures::upstream("search-a"), "search"),
        fixtures::upstream("unowned").into(),
    ]);
    let desired = vec![owned(fixtures::upstream("pay-a"), "payments")];
    let plan = plan(&state, &desired, Some("payments")).unwrap();
    assert_eq!(lines(&plan), ["- upstream \"pay-old\""]);
    // Without --prune nothing is deleted.
    assert!(super::plan(&state, &desired, None).unwrap().is_empty());
}

#[test]
fn prune_refuses_unowned_files_and_takeovers() {
    let state = state_with(&[owned(fixtures::upstream("shared"), "search")]);
    let unlabelled: Vec<Object> = vec![fixtures::upstream("x").into()];
    let e = plan(&state, &unlabelled, Some("payments")).unwrap_err();
    assert!(
        e.to_string().starts_with(
            "upstream \"x\": labels: pruning for owner \"payments\" needs the label gatehouse.io/owner=payments"
        ),
        "{e}"
    );
    let takeover = vec![owned(fixtures::upstream("shared"), "payments")];
    let e = plan(&state, &takeover, Some("payments")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "upstream \"shared\": labels: is owned by \"search\" in the cluster (gatehouse.io/owner); owner \"payments\" cannot take it over"
    );
}

#[test]
fn pruning_a_referenced_object_fails_unless_its_referrer_goes_too() {
    let state = state_with(&[
        owned(fixtures::upstream("a"), "payments"),
        owned(fixtures::route("r", "a"), "payments"),
        fixtures::route("other", "a").into(),
    ]);
    // The unowned route "other" still uses upstream "a".
    let e = plan(&state, &[], Some("payments")).unwrap_err();
    assert!(
        e.to_string()
            .contains("upstream \"a\" cannot be deleted: route \"other\" references it"),
        "{e}"
    );
}
