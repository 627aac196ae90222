//! The VXLAN overlay: how pod traffic crosses between nodes.
//!
//! Frames for a pod on another node are wrapped in VXLAN (RFC 7348) and sent in a plain UDP
//! datagram to that node's underlay address; no kernel vxlan device is involved. The format is
//! the one Linux's vxlan driver speaks as flannel configures it (VNI 1, port 8472, inner frames
//! addressed to the peer's VTEP MAC), so vswitch nodes and flannel nodes can share a cluster.

pub mod peers;
pub mod vxlan;

pub use peers::{Peer, PeerId, PeerTable};
