//! CNI versions, the ADD result in each of them, and CHECK's reading of prevResult.
//!
//! The result is written in the netconf's cniVersion. The formats differ in two places only:
//! before 1.0.0 each `ips` entry carries `"version": "4"|"6"` (removed in 1.0.0), and 1.1.0
//! added the interface `mtu`. vswitch attaches exactly one interface (the TAP it creates in the
//! pod's namespace has no host-side peer), so every address points at interface 0.

use std::net::IpAddr;

use conf::api::AddResponse;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// A supported CNI version, ordered so commands can require a minimum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl Version {
    pub const ALL: [Version; 5] = [
        Version::V0_3_0,
        Version::V0_3_1,
        Version::V0_4_0,
        Version::V1_0_0,
        Version::V1_1_0,
    ];

    pub fn parse(s: &str) -> Option<Version> {
        Version::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Version::V0_3_0 => "0.3.0",
            Version::V0_3_1 => "0.3.1",
            Version::V0_4_0 => "0.4.0",
            Version::V1_0_0 => "1.0.0",
            Version::V1_1_0 => "1.1.0",
        }
    }
}

#[derive(Debug, Serialize)]
pub struct CniResult<'a> {
    #[serde(rename = "cniVersion")]
    pub cni_version: &'static str,
    pub interfaces: Vec<Interface<'a>>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns<'a>,
}

#[derive(Debug, Serialize)]
pub struct Interface<'a> {
    pub name: &'a str,
    pub mac: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    pub sandbox: &'a str,
}

#[derive(Debug, Serialize)]
pub struct IpConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<&'static str>,
    pub address: IpNet,
    pub gateway: IpAddr,
    pub interface: usize,
}

#[derive(Debug, Serialize)]
pub struct Route {
    pub dst: IpNet,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

/// Like the reference plugins: the object is always there, its empty members are not.
#[derive(Debug, Serialize)]
pub struct Dns<'a> {
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub nameservers: &'a [IpAddr],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<&'a str>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub search: &'a [String],
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub options: &'a [String],
}

impl<'a> CniResult<'a> {
    /// The result of an ADD of `ifname` in `netns`, written in `version`.
    pub fn from_add(
        version: Version,
        ifname: &'a str,
        netns: &'a str,
        r: &'a AddResponse,
    ) -> CniResult<'a> {
        let ip_version = (version < Version::V1_0_0).then_some(match r.address {
            IpNet::V4(_) => "4",
            IpNet::V6(_) => "6",
        });
        CniResult {
            cni_version: version.as_str(),
            interfaces: vec![Interface {
                name: ifname,
                mac: &r.mac,
                mtu: (version >= Version::V1_1_0 && r.mtu != 0).then_some(r.mtu),
                sandbox: netns,
            }],
            ips: vec![IpConfig {
                version: ip_version,
                address: r.address,
                gateway: r.gateway,
                interface: 0,
            }],
            routes: r
                .routes
                .iter()
                .map(|rt| Route {
                    dst: rt.dst,
                    gw: rt.gw,
                })
                .collect(),
            dns: Dns {
                nameservers: &r.dns.nameservers,
                domain: r.dns.domain.as_deref().filter(|d| !d.is_empty()),
                search: &r.dns.search,
                options: &r.dns.options,
            },
        }
    }
}

/// The parts of a prevResult CHECK looks at; the same in every version we support.
#[derive(Debug, Deserialize)]
struct PrevResult {
    #[serde(default)]
    interfaces: Vec<PrevInterface>,
    #[serde(default)]
    ips: Vec<PrevIp>,
}

#[derive(Debug, Deserialize)]
struct PrevInterface {
    name: String,
    #[serde(default)]
    mac: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PrevIp {
    address: IpNet,
    #[serde(default)]
    interface: Option<usize>,
}

/// What a prevResult says about our interface: CHECK's expectation of the live attachment.
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    pub ifname: String,
    pub mac: Option<String>,
    pub addresses: Vec<IpNet>,
}

impl Expected {
    /// Reads prevResult; it must list `ifname` (code 102 if not, 6 if it is not a result).
    pub fn from_prev_result(prev: &serde_json::Value, ifname: &str) -> Result<Expected, Error> {
        let mut prev = PrevResult::deserialize(prev).map_err(|e| Error::Decode {
            what: "prevResult",
            reason: e.to_string(),
        })?;
        let Some(idx) = prev.interfaces.iter().position(|i| i.name == ifname) else {
            return Err(Error::CheckFailed(format!(
                "prevResult does not list interface {ifname:?}"
            )));
        };
        Ok(Expected {
            ifname: ifname.to_string(),
            mac: prev.interfaces.swap_remove(idx).mac,
            addresses: prev
                .ips
                .iter()
                .filter(|ip| ip.interface == Some(idx))
                .map(|ip| ip.address)
                .collect(),
        })
    }

    /// Compares with the live attachment as vswitchd reports it (code 102 on a mismatch).
    pub fn verify(&self, live: &AddResponse) -> Result<(), Error> {
        let ifname = &self.ifname;
        if let Some(mac) = &self.mac {
            if !mac.eq_ignore_ascii_case(&live.mac) {
                return Err(Error::CheckFailed(format!(
                    "interface {ifname:?} has MAC {}, prevResult recorded {mac}",
                    live.mac
                )));
            }
        }
        if let Some(a) = self.addresses.iter().find(|a| **a != live.address) {
            return Err(Error::CheckFailed(format!(
                "interface {ifname:?} has address {}, prevResult recorded {a}",
                live.address
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conf::api::{Dns as ApiDns, Route as ApiRoute};
    use serde_json::json;

    fn response() -> AddResponse {
        AddResponse {
            ifname: "eth0".into(),
            mac: "02:00:0a:f4:01:05".into(),
            netns: "/run/netns/p".into(),
            address: "10.244.1.5/24".parse().unwrap(),
            gateway: "10.244.1.1".parse().unwrap(),
            mtu: 1450,
            routes: vec![
                ApiRoute {
                    dst: "0.0.0.0/0".parse().unwrap(),
                    gw: Some("10.244.1.1".parse().unwrap()),
                },
                ApiRoute {
                    dst: "10.244.1.0/24".parse().unwrap(),
                    gw: None,
                },
            ],
            dns: ApiDns {
                nameservers: vec!["10.96.0.10".parse().unwrap()],
                domain: None,
                search: vec!["default.svc.cluster.local".into()],
                options: vec![],
            },
        }
    }

    fn result(v: Version, r: &AddResponse) -> serde_json::Value {
        serde_json::to_value(CniResult::from_add(v, "eth0", "/run/netns/p", r)).unwrap()
    }

    #[test]
    fn versions_match_conf() {
        let ours: Vec<_> = Version::ALL.iter().map(|v| v.as_str()).collect();
        assert_eq!(ours, conf::netconf::SUPPORTED_VERSIONS);
        assert_eq!(Version::parse("0.2.0"), None);
        assert_eq!(Version::parse("1.0.0"), Some(Version::V1_0_0));
        assert!(Version::V0_3_1 < Version::V0_4_0);
    }

    #[test]
    fn result_1_1_0_has_interface_mtu_and_no_ip_version() {
        let r = response();
        assert_eq!(
            result(Version::V1_1_0, &r),
            json!({
                "cniVersion": "1.1.0",
                "interfaces": [{"name": "eth0", "mac": "02:00:0a:f4:01:05", "mtu": 1450,
                                "sandbox": "/run/netns/p"}],
                "ips": [{"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 0}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}, {"dst": "10.244.1.0/24"}],
                "dns": {"nameservers": ["10.96.0.10"], "search": ["default.svc.cluster.local"]}
            })
        );
    }

    #[test]
    fn result_1_0_0_has_neither_mtu_nor_ip_version() {
        let v = result(Version::V1_0_0, &response());
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(
            v["interfaces"],
            json!([{"name": "eth0", "mac": "02:00:0a:f4:01:05", "sandbox": "/run/netns/p"}])
        );
        assert_eq!(
            v["ips"],
            json!([{"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 0}])
        );
    }

    #[test]
    fn results_before_1_0_0_have_ip_version() {
        for ver in [Version::V0_3_0, Version::V0_3_1, Version::V0_4_0] {
            let v = result(ver, &response());
            assert_eq!(v["cniVersion"], ver.as_str());
            assert_eq!(
                v["ips"],
                json!([{"version": "4", "address": "10.244.1.5/24", "gateway": "10.244.1.1",
                        "interface": 0}])
            );
            assert!(v["interfaces"][0].get("mtu").is_none());
        }
        let mut r = response();
        r.address = "fd00:10:244:1::5/64".parse().unwrap();
        r.gateway = "fd00:10:244:1::1".parse().unwrap();
        assert_eq!(result(Version::V0_4_0, &r)["ips"][0]["version"], "6");
    }

    #[test]
    fn empty_dns_members_are_omitted() {
        let mut r = response();
        r.dns = ApiDns::default();
        assert_eq!(result(Version::V1_1_0, &r)["dns"], json!({}));
        r.dns.domain = Some("cluster.local".into());
        r.dns.options = vec!["ndots:5".into()];
        assert_eq!(
            result(Version::V1_1_0, &r)["dns"],
            json!({"domain": "cluster.local", "options": ["ndots:5"]})
        );
    }

    #[test]
    fn prev_result_must_list_the_interface() {
        let prev = json!({"cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "mac": "02:00:0a:f4:01:05", "sandbox": "/run/netns/p"}],
            "ips": [{"address": "10.244.1.5/24", "interface": 0}]});
        let x = Expected::from_prev_result(&prev, "eth0").unwrap();
        assert_eq!(x.mac.as_deref(), Some("02:00:0a:f4:01:05"));
        assert_eq!(x.addresses, vec!["10.244.1.5/24".parse::<IpNet>().unwrap()]);
        x.verify(&response()).unwrap();
        let e = Expected::from_prev_result(&prev, "net1").unwrap_err();
        assert_eq!(e.code(), 102);
        assert!(e.to_string().contains("net1"));
        let e = Expected::from_prev_result(&json!({"interfaces": "x"}), "eth0").unwrap_err();
        assert_eq!(e.code(), 6);
        assert!(e.to_string().contains("prevResult"));
    }

    #[test]
    fn prev_result_must_match_live_state() {
        let prev = json!({"interfaces": [{"name": "lo"}, {"name": "eth0", "mac": "02:00:0A:F4:01:05"}],
            "ips": [{"version": "4", "address": "10.244.1.5/24", "interface": 1},
                    {"version": "4", "address": "127.0.0.1/8", "interface": 0}]});
        let x = Expected::from_prev_result(&prev, "eth0").unwrap();
        x.verify(&response()).unwrap();
        let mut r = response();
        r.address = "10.244.1.6/24".parse().unwrap();
        let e = x.verify(&r).unwrap_err();
        assert_eq!(e.code(), 102);
        assert!(e.to_string().contains("10.244.1.6/24"), "{e}");
        let mut r = response();
        r.mac = "02:00:00:00:00:01".into();
        assert_eq!(x.verify(&r).unwrap_err().code(), 102);
    }
}
