//! The metrics server: HTTP/1.1 on hyper, on a thread and runtime of its own.
//!
//! Any local user can connect to it, and the agent is root, so nothing a client does may cost
//! the agent more than a bounded share of one thread:
//! - at most [`Limits::max_connections`] connections are served at once; a new one beyond that
//!   evicts the oldest (idle connections cannot lock scrapes out, and the server never holds
//!   more file descriptors than the cap, whatever the agent's limit);
//! - headers must arrive within [`Limits::header_timeout`] and a whole exchange end within
//!   [`Limits::connection_timeout`] (slow clients are cut off); one request per connection;
//! - requests are bounded to [`Limits::max_request_bytes`] of head;
//! - an accept error that is not one connection's (EMFILE, ENFILE, ENOBUFS) pauses accepting,
//!   from 10 ms doubling to 1 s, instead of spinning on a listener that stays readable; out of
//!   descriptors, it also closes its oldest connection, so the next scrape gets one;
//! - rendering copies the accounting under its lock and renders outside it, so the agent's
//!   event loop waits at most for a copy.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, body::Bytes, header, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, task::JoinSet};

use super::render::{BuildInfo, render};
use crate::{
    accounting::Accounting,
    sys::{clock::monotonic_ns, process::ProcessStats},
};

/// What one client may cost.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub connection_timeout: Duration,
    /// The most a request's head may take (hyper's minimum is 8 KiB).
    pub max_request_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 32,
            header_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(10),
            max_request_bytes: 8192,
        }
    }
}

const PAUSE_MIN: Duration = Duration::from_millis(10);
const PAUSE_MAX: Duration = Duration::from_secs(1);
/// At most one warning per this long about accept errors or evictions.
const WARN_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot start the metrics server's runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot start the metrics server's thread")]
    Thread(#[source] std::io::Error),
    #[error("the metrics listener")]
    Listener(#[source] std::io::Error),
}

/// Serves `listener` on a new thread until the process exits; the address it serves on.
pub fn spawn(
    listener: std::net::TcpListener,
    accounting: Arc<Mutex<Accounting>>,
    limits: Limits,
) -> Result<SocketAddr, ServerError> {
    let addr = listener.local_addr().map_err(ServerError::Listener)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServerError::Runtime)?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(l) => serve(l, accounting, limits).await,
                    Err(e) => tracing::error!("metrics server stopped: {e}"),
                }
            });
        })
        .map_err(ServerError::Thread)?;
    Ok(addr)
}

/// Errors that concern one connection only: the next accept may well succeed.
fn connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED | libc::ECONNRESET | libc::EPROTO | libc::EPERM | libc::EINTR)
    )
}

/// A warning at most every [`WARN_EVERY`], with how many happened since the last one.
struct RateLimitedWarning {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedWarning {
    fn new() -> Self {
        Self {
            last: None,
            suppressed: 0,
        }
    }

    fn warn(&mut self, message: impl FnOnce(u64) -> String) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < WARN_EVERY)
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!("{}", message(self.suppressed));
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// Accepts and serves until the listener fails for good (never, short of the process ending).
pub async fn serve(listener: TcpListener, accounting: Arc<Mutex<Accounting>>, limits: Limits) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(false)
        .max_buf_size(limits.max_request_bytes.max(8192));
    let mut tasks: JoinSet<u64> = JoinSet::new();
    // Connection number -> its task, oldest first.
    let mut live: BTreeMap<u64, tokio::task::AbortHandle> = BTreeMap::new();
    let mut next = 0u64;
    let mut pause = PAUSE_MIN;
    let mut accept_warning = RateLimitedWarning::new();
    let mut evict_warning = RateLimitedWarning::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    pause = PAUSE_MIN;
                    while live.len() >= limits.max_connections {
                        let Some((_, oldest)) = live.pop_first() else { break };
                        oldest.abort();
                        evict_warning.warn(|more| format!(
                            "metrics: more than {} connections at once; closing the oldest \
                             ({more} more since the last warning)",
                            limits.max_connections
                        ));
                    }
                    let id = next;
                    next += 1;
                    let conn = builder.serve_connection(
                        TokioIo::new(stream),
                        service_fn({
                            let accounting = Arc::clone(&accounting);
                            move |req| {
                                let response = respond(&req, &accounting);
                                async move { Ok::<_, Infallible>(response) }
                            }
                        }),
                    );
                    let deadline = limits.connection_timeout;
                    let handle = tasks.spawn(async move {
                        // Errors are the client's (a reset, a timeout, a malformed request):
                        // nothing to do but drop the connection.
                        let _ = tokio::time::timeout(deadline, conn).await;
                        id
                    });
                    live.insert(id, handle);
                }
                Err(e) if connection_error(&e) => {}
                Err(e) => {
                    accept_warning.warn(|more| format!(
                        "metrics: cannot accept connections ({e}); pausing up to {PAUSE_MAX:?} \
                         between tries ({more} more since the last warning)"
                    ));
                    // Out of descriptors: give one of ours back (the oldest connection), so
                    // scrapes get through and the agent's own files can be opened.
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                        if let Some((_, oldest)) = live.pop_first() {
                            oldest.abort();
                        }
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(PAUSE_MAX);
                }
            },
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                // An evicted connection was taken out of `live` when it was aborted.
                if let Ok(id) = done {
                    live.remove(&id);
                }
            }
        }
    }
}

const LANDING: &str = "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>bridge-guard</title></head>\n\
<body><h1>bridge-guard</h1>\n<p>Keeps Linux bridges that carry VM traffic forwarding.</p>\n\
<p><a href=\"/metrics\">Metrics</a> (Prometheus text format)</p>\n</body></html>\n";

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

/// The metrics as of now, or why they cannot be had.
fn metrics(accounting: &Mutex<Accounting>) -> Result<String, &'static str> {
    // Held only for the copy: the agent's event loop takes this lock on every event.
    let copy = accounting
        .lock()
        .map_err(|_| "the agent's accounting is unusable: a panic happened while it was updated")?
        .clone();
    let now = monotonic_ns();
    let process = ProcessStats::read().ok();
    std::panic::catch_unwind(move || render(&copy, now, &BuildInfo::current(), process.as_ref()))
        .map_err(|_| "rendering the metrics failed (a bug: please report it)")
}

/// The response to one request. HEAD gets GET's headers without the body (hyper drops it).
pub fn respond<B>(req: &Request<B>, accounting: &Mutex<Accounting>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "only GET and HEAD\n".into(),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => match metrics(accounting) {
            Ok(body) => text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                body,
            ),
            Err(why) => {
                tracing::error!("metrics: {why}");
                text(StatusCode::INTERNAL_SERVER_ERROR, PLAIN, format!("{why}\n"))
            }
        },
        "/" => text(StatusCode::OK, "text/html; charset=utf-8", LANDING.into()),
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found: the metrics are on /metrics\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(method: Method, path: &str, acc: &Mutex<Accounting>) -> (StatusCode, String, String) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .expect("request");
        let r = respond(&req, acc);
        let ct = r
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let status = r.status();
        let body = futures::executor::block_on(http_body_util::BodyExt::collect(r.into_body()))
            .map(|c| String::from_utf8_lossy(&c.to_bytes()).into_owned())
            .unwrap_or_default();
        (status, ct, body)
    }

    #[test]
    fn routes() {
        let acc = Mutex::new(Accounting::new());
        let (s, ct, body) = get(Method::GET, "/metrics", &acc);
        assert_eq!(s, StatusCode::OK);
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        assert!(body.contains("bridge_guard_build_info{"), "{body}");
        assert!(body.contains("process_open_fds "), "{body}");
        let (s, ct, body) = get(Method::GET, "/", &acc);
        assert_eq!(s, StatusCode::OK);
        assert!(
            ct.starts_with("text/html") && body.contains("/metrics"),
            "{body}"
        );
        assert_eq!(get(Method::GET, "/nope", &acc).0, StatusCode::NOT_FOUND);
        assert_eq!(get(Method::HEAD, "/metrics", &acc).0, StatusCode::OK);
        assert_eq!(
            get(Method::POST, "/metrics", &acc).0,
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn a_poisoned_lock_is_a_500_not_an_empty_200() {
        let acc = Arc::new(Mutex::new(Accounting::new()));
        let poisoner = Arc::clone(&acc);
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.lock();
            panic!("poisoning the lock on purpose");
        })
        .join();
        assert!(acc.is_poisoned());
        let (s, _, body) = get(Method::GET, "/metrics", &acc);
        assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(body.contains("panic"), "{body}");
    }
}
