//! The `vswitch` CNI plugin: CNI env + stdin in, one request to vswitchd, CNI JSON out.
//!
//! vswitchd does all the work (TAP devices, addresses, routes, rollback of a partial ADD), so the
//! plugin is a translator in the shape of the reference plugins' skel: read the command and the
//! CNI_* variables, decode and validate the netconf, make one blocking request on the daemon's
//! unix socket, and print the result or a CNI error object. stdout carries nothing but that JSON.
//!
//! Order of checks, so that the code a runtime sees names the first thing wrong: CNI_COMMAND (4),
//! stdin (5), the other variables (4), netconf syntax (6), cniVersion (1), netconf fields (7),
//! then the command's own checks. Errors are written in the netconf's cniVersion whenever stdin
//! carried a supported one, otherwise in the plugin's own (1.1.0).

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use conf::api::{
    code, AddRequest, AddResponse, ApiError, Attachment, CheckRequest, DelRequest, GcRequest,
    Status, PATH_CNI_ADD, PATH_CNI_CHECK, PATH_CNI_DEL, PATH_CNI_GC, PATH_STATUS,
};
use conf::client::{Client, ClientError};
use conf::netconf::{NetConf, NetConfError, CNI_VERSION, SUPPORTED_VERSIONS};
use serde::Serialize;

pub mod env;
pub mod error;
pub mod result;

pub use env::{CmdArgs, CniArgs, Command};
pub use error::Error;
pub use result::{CniResult, Expected, Version};

/// STATUS is polled by the runtime and must answer promptly; the other commands keep the
/// client's default, which leaves vswitchd time to create and configure a TAP.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);

/// The plugin's entry point: runs one CNI command on the process's env, stdin and stdout and
/// returns the exit code.
pub fn run() -> i32 {
    let getenv = |k: &str| std::env::var_os(k);
    run_with(
        &getenv,
        &mut std::io::stdin().lock(),
        &mut std::io::stdout().lock(),
    )
}

/// [`run`] with its inputs and output passed in, for tests.
pub fn run_with(
    getenv: &dyn Fn(&str) -> Option<OsString>,
    stdin: &mut dyn Read,
    stdout: &mut dyn Write,
) -> i32 {
    let mut err_version = CNI_VERSION;
    let (out, status) = match dispatch(getenv, stdin, &mut err_version) {
        Ok(out) => (out, 0),
        Err(e) => (Some(e.to_json(err_version)), 1),
    };
    if let Some(out) = out {
        if let Err(e) = writeln!(stdout, "{out}").and_then(|()| stdout.flush()) {
            eprintln!("vswitch: cannot write to stdout: {e}");
            return 1;
        }
    }
    status
}

/// Runs the command; `Ok(Some(json))` is printed, `Ok(None)` prints nothing.
fn dispatch(
    getenv: &dyn Fn(&str) -> Option<OsString>,
    stdin: &mut dyn Read,
    err_version: &mut &'static str,
) -> Result<Option<String>, Error> {
    let cmd = env::command(getenv).inspect_err(|_| {
        if getenv("CNI_COMMAND").is_none() {
            // Like the reference plugins: someone ran the binary by hand.
            eprintln!(
                "vswitch CNI plugin {}\nCNI protocol versions supported: {}",
                env!("CARGO_PKG_VERSION"),
                SUPPORTED_VERSIONS.join(", ")
            );
        }
    })?;
    if cmd == Command::Version {
        return Ok(Some(cmd_version()));
    }
    let mut raw = Vec::new();
    stdin.read_to_end(&mut raw).map_err(Error::Stdin)?;
    if let Some(v) = peek_version(&raw) {
        *err_version = v.as_str();
    }
    let args = CmdArgs::from_env(cmd, getenv)?;
    let (conf, version) = load_netconf(&raw)?;
    match cmd {
        Command::Add => cmd_add(&args, &conf, version).map(Some),
        Command::Del => cmd_del(&args, &conf).map(|()| None),
        Command::Check => cmd_check(&args, &conf, version).map(|()| None),
        Command::Status => cmd_status(&conf, version).map(|()| None),
        Command::Gc => cmd_gc(&conf, version).map(|()| None),
        Command::Version => Ok(Some(cmd_version())),
    }
}

/// The cniVersion of whatever is on stdin, if it is one we can write errors in.
fn peek_version(raw: &[u8]) -> Option<Version> {
    #[derive(serde::Deserialize)]
    struct Peek {
        #[serde(rename = "cniVersion")]
        cni_version: String,
    }
    let p: Peek = serde_json::from_slice(raw).ok()?;
    Version::parse(&p.cni_version)
}

/// Decodes (6), checks the version (1) and validates (7) the netconf.
pub fn load_netconf(raw: &[u8]) -> Result<(NetConf, Version), Error> {
    let conf: NetConf = serde_json::from_slice(raw).map_err(|e| {
        // Well-formed JSON with a field missing or of the wrong type is an invalid netconf
        // (7) naming the field; anything else is undecodable (6).
        if e.classify() != serde_json::error::Category::Data {
            return Error::Decode {
                what: "the network configuration",
                reason: e.to_string(),
            };
        }
        let msg = e.to_string();
        let named = msg.split('`').nth(1).unwrap_or_default();
        let field = [
            "cniVersion",
            "name",
            "type",
            "socket",
            "cni.dev/valid-attachments",
        ]
        .into_iter()
        .find(|f| *f == named)
        .unwrap_or("netconf");
        Error::NetConf(NetConfError { field, reason: msg })
    })?;
    let version = Version::parse(&conf.cni_version).ok_or_else(|| {
        Error::IncompatibleVersion(format!(
            "cniVersion {:?} is not supported (supported: {})",
            conf.cni_version,
            SUPPORTED_VERSIONS.join(", ")
        ))
    })?;
    conf.validate()?;
    Ok((conf, version))
}

/// Commands that came after a netconf's version refuse it, as the reference plugins do.
fn require_version(version: Version, min: Version, cmd: &str) -> Result<(), Error> {
    if version < min {
        return Err(Error::IncompatibleVersion(format!(
            "cniVersion {} does not allow {cmd} (it was added in {})",
            version.as_str(),
            min.as_str()
        )));
    }
    Ok(())
}

fn client(conf: &NetConf) -> Client {
    Client::new(conf.socket_path())
}

/// One request whose success body may be empty or anything: only the status matters, and a
/// failure still decodes as the daemon's [`ApiError`].
fn call<Q: Serialize>(client: &Client, path: &str, req: &Q) -> Result<Vec<u8>, ClientError> {
    let body = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
    let (status, body) = client.raw("POST", path, Some(&body))?;
    if (200..300).contains(&status) {
        return Ok(body);
    }
    match serde_json::from_slice::<ApiError>(&body) {
        Ok(e) => Err(ClientError::Api(e)),
        Err(_) => Err(ClientError::Protocol(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body)
                .chars()
                .take(200)
                .collect::<String>()
        ))),
    }
}

/// What of a requested address or MAC the daemon's answer does not have.
fn unhonoured(req: &AddRequest, resp: &AddResponse) -> Option<String> {
    if let Some(ip) = req.ip {
        if resp.address.addr() != std::net::IpAddr::V4(ip) {
            return Some(format!(
                "asked for {ip}, vswitchd gave {}",
                resp.address.addr()
            ));
        }
    }
    let norm = |m: &str| -> String {
        m.chars()
            .filter(char::is_ascii_hexdigit)
            .map(|c| c.to_ascii_lowercase())
            .collect()
    };
    if let Some(mac) = &req.mac {
        if norm(&resp.mac) != norm(mac) {
            return Some(format!("asked for MAC {mac}, vswitchd gave {}", resp.mac));
        }
    }
    None
}

/// ADD: vswitchd creates the pod's interface; the result is written in the netconf's version.
pub fn cmd_add(args: &CmdArgs, conf: &NetConf, version: Version) -> Result<String, Error> {
    let k8s = CniArgs::parse(&args.args)?;
    let req = AddRequest {
        container_id: args.container_id.clone(),
        netns: PathBuf::from(&args.netns),
        ifname: args.ifname.clone(),
        pod_namespace: k8s.pod_namespace,
        pod_name: k8s.pod_name,
        labels: conf.labels()?,
        ip: k8s.ip,
        mac: k8s.mac,
        port_mappings: conf.port_mappings()?,
    };
    let resp: AddResponse = client(conf)
        .post(PATH_CNI_ADD, &req)
        .map_err(|e| Error::from_client(e, Error::try_again))?;
    // A vswitchd older than this plugin ignores a requested address or MAC: undo its ADD
    // rather than hand the runtime something it did not ask for.
    if let Some(why) = unhonoured(&req, &resp) {
        let _ = cmd_del(args, conf);
        return Err(Error::Daemon(ApiError::new(
            code::REQUESTED_UNAVAILABLE,
            why,
            "vswitchd may be older than the plugin: upgrade it",
        )));
    }
    let result = CniResult::from_add(version, &args.ifname, &args.netns, &resp);
    serde_json::to_string(&result).map_err(|e| Error::Internal(e.to_string()))
}

/// DEL: idempotent. An empty CNI_NETNS is sent as none (the namespace may already be gone), and
/// an attachment vswitchd does not know is already deleted.
pub fn cmd_del(args: &CmdArgs, conf: &NetConf) -> Result<(), Error> {
    let req = DelRequest {
        container_id: args.container_id.clone(),
        ifname: args.ifname.clone(),
        netns: (!args.netns.is_empty()).then(|| PathBuf::from(&args.netns)),
    };
    match call(&client(conf), PATH_CNI_DEL, &req) {
        Ok(_) => Ok(()),
        Err(ClientError::Api(e)) if e.code == code::UNKNOWN_CONTAINER => Ok(()),
        Err(e) => Err(Error::from_client(e, Error::try_again)),
    }
}

/// CHECK (0.4.0 and later): prevResult, when the runtime sends one, must list our interface;
/// vswitchd checks the live attachment and answers an ApiError on a mismatch. If vswitchd also
/// describes the attachment (an [`AddResponse`] body), it is compared with prevResult.
pub fn cmd_check(args: &CmdArgs, conf: &NetConf, version: Version) -> Result<(), Error> {
    require_version(version, Version::V0_4_0, "CHECK")?;
    let expected = match conf.other.get("prevResult").filter(|v| !v.is_null()) {
        Some(prev) => Some(Expected::from_prev_result(prev, &args.ifname)?),
        None => None,
    };
    let req = CheckRequest {
        container_id: args.container_id.clone(),
        ifname: args.ifname.clone(),
        netns: PathBuf::from(&args.netns),
    };
    let body = call(&client(conf), PATH_CNI_CHECK, &req)
        .map_err(|e| Error::from_client(e, Error::try_again))?;
    if let (Some(expected), Ok(live)) = (expected, serde_json::from_slice::<AddResponse>(&body)) {
        expected.verify(&live)?;
    }
    Ok(())
}

/// STATUS (1.1.0): succeeds silently when vswitchd is up and ready; anything else means the
/// plugin cannot serve an ADD now (code 50), unless vswitchd itself answered with a code.
pub fn cmd_status(conf: &NetConf, version: Version) -> Result<(), Error> {
    require_version(version, Version::V1_1_0, "STATUS")?;
    let status: Status = client(conf)
        .with_timeout(STATUS_TIMEOUT)
        .get(PATH_STATUS)
        .map_err(|e| match e {
            ClientError::Protocol(m) => Error::not_available("vswitchd is not available".into(), m),
            e => Error::from_client(e, Error::not_available),
        })?;
    if !status.ready {
        return Err(Error::not_available(
            "vswitchd is not ready".into(),
            format!(
                "vswitchd {} on node {} reports ready=false",
                status.version, status.node
            ),
        ));
    }
    Ok(())
}

/// GC (1.1.0): vswitchd releases every attachment of this network not in
/// `cni.dev/valid-attachments`, which the runtime must send.
pub fn cmd_gc(conf: &NetConf, version: Version) -> Result<(), Error> {
    require_version(version, Version::V1_1_0, "GC")?;
    let valid = conf.valid_attachments.as_ref().ok_or(NetConfError {
        field: "cni.dev/valid-attachments",
        reason: "is required for GC".into(),
    })?;
    let req = GcRequest {
        valid: valid
            .iter()
            .map(|a| Attachment {
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
            })
            .collect(),
    };
    call(&client(conf), PATH_CNI_GC, &req).map_err(|e| Error::from_client(e, Error::try_again))?;
    Ok(())
}

/// VERSION: the versions this plugin reads and writes.
pub fn cmd_version() -> String {
    serde_json::json!({
        "cniVersion": CNI_VERSION,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::collections::HashMap;

    /// Runs the plugin in-process; returns the exit code and stdout as JSON (Null if empty).
    fn run_plugin(vars: &[(&str, &str)], stdin: &str) -> (i32, Value) {
        let m: HashMap<String, OsString> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        let getenv = move |k: &str| m.get(k).cloned();
        let mut out = Vec::new();
        let code = run_with(&getenv, &mut stdin.as_bytes(), &mut out);
        let v = if out.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&out).unwrap()
        };
        (code, v)
    }

    /// A socket path nobody listens on.
    const NOWHERE: &str = "/nonexistent/vswitch-test/vswitchd.sock";

    fn netconf(version: &str) -> String {
        json!({"cniVersion": version, "name": "pods", "type": "vswitch", "socket": NOWHERE})
            .to_string()
    }

    fn add_env() -> Vec<(&'static str, &'static str)> {
        vec![
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/run/netns/p"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web",
            ),
        ]
    }

    fn with(var: &'static str, val: &'static str) -> Vec<(&'static str, &'static str)> {
        let mut v: Vec<_> = add_env().into_iter().filter(|(k, _)| *k != var).collect();
        v.push((var, val));
        v
    }

    fn assert_error(out: &(i32, Value), code: u64, msg_contains: &str) {
        let (status, v) = out;
        assert_eq!(*status, 1, "{v}");
        assert_eq!(v["code"], code, "{v}");
        let msg = v["msg"].as_str().unwrap();
        assert!(msg.contains(msg_contains), "{msg:?} lacks {msg_contains:?}");
    }

    #[test]
    fn version_needs_no_stdin() {
        let (code, v) = run_plugin(&[("CNI_COMMAND", "VERSION")], "not json");
        assert_eq!(code, 0);
        assert_eq!(
            v,
            json!({"cniVersion": "1.1.0",
                   "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
        );
    }

    #[test]
    fn bad_command_is_code_4() {
        let out = run_plugin(&[], &netconf("1.0.0"));
        assert_error(&out, 4, "CNI_COMMAND");
        let out = run_plugin(&with("CNI_COMMAND", "ATTACH"), &netconf("1.0.0"));
        assert_error(&out, 4, "CNI_COMMAND");
    }

    #[test]
    fn bad_env_is_code_4_in_the_netconfs_version() {
        let out = run_plugin(&with("CNI_IFNAME", "a/b"), &netconf("0.4.0"));
        assert_error(&out, 4, "CNI_IFNAME");
        assert_eq!(out.1["cniVersion"], "0.4.0");
        let out = run_plugin(&with("CNI_NETNS", ""), &netconf("1.0.0"));
        assert_error(&out, 4, "CNI_NETNS");
        let out = run_plugin(&with("CNI_ARGS", "garbage"), &netconf("1.0.0"));
        assert_error(&out, 4, "CNI_ARGS");
    }

    #[test]
    fn bad_json_is_code_6() {
        let out = run_plugin(&add_env(), "{not json");
        assert_error(&out, 6, "network configuration");
        assert_eq!(out.1["cniVersion"], "1.1.0");
        let out = run_plugin(&add_env(), "");
        assert_error(&out, 6, "network configuration");
        // Well-formed JSON missing a field is an invalid netconf naming it (code 7); the
        // version it does carry is used.
        let out = run_plugin(&add_env(), r#"{"cniVersion":"0.3.1","name":"pods"}"#);
        assert_error(&out, 7, "type: missing field");
        assert_eq!(out.1["cniVersion"], "0.3.1");
    }

    #[test]
    fn unsupported_version_is_code_1() {
        for v in ["0.2.0", "2.0.0", ""] {
            let out = run_plugin(&add_env(), &netconf(v));
            assert_error(&out, 1, "cniVersion");
            assert_eq!(out.1["cniVersion"], "1.1.0");
        }
    }

    #[test]
    fn invalid_netconf_is_code_7_naming_the_field() {
        let nc = json!({"cniVersion": "1.0.0", "name": "pods", "type": "bridge"}).to_string();
        assert_error(&run_plugin(&add_env(), &nc), 7, "type");
        let nc = json!({"cniVersion": "1.0.0", "name": "", "type": "vswitch"}).to_string();
        assert_error(&run_plugin(&add_env(), &nc), 7, "name");
        let nc = json!({"cniVersion": "1.0.0", "name": "p", "type": "vswitch", "socket": "x.sock"})
            .to_string();
        assert_error(&run_plugin(&add_env(), &nc), 7, "socket");
    }

    #[test]
    fn command_version_gates_are_code_1() {
        let out = run_plugin(&with("CNI_COMMAND", "CHECK"), &netconf("0.3.1"));
        assert_error(&out, 1, "CHECK");
        assert_eq!(out.1["cniVersion"], "0.3.1");
        assert_error(
            &run_plugin(&with("CNI_COMMAND", "STATUS"), &netconf("1.0.0")),
            1,
            "STATUS",
        );
        assert_error(
            &run_plugin(&with("CNI_COMMAND", "GC"), &netconf("1.0.0")),
            1,
            "GC",
        );
    }

    #[test]
    fn gc_requires_valid_attachments() {
        let out = run_plugin(&[("CNI_COMMAND", "GC")], &netconf("1.1.0"));
        assert_error(&out, 7, "cni.dev/valid-attachments");
    }

    #[test]
    fn check_reads_prev_result_before_asking_the_daemon() {
        let nc = json!({"cniVersion": "1.0.0", "name": "pods", "type": "vswitch",
            "socket": NOWHERE, "prevResult": {"interfaces": [{"name": "net1"}]}})
        .to_string();
        assert_error(&run_plugin(&with("CNI_COMMAND", "CHECK"), &nc), 102, "eth0");
    }

    #[test]
    fn unreachable_daemon_is_try_again_later_except_for_status() {
        for cmd in ["ADD", "DEL", "CHECK"] {
            let out = run_plugin(&with("CNI_COMMAND", cmd), &netconf("1.0.0"));
            assert_error(&out, 11, NOWHERE);
            assert!(out.1["details"]
                .as_str()
                .unwrap()
                .contains("vswitchd running"));
        }
        let nc = json!({"cniVersion": "1.1.0", "name": "pods", "type": "vswitch",
            "socket": NOWHERE, "cni.dev/valid-attachments": []})
        .to_string();
        assert_error(&run_plugin(&[("CNI_COMMAND", "GC")], &nc), 11, NOWHERE);
        assert_error(&run_plugin(&[("CNI_COMMAND", "STATUS")], &nc), 50, NOWHERE);
    }

    #[test]
    fn daemon_errors_keep_their_code_and_details() {
        let e = Error::Daemon(ApiError::new(
            101,
            "no addresses left",
            "10.244.1.0/24 is full",
        ));
        let v: Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(
            v,
            json!({"cniVersion": "1.0.0", "code": 101, "msg": "no addresses left",
                   "details": "10.244.1.0/24 is full"})
        );
        // Empty details are left out.
        let v: Value =
            serde_json::from_str(&Error::env("CNI_IFNAME", "not set").to_json("1.1.0")).unwrap();
        assert_eq!(
            v,
            json!({"cniVersion": "1.1.0", "code": 4, "msg": "CNI_IFNAME: not set"})
        );
    }
}
