//! Kubernetes mode: the lab's API server stand-in and what it holds.
//!
//! `up --kubernetes` starts `vswitch-apiserver` (deploy/apiserver) in the fabric namespace on
//! the fabric's last address, so every node reaches it over the lab's LAN as a kubelet reaches
//! its API server, and the host's namespace stays untouched. It starts holding the lab's Node
//! objects (pod CIDR and InternalIP as the static mode uses them); each vswitchd then runs with
//! `[kubernetes] enabled`, finds its peers from the Nodes and the VTEP annotations the others
//! publish, and takes Services from the API. `kubectl` reaches the stand-in through
//! `vswitch-lab kubectl -- ARGS`, which runs it in the fabric namespace with the lab's
//! kubeconfig.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::lab::{Lab, Node};
use crate::{sys, LabError};

/// The stand-in's binary name.
pub const APISERVER: &str = "vswitch-apiserver";
/// Its address on the fabric: the last of the underlay /24 (nodes take .1 up).
pub const APISERVER_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 254);
pub const APISERVER_PORT: u16 = 6443;
/// How long the stand-in gets to bind its port.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The running stand-in, as saved in the lab's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiServerState {
    /// `192.168.100.254:6443`.
    pub address: String,
    /// The namespace it runs in (the fabric's).
    pub netns: String,
    /// A kubeconfig for it, as every node's vswitchd and `vswitch-lab kubectl` use.
    pub kubeconfig: PathBuf,
    pub log: PathBuf,
    pub pid: Option<u32>,
    /// Written by the stand-in once it serves; also what tells its process from others.
    pub address_file: PathBuf,
}

impl ApiServerState {
    pub(crate) fn plan(lab_dir: &Path, netns: &str) -> ApiServerState {
        ApiServerState {
            address: format!("{APISERVER_IP}:{APISERVER_PORT}"),
            netns: netns.to_string(),
            kubeconfig: lab_dir.join("kubeconfig"),
            log: lab_dir.join("apiserver.log"),
            pid: None,
            address_file: lab_dir.join("apiserver.addr"),
        }
    }

    pub(crate) fn pid_file(lab_dir: &Path) -> PathBuf {
        lab_dir.join("apiserver.pid")
    }

    pub fn alive(&self) -> bool {
        self.pid
            .is_some_and(|p| sys::process_alive(p, self.address_file.as_os_str()))
    }
}

/// The Node object of a lab node: what a kubelet registers, with the pod CIDR the node
/// controller would give it.
pub fn node_object(node: &Node) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node.name,
            "labels": {"kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux"}
        },
        "spec": {"podCIDR": node.pod_cidr.to_string(), "podCIDRs": [node.pod_cidr.to_string()]},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": node.underlay_ip.to_string()},
                {"type": "Hostname", "address": node.name}
            ],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]
        }
    })
}

/// A kubeconfig for the stand-in (plain HTTP, no credentials).
pub fn kubeconfig_text(lab: &str, address: &str) -> String {
    format!(
        "# Written by vswitch-lab for lab {lab}: the API server stand-in (plain HTTP).\n\
         apiVersion: v1\nkind: Config\nclusters:\n- name: {lab}\n  cluster:\n    server: \
         http://{address}\ncontexts:\n- name: {lab}\n  context:\n    cluster: {lab}\n    user: \
         {lab}\ncurrent-context: {lab}\nusers:\n- name: {lab}\n  user: {{}}\n"
    )
}

impl Lab {
    /// Starts the stand-in in the fabric namespace holding `nodes`' Node objects, and writes
    /// the kubeconfig. Recorded in the state before it starts, so `down` finds it.
    pub(crate) fn start_apiserver(
        &mut self,
        exe: &Path,
        nodes: &[Node],
        load: &[PathBuf],
    ) -> Result<(), LabError> {
        let mut st = ApiServerState::plan(&self.dir, &self.fabric_netns);
        let fab = self.fabric_netns.clone();
        sys::ip(&[
            "-n",
            &fab,
            "addr",
            "add",
            &format!("{APISERVER_IP}/{}", crate::spec::UNDERLAY_PREFIX_LEN),
            "dev",
            crate::spec::FABRIC_BRIDGE,
        ])?;
        let list = json!({
            "apiVersion": "v1",
            "kind": "NodeList",
            "items": nodes.iter().map(node_object).collect::<Vec<_>>(),
        });
        let nodes_file = self.dir.join("nodes.json");
        write(&nodes_file, list.to_string())?;
        write(&st.kubeconfig, kubeconfig_text(&self.name, &st.address))?;
        let _ = fs::remove_file(&st.address_file);
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--listen".as_ref(),
            st.address.as_ref(),
            "--address-file".as_ref(),
            st.address_file.as_os_str(),
            "--load".as_ref(),
            nodes_file.as_os_str(),
            "--bookmark-interval-s".as_ref(),
            "5".as_ref(),
        ];
        for f in load {
            args.extend(["--load".as_ref(), f.as_os_str()]);
        }
        let mut child = sys::spawn_detached(&fab, exe, &args, &st.log)?;
        st.pid = Some(child.id());
        write(
            &ApiServerState::pid_file(&self.dir),
            format!("{}\n", child.id()),
        )?;
        self.apiserver = Some(Box::new(st.clone()));
        self.save()?;
        let started = Instant::now();
        while !st.address_file.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(LabError::InvalidSpec(format!(
                    "{APISERVER} exited ({status}); its log {} ends:\n{}",
                    st.log.display(),
                    sys::log_tail(&st.log, 10)
                )));
            }
            // Loading a large cluster takes its time before it serves.
            let timeout = START_TIMEOUT * if load.is_empty() { 1 } else { 18 };
            if started.elapsed() > timeout {
                return Err(LabError::InvalidSpec(format!(
                    "{APISERVER} did not serve on {} within {timeout:?}; its log {} ends:\n{}",
                    st.address,
                    st.log.display(),
                    sys::log_tail(&st.log, 10)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The stand-in of a lab in Kubernetes mode, or an error saying the lab is not one.
    pub fn apiserver(&self) -> Result<&ApiServerState, LabError> {
        self.apiserver.as_deref().ok_or_else(|| {
            LabError::InvalidSpec(format!(
                "lab {} is not in Kubernetes mode (start it with `vswitch-lab up --kubernetes`)",
                self.name
            ))
        })
    }

    /// `kubectl ARGS` against the lab's API server (run in the fabric namespace, where the
    /// stand-in's address is on the LAN).
    pub fn kubectl_command<S: AsRef<std::ffi::OsStr>>(
        &self,
        args: &[S],
    ) -> Result<Command, LabError> {
        let st = self.apiserver()?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &st.netns, "kubectl", "--kubeconfig"])
            .arg(&st.kubeconfig)
            .args(args);
        Ok(cmd)
    }

    /// Runs `kubectl ARGS` (with `stdin`, if given) and returns its stdout; an error carries
    /// its stderr.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String, LabError> {
        let mut cmd = self.kubectl_command(args)?;
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let what = format!("kubectl {}", args.join(" "));
        let spawn_err = |e: std::io::Error| LabError::BenchCommand {
            cmd: what.clone(),
            reason: format!("{e} (kubectl is Debian's kubernetes-client package)"),
        };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            use std::io::Write;
            pipe.write_all(text.as_bytes()).map_err(spawn_err)?;
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if !out.status.success() {
            return Err(LabError::BenchCommand {
                cmd: what,
                reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn write(path: &Path, contents: impl AsRef<[u8]>) -> Result<(), LabError> {
    fs::write(path, contents).map_err(|e| LabError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Names;

    #[test]
    fn node_objects_carry_what_vswitchd_reads() {
        let n = Node::plan(Names("vsl"), 2, Path::new("/run/vswitch-lab/vsl"));
        let o = node_object(&n);
        assert_eq!(o["metadata"]["name"], "vsl-n2");
        assert_eq!(o["spec"]["podCIDR"], "10.244.2.0/24");
        assert_eq!(o["status"]["addresses"][0]["address"], "192.168.100.2");
        let kc = kubeconfig_text("vsl", "192.168.100.254:6443");
        assert!(kc.contains("server: http://192.168.100.254:6443"), "{kc}");
    }
}
