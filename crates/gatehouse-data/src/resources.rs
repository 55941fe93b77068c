//! Resource limits of a data plane: how many connections and requests it
//! takes at once, how long a client may take to send its headers and its
//! body, and how many streams (and stream resets) an HTTP/2 connection may
//! cost. Together they keep one client, or many slow ones, from holding
//! what other clients need.
//!
//! | limit | what happens at the limit |
//! |---|---|
//! | `max_connections` (per listener) | a new connection is closed at once |
//! | `max_requests_in_flight` (the whole data plane) | 503 `overloaded` with `Retry-After: 1` (load shedding) |
//! | `header_read_timeout` | the connection is closed: no first request (any protocol), or an HTTP/1.1 request head not complete, within it |
//! | `body_read_timeout` | no body bytes for this long: 408 `request-timeout` (or the upstream call is cut) |
//! | `h2_max_concurrent_streams` | advertised in SETTINGS; streams past it are refused by the protocol |
//! | `h2_max_pending_accept_reset_streams` | streams the client resets before the gateway takes them (rapid reset): GOAWAY `ENHANCE_YOUR_CALM`, connection closed |
//! | `h2_max_local_error_reset_streams` | streams the gateway had to reset for protocol errors: GOAWAY, connection closed |

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::proxy::BoxError;

/// The resource limits of a data plane's listeners and requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Open connections per listener; more are closed at once.
    pub max_connections: usize,
    /// Requests being served at once, across listeners; more get 503.
    pub max_requests_in_flight: usize,
    /// Time for a connection's first request, and for each HTTP/1.1 request head.
    pub header_read_timeout: Duration,
    /// Longest wait for the next piece of a request body.
    pub body_read_timeout: Duration,
    /// Concurrent streams an HTTP/2 client may open on one connection.
    pub h2_max_concurrent_streams: u32,
    /// Streams reset by the client before they were served, per connection,
    /// before the connection is closed (HTTP/2 rapid reset, CVE-2023-44487).
    pub h2_max_pending_accept_reset_streams: usize,
    /// Streams the gateway reset because of the client's protocol errors,
    /// per connection, before the connection is closed (CVE-2025-8671).
    pub h2_max_local_error_reset_streams: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_requests_in_flight: 4_096,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            h2_max_concurrent_streams: 100,
            h2_max_pending_accept_reset_streams: 20,
            h2_max_local_error_reset_streams: 256,
        }
    }
}

/// A request body that fails with [`BodyTimedOut`] when no frame arrives
/// within its timeout (from the start, then from each frame).
pub struct TimeoutBody<B> {
    inner: B,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl<B> TimeoutBody<B> {
    pub fn new(inner: B, timeout: Duration) -> TimeoutBody<B> {
        TimeoutBody {
            inner,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

/// The error of a [`TimeoutBody`] whose client stopped sending.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
pub struct BodyTimedOut;

impl<B> Body for TimeoutBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let next = Instant::now() + this.timeout;
                this.sleep.as_mut().reset(next);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimedOut)))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether `e`, or an error it was caused by, is `T`.
pub fn caused_by<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.is::<T>() {
            return true;
        }
        cause = c.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_fails_after_the_timeout_and_a_steady_one_does_not() {
        // Frames 4 s apart under a 5 s timeout arrive whole.
        let steady = futures::stream::unfold(0, |n| async move {
            if n == 3 {
                return None;
            }
            tokio::time::sleep(Duration::from_secs(4)).await;
            Some((
                Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"x"))),
                n + 1,
            ))
        });
        let body = TimeoutBody::new(StreamBody::new(Box::pin(steady)), Duration::from_secs(5));
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"xxx");

        // One frame, then silence: the timeout counts from the last frame.
        let stalls = futures::stream::unfold(0, |n| async move {
            if n == 1 {
                std::future::pending::<()>().await;
            }
            Some((
                Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"x"))),
                n + 1,
            ))
        });
        let start = Instant::now();
        let mut body = TimeoutBody::new(StreamBody::new(Box::pin(stalls)), Duration::from_secs(5));
        assert!(body.frame().await.unwrap().is_ok());
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(caused_by::<BodyTimedOut>(err.as_ref()));
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }
}
