//! `ConfigState::apply`: revisions, expected revisions, references, batches
//! that succeed or change nothing, the change history and snapshots.

use super::*;
use crate::fixtures;
use crate::object::{Kind, Object, ObjectRef};

fn up(name: &str) -> Object {
    fixtures::upstream(name).into()
}

fn rt(name: &str, upstream: &str) -> Object {
    fixtures::route(name, upstream).into()
}

fn r(kind: Kind, name: &str) -> ObjectRef {
    ObjectRef {
        kind,
        name: name.to_string(),
    }
}

fn put(object: Object) -> Op {
    Op::Put {
        object,
        expected_revision: None,
    }
}

fn delete(kind: Kind, name: &str) -> Op {
    Op::Delete {
        target: r(kind, name),
        expected_revision: None,
    }
}

fn batch(ops: Vec<Op>) -> Command {
    Command {
        ops,
        expected_config_revision: None,
        origin: None,
        membership: None,
    }
}

/// Applies `cmd`, which must fail, and checks that nothing at all changed.
#[track_caller]
fn refused(state: &mut ConfigState, index: u64, cmd: &Command) -> WriteError {
    let before = state.clone();
    let err = state
        .apply(index, cmd)
        .expect_err("the write should be refused");
    assert_eq!(*state, before, "a refused write changed the state ({err})");
    err
}

/// A state holding upstream "billing" (index 1) and route "billing" to it (index 2).
fn billing() -> ConfigState {
    let mut s = ConfigState::default();
    s.apply(1, &Command::put(up("billing"), None)).unwrap();
    s.apply(2, &Command::put(rt("billing", "billing"), None))
        .unwrap();
    s
}

#[test]
fn a_put_stores_the_object_at_the_index() {
    let mut s = ConfigState::default();
    assert_eq!(s.revision(), 0);
    assert!(s.is_empty());
    let ok = s.apply(7, &Command::put(up("billing"), Some(0))).unwrap();
    assert_eq!(
        ok,
        WriteOk {
            revision: 7,
            changed: 1
        }
    );
    assert_eq!(s.revision(), 7);
    assert_eq!(s.len(), 1);
    let stored = s.get(Kind::Upstream, "billing").unwrap();
    assert_eq!(stored.revision(), 7);
    let mut expected = up("billing");
    expected.set_revision(7);
    assert_eq!(stored, &expected);
    assert!(s.get(Kind::Route, "billing").is_none());
    assert!(s.get(Kind::Upstream, "other").is_none());

    // Replacing bumps the revision; the revision in the put is ignored.
    let mut changed = fixtures::upstream("billing");
    changed.revision = 3;
    changed.retries.attempts = 5;
    s.apply(9, &Command::put(changed.into(), Some(7))).unwrap();
    let Some(Object::Upstream(u)) = s.get(Kind::Upstream, "billing") else {
        panic!("upstream is stored")
    };
    assert_eq!((u.revision, u.retries.attempts), (9, 5));
    assert_eq!(s.revision(), 9);
    assert_eq!(s.len(), 1);
}

#[test]
fn list_returns_one_kind_sorted_by_name() {
    let mut s = ConfigState::default();
    s.apply(
        1,
        &batch(vec![
            put(up("b")),
            put(up("a")),
            put(up("c")),
            put(rt("r", "a")),
        ]),
    )
    .unwrap();
    let names: Vec<&str> = s.list(Kind::Upstream).map(Object::name).collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(s.list(Kind::Route).count(), 1);
    assert_eq!(s.list(Kind::Policy).count(), 0);
}

#[test]
fn a_stale_expected_revision_conflicts_and_changes_nothing() {
    let mut s = billing();
    let err = refused(&mut s, 3, &Command::put(up("billing"), Some(2)));
    assert_eq!(
        err,
        WriteError::Conflict {
            target: r(Kind::Upstream, "billing"),
            expected: 2,
            actual: 1
        }
    );
    assert_eq!(
        err.to_string(),
        r#"upstream "billing" is at revision 1, the write expected 2"#
    );
    assert_eq!(err.code(), ErrorCode::Conflict);
    assert_eq!(err.code().http_status(), 409);

    let err = refused(
        &mut s,
        3,
        &Command::delete(r(Kind::Route, "billing"), Some(1)),
    );
    assert_eq!(
        err.to_string(),
        r#"route "billing" is at revision 2, the write expected 1"#
    );

    // The current revision succeeds.
    s.apply(3, &Command::delete(r(Kind::Route, "billing"), Some(2)))
        .unwrap();
    assert!(s.get(Kind::Route, "billing").is_none());
}

#[test]
fn expecting_revision_zero_means_create_only() {
    let mut s = billing();
    let err = refused(&mut s, 3, &Command::put(up("billing"), Some(0)));
    assert_eq!(
        err,
        WriteError::Conflict {
            target: r(Kind::Upstream, "billing"),
            expected: 0,
            actual: 1
        }
    );
    assert_eq!(
        err.to_string(),
        r#"upstream "billing" already exists (at revision 1); the write expected to create it"#
    );
    // Expecting a revision of an object that does not exist says so.
    let err = refused(&mut s, 3, &Command::put(up("other"), Some(5)));
    assert_eq!(
        err.to_string(),
        r#"upstream "other" does not exist; the write expected it at revision 5"#
    );
}

#[test]
fn deleting_a_missing_object_is_not_found() {
    let mut s = billing();
    let err = refused(&mut s, 3, &Command::delete(r(Kind::Policy, "strict"), None));
    assert_eq!(
        err,
        WriteError::NotFound {
            target: r(Kind::Policy, "strict")
        }
    );
    assert_eq!(err.to_string(), r#"policy "strict" not found"#);
    assert_eq!(err.code(), ErrorCode::NotFound);
    // The same name of another kind does not count.
    let err = refused(
        &mut s,
        3,
        &Command::delete(r(Kind::Consumer, "billing"), Some(0)),
    );
    assert_eq!(err.to_string(), r#"consumer "billing" not found"#);
}

#[test]
fn a_reference_to_an_unknown_object_dangles() {
    let mut s = billing();
    let err = refused(&mut s, 3, &Command::put(rt("orders", "orders"), None));
    assert_eq!(
        err,
        WriteError::DanglingReference {
            kind: Kind::Route,
            name: "orders".to_string(),
            field: "upstream".to_string(),
            target: r(Kind::Upstream, "orders"),
        }
    );
    assert_eq!(
        err.to_string(),
        r#"route "orders": upstream: references unknown upstream "orders""#
    );
    assert_eq!(err.code(), ErrorCode::InvalidArgument);

    let mut with_policy = fixtures::route("orders", "billing");
    with_policy.policy = Some("strict".to_string());
    let err = refused(&mut s, 3, &Command::put(with_policy.into(), None));
    assert_eq!(
        err.to_string(),
        r#"route "orders": policy: references unknown policy "strict""#
    );

    let err = refused(
        &mut s,
        3,
        &Command::put(fixtures::full_policy("strict", "corp").into(), None),
    );
    assert_eq!(
        err.to_string(),
        r#"policy "strict": jwt.issuers[0]: references unknown jwt_issuer "corp""#
    );

    let err = refused(
        &mut s,
        3,
        &Command::put(fixtures::api_key("k1", "acme").into(), None),
    );
    assert_eq!(
        err.to_string(),
        r#"api_key "k1": consumer: references unknown consumer "acme""#
    );
}

#[test]
fn a_reference_to_an_object_deleted_in_the_same_write_dangles() {
    let mut s = billing();
    s.apply(3, &Command::put(up("orders"), None)).unwrap();
    let err = refused(
        &mut s,
        4,
        &batch(vec![
            put(rt("orders", "orders")),
            delete(Kind::Upstream, "orders"),
        ]),
    );
    assert_eq!(
        err.to_string(),
        r#"route "orders": upstream: references unknown upstream "orders""#
    );
}

#[test]
fn a_referenced_object_cannot_be_deleted() {
    let mut s = billing();
    let err = refused(
        &mut s,
        3,
        &Command::delete(r(Kind::Upstream, "billing"), None),
    );
    assert_eq!(
        err,
        WriteError::StillReferenced {
            target: r(Kind::Upstream, "billing"),
            by: r(Kind::Route, "billing"),
        }
    );
    assert_eq!(
        err.to_string(),
        r#"upstream "billing" cannot be deleted: route "billing" references it"#
    );
    assert_eq!(err.code(), ErrorCode::FailedPrecondition);
    assert_eq!(err.code().http_status(), 409);

    // Nor can it be deleted while a route put in the same write points at it.
    s.apply(3, &Command::put(up("orders"), None)).unwrap();
    let err = refused(
        &mut s,
        4,
        &batch(vec![
            delete(Kind::Upstream, "orders"),
            put(rt("orders", "orders")),
        ]),
    );
    assert_eq!(
        err.to_string(),
        r#"route "orders": upstream: references unknown upstream "orders""#
    );
}

#[test]
fn every_kind_of_reference_blocks_a_delete() {
    let mut s = ConfigState::default();
    let mut all = fixtures::one_of_each();
    all.reverse();
    s.apply(1, &batch(all.into_iter().map(put).collect()))
        .unwrap();
    for (target, by) in [
        (r(Kind::Upstream, "billing"), r#"route "billing""#),
        (r(Kind::Policy, "strict"), r#"route "billing""#),
        (r(Kind::JwtIssuer, "corp"), r#"policy "strict""#),
        (r(Kind::Consumer, "acme"), r#"api_key "acme-key-1""#),
    ] {
        let err = refused(&mut s, 2, &Command::delete(target.clone(), None));
        assert_eq!(
            err.to_string(),
            format!("{target} cannot be deleted: {by} references it")
        );
    }
    // Unreferenced objects go.
    s.apply(
        2,
        &batch(vec![
            delete(Kind::Certificate, "api-cert"),
            delete(Kind::AdminToken, "ci"),
            delete(Kind::ApiKey, "acme-key-1"),
            delete(Kind::Consumer, "acme"),
        ]),
    )
    .unwrap();
    assert_eq!(s.len(), 4);
}

#[test]
fn deleting_a_referrer_and_its_target_together_works() {
    let mut s = billing();
    let ok = s
        .apply(
            3,
            &batch(vec![
                delete(Kind::Upstream, "billing"),
                delete(Kind::Route, "billing"),
            ]),
        )
        .unwrap();
    assert_eq!(
        ok,
        WriteOk {
            revision: 3,
            changed: 2
        }
    );
    assert!(s.is_empty());
    assert_eq!(s.revision(), 3);
}

#[test]
fn repointing_a_route_and_deleting_its_old_upstream_together_works() {
    let mut s = billing();
    s.apply(
        3,
        &batch(vec![
            delete(Kind::Upstream, "billing"),
            put(rt("billing", "billing-v2")),
            put(up("billing-v2")),
        ]),
    )
    .unwrap();
    assert!(s.get(Kind::Upstream, "billing").is_none());
    let Some(Object::Route(route)) = s.get(Kind::Route, "billing") else {
        panic!("route is stored")
    };
    assert_eq!((route.upstream.as_str(), route.revision), ("billing-v2", 3));
}

#[test]
fn a_whole_configuration_applies_in_one_write_in_any_order() {
    let mut all = fixtures::one_of_each();
    all.reverse();
    let mut s = ConfigState::default();
    let ok = s
        .apply(1, &batch(all.into_iter().map(put).collect()))
        .unwrap();
    assert_eq!(ok.changed, 8);
    assert_eq!(s.len(), 8);
    for kind in Kind::ALL {
        assert_eq!(s.list(kind).count(), 1, "{kind}");
    }
}

#[test]
fn a_batch_whose_last_op_fails_changes_nothing() {
    let valid = || {
        vec![
            put(up("orders")),
            put(rt("orders", "orders")),
            put(up("billing")),
        ]
    };
    let mut invalid_upstream = fixtures::upstream("broken");
    invalid_upstream.targets.clear();
    let cases: Vec<(Op, &str)> = vec![
        (
            put(invalid_upstream.into()),
            r#"upstream "broken": targets: needs at least an entry (1)"#,
        ),
        (
            delete(Kind::Consumer, "nobody"),
            r#"consumer "nobody" not found"#,
        ),
        (
            Op::Delete {
                target: r(Kind::Route, "billing"),
                expected_revision: Some(1),
            },
            r#"route "billing" is at revision 2, the write expected 1"#,
        ),
        (
            put(rt("dangling", "nowhere")),
            r#"route "dangling": upstream: references unknown upstream "nowhere""#,
        ),
        (
            put(up("orders")),
            r#"upstream "orders" appears more than once in one write"#,
        ),
    ];
    for (last, message) in cases {
        let mut s = billing();
        let mut ops = valid();
        ops.push(last);
        let err = refused(&mut s, 3, &batch(ops));
        assert_eq!(err.to_string(), message);
        assert_eq!(s.revision(), 2);
        assert!(s.get(Kind::Upstream, "orders").is_none());
        assert_eq!(s.changes_since(2), Some(Vec::new()));
    }
}

#[test]
fn an_invalid_object_is_refused_by_apply_too() {
    let mut s = ConfigState::default();
    let mut u = fixtures::upstream("Billing");
    u.targets.clear();
    let err = refused(&mut s, 1, &Command::put(u.into(), None));
    let WriteError::Invalid(invalid) = &err else {
        panic!("expected Invalid, got {err:?}")
    };
    assert_eq!(
        (invalid.kind, invalid.name.as_str(), invalid.field.as_str()),
        (Kind::Upstream, "Billing", "name")
    );
    assert_eq!(err.code(), ErrorCode::InvalidArgument);
    assert_eq!(err.code().http_status(), 400);
}

#[test]
fn expected_config_revision_guards_the_whole_write() {
    let mut s = billing();
    let mut cmd = Command::put(up("orders"), None);
    cmd.expected_config_revision = Some(1);
    let err = refused(&mut s, 3, &cmd);
    assert_eq!(
        err,
        WriteError::ConfigConflict {
            expected: 1,
            actual: 2
        }
    );
    assert_eq!(
        err.to_string(),
        "the configuration is at revision 2, the write expected 1"
    );
    assert_eq!(err.code(), ErrorCode::Conflict);
    cmd.expected_config_revision = Some(2);
    assert_eq!(s.apply(3, &cmd).unwrap().revision, 3);
    // Checked before anything else: even an invalid write reports the conflict.
    let mut u = fixtures::upstream("other");
    u.targets.clear();
    let mut cmd = Command::put(u.into(), None);
    cmd.expected_config_revision = Some(0);
    let err = refused(&mut s, 4, &cmd);
    assert_eq!(
        err,
        WriteError::ConfigConflict {
            expected: 0,
            actual: 3
        }
    );
    // An empty state is at revision 0.
    let mut cmd = Command::put(up("other"), None);
    cmd.expected_config_revision = Some(0);
    let mut empty = ConfigState::default();
    assert_eq!(empty.apply(1, &cmd).unwrap().revision, 1);
}

#[test]
fn one_object_twice_in_one_write_is_refused() {
    let mut s = billing();
    for ops in [
        vec![put(up("orders")), put(up("orders"))],
        vec![put(up("billing")), delete(Kind::Upstream, "billing")],
        vec![
            delete(Kind::Route, "billing"),
            delete(Kind::Route, "billing"),
        ],
    ] {
        let err = refused(&mut s, 3, &batch(ops));
        assert_eq!(err.code(), ErrorCode::InvalidArgument);
        assert!(matches!(err, WriteError::Duplicate { .. }), "{err:?}");
    }
    let err = refused(
        &mut s,
        3,
        &batch(vec![
            put(up("orders")),
            put(rt("x", "orders")),
            put(up("orders")),
        ]),
    );
    assert_eq!(
        err.to_string(),
        r#"upstream "orders" appears more than once in one write"#
    );
    // The same name in two kinds is two objects.
    s.apply(
        3,
        &batch(vec![put(up("orders")), put(rt("orders", "orders"))]),
    )
    .unwrap();
}

#[test]
fn an_oversized_batch_is_refused() {
    let mut s = ConfigState::default();
    let ops = (0..=MAX_BATCH_OPS)
        .map(|i| delete(Kind::Upstream, &format!("u{i}")))
        .collect();
    let err = refused(&mut s, 1, &batch(ops));
    assert_eq!(
        err,
        WriteError::TooLarge {
            ops: MAX_BATCH_OPS + 1,
            max: MAX_BATCH_OPS
        }
    );
    assert_eq!(
        err.to_string(),
        "a write holds 100001 operations, at most 100000 allowed"
    );
}

#[test]
fn an_empty_write_changes_nothing_but_succeeds() {
    let mut s = billing();
    let before = s.clone();
    let ok = s.apply(3, &batch(Vec::new())).unwrap();
    assert_eq!(
        ok,
        WriteOk {
            revision: 2,
            changed: 0
        }
    );
    assert_eq!(s, before);
}

#[test]
fn changes_since_returns_the_deltas() {
    let mut s = ConfigState::default();
    s.apply(1, &Command::put(up("a"), None)).unwrap();
    s.apply(2, &batch(vec![put(up("b")), put(rt("r", "b"))]))
        .unwrap();
    s.apply(3, &Command::delete(r(Kind::Upstream, "a"), None))
        .unwrap();

    let all = s.changes_since(0).unwrap();
    let summary: Vec<(u64, String, Option<u64>)> = all
        .iter()
        .map(|c| {
            (
                c.revision,
                c.target.to_string(),
                c.object.as_ref().map(Object::revision),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (1, r#"upstream "a""#.to_string(), Some(1)),
            (2, r#"upstream "b""#.to_string(), Some(2)),
            (2, r#"route "r""#.to_string(), Some(2)),
            (3, r#"upstream "a""#.to_string(), None),
        ]
    );
    // A put's change carries the object as stored.
    assert_eq!(all[2].object.as_ref(), s.get(Kind::Route, "r"));

    assert_eq!(s.changes_since(1).unwrap(), all[1..]);
    assert_eq!(s.changes_since(2).unwrap(), all[3..]);
    assert_eq!(s.changes_since(3).unwrap(), []);
    assert_eq!(s.changes_since(99).unwrap(), []);
}

#[test]
fn changes_since_is_none_once_the_history_is_trimmed() {
    let mut s = ConfigState::with_history_limit(2);
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        s.apply(i as u64 + 1, &Command::put(up(name), None))
            .unwrap();
    }
    // Only the changes at 2 and 3 are kept: whoever is at 1 can catch up.
    assert_eq!(s.changes_since(0), None);
    let since1 = s.changes_since(1).unwrap();
    assert_eq!(
        since1.iter().map(|c| c.revision).collect::<Vec<_>>(),
        [2, 3]
    );

    // A write bigger than the history drops all of itself, never half.
    s.apply(4, &batch(vec![put(up("d")), put(up("e")), put(up("f"))]))
        .unwrap();
    assert_eq!(s.changes_since(1), None);
    assert_eq!(s.changes_since(3), None);
    assert_eq!(s.changes_since(4), Some(Vec::new()));

    // A write that fits, after one that did not.
    s.apply(5, &Command::put(up("g"), None)).unwrap();
    assert_eq!(s.changes_since(3), None);
    assert_eq!(
        s.changes_since(4)
            .unwrap()
            .iter()
            .map(|c| c.revision)
            .collect::<Vec<_>>(),
        [5]
    );
}

#[test]
fn a_write_that_straddles_the_history_limit_is_dropped_whole() {
    let mut s = ConfigState::with_history_limit(3);
    s.apply(1, &batch(vec![put(up("a")), put(up("b"))]))
        .unwrap();
    s.apply(2, &batch(vec![put(up("c")), put(up("d"))]))
        .unwrap();
    // Four changes over a limit of three: the write at 1 goes entirely.
    assert_eq!(s.changes_since(0), None);
    let since1 = s.changes_since(1).unwrap();
    assert_eq!(
        since1
            .iter()
            .map(|c| c.target.name.as_str())
            .collect::<Vec<_>>(),
        ["c", "d"]
    );
}

#[test]
fn a_snapshot_round_trips_objects_and_revision() {
    let mut s = ConfigState::default();
    let mut all = fixtures::one_of_each();
    all.reverse();
    s.apply(5, &batch(all.into_iter().map(put).collect()))
        .unwrap();
    s.apply(6, &Command::put(up("spare"), None)).unwrap();
    s.apply(8, &Command::delete(r(Kind::Upstream, "spare"), Some(6)))
        .unwrap();

    let bytes = s.to_snapshot();
    let restored = ConfigState::from_snapshot(&bytes).unwrap();
    assert_eq!(restored.revision(), 8);
    assert_eq!(restored.len(), s.len());
    for kind in Kind::ALL {
        assert_eq!(
            restored.list(kind).collect::<Vec<_>>(),
            s.list(kind).collect::<Vec<_>>(),
            "{kind}"
        );
    }
    assert_eq!(restored.to_snapshot(), bytes);

    // The history did not travel: older deltas need another snapshot.
    assert_eq!(s.changes_since(6).unwrap().len(), 1);
    assert_eq!(restored.changes_since(6), None);
    assert_eq!(restored.changes_since(0), None);
    assert_eq!(restored.changes_since(8), Some(Vec::new()));

    // Both go on identically from there.
    let mut original = s.clone();
    let mut restored = restored;
    let next = Command::put(rt("extra", "billing"), Some(0));
    assert_eq!(original.apply(9, &next), restored.apply(9, &next));
    assert_eq!(restored.to_snapshot(), original.to_snapshot());
    assert_eq!(restored.changes_since(8), original.changes_since(8));
}

#[test]
fn a_snapshot_of_an_empty_state_restores_empty() {
    let restored = ConfigState::from_snapshot(&ConfigState::default().to_snapshot()).unwrap();
    assert!(restored.is_empty());
    assert_eq!(restored.revision(), 0);
    assert_eq!(restored.changes_since(0), Some(Vec::new()));
    assert!(ConfigState::from_snapshot(b"not json").is_err());
}

#[test]
fn a_replica_following_deltas_or_a_snapshot_ends_equal_to_the_source() {
    let mut source = ConfigState::default();
    source
        .apply(
            1,
            &batch(vec![put(up("a")), put(up("b")), put(rt("r", "a"))]),
        )
        .unwrap();
    let mut replica = ConfigState::from_objects(1, source.list_all());
    source.apply(2, &batch(vec![put(rt("r", "b"))])).unwrap();
    source
        .apply(3, &batch(vec![delete(Kind::Upstream, "a")]))
        .unwrap();

    let changes = source
        .changes_since(replica.revision())
        .expect("history reaches back");
    assert_eq!(
        changes.iter().map(|c| c.revision).collect::<Vec<_>>(),
        vec![2, 3]
    );
    replica.apply_changes(
        source.revision(),
        changes.into_iter().map(|c| (c.target, c.object)),
    );
    assert_eq!(replica.revision(), 3);
    assert_eq!(
        replica.list_all().collect::<Vec<_>>(),
        source.list_all().collect::<Vec<_>>()
    );
    assert!(replica.get(Kind::Upstream, "a").is_none());

    let copy = ConfigState::from_objects(source.revision(), source.list_all());
    assert_eq!(
        copy.list_all().collect::<Vec<_>>(),
        source.list_all().collect::<Vec<_>>()
    );
}

fn admin(name: &str, role: crate::object::AdminRole) -> Object {
    crate::object::AdminToken {
        role,
        ..fixtures::admin_token(name)
    }
    .into()
}

#[test]
fn the_last_admin_token_cannot_be_deleted_or_demoted() {
    use crate::object::AdminRole;
    let mut s = ConfigState::default();
    s.apply(1, &Command::put(admin("root", AdminRole::Admin), None))
        .unwrap();
    s.apply(2, &Command::put(admin("ci", AdminRole::Editor), None))
        .unwrap();

    let err = refused(&mut s, 3, &batch(vec![delete(Kind::AdminToken, "root")]));
    assert_eq!(
        err,
        WriteError::LastAdminToken {
            target: r(Kind::AdminToken, "root")
        }
    );
    assert_eq!(err.code(), ErrorCode::FailedPrecondition);
    assert!(err.to_string().contains("last admin role"), "{err}");
    refused(
        &mut s,
        3,
        &batch(vec![put(admin("root", AdminRole::Viewer))]),
    );

    // Handing the role over in the same write is fine, and so is deleting once another admin exists.
    s.apply(
        3,
        &batch(vec![
            delete(Kind::AdminToken, "root"),
            put(admin("ops", AdminRole::Admin)),
        ]),
    )
    .unwrap();
    s.apply(4, &Command::put(admin("root", AdminRole::Admin), None))
        .unwrap();
    s.apply(5, &batch(vec![delete(Kind::AdminToken, "ops")]))
        .unwrap();
    // Tokens of other roles come and go freely.
    s.apply(6, &batch(vec![delete(Kind::AdminToken, "ci")]))
        .unwrap();
}

#[test]
fn every_change_is_audited_with_its_origin_and_a_digest_not_the_object() {
    use crate::audit::{Action, Filter, Origin};
    let mut s = ConfigState::default();
    let by = |actor: &str, at_ms: u64, ops: Vec<Op>| Command {
        ops,
        expected_config_revision: None,
        origin: Some(Origin {
            actor: actor.to_string(),
            at_ms,
        }),
        membership: None,
    };
    s.apply(1, &by("token:alice", 1_000, vec![put(up("billing"))]))
        .unwrap();
    s.apply(
        2,
        &by(
            "token:bob",
            2_000,
            vec![put(up("billing")), put(up("orders"))],
        ),
    )
    .unwrap();
    // A refused write leaves no record.
    refused(
        &mut s,
        3,
        &by("token:mallory", 3_000, vec![delete(Kind::Upstream, "nope")]),
    );
    s.apply(
        3,
        &by("cert:ci", 4_000, vec![delete(Kind::Upstream, "orders")]),
    )
    .unwrap();

    let all = s.audit(&Filter::default(), 100);
    let summary: Vec<(u64, &str, Action, &str)> = all
        .iter()
        .map(|r| (r.revision, r.actor.as_str(), r.action, r.name.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (1, "token:alice", Action::Create, "billing"),
            (2, "token:bob", Action::Update, "billing"),
            (2, "token:bob", Action::Create, "orders"),
            (3, "cert:ci", Action::Delete, "orders"),
        ]
    );
    assert_eq!(all[0].digest, crate::audit::digest(&up("billing")));
    assert_eq!(all[0].digest.len(), 64);
    assert!(all[3].digest.is_empty());

    let bob = Filter {
        actor: Some("token:bob".into()),
        ..Filter::default()
    };
    assert_eq!(s.audit(&bob, 100).len(), 2);
    let window = Filter {
        since_ms: Some(2_000),
        until_ms: Some(4_000),
        ..Filter::default()
    };
    assert_eq!(s.audit(&window, 100).len(), 2);
    // The limit keeps the newest records.
    assert_eq!(s.audit(&Filter::default(), 1)[0].revision, 3);

    // The log travels in snapshots, and copies share it.
    let restored = ConfigState::from_snapshot(&s.to_snapshot()).unwrap();
    assert_eq!(restored.audit(&Filter::default(), 100), all);
    assert_eq!(s.frozen().audit(&Filter::default(), 100), all);
}
