//! vswitchd: the per-node switch daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "vswitchd",
    version,
    about = "Userspace virtual switch for Kubernetes pod networking"
)]
struct Args {
    /// The daemon's configuration file (TOML; see README).
    #[arg(long, short)]
    config: PathBuf,
    /// This node's name in the Kubernetes API (default: kubernetes.node_name, then $NODE_NAME,
    /// then node.name).
    #[arg(long)]
    node_name: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: a log file or journald gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if !vswitch::datapath::memory::map_large_allocations() {
        tracing::warn!("malloc did not take M_MMAP_THRESHOLD: freed tables may stay resident");
    }
    let opts = vswitch::daemon::RunOptions {
        node_name: args.node_name,
    };
    match vswitch::daemon::run_with(&args.config, opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vswitchd: {e}");
            ExitCode::FAILURE
        }
    }
}
