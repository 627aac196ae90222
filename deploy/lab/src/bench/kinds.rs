//! The datapaths compared (the table's columns) and what is measured (its rows).

/// One of the datapaths compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Vswitch,
    /// vswitch with two datapath workers per node.
    Vswitch2,
    /// vswitch with its workers pinned to a CPU of their own, polling, and the pods kept off it.
    VswitchPin,
    Kernel,
    Ovs,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Vswitch,
        Kind::Vswitch2,
        Kind::VswitchPin,
        Kind::Kernel,
        Kind::Ovs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Vswitch => "vswitch",
            Kind::Vswitch2 => "vswitch-2w",
            Kind::VswitchPin => "vswitch-pin",
            Kind::Kernel => "kernel",
            Kind::Ovs => "ovs",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Kind::Vswitch => "vswitch (vswitchd, TAP + userspace VXLAN, 1 datapath worker)",
            Kind::Vswitch2 => "vswitch-2w (the same with 2 datapath workers per node)",
            Kind::VswitchPin => {
                "vswitch-pin (1 worker per node pinned to CPU 0 and polling, pods on the other \
                 CPUs: a core set aside for the datapath, as OVS-DPDK's pmd-cpu-mask with \
                 kubelet's reserved CPUs)"
            }
            Kind::Kernel => "kernel (bridge + vxlan, as flannel builds it)",
            Kind::Ovs => "ovs (Open vSwitch userspace datapath, netdev)",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s.trim())
    }
}

/// What is measured; the rows of the table, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    TcpCross1,
    TcpCross4,
    TcpSame,
    /// The same two tests with the pods' TCP forced to cubic (Linux's default congestion
    /// control), whatever the host's default is.
    TcpCross1Cubic,
    TcpSameCubic,
    Udp64Rate,
    Udp64Loss,
    Udp64Sent,
    Udp64SocketLoss,
    PingRtt,
    TcpRr,
    ClusterIpTcp,
    ClusterIpRatio,
    CpuPerGb,
    DatapathCpuPerGb,
    /// New TCP connections a second (a connection per 1-byte transaction).
    TcpCrr,
    /// Cross-node TCP with 100 NetworkPolicies selecting both pods, and its ratio over the
    /// same test with none, measured just before.
    PolicyTcp,
    PolicyTcpRatio,
    /// New connections a second with 1,000 policies, and the ratio over none.
    PolicyCrr,
    PolicyCrrRatio,
    /// A pod's TCP to the host outside the cluster, one stream (vswitch: egress translation;
    /// the kernel path: iptables MASQUERADE on the node).
    EgressTcp,
    /// New TCP connections a second from a pod to the outside host.
    EgressCrr,
}

impl Metric {
    pub const ALL: [Metric; 22] = [
        Metric::TcpCross1,
        Metric::TcpCross4,
        Metric::TcpSame,
        Metric::TcpCross1Cubic,
        Metric::TcpSameCubic,
        Metric::Udp64Rate,
        Metric::Udp64Loss,
        Metric::Udp64Sent,
        Metric::Udp64SocketLoss,
        Metric::PingRtt,
        Metric::TcpRr,
        Metric::ClusterIpTcp,
        Metric::ClusterIpRatio,
        Metric::CpuPerGb,
        Metric::DatapathCpuPerGb,
        Metric::TcpCrr,
        Metric::PolicyTcp,
        Metric::PolicyTcpRatio,
        Metric::PolicyCrr,
        Metric::PolicyCrrRatio,
        Metric::EgressTcp,
        Metric::EgressCrr,
    ];

    /// The key in the JSON document.
    pub fn key(self) -> &'static str {
        match self {
            Metric::TcpCross1 => "tcp_cross_node_1",
            Metric::TcpCross4 => "tcp_cross_node_4",
            Metric::TcpSame => "tcp_same_node",
            Metric::TcpCross1Cubic => "tcp_cross_node_1_cubic",
            Metric::TcpSameCubic => "tcp_same_node_cubic",
            Metric::Udp64Rate => "udp64_delivered",
            Metric::Udp64Loss => "udp64_loss",
            Metric::Udp64Sent => "udp64_sent",
            Metric::Udp64SocketLoss => "udp64_loss_at_receiver_socket",
            Metric::PingRtt => "ping_rtt",
            Metric::TcpRr => "tcp_rr",
            Metric::ClusterIpTcp => "clusterip_tcp",
            Metric::ClusterIpRatio => "clusterip_vs_pod_ip",
            Metric::CpuPerGb => "cpu_per_gb",
            Metric::DatapathCpuPerGb => "datapath_cpu_per_gb",
            Metric::TcpCrr => "tcp_crr",
            Metric::PolicyTcp => "policy100_tcp_cross_node",
            Metric::PolicyTcpRatio => "policy100_vs_none_tcp",
            Metric::PolicyCrr => "policy1000_tcp_crr",
            Metric::PolicyCrrRatio => "policy1000_vs_none_crr",
            Metric::EgressTcp => "egress_tcp",
            Metric::EgressCrr => "egress_tcp_crr",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Metric::TcpCross1 => "cross-node TCP, 1 stream",
            Metric::TcpCross4 => "cross-node TCP, 4 streams",
            Metric::TcpSame => "same-node TCP",
            Metric::TcpCross1Cubic => "cross-node TCP, cubic",
            Metric::TcpSameCubic => "same-node TCP, cubic",
            Metric::Udp64Rate => "UDP 64 B delivered",
            Metric::Udp64Loss => "UDP 64 B loss",
            Metric::Udp64Sent => "UDP 64 B sent",
            Metric::Udp64SocketLoss => "UDP 64 B lost at rcv socket",
            Metric::PingRtt => "ping RTT (avg)",
            Metric::TcpRr => "TCP request/response",
            Metric::ClusterIpTcp => "ClusterIP TCP",
            Metric::ClusterIpRatio => "ClusterIP / pod IP",
            Metric::CpuPerGb => "CPU per GB, machine",
            Metric::DatapathCpuPerGb => "CPU per GB, datapath procs",
            Metric::TcpCrr => "TCP new connections",
            Metric::PolicyTcp => "cross-node TCP, 100 policies",
            Metric::PolicyTcpRatio => "100 policies / none, TCP",
            Metric::PolicyCrr => "new conns, 1,000 policies",
            Metric::PolicyCrrRatio => "1,000 policies / none, conns",
            Metric::EgressTcp => "TCP to the outside host",
            Metric::EgressCrr => "new conns to the outside",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Metric::TcpCross1
            | Metric::TcpCross4
            | Metric::TcpSame
            | Metric::TcpCross1Cubic
            | Metric::TcpSameCubic
            | Metric::ClusterIpTcp
            | Metric::PolicyTcp
            | Metric::EgressTcp => "Gbit/s",
            Metric::Udp64Rate | Metric::Udp64Sent => "kpps",
            Metric::Udp64Loss | Metric::Udp64SocketLoss => "%",
            Metric::PingRtt => "ms",
            Metric::TcpRr => "trans/s",
            Metric::TcpCrr | Metric::PolicyCrr | Metric::EgressCrr => "conn/s",
            Metric::ClusterIpRatio | Metric::PolicyTcpRatio | Metric::PolicyCrrRatio => "x",
            Metric::CpuPerGb | Metric::DatapathCpuPerGb => "CPU s/GB",
        }
    }

    pub fn higher_is_better(self) -> bool {
        !matches!(
            self,
            Metric::Udp64Loss
                | Metric::Udp64SocketLoss
                | Metric::PingRtt
                | Metric::CpuPerGb
                | Metric::DatapathCpuPerGb
        )
    }

    /// Whether vswitch/other makes sense (a ratio of loss percentages does not, nor one of
    /// how fast the sending pod could hand datagrams to its interface).
    pub(super) fn has_ratio(self) -> bool {
        !matches!(
            self,
            Metric::Udp64Loss | Metric::Udp64SocketLoss | Metric::Udp64Sent
        )
    }

    pub(super) fn decimals(self) -> usize {
        match self {
            Metric::Udp64Rate
            | Metric::Udp64Sent
            | Metric::TcpRr
            | Metric::TcpCrr
            | Metric::PolicyCrr
            | Metric::EgressCrr => 0,
            Metric::Udp64Loss | Metric::Udp64SocketLoss => 1,
            Metric::PingRtt => 3,
            _ => 2,
        }
    }

    /// A value in this metric's unit, rounded for display.
    pub fn format(self, v: f64) -> String {
        format!("{v:.*}", self.decimals())
    }
}
