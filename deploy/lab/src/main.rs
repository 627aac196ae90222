//! `vswitch-lab`: build, inspect and tear down a lab of vswitch nodes and pods in network
//! namespaces. All the work is in the library; this is argument parsing and printing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vswitch_lab::bench::{self, BenchOptions, Durations, Kind};
use vswitch_lab::{Lab, LabError, LabSpec, UpOptions, DEFAULT_NAME};

#[derive(Parser)]
#[command(name = "vswitch-lab", version, about, long_about = None)]
struct Cli {
    /// Lab name: at most 8 of [a-z0-9]; prefixes every namespace of the lab.
    #[arg(long, global = true, default_value = DEFAULT_NAME)]
    name: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the fabric, the nodes with their vswitchd, and the pods.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: u32,
        #[arg(long, default_value_t = 2)]
        pods_per_node: u32,
        /// Datapath worker threads of each vswitchd (`datapath.workers`).
        #[arg(long, default_value_t = 1)]
        workers: u32,
        /// Pin each vswitchd's workers to these CPUs (`datapath.cpus`, e.g. `0` or `0,1`), to
        /// give the datapath cores of its own; `exec` then runs the pods' programs on the other
        /// CPUs, as kubelet's reserved CPUs would place them.
        #[arg(long, value_delimiter = ',')]
        datapath_cpus: Vec<u32>,
        /// Each vswitchd's `datapath.busy_poll_us` (1000000: poll all the time, for a
        /// dedicated core).
        #[arg(long)]
        busy_poll_us: Option<u32>,
        /// Seconds each vswitchd gets to answer ready.
        #[arg(long, default_value_t = 10)]
        ready_timeout: u64,
        /// Kubernetes mode: start the API server stand-in (vswitch-apiserver) on the fabric
        /// with the lab's Node objects, and run every vswitchd against it; Services come from
        /// the API (`kubectl` through `vswitch-lab kubectl --`, or `add-service`).
        #[arg(long)]
        kubernetes: bool,
    },
    /// Run kubectl against the lab's API server stand-in (Kubernetes mode), e.g.
    /// `vswitch-lab kubectl -- apply -f web.yaml`.
    Kubectl {
        /// kubectl's arguments, after `--`.
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<String>,
    },
    /// Show nodes (daemon pid, alive, ready) and pods (address, MAC).
    Status {
        /// Print the JSON document instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// DEL every pod, stop the daemons, delete the namespaces and files. Safe to repeat.
    Down,
    /// Run a command in a pod's namespace (POD: n1-p1 or NAME-n1-p1; also n1, fab, or out:
    /// the host outside the cluster).
    Exec {
        /// n1-p1 or NAME-n1-p1 (a node: n1 or NAME-n1; the fabric: fab; the outside host: out).
        pod: String,
        /// The command and its arguments, after `--`.
        #[arg(
            required = true,
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "CMD"
        )]
        cmd: Vec<String>,
    },
    /// Add a pod on a node, through the CNI plugin.
    AddPod {
        /// Node number (1-based).
        #[arg(long)]
        node: u32,
        /// Pod name, [a-z0-9]; the pod is then called n<NODE>-<POD>.
        #[arg(long)]
        pod: String,
        /// The pod's Kubernetes namespace (CNI_ARGS K8S_POD_NAMESPACE).
        #[arg(long, default_value = "default")]
        namespace: String,
        /// The pod's labels, k=v,k2=v2 (for NetworkPolicy).
        #[arg(long, default_value = "", value_name = "K=V,...")]
        labels: String,
        /// A hostPort, as podman's -p: the pod's CONTAINER_PORT reached at HOST_PORT on the
        /// node's addresses (or HOST_IP only). Repeatable.
        #[arg(long, value_name = "[HOST_IP:]HOST_PORT:CONTAINER_PORT[/udp]")]
        publish: Vec<String>,
    },
    /// Delete a pod through the CNI plugin.
    DelPod { pod: String },
    /// Change a pod's labels, live: K=V sets, K- removes.
    Label {
        pod: String,
        #[arg(required = true, allow_hyphen_values = true, value_name = "K=V|K-")]
        changes: Vec<String>,
    },
    /// Apply manifests (NetworkPolicy, Namespace, Pod; YAML or JSON) to the lab, as
    /// `kubectl apply -f`: every node enforces them within moments.
    Apply {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// Delete the objects a manifest file names, as `kubectl delete -f`.
    Delete {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// Run CNI CHECK for a pod.
    CheckPod { pod: String },
    /// The medians of several `bench` runs (docs/benchmarks/runs/*.json by default) as the
    /// README's Markdown table, headed by each run's date, commit and machine.
    BenchSummary {
        /// Run reports to summarize; default: every *.json in docs/benchmarks/runs.
        files: Vec<PathBuf>,
    },
    /// Add (or replace) a Service whose endpoints are the lab's pods, on every node: its
    /// ClusterIP (given from 10.96.0.100 up unless --cluster-ip), NodePort and DNS name
    /// (NAME.default.svc.cluster.local) work once this returns.
    AddService {
        /// The Service's name (namespace `default`).
        #[arg(value_name = "NAME")]
        service: String,
        /// PORT[:TARGET][/tcp|udp], repeatable; TARGET defaults to PORT, the protocol to tcp.
        #[arg(long = "port", required = true, value_name = "PORT[:TARGET][/PROTO]")]
        ports: Vec<vswitch_lab::services::PortArg>,
        /// The pods that serve it, comma-separated (n1-p2,n2-p1).
        #[arg(long, value_delimiter = ',', required = true)]
        endpoints: Vec<String>,
        /// Its ClusterIP (in 10.96.0.0/12, the lab's Service CIDR).
        #[arg(long)]
        cluster_ip: Option<std::net::Ipv4Addr>,
        /// A NodePort (30000-32767) for its first port, on every node's address.
        #[arg(long)]
        node_port: Option<u16>,
    },
    /// Remove a Service added with add-service from every node.
    DelService {
        #[arg(value_name = "NAME")]
        service: String,
    },
    /// Restart a node's vswitchd (SIGTERM, then start it again, as an upgrade does): its pods
    /// keep their interfaces, addresses and connections. NODE: n1 or NAME-n1
    Restart { node: String },
    /// Measure vswitch against the kernel path (bridge + vxlan) and Open vSwitch's userspace
    /// datapath on the same two-node, three-pod topology; print medians and ratios, check the
    /// targets, and write latest.{json,txt,png} into --out-dir. Needs root, iperf3 and ping;
    /// openvswitch-switch for the ovs column, gnuplot-nox for the chart. Run the release build
    /// (`target/release/vswitch-lab bench`): it uses the vswitchd next to it.
    Bench {
        /// Repetitions of every measurement (the table shows medians); default 3, 1 with --quick.
        #[arg(long)]
        reps: Option<u32>,
        /// One repetition of 2-second tests instead of three of 5 seconds.
        #[arg(long)]
        quick: bool,
        /// Seconds each TCP, UDP and request/response test runs (overrides the default).
        #[arg(long, value_name = "SECS")]
        time: Option<u64>,
        /// The datapaths to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "vswitch,vswitch-2w,vswitch-pin,kernel,ovs", value_parser = parse_kind)]
        only: Vec<Kind>,
        /// Where latest.json, latest.txt and latest.png are written.
        #[arg(long, default_value = "docs/benchmarks")]
        out_dir: PathBuf,
        /// Print the table only; write no files.
        #[arg(long)]
        no_write: bool,
    },
    /// vswitchd in Kubernetes mode against a large cluster served by the API server stand-in
    /// (issue 23): initial sync, endpoint change latency (isolated and sustained), CPU,
    /// resident memory and CNI ADD/DEL times against an empty cluster; prints a table, checks
    /// the targets and writes latest.{json,txt} and runs/ into --out-dir. Needs root and
    /// kubectl; run the release build. Takes a few minutes.
    Scale {
        #[arg(long, default_value_t = 5_000)]
        nodes: u32,
        #[arg(long, default_value_t = 10_000)]
        services: u32,
        #[arg(long, default_value_t = 100_000)]
        endpoints: u32,
        #[arg(long, default_value_t = 100_000)]
        pods: u32,
        /// Endpoints per EndpointSlice, at most.
        #[arg(long, default_value_t = 100)]
        slice_max: u32,
        /// Isolated endpoint changes (10 a second).
        #[arg(long, default_value_t = 200)]
        isolated: u32,
        /// Changes of the sustained burst.
        #[arg(long, default_value_t = 1_000)]
        changes: u32,
        /// Changes a second of the sustained burst.
        #[arg(long, default_value_t = 100)]
        rate: u32,
        /// CNI ADD/DEL pairs timed in each cluster.
        #[arg(long, default_value_t = 20)]
        cni_reps: u32,
        #[arg(long, default_value = "docs/benchmarks/scale")]
        out_dir: PathBuf,
        /// Print the table only; write no files.
        #[arg(long)]
        no_write: bool,
        /// Leave the large cluster's lab up (`vswitch-lab --name vscale down` ends it).
        #[arg(long)]
        keep: bool,
    },
    /// Soak test (not in CI): 2 nodes and --pods pods, pods and Services churning with traffic
    /// running for --duration seconds; then checks for leaked TAP devices, descriptors,
    /// addresses, conntrack entries and memory, prints the numbers and tears the lab down.
    Soak {
        /// Seconds of churn.
        #[arg(long, default_value_t = 300)]
        duration: u64,
        /// Pods in all, split between the two nodes.
        #[arg(long, default_value_t = 100)]
        pods: u32,
        /// Largest accepted RSS growth of a vswitchd, MB.
        #[arg(long, default_value_t = 64)]
        rss_bound: u64,
    },
    /// Request/response server for `bench` (one client, echoes bytes).
    #[command(hide = true)]
    RrServer {
        #[arg(long)]
        bind: SocketAddr,
        /// Seconds to wait for the client (and for each request).
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// A connection per transaction, closed by the server; runs until idle for --timeout.
        #[arg(long)]
        each: bool,
    },
    /// Request/response client for `bench`: prints {"transactions", "seconds", "rate"}.
    #[command(hide = true)]
    RrClient {
        #[arg(long)]
        connect: SocketAddr,
        /// Seconds to run.
        #[arg(long)]
        duration: f64,
        /// A new connection per transaction (new connections per second).
        #[arg(long)]
        each: bool,
    },
}

fn parse_kind(s: &str) -> Result<Kind, String> {
    Kind::parse(s).ok_or_else(|| format!("unknown datapath {s:?}: use vswitch, kernel or ovs"))
}

fn main() -> ExitCode {
    conf::cli::quiet_on_broken_pipe();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Bench {
            reps,
            quick,
            time,
            only,
            out_dir,
            no_write,
        } => {
            let mut durations = if quick {
                Durations::quick()
            } else {
                Durations::full()
            };
            if let Some(t) = time {
                durations = durations.with_time(Duration::from_secs(t.max(1)));
            }
            let opts = BenchOptions {
                reps: reps.unwrap_or(if quick { 1 } else { 3 }).max(1),
                quick,
                durations,
                only,
                out_dir: (!no_write).then_some(out_dir),
            };
            return run_bench(&opts);
        }
        Cmd::Soak {
            duration,
            pods,
            rss_bound,
        } => return run_soak(cli.name, duration, pods, rss_bound),
        Cmd::Scale {
            nodes,
            services,
            endpoints,
            pods,
            slice_max,
            isolated,
            changes,
            rate,
            cni_reps,
            out_dir,
            no_write,
            keep,
        } => {
            let name = if cli.name == DEFAULT_NAME {
                "vscale".to_string()
            } else {
                cli.name
            };
            let opts = vswitch_lab::scale::ScaleOptions {
                name,
                nodes,
                services,
                endpoints,
                pods,
                slice_max,
                isolated,
                changes,
                rate,
                cni_reps,
                out_dir: (!no_write).then_some(out_dir),
                keep,
            };
            return run_scale(&opts);
        }
        Cmd::RrServer {
            bind,
            timeout,
            each,
        } => {
            let timeout = Duration::from_secs(timeout);
            let served = if each {
                bench::crr_server(bind, timeout)
            } else {
                bench::rr_server(bind, timeout)
            };
            return match served {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vswitch-lab rr-server: {bind}: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Cmd::RrClient {
            connect,
            duration,
            each,
        } => {
            let d = Duration::try_from_secs_f64(duration).unwrap_or(Duration::from_secs(1));
            let client = if each {
                bench::crr_client(connect, d)
            } else {
                bench::rr_client(connect, d)
            };
            return match client {
                Ok(r) => {
                    println!("{}", r.to_json());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vswitch-lab rr-client: {connect}: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vswitch-lab: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, LabError> {
    let name = cli.name;
    match cli.cmd {
        Cmd::Up {
            nodes,
            pods_per_node,
            workers,
            datapath_cpus,
            busy_poll_us,
            ready_timeout,
            kubernetes,
        } => {
            let opts = UpOptions {
                ready_timeout: Duration::from_secs(ready_timeout),
                ..UpOptions::default()
            };
            let lab = Lab::up_with(
                LabSpec {
                    name,
                    nodes,
                    pods_per_node,
                    workers,
                    cpus: datapath_cpus,
                    busy_poll_us,
                    kubernetes,
                },
                &opts,
            )?;
            print!("{}", lab.status().to_table());
            if let Some(p) = lab.pods.first() {
                let other = lab.pods.last().map_or(p.ip, |q| q.ip);
                println!(
                    "\ntry: {} exec {} -- ping -c1 {other}",
                    self_command(&lab.name),
                    p.name
                );
            }
        }
        Cmd::Kubectl { args } => {
            let lab = Lab::load(&name)?;
            let status =
                lab.kubectl_command(&args)?
                    .status()
                    .map_err(|e| LabError::BenchCommand {
                        cmd: format!("kubectl {}", args.join(" ")),
                        reason: format!("{e} (kubectl is Debian's kubernetes-client package)"),
                    })?;
            if !status.success() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Status { json } => {
            let st = Lab::load(&name)?.status();
            if json {
                println!("{}", st.to_json());
            } else {
                print!("{}", st.to_table());
            }
        }
        Cmd::Down => {
            let report = Lab::teardown(&name)?;
            for w in &report.warnings {
                eprintln!("vswitch-lab: warning: {w}");
            }
            if !report.stopped.is_empty() {
                let list: Vec<String> = report
                    .stopped
                    .iter()
                    .map(|(comm, pid)| format!("{comm} (pid {pid})"))
                    .collect();
                println!(
                    "stopped {} process{} still running in the lab: {}",
                    list.len(),
                    if list.len() == 1 { "" } else { "es" },
                    list.join(", ")
                );
            }
            if report.found {
                println!("lab {name} is down");
            } else {
                println!("lab {name} does not exist; nothing to do");
            }
        }
        Cmd::Exec { pod, cmd } => {
            let lab = Lab::load(&name)?;
            let mut c = lab.command(&pod, &cmd)?;
            let status = c.status().map_err(|source| LabError::Spawn {
                cmd: cmd.join(" "),
                source,
            })?;
            return Ok(exit_code(status));
        }
        Cmd::AddPod {
            node,
            pod,
            namespace,
            labels,
            publish,
        } => {
            let mut lab = Lab::load(&name)?;
            let opts = vswitch_lab::PodOptions {
                namespace,
                labels: vswitch_lab::policy::parse_labels(&labels)?,
                host_ports: publish
                    .iter()
                    .map(|p| vswitch_lab::parse_publish(p))
                    .collect::<Result<_, _>>()?,
            };
            let p = lab.add_pod_with(node, &pod, &opts)?;
            println!("{} {} {} {}", p.name, p.netns, p.address(), p.mac);
        }
        Cmd::Label { pod, changes } => {
            let mut lab = Lab::load(&name)?;
            let p = lab.label(&pod, &changes)?;
            let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("{} {}", p.name, labels.join(","));
        }
        Cmd::Apply { files } => {
            let lab = Lab::load(&name)?;
            for f in files {
                for o in lab.apply(&f)? {
                    println!("{o} applied");
                }
            }
        }
        Cmd::Delete { files } => {
            let lab = Lab::load(&name)?;
            for f in files {
                for o in lab.delete(&f)? {
                    println!("{o} deleted");
                }
            }
        }
        Cmd::DelPod { pod } => {
            let mut lab = Lab::load(&name)?;
            lab.del_pod(&pod)?;
            println!("deleted {pod}");
        }
        Cmd::CheckPod { pod } => {
            Lab::load(&name)?.check_pod(&pod)?;
            println!("{pod}: ok");
        }
        Cmd::BenchSummary { files } => {
            use vswitch_lab::bench_summary::{runs_in, summarize, Run};
            let runs = if files.is_empty() {
                runs_in(Path::new("docs/benchmarks/runs"))
            } else {
                files.iter().map(|f| Run::read(f)).collect()
            };
            match runs {
                Ok(runs) if !runs.is_empty() => print!("{}", summarize(&runs)),
                Ok(_) => {
                    eprintln!("vswitch-lab bench-summary: no runs (docs/benchmarks/runs/*.json)");
                    return Ok(ExitCode::FAILURE);
                }
                Err(e) => {
                    eprintln!("vswitch-lab bench-summary: {e}");
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        Cmd::AddService {
            service: svc,
            ports,
            endpoints,
            cluster_ip,
            node_port,
        } => {
            let mut lab = Lab::load(&name)?;
            let spec = lab.add_service(&vswitch_lab::services::ServiceArgs {
                name: svc,
                ports,
                endpoints: endpoints.clone(),
                cluster_ip,
                node_port,
            })?;
            let ip = spec.cluster_ips[0];
            for p in &spec.ports {
                println!(
                    "{}/{} {ip}:{}/{} -> {} port {}{}",
                    spec.namespace,
                    spec.name,
                    p.port,
                    p.protocol.as_str(),
                    endpoints.join(","),
                    p.target_port.unwrap_or(p.port),
                    p.node_port
                        .map(|n| format!(", NodePort {n} on every node"))
                        .unwrap_or_default()
                );
            }
            let client = lab.pods.first().map_or("n1-p1", |p| p.name.as_str());
            println!(
                "\ntry: {} exec {client} -- getent hosts {}.{}.svc.cluster.local",
                self_command(&lab.name),
                spec.name,
                spec.namespace
            );
        }
        Cmd::DelService { service: svc } => {
            let mut lab = Lab::load(&name)?;
            lab.del_service(&svc)?;
            println!("deleted Service default/{svc}");
        }
        Cmd::Restart { node } => {
            let mut lab = Lab::load(&name)?;
            let idx = lab.node_index(&node)?;
            let started = std::time::Instant::now();
            let pid = lab.restart_daemon(idx, std::time::Duration::from_secs(30))?;
            println!(
                "{}: vswitchd restarted (pid {pid}), ready in {} ms",
                lab.nodes[idx].name,
                started.elapsed().as_millis()
            );
        }
        Cmd::Bench { .. }
        | Cmd::Soak { .. }
        | Cmd::Scale { .. }
        | Cmd::RrServer { .. }
        | Cmd::RrClient { .. } => {
            unreachable!("handled in main")
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How a user runs this program again, as they can type it: `deploy/lab.sh` when run through
/// it (it sets VSWITCH_LAB_CMD), else the path it was started by; with `--name` when not the
/// default lab.
fn self_command(name: &str) -> String {
    let prog = std::env::var("VSWITCH_LAB_CMD")
        .ok()
        .or_else(|| std::env::args().next())
        .unwrap_or_else(|| "vswitch-lab".into());
    if name == DEFAULT_NAME {
        prog
    } else {
        format!("{prog} --name {name}")
    }
}

/// `vswitch-lab bench`: progress on stderr, the table on stdout, then the files.
fn run_bench(opts: &BenchOptions) -> ExitCode {
    let report = match bench::run(opts, &mut |line| eprintln!("{line}")) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vswitch-lab bench: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!();
    print!("{}", report.to_table());
    if let Some(dir) = &opts.out_dir {
        match bench::write_outputs(&report, dir) {
            Ok(w) => {
                println!();
                for f in &w.files {
                    println!("wrote {}", f.display());
                }
                if let Some(why) = &w.png_skipped {
                    println!("no PNG chart: {why}");
                }
            }
            Err(e) => {
                eprintln!("vswitch-lab bench: error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    // Targets that fail are results, not errors; a datapath that could not be measured is.
    if report.datapath_errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `vswitch-lab soak`: progress on stderr, the report on stdout; failure if a check failed.
fn run_soak(name: String, duration: u64, pods: u32, rss_bound_mb: u64) -> ExitCode {
    let opts = vswitch_lab::soak::SoakOptions {
        name,
        duration: Duration::from_secs(duration),
        pods,
        rss_bound: rss_bound_mb << 20,
    };
    match vswitch_lab::soak::run(&opts, &mut |line| eprintln!("{line}")) {
        Ok(report) => {
            print!("{}", report.to_text(opts.rss_bound));
            if report.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("vswitch-lab soak: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_scale(opts: &vswitch_lab::scale::ScaleOptions) -> ExitCode {
    match vswitch_lab::scale::run(opts, &mut |line| eprintln!("{line}")) {
        Ok(report) => {
            print!("{}", report.to_text());
            if let Some(dir) = &opts.out_dir {
                match vswitch_lab::scale::write(dir, &report) {
                    Ok(files) => {
                        for f in files {
                            eprintln!("wrote {}", f.display());
                        }
                    }
                    Err(e) => {
                        eprintln!("vswitch-lab scale: error: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            if report.misses().is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("vswitch-lab scale: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The child's exit code, or 128 + signal as shells report it.
fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
