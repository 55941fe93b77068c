//! Properties of the plan over random configurations of two owners: carried
//! out, a plan leaves nothing to do, puts the desired objects in place,
//! deletes only the owner's missing objects, and leaves everything else as it was.

use proptest::prelude::*;

use super::*;
use crate::fixtures::{self, labels};

const UPSTREAMS: [&str; 4] = ["u0", "u1", "u2", "u3"];
const ROUTES: [&str; 3] = ["r0", "r1", "r2"];
const OWNERS: [Option<&str>; 3] = [Some("a"), Some("b"), None];

fn with_owner(mut o: Object, owner: Option<&str>) -> Object {
    let l = owner.map_or_else(Default::default, |w| labels(&[(OWNER_LABEL, w)]));
    match &mut o {
        Object::Upstream(x) => x.labels = l,
        Object::Route(x) => x.labels = l,
        _ => unreachable!(),
    }
    o
}

/// Upstreams (attempts, owner) and routes (upstream index, owner) by slot; `None` is absent.
type Spec = (Vec<Option<(u32, usize)>>, Vec<Option<(usize, usize)>>);

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop::collection::vec(prop::option::of((0u32..3, 0usize..3)), 4),
        prop::collection::vec(prop::option::of((0usize..4, 0usize..3)), 3),
    )
}

/// The objects of a spec; `owner` overrides every owner when set.
fn objects(spec: &Spec, owner: Option<Option<&str>>) -> Vec<Object> {
    let mut out = Vec::new();
    for (i, u) in spec.0.iter().enumerate() {
        if let Some((attempts, o)) = u {
            let mut up = fixtures::upstream(UPSTREAMS[i]);
            up.retries.attempts = *attempts;
            out.push(with_owner(up.into(), owner.unwrap_or(OWNERS[*o])));
        }
    }
    for (i, r) in spec.1.iter().enumerate() {
        if let Some((u, o)) = r {
            let route = fixtures::route(ROUTES[i], UPSTREAMS[*u]);
            out.push(with_owner(route.into(), owner.unwrap_or(OWNERS[*o])));
        }
    }
    out
}

fn plain(o: &Object) -> Object {
    let mut o = o.clone();
    o.set_revision(0);
    o
}

proptest! {
    #[test]
    fn a_plan_carried_out_makes_the_state_match(current in spec(), wanted in spec(), prune in any::<bool>()) {
        // The current state: whatever of `current` can be stored.
        let mut state = ConfigState::default();
        for o in objects(&current, None) {
            let _ = state.apply(state.revision() + 1, &Command::put(o, None));
        }
        let desired = objects(&wanted, Some(Some("a")));
        let owner = prune.then_some("a");
        let Ok(plan) = plan(&state, &desired, owner) else {
            // Refused (a dangling reference, a takeover, a delete still
            // referenced): the state is borrowed, so nothing changed.
            return Ok(());
        };
        prop_assert_eq!(plan.revision, state.revision());
        let mut after = state.clone();
        after.apply(state.revision() + 1, &plan.command(&desired)).unwrap();
        prop_assert!(super::plan(&after, &desired, owner).unwrap().is_empty());
        for want in &desired {
            let have = after.get(want.kind(), want.name()).map(plain);
            prop_assert_eq!(have.as_ref(), Some(want));
        }
        for kind in [Kind::Upstream, Kind::Route] {
            for old in state.list(kind) {
                let in_files = desired.iter().any(|d| d.object_ref() == old.object_ref());
                let ours = old.labels().get(OWNER_LABEL).map(String::as_str) == Some("a");
                let now = after.get(kind, old.name());
                if in_files {
                    continue;
                }
                if prune && ours {
                    prop_assert!(now.is_none(), "{} was not pruned", old.object_ref());
                } else {
                    prop_assert_eq!(now, Some(old), "{} changed", old.object_ref());
                }
            }
        }
        // Every update names at least one field, and every listed change happened.
        for c in &plan.changes {
            prop_assert_eq!(c.action == Action::Update, !c.fields.is_empty());
        }
    }
}
