//! The deploy path as users get it (issue 9): the Kubernetes manifests, the DaemonSet's install
//! steps, the kind files, and the container image.
//!
//! - The manifests (and the generated nodes ConfigMap) validate against the Kubernetes schemas
//!   offline with kubernetes-validate, and agree with each other and with the daemon's config:
//!   probe ports, socket and config paths, host mounts, the image tag build-image.sh produces.
//! - The install steps run the real `vswitch-install` against a temporary directory standing in
//!   for the host: the plugin copy, the per-node config (checked by the daemon's own parser),
//!   and the conflist, which must not exist until vswitchd answers ready (a fake daemon that
//!   answers "not ready" first, then the real vswitchd).
//! - The scripts pass `bash -n` and shellcheck (when installed); kind's config says what the
//!   e2e path needs.
//! - The image builds offline with podman (isolated storage, removed afterwards) and a
//!   container from it runs `vswitchd --version` and the plugin's VERSION.
//!
//! Needs python3 with kubernetes-validate (which brings PyYAML) and, for the image, podman +
//! runc as root. Helpers live in this file.

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use conf::api::Status;
use conf::Config;
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Helpers

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn deploy(rel: &str) -> PathBuf {
    repo().join("deploy").join(rel)
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A directory removed (with everything in it) when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("vswitch-deploy-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        TempDir(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn join(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A child process killed (and reaped) when dropped.
struct Proc {
    child: Option<Child>,
    what: String,
}

impl Proc {
    fn spawn(mut cmd: Command, what: &str) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Proc {
            child: Some(child),
            what: what.to_string(),
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Waits for the process to exit by itself and returns its output.
    fn wait(mut self, limit: Duration) -> Output {
        let mut child = self.child.take().expect("process already collected");
        let deadline = Instant::now() + limit;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    let out = child.wait_with_output();
                    panic!(
                        "{} did not exit within {limit:?}; output: {:?}",
                        self.what,
                        out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
                    );
                }
            }
        }
        child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("collecting {}: {e}", self.what))
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on the pid of a child we have not reaped yet.
        unsafe { libc::kill(self.pid(), sig) };
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs a command to completion (killed after `limit`) and returns its output.
fn run(cmd: Command, limit: Duration) -> Output {
    let what = format!("{cmd:?}");
    Proc::spawn(cmd, &what).wait(limit)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a command that must succeed; returns its stdout.
fn ok(cmd: Command, limit: Duration) -> String {
    let what = format!("{cmd:?}");
    let out = run(cmd, limit);
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// A workspace binary in `target/<profile>` next to this test, built (once per run, by its own
/// package) so the install steps under test are the current source even when only this test
/// was asked for. Building by package keeps these tests independent of unrelated crates.
fn bin(name: &str) -> PathBuf {
    static BUILT: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let package = match name {
        "vswitchd" | "vswitchctl" => "vswitch",
        "vswitch" => "cni-shim",
        "vswitch-install" | "vswitch-lab" => "vswitch-lab",
        other => panic!("unknown binary {other}"),
    };
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf();
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.contains(name) {
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.current_dir(repo())
            .args(["build", "--package", package, "--bin", name]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        ok(cmd, Duration::from_secs(1800));
        built.insert(name.to_string());
    }
    let path = dir.join(name);
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// kubernetes-validate, as installed by pip (its console script, else the module).
fn kubernetes_validate() -> Command {
    if have("kubernetes-validate") {
        return Command::new("kubernetes-validate");
    }
    let module = Command::new("python3")
        .args(["-c", "import kubernetes_validate"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        module,
        "kubernetes-validate is not installed: pip install kubernetes-validate"
    );
    let mut c = Command::new("python3");
    c.args(["-m", "kubernetes_validate"]);
    c
}

/// Every YAML document in `file`, as JSON (PyYAML comes with kubernetes-validate).
fn yaml_docs(file: &Path) -> Vec<Value> {
    let mut cmd = Command::new("python3");
    cmd.args([
        "-c",
        "import json, sys, yaml\n\
         docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
         json.dump(docs, sys.stdout)",
    ])
    .arg(file);
    let out = ok(cmd, Duration::from_secs(60));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

/// All manifests under deploy/kubernetes, in apply order.
fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(deploy("kubernetes"))
        .expect("deploy/kubernetes")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

fn manifests() -> Vec<Value> {
    manifest_files().iter().flat_map(|f| yaml_docs(f)).collect()
}

fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes"))
}

fn str_list(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// `--flag=value` from a container's command.
fn flag(command: &[String], name: &str) -> Option<String> {
    let prefix = format!("--{name}=");
    command
        .iter()
        .find_map(|a| a.strip_prefix(&prefix).map(str::to_string))
}

fn container<'a>(pod: &'a Value, list: &str, name: &str) -> &'a Value {
    pod[list]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {list} entry {name} in the DaemonSet"))
}

/// The host path behind a container's mount at `mount_path`.
fn host_path_of(pod: &Value, c: &Value, mount_path: &str) -> String {
    let mount = c["volumeMounts"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["mountPath"] == mount_path))
        .unwrap_or_else(|| panic!("{} mounts nothing at {mount_path}", c["name"]));
    let vol = pod["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == mount["name"]))
        .unwrap_or_else(|| panic!("no volume {}", mount["name"]));
    vol["hostPath"]["path"]
        .as_str()
        .unwrap_or_else(|| panic!("volume {} is not a hostPath", mount["name"]))
        .to_string()
}

/// The vswitchd config the ConfigMap carries.
fn cluster_config_text(docs: &[Value]) -> String {
    object(docs, "ConfigMap", "vswitch-config")["data"]["vswitchd.toml"]
        .as_str()
        .expect("vswitch-config has vswitchd.toml")
        .to_string()
}

/// The ConfigMap's config as vswitchd reads it, with placeholders for the per-node fields
/// render-config fills in.
fn cluster_config(docs: &[Value]) -> Config {
    let text = cluster_config_text(docs);
    assert!(
        text.contains("[node]\n"),
        "the ConfigMap's vswitchd.toml has a [node] table"
    );
    let text = text.replacen(
        "[node]\n",
        "[node]\nname = \"placeholder\"\npod_cidr = \"10.244.0.0/24\"\n",
        1,
    );
    Config::parse(&text).unwrap_or_else(|e| panic!("the ConfigMap's vswitchd.toml: {e}"))
}

fn workspace_version() -> String {
    let toml = fs::read_to_string(repo().join("Cargo.toml")).expect("Cargo.toml");
    let table: toml_lite::Table = toml_lite::parse(&toml);
    table.version
}

/// Just enough of the workspace Cargo.toml: `[workspace.package] version`.
mod toml_lite {
    pub struct Table {
        pub version: String,
    }
    pub fn parse(text: &str) -> Table {
        let mut in_package = false;
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                in_package = line == "[workspace.package]";
            } else if in_package {
                if let Some(v) = line.strip_prefix("version = \"") {
                    return Table {
                        version: v.trim_end_matches('"').to_string(),
                    };
                }
            }
        }
        panic!("no [workspace.package] version in Cargo.toml");
    }
}

/// A stand-in for kubectl as nodes-configmap.sh calls it: `get nodes -o jsonpath=...` prints
/// `rows`; `get endpointslices ...` (the kubernetes Service's) prints `API`, the API server's
/// address and port as the script's jsonpath does.
fn fake_kubectl(dir: &Path, rows: &str) -> PathBuf {
    let path = dir.join("kubectl");
    fs::write(
        &path,
        format!(
            "#!/bin/sh\ncase \"$1 $2\" in\n\
             'get nodes') printf '{rows}' ;;\n\
             'get endpointslices') printf '{API}' ;;\n\
             *) echo \"unexpected: $*\" >&2; exit 3 ;;\n\
             esac\n"
        ),
    )
    .expect("write fake kubectl");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod fake kubectl");
    path
}

/// The API server's address and port, as the fake kubectl reports the kubernetes Service's
/// EndpointSlice.
const API: &str = "172.18.0.4|6443";

const NODE_ROWS: &str = "kind-control-plane|10.244.0.0/24|172.18.0.4\\n\
                         kind-worker|10.244.1.0/24|172.18.0.2 fc00:f853:ccd:e793::2\\n\
                         kind-worker2|10.244.2.0/24|172.18.0.3\\n";

/// Runs nodes-configmap.sh against the fake kubectl; returns the ConfigMap file it printed.
fn nodes_configmap(dir: &TempDir, rows: &str) -> PathBuf {
    let kubectl = fake_kubectl(dir.path(), rows);
    let mut cmd = Command::new(deploy("kubernetes/nodes-configmap.sh"));
    cmd.env("KUBECTL", &kubectl);
    let yaml = ok(cmd, Duration::from_secs(30));
    let file = dir.join("vswitch-nodes.yaml");
    fs::write(&file, yaml).expect("write nodes ConfigMap");
    file
}

// ---------------------------------------------------------------------------------------------
// Manifests

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let tmp = TempDir::new("validate");
    let mut files = manifest_files();
    files.push(nodes_configmap(&tmp, NODE_ROWS));
    // The oldest Kubernetes that kind's kubeProxyMode: none runs on, and the newest schemas.
    for version in ["1.27.0", "1.37.0"] {
        let mut cmd = kubernetes_validate();
        cmd.args(["--strict", "--kubernetes-version", version])
            .args(&files);
        let out = run(cmd, Duration::from_secs(120));
        let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(
            out.status.success(),
            "manifests do not validate against Kubernetes {version}:\n{all}"
        );
        for resource in [
            "namespace/vswitch",
            "serviceaccount/vswitch",
            "clusterrole/vswitch",
            "clusterrolebinding/vswitch",
            "configmap/vswitch-config",
            "configmap/vswitch-nodes",
            "daemonset/vswitch",
        ] {
            assert!(
                all.contains(&format!("passed for resource {resource}")),
                "{resource} was not validated against {version}:\n{all}"
            );
        }
    }

    // The validator is strict: a misspelt field in the DaemonSet fails it.
    let bad = tmp.join("bad.yaml");
    let ds = fs::read_to_string(deploy("kubernetes/30-daemonset.yaml")).expect("daemonset");
    fs::write(
        &bad,
        ds.replace(
            "hostNetwork: true",
            "hostNetwork: true\n      hostNetwrok: true",
        ),
    )
    .expect("write bad manifest");
    let mut cmd = kubernetes_validate();
    cmd.arg("--strict").arg(&bad);
    let out = run(cmd, Duration::from_secs(120));
    assert!(
        !out.status.success(),
        "kubernetes-validate accepted an unknown field: {}",
        text(&out.stdout)
    );
}

#[test]
fn daemonset_runs_vswitchd_as_a_cni_daemonset_must() {
    let docs = manifests();
    let version = workspace_version();

    let ns = object(&docs, "Namespace", "vswitch");
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged",
        "Pod Security admission would reject the privileged DaemonSet"
    );
    for d in docs.iter().filter(|d| {
        d["kind"] != "Namespace" && d["kind"] != "ClusterRole" && d["kind"] != "ClusterRoleBinding"
    }) {
        assert_eq!(
            d["metadata"]["namespace"], "vswitch",
            "{}",
            d["metadata"]["name"]
        );
    }

    // RBAC: what the Kubernetes source needs, bound to the DaemonSet's service account.
    let role = object(&docs, "ClusterRole", "vswitch");
    let allows = |group: &str, resource: &str, verbs: &[&str]| {
        role["rules"].as_array().is_some_and(|rules| {
            rules.iter().any(|r| {
                str_list(&r["apiGroups"]).iter().any(|g| g == group)
                    && str_list(&r["resources"]).iter().any(|x| x == resource)
                    && verbs
                        .iter()
                        .all(|v| str_list(&r["verbs"]).iter().any(|x| x == v))
            })
        })
    };
    assert!(allows("", "nodes", &["get", "list", "watch", "patch"]));
    assert!(allows("", "services", &["get", "list", "watch"]));
    assert!(allows(
        "discovery.k8s.io",
        "endpointslices",
        &["get", "list", "watch"]
    ));
    // NetworkPolicy: the policies and what they select.
    assert!(allows(
        "networking.k8s.io",
        "networkpolicies",
        &["list", "watch"]
    ));
    assert!(allows("", "namespaces", &["list", "watch"]));
    assert!(allows("", "pods", &["list", "watch"]));
    let binding = object(&docs, "ClusterRoleBinding", "vswitch");
    assert_eq!(binding["roleRef"]["name"], "vswitch");
    assert_eq!(binding["subjects"][0]["kind"], "ServiceAccount");
    assert_eq!(binding["subjects"][0]["name"], "vswitch");
    assert_eq!(binding["subjects"][0]["namespace"], "vswitch");
    object(&docs, "ServiceAccount", "vswitch");

    let ds = object(&docs, "DaemonSet", "vswitch");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "vswitch");
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert!(
        pod["tolerations"].as_array().is_some_and(|ts| ts
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none())),
        "the DaemonSet must tolerate every taint (not-ready nodes included)"
    );

    // Every container runs the image build-image.sh tags, never pulled.
    let image = format!("localhost/vswitch:{version}");
    for list in ["initContainers", "containers"] {
        for c in pod[list].as_array().expect("containers") {
            assert_eq!(c["image"], image.as_str(), "{}", c["name"]);
            assert_eq!(c["imagePullPolicy"], "IfNotPresent", "{}", c["name"]);
        }
    }

    // vswitchd: privileged, the host's TUN device, run/state dirs, the pods' netns paths.
    let d = container(pod, "containers", "vswitchd");
    let cmd = str_list(&d["command"]);
    assert_eq!(
        cmd,
        [
            "/usr/local/bin/vswitchd",
            "--config=/etc/vswitch/vswitchd.toml"
        ]
    );
    assert_eq!(d["securityContext"]["privileged"], true);
    let env: Vec<(String, String)> = d["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap_or_default().to_string(),
                e["valueFrom"]["fieldRef"]["fieldPath"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    assert!(env.contains(&("NODE_NAME".into(), "spec.nodeName".into())));
    assert!(env.contains(&("POD_IP".into(), "status.podIP".into())));
    // vswitchd reaches the API server at its own address, from the nodes ConfigMap that
    // nodes-configmap.sh generates (no kube-proxy translates the kubernetes ClusterIP for it).
    let tmp = TempDir::new("apienv");
    let nodes_cm = yaml_docs(&nodes_configmap(&tmp, NODE_ROWS));
    for (var, key, want) in [
        ("KUBERNETES_SERVICE_HOST", "apiserver-host", "172.18.0.4"),
        ("KUBERNETES_SERVICE_PORT", "apiserver-port", "6443"),
    ] {
        let e = d["env"]
            .as_array()
            .and_then(|es| es.iter().find(|e| e["name"] == var))
            .unwrap_or_else(|| panic!("vswitchd has no {var}"));
        let r = &e["valueFrom"]["configMapKeyRef"];
        assert_eq!(r["name"], "vswitch-nodes", "{var}");
        assert_eq!(r["key"], key, "{var}");
        assert_eq!(
            r["optional"], true,
            "{var}: a ConfigMap without it must not block the pod"
        );
        assert_eq!(nodes_cm[0]["data"][key], want, "{key} in vswitch-nodes");
    }
    assert_eq!(host_path_of(pod, d, "/dev/net/tun"), "/dev/net/tun");
    assert_eq!(host_path_of(pod, d, "/run/vswitch"), "/run/vswitch");
    assert_eq!(host_path_of(pod, d, "/var/lib/vswitch"), "/var/lib/vswitch");
    for ns_dir in ["/run/netns", "/var/run/netns"] {
        assert_eq!(host_path_of(pod, d, ns_dir), "/run/netns");
        let m = d["volumeMounts"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["mountPath"] == ns_dir))
            .expect("netns mount");
        assert_eq!(
            m["mountPropagation"], "HostToContainer",
            "pod namespaces are mounted after vswitchd starts"
        );
    }

    // The config vswitchd reads is the one render-config writes, from the ConfigMaps mounted.
    let render = container(pod, "initContainers", "render-config");
    let rcmd = str_list(&render["command"]);
    assert_eq!(rcmd[..2], ["/usr/local/bin/vswitch-install", "config"]);
    assert_eq!(
        flag(&rcmd, "out").as_deref(),
        Some("/etc/vswitch/vswitchd.toml")
    );
    assert_eq!(flag(&rcmd, "node-name").as_deref(), Some("$(NODE_NAME)"));
    assert_eq!(flag(&rcmd, "node-ip").as_deref(), Some("$(POD_IP)"));
    let volume_of = |c: &Value, path: &str| -> String {
        c["volumeMounts"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["mountPath"] == path))
            .map(|m| m["name"].as_str().unwrap_or_default().to_string())
            .unwrap_or_else(|| panic!("{} mounts nothing at {path}", c["name"]))
    };
    assert_eq!(
        volume_of(render, "/etc/vswitch"),
        volume_of(d, "/etc/vswitch")
    );
    let config_map_of = |vol: &str| -> String {
        pod["volumes"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["name"] == vol))
            .map(|v| {
                v["configMap"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .unwrap_or_default()
    };
    let cluster_flag = flag(&rcmd, "cluster").expect("--cluster");
    let cluster_dir = Path::new(&cluster_flag)
        .parent()
        .expect("dir")
        .to_str()
        .expect("utf-8");
    assert_eq!(
        config_map_of(&volume_of(render, cluster_dir)),
        "vswitch-config"
    );
    let nodes_flag = flag(&rcmd, "nodes").expect("--nodes");
    let nodes_dir = Path::new(&nodes_flag)
        .parent()
        .expect("dir")
        .to_str()
        .expect("utf-8");
    assert_eq!(
        config_map_of(&volume_of(render, nodes_dir)),
        "vswitch-nodes"
    );
    assert!(cluster_flag.ends_with("/vswitchd.toml") && nodes_flag.ends_with("/nodes.toml"));

    // Probes: /healthz and /readyz on the port the ConfigMap's metrics_address serves.
    let cluster = cluster_config(&docs);
    let metrics_port = cluster
        .admin
        .metrics_address
        .expect("admin.metrics_address is set")
        .port();
    // No container port: with the host's network it is a hostPort, and the rolling update's
    // surge pod would not fit beside the old one.
    assert!(
        d["ports"].is_null(),
        "vswitchd declares ports: {}",
        d["ports"]
    );
    let update = &docs
        .iter()
        .find(|v| v["kind"] == "DaemonSet")
        .expect("the DaemonSet")["spec"]["updateStrategy"];
    assert_eq!(update["rollingUpdate"]["maxSurge"], 1, "{update}");
    assert_eq!(update["rollingUpdate"]["maxUnavailable"], 0, "{update}");
    let state_dir = cluster.node.state_dir.to_str().expect("utf-8").to_string();
    assert_eq!(
        host_path_of(pod, d, &state_dir),
        state_dir,
        "IPAM leases must outlive the pod"
    );
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        assert_eq!(d[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(d[probe]["httpGet"]["port"], metrics_port, "{probe}");
    }

    // The plugin lands in the host's /opt/cni/bin.
    let plugin = container(pod, "initContainers", "install-plugin");
    let pcmd = str_list(&plugin["command"]);
    assert_eq!(pcmd[..2], ["/usr/local/bin/vswitch-install", "plugin"]);
    let dest_dir = flag(&pcmd, "dest-dir").expect("--dest-dir");
    assert_eq!(host_path_of(pod, plugin, &dest_dir), "/opt/cni/bin");

    // The conflist lands in the host's /etc/cni/net.d, written by a watcher of the socket the
    // daemon serves (the ConfigMap's admin.socket, on the shared host dir).
    let conf = container(pod, "containers", "install-cni-conf");
    let ccmd = str_list(&conf["command"]);
    assert_eq!(ccmd[..2], ["/usr/local/bin/vswitch-install", "conflist"]);
    assert!(
        ccmd.iter().any(|a| a == "--watch"),
        "the conflist step must stay to keep it"
    );
    let dest = PathBuf::from(flag(&ccmd, "dest").expect("--dest"));
    let dest_mount = dest.parent().expect("dir").to_str().expect("utf-8");
    assert_eq!(host_path_of(pod, conf, dest_mount), "/etc/cni/net.d");
    assert!(dest.to_string_lossy().ends_with(".conflist"));
    let socket = flag(&ccmd, "socket").expect("--socket");
    assert_eq!(cluster.admin.socket, PathBuf::from(&socket));
    let socket_dir = Path::new(&socket)
        .parent()
        .expect("dir")
        .to_str()
        .expect("utf-8");
    assert_eq!(
        host_path_of(pod, conf, socket_dir),
        host_path_of(pod, d, socket_dir)
    );
    assert_eq!(
        host_path_of(pod, conf, socket_dir),
        socket_dir,
        "the plugin on the host finds the socket at the same path"
    );
}

// ---------------------------------------------------------------------------------------------
// Install steps

/// The DaemonSet's render-config step, for every node of a 3-node cluster, with the ConfigMap
/// as shipped and the nodes table as nodes-configmap.sh generates it.
#[test]
fn config_step_renders_each_nodes_config_from_the_config_maps() {
    let tmp = TempDir::new("render");
    let docs = manifests();
    let cluster = tmp.join("vswitchd.toml");
    fs::write(&cluster, cluster_config_text(&docs)).expect("write cluster config");
    let nodes_cm = yaml_docs(&nodes_configmap(&tmp, NODE_ROWS));
    let nodes = tmp.join("nodes.toml");
    fs::write(
        &nodes,
        nodes_cm[0]["data"]["nodes.toml"]
            .as_str()
            .expect("nodes.toml key"),
    )
    .expect("write nodes.toml");

    let all = [
        ("kind-control-plane", "10.244.0.0/24", "172.18.0.4"),
        ("kind-worker", "10.244.1.0/24", "172.18.0.2"),
        ("kind-worker2", "10.244.2.0/24", "172.18.0.3"),
    ];
    // As shipped, vswitchd takes peers and Services from the API (it replaces kube-proxy, so
    // without them a cluster has no Services); the same ConfigMap with the API off renders
    // every other node as a static peer.
    assert!(
        cluster_config(&docs).kubernetes.enabled,
        "vswitch-config must turn on [kubernetes]"
    );
    let shipped = fs::read_to_string(&cluster).expect("cluster config");
    assert_eq!(shipped.matches("enabled = true").count(), 1);
    let static_cluster = tmp.join("static.toml");
    fs::write(
        &static_cluster,
        shipped.replace("enabled = true", "enabled = false"),
    )
    .expect("write static config");
    for ((name, cidr, ip), (cluster, from_api)) in all
        .iter()
        .flat_map(|n| [(*n, (&cluster, true)), (*n, (&static_cluster, false))])
    {
        let out = tmp.join(&format!("{name}-{from_api}.toml"));
        let mut cmd = Command::new(bin("vswitch-install"));
        cmd.arg("config")
            .arg(format!("--cluster={}", cluster.display()))
            .arg(format!("--nodes={}", nodes.display()))
            .arg(format!("--node-name={name}"))
            .arg("--node-ip=192.0.2.99")
            .arg(format!("--out={}", out.display()));
        ok(cmd, Duration::from_secs(30));
        let c = Config::load(&out)
            .unwrap_or_else(|e| panic!("vswitchd would reject the config for {name}: {e}"));
        assert_eq!(c.kubernetes.enabled, from_api);
        assert_eq!(c.node.name, name);
        assert_eq!(c.node.pod_cidr.to_string(), cidr);
        assert_eq!(c.overlay.underlay_ip, Some(ip.parse::<IpAddr>().unwrap()));
        let peers: BTreeSet<&str> = c.peers.iter().map(|p| p.name.as_str()).collect();
        let expected: BTreeSet<&str> = if from_api {
            BTreeSet::new()
        } else {
            all.iter().map(|n| n.0).filter(|n| *n != name).collect()
        };
        assert_eq!(
            peers, expected,
            "{name}: static peers (from the API: none; else every other node)"
        );
        for p in &c.peers {
            let (_, pcidr, pip) = all.iter().find(|n| n.0 == p.name).expect("known peer");
            assert_eq!(p.pod_cidrs.len(), 1);
            assert_eq!(p.pod_cidrs[0].to_string(), *pcidr);
            assert_eq!(p.underlay_ip, pip.parse::<IpAddr>().unwrap());
        }
        // The cluster-wide settings came through unchanged.
        assert_eq!(c.admin.socket, PathBuf::from("/run/vswitch/vswitchd.sock"));
        assert_eq!(
            c.admin.metrics_address.map(|a| a.port()),
            Some(9109),
            "the probes' port"
        );
        assert_eq!(c.node.state_dir, PathBuf::from("/var/lib/vswitch"));
        assert_eq!(
            c.dns.nameservers,
            vec!["10.96.0.10".parse::<IpAddr>().unwrap()]
        );
    }

    // A node missing from the table (one that joined later): as shipped (Kubernetes mode) its
    // config names no pod CIDR, which vswitchd takes from its Node object.
    let out = tmp.join("stranger.toml");
    let mut cmd = Command::new(bin("vswitch-install"));
    cmd.arg("config")
        .arg(format!("--cluster={}", cluster.display()))
        .arg(format!("--nodes={}", nodes.display()))
        .arg("--node-name=kind-worker9")
        .arg("--node-ip=172.18.0.9")
        .arg(format!("--out={}", out.display()));
    let res = run(cmd, Duration::from_secs(30));
    assert!(res.status.success(), "{}", text(&res.stderr));
    let said = text(&res.stdout) + &text(&res.stderr);
    assert!(said.contains("from its Node object"), "{said}");
    let written = fs::read_to_string(&out).unwrap();
    assert!(
        !written.lines().any(|l| l.starts_with("pod_cidr")),
        "{written}"
    );
    fs::remove_file(&out).unwrap();
    // In static mode it fails the init container with what to do, writing nothing.
    let static_cluster = tmp.join("static-cluster.toml");
    fs::write(&static_cluster, {
        let t = fs::read_to_string(&cluster).unwrap();
        let at = t.find("[kubernetes]").expect("a [kubernetes] section");
        format!(
            "{}{}",
            &t[..at],
            t[at..].replacen("enabled = true", "enabled = false", 1)
        )
    })
    .unwrap();
    let mut cmd = Command::new(bin("vswitch-install"));
    cmd.arg("config")
        .arg(format!("--cluster={}", static_cluster.display()))
        .arg(format!("--nodes={}", nodes.display()))
        .arg("--node-name=kind-worker9")
        .arg(format!("--out={}", out.display()));
    let res = run(cmd, Duration::from_secs(30));
    let err = text(&res.stderr);
    assert!(
        !res.status.success(),
        "a node missing from the table must fail"
    );
    assert!(
        err.contains("node kind-worker9 is not in") && err.contains("nodes-configmap.sh"),
        "{err}"
    );
    assert!(!out.exists());

    // A per-node field in the cluster ConfigMap is refused, naming the field.
    let bad = tmp.join("bad-cluster.toml");
    fs::write(
        &bad,
        cluster_config_text(&docs).replacen(
            "[kubernetes]\n",
            "[kubernetes]\nnode_name = \"x\"\n",
            1,
        ),
    )
    .expect("write");
    let mut cmd = Command::new(bin("vswitch-install"));
    cmd.arg("config")
        .arg(format!("--cluster={}", bad.display()))
        .arg(format!("--nodes={}", nodes.display()))
        .arg("--node-name=kind-worker")
        .arg(format!("--out={}", out.display()));
    let res = run(cmd, Duration::from_secs(30));
    assert!(!res.status.success());
    assert!(
        text(&res.stderr).contains("kubernetes.node_name is set per node"),
        "{}",
        text(&res.stderr)
    );
}

/// A fake vswitchd admin socket: answers GET /v1/status with `ready` as the flag says.
struct FakeDaemon {
    ready: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<u32>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl FakeDaemon {
    fn start(socket: &Path) -> FakeDaemon {
        let listener = UnixListener::bind(socket).expect("bind fake socket");
        listener.set_nonblocking(true).expect("nonblocking");
        let ready = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(0));
        let (r, s, n) = (ready.clone(), stop.clone(), requests.clone());
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((mut conn, _)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => req.extend_from_slice(&buf[..k]),
                    }
                }
                if let Ok(mut count) = n.lock() {
                    *count += 1;
                }
                let status = Status {
                    node: "fake-node".into(),
                    version: "0.0.0".into(),
                    pod_cidr: "10.244.7.0/24".parse().expect("cidr"),
                    gateway: "10.244.7.1".parse().expect("ip"),
                    gateway_mac: "0a:58:0a:f4:07:01".into(),
                    ports: 0,
                    ready: r.load(Ordering::Relaxed),
                    pid: std::process::id(),
                    warnings: Vec::new(),
                };
                let body = serde_json::to_string(&status).expect("status JSON");
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                     connection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        FakeDaemon {
            ready,
            stop,
            requests,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> u32 {
        self.requests.lock().map(|n| *n).unwrap_or(0)
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Checks a written conflist the way a runtime and the plugin read it.
fn check_conflist(path: &Path, socket: &Path) {
    let raw = fs::read_to_string(path).expect("read conflist");
    let doc: Value =
        serde_json::from_str(&raw).unwrap_or_else(|e| panic!("conflist is not JSON ({e}):\n{raw}"));
    let version = doc["cniVersion"].as_str().expect("cniVersion");
    assert!(
        conf::netconf::SUPPORTED_VERSIONS.contains(&version),
        "cniVersion {version} is not one the plugin supports"
    );
    assert_eq!(doc["name"], "vswitch");
    let plugins = doc["plugins"].as_array().expect("plugins list");
    assert_eq!(plugins.len(), 1, "{raw}");
    assert_eq!(plugins[0]["type"], conf::netconf::PLUGIN_TYPE);
    assert_eq!(plugins[0]["socket"], socket.to_str().expect("utf-8"));
    // Pods' hostPorts reach the plugin only if it declares the capability.
    assert_eq!(plugins[0]["capabilities"]["portMappings"], true, "{raw}");
    // What libcni hands the plugin: the entry plus the list's name and version.
    let mut netconf = plugins[0].clone();
    netconf["cniVersion"] = doc["cniVersion"].clone();
    netconf["name"] = doc["name"].clone();
    let parsed: conf::netconf::NetConf =
        serde_json::from_value(netconf).expect("the plugin parses its netconf");
    parsed.validate().expect("the plugin accepts its netconf");
    let mode = fs::metadata(path).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);
}

/// Names in `dir`, to prove no temporary file is left where the runtime reads.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The install steps of one node against a temporary "host": the plugin is copied, and the
/// conflist appears only once the real vswitchd is up and ready.
#[test]
fn install_step_writes_the_conflist_only_once_vswitchd_is_ready() {
    assert!(
        is_root(),
        "this test starts vswitchd: run it as root (tests/run.sh)"
    );
    let host = TempDir::new("install");
    let cni_bin = host.join("opt/cni/bin");
    let net_d = host.join("etc/cni/net.d");
    fs::create_dir_all(&net_d).expect("mkdir net.d");
    let run_dir = host.join("run/vswitch");
    let socket = run_dir.join("vswitchd.sock");

    // 1. The plugin: an exact, executable copy that answers VERSION.
    let mut cmd = Command::new(bin("vswitch-install"));
    cmd.arg("plugin")
        .arg(format!("--src={}", bin("vswitch").display()))
        .arg(format!("--dest-dir={}", cni_bin.display()));
    ok(cmd, Duration::from_secs(30));
    let installed = cni_bin.join("vswitch");
    assert_eq!(
        fs::read(&installed).expect("installed plugin"),
        fs::read(bin("vswitch")).expect("built plugin"),
        "the installed plugin differs from the built one"
    );
    assert_eq!(
        fs::metadata(&installed).expect("stat").permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(names(&cni_bin), ["vswitch"], "no temporary file is left");
    let mut cmd = Command::new(&installed);
    cmd.env("CNI_COMMAND", "VERSION");
    let version: Value =
        serde_json::from_str(&ok(cmd, Duration::from_secs(10))).expect("VERSION JSON");
    assert_eq!(version["cniVersion"], conf::netconf::CNI_VERSION);

    // 2. The conflist step starts before the daemon, as on a fresh node. The daemon is built
    // first: a build under a loaded machine must not eat into the step's 60 s wait.
    let vswitchd = bin("vswitchd");
    let conflist = net_d.join("10-vswitch.conflist");
    let mut cmd = Command::new(bin("vswitch-install"));
    cmd.arg("conflist")
        .arg(format!("--socket={}", socket.display()))
        .arg(format!("--dest={}", conflist.display()))
        .arg("--poll-ms=100")
        .arg("--timeout=60");
    let mut writer = Proc::spawn(cmd, "vswitch-install conflist");
    thread::sleep(Duration::from_millis(1500));
    assert!(
        writer.running(),
        "the conflist step gave up before vswitchd was there"
    );
    assert!(
        names(&net_d).is_empty(),
        "written before vswitchd ran: {:?}",
        names(&net_d)
    );

    // 3. vswitchd comes up; the conflist follows, and the step exits 0.
    let config = host.join("vswitchd.toml");
    fs::write(
        &config,
        format!(
            "[node]\nname = \"deploy-test\"\npod_cidr = \"10.250.0.0/24\"\nstate_dir = \"{}\"\n\
             [admin]\nsocket = \"{}\"\n\
             # Run in the machine's own namespace: no host port made there.\n[host]\nenabled = false\n",
            host.join("var/lib/vswitch").display(),
            socket.display()
        ),
    )
    .expect("write daemon config");
    let mut cmd = Command::new(&vswitchd);
    cmd.arg(format!("--config={}", config.display()));
    let mut daemon = Proc::spawn(cmd, "vswitchd");
    let out = writer.wait(Duration::from_secs(60));
    assert!(
        out.status.success(),
        "the conflist step failed: {}",
        text(&out.stderr)
    );
    assert!(daemon.running(), "vswitchd exited");
    assert!(
        text(&out.stderr).contains("vswitchd is ready"),
        "{}",
        text(&out.stderr)
    );
    check_conflist(&conflist, &socket);
    assert_eq!(
        names(&net_d),
        ["10-vswitch.conflist"],
        "no temporary file is left"
    );

    daemon.signal(libc::SIGTERM);
    let out = daemon.wait(Duration::from_secs(20));
    assert!(out.status.success(), "vswitchd: {}", text(&out.stderr));
}

/// The conflist step against a daemon that answers but is not ready yet, then is; in watch
/// mode it puts the conflist back when it disappears, and stops cleanly on SIGTERM.
#[test]
fn conflist_step_waits_for_ready_and_keeps_the_conflist_in_watch_mode() {
    let host = TempDir::new("watch");
    let socket = host.join("vswitchd.sock");
    let net_d = host.join("net.d");
    let conflist = net_d.join("10-vswitch.conflist");
    let fake = FakeDaemon::start(&socket);

    let mut cmd = Command::new(bin("vswitch-install"));
    cmd.arg("conflist")
        .arg(format!("--socket={}", socket.display()))
        .arg(format!("--dest={}", conflist.display()))
        .arg("--poll-ms=50")
        .arg("--watch");
    let mut writer = Proc::spawn(cmd, "vswitch-install conflist --watch");

    // Answering, but not ready: asked again and again, nothing written.
    wait_for("status requests", Duration::from_secs(20), || {
        fake.requests() >= 5
    });
    thread::sleep(Duration::from_millis(300));
    assert!(writer.running());
    assert!(
        !conflist.exists() && names(&net_d).is_empty(),
        "written while vswitchd said not ready: {:?}",
        names(&net_d)
    );

    // Ready: written, and the step keeps running.
    fake.ready.store(true, Ordering::Relaxed);
    wait_for("the conflist", Duration::from_secs(20), || {
        conflist.exists()
    });
    check_conflist(&conflist, &socket);
    assert!(writer.running(), "--watch must keep the step running");

    // Removed (a node's net.d cleaned) or altered: put back as it was.
    let original = fs::read(&conflist).expect("read");
    fs::remove_file(&conflist).expect("rm conflist");
    wait_for(
        "the conflist to be rewritten",
        Duration::from_secs(20),
        || conflist.exists(),
    );
    assert_eq!(fs::read(&conflist).expect("read"), original);
    fs::write(&conflist, "{}").expect("clobber");
    wait_for(
        "the clobbered conflist to be restored",
        Duration::from_secs(20),
        || fs::read(&conflist).is_ok_and(|b| b == original),
    );
    assert_eq!(names(&net_d), ["10-vswitch.conflist"]);

    // SIGTERM (kubelet stopping the pod): exits 0 promptly and leaves the conflist in place.
    writer.signal(libc::SIGTERM);
    let out = writer.wait(Duration::from_secs(5));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        conflist.exists(),
        "a daemon restart must not make the node NotReady"
    );
    let log = text(&out.stderr);
    assert!(log.contains("not ready yet"), "{log}");
    assert!(
        log.contains("went missing") && log.contains("differed"),
        "{log}"
    );
}

/// Without --watch and with a timeout, a daemon that never gets ready fails the step, and
/// nothing is written.
#[test]
fn conflist_step_times_out_without_a_ready_daemon() {
    let host = TempDir::new("timeout");
    let socket = host.join("vswitchd.sock");
    let conflist = host.join("net.d/10-vswitch.conflist");
    let _fake = FakeDaemon::start(&socket);
    let mut cmd = Command::new(bin("vswitch-install"));
    cmd.arg("conflist")
        .arg(format!("--socket={}", socket.display()))
        .arg(format!("--dest={}", conflist.display()))
        .arg("--poll-ms=50")
        .arg("--timeout=1");
    let out = run(cmd, Duration::from_secs(20));
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("was not ready within 1 s"), "{err}");
    assert!(!conflist.exists());
}

// ---------------------------------------------------------------------------------------------
// Scripts and kind

#[test]
fn scripts_parse_and_pass_shellcheck() {
    let scripts = [
        deploy("build-image.sh"),
        deploy("kind/e2e.sh"),
        deploy("kubernetes/nodes-configmap.sh"),
    ];
    for s in &scripts {
        let mode = fs::metadata(s).expect("script").permissions().mode();
        assert!(mode & 0o111 != 0, "{} is not executable", s.display());
        let mut cmd = Command::new("bash");
        cmd.arg("-n").arg(s);
        ok(cmd, Duration::from_secs(30));
    }
    if have("shellcheck") {
        let mut cmd = Command::new("shellcheck");
        cmd.args(["--severity=style", "--shell=bash"]).args(scripts);
        ok(cmd, Duration::from_secs(60));
    } else {
        eprintln!("shellcheck is not installed: checked the scripts with bash -n only");
    }

    // Usage errors are reported, not run.
    let mut cmd = Command::new(deploy("kind/e2e.sh"));
    cmd.arg("frobnicate");
    let out = run(cmd, Duration::from_secs(30));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("unknown command"));

    // A node without a pod CIDR stops nodes-configmap.sh with the reason.
    let tmp = TempDir::new("nocidr");
    let kubectl = fake_kubectl(tmp.path(), "n1||10.0.0.1\\n");
    let mut cmd = Command::new(deploy("kubernetes/nodes-configmap.sh"));
    cmd.env("KUBECTL", &kubectl);
    let out = run(cmd, Duration::from_secs(30));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("node n1 has no spec.podCIDR"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn kind_config_and_e2e_script_describe_the_vswitch_cluster() {
    let docs = yaml_docs(&deploy("kind/kind-config.yaml"));
    assert_eq!(docs.len(), 1);
    let k = &docs[0];
    assert_eq!(k["kind"], "Cluster");
    assert_eq!(k["apiVersion"], "kind.x-k8s.io/v1alpha4");
    let net = &k["networking"];
    assert_eq!(net["disableDefaultCNI"], true, "vswitch is the only CNI");
    assert_eq!(
        net["kubeProxyMode"], "none",
        "vswitch translates Services itself"
    );
    assert_eq!(net["podSubnet"], "10.244.0.0/16");
    assert_eq!(net["serviceSubnet"], "10.96.0.0/16");
    assert!(
        k["nodes"].as_array().is_some_and(|n| n.len() >= 2),
        "the e2e cluster needs more than one node to exercise the overlay"
    );

    // The ConfigMap's cluster DNS address lies in kind's service subnet.
    let config = cluster_config(&manifests());
    let dns = *config.dns.nameservers.first().expect("a nameserver");
    let IpAddr::V4(dns4) = dns else {
        panic!("{dns} is not IPv4")
    };
    assert_eq!(
        u32::from(dns4) & 0xffff_0000,
        u32::from(std::net::Ipv4Addr::new(10, 96, 0, 0)),
        "{dns} is outside the service subnet 10.96.0.0/16"
    );

    // e2e.sh: the sig-network focus with the usual skips, the image loaded from an archive.
    let e2e = fs::read_to_string(deploy("kind/e2e.sh")).expect("e2e.sh");
    assert!(e2e.contains(r"E2E_FOCUS=${E2E_FOCUS:-'\[sig-network\]'}"));
    let skip_line = e2e
        .lines()
        .find(|l| l.starts_with("E2E_SKIP="))
        .expect("E2E_SKIP default");
    for word in [
        "IPv6",
        "DualStack",
        "SCTP",
        "Disruptive",
        "Serial",
        "Feature",
    ] {
        assert!(
            skip_line.contains(word),
            "the default skip lacks {word}: {skip_line}"
        );
    }
    for step in [
        "kind create cluster",
        "kind-config.yaml",
        "kind load image-archive",
        "build-image.sh",
        "nodes-configmap.sh",
        "kubectl apply -f \"$manifests\"",
        "--for=condition=Ready nodes --all",
        "--focus=\"$E2E_FOCUS\"",
        "--skip=\"$E2E_SKIP\"",
    ] {
        assert!(e2e.contains(step), "e2e.sh does not {step}");
    }
}

// ---------------------------------------------------------------------------------------------
// The image

/// Podman with storage of its own under a temporary directory (vfs: no mounts to undo), and
/// the containers.conf this machine needs (cgroupfs, runc). Removed when dropped.
struct Podman {
    dir: TempDir,
}

impl Podman {
    fn new() -> Podman {
        let dir = TempDir::new("podman");
        fs::write(
            dir.join("containers.conf"),
            "[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = \"cgroupfs\"\n\
             runtime = \"runc\"\n",
        )
        .expect("containers.conf");
        fs::write(
            dir.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
                dir.join("root").display(),
                dir.join("runroot").display()
            ),
        )
        .expect("storage.conf");
        Podman { dir }
    }

    fn env(&self, cmd: &mut Command) {
        cmd.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .env("TMPDIR", self.dir.path());
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new("podman");
        self.env(&mut cmd);
        cmd
    }

    /// `podman run` of the image: no network, never a pull, removed afterwards.
    fn run(
        &self,
        image: &str,
        entrypoint: Option<&str>,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> String {
        let mut cmd = self.cmd();
        cmd.args(["run", "--rm", "--pull=never", "--network=none"]);
        if let Some(e) = entrypoint {
            cmd.arg(format!("--entrypoint={e}"));
        }
        for (k, v) in env {
            cmd.arg("-e").arg(format!("{k}={v}"));
        }
        cmd.arg(image).args(args);
        ok(cmd, Duration::from_secs(120))
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let mut cmd = self.cmd();
        cmd.args(["rmi", "--all", "--force"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = cmd.status();
        // vfs layers are plain directories (some read-only); TempDir removes them.
        let _ = Command::new("chmod")
            .args(["-R", "u+w"])
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn image_builds_offline_and_runs_the_daemon_and_the_plugin() {
    assert!(
        is_root(),
        "podman build here needs root: run tests/run.sh as root"
    );
    assert!(
        have("podman"),
        "podman is not installed (tests/run.sh installs it)"
    );
    let podman = Podman::new();
    let version = workspace_version();
    let tag = format!("localhost/vswitch:{version}");
    let archive = podman.dir.join("vswitch-image.tar");

    // One build: cargo reuses target/ when the static binaries are current.
    let mut cmd = Command::new(deploy("build-image.sh"));
    cmd.current_dir(repo())
        .arg(format!("--archive={}", archive.display()))
        .arg("--engine=podman");
    podman.env(&mut cmd);
    let out = run(cmd, Duration::from_secs(3600));
    assert!(
        out.status.success(),
        "build-image.sh failed:\n{}",
        text(&out.stderr)
    );
    assert!(text(&out.stderr).contains(&format!("built {tag}")));

    let mut cmd = podman.cmd();
    cmd.args(["image", "inspect", &tag]);
    let inspect: Value = serde_json::from_str(&ok(cmd, Duration::from_secs(60))).expect("inspect");
    let inspect = &inspect[0];
    assert_eq!(
        inspect["Config"]["Labels"]["org.opencontainers.image.version"],
        version.as_str()
    );
    assert_eq!(
        inspect["RootFS"]["Layers"].as_array().map(Vec::len),
        Some(1),
        "FROM scratch plus one COPY is one layer"
    );

    let daemon = podman.run(&tag, None, &[], &["--version"]);
    assert_eq!(daemon.trim(), format!("vswitchd {version}"));
    let plugin = podman.run(
        &tag,
        Some("/usr/local/bin/vswitch"),
        &[("CNI_COMMAND", "VERSION")],
        &[],
    );
    let v: Value = serde_json::from_str(plugin.trim()).expect("the plugin's VERSION is JSON");
    assert_eq!(v["cniVersion"], conf::netconf::CNI_VERSION);
    assert_eq!(
        str_list(&v["supportedVersions"]),
        conf::netconf::SUPPORTED_VERSIONS
    );
    for tool in ["vswitchctl", "vswitch-install"] {
        let out = podman.run(
            &tag,
            Some(&format!("/usr/local/bin/{tool}")),
            &[],
            &["--version"],
        );
        assert_eq!(out.trim(), format!("{tool} {version}"));
    }

    // The archive kind loads: a docker-archive naming the DaemonSet's image.
    let mut cmd = Command::new("tar");
    cmd.arg("-xOf").arg(&archive).arg("manifest.json");
    let manifest: Value =
        serde_json::from_str(&ok(cmd, Duration::from_secs(60))).expect("manifest.json");
    assert!(
        str_list(&manifest[0]["RepoTags"]).contains(&tag),
        "{manifest}"
    );
}

/// The node-sysctls step, run as the DaemonSet runs it, in a namespace that starts from a fresh
/// host's values (forwarding off, strict reverse-path filtering as some distributions ship):
/// it sets what pods' paths need, says what it changed, and changes nothing the second time.
#[test]
fn sysctls_step_sets_what_a_node_needs_and_says_so() {
    let ns = vswitch_tests::Netns::new(&vswitch_tests::unique("sc"));
    let in_ns = |args: &[&str]| {
        let out = Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .args(args)
            .output()
            .expect("ip netns exec");
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let ip = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().expect("ip");
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    };
    // A veth (no dummy module may be loadable here) standing in for the node's interface.
    ip(&[
        "-n",
        ns.name(),
        "link",
        "add",
        "eth7",
        "type",
        "veth",
        "peer",
        "name",
        "eth7p",
    ]);
    ip(&[
        "-n",
        ns.name(),
        "addr",
        "add",
        "10.99.0.2/24",
        "dev",
        "eth7",
    ]);
    ip(&["-n", ns.name(), "link", "set", "eth7", "up"]);
    for (k, v) in [
        ("net.ipv4.ip_forward", "0"),
        ("net.ipv4.conf.all.rp_filter", "1"),
        ("net.ipv4.conf.eth7.rp_filter", "1"),
    ] {
        in_ns(&["sysctl", "-qw", &format!("{k}={v}")]);
    }
    let install = bin("vswitch-install").to_string_lossy().into_owned();
    let said = in_ns(&[&install, "sysctls", "--node-ip=10.99.0.2"]);
    for line in [
        "set net.ipv4.ip_forward = 1 (was 0)",
        "set net.ipv4.conf.all.rp_filter = 2 (was 1)",
        "set net.ipv4.conf.eth7.rp_filter = 2 (was 1)",
    ] {
        assert!(said.contains(line), "{line:?} not in: {said}");
    }
    let get = |k: &str| in_ns(&["sysctl", "-n", k]).trim().to_string();
    assert_eq!(get("net.ipv4.ip_forward"), "1");
    assert_eq!(get("net.ipv4.conf.eth7.rp_filter"), "2");
    let again = in_ns(&[&install, "sysctls", "--node-ip=10.99.0.2"]);
    assert!(again.contains("nothing changed"), "{again}");
}

/// The DaemonSet runs that step first, privileged, with the node's address.
#[test]
fn the_daemonset_sets_the_nodes_sysctls_before_vswitchd_starts() {
    let docs = manifests();
    let ds = object(&docs, "DaemonSet", "vswitch");
    let pod = &ds["spec"]["template"]["spec"];
    let first = &pod["initContainers"][0];
    assert_eq!(first["name"], "node-sysctls");
    let cmd = str_list(&first["command"]);
    assert_eq!(
        cmd,
        [
            "/usr/local/bin/vswitch-install",
            "sysctls",
            "--node-ip=$(POD_IP)"
        ]
    );
    assert_eq!(first["securityContext"]["privileged"], true);
    assert_eq!(first["env"][0]["name"], "POD_IP");
    assert_eq!(
        first["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIP"
    );
}
