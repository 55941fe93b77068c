//! What every failure drill runs around its fault: clients writing and
//! reading registers through several nodes (recorded as a history for the
//! linearizability checker), a poller of every node's own view of the term
//! and leader, and requests through a data plane; then the checks and the
//! figures.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Result};
use gatehouse_proto::pb;
use gatehouse_proto::AdminClient;
use tokio::task::JoinHandle;

use crate::data::{get, DataPlaneProc, Upstream};
use crate::linearizability::{check, History, Op};
use crate::{admin, Cluster};

/// The kind every drill's registers are: a consumer, its value in metadata `v`.
pub const KIND: &str = "consumer";

/// A consumer whose metadata `v` holds `value`.
pub fn register(name: &str, value: &str) -> pb::Object {
    pb::Object {
        kind: KIND.into(),
        name: name.into(),
        labels: Default::default(),
        revision: 0,
        spec_json: serde_json::json!({"groups": ["drill"], "metadata": {"v": value}}).to_string(),
    }
}

/// The value of a register as an object holds it.
fn value_of(object: &pb::Object) -> Option<String> {
    let spec: serde_json::Value = serde_json::from_str(&object.spec_json).ok()?;
    spec["metadata"]["v"].as_str().map(str::to_string)
}

/// How long one client call may take before its outcome counts as unknown.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// An admin client made within `CALL_TIMEOUT` (a paused node accepts the
/// connection and then says nothing).
async fn connect(addr: &str) -> Option<AdminClient> {
    tokio::time::timeout(CALL_TIMEOUT, admin(addr))
        .await
        .ok()?
        .ok()
}

/// What a read of one register answered.
pub enum ReadResult {
    Value(Option<String>),
    Failed(String),
}

/// A linearizable (or `stale`) read of register `key`.
pub async fn read(client: &mut AdminClient, key: &str, stale: bool) -> ReadResult {
    let call = client.get(pb::GetRequest {
        kind: KIND.into(),
        name: key.into(),
        stale,
    });
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(r)) => match r.into_inner().object {
            Some(o) => ReadResult::Value(value_of(&o)),
            None => ReadResult::Failed("no object in the answer".into()),
        },
        Ok(Err(s)) if s.code() == tonic::Code::NotFound => ReadResult::Value(None),
        Ok(Err(s)) => ReadResult::Failed(format!("{:?}: {}", s.code(), s.message())),
        Err(_) => ReadResult::Failed("timed out".into()),
    }
}

/// A write that was acknowledged, for the lost-write check.
#[derive(Clone, Debug)]
pub struct Acked {
    pub client: usize,
    pub key: String,
    pub value: String,
    pub revision: u64,
    pub call: u64,
    pub ret: u64,
}

/// Counts of what the clients did.
#[derive(Default)]
pub struct Counts {
    pub writes_acked: AtomicU64,
    pub writes_unknown: AtomicU64,
    pub writes_refused: AtomicU64,
    pub reads_ok: AtomicU64,
    pub reads_failed: AtomicU64,
}

/// Clients writing and reading registers until stopped.
pub struct Workload {
    pub history: Arc<History>,
    pub counts: Arc<Counts>,
    pub acked: Arc<Mutex<Vec<Acked>>>,
    /// The node each client talks to.
    pub targets: Vec<u64>,
    pub keys: Vec<String>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Workload {
    /// `per_node` clients on each of `nodes`, over `keys` registers.
    pub fn start(cluster: &Cluster, nodes: &[u64], per_node: usize, keys: usize) -> Workload {
        let history = Arc::new(History::default());
        let counts = Arc::new(Counts::default());
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let keys: Vec<String> = (0..keys).map(|k| format!("reg-{k}")).collect();
        let mut targets = Vec::new();
        let mut tasks = Vec::new();
        for round in 0..per_node {
            for node in nodes {
                let client = targets.len();
                targets.push(*node);
                let addr = cluster.node(*node).admin.clone();
                let (history, counts, acked, stop, keys) = (
                    history.clone(),
                    counts.clone(),
                    acked.clone(),
                    stop.clone(),
                    keys.clone(),
                );
                let seed =
                    0x9e37_79b9_7f4a_7c15u64 ^ ((client as u64 + 1) * 0x1000_0001 + round as u64);
                tasks.push(tokio::spawn(async move {
                    run_client(client, addr, seed, keys, history, counts, acked, stop).await;
                }));
            }
        }
        Workload {
            history,
            counts,
            acked,
            targets,
            keys,
            stop,
            tasks,
        }
    }

    /// Stops the clients and waits for their last calls.
    pub async fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }

    /// Acknowledged writes sent to `node` that were called at or after
    /// `from` and answered before `until` (history times).
    pub fn acked_by(&self, node: u64, from: u64, until: u64) -> usize {
        self.acked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|a| self.targets[a.client] == node && a.call >= from && a.ret < until)
            .count()
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_client(
    client: usize,
    addr: String,
    mut seed: u64,
    keys: Vec<String>,
    history: Arc<History>,
    counts: Arc<Counts>,
    acked: Arc<Mutex<Vec<Acked>>>,
    stop: Arc<AtomicBool>,
) {
    let mut random = move || {
        // xorshift64: reproducible per client, no dependency.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut conn: Option<AdminClient> = None;
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if conn.is_none() {
            conn = connect(&addr).await;
        }
        let Some(c) = conn.as_mut() else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let key = &keys[(random() % keys.len() as u64) as usize];
        if random() % 2 == 0 {
            seq += 1;
            let value = format!("c{client}-{seq}");
            let call = history.now();
            let put = c.put(pb::PutRequest {
                object: Some(register(key, &value)),
                expected_revision: None,
            });
            match tokio::time::timeout(CALL_TIMEOUT, put).await {
                Ok(Ok(r)) => {
                    history.ok(client, key, Op::Write(value.clone()), call);
                    counts.writes_acked.fetch_add(1, Ordering::Relaxed);
                    acked.lock().unwrap_or_else(|p| p.into_inner()).push(Acked {
                        client,
                        key: key.clone(),
                        value,
                        revision: r.into_inner().revision,
                        call,
                        ret: history.now(),
                    });
                }
                // Refusals that mean the write was not applied.
                Ok(Err(s))
                    if matches!(
                        s.code(),
                        tonic::Code::InvalidArgument
                            | tonic::Code::PermissionDenied
                            | tonic::Code::Unauthenticated
                            | tonic::Code::Aborted
                    ) =>
                {
                    counts.writes_refused.fetch_add(1, Ordering::Relaxed);
                }
                // Anything else may or may not have been applied.
                Ok(Err(_)) | Err(_) => {
                    history.unknown(client, key, value, call);
                    counts.writes_unknown.fetch_add(1, Ordering::Relaxed);
                    // Like a real client, back off a little after a failure.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        } else {
            let call = history.now();
            match read(c, key, false).await {
                ReadResult::Value(v) => {
                    history.ok(client, key, Op::Read(v), call);
                    counts.reads_ok.fetch_add(1, Ordering::Relaxed);
                }
                ReadResult::Failed(_) => {
                    counts.reads_failed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One node's own view at one moment.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    pub node: u64,
    pub role: String,
    pub term: u64,
    pub leader: u64,
    pub last_log_index: u64,
    pub last_applied: u64,
    pub snapshot_index: u64,
    pub purged_index: u64,
}

/// Asks every node for its `LocalStatus` every 50 ms.
pub struct Poller {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Poller {
    pub fn start(cluster: &Cluster) -> Poller {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = cluster
            .nodes
            .iter()
            .map(|n| {
                let (id, addr, samples, stop) =
                    (n.id, n.admin.clone(), samples.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut conn: Option<AdminClient> = None;
                    while !stop.load(Ordering::Relaxed) {
                        if conn.is_none() {
                            conn = connect(&addr).await;
                        }
                        if let Some(c) = conn.as_mut() {
                            let call = c.local_status(pb::NodeStatusRequest {});
                            match tokio::time::timeout(Duration::from_millis(400), call).await {
                                Ok(Ok(s)) => {
                                    let s = s.into_inner();
                                    samples.lock().unwrap_or_else(|p| p.into_inner()).push(
                                        Sample {
                                            at: Instant::now(),
                                            node: id,
                                            role: s.role,
                                            term: s.term,
                                            leader: s.leader_id,
                                            last_log_index: s.last_log_index,
                                            last_applied: s.last_applied,
                                            snapshot_index: s.snapshot_index,
                                            purged_index: s.purged_index,
                                        },
                                    );
                                }
                                Ok(Err(_)) => conn = None,
                                Err(_) => {}
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                })
            })
            .collect();
        Poller {
            samples,
            stop,
            tasks,
        }
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub async fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }

    /// The last sample of `node`.
    pub fn last_of(&self, node: u64) -> Option<Sample> {
        self.samples().into_iter().rev().find(|s| s.node == node)
    }

    /// The leaders seen for each term: nodes that said they lead it, and
    /// the leader ids nodes reported in it.
    pub fn leaders_per_term(&self) -> BTreeMap<u64, BTreeSet<u64>> {
        let mut terms: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
        for s in self.samples() {
            if s.role == "leader" {
                terms.entry(s.term).or_default().insert(s.node);
            }
            if s.leader != 0 {
                terms.entry(s.term).or_default().insert(s.leader);
            }
        }
        terms
    }

    /// The first moment at or after `since` that a node other than `old`
    /// said it leads, and who.
    pub fn new_leader_after(&self, since: Instant, old: u64) -> Option<(Duration, u64, u64)> {
        self.samples()
            .into_iter()
            .filter(|s| s.at >= since && s.role == "leader" && s.node != old)
            .min_by_key(|s| s.at)
            .map(|s| (s.at - since, s.node, s.term))
    }
}

/// Requests through a data plane in a loop, counted.
pub struct Traffic {
    pub sent: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    /// The last few failures, for the report.
    pub failures: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    task: Option<JoinHandle<()>>,
}

impl Traffic {
    /// GETs `url` with `headers` every 20 ms; anything but `expect` fails.
    pub fn start(url: String, headers: Vec<(String, String)>, expect: u16) -> Traffic {
        let sent = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, f, fl, st) = (sent.clone(), failed.clone(), failures.clone(), stop.clone());
        let task = tokio::spawn(async move {
            while !st.load(Ordering::Relaxed) {
                let h: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let outcome = match get(&url, &h).await {
                    Ok(r) if r.status == expect => None,
                    Ok(r) => Some(format!("status {}", r.status)),
                    Err(e) => Some(format!("{e:#}")),
                };
                s.fetch_add(1, Ordering::Relaxed);
                if let Some(why) = outcome {
                    f.fetch_add(1, Ordering::Relaxed);
                    let mut fl = fl.lock().unwrap_or_else(|p| p.into_inner());
                    if fl.len() < 5 {
                        fl.push(why);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Traffic {
            sent,
            failed,
            failures,
            stop,
            task: Some(task),
        }
    }

    /// (sent, failed) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    pub async fn stop(&mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.counts()
    }
}

/// An upstream, a data plane watching every control-plane node, and a route
/// `/drill` to the upstream, served.
pub struct Edge {
    pub upstream: Upstream,
    pub dps: Vec<DataPlaneProc>,
    pub dir: tempfile::TempDir,
}

impl Edge {
    /// Starts `count` data planes and applies `extra_yaml` (top-level lists
    /// after `routes:`'s first entry are not allowed; give whole sections)
    /// besides the drill's own upstream and route.
    pub async fn start(cluster: &Cluster, count: usize, extra_yaml: &str) -> Result<Edge> {
        let upstream = Upstream::start("drill-app").await?;
        let dir = tempfile::tempdir()?;
        let cps: Vec<String> = cluster.nodes.iter().map(|n| n.admin.clone()).collect();
        let leader = cluster.leader().await?;
        let file = dir.path().join("edge.yaml");
        std::fs::write(
            &file,
            format!(
                "version: 1
upstreams:
  - name: drill-app
    targets: [{{ address: \"{}\" }}]
routes:
  - name: drill
    paths: [{{ prefix: /drill }}]
    upstream: drill-app
{extra_yaml}",
                upstream.addr
            ),
        )?;
        crate::apply(
            &cluster.node(leader).admin,
            file.to_str().expect("utf-8 path"),
        );
        let mut dps = Vec::new();
        for i in 0..count {
            dps.push(DataPlaneProc::start(
                &format!("dp-{}", i + 1),
                &cps,
                dir.path(),
            )?);
        }
        for dp in &dps {
            let url = format!("http://{}/drill/ready", dp.proxy);
            crate::eventually(
                Duration::from_secs(20),
                "the data plane serves /drill",
                || {
                    let url = url.clone();
                    async move { (get(&url, &[]).await.ok()?.status == 200).then_some(()) }
                },
            )
            .await?;
        }
        Ok(Edge { upstream, dps, dir })
    }
}

/// A drill's figures, printed at the end.
#[derive(Debug, Default)]
pub struct Figures {
    pub name: String,
    pub time_to_new_leader: Option<Duration>,
    pub writes_acked: u64,
    pub writes_unknown: u64,
    pub writes_lost: usize,
    pub reads_ok: u64,
    pub reads_failed: u64,
    pub dp_requests: u64,
    pub dp_failed: u64,
    pub terms: String,
    pub notes: Vec<String>,
}

impl Figures {
    pub fn print(&self) {
        eprintln!(
            "DRILL {}: time to new leader {}; admin writes acked {}, unknown outcome {}, lost {}; linearizable reads ok {}, failed {}; data-plane requests {}, failed {}; leaders per term {}",
            self.name,
            self.time_to_new_leader
                .map_or("n/a".to_string(), |d| format!("{} ms", d.as_millis())),
            self.writes_acked,
            self.writes_unknown,
            self.writes_lost,
            self.reads_ok,
            self.reads_failed,
            self.dp_requests,
            self.dp_failed,
            self.terms,
        );
        for note in &self.notes {
            eprintln!("DRILL {}:   {note}", self.name);
        }
    }
}

/// After the fault is lifted: stops the clients, reads every register once
/// more through the leader (into the history), waits for every running node
/// to apply the same index, and checks
///
/// - every running node holds the same value of every register,
/// - no acknowledged write is lost: every node's audit log has it at its
///   revision,
/// - the history is linearizable,
/// - no term had two leaders.
pub async fn finish(
    cluster: &Cluster,
    workload: &mut Workload,
    poller: &mut Poller,
    figures: &mut Figures,
) -> Result<()> {
    workload.stop().await;
    let leader = cluster.leader().await?;
    let client = connect(&cluster.node(leader).admin)
        .await
        .ok_or_else(|| anyhow!("connect to the leader"))?;
    let mut last: HashMap<String, Option<String>> = HashMap::new();
    for key in &workload.keys {
        // Right after a heal the leader may need a moment to hear from a quorum.
        let (call, v) = crate::eventually(
            Duration::from_secs(30),
            &format!("a linearizable read of {key}"),
            || async {
                let call = workload.history.now();
                match read(&mut client.clone(), key, false).await {
                    ReadResult::Value(v) => Some((call, v)),
                    ReadResult::Failed(why) => {
                        eprintln!("final read of {key}: {why}");
                        None
                    }
                }
            },
        )
        .await?;
        workload
            .history
            .ok(usize::MAX, key, Op::Read(v.clone()), call);
        last.insert(key.clone(), v);
    }
    let index = cluster.local_status(leader).await?.last_applied;
    cluster.converge(index).await?;
    poller.stop().await;

    let acked = workload
        .acked
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut lost = BTreeSet::new();
    for node in cluster.nodes.iter().filter(|n| n.is_running()) {
        let mut c = connect(&node.admin)
            .await
            .ok_or_else(|| anyhow!("connect to node {}", node.id))?;
        for key in &workload.keys {
            match read(&mut c, key, true).await {
                ReadResult::Value(v) => ensure!(
                    v == last[key],
                    "node {} holds {key} = {v:?}, the leader {:?}",
                    node.id,
                    last[key]
                ),
                ReadResult::Failed(why) => bail!("stale read of {key} on node {}: {why}", node.id),
            }
        }
        let audit = c
            .audit(pb::AuditRequest {
                kind: KIND.into(),
                limit: 100_000,
                stale: true,
                ..Default::default()
            })
            .await
            .map_err(|s| anyhow!("audit on node {}: {}", node.id, s.message()))?
            .into_inner();
        let by_revision: HashMap<u64, &str> = audit
            .records
            .iter()
            .map(|r| (r.revision, r.name.as_str()))
            .collect();
        for a in &acked {
            if by_revision.get(&a.revision) != Some(&a.key.as_str()) {
                lost.insert((a.revision, a.key.clone(), node.id));
            }
        }
    }
    figures.writes_lost = lost.len();
    let c = &workload.counts;
    figures.writes_acked = c.writes_acked.load(Ordering::Relaxed);
    figures.writes_unknown = c.writes_unknown.load(Ordering::Relaxed);
    figures.reads_ok = c.reads_ok.load(Ordering::Relaxed);
    figures.reads_failed = c.reads_failed.load(Ordering::Relaxed);
    let terms = poller.leaders_per_term();
    figures.terms = format!("{terms:?}");
    figures.print();

    // Every check, so that one failure does not hide another.
    let mut problems = Vec::new();
    if !lost.is_empty() {
        problems.push(format!(
            "acknowledged writes missing from audit logs (revision, key, node): {lost:?}"
        ));
    }
    let events = workload.history.events();
    if let Err(v) = check(&events) {
        problems.push(format!("{} operations: {v}", events.len()));
    }
    if figures.writes_acked == 0 || figures.reads_ok == 0 {
        problems.push("the drill did no work".into());
    }
    for (term, leaders) in &terms {
        if leaders.len() > 1 {
            problems.push(format!(
                "term {term} had {} leaders: {leaders:?}",
                leaders.len()
            ));
        }
    }
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}
