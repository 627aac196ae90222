//! The daemon's configuration file (TOML).
//!
//! Parsing is strict (`deny_unknown_fields`) so that a typo is an error, not a silently ignored
//! setting. After parsing, [`Config::validate`] checks every value against the others and the
//! first problem is reported with the dotted path of the field, e.g.
//! `node.pod_cidr: 10.244.1.0/31 leaves no address for pods`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};

/// Default admin socket path.
pub const DEFAULT_SOCKET: &str = "/run/vswitch/vswitchd.sock";
/// Default state directory (IPAM leases, attachments).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vswitch";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub datapath: DatapathConfig,
    #[serde(default)]
    pub dns: DnsConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The node's name (as in Kubernetes).
    pub name: String,
    /// The node's pod CIDR; pods get addresses from it.
    pub pod_cidr: Ipv4Net,
    /// The pods' default gateway, answered by the switch itself. Default: first host address.
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    /// MTU given to pod interfaces.
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// Where IPAM leases and attachment records live; survives restarts.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
}

fn default_mtu() -> u32 {
    1450
}
fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// The admin API's unix socket (HTTP/JSON), created with mode 0600.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
}

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            socket: default_socket(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatapathConfig {
    /// Number of datapath worker threads.
    #[serde(default = "default_workers")]
    pub workers: u32,
    /// TAP offloads (IFF_VNET_HDR with checksum and TSO): one read is a TCP super-frame.
    #[serde(default = "default_true")]
    pub offload: bool,
}

fn default_workers() -> u32 {
    1
}
fn default_true() -> bool {
    true
}

impl Default for DatapathConfig {
    fn default() -> Self {
        DatapathConfig {
            workers: default_workers(),
            offload: true,
        }
    }
}

/// What pods are told about DNS in the CNI result (as kubelet would write resolv.conf).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// The cluster DNS server address given to pods. Empty: no nameserver in the result.
    #[serde(default)]
    pub nameservers: Vec<IpAddr>,
    /// The cluster domain.
    #[serde(default = "default_domain")]
    pub cluster_domain: String,
}

fn default_domain() -> String {
    "cluster.local".into()
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            cluster_domain: default_domain(),
        }
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every field; the error names the first field that is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let n = &self.node;
        if n.name.is_empty() || n.name.len() > 253 {
            return Err(invalid("node.name", "must be 1 to 253 characters"));
        }
        if n.pod_cidr != n.pod_cidr.trunc() {
            return Err(invalid(
                "node.pod_cidr",
                format!(
                    "{} has host bits set; did you mean {}?",
                    n.pod_cidr,
                    n.pod_cidr.trunc()
                ),
            ));
        }
        if n.pod_cidr.prefix_len() > 29 {
            return Err(invalid(
                "node.pod_cidr",
                format!("{} is too small: use a /29 or larger", n.pod_cidr),
            ));
        }
        let gw = self.gateway();
        if !n.pod_cidr.contains(&gw) || gw == n.pod_cidr.network() || gw == n.pod_cidr.broadcast() {
            return Err(invalid(
                "node.gateway",
                format!("{gw} is not a host address of node.pod_cidr {}", n.pod_cidr),
            ));
        }
        if !(576..=65_535).contains(&n.mtu) {
            return Err(invalid(
                "node.mtu",
                format!("{} is out of range 576..=65535", n.mtu),
            ));
        }
        if !n.state_dir.is_absolute() {
            return Err(invalid("node.state_dir", "must be an absolute path"));
        }
        if !self.admin.socket.is_absolute() {
            return Err(invalid("admin.socket", "must be an absolute path"));
        }
        if !(1..=64).contains(&self.datapath.workers) {
            return Err(invalid(
                "datapath.workers",
                format!("{} is out of range 1..=64", self.datapath.workers),
            ));
        }
        let d = &self.dns.cluster_domain;
        if d.is_empty() || d.starts_with('.') || d.ends_with('.') || d.contains("..") {
            return Err(invalid(
                "dns.cluster_domain",
                format!("{d:?} is not a domain name like cluster.local"),
            ));
        }
        Ok(())
    }

    /// The pods' gateway address.
    pub fn gateway(&self) -> Ipv4Addr {
        self.node.gateway.unwrap_or_else(|| {
            let net = u32::from(self.node.pod_cidr.network());
            Ipv4Addr::from(net.wrapping_add(1))
        })
    }

    /// The pod CIDR as a generic network (for types that carry IPv4 or IPv6).
    pub fn pod_net(&self) -> IpNet {
        IpNet::V4(self.node.pod_cidr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[node]\nname = \"n1\"\npod_cidr = \"10.244.1.0/24\"\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MIN).unwrap();
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 244, 1, 1));
        assert_eq!(c.node.mtu, 1450);
        assert_eq!(c.admin.socket, PathBuf::from(DEFAULT_SOCKET));
        assert!(c.datapath.offload);
    }

    fn field_of(text: &str) -> String {
        match Config::parse(text) {
            Err(ConfigError::Invalid { field, .. }) => field.to_string(),
            Err(ConfigError::Parse { message, .. }) => message,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            field_of("[node]\nname = \"n1\"\npod_cidr = \"10.244.1.1/24\"\n"),
            "node.pod_cidr"
        );
        assert_eq!(
            field_of("[node]\nname = \"n1\"\npod_cidr = \"10.244.1.0/30\"\n"),
            "node.pod_cidr"
        );
        assert_eq!(field_of(&format!("{MIN}gateway = \"10.9.0.1\"\n")), "node.gateway");
        assert_eq!(field_of(&format!("{MIN}mtu = 100\n")), "node.mtu");
        assert_eq!(field_of(&format!("{MIN}state_dir = \"rel\"\n")), "node.state_dir");
        assert_eq!(field_of(&format!("{MIN}[datapath]\nworkers = 0\n")), "datapath.workers");
        assert_eq!(
            field_of(&format!("{MIN}[dns]\ncluster_domain = \".x\"\n")),
            "dns.cluster_domain"
        );
        let unknown = field_of(&format!("{MIN}colour = \"red\"\n"));
        assert!(unknown.contains("colour"), "{unknown}");
        let bad_cidr = field_of("[node]\nname = \"n1\"\npod_cidr = \"10.244.1.0/33\"\n");
        assert!(bad_cidr.contains("pod_cidr"), "{bad_cidr}");
    }
}
