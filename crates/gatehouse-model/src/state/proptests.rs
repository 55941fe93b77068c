//! Properties of `ConfigState::apply` over random command sequences on a small
//! universe of names, so that references, conflicts and deletes collide often.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::fixtures;
use crate::object::{JwtAuth, Kind, Object, ObjectRef};
use crate::validate::{references, validate_object};

const UPSTREAMS: [&str; 3] = ["u0", "u1", "u2"];
const POLICIES: [&str; 2] = ["p0", "p1"];
const ISSUERS: [&str; 2] = ["i0", "i1"];
const ROUTES: [&str; 3] = ["r0", "r1", "r2"];

/// One operation, described by indexes into the universe.
#[derive(Clone, Debug)]
enum OpSpec {
    Upstream {
        name: usize,
        attempts: u32,
    },
    Issuer {
        name: usize,
    },
    Policy {
        name: usize,
        issuer: Option<usize>,
    },
    Route {
        name: usize,
        upstream: usize,
        policy: Option<usize>,
    },
    /// An upstream without targets: always refused.
    Invalid {
        name: usize,
    },
    Delete {
        kind: Kind,
        name: usize,
    },
}

impl OpSpec {
    fn op(&self, expected_revision: Option<u64>) -> Op {
        let object: Object = match *self {
            OpSpec::Upstream { name, attempts } => {
                let mut u = fixtures::upstream(UPSTREAMS[name]);
                u.retries.attempts = attempts;
                u.into()
            }
            OpSpec::Issuer { name } => fixtures::jwt_issuer(ISSUERS[name]).into(),
            OpSpec::Policy { name, issuer } => {
                let mut p = fixtures::policy(POLICIES[name]);
                if let Some(i) = issuer {
                    p.authentication = vec![crate::object::AuthMethod::Jwt];
                    p.jwt = Some(JwtAuth {
                        issuers: vec![ISSUERS[i].to_string()],
                    });
                }
                p.into()
            }
            OpSpec::Route {
                name,
                upstream,
                policy,
            } => {
                let mut r = fixtures::route(ROUTES[name], UPSTREAMS[upstream]);
                r.policy = policy.map(|p| POLICIES[p].to_string());
                r.into()
            }
            OpSpec::Invalid { name } => {
                let mut u = fixtures::upstream(UPSTREAMS[name]);
                u.targets.clear();
                u.into()
            }
            OpSpec::Delete { kind, name } => {
                let names: &[&str] = match kind {
                    Kind::Upstream => &UPSTREAMS,
                    Kind::Policy => &POLICIES,
                    Kind::JwtIssuer => &ISSUERS,
                    _ => &ROUTES,
                };
                return Op::Delete {
                    target: ObjectRef {
                        kind,
                        name: names[name % names.len()].to_string(),
                    },
                    expected_revision,
                };
            }
        };
        Op::Put {
            object,
            expected_revision,
        }
    }
}

fn op_spec() -> impl Strategy<Value = OpSpec> {
    prop_oneof![
        4 => (0..UPSTREAMS.len(), 0u32..4).prop_map(|(name, attempts)| OpSpec::Upstream { name, attempts }),
        2 => (0..ISSUERS.len()).prop_map(|name| OpSpec::Issuer { name }),
        3 => (0..POLICIES.len(), proptest::option::of(0..ISSUERS.len()))
            .prop_map(|(name, issuer)| OpSpec::Policy { name, issuer }),
        5 => (0..ROUTES.len(), 0..UPSTREAMS.len(), proptest::option::weighted(0.3, 0..POLICIES.len()))
            .prop_map(|(name, upstream, policy)| OpSpec::Route { name, upstream, policy }),
        1 => (0..UPSTREAMS.len()).prop_map(|name| OpSpec::Invalid { name }),
        5 => (
            prop_oneof![
                3 => Just(Kind::Upstream),
                2 => Just(Kind::Route),
                2 => Just(Kind::Policy),
                1 => Just(Kind::JwtIssuer),
            ],
            0..3usize
        )
            .prop_map(|(kind, name)| OpSpec::Delete { kind, name }),
    ]
}

/// An expected revision before the log indexes are known.
#[derive(Clone, Copy, Debug)]
enum Rev {
    None,
    /// `Some(0)`: create only.
    Zero,
    /// The index of the command `k` steps back, often the object's revision.
    Back(usize),
    /// Some small revision, rarely right.
    Abs(u64),
}

impl Rev {
    fn resolve(self, indexes: &[u64], step: usize) -> Option<u64> {
        match self {
            Rev::None => None,
            Rev::Zero => Some(0),
            Rev::Back(k) => Some(if k <= step { indexes[step - k] } else { 0 }),
            Rev::Abs(r) => Some(r),
        }
    }
}

fn op_rev() -> impl Strategy<Value = Rev> {
    prop_oneof![
        10 => Just(Rev::None),
        1 => Just(Rev::Zero),
        2 => (1usize..4).prop_map(Rev::Back),
        1 => (1u64..60).prop_map(Rev::Abs),
    ]
}

fn config_rev() -> impl Strategy<Value = Rev> {
    prop_oneof![
        16 => Just(Rev::None),
        2 => (1usize..3).prop_map(Rev::Back),
        1 => (0u64..60).prop_map(Rev::Abs),
    ]
}

type CommandSpec = (Vec<(OpSpec, Rev)>, Rev);

fn command_spec() -> impl Strategy<Value = CommandSpec> {
    let ops = prop_oneof![
        1 => Just(0usize..1),
        6 => Just(1usize..2),
        3 => Just(2usize..5),
    ]
    .prop_flat_map(|len| proptest::collection::vec((op_spec(), op_rev()), len));
    (ops, config_rev())
}

/// A command that stores every upstream, issuer and policy and two routes,
/// so that later deletes find something to delete and to trip over.
fn seed() -> Command {
    use OpSpec::*;
    let specs = [
        Upstream {
            name: 0,
            attempts: 1,
        },
        Upstream {
            name: 1,
            attempts: 1,
        },
        Upstream {
            name: 2,
            attempts: 1,
        },
        Issuer { name: 0 },
        Issuer { name: 1 },
        Policy {
            name: 0,
            issuer: Some(0),
        },
        Policy {
            name: 1,
            issuer: None,
        },
        Route {
            name: 0,
            upstream: 0,
            policy: Some(0),
        },
        Route {
            name: 1,
            upstream: 1,
            policy: None,
        },
    ];
    Command {
        ops: specs.iter().map(|s| s.op(None)).collect(),
        expected_config_revision: Some(0),
        origin: None,
        membership: None,
    }
}

/// Commands with strictly increasing log indexes, sometimes with gaps (log
/// entries that are not commands, such as membership changes); half of the
/// histories start from [`seed`].
fn history() -> impl Strategy<Value = Vec<(u64, Command)>> {
    (
        any::<bool>(),
        proptest::collection::vec((1u64..3, command_spec()), 1..40),
    )
        .prop_map(|(seeded, steps)| {
            let start = u64::from(seeded);
            let indexes: Vec<u64> = steps
                .iter()
                .scan(start, |index, (gap, _)| {
                    *index += gap;
                    Some(*index)
                })
                .collect();
            let commands = steps
                .into_iter()
                .enumerate()
                .map(|(step, (_, (ops, config)))| {
                    let cmd = Command {
                        ops: ops
                            .iter()
                            .map(|(spec, rev)| spec.op(rev.resolve(&indexes, step)))
                            .collect(),
                        expected_config_revision: config.resolve(&indexes, step),
                        origin: None,
                        membership: None,
                    };
                    (indexes[step], cmd)
                });
            seeded
                .then(|| (1, seed()))
                .into_iter()
                .chain(commands)
                .collect()
        })
}

fn run(state: &mut ConfigState, steps: &[(u64, Command)]) -> Vec<Result<WriteOk, WriteError>> {
    steps.iter().map(|(i, c)| state.apply(*i, c)).collect()
}

fn all_objects(state: &ConfigState) -> Vec<Object> {
    Kind::ALL
        .into_iter()
        .flat_map(|k| state.list(k).cloned())
        .collect()
}

/// Every stored object is valid, carries a revision no later than the state's,
/// and every object it references is stored.
fn check_invariants(state: &ConfigState) -> Result<(), TestCaseError> {
    for object in all_objects(state) {
        prop_assert!(validate_object(&object).is_ok());
        prop_assert!(object.revision() >= 1 && object.revision() <= state.revision());
        for (field, target) in references(&object) {
            prop_assert!(
                state.get(target.kind, &target.name).is_some(),
                "{}: {} references missing {}",
                object.object_ref(),
                field,
                target
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The same commands at the same indexes give the same state, the same
    /// answers, and a snapshot restores that state.
    #[test]
    fn apply_is_deterministic(steps in history()) {
        let mut a = ConfigState::default();
        let mut b = ConfigState::default();
        let results_a = run(&mut a, &steps);
        let results_b = run(&mut b, &steps);
        prop_assert_eq!(&results_a, &results_b);
        prop_assert_eq!(&a, &b);

        let restored = ConfigState::from_snapshot(&a.to_snapshot()).unwrap();
        prop_assert_eq!(restored.revision(), a.revision());
        prop_assert_eq!(all_objects(&restored), all_objects(&a));
        prop_assert_eq!(restored.to_snapshot(), a.to_snapshot());

        // The history limit changes what deltas are kept, never the objects.
        let mut small = ConfigState::with_history_limit(3);
        prop_assert_eq!(run(&mut small, &steps), results_a);
        prop_assert_eq!(small.to_snapshot(), a.to_snapshot());
    }

    /// Each command is all or nothing, and its effect is exactly what it says.
    #[test]
    fn apply_is_all_or_nothing(steps in history()) {
        let mut state = ConfigState::default();
        for (index, cmd) in &steps {
            let before = state.clone();
            match state.apply(*index, cmd) {
                Err(_) => prop_assert_eq!(&state, &before),
                Ok(ok) => {
                    prop_assert_eq!(ok.changed, cmd.ops.len());
                    if cmd.ops.is_empty() {
                        prop_assert_eq!(&state, &before);
                        continue;
                    }
                    prop_assert_eq!(ok.revision, *index);
                    prop_assert_eq!(state.revision(), *index);
                    for op in &cmd.ops {
                        match op {
                            Op::Put { object, .. } => {
                                let mut want = object.clone();
                                want.set_revision(*index);
                                prop_assert_eq!(state.get(object.kind(), object.name()), Some(&want));
                            }
                            Op::Delete { target, .. } => {
                                prop_assert!(before.get(target.kind, &target.name).is_some());
                                prop_assert!(state.get(target.kind, &target.name).is_none());
                            }
                        }
                    }
                    // Nothing the command did not name changed.
                    let named: Vec<ObjectRef> = cmd.ops.iter().map(Op::target).collect();
                    for object in all_objects(&before) {
                        if !named.contains(&object.object_ref()) {
                            prop_assert_eq!(state.get(object.kind(), object.name()), Some(&object));
                        }
                    }
                    prop_assert_eq!(state.len() + cmd.ops.iter().filter(|o| matches!(o, Op::Delete { .. })).count(),
                        before.len() + cmd.ops.iter().filter(|o| matches!(o, Op::Put { object, .. }
                            if before.get(object.kind(), object.name()).is_none())).count());
                    // The deltas since the previous revision are this command's ops, in order.
                    let changes = state.changes_since(before.revision()).unwrap();
                    prop_assert_eq!(changes.len(), cmd.ops.len());
                    for (change, op) in changes.iter().zip(&cmd.ops) {
                        prop_assert_eq!(change.revision, *index);
                        prop_assert_eq!(&change.target, &op.target());
                        prop_assert_eq!(change.object.as_ref(), state.get(change.target.kind, &change.target.name));
                    }
                }
            }
        }
    }

    /// No stored object ever references a missing one, after any step.
    #[test]
    fn references_never_dangle(steps in history()) {
        let mut state = ConfigState::default();
        for (index, cmd) in &steps {
            let _ = state.apply(*index, cmd);
            check_invariants(&state)?;
        }
    }

    /// Deltas are complete when offered: replaying `changes_since(r)` over the
    /// objects at revision `r` gives the current objects, however short the history.
    #[test]
    fn changes_since_replays_to_the_current_state(steps in history(), limit in 0usize..6, cut in 0usize..40) {
        let mut state = ConfigState::with_history_limit(limit);
        let cut = cut.min(steps.len());
        run(&mut state, &steps[..cut]);
        let mid = state.clone();
        run(&mut state, &steps[cut..]);

        let mut full = ConfigState::default();
        run(&mut full, &steps);
        prop_assert!(state.changes_since(state.revision()).is_some());
        for r in 0..=state.revision() {
            if let Some(changes) = state.changes_since(r) {
                prop_assert_eq!(Some(changes), full.changes_since(r));
            }
        }

        if let Some(changes) = state.changes_since(mid.revision()) {
            let mut objects: BTreeMap<ObjectRef, Object> =
                all_objects(&mid).into_iter().map(|o| (o.object_ref(), o)).collect();
            for change in changes {
                match change.object {
                    Some(o) => objects.insert(change.target, o),
                    None => objects.remove(&change.target),
                };
            }
            let current: BTreeMap<ObjectRef, Object> =
                all_objects(&state).into_iter().map(|o| (o.object_ref(), o)).collect();
            prop_assert_eq!(objects, current);
        }
    }
}
