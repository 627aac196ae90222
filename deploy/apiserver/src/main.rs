//! `vswitch-apiserver`: the Kubernetes API server stand-in as a process (see the crate README).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use vswitch_apiserver::{ApiServer, Options, Settings};

#[derive(Parser)]
#[command(about = "A Kubernetes API server stand-in for tests and the vswitch lab (plain HTTP)")]
struct Args {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Seconds between BOOKMARKs on watches that allow them.
    #[arg(long, default_value_t = 5)]
    bookmark_interval_s: u64,
    /// Events kept for watches to resume from; older resourceVersions get 410 Gone.
    #[arg(long, default_value_t = 10_000)]
    window: usize,
    /// Where ClusterIPs are allocated (address/prefix).
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cidr: String,
    /// JSON files of objects or Lists to create at start (e.g. recorded list responses).
    #[arg(long)]
    load: Vec<PathBuf>,
    /// Write the bound address (host:port) to this file once serving.
    #[arg(long)]
    address_file: Option<PathBuf>,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("vswitch-apiserver: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let (ip, len) = args
        .service_cidr
        .split_once('/')
        .and_then(|(a, l)| Some((a.parse().ok()?, l.parse::<u8>().ok().filter(|l| *l <= 30)?)))
        .ok_or_else(|| format!("--service-cidr {}: expected a.b.c.d/len", args.service_cidr))?;
    let options = Options {
        window: args.window,
        service_cidr: (ip, len),
        settings: Settings {
            bookmark_interval: Duration::from_secs(args.bookmark_interval_s.max(1)),
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    rt.block_on(async move {
        let server = ApiServer::start(args.listen, options)
            .await
            .map_err(|e| format!("--listen {}: {e}", args.listen))?;
        for path in &args.load {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--load {}: {e}", path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| format!("--load {}: {e}", path.display()))?;
            server
                .load(&v)
                .map_err(|e| format!("--load {}: {e}", path.display()))?;
        }
        if let Some(f) = &args.address_file {
            std::fs::write(f, server.addr.to_string())
                .map_err(|e| format!("--address-file {}: {e}", f.display()))?;
        }
        tracing::info!("serving the Kubernetes API stand-in on {}", server.url());
        let _ = tokio::signal::ctrl_c().await;
        Ok::<(), String>(())
    })
}
