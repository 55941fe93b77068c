//! A revision patched with a delta equals the same revision compiled from
//! scratch, and a credentials-only delta shares the router and pools.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use gatehouse_model::object::{ApiKey, Consumer, Route, Upstream};
use proptest::prelude::*;

use super::*;
use crate::proxy::Shared;
use crate::resources::Limits;

fn consumer(name: &str, groups: &[&str]) -> Object {
    Object::Consumer(Consumer {
        name: name.into(),
        labels: Default::default(),
        revision: 0,
        groups: groups.iter().map(|g| g.to_string()).collect(),
        metadata: Default::default(),
    })
}

fn key(name: &str, consumer: &str, variant: u8) -> Object {
    Object::ApiKey(ApiKey {
        name: name.into(),
        labels: Default::default(),
        revision: 0,
        consumer: consumer.into(),
        key_hash: hex::encode([variant; 32]),
        expires_at: variant
            .is_multiple_of(3)
            .then(|| SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000)),
        revoked: variant % 2 == 1,
    })
}

fn upstream(name: &str) -> Object {
    Object::Upstream(
        serde_json::from_value::<Upstream>(serde_json::json!({
            "name": name, "targets": [{"address": "127.0.0.1:9"}]
        }))
        .unwrap(),
    )
}

fn route(name: &str, path: &str) -> Object {
    Object::Route(
        serde_json::from_value::<Route>(serde_json::json!({
            "name": name, "paths": [{"prefix": path}], "upstream": "u"
        }))
        .unwrap(),
    )
}

/// One abstract change, made valid against the state it applies to.
#[derive(Clone, Debug)]
enum Step {
    PutConsumer(u8, u8),
    DeleteConsumer(u8),
    PutKey(u8, u8, u8),
    DeleteKey(u8),
    PutRoute(u8),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..6u8, 0..3u8).prop_map(|(c, g)| Step::PutConsumer(c, g)),
        (0..6u8).prop_map(Step::DeleteConsumer),
        (0..40u8, 0..6u8, 0..6u8).prop_map(|(k, c, v)| Step::PutKey(k, c, v)),
        (0..40u8).prop_map(Step::DeleteKey),
        (0..3u8).prop_map(Step::PutRoute),
    ]
}

/// The changes of one delta: each object at most once, and nothing that
/// leaves a key without its consumer (the control plane refuses that).
fn changes(state: &ConfigState, steps: &[Step]) -> Vec<(ObjectRef, Option<Object>)> {
    let mut out: BTreeMap<ObjectRef, Option<Object>> = BTreeMap::new();
    let exists = |out: &BTreeMap<ObjectRef, Option<Object>>, kind: Kind, name: &str| {
        let r = ObjectRef {
            kind,
            name: name.into(),
        };
        match out.get(&r) {
            Some(o) => o.is_some(),
            None => state.get(kind, name).is_some(),
        }
    };
    for s in steps {
        match s {
            Step::PutConsumer(c, g) => {
                let groups: &[&str] = match g {
                    0 => &[],
                    1 => &["gold"],
                    _ => &["gold", "beta"],
                };
                let o = consumer(&format!("c{c}"), groups);
                out.insert(o.object_ref(), Some(o));
            }
            Step::DeleteConsumer(c) => {
                let name = format!("c{c}");
                let used = (0..40u8).any(|k| {
                    let kn = format!("k{k}");
                    let r = ObjectRef {
                        kind: Kind::ApiKey,
                        name: kn.clone(),
                    };
                    let current = match out.get(&r) {
                        Some(o) => o.clone(),
                        None => state.get(Kind::ApiKey, &kn).cloned(),
                    };
                    matches!(current, Some(Object::ApiKey(k)) if k.consumer == name)
                });
                if !used && exists(&out, Kind::Consumer, &name) {
                    out.insert(
                        ObjectRef {
                            kind: Kind::Consumer,
                            name,
                        },
                        None,
                    );
                }
            }
            Step::PutKey(k, c, v) => {
                let cname = format!("c{c}");
                if exists(&out, Kind::Consumer, &cname) {
                    let o = key(&format!("k{k}"), &cname, *v);
                    out.insert(o.object_ref(), Some(o));
                }
            }
            Step::DeleteKey(k) => {
                let name = format!("k{k}");
                if exists(&out, Kind::ApiKey, &name) {
                    out.insert(
                        ObjectRef {
                            kind: Kind::ApiKey,
                            name,
                        },
                        None,
                    );
                }
            }
            Step::PutRoute(r) => {
                let o = route(&format!("r{r}"), &format!("/r{r}"));
                out.insert(o.object_ref(), Some(o));
            }
        }
    }
    out.into_iter().collect()
}

fn shared() -> (tokio::runtime::Runtime, Shared) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let shared = {
        let _guard = rt.enter();
        Shared::new(Limits::default())
    };
    (rt, shared)
}

fn route_names(c: &Compiled) -> Vec<String> {
    c.routes.iter().map(|r| r.name.to_string()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_patched_revision_equals_one_compiled_from_scratch(
        deltas in proptest::collection::vec(proptest::collection::vec(step(), 1..6), 1..25),
    ) {
        let (rt, shared) = shared();
        let _guard = rt.enter();
        let mut state = ConfigState::from_objects(
            1,
            [upstream("u"), route("r0", "/r0"), consumer("c0", &["gold"]), key("k0", "c0", 0)],
        );
        let mut compiled = Compiled::build(&state, &shared).unwrap();
        for (i, steps) in deltas.iter().enumerate() {
            let changes = changes(&state, steps);
            if changes.is_empty() {
                continue;
            }
            let targets: Vec<ObjectRef> = changes.iter().map(|(t, _)| t.clone()).collect();
            state.apply_changes(i as u64 + 2, changes);
            let patched = compiled.patch(&state, &targets, &shared).unwrap();
            let fresh = Compiled::build(&state, &shared).unwrap();
            prop_assert_eq!(patched.revision, fresh.revision);
            prop_assert_eq!(&patched.credentials, &fresh.credentials);
            prop_assert_eq!(route_names(&patched), route_names(&fresh));
            let credentials_only = targets.iter().all(|t| t.kind != Kind::Route);
            prop_assert_eq!(Arc::ptr_eq(&patched.router, &compiled.router), credentials_only);
            prop_assert_eq!(Arc::ptr_eq(&patched.pools, &compiled.pools), credentials_only);
            compiled = patched;
        }
    }
}

#[test]
fn a_key_delta_on_many_keys_patches_without_a_rebuild() {
    let (rt, shared) = shared();
    let _guard = rt.enter();
    let n = 20_000u32;
    let mut objects = vec![upstream("u"), route("r0", "/r0"), consumer("c0", &[])];
    objects.extend((0..n).map(|i| key(&format!("k{i}"), "c0", 0)));
    let mut state = ConfigState::from_objects(1, objects);
    let began = std::time::Instant::now();
    let compiled = Compiled::build(&state, &shared).unwrap();
    let full = began.elapsed();
    let new_key = key("k-new", "c0", 2);
    let target = new_key.object_ref();
    state.apply_changes(2, [(target.clone(), Some(new_key))]);
    let began = std::time::Instant::now();
    let patched = compiled.patch(&state, &[target], &shared).unwrap();
    let delta = began.elapsed();
    println!("{n} keys: full compile {full:?}, one-key delta {delta:?}");
    assert_eq!(patched.credentials.key_count(), n as usize + 1);
    assert_eq!(
        compiled.credentials.key_count(),
        n as usize,
        "the old revision is unchanged"
    );
    assert!(Arc::ptr_eq(&patched.router, &compiled.router));
    assert_eq!(
        patched.credentials,
        Compiled::build(&state, &shared).unwrap().credentials
    );
}
