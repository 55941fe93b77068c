//! The cluster-limit store against a real `redis-server`: concurrent
//! decisions of one key go out together and are decided exactly.

use std::collections::BTreeMap;
use std::time::Duration;

use gatehouse_data::limits::store::{Answer, Bucket, CallMetrics, Store, StoreTarget};
use gatehouse_e2e::redis::RedisServer;

/// A store on `redis` with this decision timeout, and the metrics of its
/// calls.
fn counted_store(redis: &RedisServer, timeout: Duration) -> (Store, CallMetrics) {
    let calls = CallMetrics::default();
    let store = Store::start_tls(
        &StoreTarget::Single(redis.url()),
        &Default::default(),
        timeout,
        calls.clone(),
    )
    .unwrap();
    (store, calls)
}

/// Many requests at once on two hot keys (one worker thread, so they
/// queue for the same script calls): each key admits exactly its capacity,
/// every admitted request sees a different `remaining`, and the refused
/// ones are told to wait.
#[tokio::test(flavor = "current_thread")]
async fn concurrent_decisions_of_hot_keys_admit_exactly_the_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path()).unwrap();
    // Loaded beforehand, so every call Redis counts is one of the store's.
    redis
        .cli(&["script", "load", gatehouse_data::limits::store::GCRA])
        .unwrap();
    let (store, calls) = counted_store(&redis, Duration::from_secs(2));
    // 50 in a bucket that refills one token an hour: nothing comes back
    // during the test.
    let (interval, capacity) = (Duration::from_secs(3600), 50);
    let mut tasks = Vec::new();
    for i in 0..400 {
        let store = store.clone();
        let key = format!("hot-{}", i % 2);
        tasks.push(tokio::spawn(async move {
            let a = store
                .decide(Bucket::new("{test:", key.as_str()), interval, capacity, 1)
                .await;
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
    let script_calls = redis.calls("evalsha").unwrap() + redis.calls("eval").unwrap();
    assert!(
        (1..100).contains(&script_calls),
        "400 decisions took {script_calls} script calls"
    );
    // The store timed each call once, not each decision in it.
    assert_eq!(calls.duration.count(), script_calls);
    assert_eq!(calls.errors.get(), 0);
    // And Redis holds the state: the next request of either key is refused.
    let next = store
        .decide(Bucket::new("{test:", "hot-0"), interval, capacity, 1)
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
    let bucket = |key: &str| Bucket::new("{t:", key);
    let take = |key: &str, want: u64| {
        let (store, bucket) = (store.clone(), bucket(key));
        async move {
            store
                .decide(bucket, interval, capacity, want)
                .await
                .unwrap()
        }
    };

    // All ten taken, four given back: four can be taken again, no more.
    assert_eq!(take("a", 10).await.taken, 10);
    store.give_back(&bucket("a"), interval, 4).await.unwrap();
    let again = take("a", 10).await;
    assert_eq!((again.taken, again.remaining), (4, 0));

    // Three taken, ten given back: the bucket is full again, not over.
    assert_eq!(take("b", 3).await.taken, 3);
    store.give_back(&bucket("b"), interval, 10).await.unwrap();
    assert_eq!(take("b", 20).await.taken, 10);

    // A full (or never used) bucket takes nothing back.
    store.give_back(&bucket("c"), interval, 5).await.unwrap();
    assert_eq!(take("c", 20).await.taken, 10);
    assert_eq!(
        redis
            .cli(&["exists", &bucket("c").redis_key()])
            .unwrap()
            .trim(),
        "1"
    );
}

/// `rediss://` to a real redis-server's TLS port: decisions work with the
/// server's CA, fail (within the timeout) with another CA or without TLS,
/// and settings that would send in clear what was meant to be encrypted
/// are refused at start.
#[tokio::test]
async fn decisions_over_tls_need_the_servers_ca() {
    use gatehouse_data::limits::store::StoreTls;
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start_tls(dir.path()).unwrap();
    let url = redis.tls_url().unwrap();
    let ca = std::fs::read(redis.ca_file()).unwrap();
    let (interval, timeout) = (Duration::from_secs(3600), Duration::from_secs(2));
    let tls = StoreTls::with_ca_pem(ca).unwrap();

    let start = |tls: &StoreTls| {
        Store::start_tls(
            &StoreTarget::Single(url.clone()),
            tls,
            timeout,
            CallMetrics::default(),
        )
        .unwrap()
    };
    let store = start(&tls);
    let a = store
        .decide(Bucket::new("{t:", "tls"), interval, 3, 1)
        .await
        .unwrap();
    assert_eq!((a.taken, a.remaining), (1, 2));
    // It is the same server: the plain port sees the bucket.
    let tls_key = Bucket::new("{t:", "tls").redis_key();
    assert_eq!(redis.cli(&["exists", &tls_key]).unwrap().trim(), "1");

    // Another CA: the server is not trusted, no decision.
    let other = gatehouse_e2e::certs::LoopbackCert::new().unwrap();
    let wrong = StoreTls::with_ca_pem(other.ca_pem.into_bytes()).unwrap();
    let store = start(&wrong);
    let refused = store
        .decide(Bucket::new("{t:", "tls"), interval, 3, 1)
        .await;
    assert!(
        refused.is_err(),
        "an untrusted server answered: {refused:?}"
    );

    // Plain Redis protocol to the TLS port gets nothing either.
    let port = redis.tls_port.unwrap();
    let plain = Store::start(
        &StoreTarget::Single(format!("redis://127.0.0.1:{port}")),
        timeout,
    )
    .unwrap();
    assert!(plain
        .decide(Bucket::new("{t:", "tls"), interval, 3, 1)
        .await
        .is_err());

    // Refused at start, with what to change.
    let cases = [
        (StoreTarget::Single(redis.url()), "redis:// (no TLS)"),
        (
            StoreTarget::Cluster(vec![url.clone(), redis.url()]),
            "use one scheme for all",
        ),
        (
            StoreTarget::Sentinel {
                sentinels: vec![url.clone(), redis.url()],
                master: "m".into(),
                master_password: None,
            },
            "use one scheme for all",
        ),
    ];
    for (target, says) in cases {
        let Err(err) = Store::start_tls(&target, &tls, timeout, CallMetrics::default()) else {
            panic!("{target:?}: started");
        };
        assert!(err.to_string().contains(says), "{target:?}: {err}");
    }
    // A CA file without a certificate in it.
    let err = StoreTls::with_ca_pem(b"not a certificate\n".to_vec()).unwrap_err();
    assert!(err.to_string().contains("no PEM certificate"), "{err}");
}

/// A Redis that asks TLS clients for a certificate (`tls-auth-clients yes`)
/// decides only for a data plane that shows one from its CA.
#[tokio::test]
async fn a_redis_that_asks_for_client_certificates_decides_only_with_one() {
    use gatehouse_data::limits::store::StoreTls;
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start_tls_mutual(dir.path()).unwrap();
    let target = StoreTarget::Single(redis.tls_url().unwrap());
    let (interval, timeout) = (Duration::from_secs(3600), Duration::from_secs(2));
    let ca = StoreTls::with_ca_pem(std::fs::read(redis.ca_file()).unwrap()).unwrap();

    let without = Store::start_tls(&target, &ca, timeout, CallMetrics::default()).unwrap();
    let refused = without
        .decide(Bucket::new("{t:", "m"), interval, 3, 1)
        .await;
    assert!(
        refused.is_err(),
        "decided without a client certificate: {refused:?}"
    );

    let (cert, key) = redis.client_files();
    let with = ca
        .with_client_identity(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap())
        .unwrap();
    let store = Store::start_tls(&target, &with, timeout, CallMetrics::default()).unwrap();
    let a = store
        .decide(Bucket::new("{t:", "m"), interval, 3, 1)
        .await
        .unwrap();
    assert_eq!((a.taken, a.remaining), (1, 2));

    // Files that hold no certificate or no key are refused, naming which.
    let err = StoreTls::default()
        .with_client_identity(b"no".to_vec(), b"no".to_vec())
        .unwrap_err();
    assert!(err.to_string().contains("client certificate"), "{err}");
    let (cert, _) = redis.client_files();
    let err = StoreTls::default()
        .with_client_identity(std::fs::read(cert).unwrap(), b"no key".to_vec())
        .unwrap_err();
    assert!(err.to_string().contains("client key"), "{err}");
}

/// A background ask (a lease refill) hands its answer to its closure, and
/// Redis keeps what it took; with Redis paused the closure gets the
/// timeout instead, within the decision timeout, and the call is counted
/// as failed.
#[tokio::test(flavor = "current_thread")]
async fn a_background_ask_hands_its_answer_to_its_closure() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path()).unwrap();
    let timeout = Duration::from_millis(300);
    let (store, calls) = counted_store(&redis, timeout);
    let (interval, capacity) = (Duration::from_secs(3600), 10);
    let ask = |want: u64| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        store.decide_in_background(Bucket::new("{t:", "bg"), interval, capacity, want, |a| {
            let _ = tx.send(a);
        });
        rx
    };

    let a = ask(4).await.unwrap().unwrap();
    assert_eq!((a.taken, a.remaining), (4, 6));
    let rest = store
        .decide(Bucket::new("{t:", "bg"), interval, capacity, 10)
        .await
        .unwrap();
    assert_eq!(rest.taken, 6, "Redis kept the four taken in the background");

    redis.stop();
    let asked = std::time::Instant::now();
    let failed = ask(1).await.unwrap();
    redis.cont();
    assert_eq!(failed, Err("timed out".to_string()));
    assert!(asked.elapsed() < timeout * 3, "{:?}", asked.elapsed());
    assert_eq!(calls.errors.get(), 1);
}

/// A Redis that does not know the rate-limit script (a fresh one, or one
/// that lost it: restarted, failed over, `SCRIPT FLUSH`) still decides:
/// the store loads the script and sends the call once more, and the
/// request sees an answer, not an error.
#[tokio::test(flavor = "current_thread")]
async fn a_redis_that_forgot_the_script_loads_it_again_and_decides() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path()).unwrap();
    let (store, calls) = counted_store(&redis, Duration::from_secs(2));
    let (interval, capacity) = (Duration::from_secs(3600), 10);
    let take = || store.decide(Bucket::new("{t:", "k"), interval, capacity, 1);

    let first = take().await.expect("a decision from a fresh Redis");
    assert_eq!((first.taken, first.remaining), (1, 9));
    redis.cli(&["script", "flush"]).unwrap();
    let second = take().await.expect("a decision after SCRIPT FLUSH");
    assert_eq!((second.taken, second.remaining), (1, 8));

    // Loaded once for each time Redis did not know it; no call failed.
    assert_eq!(redis.calls("script|load").unwrap(), 2);
    assert_eq!(calls.errors.get(), 0);
}
