//! vswitchctl: the command line for a running vswitchd, over its admin socket.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use conf::api::{self, ConntrackResponse, PeersResponse, PortsResponse, ServicesResponse, Status};
use conf::client::Client;
use conf::client::ClientError;
use conf::config::PeerSpec;

mod capture;

#[derive(Parser)]
#[command(
    name = "vswitchctl",
    version,
    about = "Inspect and control a running vswitchd"
)]
struct Args {
    /// The daemon's admin socket.
    #[arg(long, short, global = true, default_value = conf::config::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The daemon's node, pod CIDR, gateway and readiness.
    Status,
    /// Ports (pod attachments) with packet and drop counters.
    Ports,
    /// The overlay's settings and its peer nodes.
    Peers,
    /// Add a peer node, or replace the one with the same name.
    PeerAdd {
        /// The node's name.
        name: String,
        /// Its underlay address.
        #[arg(long)]
        underlay_ip: std::net::IpAddr,
        /// Its VTEP MAC (for a flannel node, flannel.1's MAC).
        #[arg(long)]
        vtep_mac: String,
        /// Pod CIDRs routed to it (repeat for more).
        #[arg(long = "pod-cidr", required = true)]
        pod_cidrs: Vec<ipnet::Ipv4Net>,
        /// The peer takes VXLAN remote checksum offload (another vswitch, or Linux VXLAN with
        /// remcsumrx): inner checksums are sent partial.
        #[arg(long)]
        remote_checksum: bool,
    },
    /// Remove a peer node.
    PeerDel { name: String },
    /// Service frontends and the backends in use.
    Services,
    /// Send a synthetic packet through the pipeline (no side effects) and print every decision.
    Trace {
        /// Sent by this pod (namespace/name or container ID).
        #[arg(long, conflicts_with_all = ["port", "peer"])]
        pod: Option<String>,
        /// Sent from this port.
        #[arg(long, conflicts_with = "peer")]
        port: Option<u32>,
        /// Arriving over VXLAN from this peer node (needs --src).
        #[arg(long)]
        peer: Option<String>,
        /// Source address (default: the pod's).
        #[arg(long)]
        src: Option<std::net::Ipv4Addr>,
        /// Destination address.
        #[arg(long)]
        dst: std::net::Ipv4Addr,
        /// tcp (a SYN), udp or icmp (an echo request).
        #[arg(long, default_value = "tcp")]
        proto: String,
        #[arg(long)]
        sport: Option<u16>,
        #[arg(long)]
        dport: Option<u16>,
    },
    /// NetworkPolicy as the switch applies it: each local pod's selecting policies and their
    /// rules, the policies in force, and the objects left out.
    Policies {
        /// Only this pod (NAMESPACE/NAME).
        #[arg(long)]
        pod: Option<String>,
    },
    /// Tracked (translated) connections.
    Conntrack {
        /// Only connections with this address on any side.
        #[arg(long)]
        ip: Option<std::net::IpAddr>,
        /// Only connections with this port on any side.
        #[arg(long)]
        port: Option<u16>,
    },
    /// Egress translation: pods' connections to the outside, opened again from the node's
    /// address (pod, destination, node-side port, bytes, age), and its counters.
    Egress,
    /// Stream a live pcapng capture to stdout (`| tcpdump -nr -`) or to files (-w).
    Capture(capture::CaptureArgs),
    /// Release a port the switch could not take back after a restart (its pod's namespace is
    /// gone, and the runtime sent no CNI DEL since): its address, record and device.
    Release {
        /// The port's id (`vswitchctl ports`, first column).
        port: u32,
    },
}

fn main() -> ExitCode {
    conf::cli::quiet_on_broken_pipe();
    let args = Args::parse();
    let result = match &args.cmd {
        Cmd::Capture(c) => {
            use std::io::IsTerminal;
            if let Err(m) = capture::check_usage(c, std::io::stdout().is_terminal()) {
                eprintln!("vswitchctl capture: {m}");
                return ExitCode::from(2);
            }
            capture::run(&args.socket, c)
        }
        _ => request(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vswitchctl: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One request to the admin API, its answer printed.
fn request(args: &Args) -> Result<(), ClientError> {
    let client = Client::new(&args.socket).with_timeout(std::time::Duration::from_secs(10));
    let json = args.json;
    match &args.cmd {
        // Streams, not one request: `main` runs it.
        Cmd::Capture(_) => Ok(()),
        Cmd::Status => client
            .get::<Status>(api::PATH_STATUS)
            .map(|s| print_status(&s, json)),
        Cmd::Ports => client
            .get::<PortsResponse>(api::PATH_PORTS)
            .map(|r| print_ports(&r, json)),
        Cmd::Peers => client
            .get::<PeersResponse>(api::PATH_PEERS)
            .map(|r| print_peers(&r, json)),
        Cmd::PeerAdd {
            name,
            underlay_ip,
            vtep_mac,
            pod_cidrs,
            remote_checksum,
        } => client
            .post::<_, PeersResponse>(
                api::PATH_PEERS,
                &PeerSpec {
                    name: name.clone(),
                    underlay_ip: *underlay_ip,
                    vtep_mac: vtep_mac.clone(),
                    pod_cidrs: pod_cidrs.clone(),
                    remote_checksum: *remote_checksum,
                },
            )
            .map(|r| print_peers(&r, json)),
        Cmd::PeerDel { name } => client
            .delete::<PeersResponse>(&format!("{}{name}", api::PATH_PEER_PREFIX))
            .map(|r| print_peers(&r, json)),
        Cmd::Trace {
            pod,
            port,
            peer,
            src,
            dst,
            proto,
            sport,
            dport,
        } => client
            .post::<_, api::TraceResponse>(
                api::PATH_TRACE,
                &api::TraceRequest {
                    pod: pod.clone(),
                    port: *port,
                    peer: peer.clone(),
                    src: *src,
                    dst: *dst,
                    protocol: proto.clone(),
                    src_port: *sport,
                    dst_port: *dport,
                },
            )
            .map(|r| print_trace(&r, json)),
        Cmd::Release { port } => client
            .delete::<api::PortInfo>(&format!("{}{port}", api::PATH_PORT_PREFIX))
            .map(|p| print_released(&p, json)),
        Cmd::Services => client
            .get::<ServicesResponse>(api::PATH_SERVICES)
            .map(|r| print_services(&r, json)),
        Cmd::Policies { pod } => client
            .get::<api::PoliciesResponse>(&policies_path(pod.as_deref()))
            .map(|r| print_policies(&r, json)),
        Cmd::Egress => client
            .get::<api::EgressResponse>(api::PATH_EGRESS)
            .map(|r| print_egress(&r, json)),
        Cmd::Conntrack { ip, port } => client
            .get::<ConntrackResponse>(&conntrack_path(*ip, *port))
            .map(|r| print_conntrack(&r, json)),
    }
}

fn print_status(s: &Status, json: bool) {
    if json {
        return print_json(s);
    }
    println!("node:     {}", s.node);
    println!("version:  {}", s.version);
    println!("pod CIDR: {}", s.pod_cidr);
    println!("gateway:  {} ({})", s.gateway, s.gateway_mac);
    println!("ports:    {}", s.ports);
    println!("ready:    {}", s.ready);
    for w in &s.warnings {
        println!("warning:  {w}");
    }
}

fn print_ports(r: &PortsResponse, json: bool) {
    if json {
        return print_json(r);
    }
    println!(
        "{:>4}  {:<28} {:<8} {:<15} {:<17} {:>10} {:>10}  drops",
        "PORT", "POD / CONTAINER", "IFNAME", "IP", "MAC", "RX PKTS", "TX PKTS"
    );
    for p in r.ports.iter().chain(r.host.as_ref()) {
        // A runtime without pod names (podman) gets its container ID cut to 12
        // characters, as `podman ps` shows it; --json has it whole.
        let who = p
            .pod
            .clone()
            .unwrap_or_else(|| p.container_id.chars().take(12).collect());
        let host_ports = if p.host_ports.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = p.host_ports.iter().map(ToString::to_string).collect();
            format!("  hostPorts {}", list.join(" "))
        };
        println!(
            "{:>4}  {:<28} {:<8} {:<15} {:<17} {:>10} {:>10}  {}{}{}",
            p.id,
            who,
            p.ifname,
            p.ip,
            p.mac,
            p.counters.rx_packets,
            p.counters.tx_packets,
            drops_text(&p.counters.drops),
            host_ports,
            if p.live {
                String::new()
            } else {
                format!(
                    "  NOT HELD (not taken back after a restart: the runtime's \
                     DEL frees it, or, once its namespace is gone, `vswitchctl \
                     release {}`)",
                    p.id
                )
            }
        );
    }
    if let Some(u) = &r.underlay {
        println!(
            "underlay (VXLAN datagrams): rx {} tx {}  drops: {}",
            u.rx_packets,
            u.tx_packets,
            drops_text(&u.drops)
        );
    }
    if !r.switch_drops.is_empty() {
        println!("switch (no port): drops: {}", drops_text(&r.switch_drops));
    }
}

fn print_trace(r: &api::TraceResponse, json: bool) {
    if json {
        return print_json(r);
    }
    for (i, s) in r.steps.iter().enumerate() {
        println!("{:>2}. {s}", i + 1);
    }
    println!("=> {}", r.verdict);
}

fn print_released(p: &api::PortInfo, json: bool) {
    if json {
        return print_json(p);
    }
    println!(
        "released port {} of {}/{} ({})",
        p.id, p.container_id, p.ifname, p.ip
    );
}

fn print_services(r: &ServicesResponse, json: bool) {
    if json {
        return print_json(r);
    }
    println!(
        "{:<40} {:<22} {:<9} BACKENDS",
        "SERVICE", "ADDRESS", "AFFINITY"
    );
    for f in &r.frontends {
        println!(
            "{:<40} {:<22} {:<9} {}",
            f.name,
            format!("{}:{}/{}", f.vip, f.port, f.protocol),
            f.session_affinity_timeout
                .map(|s| format!("{s}s"))
                .unwrap_or_else(|| "-".into()),
            if f.backends.is_empty() {
                "(none: rejects)".into()
            } else {
                f.backends.join(" ")
            }
        );
    }
    if !r.node_ports.is_empty() {
        println!();
        println!("{:<16} {:<40} TO", "NODEPORT", "SERVICE");
        for n in &r.node_ports {
            println!(
                "{:<16} {:<40} {}{}",
                format!("{}/{}", n.node_port, n.protocol),
                n.service,
                if n.destinations.is_empty() {
                    "(no endpoint here: closed at once)".to_string()
                } else {
                    n.destinations.join(" ")
                },
                if n.local { "  (policy Local)" } else { "" }
            );
        }
    }
}

fn conntrack_path(ip: Option<std::net::IpAddr>, port: Option<u16>) -> String {
    let mut q = Vec::new();
    if let Some(ip) = ip {
        q.push(format!("ip={ip}"));
    }
    if let Some(p) = port {
        q.push(format!("port={p}"));
    }
    if q.is_empty() {
        api::PATH_CONNTRACK.to_string()
    } else {
        format!("{}?{}", api::PATH_CONNTRACK, q.join("&"))
    }
}

fn print_egress(r: &api::EgressResponse, json: bool) {
    if json {
        return print_json(r);
    }
    if !r.enabled {
        println!("egress translation is off ([egress] enabled = false)");
        return;
    }
    println!(
        "{:<5} {:<20} {:<22} {:<22} {:<22} {:>10} {:>10} {:>7}  STATE",
        "PROTO", "POD", "POD ADDRESS", "DESTINATION", "NODE SIDE", "OUT", "IN", "AGE"
    );
    for c in &r.connections {
        println!(
            "{:<5} {:<20} {:<22} {:<22} {:<22} {:>10} {:>10} {:>6}s  {}",
            c.protocol,
            c.pod.clone().unwrap_or_else(|| format!("port {}", c.port)),
            c.pod_addr.to_string(),
            c.destination.to_string(),
            c.node_side
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
            c.bytes_out,
            c.bytes_in,
            c.age_ms / 1000,
            c.state
        );
    }
    let counters: Vec<String> = r.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "{} connection(s); {}",
        r.connections.len(),
        counters.join(" ")
    );
}

fn print_conntrack(r: &ConntrackResponse, json: bool) {
    if json {
        return print_json(r);
    }
    println!(
        "{:<5} {:<22} {:<22} {:<22} {:<12} {:>9}",
        "PROTO", "CLIENT", "SERVICE", "BACKEND", "STATE", "EXPIRES"
    );
    for e in &r.entries {
        println!(
            "{:<5} {:<22} {:<22} {:<22} {:<12} {:>8}s{}",
            e.protocol,
            e.client,
            e.service,
            e.backend,
            e.state,
            e.expires_in_ms / 1000,
            e.snat
                .as_ref()
                .map(|a| format!("  (hairpin, seen as {a})"))
                .unwrap_or_default()
        );
    }
    println!("{} shown of {} tracked", r.entries.len(), r.total);
}

/// `/v1/policies`, with `?pod=` percent-encoded when given.
fn policies_path(pod: Option<&str>) -> String {
    match pod {
        None => api::PATH_POLICIES.to_string(),
        Some(p) => {
            let enc: String = p
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect();
            format!("{}?pod={enc}", api::PATH_POLICIES)
        }
    }
}

fn print_policies(r: &api::PoliciesResponse, json: bool) {
    if json {
        return print_json(r);
    }
    for p in &r.pods {
        let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("pod {} ({}, port {})", p.pod, p.ip, p.port);
        println!(
            "  labels: {}",
            if labels.is_empty() {
                "(none)".into()
            } else {
                labels.join(",")
            }
        );
        if p.ingress.is_empty() && p.egress.is_empty() {
            println!("  No policy selects this pod: it is not isolated.");
        }
        for (dir, isolated, sel) in [
            ("ingress", p.isolated_ingress, &p.ingress),
            ("egress", p.isolated_egress, &p.egress),
        ] {
            if !isolated {
                if !p.ingress.is_empty() || !p.egress.is_empty() {
                    println!("  {dir}: not isolated (no policy selects it): all admitted");
                }
                continue;
            }
            println!("  {dir}: isolated: only what a rule below admits passes");
            for s in sel {
                if s.rules.is_empty() {
                    println!("    {}: admits nothing", s.policy);
                }
                for rule in &s.rules {
                    println!("    {}: {rule}", s.policy);
                }
            }
        }
        println!();
    }
    if r.policies.is_empty() {
        println!("policies in force: none");
    } else {
        println!("policies in force:");
        for p in &r.policies {
            println!(
                "  {:<32} pods {:<24} {}",
                p.name,
                p.pod_selector,
                p.types.join(",")
            );
        }
    }
    if !r.problems.is_empty() {
        println!("left out (not applied):");
        for p in &r.problems {
            println!("  {p}");
        }
    }
}

fn print_peers(r: &PeersResponse, json: bool) {
    if json {
        return print_json(r);
    }
    match r.underlay_ip {
        Some(ip) => println!(
            "overlay: VXLAN VNI {} on {ip}:{}, VTEP MAC {}",
            r.vni, r.port, r.vtep_mac
        ),
        None => println!("overlay: off (no overlay.underlay_ip)"),
    }
    println!(
        "{:<24} {:<16} {:<18} {:<4} POD CIDRS",
        "PEER", "UNDERLAY", "VTEP MAC", "RCO"
    );
    for p in &r.peers {
        let cidrs: Vec<String> = p.pod_cidrs.iter().map(|c| c.to_string()).collect();
        println!(
            "{:<24} {:<16} {:<18} {:<4} {}",
            p.name,
            p.underlay_ip,
            p.vtep_mac,
            if p.remote_checksum { "yes" } else { "no" },
            cidrs.join(",")
        );
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("vswitchctl: {e}"),
    }
}

/// `reason=count ...`, or `-` for none.
fn drops_text(drops: &std::collections::BTreeMap<String, u64>) -> String {
    if drops.is_empty() {
        return "-".into();
    }
    let v: Vec<String> = drops.iter().map(|(k, v)| format!("{k}={v}")).collect();
    v.join(" ")
}
