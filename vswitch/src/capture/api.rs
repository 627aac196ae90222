//! The admin API's capture endpoints: `GET /v1/capture` streams pcapng, `GET
//! /v1/capture/sessions` lists sessions and their counters.
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
use conf::api::{self, code, ApiError, CaptureSessionInfo, CaptureSessionsResponse};

use super::stream::{Next, Stream};
use super::{Filter, Request, Selection, MAX_SNAPLEN, MIN_SNAPLEN};
use crate::control::Daemon;
use crate::pipeline::PortId;

/// How often an idle capture thread checks whether its client is still there.
const IDLE_TICK: Duration = Duration::from_millis(250);

fn error(status: StatusCode, code: u32, msg: impl Into<String>) -> Response {
    (status, Json(ApiError::new(code, msg, ""))).into_response()
}

fn bad(msg: impl Into<String>) -> Response {
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
    let get = |k: &str| q.get(k).map(String::as_str).unwrap_or_default();
    let names = d.port_names();
    let mut port: Option<PortId> = match q.get("port").map(|p| p.parse::<PortId>()) {
        None => None,
        Some(Ok(p)) => Some(p),
        Some(Err(_)) => return bad(format!("port={:?} is not a port number", get("port"))),
    };
    if let Some(pod) = q.get("pod").filter(|p| !p.is_empty()) {
        if port.is_some() {
            return bad("give pod= or port=, not both");
        }
        let want = if pod.contains('/') {
            format!("pod:{pod}")
        } else {
            format!("pod:default/{pod}")
        };
        match names.iter().find(|(_, n)| *n == want) {
            Some((p, _)) => port = Some(*p),
            None => {
                return error(
                    StatusCode::NOT_FOUND,
                    code::UNKNOWN_CONTAINER,
                    format!("no pod {} on this node", &want[4..]),
                )
            }
        }
    }
    let sel = match Selection::parse(get("point"), get("direction"), port) {
        Ok(s) => s,
        Err(e) => return bad(e.to_string()),
    };
    let filter = match get("filter").trim() {
        "" => None,
        f => match Filter::parse(f) {
            Ok(f) => Some(f),
            Err(e) => return bad(e.to_string()),
        },
    };
    let count = match q.get("count").map(|c| c.parse::<u64>()) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(_)) => return bad(format!("count={:?} is not a number", get("count"))),
    };
    let snaplen = match q.get("snaplen").map(|c| c.parse::<usize>()) {
        None => MAX_SNAPLEN,
        Some(Ok(0)) => MAX_SNAPLEN,
        Some(Ok(n)) if (MIN_SNAPLEN..=MAX_SNAPLEN).contains(&n) => n,
        Some(Ok(n)) => {
            return bad(format!(
            "snaplen={n} is out of range: {MIN_SNAPLEN}..={MAX_SNAPLEN}, or 0 for the whole packet"
        ))
        }
        Some(Err(_)) => return bad(format!("snaplen={:?} is not a number", get("snaplen"))),
    };
    let mut describe = vec![format!(
        "point={}",
        if get("point").is_empty() {
            if port.is_some() {
                "pod"
            } else {
                "all"
            }
        } else {
            get("point")
        }
    )];
    if let Some(p) = port {
        describe.push(format!("port={p} ({})", port_name(&names, p)));
    }
    if !get("direction").is_empty() {
        describe.push(format!("direction={}", get("direction")));
    }
    if let Some(f) = &filter {
        describe.push(format!("filter={f}"));
    }
    let hub = d.capture();
    let (session, rx) = match hub.open(Request {
        sel,
        filter,
        snaplen,
        count,
        describe: describe.join(" "),
    }) {
        Ok(s) => s,
        Err(e) => {
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                code::TRY_AGAIN_LATER,
                e.to_string(),
            )
        }
    };
    let id = session.id;
    tracing::info!("capture session {id} started: {}", session.describe);
    let namer_daemon = d.clone();
    let namer = Box::new(move |p: PortId| port_name(&namer_daemon.port_names(), p));
    let (mut stream, head) = Stream::new(hub, session, rx, namer, count);
    let (tx, body_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
    let spawned = std::thread::Builder::new()
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
        });
    if let Err(e) = spawned {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            code::INTERNAL,
            format!("cannot start the capture thread: {e}"),
        );
    }
    struct BodyState {
        rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
        stop: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    }
    let state = BodyState {
        rx: body_rx,
        stop: shutdown_signals(),
    };
    let body = futures::stream::unfold(state, |mut s| async move {
        let chunk = tokio::select! {
            b = s.rx.recv() => b,
            _ = s.stop.as_mut() => None,
        };
        chunk.map(|b| (Ok::<Bytes, std::io::Error>(Bytes::from(b)), s))
    });
    let mut resp = Response::new(Body::from_stream(body));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&id.to_string()) {
        h.insert(api::CAPTURE_SESSION_HEADER, v);
    }
    resp
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
