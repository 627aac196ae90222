//! A Kubernetes API server stand-in for tests and the lab.
//!
//! No kube-apiserver binary can be had on the machines this project is built on, yet vswitchd's
//! Kubernetes mode is a kube-rs client whose list, watch, bookmark, 410 Gone and relist paths
//! must run for real. This crate serves the real HTTP protocol (plain HTTP, JSON) for the kinds
//! vswitchd reads, Nodes, Services, EndpointSlices, Namespaces, Pods and NetworkPolicies, and
//! takes the writes `kubectl apply -f` / `delete -f` make on them. It is a test tool: vswitchd
//! does not know it exists, and its limits are in the crate's README.
//!
//! - [`store`]: objects, one global resourceVersion, the event log and compaction;
//! - [`http`]: paths, list/watch, writes, discovery, control endpoints under `/_standin/`;
//! - [`patch`], [`selector`], [`status`]: merge patches, selectors, Status errors.

pub mod http;
pub mod patch;
pub mod resources;
pub mod selector;
pub mod status;
pub mod store;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use http::{Faults, Settings};
pub use status::ApiError;
pub use store::Store;

/// How the stand-in is set up.
#[derive(Debug, Clone)]
pub struct Options {
    /// Events kept for watches to resume from (older versions get 410 Gone).
    pub window: usize,
    /// Where ClusterIPs are allocated from.
    pub service_cidr: (Ipv4Addr, u8),
    pub settings: Settings,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            window: 10_000,
            service_cidr: (Ipv4Addr::new(10, 96, 0, 0), 12),
            settings: Settings::default(),
        }
    }
}

/// A running stand-in. Dropping it stops serving (the store lives on in clones of [`Store`]).
pub struct ApiServer {
    pub addr: SocketAddr,
    pub store: Store,
    faults: Arc<Mutex<Faults>>,
    options: Options,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    /// The served app's "down until" (ms since its epoch): set for good by [`ApiServer::stop`],
    /// so no request that arrives while it stops (a watch resumed at once) is served.
    down_until_ms: Arc<AtomicU64>,
}

impl ApiServer {
    /// Serves a new empty store on `addr` (port 0: any free port).
    pub async fn start(addr: SocketAddr, options: Options) -> std::io::Result<ApiServer> {
        let store = Store::new(options.window, options.service_cidr);
        ApiServer::serve(addr, store, options).await
    }

    /// Injected faults and the per-kind counts of lists and watches, shared by restarts.
    pub fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The index of `plural` (any group) in [`resources::RESOURCES`], for [`ApiServer::faults`].
    pub fn resource(plural: &str) -> Option<usize> {
        resources::RESOURCES.iter().position(|r| r.plural == plural)
    }

    /// Serves `store` on `addr`.
    pub async fn serve(
        addr: SocketAddr,
        store: Store,
        options: Options,
    ) -> std::io::Result<ApiServer> {
        ApiServer::serve_with(addr, store, options, Arc::new(Mutex::new(Faults::new()))).await
    }

    async fn serve_with(
        addr: SocketAddr,
        store: Store,
        options: Options,
        faults: Arc<Mutex<Faults>>,
    ) -> std::io::Result<ApiServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let down_until_ms = Arc::new(AtomicU64::new(0));
        let app = http::App {
            store: store.clone(),
            faults: faults.clone(),
            settings: options.settings.clone(),
            down_until_ms: down_until_ms.clone(),
            epoch: Instant::now(),
            server: addr.to_string(),
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let router = http::router(app);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(ApiServer {
            addr,
            store,
            faults,
            options,
            stop: Some(stop),
            task: Some(task),
            down_until_ms,
        })
    }

    /// `http://addr`, for a kubeconfig or a client.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving: open watches are cut, the port is closed until [`ApiServer::restart`].
    pub async fn stop(&mut self) {
        // Refuse first, then cut: a client that resumes its watch at once must not get one
        // that outlives the server.
        self.down_until_ms.store(u64::MAX, Ordering::SeqCst);
        self.store.cut_watches();
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }

    /// Stops, stays down for `down`, and serves the same store on the same address again (what
    /// a restarted API server with its etcd looks like to a client).
    pub async fn restart(&mut self, down: Duration) -> std::io::Result<()> {
        self.stop().await;
        tokio::time::sleep(down).await;
        let again = ApiServer::serve_with(
            self.addr,
            self.store.clone(),
            self.options.clone(),
            self.faults.clone(),
        )
        .await?;
        *self = again;
        Ok(())
    }

    /// Creates every object of a List (or a single object) as `kubectl create` would.
    pub fn load(&self, objects: &Value) -> Result<usize, ApiError> {
        load(&self.store, objects)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.store.cut_watches();
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Creates or replaces `objects` (a `...List` whose items lack kind/apiVersion, as a list
/// response has them, or one object) in `store`, creating their namespaces as needed.
pub fn load(store: &Store, objects: &Value) -> Result<usize, ApiError> {
    let kind = objects["kind"].as_str().unwrap_or("");
    let api_version = objects["apiVersion"].as_str().unwrap_or("");
    let (items, item_kind) = match (kind.strip_suffix("List"), objects["items"].as_array()) {
        (Some(k), Some(items)) => (items.clone(), k),
        _ => (vec![objects.clone()], kind),
    };
    let resource = resources::by_kind(api_version, item_kind).ok_or_else(|| {
        ApiError::bad_request(&format!("no kind {item_kind} in {api_version} is served"))
    })?;
    let mut n = 0;
    for mut item in items {
        item["kind"] = Value::from(item_kind);
        item["apiVersion"] = Value::from(api_version);
        if let Some(m) = item["metadata"].as_object_mut() {
            for f in ["resourceVersion", "uid", "creationTimestamp"] {
                m.remove(f);
            }
        }
        let ns = item["metadata"]["namespace"].as_str().map(str::to_string);
        if let Some(ns) = &ns {
            let nsr = resources::find("", "v1", "namespaces").unwrap_or(0);
            if store.get(&(nsr, String::new(), ns.clone())).is_none() {
                let obj = serde_json::json!({"metadata": {"name": ns}});
                store.create(nsr, None, obj)?;
            }
        }
        let key = (
            resource,
            ns.clone().unwrap_or_default(),
            item["metadata"]["name"].as_str().unwrap_or("").to_string(),
        );
        if store.get(&key).is_some() {
            store.update(&key, |_| Ok(item))?;
        } else {
            store.create(resource, ns.as_deref(), item)?;
        }
        n += 1;
    }
    Ok(n)
}
