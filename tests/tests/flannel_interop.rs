//! Interop with flannel (issue 3): a vswitch node and a node built exactly as flannel's vxlan
//! backend builds one with the kernel's own datapath (bridge cbr0, a vxlan device with
//! `nolearning`, and static route/neigh/fdb entries for each remote node; see
//! ../shared/anchors/kernel-vxlan.sh) share one LAN and exchange ping, TCP and UDP both ways.
//!
//! The kernel node needs the kernel's bridge and vxlan modules: without them the test fails
//! and says so, since the whole point is a real, independent VXLAN peer.

mod overlay_support;

use std::time::Instant;

use overlay_support::*;
use vswitch_lab::{Node, FABRIC_BRIDGE, POD_MTU, UNDERLAY_MTU};

/// A node as flannel's vxlan backend makes it, with one pod behind its bridge.
struct KernelNode {
    /// The node's pod namespace (declared first: dropped, i.e. deleted, first).
    pod: Netns,
    node: Netns,
    index: u8,
    vtep_mac: String,
}

impl KernelNode {
    fn underlay_ip(&self) -> String {
        format!("192.168.100.{}", self.index)
    }
    fn pod_cidr(&self) -> String {
        format!("10.244.{}.0/24", self.index)
    }
    fn pod_ip(&self) -> String {
        format!("10.244.{}.2", self.index)
    }

    /// Builds node `index` on the lab's fabric, with routes to the vswitch node `peer` (whose
    /// VTEP MAC is `peer_mac`), exactly as flannel would for a remote node.
    ///
    /// `nic_checksums`: make the underlay link finish checksums before the "wire" as a real NIC
    /// does. A veth does not: with its tx checksum offload on, the kernel's vxlan sends inner
    /// TCP/UDP with only the pseudo-header sum in the checksum field (CHECKSUM_PARTIAL travels
    /// with the skb to the next namespace), which a kernel receiver accepts but a userspace
    /// receiver cannot tell from a corrupt packet.
    ///
    /// `rco`: the vxlan device also sends and takes remote checksum offload (`udpcsum
    /// remcsumtx remcsumrx`), as a vswitch peer does.
    fn build(
        lab_name: &str,
        fabric_netns: &str,
        index: u8,
        peer: &Node,
        peer_mac: &str,
        nic_checksums: bool,
        rco: bool,
    ) -> Self {
        let node = Netns::add(&format!("{lab_name}-k{index}"));
        let pod = Netns::add(&format!("{lab_name}-k{index}p1"));
        let k = KernelNode {
            pod,
            node,
            index,
            vtep_mac: format!("02:fa:00:00:{index:02x}:01"),
        };
        let ns = k.node.name.clone();
        let mtu = UNDERLAY_MTU.to_string();
        let pod_mtu = POD_MTU.to_string();

        // Its link to the LAN: a veth into the lab's fabric bridge.
        let fab_port = format!("{lab_name}k{index}");
        must_host(&[
            "ip",
            "link",
            "add",
            "ul0",
            "netns",
            &ns,
            "type",
            "veth",
            "peer",
            "name",
            &fab_port,
            "netns",
            fabric_netns,
        ]);
        must_host(&[
            "ip",
            "-n",
            fabric_netns,
            "link",
            "set",
            &fab_port,
            "mtu",
            &mtu,
            "master",
            FABRIC_BRIDGE,
            "up",
        ]);
        let ul = format!("{}/24", k.underlay_ip());
        must_host(&["ip", "-n", &ns, "addr", "add", &ul, "dev", "ul0"]);
        must_host(&["ip", "-n", &ns, "link", "set", "ul0", "mtu", &mtu, "up"]);
        if nic_checksums {
            must_in(&ns, &["ethtool", "-K", "ul0", "tx", "off"]);
        }

        // The bridge its pods hang off, holding the pods' gateway.
        let gw = format!("10.244.{index}.1/24");
        let o = run_host(&["ip", "-n", &ns, "link", "add", "cbr0", "type", "bridge"]);
        assert!(
            o.status.success(),
            "cannot create a kernel bridge (is the bridge module available?): {}",
            text(&o)
        );
        must_host(&["ip", "-n", &ns, "addr", "add", &gw, "dev", "cbr0"]);
        must_host(&[
            "ip", "-n", &ns, "link", "set", "cbr0", "up", "mtu", &pod_mtu,
        ]);

        // flannel.1 as flannel makes it: VNI 1, port 8472, no learning, the node's own MAC.
        let local = k.underlay_ip();
        let mut args = vec![
            "ip",
            "-n",
            &ns,
            "link",
            "add",
            "vx",
            "type",
            "vxlan",
            "id",
            "1",
            "dstport",
            "8472",
            "local",
            &local,
            "dev",
            "ul0",
            "nolearning",
        ];
        if rco {
            args.extend(["udpcsum", "remcsumtx", "remcsumrx"]);
        }
        let o = run_host(&args);
        assert!(
            o.status.success(),
            "cannot create a kernel vxlan device, so there is no flannel-style peer to test \
             against (is the vxlan module available? `modprobe vxlan`): {}",
            text(&o)
        );
        must_host(&[
            "ip",
            "-n",
            &ns,
            "link",
            "set",
            "vx",
            "address",
            &k.vtep_mac,
            "mtu",
            &pod_mtu,
            "up",
        ]);
        let vx_addr = format!("10.244.{index}.0/32");
        must_host(&["ip", "-n", &ns, "addr", "add", &vx_addr, "dev", "vx"]);
        must_in(&ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);

        // What flannel adds for each remote node: route via its VTEP address, a permanent
        // neighbour entry with its VTEP MAC, and an fdb entry pointing that MAC at its
        // underlay address.
        let peer_cidr = peer.pod_cidr.to_string();
        let peer_vtep_ip = peer.pod_cidr.network().to_string();
        must_host(&[
            "ip",
            "-n",
            &ns,
            "route",
            "add",
            &peer_cidr,
            "via",
            &peer_vtep_ip,
            "dev",
            "vx",
            "onlink",
        ]);
        must_host(&[
            "ip",
            "-n",
            &ns,
            "neigh",
            "add",
            &peer_vtep_ip,
            "lladdr",
            peer_mac,
            "dev",
            "vx",
            "nud",
            "permanent",
        ]);
        let peer_ul = peer.underlay_ip.to_string();
        must_in(
            &ns,
            &[
                "bridge", "fdb", "add", peer_mac, "dev", "vx", "dst", &peer_ul,
            ],
        );

        // A pod: a veth into cbr0, MTU 1450, default route via the bridge.
        let pns = k.pod.name.clone();
        let host_end = "vp1";
        must_host(&[
            "ip", "link", "add", "eth0", "netns", &pns, "mtu", &pod_mtu, "type", "veth", "peer",
            "name", host_end, "netns", &ns, "mtu", &pod_mtu,
        ]);
        let pod_addr = format!("{}/24", k.pod_ip());
        must_host(&["ip", "-n", &pns, "addr", "add", &pod_addr, "dev", "eth0"]);
        must_host(&["ip", "-n", &pns, "link", "set", "eth0", "up"]);
        let gw_ip = format!("10.244.{index}.1");
        must_host(&["ip", "-n", &pns, "route", "add", "default", "via", &gw_ip]);
        must_host(&[
            "ip", "-n", &ns, "link", "set", host_end, "master", "cbr0", "up",
        ]);
        k
    }
}

/// Kernel node 9 on `lab`'s fabric, routed to the vswitch node `v` (see [`KernelNode::build`]
/// for `nic_checksums` and `rco`), and `v` told about it as its annotations would tell it.
fn kernel_peer(lab: &vswitch_lab::Lab, v: &Node, nic_checksums: bool, rco: bool) -> KernelNode {
    let vmac = vtep_mac(v);
    let k = KernelNode::build(
        &lab.name,
        &lab.fabric_netns,
        9,
        v,
        &vmac,
        nic_checksums,
        rco,
    );
    let kname = format!("{}-k{}", lab.name, k.index);
    let (ip, cidr) = (k.underlay_ip(), k.pod_cidr());
    let mut args = vec![
        "peer-add",
        &kname,
        "--underlay-ip",
        &ip,
        "--vtep-mac",
        &k.vtep_mac,
        "--pod-cidr",
        &cidr,
    ];
    if rco {
        args.push("--remote-checksum");
    }
    ctl_ok(v, &args);
    k
}

/// The kernel node's vxlan device decapsulated plenty from the vswitch node and counted no
/// receive error.
fn assert_kernel_vx_received(k: &KernelNode) {
    let stats = must_in(&k.node.name, &["ip", "-s", "-j", "link", "show", "vx"]);
    let stats: serde_json::Value =
        serde_json::from_str(&stats).unwrap_or_else(|e| panic!("ip -s -j: {e}: {stats}"));
    let rx = &stats[0]["stats64"]["rx"];
    assert!(
        rx["packets"].as_u64().unwrap_or(0) > 1000,
        "the kernel's vx device received little from the vswitch node: {rx}"
    );
    assert_eq!(
        rx["errors"].as_u64().unwrap_or(0),
        0,
        "the kernel's vx device counts receive errors: {rx}"
    );
}

#[test]
fn kernel_vxlan_node_built_like_flannel_exchanges_ping_tcp_and_udp_with_a_vswitch_node() {
    let started = Instant::now();
    let lab = lab("fl", 1, 1);
    let v = lab.node("n1").clone();
    let vpod = lab.pod("n1-p1");
    let k = kernel_peer(&lab, &v, true, false);
    let before = ports(&v)["underlay"]["rx_packets"].as_u64().unwrap_or(0);

    // Ping, both ways.
    let kpod = k.pod.name.clone();
    let kip = k.pod_ip();
    let p = ping(&kpod, vpod.ip, 3, &[]);
    assert!(p.all_answered(), "kernel pod -> vswitch pod: {}", p.text);
    let p = ping(&vpod.netns, &kip, 3, &[]);
    assert!(p.all_answered(), "vswitch pod -> kernel pod: {}", p.text);
    // Full-size packets (1450 bytes, DF) fit the path both ways.
    let p = ping(&kpod, vpod.ip, 2, &["-M", "do", "-s", "1422"]);
    assert!(
        p.all_answered(),
        "1450-byte DF, kernel -> vswitch: {}",
        p.text
    );
    let p = ping(&vpod.netns, &kip, 2, &["-M", "do", "-s", "1422"]);
    assert!(
        p.all_answered(),
        "1450-byte DF, vswitch -> kernel: {}",
        p.text
    );

    // TCP opened from the kernel side, data both ways at once.
    let tcp = iperf(&kpod, &vpod.netns, vpod.ip, &["--bidir"]);
    assert_tcp_bidir(&tcp, "kernel pod <-> vswitch pod");
    // UDP opened from the vswitch side, both ways at once.
    let udp = iperf(&vpod.netns, &kpod, &kip, &["-u", "-b", "50M", "--bidir"]);
    assert_udp_bidir(&udp, "vswitch pod <-> kernel pod");

    // The vswitch node took the kernel's VXLAN as well-formed: received, none refused.
    let p = ports(&v);
    let after = p["underlay"]["rx_packets"].as_u64().unwrap_or(0);
    assert!(
        after > before + 1000,
        "the vswitch node's underlay received {} datagrams during the exchange: {p}",
        after - before
    );
    let drops = underlay_drops(&v);
    assert!(
        drops.keys().all(|r| !r.starts_with("vxlan_")),
        "the vswitch node refused some of the kernel's VXLAN: {drops:?}"
    );
    // And the kernel's vxlan device got ours: it counts what it decapsulated.
    assert_kernel_vx_received(&k);
    eprintln!("took {:.1?}", started.elapsed());
}

/// What a vswitch node receives from a kernel VXLAN peer whose underlay is a veth with checksum
/// offload on (e.g. kind nodes, which are containers on a veth): inner TCP/UDP checksums are
/// left partial (pseudo-header sum only), vswitchd forwards them to the pod as they are, and the
/// pod's kernel drops them as corrupt, so TCP cannot even connect. Ping works (ICMP checksums
/// are always computed in software). The main test above gives the kernel node a "NIC" that
/// finishes checksums, as every physical one does.
#[test]
fn kernel_vxlan_node_on_a_veth_with_checksum_offload_can_open_tcp_to_a_vswitch_pod() {
    let lab = lab("fl", 1, 1);
    let v = lab.node("n1").clone();
    let vpod = lab.pod("n1-p1");
    let k = kernel_peer(&lab, &v, false, false);
    assert_ping(&k.pod.name, vpod.ip);
    let tcp = iperf(&k.pod.name, &vpod.netns, vpod.ip, &[]);
    assert!(iperf_sum(&tcp, "sum_received").0 > 0, "{tcp}");
}

/// Remote checksum offload against Linux's own implementation: a kernel vxlan device with
/// `remcsumtx remcsumrx` and a vswitch node told the peer takes it exchange TCP and UDP both
/// ways. The kernel decodes our RCO headers (it counts no receive errors and the pods' stacks
/// accept every segment), and we decode its (no `vxlan_bad_rco` drops). The kernel's own
/// RCO frames arrive partial, so this also passes where the plain kernel peer above needs its
/// "NIC" to finish checksums.
#[test]
fn remote_checksum_offload_interoperates_with_a_kernel_vxlan_device() {
    let lab = lab("fr", 1, 1);
    let v = lab.node("n1").clone();
    let vpod = lab.pod("n1-p1");
    let k = kernel_peer(&lab, &v, false, true);
    let peers = ctl_ok(&v, &["--json", "peers"]);
    assert!(peers.contains("\"remote_checksum\": true"), "{peers}");
    let kpod = k.pod.name.clone();
    let kip = k.pod_ip();
    assert_ping(&kpod, vpod.ip);
    let tcp = iperf(&kpod, &vpod.netns, vpod.ip, &["--bidir"]);
    assert_tcp_bidir(&tcp, "kernel pod <-> vswitch pod (RCO)");
    let tcp = iperf(&vpod.netns, &kpod, &kip, &["--bidir"]);
    assert_tcp_bidir(&tcp, "vswitch pod <-> kernel pod (RCO)");
    let udp = iperf(&vpod.netns, &kpod, &kip, &["-u", "-b", "50M", "--bidir"]);
    assert_udp_bidir(&udp, "vswitch pod <-> kernel pod (RCO)");
    let drops = underlay_drops(&v);
    assert!(
        drops.keys().all(|r| !r.starts_with("vxlan_")),
        "the vswitch node refused some of the kernel's RCO VXLAN: {drops:?}"
    );
    assert_kernel_vx_received(&k);
}
