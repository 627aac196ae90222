//! The real `vswitch` binary against a fake vswitchd: a unix socket in a thread that reads one
//! HTTP request and answers canned JSON, the way the real daemon would.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A per-test directory for the socket, removed when the test ends (even by panic).
struct TestDir(PathBuf);

impl TestDir {
    fn new(test: &str) -> TestDir {
        let dir = std::env::temp_dir().join(format!("vswitch-cni-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TestDir(dir)
    }

    fn socket(&self) -> PathBuf {
        self.0.join("vswitchd.sock")
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Debug)]
struct Request {
    method: String,
    path: String,
    body: Value,
}

/// Serves one request on `dir`'s socket with `status` and `body`; the handle yields the request
/// (None if nobody connected within 10 s).
fn fake_daemon(dir: &TestDir, status: u16, body: Value) -> JoinHandle<Option<Request>> {
    let listener = UnixListener::bind(dir.socket()).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap().to_string();
        let path = parts.next().unwrap().to_string();
        let mut length = 0;
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap();
                }
            }
        }
        let mut req_body = vec![0; length];
        reader.read_exact(&mut req_body).unwrap();
        let body = body.to_string();
        let resp = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        reader.get_mut().write_all(resp.as_bytes()).unwrap();
        Some(Request {
            method,
            path,
            body: if req_body.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&req_body).unwrap()
            },
        })
    })
}

/// Runs the plugin binary with exactly `vars` in its environment; returns the exit code and
/// stdout as JSON (Null when empty).
fn plugin(vars: &[(&str, &str)], stdin: &str) -> (i32, Value) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vswitch"))
        .env_clear()
        .envs(vars.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The plugin may exit without reading stdin (VERSION); a broken pipe is fine then.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    let out = child.wait_with_output().unwrap();
    let stdout = if out.stdout.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    };
    (out.status.code().unwrap(), stdout)
}

fn netconf(dir: &TestDir, version: &str) -> Value {
    json!({"cniVersion": version, "name": "pods", "type": "vswitch", "socket": dir.socket()})
}

fn env(cmd: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", "0123abcd"),
        ("CNI_NETNS", "/var/run/netns/cni-1234"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;IgnoreUnknown=1",
        ),
    ]
}

fn add_response() -> Value {
    json!({
        "ifname": "eth0", "mac": "02:00:0a:f4:01:05", "netns": "/var/run/netns/cni-1234",
        "address": "10.244.1.5/24", "gateway": "10.244.1.1", "mtu": 1450,
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
        "dns": {"nameservers": ["10.96.0.10"], "domain": null,
                "search": ["default.svc.cluster.local", "svc.cluster.local"], "options": []}
    })
}

#[test]
fn add_prints_the_result_in_the_netconfs_version() {
    let dir = TestDir::new("add");
    let daemon = fake_daemon(&dir, 200, add_response());
    let (code, out) = plugin(&env("ADD"), &netconf(&dir, "1.1.0").to_string());
    let req = daemon.join().unwrap().expect("the plugin never connected");
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        (req.method.as_str(), req.path.as_str()),
        ("POST", "/v1/cni/add")
    );
    assert_eq!(
        req.body,
        json!({"container_id": "0123abcd", "netns": "/var/run/netns/cni-1234", "ifname": "eth0",
               "pod_namespace": "default", "pod_name": "web-0"})
    );
    assert_eq!(
        out,
        json!({
            "cniVersion": "1.1.0",
            "interfaces": [{"name": "eth0", "mac": "02:00:0a:f4:01:05", "mtu": 1450,
                            "sandbox": "/var/run/netns/cni-1234"}],
            "ips": [{"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}],
            "dns": {"nameservers": ["10.96.0.10"],
                    "search": ["default.svc.cluster.local", "svc.cluster.local"]}
        })
    );
}

/// An older vswitchd ignores a requested address: the plugin does not pass its answer off as
/// what was asked for.
#[test]
fn add_fails_when_the_daemon_did_not_give_the_requested_address() {
    let dir = TestDir::new("addip");
    let daemon = fake_daemon(&dir, 200, add_response());
    let mut e = env("ADD");
    for (k, v) in e.iter_mut() {
        if *k == "CNI_ARGS" {
            *v = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;IgnoreUnknown=1;IP=10.244.1.9";
        }
    }
    let (code, out) = plugin(&e, &netconf(&dir, "1.0.0").to_string());
    let req = daemon.join().unwrap().expect("the plugin never connected");
    assert_eq!(req.body["ip"], "10.244.1.9");
    assert_ne!(code, 0, "{out}");
    assert_eq!(out["code"], 104, "{out}");
    assert_eq!(
        out["msg"], "asked for 10.244.1.9, vswitchd gave 10.244.1.5",
        "{out}"
    );
}

#[test]
fn add_in_0_4_0_has_ip_versions_and_no_mtu() {
    let dir = TestDir::new("add040");
    let daemon = fake_daemon(&dir, 200, add_response());
    let (code, out) = plugin(&env("ADD"), &netconf(&dir, "0.4.0").to_string());
    daemon.join().unwrap().expect("the plugin never connected");
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["cniVersion"], "0.4.0");
    assert_eq!(
        out["ips"],
        json!([{"version": "4", "address": "10.244.1.5/24", "gateway": "10.244.1.1",
                "interface": 0}])
    );
    assert!(out["interfaces"][0].get("mtu").is_none(), "{out}");
}

#[test]
fn add_passes_a_daemon_error_through() {
    let dir = TestDir::new("adderr");
    let daemon = fake_daemon(
        &dir,
        503,
        json!({"code": 101, "msg": "pod CIDR exhausted", "details": "10.244.1.0/24"}),
    );
    let (code, out) = plugin(&env("ADD"), &netconf(&dir, "1.0.0").to_string());
    daemon.join().unwrap();
    assert_eq!(code, 1);
    assert_eq!(
        out,
        json!({"cniVersion": "1.0.0", "code": 101, "msg": "pod CIDR exhausted",
               "details": "10.244.1.0/24"})
    );
}

#[test]
fn del_is_idempotent_and_tolerates_a_missing_netns() {
    let dir = TestDir::new("del");
    // An empty CNI_NETNS (the runtime already removed the namespace) is sent as none.
    let mut vars = env("DEL");
    vars.retain(|(k, _)| *k != "CNI_NETNS");
    vars.push(("CNI_NETNS", ""));
    let daemon = fake_daemon(&dir, 200, json!({}));
    let (code, out) = plugin(&vars, &netconf(&dir, "1.0.0").to_string());
    let req = daemon.join().unwrap().expect("the plugin never connected");
    assert_eq!((code, out), (0, Value::Null));
    assert_eq!(req.path, "/v1/cni/del");
    assert_eq!(
        req.body,
        json!({"container_id": "0123abcd", "ifname": "eth0", "netns": null})
    );

    // A second DEL of the same attachment: still success, even if the daemon says it is unknown.
    std::fs::remove_file(dir.socket()).unwrap();
    let daemon = fake_daemon(&dir, 404, json!({"code": 3, "msg": "unknown container"}));
    let (code, out) = plugin(&env("DEL"), &netconf(&dir, "0.3.1").to_string());
    let req = daemon.join().unwrap().expect("the plugin never connected");
    assert_eq!((code, out), (0, Value::Null));
    assert_eq!(req.body["netns"], "/var/run/netns/cni-1234");
}

#[test]
fn del_with_the_daemon_down_is_try_again_later() {
    let dir = TestDir::new("deldown");
    let (code, out) = plugin(&env("DEL"), &netconf(&dir, "1.0.0").to_string());
    assert_eq!(code, 1);
    assert_eq!(out["code"], 11, "{out}");
    let msg = out["msg"].as_str().unwrap();
    assert!(msg.contains(dir.socket().to_str().unwrap()), "{msg}");
}

#[test]
fn status() {
    let dir = TestDir::new("status");
    let vars = [("CNI_COMMAND", "STATUS")];
    let nc = netconf(&dir, "1.1.0").to_string();

    let (code, out) = plugin(&vars, &nc);
    assert_eq!((code, &out["code"]), (1, &json!(50)), "daemon down: {out}");

    let status = |ready| {
        json!({"node": "n1", "version": "0.1.0", "pod_cidr": "10.244.1.0/24",
               "gateway": "10.244.1.1", "gateway_mac": "02:00:00:00:00:01", "ports": 3,
               "ready": ready})
    };
    let daemon = fake_daemon(&dir, 200, status(true));
    let (code, out) = plugin(&vars, &nc);
    let req = daemon.join().unwrap().expect("the plugin never connected");
    assert_eq!(
        (req.method.as_str(), req.path.as_str()),
        ("GET", "/v1/status")
    );
    assert_eq!((code, out), (0, Value::Null));

    std::fs::remove_file(dir.socket()).unwrap();
    let daemon = fake_daemon(&dir, 200, status(false));
    let (code, out) = plugin(&vars, &nc);
    daemon.join().unwrap();
    assert_eq!((code, &out["code"]), (1, &json!(50)), "not ready: {out}");
    assert_eq!(out["cniVersion"], "1.1.0");
}

#[test]
fn gc_sends_the_valid_attachments() {
    let dir = TestDir::new("gc");
    let mut nc = netconf(&dir, "1.1.0");
    nc["cni.dev/valid-attachments"] = json!([
        {"containerID": "c1", "ifname": "eth0"},
        {"containerID": "c2", "ifname": "net1"}
    ]);
    let daemon = fake_daemon(&dir, 200, json!({"released": []}));
    let (code, out) = plugin(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
        &nc.to_string(),
    );
    let req = daemon.join().unwrap().expect("the plugin never connected");
    assert_eq!((code, out), (0, Value::Null));
    assert_eq!(
        (req.method.as_str(), req.path.as_str()),
        ("POST", "/v1/cni/gc")
    );
    assert_eq!(
        req.body,
        json!({"valid": [{"container_id": "c1", "ifname": "eth0"},
                         {"container_id": "c2", "ifname": "net1"}]})
    );
}

#[test]
fn check_passes_the_daemons_verdict_through() {
    let dir = TestDir::new("check");
    let mut nc = netconf(&dir, "1.0.0");
    nc["prevResult"] = json!({"cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "02:00:0a:f4:01:05", "sandbox": "/var/run/netns/cni-1234"}],
        "ips": [{"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 0}]});
    let nc = nc.to_string();

    let daemon = fake_daemon(
        &dir,
        409,
        json!({"code": 102, "msg": "eth0 has no address", "details": "expected 10.244.1.5"}),
    );
    let (code, out) = plugin(&env("CHECK"), &nc);
    let req = daemon.join().unwrap().expect("the plugin never connected");
    assert_eq!(req.path, "/v1/cni/check");
    assert_eq!(
        req.body,
        json!({"container_id": "0123abcd", "ifname": "eth0", "netns": "/var/run/netns/cni-1234"})
    );
    assert_eq!(code, 1);
    assert_eq!(
        out,
        json!({"cniVersion": "1.0.0", "code": 102, "msg": "eth0 has no address",
               "details": "expected 10.244.1.5"})
    );

    std::fs::remove_file(dir.socket()).unwrap();
    let daemon = fake_daemon(&dir, 200, json!({}));
    let (code, out) = plugin(&env("CHECK"), &nc);
    daemon.join().unwrap();
    assert_eq!((code, out), (0, Value::Null));
}

#[test]
fn version() {
    let (code, out) = plugin(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.0.0"}"#);
    assert_eq!(code, 0);
    assert_eq!(
        out,
        json!({"cniVersion": "1.1.0",
               "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );
}
