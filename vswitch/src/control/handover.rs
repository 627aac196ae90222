//! Handing a node over to a new vswitchd: an upgrade or restart without an outage.
//!
//! What a node's traffic needs outlives the process: pods' TAP devices and the host port are
//! persistent, the attachments are on disk, and Maglev picks the same backend for a Service
//! connection in any process with the same endpoints. So a new vswitchd only has to wait for the
//! old one to let go of what a device or socket allows one holder of: the datapath's queues and
//! the VXLAN socket, the NodePort listeners, the DNS-over-TCP listener and the metrics address.
//! It asks over the admin socket (`POST /v1/handover`) before it touches anything; the old one stops its datapath,
//! closes those, answers, and exits. The gap in forwarding is the old datapath's stop plus the
//! new one's start, tens of milliseconds; no packet is rewritten by a process that is not
//! forwarding.
//!
//! In Kubernetes mode the new vswitchd first reads the peers and Services the old one forwards
//! with (`GET /v1/handover/tables`, while the old one still forwards, so their size does not
//! lengthen the gap) and starts forwarding with them (as with a config file's, until its first
//! lists from the API are applied), so no packet to another node or a Service waits for those
//! lists.
//! NetworkPolicy is not handed over: until the new vswitchd's first policy lists, new
//! connections are not judged (established ones stay tracked).
//!
//! With the DaemonSet's `maxSurge: 1` rolling update the new pod starts beside the old one and
//! takes over the same way. A vswitchd that finds no live process on the socket (a stale file,
//! or nothing) starts as before.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::Json;
use conf::api::{
    code, ApiError, ClusterTables, HandoverResponse, PATH_HANDOVER, PATH_HANDOVER_TABLES,
};
use conf::client::{Client, ClientError};
use tokio::task::JoinHandle;

use super::Daemon;

/// How long a new vswitchd waits for the old one to let go.
const WAIT: Duration = Duration::from_secs(30);

/// The running process's side of a handover.
pub struct Handover {
    /// The metrics listener, closed before answering so the new process can bind its address.
    metrics: Mutex<Option<JoinHandle<()>>>,
    handed: AtomicBool,
    /// Set once the node is handed over: the admin server stops and the process exits.
    done: tokio::sync::watch::Sender<bool>,
}

impl Default for Handover {
    fn default() -> Self {
        Handover {
            metrics: Mutex::new(None),
            handed: AtomicBool::new(false),
            done: tokio::sync::watch::channel(false).0,
        }
    }
}

impl Handover {
    /// Returns once the node has been handed over (never, if it is not).
    pub async fn done(&self) {
        let mut rx = self.done.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    pub fn set_metrics(&self, task: JoinHandle<()>) {
        *self.metrics.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
    }

    /// Whether this process has handed the node over (and refuses work that needs the
    /// datapath).
    pub fn handed_over(&self) -> bool {
        self.handed.load(Ordering::Acquire)
    }
}

/// `POST /v1/handover`: stops the datapath and lets go of the node's devices and sockets, then
/// answers; the process stops serving its admin socket and idles until stopped.
pub async fn handle(
    State(d): State<Arc<Daemon>>,
    // Read, though empty: a connection closed with the request's body unread is reset, and the
    // new vswitchd would lose the answer.
    _body: axum::body::Bytes,
) -> Result<Json<HandoverResponse>, ApiError> {
    if d.handover.handed.swap(true, Ordering::AcqRel) {
        return Err(ApiError::new(
            code::TRY_AGAIN_LATER,
            "this vswitchd has already handed the node over",
            "",
        ));
    }
    let started = Instant::now();
    tracing::info!("a new vswitchd takes this node over: letting go of its devices and sockets");
    let metrics = d
        .handover
        .metrics
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(task) = metrics {
        task.abort();
        let _ = task.await;
    }
    d.stop_nodeports().await;
    d.stop_dns_tcp().await;
    let dd = d.clone();
    if let Err(e) = tokio::task::spawn_blocking(move || dd.shutdown()).await {
        tracing::error!("stopping the datapath for the handover: {e}");
    }
    let released_ms = started.elapsed().as_millis() as u64;
    tracing::info!("node handed over in {released_ms} ms");
    d.handover.done.send_replace(true);
    Ok(Json(HandoverResponse {
        pid: std::process::id(),
        released_ms,
    }))
}

/// `GET /v1/handover/tables`: the peers and Services this vswitchd forwards with.
pub async fn tables(State(d): State<Arc<Daemon>>) -> Json<ClusterTables> {
    let (peers, services) = d.cluster_tables();
    Json(ClusterTables { peers, services })
}

/// The peers and Services of the vswitchd running on `socket`, read before taking the node
/// over; None when none answers (nothing to take over, or one that predates this request).
pub fn read_tables(socket: &Path) -> Option<ClusterTables> {
    if !socket.exists() {
        return None;
    }
    let client = Client::new(socket).with_timeout(WAIT);
    match client.get::<ClusterTables>(PATH_HANDOVER_TABLES) {
        Ok(t) => Some(t),
        Err(ClientError::Connect { .. }) => None,
        Err(e) => {
            tracing::warn!("the vswitchd on {} gave no tables ({e})", socket.display());
            None
        }
    }
}

/// Asks a vswitchd running on `socket` to hand the node over, before this one touches it.
/// Returns what it answered, or None when no vswitchd answers there (nothing to take over).
pub fn take_over(socket: &Path) -> Option<HandoverResponse> {
    if !socket.exists() {
        return None;
    }
    let client = Client::new(socket).with_timeout(WAIT);
    match client.post::<_, HandoverResponse>(PATH_HANDOVER, &()) {
        Ok(r) => {
            tracing::info!(
                "took the node over from vswitchd pid {} (it let go in {} ms)",
                r.pid,
                r.released_ms
            );
            Some(r)
        }
        // A socket file with no process behind it: an earlier vswitchd that was killed.
        Err(ClientError::Connect { .. }) => None,
        Err(e) => {
            tracing::warn!(
                "the vswitchd on {} did not hand the node over ({e}); starting anyway",
                socket.display()
            );
            None
        }
    }
}
