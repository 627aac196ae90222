//! Calling the CNI plugin the way a container runtime does.
//!
//! The plugin gets the CNI_* environment, the netconf on stdin and runs in the node's network
//! namespace (where a runtime on that node would run it). DEL and CHECK get the ADD result as
//! `prevResult`, as libcni's cache provides it. The result and error documents are read as the
//! CNI spec writes them, not through the plugin's own types, so the lab checks the plugin's
//! output rather than trusting it.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ipnet::IpNet;
use serde_json::Value;

use crate::process;

/// One plugin invocation.
pub(crate) struct Call<'a> {
    pub plugin: &'a Path,
    /// The node's namespace, if it still exists: the plugin runs there.
    pub node_netns: Option<&'a str>,
    pub command: &'static str,
    pub container_id: &'a str,
    /// CNI_NETNS; empty when the pod's namespace is gone (allowed for DEL).
    pub netns: Option<PathBuf>,
    pub ifname: &'a str,
    pub args: String,
    pub netconf: Vec<u8>,
    pub timeout: Duration,
}

/// CNI_ARGS for a pod of namespace `default`, as kubelet's runtimes set them.
pub(crate) fn k8s_args(pod: &str) -> String {
    k8s_args_in("default", pod)
}

/// CNI_ARGS for a pod of namespace `ns`.
pub(crate) fn k8s_args_in(ns: &str, pod: &str) -> String {
    format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod}")
}

/// The netconf document with `edit` applied to its top-level object.
fn edit_netconf(
    netconf: &[u8],
    edit: impl FnOnce(&mut serde_json::Map<String, Value>) -> Result<(), String>,
) -> Result<Vec<u8>, String> {
    let mut doc: Value =
        serde_json::from_slice(netconf).map_err(|e| format!("netconf is not JSON: {e}"))?;
    let obj = doc
        .as_object_mut()
        .ok_or_else(|| "netconf is not a JSON object".to_string())?;
    edit(obj)?;
    serde_json::to_vec(&doc).map_err(|e| e.to_string())
}

/// A netconf with the pod's labels as `args.cni.labels` (CNI conventions); unchanged when
/// there are none.
pub(crate) fn with_labels(
    netconf: &[u8],
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<u8>, String> {
    if labels.is_empty() {
        return Ok(netconf.to_vec());
    }
    let list: Vec<Value> = labels
        .iter()
        .map(|(k, v)| serde_json::json!({"key": k, "value": v}))
        .collect();
    edit_netconf(netconf, |obj| {
        obj.insert("args".into(), serde_json::json!({"cni": {"labels": list}}));
        Ok(())
    })
}

/// A netconf with the pod's hostPorts as `runtimeConfig.portMappings`, as runtimes pass them
/// to a plugin that declares the `portMappings` capability (and to no other); unchanged when
/// there are none.
pub(crate) fn with_port_mappings(
    netconf: &[u8],
    maps: &[conf::api::PortMapping],
) -> Result<Vec<u8>, String> {
    if maps.is_empty() {
        return Ok(netconf.to_vec());
    }
    let list: Vec<Value> = maps
        .iter()
        .map(|m| {
            serde_json::json!({
                "hostPort": m.host_port,
                "containerPort": m.container_port,
                "protocol": m.protocol,
                "hostIP": m.host_ip.map(|a| a.to_string()).unwrap_or_default(),
            })
        })
        .collect();
    edit_netconf(netconf, |obj| {
        let capable = obj
            .get("capabilities")
            .and_then(|c| c.get("portMappings"))
            .is_some_and(|v| v == &Value::Bool(true));
        if !capable {
            return Err("the network's plugin does not declare the portMappings capability".into());
        }
        obj.insert(
            "runtimeConfig".into(),
            serde_json::json!({"portMappings": list}),
        );
        Ok(())
    })
}

/// A hostPort as podman's and docker's `-p` write it: `[HOST_IP:]HOST_PORT:CONTAINER_PORT`,
/// then `/tcp` (the default) or `/udp`.
pub fn parse_publish(s: &str) -> Result<conf::api::PortMapping, crate::LabError> {
    let bad = || crate::LabError::BadPublish(s.to_string());
    let (ports, protocol) = match s.rsplit_once('/') {
        Some((p, proto)) if proto == "tcp" || proto == "udp" => (p, proto),
        Some(_) => return Err(bad()),
        None => (s, "tcp"),
    };
    let parts: Vec<&str> = ports.split(':').collect();
    let (host_ip, host, container) = match parts[..] {
        [h, c] => (None, h, c),
        [ip, h, c] => (Some(ip.parse().map_err(|_| bad())?), h, c),
        _ => return Err(bad()),
    };
    let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad);
    Ok(conf::api::PortMapping {
        host_port: port(host)?,
        container_port: port(container)?,
        protocol: protocol.into(),
        host_ip,
    })
}

/// Adds `prevResult` to a netconf document.
pub(crate) fn with_prev_result(netconf: &[u8], prev: &Value) -> Result<Vec<u8>, String> {
    edit_netconf(netconf, |obj| {
        if !prev.is_null() {
            obj.insert("prevResult".into(), prev.clone());
        }
        Ok(())
    })
}

/// Runs the plugin. Ok is its stdout parsed as JSON (Null when empty, as DEL may answer);
/// Err is a message built from the CNI error document, the exit status and stderr.
pub(crate) fn invoke(call: Call<'_>) -> Result<Value, String> {
    let mut cmd = match call.node_netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(call.plugin);
            c
        }
        None => Command::new(call.plugin),
    };
    let cni_path = call.plugin.parent().unwrap_or(Path::new("/"));
    cmd.env("CNI_COMMAND", call.command)
        .env("CNI_CONTAINERID", call.container_id)
        .env("CNI_NETNS", call.netns.as_deref().unwrap_or(Path::new("")))
        .env("CNI_IFNAME", call.ifname)
        .env("CNI_ARGS", &call.args)
        .env("CNI_PATH", cni_path);
    let out = process::run_bounded(&mut cmd, Some(&call.netconf), call.timeout, None)
        .map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr = stderr.trim();
    let doc: Option<Value> = if stdout.trim().is_empty() {
        Some(Value::Null)
    } else {
        serde_json::from_str(&stdout).ok()
    };
    if out.status.success() {
        return doc.ok_or_else(|| {
            format!(
                "the plugin succeeded but printed no JSON: {:?}{}",
                stdout.trim(),
                with_stderr(stderr)
            )
        });
    }
    let msg = match doc.as_ref().filter(|d| d.get("code").is_some()) {
        Some(d) => {
            let code = d.get("code").and_then(Value::as_u64).unwrap_or(0);
            let msg = d.get("msg").and_then(Value::as_str).unwrap_or("(no msg)");
            let details = d.get("details").and_then(Value::as_str).unwrap_or("");
            let details = if details.is_empty() {
                String::new()
            } else {
                format!(": {details}")
            };
            format!("error code {code}: {msg}{details}")
        }
        None => format!(
            "the plugin exited with {} and no CNI error document (stdout: {:?})",
            out.status,
            stdout.trim()
        ),
    };
    Err(format!("{msg}{}", with_stderr(stderr)))
}

fn with_stderr(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(" [stderr: {stderr}]")
    }
}

/// What the lab keeps from an ADD result.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Added {
    pub address: IpNet,
    pub mac: String,
}

/// Reads `ips[0].address` and the MAC of the interface it is on (the sandbox interface named
/// `ifname`, else `interfaces[0]`).
pub(crate) fn parse_add_result(result: &Value, ifname: &str) -> Result<Added, String> {
    let ip = result
        .get("ips")
        .and_then(|ips| ips.get(0))
        .ok_or_else(|| format!("the result has no ips[0]: {result}"))?;
    let address: IpNet = ip
        .get("address")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("ips[0] has no address: {result}"))?
        .parse()
        .map_err(|e| format!("ips[0].address is not an address/prefix: {e}"))?;
    let ifaces = result
        .get("interfaces")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let by_index = ip
        .get("interface")
        .and_then(Value::as_u64)
        .and_then(|i| ifaces.get(i as usize));
    let by_name = ifaces.iter().find(|i| {
        i.get("name").and_then(Value::as_str) == Some(ifname)
            && i.get("sandbox")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty())
    });
    let iface = by_index
        .or(by_name)
        .or(ifaces.first())
        .ok_or_else(|| format!("the result has no interfaces: {result}"))?;
    let mac = iface
        .get("mac")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("the pod's interface has no mac: {iface}"))?;
    Ok(Added {
        address,
        mac: mac.to_string(),
    })
}

/// The address part of an `Added`.
impl Added {
    pub fn ip(&self) -> IpAddr {
        self.address.addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn host_ports_as_podman_writes_them_and_as_runtimes_pass_them() {
        let m = parse_publish("8080:80").unwrap();
        assert_eq!(m.to_string(), "8080->80/tcp");
        let m = parse_publish("192.168.100.1:5353:53/udp").unwrap();
        assert_eq!(m.to_string(), "192.168.100.1:5353->53/udp");
        for bad in ["80", "0:80", "80:80/sctp", "x:80:80", "1:2:3:4", "80:70000"] {
            assert!(parse_publish(bad).is_err(), "{bad}");
        }
        let plain = br#"{"cniVersion":"1.1.0","name":"l","type":"vswitch"}"#;
        assert_eq!(with_port_mappings(plain, &[]).unwrap(), plain.to_vec());
        let e = with_port_mappings(plain, &[parse_publish("8080:80").unwrap()]).unwrap_err();
        assert!(e.contains("capability"), "{e}");
        let capable =
            br#"{"cniVersion":"1.1.0","name":"l","type":"vswitch","capabilities":{"portMappings":true}}"#;
        let out = with_port_mappings(capable, &[parse_publish("8080:80").unwrap()]).unwrap();
        let doc: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            doc["runtimeConfig"]["portMappings"],
            json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""}])
        );
    }

    #[test]
    fn reads_a_cni_result() {
        let r = json!({
            "cniVersion": "1.1.0",
            "interfaces": [
                {"name": "tap0", "mac": "aa:aa:aa:aa:aa:aa"},
                {"name": "eth0", "mac": "02:00:00:00:01:02", "sandbox": "/var/run/netns/x"}
            ],
            "ips": [{"address": "10.244.1.2/24", "gateway": "10.244.1.1", "interface": 1}]
        });
        let a = parse_add_result(&r, "eth0").unwrap();
        assert_eq!(a.address.to_string(), "10.244.1.2/24");
        assert_eq!(a.ip().to_string(), "10.244.1.2");
        assert_eq!(a.mac, "02:00:00:00:01:02");

        // Without an interface index, the sandbox interface named ifname.
        let mut r2 = r.clone();
        r2["ips"][0].as_object_mut().unwrap().remove("interface");
        assert_eq!(
            parse_add_result(&r2, "eth0").unwrap().mac,
            "02:00:00:00:01:02"
        );

        for bad in [
            json!({}),
            json!({"ips": []}),
            json!({"ips": [{"address": "x"}]}),
            json!({"ips": [{"address": "10.0.0.1/8"}], "interfaces": []}),
        ] {
            assert!(parse_add_result(&bad, "eth0").is_err(), "{bad}");
        }
    }

    #[test]
    fn prev_result_is_added_for_del() {
        let nc = br#"{"cniVersion":"1.1.0","name":"vsl","type":"vswitch"}"#;
        let prev = json!({"ips": []});
        let out: Value = serde_json::from_slice(&with_prev_result(nc, &prev).unwrap()).unwrap();
        assert_eq!(out["prevResult"], prev);
        assert_eq!(out["name"], "vsl");
        let out: Value =
            serde_json::from_slice(&with_prev_result(nc, &Value::Null).unwrap()).unwrap();
        assert!(out.get("prevResult").is_none());
        assert!(with_prev_result(b"[1]", &prev).is_err());
    }

    #[test]
    fn plugin_errors_are_readable() {
        let dir = std::env::temp_dir().join(format!("vswitch-lab-cni-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plugin = dir.join("plugin");
        std::fs::write(
            &plugin,
            "#!/bin/sh\ncat >/dev/null\necho oops >&2\n\
             echo '{\"cniVersion\":\"1.1.0\",\"code\":7,\"msg\":\"bad netconf\",\"details\":\"name\"}'\n\
             exit 1\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = invoke(Call {
            plugin: &plugin,
            node_netns: None,
            command: "ADD",
            container_id: "c",
            netns: None,
            ifname: "eth0",
            args: k8s_args("p1"),
            netconf: b"{}".to_vec(),
            timeout: Duration::from_secs(10),
        })
        .unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(e, "error code 7: bad netconf: name [stderr: oops]");
    }
}
