//! The admin API's capture endpoints: `GET /v1/capture` streams pcapng, `GET
//! /v1/capture/sessions` lists sessions and their counters. The control plane owns the HTTP
//! side and the daemon's names for ports; [`capture`](crate::capture) knows neither.
//!
//! A capture response is a chunked HTTP body that lasts as long as the session: a blocking
//! thread drains the session's queue into pcapng chunks and hands them to the body through a
//! small channel. The session ends when the count is reached, when the client goes away (the
//! body is dropped, which the thread notices on its next send or within its idle tick), or when
//! the daemon is asked to stop (the body ends, so a graceful shutdown does not wait for it).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use conf::api::{self, code, ApiError, CaptureQuery, CaptureSessionInfo, CaptureSessionsResponse};

use super::Daemon;
use crate::capture::stream::{Next, Stream};
use crate::capture::{Filter, Request, Selection, MAX_SNAPLEN, MIN_SNAPLEN};
use crate::pipeline::PortId;

/// How often an idle capture thread checks whether its client is still there.
const IDLE_TICK: Duration = Duration::from_millis(250);

/// A refused request: the status and the error to answer with.
struct Refused(StatusCode, ApiError);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

fn error(status: StatusCode, code: u32, msg: impl Into<String>) -> Refused {
    Refused(status, ApiError::new(code, msg, ""))
}

fn bad(msg: impl Into<String>) -> Refused {
    error(StatusCode::BAD_REQUEST, code::DECODE_FAILURE, msg)
}

/// `pod:NS/NAME` for a pod, `host:IFNAME` for the host port, `port:ID` otherwise.
fn port_name(names: &[(PortId, String)], port: PortId) -> String {
    names
        .iter()
        .find(|(p, _)| *p == port)
        .map(|(_, n)| n.clone())
        .unwrap_or_else(|| format!("port:{port}"))
}

/// `GET /v1/capture`: see [`api::PATH_CAPTURE`] for the query.
pub async fn capture(
    State(d): State<Arc<Daemon>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match start(d, &q) {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Opens the session the query asks for and starts streaming it.
fn start(d: Arc<Daemon>, q: &HashMap<String, String>) -> Result<Response, Refused> {
    let q = CaptureQuery::from_pairs(q.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .map_err(|e| bad(e.to_string()))?;
    let req = request(&q, &d.port_names())?;
    let count = req.count;
    let hub = d.capture();
    let (session, rx) = hub.open(req).map_err(|e| {
        error(
            StatusCode::TOO_MANY_REQUESTS,
            code::TRY_AGAIN_LATER,
            e.to_string(),
        )
    })?;
    let id = session.id;
    tracing::info!("capture session {id} started: {}", session.describe);
    let namer = Box::new(move |p: PortId| port_name(&d.port_names(), p));
    let (stream, head) = Stream::new(hub, session, rx, namer, count);
    let body_rx = drain(id, stream, head).map_err(|e| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            code::INTERNAL,
            format!("cannot start the capture thread: {e}"),
        )
    })?;
    let mut resp = Response::new(body(body_rx));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
        h.insert(api::CAPTURE_SESSION_HEADER, v);
    }
    Ok(resp)
}

/// The session a query asks for, or the error response that says what is wrong with it.
fn request(q: &CaptureQuery, names: &[(PortId, String)]) -> Result<Request, Refused> {
    let port = match (q.port, &q.pod) {
        (Some(_), Some(_)) => return Err(bad("give pod= or port=, not both")),
        (port, None) => port,
        (None, Some(pod)) => Some(pod_port(names, pod)?),
    };
    let (point, direction) = (q.point.as_deref(), q.direction.as_deref());
    let sel = Selection::parse(
        point.unwrap_or_default(),
        direction.unwrap_or_default(),
        port,
    )
    .map_err(|e| bad(e.to_string()))?;
    let filter = match q.filter.as_deref() {
        None => None,
        Some(f) => Some(Filter::parse(f).map_err(|e| bad(e.to_string()))?),
    };
    let snaplen = match q.snaplen {
        None | Some(0) => MAX_SNAPLEN,
        Some(n) if (MIN_SNAPLEN..=MAX_SNAPLEN).contains(&n) => n,
        Some(n) => {
            return Err(bad(format!(
            "snaplen={n} is out of range: {MIN_SNAPLEN}..={MAX_SNAPLEN}, or 0 for the whole packet"
        )))
        }
    };
    let default_point = if port.is_some() { "pod" } else { "all" };
    let mut describe = vec![format!("point={}", point.unwrap_or(default_point))];
    if let Some(p) = port {
        describe.push(format!("port={p} ({})", port_name(names, p)));
    }
    if let Some(d) = direction {
        describe.push(format!("direction={d}"));
    }
    if let Some(f) = &filter {
        describe.push(format!("filter={f}"));
    }
    Ok(Request {
        sel,
        filter,
        snaplen,
        count: q.count,
        describe: describe.join(" "),
    })
}

/// The port of a pod (`NAMESPACE/NAME`, or `NAME` in `default`) on this node.
fn pod_port(names: &[(PortId, String)], pod: &str) -> Result<PortId, Refused> {
    let want = if pod.contains('/') {
        format!("pod:{pod}")
    } else {
        format!("pod:default/{pod}")
    };
    match names.iter().find(|(_, n)| *n == want) {
        Some((p, _)) => Ok(*p),
        None => Err(error(
            StatusCode::NOT_FOUND,
            code::UNKNOWN_CONTAINER,
            format!("no pod {} on this node", &want[4..]),
        )),
    }
}

/// A blocking thread that drains the session into pcapng chunks (`head` first) for the body,
/// until the session ends or the body is dropped.
fn drain(
    id: u64,
    mut stream: Stream,
    head: Vec<u8>,
) -> std::io::Result<tokio::sync::mpsc::Receiver<Vec<u8>>> {
    let (tx, body_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    std::thread::Builder::new()
        .name(format!("capture-{id}"))
        .spawn(move || {
            if tx.blocking_send(head).is_err() {
                return;
            }
            loop {
                match stream.next(IDLE_TICK) {
                    Next::Data(b) => {
                        if tx.blocking_send(b).is_err() {
                            break;
                        }
                    }
                    Next::Idle => {
                        if tx.is_closed() {
                            break;
                        }
                    }
                    Next::End(b) => {
                        let _ = tx.blocking_send(b);
                        break;
                    }
                }
            }
            tracing::info!("capture session {id} ended");
        })?;
    Ok(body_rx)
}

/// The chunked response body: the drained chunks, ended early when the daemon is asked to stop.
fn body(rx: tokio::sync::mpsc::Receiver<Vec<u8>>) -> Body {
    struct BodyState {
        rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
        stop: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    }
    let state = BodyState {
        rx,
        stop: shutdown_signals(),
    };
    let body = futures::stream::unfold(state, |mut s| async move {
        let chunk = tokio::select! {
            b = s.rx.recv() => b,
            _ = s.stop.as_mut() => None,
        };
        chunk.map(|b| (Ok::<Bytes, std::io::Error>(Bytes::from(b)), s))
    });
    Body::from_stream(body)
}

/// Resolves when the daemon is asked to stop (SIGTERM or SIGINT), as its own shutdown does.
fn shutdown_signals() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    use tokio::signal::unix::{signal, SignalKind};
    Box::pin(async {
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    })
}

/// `GET /v1/capture/sessions`.
pub async fn sessions(State(d): State<Arc<Daemon>>) -> Json<CaptureSessionsResponse> {
    let sessions = d
        .capture()
        .summaries()
        .into_iter()
        .map(|s| CaptureSessionInfo {
            id: s.id,
            request: s.describe,
            running: s.running,
            matched: s.matched,
            dropped: s.dropped,
            written: s.written,
        })
        .collect();
    Json(CaptureSessionsResponse { sessions })
}
