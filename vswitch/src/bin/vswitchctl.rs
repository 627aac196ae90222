//! vswitchctl: the command line for a running vswitchd, over its admin socket.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use conf::api::{self, PortsResponse, Status};
use conf::client::Client;

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
}

fn main() -> ExitCode {
    let args = Args::parse();
    let client = Client::new(&args.socket).with_timeout(std::time::Duration::from_secs(10));
    let result = match args.cmd {
        Cmd::Status => client.get::<Status>(api::PATH_STATUS).map(|s| {
            if args.json {
                print_json(&s);
            } else {
                println!("node:     {}", s.node);
                println!("version:  {}", s.version);
                println!("pod CIDR: {}", s.pod_cidr);
                println!("gateway:  {} ({})", s.gateway, s.gateway_mac);
                println!("ports:    {}", s.ports);
                println!("ready:    {}", s.ready);
            }
        }),
        Cmd::Ports => client.get::<PortsResponse>(api::PATH_PORTS).map(|r| {
            if args.json {
                print_json(&r);
            } else {
                println!(
                    "{:>4}  {:<28} {:<8} {:<15} {:<17} {:>10} {:>10}  drops",
                    "PORT", "POD / CONTAINER", "IFNAME", "IP", "MAC", "RX PKTS", "TX PKTS"
                );
                for p in &r.ports {
                    let who = p.pod.clone().unwrap_or_else(|| p.container_id.clone());
                    let drops: Vec<String> = p
                        .counters
                        .drops
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    println!(
                        "{:>4}  {:<28} {:<8} {:<15} {:<17} {:>10} {:>10}  {}",
                        p.id,
                        who,
                        p.ifname,
                        p.ip,
                        p.mac,
                        p.counters.rx_packets,
                        p.counters.tx_packets,
                        if drops.is_empty() {
                            "-".into()
                        } else {
                            drops.join(" ")
                        }
                    );
                }
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vswitchctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("vswitchctl: {e}"),
    }
}
