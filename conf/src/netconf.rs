//! The CNI network configuration for `"type": "vswitch"`.
//!
//! Runtimes add fields of their own (runtimeConfig, capabilities, prevResult, args), so unknown
//! fields are accepted here; the ones vswitch reads are validated and named in errors.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

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
    /// A netconf as the lab and the docs write it.
    pub fn new(name: &str, socket: Option<PathBuf>) -> Self {
        NetConf {
            cni_version: CNI_VERSION.into(),
            name: name.into(),
            plugin_type: PLUGIN_TYPE.into(),
            socket,
            valid_attachments: None,
            other: Default::default(),
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
}
