//! The lab itself: building it, finding it again, and taking it apart.
//!
//! `up` builds in the order a real cluster comes up (LAN, machines, daemons, pods) and saves the
//! state file after every step, so a failure or an interrupted command always leaves enough
//! behind for `down` to find. `down` does not need the state file at all: it also discovers the
//! lab's namespaces by name and its daemons by pid file, so it works on any partial lab and is a
//! no-op on none.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use conf::api::{Status, PATH_STATUS};
use conf::client::Client;
use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cni;
use crate::files;
use crate::spec::{self, LabNetns, LabSpec, Names};
use crate::status::{LabStatus, NodeStatus, OutsideStatus, PodStatus};
use crate::sys;
use crate::LabError;

/// Where labs live: `/run/vswitch-lab/NAME/`.
pub const RUN_DIR: &str = "/run/vswitch-lab";
/// The state file in a lab's directory.
pub const STATE_FILE: &str = "lab.json";
/// Overrides where the vswitchd and vswitch binaries are found.
pub const BIN_DIR_ENV: &str = "VSWITCH_BIN_DIR";
/// The daemon's binary name.
pub const VSWITCHD: &str = "vswitchd";
/// The CNI plugin's binary name.
pub const PLUGIN: &str = "vswitch";
/// The DaemonSet's install steps; the lab sets each node's kernel settings with it.
pub const INSTALL: &str = "vswitch-install";

const STATE_VERSION: u32 = 1;
/// How long vswitchd gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Knobs for [`Lab::up_with`].
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Where vswitchd and vswitch are; default: [`Lab::bin_dir`].
    pub bin_dir: Option<PathBuf>,
    /// How long each daemon gets to answer `ready` on /v1/status.
    pub ready_timeout: Duration,
    /// How long one plugin call may take.
    pub cni_timeout: Duration,
    /// Kubernetes mode: more files of objects the API server stand-in holds from the start
    /// (its `--load`, after the lab's Node objects), e.g. the cluster `vswitch-lab scale` makes.
    pub apiserver_load: Vec<PathBuf>,
}

impl Default for UpOptions {
    fn default() -> Self {
        UpOptions {
            bin_dir: None,
            ready_timeout: Duration::from_secs(10),
            cni_timeout: Duration::from_secs(60),
            apiserver_load: Vec::new(),
        }
    }
}

/// The paths of the binaries the lab runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    pub vswitchd: PathBuf,
    pub plugin: PathBuf,
    pub install: PathBuf,
}

impl Binaries {
    /// The binaries in `dir` (made absolute), or which one is missing.
    pub fn in_dir(dir: &Path) -> Result<Binaries, LabError> {
        let dir = std::path::absolute(dir).map_err(|e| LabError::io(dir, e))?;
        let bins = Binaries {
            vswitchd: dir.join(VSWITCHD),
            plugin: dir.join(PLUGIN),
            install: dir.join(INSTALL),
        };
        for p in [&bins.vswitchd, &bins.plugin, &bins.install] {
            if !p.is_file() {
                return Err(LabError::BinaryMissing { path: p.clone() });
            }
        }
        Ok(bins)
    }
}

/// A lab node: a network namespace standing in for a machine, running one vswitchd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// 1-based.
    pub index: u32,
    /// `{lab}-n{i}`: vswitchd's node.name.
    pub name: String,
    /// The node's namespace (same as the name).
    pub netns: String,
    /// The address on `ul0`, the node's link to the fabric.
    pub underlay_ip: Ipv4Addr,
    pub underlay_prefix_len: u8,
    pub pod_cidr: Ipv4Net,
    /// `/run/vswitch-lab/{lab}/n{i}`.
    pub dir: PathBuf,
    /// vswitchd's config file.
    pub config: PathBuf,
    pub admin_socket: PathBuf,
    /// The CNI netconf the lab hands the plugin for pods on this node.
    pub cni_netconf: PathBuf,
    /// vswitchd's stdout and stderr.
    pub log: PathBuf,
    /// vswitchd's pid once started.
    pub pid: Option<u32>,
    /// vswitchd's datapath workers (`datapath.workers`).
    #[serde(default = "one")]
    pub workers: u32,
    /// CPUs its workers are pinned to (`datapath.cpus`).
    #[serde(default)]
    pub cpus: Vec<u32>,
    /// `datapath.busy_poll_us`, when not vswitchd's default.
    #[serde(default)]
    pub busy_poll_us: Option<u32>,
    /// Kubernetes mode: the kubeconfig vswitchd watches the lab's API server with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<PathBuf>,
}

fn one() -> u32 {
    1
}

impl Node {
    /// Names and paths of node `i` of a lab whose directory is `lab_dir`.
    pub(crate) fn plan(names: Names<'_>, i: u32, lab_dir: &Path) -> Node {
        let dir = lab_dir.join(format!("n{i}"));
        Node {
            index: i,
            name: names.node(i),
            netns: names.node(i),
            underlay_ip: spec::underlay_ip(i),
            underlay_prefix_len: spec::UNDERLAY_PREFIX_LEN,
            pod_cidr: spec::pod_cidr(i),
            config: dir.join("vswitchd.toml"),
            admin_socket: dir.join("vswitchd.sock"),
            cni_netconf: dir.join("cni.conf"),
            log: dir.join("vswitchd.log"),
            pid: None,
            workers: 1,
            cpus: Vec::new(),
            busy_poll_us: None,
            kubeconfig: None,
            dir,
        }
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("vswitchd.pid")
    }

    /// Whether this node's vswitchd process is running.
    pub fn daemon_alive(&self) -> bool {
        self.pid
            .is_some_and(|pid| sys::process_alive(pid, self.config.as_os_str()))
    }

    /// Asks the daemon for its status.
    pub fn daemon_status(&self, timeout: Duration) -> Result<Status, String> {
        Client::new(&self.admin_socket)
            .with_timeout(timeout)
            .get::<Status>(PATH_STATUS)
            .map_err(|e| e.to_string())
    }

    /// An admin API client for this node's daemon.
    pub fn client(&self) -> Client {
        Client::new(&self.admin_socket)
    }
}

/// A pod: a network namespace attached by the CNI plugin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pod {
    /// `n{i}-{pod}`, unique in the lab.
    pub name: String,
    /// The Kubernetes pod name given in CNI_ARGS (`p{j}` for the pods `up` makes).
    pub k8s_name: String,
    /// The node's name.
    pub node: String,
    pub node_index: u32,
    /// `{lab}-n{i}-{pod}`; also the CNI container ID.
    pub netns: String,
    pub container_id: String,
    pub ifname: String,
    /// The pod's address, from the ADD result.
    pub ip: IpAddr,
    pub prefix_len: u8,
    pub mac: String,
    /// The plugin's ADD result, handed back as prevResult on DEL and CHECK.
    pub cni_result: Value,
    /// The Kubernetes namespace given in CNI_ARGS.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The pod's labels (the netconf's `args.cni.labels`, and its Pod manifest).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The pod's hostPorts (the netconf's `runtimeConfig.portMappings`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_ports: Vec<conf::api::PortMapping>,
}

fn default_namespace() -> String {
    "default".into()
}

/// What a pod is besides its name: its Kubernetes namespace and labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodOptions {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// hostPorts, passed as a runtime does for the `portMappings` capability.
    pub host_ports: Vec<conf::api::PortMapping>,
}

impl Default for PodOptions {
    fn default() -> Self {
        PodOptions {
            namespace: default_namespace(),
            labels: BTreeMap::new(),
            host_ports: Vec::new(),
        }
    }
}

impl Pod {
    /// CNI_NETNS of this pod.
    pub fn netns_path(&self) -> PathBuf {
        sys::netns_path(&self.netns)
    }

    /// The address with its prefix, as the CNI result gave it.
    pub fn address(&self) -> IpNet {
        IpNet::new(self.ip, self.prefix_len).unwrap_or_else(|_| IpNet::from(self.ip))
    }
}

/// What `down` could not do but did not stop for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DownReport {
    /// E.g. a CNI DEL that failed; cleanup went on regardless.
    pub warnings: Vec<String>,
    /// Whether there was anything to tear down at all.
    pub found: bool,
    /// Processes that were still running in the lab's namespaces (started with `exec`, say)
    /// and were stopped: command name and pid.
    pub stopped: Vec<(String, u32)>,
}

/// A running lab, as saved in `/run/vswitch-lab/NAME/lab.json`.
///
/// Dropping a `Lab` leaves it running (the CLI relies on that); wrap it in a [`LabGuard`] to tear
/// it down on drop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lab {
    pub version: u32,
    pub name: String,
    pub dir: PathBuf,
    /// Where vswitchd and vswitch were found at `up`.
    pub bin_dir: PathBuf,
    pub fabric_netns: String,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    /// Services added with `add-service`, in every node's config.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<conf::config::ServiceSpec>,
    /// The host outside the cluster (`vswitch-lab exec out -- ...`): its namespace, cabled to
    /// the fabric at [`spec::OUTSIDE_IP`] with no route to any pod CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outside_netns: Option<String>,
    /// Kubernetes mode (`up --kubernetes`): the API server stand-in every vswitchd watches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apiserver: Option<Box<crate::kube::ApiServerState>>,
}

impl Lab {
    /// The directory of the lab called `name`.
    pub fn dir_of(name: &str) -> PathBuf {
        Path::new(RUN_DIR).join(name)
    }

    /// Where vswitchd and vswitch are looked for: `$VSWITCH_BIN_DIR`, else the directory of the
    /// running executable (or its parent when that is cargo's `deps/`, as for test binaries).
    pub fn bin_dir() -> Result<PathBuf, LabError> {
        if let Some(d) = std::env::var_os(BIN_DIR_ENV).filter(|d| !d.is_empty()) {
            return Ok(PathBuf::from(d));
        }
        let exe = std::env::current_exe().map_err(|e| LabError::io("/proc/self/exe", e))?;
        let dir = exe.parent().unwrap_or(Path::new("/")).to_path_buf();
        if !dir.join(VSWITCHD).exists() && dir.file_name() == Some(OsStr::new("deps")) {
            if let Some(parent) = dir.parent() {
                return Ok(parent.to_path_buf());
            }
        }
        Ok(dir)
    }

    /// Builds a lab with default options. See [`Lab::up_with`].
    pub fn up(spec: LabSpec) -> Result<Lab, LabError> {
        Lab::up_with(spec, &UpOptions::default())
    }

    /// Builds a lab: fabric, nodes with their daemons, pods. On any failure everything built is
    /// torn down again and the error returned.
    pub fn up_with(spec: LabSpec, opts: &UpOptions) -> Result<Lab, LabError> {
        spec.validate()?;
        if !sys::is_root() {
            return Err(LabError::NotRoot);
        }
        let bin_dir = match &opts.bin_dir {
            Some(d) => d.clone(),
            None => Lab::bin_dir()?,
        };
        let bins = Binaries::in_dir(&bin_dir)?;
        let names = Names(&spec.name);
        let dir = Lab::dir_of(&spec.name);
        let exists = |what: String| LabError::Exists {
            name: spec.name.clone(),
            what,
        };
        if let Some(ns) = sys::netns_list()?
            .into_iter()
            .find(|ns| names.classify(ns).is_some())
        {
            return Err(exists(format!("network namespace {ns} exists")));
        }
        fs::create_dir_all(RUN_DIR).map_err(|e| LabError::io(RUN_DIR, e))?;
        let _ = fs::remove_dir_all(Lab::failed_logs_dir(&spec.name));
        // Creating the directory is what claims the name, atomically.
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                return Err(exists(format!("{} exists", dir.display())))
            }
            Err(e) => return Err(LabError::io(&dir, e)),
        }
        let policies = crate::policy::policy_dir(&dir);
        fs::create_dir(&policies).map_err(|e| LabError::io(&policies, e))?;
        let mut lab = Lab {
            version: STATE_VERSION,
            name: spec.name.clone(),
            dir,
            bin_dir: bins.plugin.parent().unwrap_or(Path::new("/")).to_path_buf(),
            fabric_netns: names.fabric_netns(),
            nodes: Vec::new(),
            pods: Vec::new(),
            services: Vec::new(),
            outside_netns: None,
            apiserver: None,
        };
        match lab.build(&spec, &bins, opts) {
            Ok(()) => Ok(lab),
            Err(mut error) => {
                // The rollback removes the lab's directory, logs included: keep them for the
                // error to point at.
                lab.keep_logs(&mut error);
                lab.roll_back(error)
            }
        }
    }

    /// Tears down what a failed `up` built and returns its error (with what the rollback could
    /// not undo, if anything).
    fn roll_back(&self, error: LabError) -> Result<Lab, LabError> {
        match Lab::teardown(&self.name) {
            Ok(_) => Err(error),
            Err(LabError::Teardown { problems, .. }) => Err(LabError::RollbackFailed {
                name: self.name.clone(),
                error: Box::new(error),
                problems,
            }),
            Err(other) => Err(LabError::RollbackFailed {
                name: self.name.clone(),
                error: Box::new(error),
                problems: vec![other.to_string()],
            }),
        }
    }

    fn build(&mut self, spec: &LabSpec, bins: &Binaries, opts: &UpOptions) -> Result<(), LabError> {
        self.save()?;
        let fab = self.fabric_netns.clone();
        sys::ip(&["netns", "add", &fab])?;
        sys::ip(&["-n", &fab, "link", "set", "lo", "up"])?;
        sys::ip(&[
            "-n",
            &fab,
            "link",
            "add",
            spec::FABRIC_BRIDGE,
            "type",
            "bridge",
        ])?;
        sys::ip(&["-n", &fab, "link", "set", spec::FABRIC_BRIDGE, "up"])?;

        let names = Names(&spec.name);
        // The outside host: on the nodes' LAN, routes to nothing else.
        let out = names.outside_netns();
        sys::ip(&["netns", "add", &out])?;
        self.outside_netns = Some(out.clone());
        self.save()?;
        sys::ip(&["-n", &out, "link", "set", "lo", "up"])?;
        let addr = format!("{}/{}", spec::OUTSIDE_IP, spec::UNDERLAY_PREFIX_LEN);
        self.cable_to_fabric(&out, "eth0", &names.outside_port(), &addr, None)?;
        let kubeconfig = spec
            .kubernetes
            .then(|| crate::kube::ApiServerState::plan(&self.dir, &self.fabric_netns).kubeconfig);
        let planned: Vec<Node> = (1..=spec.nodes)
            .map(|i| Node {
                workers: spec.workers,
                cpus: spec.cpus.clone(),
                busy_poll_us: spec.busy_poll_us,
                kubeconfig: kubeconfig.clone(),
                ..Node::plan(names, i, &self.dir)
            })
            .collect();
        if spec.kubernetes {
            let exe = self.bin_dir.join(crate::kube::APISERVER);
            if !exe.is_file() {
                return Err(LabError::BinaryMissing { path: exe });
            }
            self.start_apiserver(&exe, &planned, &opts.apiserver_load)?;
        }
        let mut daemons: Vec<(usize, Child, Instant)> = Vec::new();
        for node in &planned {
            self.nodes.push(node.clone());
            self.save()?;
            self.build_node(node, &planned, bins)?;
            let child = sys::spawn_daemon(&node.netns, &bins.vswitchd, &node.config, &node.log)?;
            let pid = child.id();
            let idx = self.nodes.len() - 1;
            self.nodes[idx].pid = Some(pid);
            write(&node.pid_file(), format!("{pid}\n"))?;
            self.save()?;
            daemons.push((idx, child, Instant::now()));
        }
        for (idx, mut child, started) in daemons {
            wait_ready(&self.nodes[idx], &mut child, started, opts.ready_timeout)?;
        }

        for i in 1..=spec.nodes {
            for j in 1..=spec.pods_per_node {
                self.attach(
                    i,
                    &format!("p{j}"),
                    &PodOptions::default(),
                    &bins.plugin,
                    opts.cni_timeout,
                )?;
            }
        }
        Ok(())
    }

    /// Where a failed `up` keeps the nodes' vswitchd logs: `/run/vswitch-lab/NAME.logs/`.
    pub fn failed_logs_dir(name: &str) -> PathBuf {
        Path::new(RUN_DIR).join(format!("{name}.logs"))
    }

    /// Copies each node's vswitchd log to [`Lab::failed_logs_dir`] (as `nI-vswitchd.log`) and
    /// points `error` at the copy.
    fn keep_logs(&self, error: &mut LabError) {
        let kept = Lab::failed_logs_dir(&self.name);
        if fs::create_dir_all(&kept).is_err() {
            return;
        }
        for node in &self.nodes {
            let to = kept.join(format!("n{}-vswitchd.log", node.index));
            if fs::copy(&node.log, &to).is_ok() {
                match error {
                    LabError::DaemonNotReady { log, .. } | LabError::DaemonExited { log, .. }
                        if *log == node.log =>
                    {
                        *log = to
                    }
                    _ => {}
                }
            }
        }
        // Nothing to keep (no daemon had started): no empty directory either.
        let _ = fs::remove_dir(&kept);
    }

    /// Cables namespace `netns` to the fabric: a veth `ifname` there with `address` (and
    /// `mtu`, if given), whose peer `port` is enslaved to the fabric bridge. Nodes are cabled so;
    /// so is a host on the same LAN that is not a node (the tests' outside client). Both ends
    /// are created in their namespaces: the host's namespace never sees either.
    pub fn cable_to_fabric(
        &self,
        netns: &str,
        ifname: &str,
        port: &str,
        address: &str,
        mtu: Option<u32>,
    ) -> Result<(), LabError> {
        let fabric = self.fabric_netns.as_str();
        sys::ip(&[
            "link", "add", ifname, "netns", netns, "type", "veth", "peer", "name", port, "netns",
            fabric,
        ])?;
        let mtu = mtu.map(|m| m.to_string());
        let mtu_args: Vec<&str> = match &mtu {
            Some(m) => vec!["mtu", m],
            None => Vec::new(),
        };
        let mut args = vec!["-n", fabric, "link", "set", port];
        args.extend(&mtu_args);
        args.extend(["master", spec::FABRIC_BRIDGE, "up"]);
        sys::ip(&args)?;
        sys::ip(&["-n", netns, "addr", "add", address, "dev", ifname])?;
        let mut args = vec!["-n", netns, "link", "set", ifname];
        args.extend(&mtu_args);
        args.push("up");
        sys::ip(&args)?;
        Ok(())
    }

    /// Node namespace, its underlay link to the fabric, its kernel settings, and its files.
    fn build_node(&self, node: &Node, all: &[Node], bins: &Binaries) -> Result<(), LabError> {
        let ns = node.netns.as_str();
        let port = Names(&self.name).fabric_port(node.index);
        sys::ip(&["netns", "add", ns])?;
        sys::ip(&["-n", ns, "link", "set", "lo", "up"])?;
        let addr = format!("{}/{}", node.underlay_ip, node.underlay_prefix_len);
        self.cable_to_fabric(
            ns,
            spec::UNDERLAY_IFNAME,
            &port,
            &addr,
            Some(spec::UNDERLAY_MTU),
        )?;
        // What a Kubernetes node has and a fresh namespace may lack (it copies the host's IPv4
        // settings): set by the DaemonSet's own step, as on a node.
        let node_ip = node.underlay_ip.to_string();
        sys::run(
            Command::new("ip")
                .args(["netns", "exec", ns])
                .arg(&bins.install)
                .args(["sysctls", "--node-ip", &node_ip]),
        )?;
        let state_dir = node.dir.join("state");
        fs::create_dir_all(&state_dir).map_err(|e| LabError::io(&state_dir, e))?;
        write(&node.config, files::render_config(node, all, &[])?)?;
        write(
            &node.cni_netconf,
            files::render_netconf(&self.name, &node.admin_socket)?,
        )?;
        Ok(())
    }

    /// Creates a pod namespace and attaches it with CNI ADD; on failure DELs and removes it.
    fn attach(
        &mut self,
        node_index: u32,
        pod: &str,
        opts: &PodOptions,
        plugin: &Path,
        timeout: Duration,
    ) -> Result<&Pod, LabError> {
        spec::validate_pod_name(pod)?;
        spec::validate_namespace(&opts.namespace)?;
        let args = cni::k8s_args_in(&opts.namespace, pod);
        let node = self
            .nodes
            .iter()
            .find(|n| n.index == node_index)
            .cloned()
            .ok_or_else(|| LabError::NoSuchTarget {
                lab: self.name.clone(),
                what: "node",
                target: format!("n{node_index}"),
                known: self.known_nodes(),
            })?;
        let short = Names::pod_short(node_index, pod);
        let netns = Names(&self.name).pod_netns(node_index, pod);
        if self.find_pod(&short).is_some() || sys::netns_exists(&netns) {
            return Err(LabError::PodExists {
                lab: self.name.clone(),
                pod: short,
            });
        }
        sys::ip(&["netns", "add", &netns])?;
        let added = sys::ip(&["-n", &netns, "link", "set", "lo", "up"]).and_then(|_| {
            let netconf = cni::with_labels(&read(&node.cni_netconf)?, &opts.labels)
                .and_then(|n| cni::with_port_mappings(&n, &opts.host_ports))
                .map_err(|message| LabError::Cni {
                    command: "ADD",
                    pod: short.clone(),
                    message,
                })?;
            let call = cni::Call {
                plugin,
                node_netns: Some(&node.netns),
                command: "ADD",
                container_id: &netns,
                netns: Some(sys::netns_path(&netns)),
                ifname: spec::POD_IFNAME,
                args: args.clone(),
                netconf,
                timeout,
            };
            let cni_err = |message| LabError::Cni {
                command: "ADD",
                pod: short.clone(),
                message,
            };
            let result = cni::invoke(call).map_err(cni_err)?;
            let added = cni::parse_add_result(&result, spec::POD_IFNAME).map_err(cni_err)?;
            Ok((result, added))
        });
        let (result, added) = match added {
            Ok(r) => r,
            Err(e) => {
                // As a runtime does after a failed ADD: DEL, then drop the sandbox.
                let _ = cni_del_raw(
                    plugin,
                    &node,
                    &netns,
                    spec::POD_IFNAME,
                    &args,
                    &Value::Null,
                    timeout,
                );
                let _ = sys::netns_del(&netns);
                return Err(e);
            }
        };
        sys::write_resolv_conf(&netns, &result);
        self.pods.push(Pod {
            name: short,
            k8s_name: pod.to_string(),
            node: node.name.clone(),
            node_index,
            netns: netns.clone(),
            container_id: netns,
            ifname: spec::POD_IFNAME.into(),
            ip: added.ip(),
            prefix_len: added.address.prefix_len(),
            mac: added.mac,
            cni_result: result,
            namespace: opts.namespace.clone(),
            labels: opts.labels.clone(),
            host_ports: opts.host_ports.clone(),
        });
        self.save()?;
        let pod = &self.pods[self.pods.len() - 1];
        self.publish_pod(pod)?;
        Ok(pod)
    }

    /// Starts the vswitchd of `self.nodes[idx]` again with the binary next to the tests, and
    /// waits up to `ready_timeout` until it is ready. A daemon of the node that still runs
    /// hands the node over to the new one (an upgrade without an outage) and is then stopped
    /// (SIGTERM, then SIGKILL), so no process outlives the lab; after a test stopped or killed
    /// it there is nothing to stop. The new pid is recorded as at `up`, so
    /// teardown stops this process.
    pub fn restart_daemon(&mut self, idx: usize, ready_timeout: Duration) -> Result<u32, LabError> {
        let bins = Binaries::in_dir(&Lab::bin_dir()?)?;
        let node = self
            .nodes
            .get(idx)
            .cloned()
            .ok_or_else(|| LabError::NoSuchTarget {
                lab: self.name.clone(),
                what: "node",
                target: format!("#{idx}"),
                known: self.known_nodes(),
            })?;
        // The new vswitchd asks the running one to hand the node over before it touches
        // anything (see vswitch's control::handover); once the new one is ready the old one,
        // idle since, is stopped, as the DaemonSet's rolling update deletes the old pod.
        let started = Instant::now();
        let mut child = sys::spawn_daemon(&node.netns, &bins.vswitchd, &node.config, &node.log)?;
        let pid = child.id();
        self.nodes[idx].pid = Some(pid);
        write(&node.pid_file(), format!("{pid}\n"))?;
        self.save()?;
        let ready = wait_ready(&node, &mut child, started, ready_timeout);
        if let Some(old) = node.pid {
            sys::stop_process(old, node.config.as_os_str(), STOP_GRACE).map_err(|message| {
                LabError::DaemonStop {
                    node: node.name.clone(),
                    message,
                }
            })?;
        }
        ready?;
        Ok(pid)
    }

    /// Adds a pod named `pod` on node `node_index` (1-based), as a runtime would.
    pub fn add_pod(&mut self, node_index: u32, pod: &str) -> Result<&Pod, LabError> {
        self.add_pod_with(node_index, pod, &PodOptions::default())
    }

    /// [`Lab::add_pod`] in a namespace and with labels.
    pub fn add_pod_with(
        &mut self,
        node_index: u32,
        pod: &str,
        opts: &PodOptions,
    ) -> Result<&Pod, LabError> {
        let bins = self.binaries()?;
        self.attach(
            node_index,
            pod,
            opts,
            &bins.plugin,
            UpOptions::default().cni_timeout,
        )
    }

    /// Detaches a pod with CNI DEL and removes its namespace. If DEL fails the pod is kept.
    pub fn del_pod(&mut self, name: &str) -> Result<(), LabError> {
        let pod = self.try_pod(name)?.clone();
        let bins = self.binaries()?;
        let node = self.node_of(&pod)?;
        cni_del_raw(
            &bins.plugin,
            &node,
            &pod.container_id,
            &pod.ifname,
            &cni::k8s_args_in(&pod.namespace, &pod.k8s_name),
            &pod.cni_result,
            UpOptions::default().cni_timeout,
        )
        .map_err(|message| LabError::Cni {
            command: "DEL",
            pod: pod.name.clone(),
            message,
        })?;
        sys::netns_del(&pod.netns)?;
        self.unpublish_pod(&pod);
        self.pods.retain(|p| p.name != pod.name);
        self.save()
    }

    /// Runs CNI CHECK for a pod, as a runtime does to verify an attachment.
    pub fn check_pod(&self, name: &str) -> Result<(), LabError> {
        let pod = self.try_pod(name)?;
        let bins = self.binaries()?;
        let node = self.node_of(pod)?;
        let cni_err = |message| LabError::Cni {
            command: "CHECK",
            pod: pod.name.clone(),
            message,
        };
        let netconf =
            cni::with_prev_result(&read(&node.cni_netconf)?, &pod.cni_result).map_err(cni_err)?;
        cni::invoke(cni::Call {
            plugin: &bins.plugin,
            node_netns: Some(&node.netns)
                .filter(|ns| sys::netns_exists(ns))
                .map(|s| s.as_str()),
            command: "CHECK",
            container_id: &pod.container_id,
            netns: Some(pod.netns_path()),
            ifname: &pod.ifname,
            args: cni::k8s_args_in(&pod.namespace, &pod.k8s_name),
            netconf,
            timeout: UpOptions::default().cni_timeout,
        })
        .map(drop)
        .map_err(cni_err)
    }

    fn binaries(&self) -> Result<Binaries, LabError> {
        Binaries::in_dir(&self.bin_dir).or_else(|_| Binaries::in_dir(&Lab::bin_dir()?))
    }

    pub(crate) fn node_of(&self, pod: &Pod) -> Result<Node, LabError> {
        self.nodes
            .iter()
            .find(|n| n.index == pod.node_index)
            .cloned()
            .ok_or_else(|| LabError::NoSuchTarget {
                lab: self.name.clone(),
                what: "node",
                target: pod.node.clone(),
                known: self.known_nodes(),
            })
    }

    /// Reads the state of the lab called `name`.
    pub fn load(name: &str) -> Result<Lab, LabError> {
        spec::validate_name(name)?;
        let path = Lab::dir_of(name).join(STATE_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(LabError::NotFound {
                    name: name.into(),
                    path,
                })
            }
            Err(e) => return Err(LabError::io(&path, e)),
        };
        let lab = Lab::from_json(&text).map_err(|message| LabError::State {
            name: name.into(),
            path: path.clone(),
            message,
        })?;
        if lab.name != name {
            return Err(LabError::State {
                name: name.into(),
                path,
                message: format!("it describes lab {:?}", lab.name),
            });
        }
        Ok(lab)
    }

    /// Parses a state document.
    pub fn from_json(text: &str) -> Result<Lab, String> {
        let lab: Lab = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if lab.version != STATE_VERSION {
            return Err(format!(
                "state version {} is not {STATE_VERSION}; it was written by another vswitch-lab",
                lab.version
            ));
        }
        Ok(lab)
    }

    /// The state document.
    pub fn to_json(&self) -> String {
        // Plain data with string keys: serialising cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }

    /// Writes the state file (atomically: a reader never sees half of it).
    pub fn save(&self) -> Result<(), LabError> {
        let path = self.dir.join(STATE_FILE);
        let tmp = self.dir.join(format!(".{STATE_FILE}.tmp"));
        write(&tmp, self.to_json())?;
        fs::rename(&tmp, &path).map_err(|e| LabError::io(&path, e))
    }

    /// Live status: the saved state plus whether each daemon is alive and ready.
    pub fn status(&self) -> LabStatus {
        let nodes = self
            .nodes
            .iter()
            .map(|n| {
                let alive = n.daemon_alive();
                let ready = alive
                    && n.daemon_status(Duration::from_secs(1))
                        .is_ok_and(|s| s.ready);
                NodeStatus {
                    name: n.name.clone(),
                    netns: n.netns.clone(),
                    underlay_ip: n.underlay_ip,
                    pod_cidr: n.pod_cidr,
                    admin_socket: n.admin_socket.clone(),
                    cni_netconf: n.cni_netconf.clone(),
                    pid: n.pid,
                    alive,
                    ready,
                }
            })
            .collect();
        let pods = self
            .pods
            .iter()
            .map(|p| PodStatus {
                name: p.name.clone(),
                node: p.node.clone(),
                netns: p.netns.clone(),
                ip: p.ip,
                mac: p.mac.clone(),
                namespace: p.namespace.clone(),
                labels: p.labels.clone(),
                host_ports: p.host_ports.iter().map(ToString::to_string).collect(),
            })
            .collect();
        LabStatus {
            name: self.name.clone(),
            nodes,
            pods,
            policy_dir: self.policy_dir(),
            outside: self.outside_netns.as_ref().map(|ns| OutsideStatus {
                name: "out".into(),
                netns: ns.clone(),
                ip: spec::OUTSIDE_IP,
            }),
            apiserver: self.apiserver.as_ref().map(|a| a.address.clone()),
            kubeconfig: self.apiserver.as_ref().map(|a| a.kubeconfig.clone()),
        }
    }

    /// A pod by its lab name (`n1-p1`) or namespace (`vsl-n1-p1`).
    pub fn find_pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name || p.netns == name)
    }

    /// Like [`Lab::find_pod`], with an error listing the pods there are.
    pub fn try_pod(&self, name: &str) -> Result<&Pod, LabError> {
        self.find_pod(name).ok_or_else(|| LabError::NoSuchTarget {
            lab: self.name.clone(),
            what: "pod",
            target: name.into(),
            known: self.known_pods(),
        })
    }

    /// A pod by name, for tests.
    ///
    /// # Panics
    /// If there is no such pod.
    pub fn pod(&self, name: &str) -> &Pod {
        match self.try_pod(name) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    }

    /// A node by its short name (`n1`) or full name (`vsl-n1`).
    pub fn find_node(&self, name: &str) -> Option<&Node> {
        self.node_position(name).map(|i| &self.nodes[i])
    }

    fn node_position(&self, name: &str) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| n.name == name || format!("n{}", n.index) == name)
    }

    /// The index in `nodes` of a node named as [`Lab::find_node`] takes it, or an error that
    /// lists the lab's nodes.
    pub fn node_index(&self, name: &str) -> Result<usize, LabError> {
        self.node_position(name)
            .ok_or_else(|| LabError::NoSuchTarget {
                lab: self.name.clone(),
                what: "node",
                target: name.to_string(),
                known: self.known_nodes(),
            })
    }

    /// A node by name, for tests.
    ///
    /// # Panics
    /// If there is no such node.
    pub fn node(&self, name: &str) -> &Node {
        match self.find_node(name) {
            Some(n) => n,
            None => panic!(
                "lab {} has no node {name:?}; it has: {}",
                self.name,
                self.known_nodes()
            ),
        }
    }

    fn known_pods(&self) -> String {
        let v: Vec<&str> = self.pods.iter().map(|p| p.name.as_str()).collect();
        if v.is_empty() {
            "no pods".into()
        } else {
            v.join(", ")
        }
    }

    fn known_nodes(&self) -> String {
        let v: Vec<String> = self.nodes.iter().map(|n| format!("n{}", n.index)).collect();
        v.join(", ")
    }

    /// The namespace of a pod (`n1-p1`, `vsl-n1-p1`), a node (`n1`, `vsl-n1`) or the fabric
    /// (`fab`, `vsl-fab`).
    pub fn netns_of(&self, target: &str) -> Result<&str, LabError> {
        if let Some(p) = self.find_pod(target) {
            return Ok(&p.netns);
        }
        if let Some(n) = self.find_node(target) {
            return Ok(&n.netns);
        }
        if target == "fab" || target == self.fabric_netns {
            return Ok(&self.fabric_netns);
        }
        if let Some(out) = self
            .outside_netns
            .as_deref()
            .filter(|o| target == "out" || target == *o)
        {
            return Ok(out);
        }
        Err(LabError::NoSuchTarget {
            lab: self.name.clone(),
            what: "pod or node",
            target: target.into(),
            known: format!(
                "{}, {}, fab{}",
                self.known_pods(),
                self.known_nodes(),
                if self.outside_netns.is_some() {
                    ", out"
                } else {
                    ""
                }
            ),
        })
    }

    /// A command that runs `argv` in a target's namespace (see [`Lab::netns_of`]). When the
    /// lab's datapath has cores of its own (`--datapath-cpus`), a pod's program runs on the
    /// other CPUs (`taskset -c`), as kubelet's reserved CPUs would place it.
    pub fn command<S: AsRef<OsStr>>(&self, target: &str, argv: &[S]) -> Result<Command, LabError> {
        let ns = self.netns_of(target)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]);
        if self.find_pod(target).is_some() {
            if let Some(cpus) = self.pod_cpus()? {
                cmd.args(["taskset", "-c", &cpus]);
            }
        }
        cmd.args(argv);
        Ok(cmd)
    }

    /// The CPUs pods' programs run on (a `taskset -c` list) when the datapath has cores of its
    /// own: all this process may use but those; `None` when the datapath is not pinned.
    pub fn pod_cpus(&self) -> Result<Option<String>, LabError> {
        let reserved = self.datapath_cpus();
        if reserved.is_empty() {
            return Ok(None);
        }
        sys::cpus_besides(&reserved)
            .map(Some)
            .map_err(LabError::InvalidSpec)
    }

    /// Every CPU some node's datapath is pinned to.
    pub fn datapath_cpus(&self) -> Vec<u32> {
        let mut all: Vec<u32> = self.nodes.iter().flat_map(|n| n.cpus.clone()).collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Runs `argv` in a pod's (or node's) namespace and collects its output.
    pub fn exec<S: AsRef<OsStr>>(&self, target: &str, argv: &[S]) -> Result<Output, LabError> {
        let mut cmd = self.command(target, argv)?;
        cmd.output().map_err(|source| LabError::Spawn {
            cmd: sys::describe(&cmd),
            source,
        })
    }

    /// Tears the lab down. See [`Lab::teardown`].
    pub fn down(&self) -> Result<DownReport, LabError> {
        Lab::teardown(&self.name)
    }

    /// Tears down the lab called `name` from whatever exists of it: CNI DEL for every pod (a
    /// failure is a warning), SIGTERM (then SIGKILL) each daemon, delete every namespace of the
    /// lab, remove its directory. Succeeds when nothing exists.
    pub fn teardown(name: &str) -> Result<DownReport, LabError> {
        spec::validate_name(name)?;
        if !sys::is_root() {
            return Err(LabError::NotRoot);
        }
        let names = Names(name);
        let dir = Lab::dir_of(name);
        let mut report = DownReport::default();
        let mut problems = Vec::new();

        let state = match Lab::load(name) {
            Ok(lab) => Some(lab),
            Err(LabError::NotFound { .. }) => None,
            Err(e) => {
                report
                    .warnings
                    .push(format!("{e}; cleaning up what can be found by name"));
                None
            }
        };
        let mut netns: Vec<(LabNetns, String)> = match sys::netns_list() {
            Ok(list) => list
                .into_iter()
                .filter_map(|ns| names.classify(&ns).map(|k| (k, ns)))
                .collect(),
            Err(e) => {
                problems.push(e.to_string());
                Vec::new()
            }
        };
        netns.sort();
        report.found = dir.exists() || !netns.is_empty();

        // Nodes: from the state, else re-derived from whatever pid files are left.
        let mut nodes: Vec<Node> = state.as_ref().map(|l| l.nodes.clone()).unwrap_or_default();
        for i in node_dirs(&dir) {
            if !nodes.iter().any(|n| n.index == i) {
                nodes.push(Node::plan(names, i, &dir));
            }
        }
        for n in &mut nodes {
            if n.pid.is_none() {
                n.pid = fs::read_to_string(n.pid_file())
                    .ok()
                    .and_then(|s| s.trim().parse().ok());
            }
        }

        // 1. CNI DEL, while the daemons still run.
        let bins = state
            .as_ref()
            .and_then(|l| Binaries::in_dir(&l.bin_dir).ok())
            .or_else(|| Lab::bin_dir().ok().and_then(|d| Binaries::in_dir(&d).ok()));
        let mut dels: Vec<(String, Node, String, String, Value)> = Vec::new();
        let mut seen = BTreeSet::new();
        if let Some(lab) = &state {
            for p in &lab.pods {
                if let Some(n) = nodes.iter().find(|n| n.index == p.node_index) {
                    seen.insert(p.netns.clone());
                    dels.push((
                        p.name.clone(),
                        n.clone(),
                        p.container_id.clone(),
                        p.k8s_name.clone(),
                        p.cni_result.clone(),
                    ));
                }
            }
        }
        for (kind, ns) in &netns {
            if let LabNetns::Pod(i, pod) = kind {
                let node = nodes.iter().find(|n| n.index == *i);
                // A pod the state does not know: DEL it only if its daemon may be listening.
                if let Some(n) = node.filter(|n| !seen.contains(ns) && n.admin_socket.exists()) {
                    dels.push((
                        Names::pod_short(*i, pod),
                        n.clone(),
                        ns.clone(),
                        pod.clone(),
                        Value::Null,
                    ));
                }
            }
        }
        for (pod, node, container_id, k8s_name, prev) in &dels {
            let Some(bins) = &bins else {
                report.warnings.push(format!(
                    "CNI DEL of pod {pod} skipped: the vswitch plugin is not found \
                     (build with `cargo build --workspace --bins` or set {BIN_DIR_ENV})"
                ));
                continue;
            };
            let r = cni_del_raw(
                &bins.plugin,
                node,
                container_id,
                spec::POD_IFNAME,
                &cni::k8s_args(k8s_name),
                prev,
                Duration::from_secs(30),
            );
            if let Err(e) = r {
                report
                    .warnings
                    .push(format!("CNI DEL of pod {pod} failed: {e}"));
            }
        }

        // 2. Daemons: the pid the state knows and the pid file's (a daemon restarted by hand
        // updates only the latter); stop_process checks each is really this node's vswitchd.
        for n in &nodes {
            let from_file: Option<u32> = fs::read_to_string(n.pid_file())
                .ok()
                .and_then(|s| s.trim().parse().ok());
            let mut pids: Vec<u32> = n.pid.into_iter().chain(from_file).collect();
            pids.dedup();
            for pid in pids {
                if let Err(e) = sys::stop_process(pid, n.config.as_os_str(), STOP_GRACE) {
                    problems.push(format!("node {}: {e}", n.name));
                }
            }
        }

        // The API server stand-in (Kubernetes mode), by its pid file: the process whose
        // arguments name this lab's address file.
        let api_addr = crate::kube::ApiServerState::plan(&dir, &names.fabric_netns()).address_file;
        let api_pids: Vec<u32> = state
            .as_ref()
            .and_then(|l| l.apiserver.as_ref())
            .and_then(|a| a.pid)
            .into_iter()
            .chain(
                fs::read_to_string(crate::kube::ApiServerState::pid_file(&dir))
                    .ok()
                    .and_then(|s| s.trim().parse().ok()),
            )
            .collect();
        for pid in api_pids {
            if let Err(e) = sys::stop_process(pid, api_addr.as_os_str(), STOP_GRACE) {
                problems.push(format!("API server stand-in: {e}"));
            }
        }

        // Whatever else still runs in the lab's namespaces (a server started with `exec`): a
        // namespace with a process in it outlives `ip netns del`, and the process with it. All
        // namespaces at once, so they share one grace period.
        let lab_netns: Vec<&str> = netns.iter().map(|(_, ns)| ns.as_str()).collect();
        match sys::stop_netns_processes(&lab_netns, STOP_GRACE) {
            Ok(found) => report
                .stopped
                .extend(found.into_iter().map(|(pid, comm)| (comm, pid))),
            Err(e) => problems.push(e),
        }

        // Pods' resolv.conf for namespaces already gone (deleted by hand or by a test).
        if let Ok(entries) = fs::read_dir("/etc/netns") {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if names.classify(&n).is_some() {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }

        // 3. Namespaces: pods, then nodes, then the fabric (the order LabNetns sorts in).
        for (_, ns) in &netns {
            if let Err(e) = sys::netns_del(ns) {
                problems.push(e.to_string());
            }
        }

        // 4. Files.
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                problems.push(LabError::io(&dir, e).to_string())
            }
            _ => {}
        }

        if problems.is_empty() {
            Ok(report)
        } else {
            problems.extend(report.warnings.iter().map(|w| format!("warning: {w}")));
            Err(LabError::Teardown {
                name: name.into(),
                problems,
            })
        }
    }
}

/// Node indexes of the `n{i}` directories in a lab directory.
fn node_dirs(dir: &Path) -> Vec<u32> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let i: u32 = name.strip_prefix('n')?.parse().ok()?;
            (format!("n{i}") == name).then_some(i)
        })
        .collect()
}

/// CNI DEL as a runtime sends it: prevResult from the ADD, CNI_NETNS empty if it is gone.
fn cni_del_raw(
    plugin: &Path,
    node: &Node,
    container_id: &str,
    ifname: &str,
    args: &str,
    prev: &Value,
    timeout: Duration,
) -> Result<(), String> {
    let netconf =
        fs::read(&node.cni_netconf).map_err(|e| format!("{}: {e}", node.cni_netconf.display()))?;
    let netconf = cni::with_prev_result(&netconf, prev)?;
    let netns = Some(sys::netns_path(container_id)).filter(|p| p.exists());
    cni::invoke(cni::Call {
        plugin,
        node_netns: Some(node.netns.as_str()).filter(|ns| sys::netns_exists(ns)),
        command: "DEL",
        container_id,
        netns,
        ifname,
        args: args.to_string(),
        netconf,
        timeout,
    })
    .map(drop)
}

/// Waits until the daemon answers ready, fails early if it exits.
fn wait_ready(
    node: &Node,
    child: &mut Child,
    started: Instant,
    timeout: Duration,
) -> Result<(), LabError> {
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(LabError::DaemonExited {
                node: node.name.clone(),
                status: status.to_string(),
                log: node.log.clone(),
                tail: sys::log_tail(&node.log, 20),
            });
        }
        let last = match node.daemon_status(Duration::from_secs(1)) {
            // The socket may still lead to the vswitchd this one takes the node over from.
            Ok(s) if s.pid != 0 && s.pid != child.id() => {
                format!("/v1/status answered by pid {}, not the new one", s.pid)
            }
            Ok(s) if s.ready => return Ok(()),
            Ok(_) => "/v1/status says ready: false".to_string(),
            Err(e) => e,
        };
        if started.elapsed() >= timeout {
            return Err(LabError::DaemonNotReady {
                node: node.name.clone(),
                waited: started.elapsed(),
                last,
                log: node.log.clone(),
                tail: sys::log_tail(&node.log, 20),
            });
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn write(path: &Path, contents: impl AsRef<[u8]>) -> Result<(), LabError> {
    fs::write(path, contents).map_err(|e| LabError::io(path, e))
}

fn read(path: &Path) -> Result<Vec<u8>, LabError> {
    fs::read(path).map_err(|e| LabError::io(path, e))
}

/// Owns a lab and tears it down when dropped: for tests.
#[derive(Debug)]
pub struct LabGuard(Option<Lab>);

impl LabGuard {
    pub fn new(lab: Lab) -> Self {
        LabGuard(Some(lab))
    }

    /// Builds a lab that is torn down when the guard drops.
    pub fn up(spec: LabSpec) -> Result<LabGuard, LabError> {
        Lab::up(spec).map(LabGuard::new)
    }

    /// Gives the lab back without tearing it down.
    pub fn into_inner(mut self) -> Lab {
        // The guard is built with Some and only emptied here or in drop.
        self.0
            .take()
            .expect("LabGuard holds a lab until it is consumed")
    }
}

impl std::ops::Deref for LabGuard {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        self.0
            .as_ref()
            .expect("LabGuard holds a lab until it is consumed")
    }
}

impl std::ops::DerefMut for LabGuard {
    fn deref_mut(&mut self) -> &mut Lab {
        self.0
            .as_mut()
            .expect("LabGuard holds a lab until it is consumed")
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Some(lab) = self.0.take() {
            match lab.down() {
                Ok(r) => {
                    for w in r.warnings {
                        eprintln!("vswitch-lab: down {}: {w}", lab.name);
                    }
                }
                Err(e) => eprintln!("vswitch-lab: down {}: {e}", lab.name),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Lab {
        let names = Names("vsl");
        let dir = Lab::dir_of("vsl");
        let mut n1 = Node::plan(names, 1, &dir);
        n1.pid = Some(4242);
        Lab {
            version: STATE_VERSION,
            name: "vsl".into(),
            bin_dir: "/opt/vswitch/bin".into(),
            fabric_netns: names.fabric_netns(),
            nodes: vec![n1, Node::plan(names, 2, &dir)],
            pods: vec![Pod {
                name: "n1-p1".into(),
                k8s_name: "p1".into(),
                node: "vsl-n1".into(),
                node_index: 1,
                netns: "vsl-n1-p1".into(),
                container_id: "vsl-n1-p1".into(),
                ifname: "eth0".into(),
                ip: "10.244.1.2".parse().unwrap(),
                prefix_len: 24,
                mac: "02:00:00:00:00:01".into(),
                cni_result: serde_json::json!({"ips": [{"address": "10.244.1.2/24"}]}),
                namespace: "default".into(),
                labels: Default::default(),
                host_ports: Vec::new(),
            }],
            services: Vec::new(),
            outside_netns: None,
            apiserver: None,
            dir,
        }
    }

    #[test]
    fn state_round_trips_through_json() {
        let lab = sample();
        let back = Lab::from_json(&lab.to_json()).unwrap();
        assert_eq!(back, lab);
        let mut old = lab.clone();
        old.version = 99;
        assert!(Lab::from_json(&old.to_json())
            .unwrap_err()
            .contains("version"));
        assert!(Lab::from_json("{").is_err());
    }

    #[test]
    fn nodes_get_their_addresses_and_paths() {
        let lab = sample();
        let n = lab.node("n2");
        assert_eq!(n.name, "vsl-n2");
        assert_eq!(n.netns, "vsl-n2");
        assert_eq!(n.underlay_ip.to_string(), "192.168.100.2");
        assert_eq!(n.pod_cidr.to_string(), "10.244.2.0/24");
        assert_eq!(n.dir, Path::new("/run/vswitch-lab/vsl/n2"));
        assert_eq!(
            n.admin_socket,
            Path::new("/run/vswitch-lab/vsl/n2/vswitchd.sock")
        );
        assert_eq!(n.cni_netconf, Path::new("/run/vswitch-lab/vsl/n2/cni.conf"));
        assert_eq!(lab.find_node("vsl-n1").map(|n| n.index), Some(1));
    }

    #[test]
    fn pods_and_targets_are_found_by_either_name() {
        let lab = sample();
        assert_eq!(lab.pod("n1-p1").ip.to_string(), "10.244.1.2");
        assert_eq!(lab.pod("vsl-n1-p1").address().to_string(), "10.244.1.2/24");
        assert_eq!(
            lab.pod("n1-p1").netns_path(),
            Path::new("/var/run/netns/vsl-n1-p1")
        );
        assert_eq!(lab.netns_of("n1-p1").unwrap(), "vsl-n1-p1");
        assert_eq!(lab.netns_of("n2").unwrap(), "vsl-n2");
        assert_eq!(lab.netns_of("fab").unwrap(), "vsl-fab");
        let e = lab.netns_of("n9-p9").unwrap_err().to_string();
        assert!(e.contains("n1-p1") && e.contains("n2"), "{e}");
        let cmd = lab.command("n1-p1", &["ip", "addr"]).unwrap();
        assert_eq!(sys::describe(&cmd), "ip netns exec vsl-n1-p1 ip addr");
    }

    #[test]
    fn status_json_has_exactly_the_documented_fields() {
        let st = sample().status();
        let v = serde_json::to_value(&st).unwrap();
        let keys = |v: &Value| {
            let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys(&v), ["name", "nodes", "pods", "policy_dir"]);
        let mut with_out = sample();
        with_out.outside_netns = Some("vsl-out".into());
        let o = serde_json::to_value(with_out.status()).unwrap();
        assert_eq!(keys(&o["outside"]), ["ip", "name", "netns"]);
        assert_eq!(o["outside"]["ip"], "192.168.100.253");
        assert_eq!(with_out.netns_of("out").unwrap(), "vsl-out");
        assert_eq!(
            keys(&v["nodes"][0]),
            [
                "admin_socket",
                "cni_netconf",
                "name",
                "netns",
                "pid",
                "pod_cidr",
                "ready",
                "underlay_ip"
            ]
        );
        assert_eq!(
            keys(&v["pods"][0]),
            ["ip", "labels", "mac", "name", "namespace", "netns", "node"]
        );
        assert_eq!(v["nodes"][0]["underlay_ip"], "192.168.100.1");
        assert_eq!(v["nodes"][0]["pod_cidr"], "10.244.1.0/24");
        assert_eq!(v["nodes"][0]["pid"], 4242);
        // pid 4242 is not a vswitchd of this lab.
        assert_eq!(v["nodes"][0]["ready"], false);
        assert_eq!(v["nodes"][1]["pid"], Value::Null);
        assert_eq!(v["pods"][0]["ip"], "10.244.1.2");
    }

    #[test]
    fn status_json_names_the_api_server_in_kubernetes_mode() {
        let mut lab = sample();
        lab.apiserver = Some(Box::new(crate::kube::ApiServerState::plan(
            &lab.dir,
            &lab.fabric_netns,
        )));
        let v = serde_json::to_value(lab.status()).unwrap();
        assert_eq!(v["apiserver"], "192.168.100.254:6443");
        assert_eq!(v["kubeconfig"], "/run/vswitch-lab/vsl/kubeconfig");
        let back = Lab::from_json(&lab.to_json()).unwrap();
        assert_eq!(back, lab, "the state round-trips with the API server in it");
    }

    #[test]
    fn binaries_must_all_exist() {
        let dir = std::env::temp_dir().join(format!("vswitch-lab-bins-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(VSWITCHD), "").unwrap();
        let e = Binaries::in_dir(&dir).unwrap_err();
        assert!(matches!(&e, LabError::BinaryMissing { path } if path.ends_with(PLUGIN)));
        assert!(
            e.to_string().contains("cargo build --workspace --bins"),
            "{e}"
        );
        fs::write(dir.join(PLUGIN), "").unwrap();
        let e = Binaries::in_dir(&dir).unwrap_err();
        assert!(matches!(&e, LabError::BinaryMissing { path } if path.ends_with(INSTALL)));
        fs::write(dir.join(INSTALL), "").unwrap();
        let b = Binaries::in_dir(&dir).unwrap();
        assert_eq!(b.plugin, dir.join(PLUGIN));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn node_dirs_are_found() {
        let dir = std::env::temp_dir().join(format!("vswitch-lab-nd-{}", std::process::id()));
        for d in ["n1", "n12", "n01", "nx", "state"] {
            fs::create_dir_all(dir.join(d)).unwrap();
        }
        let mut v = node_dirs(&dir);
        v.sort();
        assert_eq!(v, [1, 12]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
