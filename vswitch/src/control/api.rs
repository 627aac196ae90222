//! The admin API: HTTP/JSON on a unix socket, mode 0600.
//!
//! Handlers hand each operation to a blocking thread (`Daemon` operations do namespace and file
//! work) and map [`ApiError`] codes to HTTP statuses. Only root can talk to the socket; the
//! CNI plugin, `vswitchctl` and the lab are its clients.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use conf::api::{self, code, ApiError};

use super::Daemon;

struct Failure(ApiError);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = match self.0.code {
            code::INVALID_ENV
            | code::DECODE_FAILURE
            | code::INVALID_NETCONF
            | code::UNSUPPORTED_FIELD
            | code::INCOMPATIBLE_VERSION => StatusCode::BAD_REQUEST,
            code::UNKNOWN_CONTAINER => StatusCode::NOT_FOUND,
            code::INTERFACE_EXISTS | code::REQUESTED_UNAVAILABLE => StatusCode::CONFLICT,
            code::CHECK_FAILED => StatusCode::PRECONDITION_FAILED,
            code::ADDRESSES_EXHAUSTED => StatusCode::INSUFFICIENT_STORAGE,
            code::TRY_AGAIN_LATER => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, Json(self.0)).into_response()
    }
}

type Reply<T> = Result<Json<T>, Failure>;

fn body<T>(req: Result<Json<T>, JsonRejection>) -> Result<T, Failure> {
    req.map(|Json(t)| t).map_err(|e| {
        Failure(ApiError::new(
            code::DECODE_FAILURE,
            "cannot decode request",
            e.body_text(),
        ))
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Reply<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(t)) => Ok(Json(t)),
        Ok(Err(e)) => Err(Failure(e)),
        Err(e) => Err(Failure(ApiError::new(
            code::INTERNAL,
            "internal error",
            e.to_string(),
        ))),
    }
}

#[derive(serde::Serialize)]
struct Empty {}

type D = State<Arc<Daemon>>;
type JsonBody<T> = Result<Json<T>, JsonRejection>;

/// A daemon operation on the request's JSON body, run off the async threads.
async fn call<Q: Send + 'static, T: Send + 'static>(
    d: Arc<Daemon>,
    req: JsonBody<Q>,
    op: fn(&Daemon, Q) -> Result<T, ApiError>,
) -> Reply<T> {
    let req = body(req)?;
    handed_over(&d)?;
    blocking(move || op(&d, req)).await
}

/// A read of the daemon's state, run off the async threads.
async fn read<T: Send + 'static>(d: Arc<Daemon>, op: fn(&Daemon) -> T) -> Reply<T> {
    handed_over(&d)?;
    blocking(move || Ok(op(&d))).await
}

/// A vswitchd that has handed its node over answers nothing more (its datapath is stopped,
/// and a status from it would hold the caller for the workers it no longer has): the caller
/// tries again, and reaches the new vswitchd on the same socket path.
fn handed_over(d: &Daemon) -> Result<(), Failure> {
    if d.handover.handed_over() {
        return Err(Failure(ApiError::new(
            code::TRY_AGAIN_LATER,
            "this vswitchd has handed the node over to a new one: try again",
            "",
        )));
    }
    Ok(())
}

pub fn router(d: Arc<Daemon>) -> Router {
    Router::new()
        .route(
            api::PATH_CNI_ADD,
            post(|State(d): D, r: JsonBody<api::AddRequest>| call(d, r, Daemon::add)),
        )
        .route(
            api::PATH_CNI_DEL,
            post(|State(d): D, r: JsonBody<api::DelRequest>| {
                call(d, r, |d, r| d.del(r).map(|()| Empty {}))
            }),
        )
        .route(
            api::PATH_CNI_CHECK,
            post(|State(d): D, r: JsonBody<api::CheckRequest>| call(d, r, Daemon::check)),
        )
        .route(
            api::PATH_CNI_GC,
            post(|State(d): D, r: JsonBody<api::GcRequest>| call(d, r, Daemon::gc)),
        )
        .route(api::PATH_STATUS, get(|State(d): D| read(d, Daemon::status)))
        .route(api::PATH_PORTS, get(|State(d): D| read(d, Daemon::ports)))
        .route(
            api::PATH_PEERS,
            get(|State(d): D| read(d, Daemon::peers)).post(
                |State(d): D, r: JsonBody<conf::config::PeerSpec>| call(d, r, Daemon::set_peer),
            ),
        )
        .route(
            api::PATH_TRACE,
            post(|State(d): D, r: JsonBody<api::TraceRequest>| call(d, r, Daemon::trace)),
        )
        .route(
            api::PATH_SERVICES,
            get(|State(d): D| read(d, Daemon::services)),
        )
        .route(api::PATH_CONNTRACK, get(conntrack))
        .route(
            api::PATH_EGRESS,
            get(|State(d): D| async move { blocking(move || Ok(d.egress())).await }),
        )
        .route(api::PATH_POLICIES, get(policies))
        .route(api::PATH_KUBERNETES, get(kubernetes))
        .route(api::PATH_HANDOVER_TABLES, get(super::handover::tables))
        .route(
            api::PATH_HANDOVER,
            post(|s: D, b: axum::body::Bytes| async move {
                super::handover::handle(s, b).await.map_err(Failure)
            }),
        )
        .route("/v1/ports/{id}", delete(release_port))
        .route(
            "/v1/peers/{name}",
            delete(|State(d): D, Path(name): Path<String>| async move {
                blocking(move || d.remove_peer(&name)).await
            }),
        )
        .route(api::PATH_CAPTURE, get(super::capture_api::capture))
        .route(
            api::PATH_CAPTURE_SESSIONS,
            get(super::capture_api::sessions),
        )
        .with_state(d)
}

/// `GET /v1/conntrack?ip=&port=`.
async fn conntrack(
    State(d): D,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Reply<api::ConntrackResponse> {
    let bad = |msg: &str| Failure(ApiError::new(code::DECODE_FAILURE, msg, ""));
    let ip = match q.get("ip").map(|s| s.parse::<std::net::IpAddr>()) {
        Some(Ok(ip)) => Some(ip),
        Some(Err(_)) => return Err(bad("ip= is not an IP address")),
        None => None,
    };
    let port = match q.get("port").map(|s| s.parse::<u16>()) {
        Some(Ok(p)) => Some(p),
        Some(Err(_)) => return Err(bad("port= is not a port number")),
        None => None,
    };
    blocking(move || Ok(d.conntrack(ip, port))).await
}

/// `GET /v1/policies?pod=NS/NAME`.
async fn policies(
    State(d): D,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Reply<api::PoliciesResponse> {
    let pod = q.get("pod").cloned();
    blocking(move || d.policies(pod.as_deref())).await
}

/// `GET /v1/kubernetes?since_ms=`.
async fn kubernetes(
    State(d): D,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Reply<api::KubernetesResponse> {
    let since = match q.get("since_ms").map(|s| s.parse::<u64>()) {
        None => 0,
        Some(Ok(t)) => t,
        Some(Err(_)) => {
            return Err(Failure(ApiError::new(
                code::DECODE_FAILURE,
                "since_ms: milliseconds since the Unix epoch",
                "",
            )))
        }
    };
    match d.k8s_stats.get() {
        Some(k) => Ok(Json(k.kubernetes(since))),
        None => Err(Failure(ApiError::new(
            code::UNKNOWN_CONTAINER,
            "Kubernetes mode is off ([kubernetes] enabled = false)",
            "",
        ))),
    }
}

/// `DELETE /v1/ports/{id}`.
async fn release_port(State(d): D, Path(id): Path<String>) -> Reply<api::PortInfo> {
    let Ok(id) = id.parse::<u32>() else {
        return Err(Failure(ApiError::new(
            code::DECODE_FAILURE,
            format!("{id:?} is not a port number"),
            "",
        )));
    };
    blocking(move || d.release_port(id)).await
}

/// Binds the admin socket: the directory is created, a stale socket replaced, and the socket
/// is made 0600 before anyone can connect (the umask is narrowed around bind).
pub fn bind(path: &std::path::Path) -> io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = std::os::unix::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(listener)
}
