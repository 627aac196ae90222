//! vswitch-lab: a cluster of nodes and pods in network namespaces, running the real vswitchd
//! and attaching pods through the real CNI plugin.
//!
//! A lab `NAME` is:
//! - `NAME-fab`: the "physical LAN", a kernel bridge `fab0`. It is the lab's stand-in for the
//!   switch between machines, not part of vswitch's datapath.
//! - `NAME-n{i}`: node `i`, with `ul0` (192.168.100.{i}/24, MTU 1500) on the fabric and one
//!   `vswitchd` for pod CIDR 10.244.{i}.0/24, started in its own session so it outlives the
//!   command that started it.
//! - `NAME-n{i}-p{j}`: pods, each attached by running the `vswitch` CNI plugin exactly as a
//!   runtime does (CNI_* environment, netconf on stdin, result on stdout).
//!
//! Files live in `/run/vswitch-lab/NAME/`: `lab.json` (the state, see [`Lab`]) and per node
//! `n{i}/{vswitchd.toml, cni.conf, vswitchd.log, vswitchd.pid, vswitchd.sock, state/}`.
//!
//! The CLI (`vswitch-lab up|status|down|exec|add-pod|del-pod|add-service|del-service`) is a thin layer over this crate;
//! the end-to-end tests use [`Lab`] (usually inside a [`LabGuard`]) directly. `vswitch-lab bench`
//! ([`bench`]) builds the same pod topology for vswitch, the kernel path and Open vSwitch and
//! compares them.

pub mod bench;
pub mod bench_summary;
mod cni;
mod error;
mod files;
pub mod fsutil;
pub mod kube;
mod lab;
pub mod policy;
pub mod process;
pub mod render;
pub mod scale;
pub mod services;
pub mod soak;
mod spec;
mod status;
mod sys;
pub mod wake;

pub use cni::parse_publish;
pub use error::LabError;
pub use files::with_nat_keys;
pub use lab::{
    Binaries, DownReport, Lab, LabGuard, Node, Pod, PodOptions, UpOptions, BIN_DIR_ENV, PLUGIN,
    RUN_DIR, STATE_FILE, VSWITCHD,
};
pub use spec::{
    validate_name, validate_pod_name, LabSpec, DEFAULT_NAME, FABRIC_BRIDGE, MAX_NAME_LEN,
    MAX_NODES, MAX_PODS_PER_NODE, OUTSIDE_IP, POD_IFNAME, POD_MTU, UNDERLAY_IFNAME, UNDERLAY_MTU,
};
pub use status::{LabStatus, NodeStatus, PodStatus};
