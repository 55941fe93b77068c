//! The cluster-limit store against a real `redis-server`: concurrent
//! decisions of one key go out together and are decided exactly.

use std::collections::BTreeMap;
use std::time::Duration;

use gatehouse_data::limits::store::{Answer, Store, StoreTarget};
use gatehouse_e2e::redis::RedisServer;

/// Many requests at once on two hot keys (one worker thread, so they
/// queue for the same script calls): each key admits exactly its capacity,
/// every admitted request sees a different `remaining`, and the refused
/// ones are told to wait.
#[tokio::test(flavor = "current_thread")]
async fn concurrent_decisions_of_hot_keys_admit_exactly_the_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path()).unwrap();
    let store = Store::start(&StoreTarget::Single(redis.url()), Duration::from_secs(2)).unwrap();
    // 50 in a bucket that refills one token an hour: nothing comes back
    // during the test.
    let (interval, capacity) = (Duration::from_secs(3600), 50);
    let mut tasks = Vec::new();
    for i in 0..400 {
        let store = store.clone();
        let key = format!("{{test}}:hot-{}", i % 2);
        tasks.push(tokio::spawn(async move {
            let a = store.decide(key.clone(), interval, capacity, 1).await;
            (key, a)
        }));
    }
    let mut by_key: BTreeMap<String, Vec<Answer>> = BTreeMap::new();
    for t in tasks {
        let (key, answer) = t.await.unwrap();
        by_key
            .entry(key)
            .or_default()
            .push(answer.expect("a decision"));
    }
    assert_eq!(by_key.len(), 2);
    for (key, answers) in &by_key {
        let admitted: Vec<&Answer> = answers.iter().filter(|a| a.taken == 1).collect();
        assert_eq!(admitted.len(), 50, "{key}: admitted");
        let mut remaining: Vec<u64> = admitted.iter().map(|a| a.remaining).collect();
        remaining.sort_unstable();
        assert_eq!(remaining, (0..50).collect::<Vec<u64>>(), "{key}: remaining");
        for a in answers.iter().filter(|a| a.taken == 0) {
            assert_eq!(a.remaining, 0, "{key}: refused {a:?}");
            assert!(
                a.wait > Duration::from_secs(3500) && a.wait <= interval,
                "{key}: a refused request waits about one interval: {a:?}"
            );
        }
    }
    // They went out together: far fewer script calls than decisions.
    let stats = redis.cli(&["info", "commandstats"]).unwrap();
    let calls: u64 = stats
        .lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert!(
        (1..100).contains(&calls),
        "400 decisions took {calls} script calls"
    );
    // And Redis holds the state: the next request of either key is refused.
    let next = store
        .decide("{test}:hot-0".into(), interval, capacity, 1)
        .await
        .unwrap();
    assert_eq!(next.taken, 0);
}

/// Tokens given back return to their bucket, and a bucket never ends up
/// holding more than its capacity, whatever is given back.
#[tokio::test]
async fn tokens_given_back_return_to_the_bucket_up_to_its_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path()).unwrap();
    let store = Store::start(&StoreTarget::Single(redis.url()), Duration::from_secs(2)).unwrap();
    let (interval, capacity) = (Duration::from_secs(3600), 10);
    let take = |key: &str, want: u64| {
        let (store, key) = (store.clone(), key.to_string());
        async move { store.decide(key, interval, capacity, want).await.unwrap() }
    };

    // All ten taken, four given back: four can be taken again, no more.
    assert_eq!(take("{t}:a", 10).await.taken, 10);
    store.give_back("{t}:a", interval, 4).await.unwrap();
    let again = take("{t}:a", 10).await;
    assert_eq!((again.taken, again.remaining), (4, 0));

    // Three taken, ten given back: the bucket is full again, not over.
    assert_eq!(take("{t}:b", 3).await.taken, 3);
    store.give_back("{t}:b", interval, 10).await.unwrap();
    assert_eq!(take("{t}:b", 20).await.taken, 10);

    // A full (or never used) bucket takes nothing back.
    store.give_back("{t}:c", interval, 5).await.unwrap();
    assert_eq!(take("{t}:c", 20).await.taken, 10);
    assert_eq!(redis.cli(&["exists", "{t}:c"]).unwrap().trim(), "1");
}
