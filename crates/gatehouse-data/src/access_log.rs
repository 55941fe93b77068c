//! The access log: one JSON line per proxied request, written off the hot
//! path.
//!
//! A request hands its [`Entry`] to a bounded channel with `try_send` and
//! moves on; one writer thread serialises the entries and writes them to
//! stdout or a file, flushing whenever the channel runs empty. When the
//! writer falls behind and the channel is full, the line is dropped and
//! counted in `gatehouse_access_log_dropped_total` rather than making the
//! request wait.
//!
//! No line carries a credential: the path is the canonical path without the
//! query string (a query may hold an API key, and which parameters are
//! secrets depends on each policy), and no header value is logged at all.

use std::fmt;
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::sync::mpsc;

/// Lines that may wait for the writer before new ones are dropped.
const QUEUE: usize = 16 * 1024;

/// Where access-log lines go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum AccessLogTarget {
    /// No access log.
    #[default]
    Off,
    /// Standard output, one line per request (beside the `ready` line).
    Stdout,
    /// A file, appended to (created with mode 0640 when missing).
    File(PathBuf),
}

impl FromStr for AccessLogTarget {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "off" | "" => AccessLogTarget::Off,
            "stdout" | "-" => AccessLogTarget::Stdout,
            path => AccessLogTarget::File(PathBuf::from(path)),
        })
    }
}

impl fmt::Display for AccessLogTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccessLogTarget::Off => f.write_str("off"),
            AccessLogTarget::Stdout => f.write_str("stdout"),
            AccessLogTarget::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Why the access log could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the access log {path}")]
pub struct OpenError {
    pub path: String,
    pub source: std::io::Error,
}

/// What one line says about one request. Every field is something the
/// gateway decided or measured; nothing is copied from request headers.
#[derive(Debug, Serialize)]
pub struct Entry {
    /// When the request arrived, RFC 3339 UTC (formatted by the writer).
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    /// The matched route, or null when none matched.
    pub route: Option<Arc<String>>,
    /// The authenticated consumer, or null.
    pub consumer: Option<String>,
    /// The client address (from trusted proxies' headers when the route's
    /// policy trusts the peer).
    pub client_ip: IpAddr,
    #[serde(serialize_with = "method")]
    pub method: http::Method,
    /// The canonical path, without the query string; null when the path
    /// could not be read (a 400).
    pub path: Option<String>,
    pub status: u16,
    /// Response body bytes sent to the client.
    pub bytes_out: u64,
    /// The request's declared Content-Length, or null (chunked or none).
    pub bytes_in: Option<u64>,
    /// From sending the request upstream to its response headers (across
    /// retries), in milliseconds; null when no upstream was called.
    pub upstream_ms: Option<f64>,
    /// From the request's arrival to the end of the response body, in
    /// milliseconds.
    pub total_ms: f64,
    /// `allowed` or `limited` when the route's policy has rate limits.
    pub limit: Option<&'static str>,
    /// The W3C trace id sent upstream (or of the incoming `traceparent`).
    pub trace_id: Option<String>,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

fn method<S: serde::Serializer>(m: &http::Method, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(m.as_str())
}

/// The sending side of the access log; cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    tx: mpsc::Sender<Entry>,
    dropped: Counter,
    /// Lines queued and not yet written and flushed.
    pending: Arc<AtomicUsize>,
}

impl fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessLog")
    }
}

impl AccessLog {
    /// Opens `target` and starts its writer thread; `None` when off.
    /// `dropped` counts lines lost to a full queue or a failed writer.
    pub fn start(
        target: &AccessLogTarget,
        dropped: Counter,
    ) -> Result<Option<AccessLog>, OpenError> {
        let out: Box<dyn Write + Send> = match target {
            AccessLogTarget::Off => return Ok(None),
            AccessLogTarget::Stdout => Box::new(std::io::stdout()),
            AccessLogTarget::File(path) => Box::new(open(path).map_err(|source| OpenError {
                path: path.display().to_string(),
                source,
            })?),
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer_dropped = dropped.clone();
        let pending = Arc::new(AtomicUsize::new(0));
        let writer_pending = pending.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, out, writer_dropped, &writer_pending))
            .map_err(|source| OpenError {
                path: target.to_string(),
                source,
            })?;
        Ok(Some(AccessLog {
            tx,
            dropped,
            pending,
        }))
    }

    /// Queues one line; never waits.
    pub fn send(&self, entry: Entry) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        if self.tx.try_send(entry).is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            self.dropped.inc();
        }
    }

    /// Waits, up to `limit`, until every queued line is written and
    /// flushed: at shutdown, so the last requests' lines are not lost.
    pub async fn drain(&self, limit: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.pending.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}

fn open(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o640);
    }
    options.open(path)
}

/// The writer thread: serialises and writes until every sender is gone.
fn write_lines(
    mut rx: mpsc::Receiver<Entry>,
    out: Box<dyn Write + Send>,
    dropped: Counter,
    pending: &AtomicUsize,
) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut line = Vec::with_capacity(512);
    let mut broken = false;
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        let mut batch = 0;
        while let Some(entry) = next {
            batch += 1;
            line.clear();
            let written = serde_json::to_writer(&mut line, &entry).is_ok() && {
                line.push(b'\n');
                !broken && out.write_all(&line).is_ok()
            };
            if !written {
                dropped.inc();
                if !broken {
                    broken = true;
                    tracing::error!(
                        "the access log cannot be written; lines are dropped and counted"
                    );
                }
            }
            next = rx.try_recv().ok();
        }
        // The queue is empty: make what was written visible.
        if !broken && out.flush().is_err() {
            broken = true;
            tracing::error!("the access log cannot be written; lines are dropped and counted");
        }
        pending.fetch_sub(batch, Ordering::SeqCst);
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            time: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123),
            route: Some(Arc::new("billing".into())),
            consumer: Some("alice".into()),
            client_ip: "192.0.2.7".parse().unwrap(),
            method: http::Method::POST,
            path: Some("/billing/invoices".into()),
            status: 201,
            bytes_out: 42,
            bytes_in: Some(7),
            upstream_ms: Some(1.5),
            total_ms: 2.25,
            limit: Some("allowed"),
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
        }
    }

    #[test]
    fn an_entry_is_one_json_object_with_every_field() {
        let line = serde_json::to_string(&entry()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["route"], "billing");
        assert_eq!(v["consumer"], "alice");
        assert_eq!(v["client_ip"], "192.0.2.7");
        assert_eq!(v["method"], "POST");
        assert_eq!(v["path"], "/billing/invoices");
        assert_eq!(v["status"], 201);
        assert_eq!(v["bytes_out"], 42);
        assert_eq!(v["bytes_in"], 7);
        assert_eq!(v["upstream_ms"], 1.5);
        assert_eq!(v["total_ms"], 2.25);
        assert_eq!(v["limit"], "allowed");
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn targets_parse() {
        assert_eq!(
            "off".parse::<AccessLogTarget>().unwrap(),
            AccessLogTarget::Off
        );
        assert_eq!(
            "stdout".parse::<AccessLogTarget>().unwrap(),
            AccessLogTarget::Stdout
        );
        assert_eq!(
            "/var/log/gh.log".parse::<AccessLogTarget>().unwrap(),
            AccessLogTarget::File("/var/log/gh.log".into())
        );
    }

    #[test]
    fn lines_reach_the_file_and_a_full_queue_counts_drops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let dropped = Counter::default();
        let log = AccessLog::start(&AccessLogTarget::File(path.clone()), dropped.clone())
            .unwrap()
            .unwrap();
        log.send(entry());
        log.send(entry());
        // Both lines are on disk once drained.
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(log.drain(std::time::Duration::from_secs(10)));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert_eq!(dropped.get(), 0);

        // A full queue drops and counts rather than waiting.
        let (tx, _stalled) = mpsc::channel(1);
        let full = AccessLog {
            tx,
            dropped: dropped.clone(),
            pending: Arc::default(),
        };
        full.send(entry());
        assert_eq!(dropped.get(), 0);
        full.send(entry());
        assert_eq!(dropped.get(), 1);

        // So does a sender whose writer is gone.
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let gone = AccessLog {
            tx,
            dropped: dropped.clone(),
            pending: Arc::default(),
        };
        gone.send(entry());
        assert_eq!(dropped.get(), 2);
    }
}
