//! The CNI network configuration for `"type": "vswitch"`.
//!
//! Runtimes add fields of their own (runtimeConfig, capabilities, prevResult, args), so unknown
//! fields are accepted here; the ones vswitch reads are validated and named in errors.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::api::PortMapping;

/// The CNI versions the plugin accepts in a netconf and can write results for.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The plugin's own spec version.
pub const CNI_VERSION: &str = "1.1.0";
/// The plugin type name.
pub const PLUGIN_TYPE: &str = "vswitch";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NetConf {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// The daemon's admin socket. Default: /run/vswitch/vswitchd.sock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// GC: the attachments the runtime still uses.
    #[serde(
        rename = "cni.dev/valid-attachments",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub valid_attachments: Option<Vec<ValidAttachment>>,
    /// Anything else the runtime sent.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct NetConfError {
    pub field: &'static str,
    pub reason: String,
}

impl NetConf {
    /// A netconf as the lab and the docs write it: it declares the `portMappings`
    /// capability, so runtimes pass the pods' hostPorts.
    pub fn new(name: &str, socket: Option<PathBuf>) -> Self {
        let mut other = serde_json::Map::new();
        other.insert(
            "capabilities".into(),
            serde_json::json!({"portMappings": true}),
        );
        NetConf {
            cni_version: CNI_VERSION.into(),
            name: name.into(),
            plugin_type: PLUGIN_TYPE.into(),
            socket,
            valid_attachments: None,
            other,
        }
    }

    pub fn validate(&self) -> Result<(), NetConfError> {
        let err = |field, reason: String| Err(NetConfError { field, reason });
        if !SUPPORTED_VERSIONS.contains(&self.cni_version.as_str()) {
            return err(
                "cniVersion",
                format!(
                    "{:?} is not supported (supported: {})",
                    self.cni_version,
                    SUPPORTED_VERSIONS.join(", ")
                ),
            );
        }
        let name_ok = !self.name.is_empty()
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !name_ok {
            return err(
                "name",
                format!("{:?} must be non-empty and only [A-Za-z0-9_.-]", self.name),
            );
        }
        if self.plugin_type != PLUGIN_TYPE {
            return err(
                "type",
                format!("{:?} is not {PLUGIN_TYPE:?}", self.plugin_type),
            );
        }
        if let Some(s) = &self.socket {
            if !s.is_absolute() {
                return err(
                    "socket",
                    format!("{} must be an absolute path", s.display()),
                );
            }
        }
        Ok(())
    }

    /// The pod's labels, as runtimes pass them by the CNI conventions: `"args": {"cni":
    /// {"labels": [{"key": "app", "value": "web"}]}}`. None given: empty.
    pub fn labels(&self) -> Result<BTreeMap<String, String>, NetConfError> {
        let field = "args.cni.labels";
        let Some(list) = self
            .other
            .get("args")
            .and_then(|a| a.get("cni"))
            .and_then(|c| c.get("labels"))
        else {
            return Ok(BTreeMap::new());
        };
        let bad = |reason: String| NetConfError { field, reason };
        let list = list
            .as_array()
            .ok_or_else(|| bad(format!("{list} is not a list of {{\"key\", \"value\"}}")))?;
        let mut out = BTreeMap::new();
        for (i, item) in list.iter().enumerate() {
            let get = |k: &str| item.get(k).and_then(|v| v.as_str());
            match (get("key"), get("value")) {
                (Some(k), Some(v)) if !k.is_empty() => {
                    out.insert(k.to_string(), v.to_string());
                }
                _ => {
                    return Err(bad(format!(
                        "[{i}]: {item} is not {{\"key\": \"...\", \"value\": \"...\"}}"
                    )))
                }
            }
        }
        Ok(out)
    }

    /// The pod's hostPorts, as runtimes pass them for the `portMappings` capability:
    /// `"runtimeConfig": {"portMappings": [{"hostPort": 8080, "containerPort": 80,
    /// "protocol": "tcp", "hostIP": ""}]}`. None given: empty. SCTP and IPv6 host addresses
    /// are refused (the relay serves TCP and UDP over IPv4), as is one host port and protocol
    /// given twice.
    pub fn port_mappings(&self) -> Result<Vec<PortMapping>, NetConfError> {
        let field = "runtimeConfig.portMappings";
        let Some(list) = self
            .other
            .get("runtimeConfig")
            .and_then(|a| a.get("portMappings"))
        else {
            return Ok(Vec::new());
        };
        let bad = |reason: String| NetConfError { field, reason };
        let list = list
            .as_array()
            .ok_or_else(|| bad(format!("{list} is not a list of port mappings")))?;
        let mut out: Vec<PortMapping> = Vec::new();
        for (i, item) in list.iter().enumerate() {
            let port = |k: &str| -> Result<u16, NetConfError> {
                item.get(k)
                    .and_then(|v| v.as_u64())
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad(format!("[{i}].{k}: {item} needs a port 1-65535")))
            };
            let (host_port, container_port) = (port("hostPort")?, port("containerPort")?);
            let protocol = match item.get("protocol").and_then(|v| v.as_str()) {
                None | Some("") => "tcp".to_string(),
                Some(p) if p.eq_ignore_ascii_case("tcp") || p.eq_ignore_ascii_case("udp") => {
                    p.to_ascii_lowercase()
                }
                Some(p) => {
                    return Err(bad(format!(
                        "[{i}].protocol: {p:?} is not supported (tcp or udp)"
                    )))
                }
            };
            let host_ip = match item.get("hostIP").and_then(|v| v.as_str()) {
                None | Some("") | Some("0.0.0.0") => None,
                Some(a) => match a.parse::<std::net::IpAddr>() {
                    Ok(std::net::IpAddr::V4(a)) => Some(a),
                    Ok(std::net::IpAddr::V6(_)) => {
                        return Err(bad(format!(
                            "[{i}].hostIP: {a} is IPv6; hostPorts listen on IPv4 only"
                        )))
                    }
                    Err(_) => return Err(bad(format!("[{i}].hostIP: {a:?} is not an address"))),
                },
            };
            let m = PortMapping {
                host_port,
                container_port,
                protocol,
                host_ip,
            };
            if out
                .iter()
                .any(|o| o.host_port == m.host_port && o.protocol == m.protocol)
            {
                return Err(bad(format!(
                    "[{i}]: host port {}/{} is given twice",
                    m.host_port, m.protocol
                )));
            }
            out.push(m);
        }
        Ok(out)
    }

    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_SOCKET))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_runtime_fields_and_validates_ours() {
        let j = r#"{"cniVersion":"1.0.0","name":"pods","type":"vswitch","runtimeConfig":{"x":1},
                   "cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]}"#;
        let nc: NetConf = serde_json::from_str(j).unwrap();
        nc.validate().unwrap();
        assert_eq!(nc.valid_attachments.unwrap()[0].container_id, "c1");
        assert!(nc.other.contains_key("runtimeConfig"));

        let mut bad = NetConf::new("pods", None);
        bad.cni_version = "0.2.0".into();
        assert_eq!(bad.validate().unwrap_err().field, "cniVersion");
        let mut bad = NetConf::new("pods", None);
        bad.plugin_type = "bridge".into();
        assert_eq!(bad.validate().unwrap_err().field, "type");
        let bad = NetConf::new("pods", Some("rel.sock".into()));
        assert_eq!(bad.validate().unwrap_err().field, "socket");
    }

    #[test]
    fn labels_by_the_cni_conventions() {
        let nc: NetConf = serde_json::from_str(
            r#"{"cniVersion":"1.0.0","name":"pods","type":"vswitch",
                "args":{"cni":{"labels":[{"key":"app","value":"web"},{"key":"tier","value":""}]}}}"#,
        )
        .unwrap();
        let l = nc.labels().unwrap();
        assert_eq!(l.get("app").map(String::as_str), Some("web"));
        assert_eq!(l.get("tier").map(String::as_str), Some(""));
        assert!(NetConf::new("pods", None).labels().unwrap().is_empty());
        let bad: NetConf = serde_json::from_str(
            r#"{"cniVersion":"1.0.0","name":"pods","type":"vswitch","args":{"cni":{"labels":[{"key":"app"}]}}}"#,
        )
        .unwrap();
        let e = bad.labels().unwrap_err();
        assert_eq!(e.field, "args.cni.labels");
        assert!(e.reason.starts_with("[0]"), "{e}");
    }

    #[test]
    fn port_mappings_as_runtimes_pass_them() {
        let nc = |maps: &str| -> NetConf {
            serde_json::from_str(&format!(
                r#"{{"cniVersion":"1.0.0","name":"pods","type":"vswitch",
                    "runtimeConfig":{{"portMappings":{maps}}}}}"#
            ))
            .unwrap()
        };
        let m = nc(
            r#"[{"hostPort":8080,"containerPort":80,"protocol":"tcp","hostIP":""},
                      {"hostPort":5353,"containerPort":53,"protocol":"UDP","hostIP":"10.0.0.1"},
                      {"hostPort":8080,"containerPort":80,"protocol":"udp"}]"#,
        )
        .port_mappings()
        .unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].to_string(), "8080->80/tcp");
        assert_eq!(m[1].to_string(), "10.0.0.1:5353->53/udp");
        assert_eq!(m[2].host_ip, None);
        assert!(NetConf::new("pods", None)
            .port_mappings()
            .unwrap()
            .is_empty());
        for (maps, says) in [
            (r#"[{"hostPort":0,"containerPort":80}]"#, "[0].hostPort"),
            (
                r#"[{"hostPort":80,"containerPort":70000}]"#,
                "[0].containerPort",
            ),
            (
                r#"[{"hostPort":80,"containerPort":80,"protocol":"sctp"}]"#,
                "[0].protocol",
            ),
            (
                r#"[{"hostPort":80,"containerPort":80,"hostIP":"::1"}]"#,
                "IPv6",
            ),
            (
                r#"[{"hostPort":80,"containerPort":80,"hostIP":"x"}]"#,
                "[0].hostIP",
            ),
            (
                r#"[{"hostPort":80,"containerPort":80},{"hostPort":80,"containerPort":81}]"#,
                "twice",
            ),
            (r#"{"hostPort":80}"#, "not a list"),
        ] {
            let e = nc(maps).port_mappings().unwrap_err();
            assert_eq!(e.field, "runtimeConfig.portMappings");
            assert!(e.reason.contains(says), "{maps}: {e}");
        }
    }
}
