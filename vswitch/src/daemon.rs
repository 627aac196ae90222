//! Wiring of the daemon process: config, control plane, datapath, admin socket, signals.

use std::path::Path;

use conf::Config;

use crate::control::{api, metrics, Daemon, DaemonError};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] conf::ConfigError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error("admin socket {path}: {source}")]
    Socket {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("metrics address {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("control-plane runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Kubernetes(#[from] crate::control::k8s::K8sError),
}

/// Settings from the command line that are not in the config file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// This node's name in the Kubernetes API (`--node-name`).
    pub node_name: Option<String>,
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config_path: &Path) -> Result<(), RunError> {
    run_with(config_path, RunOptions::default())
}

/// [`run`] with command-line options.
pub fn run_with(config_path: &Path, opts: RunOptions) -> Result<(), RunError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(64)
        .enable_all()
        .thread_name("vswitch-ctl")
        .build()
        .map_err(RunError::Runtime)?;
    // In Kubernetes mode a config without node.pod_cidr takes the Node object's.
    let mut config = Config::load_asking_pod_cidr(config_path, |k, node| {
        let env = std::env::var("NODE_NAME").ok();
        let name = crate::control::k8s::node_name_of(opts.node_name.as_deref(), k, node, env);
        rt.block_on(crate::control::k8s::own_pod_cidr(k, &name))
            .map_err(|e| e.to_string())
    })?;
    if config.kubernetes.enabled {
        // "Local" (traffic policies, NodePorts, health checks) means the node whose name the
        // watch uses with the API, which the flag or $NODE_NAME can make other than node.name.
        let api_name = crate::control::k8s::node_name(
            opts.node_name.as_deref(),
            &config,
            std::env::var("NODE_NAME").ok(),
        );
        if api_name != config.node.name {
            tracing::info!(
                "this is node {api_name:?} in the Kubernetes API (node.name in the config is \
                 {:?}); endpoints on {api_name:?} are local",
                config.node.name
            );
            config.node.name = api_name;
        }
    }
    let socket = config.admin.socket.clone();
    // In Kubernetes mode the peers and Services of a vswitchd already running here carry this
    // one until its first lists are applied; read while that one still forwards.
    let tables = config
        .kubernetes
        .enabled
        .then(|| crate::control::handover::read_tables(&socket))
        .flatten();
    // The running vswitchd lets go of the node first (an upgrade, a restart).
    crate::control::handover::take_over(&socket);
    if let Some(old) = tables.filter(|t| !(t.peers.is_empty() && t.services.is_empty())) {
        tracing::info!(
            "forwarding with the {} peer(s) and {} Service(s) the old vswitchd had until the \
             API's first lists are applied",
            old.peers.len(),
            old.services.len()
        );
        config.peers = old.peers;
        config.services = old
            .services
            .into_iter()
            .map(std::sync::Arc::unwrap_or_clone)
            .collect();
    }
    let daemon = Daemon::start(config)?;
    let result = rt.block_on(async {
        let listener = api::bind(&socket).map_err(|source| RunError::Socket {
            path: socket.clone(),
            source,
        })?;
        tracing::info!(
            "vswitchd {} on node {} ({}), admin socket {}",
            env!("CARGO_PKG_VERSION"),
            daemon.config().node.name,
            daemon.config().node.pod_cidr,
            socket.display()
        );
        if let Some(addr) = daemon.config().admin.metrics_address {
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Metrics { addr, source })?;
            let app = metrics::router(daemon.clone());
            tracing::info!("metrics and health on http://{addr}");
            daemon.handover.set_metrics(tokio::spawn(async move {
                if let Err(e) = axum::serve(tcp, app).await {
                    tracing::error!("metrics server stopped: {e}");
                }
            }));
        }
        // Peers and Services from the Kubernetes API, or from the config file, reloaded.
        let _source =
            crate::control::source::start(daemon.clone(), config_path, opts.node_name.as_deref())
                .await?;
        if let Some(h) = _source.k8s_stats() {
            let _ = daemon.k8s_stats.set(h);
        }
        tokio::spawn(watch_node_settings(daemon.clone()));
        daemon.start_nodeports(tokio::runtime::Handle::current());
        daemon.start_dns(tokio::runtime::Handle::current());
        let app = api::router(daemon.clone());
        let handed_over = daemon.clone();
        // SIGTERM and SIGINT are watched from here on, once: one that arrives while a handover
        // is still finishing (the rolling update stops the old process as soon as the new one
        // is ready) is not lost, and ends the idling below.
        let (stop_tx, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
        let mut signalled = stopped.clone();
        let stop = async move {
            tokio::select! {
                _ = signalled.wait_for(|s| *s) => {}
                _ = handed_over.handover.done() => {}
            }
        };
        let server = axum::serve(listener, app).with_graceful_shutdown(stop);
        // Handed over, the process waits for its open requests at most a moment (a capture
        // stream would hold it): it has nothing left to serve them with.
        let linger = async {
            daemon.handover.done().await;
            tokio::time::sleep(HANDED_OVER_LINGER).await;
        };
        let served = tokio::select! {
            r = server => r.map_err(|source| RunError::Socket {
                path: socket.clone(),
                source,
            }),
            _ = linger => Ok(()),
        };
        if daemon.handover.handed_over() {
            // Idle until stopped, not gone: a container that exits would be started again by
            // the kubelet, and take the node back. The rolling update stops this one (SIGTERM)
            // once the new one is ready.
            tracing::info!("handed over: idle until stopped");
            let mut stopped = stopped;
            let _ = stopped.wait_for(|s| *s).await;
        }
        served
    });
    if daemon.handover.handed_over() {
        // The socket's path is the new vswitchd's now.
        return result;
    }
    tracing::info!("shutting down");
    daemon.shutdown();
    let _ = std::fs::remove_file(&socket);
    result
}

/// How long a vswitchd that handed its node over waits for its open admin requests.
const HANDED_OVER_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// How often the node's settings are read again while vswitchd runs.
const NODE_SETTINGS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Logs the node settings that the paths through the switch need and that are wrong, at start
/// and whenever one goes wrong or is put right while vswitchd runs (status, /readyz and
/// /metrics read them live).
async fn watch_node_settings(daemon: std::sync::Arc<Daemon>) {
    let mut known: Vec<conf::sysctl::NodeWarning> = Vec::new();
    let mut tick = tokio::time::interval(NODE_SETTINGS_EVERY);
    loop {
        tick.tick().await;
        let now = daemon.node_warnings();
        for w in now.iter().filter(|w| !known.contains(w)) {
            tracing::warn!("node setting {w}");
        }
        for w in known
            .iter()
            .filter(|k| !now.iter().any(|n| n.setting == k.setting))
        {
            tracing::info!("node setting {} is now as needed", w.setting);
        }
        known = now;
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers we still serve; the process can be killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
