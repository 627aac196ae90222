//! vswitch-install: the install steps of the vswitch DaemonSet, one subcommand each.
//!
//! - `plugin` copies the `vswitch` CNI plugin into the host's CNI bin dir (an init container).
//! - `config` renders this node's vswitchd config from the cluster-wide settings and the
//!   per-node table (an init container), and checks it the way vswitchd will.
//! - `conflist` waits until vswitchd answers ready on its admin socket and only then writes the
//!   CNI conflist (a sidecar, with `--watch`). The container runtime reports the node's network
//!   ready as soon as a conflist exists, so writing it early would let kubelet mark the node
//!   Ready and schedule pods that vswitchd cannot attach yet.
//!
//! - `sysctls` sets the node's kernel settings that pods' paths through the node need (IPv4
//!   forwarding, reverse-path filtering not strict on the underlay) and logs each change (a
//!   privileged init container; the lab runs it in each node's namespace too). vswitchd itself
//!   only checks them and warns.
//!
//! Every file lands by write-to-temp + rename in the destination directory, so a runtime that
//! reads the directory (or executes the plugin) never sees a half-written file. The image is
//! `FROM scratch`, so these steps are a binary rather than a shell script.

mod conflist;
mod plugin;
use vswitch_lab::render;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vswitch-install",
    version,
    about = "Install steps of the vswitch DaemonSet: CNI plugin, node config, CNI conflist"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Copy the CNI plugin binary into the host's CNI bin dir (atomically, mode 0755).
    Plugin {
        /// The plugin binary. Default: `vswitch` next to this program.
        #[arg(long)]
        src: Option<PathBuf>,
        /// The host's CNI bin dir as mounted in this container (e.g. /host/opt/cni/bin).
        #[arg(long)]
        dest_dir: PathBuf,
    },
    /// Render this node's vswitchd config from the cluster config and the nodes table.
    Config {
        /// Cluster-wide settings: a vswitchd config without the per-node fields.
        #[arg(long)]
        cluster: PathBuf,
        /// The per-node table (`[[nodes]]` with name, pod_cidr, underlay_ip).
        #[arg(long)]
        nodes: PathBuf,
        /// This node's name (the downward API's spec.nodeName).
        #[arg(long)]
        node_name: String,
        /// This node's address, used as its underlay address when the table gives none.
        #[arg(long)]
        node_ip: Option<String>,
        /// Where to write the rendered config.
        #[arg(long)]
        out: PathBuf,
    },
    /// Set the node's kernel settings that pods' paths through the node need, and say what
    /// changed (needs a privileged container in the node's network namespace).
    Sysctls {
        /// The host port's interface (vswitchd's `host.interface`).
        #[arg(long, default_value = "vsw0")]
        host_interface: String,
        /// The node's underlay address: its interface gets loose reverse-path filtering.
        #[arg(long)]
        node_ip: Option<std::net::IpAddr>,
    },
    /// Wait until vswitchd is ready, then write the CNI conflist (atomically).
    Conflist {
        /// vswitchd's admin socket; also written into the conflist for the plugin.
        #[arg(long, default_value = conf::config::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// The conflist to write (e.g. /host/etc/cni/net.d/10-vswitch.conflist).
        #[arg(long)]
        dest: PathBuf,
        /// The CNI network name.
        #[arg(long, default_value = "vswitch")]
        name: String,
        /// The conflist's cniVersion. 1.0.0 is understood by every current runtime.
        #[arg(long, default_value = "1.0.0")]
        cni_version: String,
        /// Give up after this many seconds without a ready daemon (0: wait forever).
        #[arg(long, default_value_t = 0)]
        timeout: u64,
        /// How often to ask the daemon, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        poll_ms: u64,
        /// Keep running: rewrite the conflist whenever it goes missing or changes while the
        /// daemon is ready; exit 0 on SIGTERM or SIGINT.
        #[arg(long)]
        watch: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.cmd {
        Cmd::Plugin { src, dest_dir } => plugin::install(src.as_deref(), &dest_dir)
            .map(|done| {
                log(&format!(
                    "installed {} ({} bytes) from {}",
                    done.dest.display(),
                    done.bytes,
                    done.src.display()
                ))
            })
            .map_err(|e| e.to_string()),
        Cmd::Config {
            cluster,
            nodes,
            node_name,
            node_ip,
            out,
        } => render::run(&render::Inputs {
            cluster: &cluster,
            nodes: &nodes,
            node_name: &node_name,
            node_ip: node_ip.as_deref(),
            out: &out,
        })
        .map(|summary| log(&summary))
        .map_err(|e| e.to_string()),
        Cmd::Sysctls {
            host_interface,
            node_ip,
        } => sysctls(&host_interface, node_ip),
        Cmd::Conflist {
            socket,
            dest,
            name,
            cni_version,
            timeout,
            poll_ms,
            watch,
        } => conflist::run(&conflist::Options {
            socket,
            dest,
            name,
            cni_version,
            timeout: (timeout > 0).then(|| Duration::from_secs(timeout)),
            poll: Duration::from_millis(poll_ms.max(10)),
            watch,
        })
        .map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vswitch-install: {e}");
            ExitCode::FAILURE
        }
    }
}

fn sysctls(host_if: &str, node_ip: Option<std::net::IpAddr>) -> Result<(), String> {
    use conf::sysctl::{interface_with_address, NodeSettings};
    let underlay = node_ip.and_then(interface_with_address);
    if let (Some(ip), None) = (node_ip, &underlay) {
        log(&format!(
            "no interface holds {ip} in this namespace: only conf.all and conf.default's \
             reverse-path filtering are set"
        ));
    }
    let settings = NodeSettings::new(Some(host_if), underlay.as_deref());
    let done = settings.apply().map_err(|e| e.to_string())?;
    if done.is_empty() {
        log("the node's settings are as vswitch needs them; nothing changed");
    }
    for d in &done {
        log(&d.to_string());
    }
    ping_sockets();
    Ok(())
}

/// Egress translation sends pods' pings from unprivileged ICMP echo sockets, which the kernel
/// allows only to the groups in `net.ipv4.ping_group_range` (off, "1 0", by default): root's
/// group must be in it. Per network namespace, like the settings above; a failure is logged,
/// not fatal (only pings to the outside need it).
fn ping_sockets() {
    const KEY: &str = "/proc/sys/net/ipv4/ping_group_range";
    let now = std::fs::read_to_string(KEY).unwrap_or_default();
    let mut it = now
        .split_whitespace()
        .map(|v| v.parse::<u64>().unwrap_or(1));
    let (lo, hi) = (it.next().unwrap_or(1), it.next().unwrap_or(0));
    if lo == 0 && hi >= lo {
        return;
    }
    match std::fs::write(KEY, "0 0") {
        Ok(()) => log(&format!(
            "net.ipv4.ping_group_range: {} -> 0 0 (egress translation's ICMP echo sockets)",
            now.trim()
        )),
        Err(e) => log(&format!(
            "net.ipv4.ping_group_range: cannot set it ({e}): pods' pings to the outside fail"
        )),
    }
}

/// One line of progress on stderr (kubelet's container log adds the timestamp).
fn log(msg: &str) {
    eprintln!("vswitch-install: {msg}");
}
