//! The stand-in's answers compared with what a real API server (v1.35) answered, recorded in
//! vswitch/tests/fixtures/k8s/ (`kubectl get --raw`, see its README): list envelopes, items,
//! watch events, BOOKMARKs and the 410 Gone a compaction causes. The recorded objects are
//! loaded, read back over plain HTTP and compared field by field; the server-side defaults
//! the stand-in fills in must leave a real server's objects unchanged.
//!
//! The 404 and 409 Status objects are not in the recordings; they are checked against the
//! shape the API conventions document (kind Status, reason, code, details.name/kind).

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use vswitch_apiserver::{ApiServer, Options};

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/../../vswitch/tests/fixtures/k8s/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn fixture_json(name: &str) -> Value {
    serde_json::from_str(&fixture(name)).expect("fixture is JSON")
}

/// One HTTP/1.1 request, read to the end (a watch must carry `timeoutSeconds`).
async fn request(addr: &str, method: &str, path: &str, ctype: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: \
         {ctype}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("response within 10 s")
        .expect("read");
    let text = String::from_utf8(raw).expect("UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
    let code: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (code, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

async fn get(addr: &str, path: &str) -> (u16, Value) {
    let (code, body) = request(addr, "GET", path, "application/json", "").await;
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

/// An object without the fields a server assigns itself (and managedFields, which the
/// stand-in does not keep: see the README).
fn content(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v["metadata"].as_object_mut() {
        for f in [
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "generation",
            "managedFields",
        ] {
            m.remove(f);
        }
    }
    v
}

async fn loaded() -> ApiServer {
    let server = ApiServer::start("127.0.0.1:0".parse().unwrap(), Options::default())
        .await
        .expect("start");
    for f in [
        "namespaces.json",
        "nodes.json",
        "services.json",
        "endpointslices.json",
        "pods.json",
        "networkpolicies.json",
    ] {
        server.load(&fixture_json(f)).expect(f);
    }
    server
}

#[tokio::test]
async fn lists_have_the_recorded_envelope_and_items() {
    let server = loaded().await;
    let addr = server.addr.to_string();
    for (file, path) in [
        ("nodes.json", "/api/v1/nodes"),
        ("services.json", "/api/v1/services"),
        (
            "endpointslices.json",
            "/apis/discovery.k8s.io/v1/endpointslices",
        ),
        ("namespaces.json", "/api/v1/namespaces"),
        ("pods.json", "/api/v1/pods"),
        (
            "networkpolicies.json",
            "/apis/networking.k8s.io/v1/networkpolicies",
        ),
    ] {
        let want = fixture_json(file);
        let (code, got) = get(&addr, path).await;
        assert_eq!(code, 200, "{path}");
        assert_eq!(keys(&got), keys(&want), "{path}: list envelope");
        assert_eq!(got["kind"], want["kind"], "{path}");
        assert_eq!(got["apiVersion"], want["apiVersion"], "{path}");
        assert_eq!(keys(&got["metadata"]), keys(&want["metadata"]), "{path}");
        let rv = got["metadata"]["resourceVersion"]
            .as_str()
            .expect("a string");
        assert!(rv.parse::<u64>().is_ok(), "{path}: resourceVersion {rv:?}");
        for w in want["items"].as_array().unwrap() {
            let name = &w["metadata"]["name"];
            let g = got["items"]
                .as_array()
                .unwrap()
                .iter()
                .find(|g| {
                    &g["metadata"]["name"] == name
                        && g["metadata"]["namespace"] == w["metadata"]["namespace"]
                })
                .unwrap_or_else(|| panic!("{path}: {name} missing"));
            // Items carry no kind/apiVersion, and the server's fields are all there.
            assert_eq!(keys(g), keys(w), "{path} {name}: fields");
            for f in ["uid", "resourceVersion", "creationTimestamp"] {
                assert!(g["metadata"][f].is_string(), "{path} {name}: metadata.{f}");
            }
            // The stand-in's defaulting leaves an object a real server made as it was.
            assert_eq!(content(g), content(w), "{path} {name}");
        }
        let namespaces = path.ends_with("/namespaces");
        if !namespaces {
            assert_eq!(
                got["items"].as_array().unwrap().len(),
                want["items"].as_array().unwrap().len(),
                "{path}"
            );
        }
    }
}

#[tokio::test]
async fn pages_selectors_and_single_objects() {
    let server = loaded().await;
    let addr = server.addr.to_string();
    let (_, all) = get(&addr, "/apis/discovery.k8s.io/v1/endpointslices").await;
    let total = all["items"].as_array().unwrap().len();
    // Pages of 4 with continue tokens, as kube-rs's watcher asks (limit=500) but smaller.
    let mut names = Vec::new();
    let mut cont = String::new();
    let mut first_rv = None;
    loop {
        let (code, page) = get(
            &addr,
            &format!("/apis/discovery.k8s.io/v1/endpointslices?limit=4&continue={cont}"),
        )
        .await;
        assert_eq!(code, 200);
        let rv = page["metadata"]["resourceVersion"].clone();
        assert_eq!(
            *first_rv.get_or_insert(rv.clone()),
            rv,
            "every page at one version"
        );
        for i in page["items"].as_array().unwrap() {
            names.push(i["metadata"]["name"].as_str().unwrap().to_string());
        }
        match page["metadata"]["continue"].as_str() {
            Some(c) => {
                assert!(page["metadata"]["remainingItemCount"].as_u64().unwrap() > 0);
                cont = c.to_string();
            }
            None => break,
        }
    }
    assert_eq!(names.len(), total);
    // What vswitchd asks for pods: finished pods are left out.
    let (_, pods) = get(
        &addr,
        "/api/v1/pods?fieldSelector=status.phase%21%3DSucceeded%2Cstatus.phase%21%3DFailed",
    )
    .await;
    let phases: Vec<&str> = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["status"]["phase"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(phases.len(), 5, "{phases:?}");
    assert!(!phases.contains(&"Succeeded"));
    let (code, bad) = get(&addr, "/api/v1/pods?fieldSelector=spec.bogus%3Dx").await;
    assert_eq!((code, bad["reason"].as_str()), (400, Some("BadRequest")));
    let (_, shop) = get(
        &addr,
        "/api/v1/namespaces/shop/pods?labelSelector=app%3Dweb",
    )
    .await;
    assert_eq!(shop["items"].as_array().unwrap().len(), 3);
    // One object: with its kind and apiVersion.
    let (code, web) = get(&addr, "/api/v1/namespaces/default/services/web").await;
    assert_eq!(code, 200);
    assert_eq!(
        (web["kind"].as_str(), web["apiVersion"].as_str()),
        (Some("Service"), Some("v1"))
    );
}

#[tokio::test]
async fn errors_are_status_objects() {
    let server = loaded().await;
    let addr = server.addr.to_string();
    let (code, nf) = get(&addr, "/api/v1/namespaces/default/services/nope").await;
    assert_eq!(code, 404);
    assert_eq!(
        nf,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "services \"nope\" not found", "reason": "NotFound",
            "details": {"name": "nope", "kind": "services"}, "code": 404})
    );
    let svc = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"web"},"spec":{"ports":[{"port":80}]}}"#;
    let (code, body) = request(
        &addr,
        "POST",
        "/api/v1/namespaces/default/services",
        "application/json",
        svc,
    )
    .await;
    let exists: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(code, 409);
    assert_eq!(exists["reason"], "AlreadyExists");
    assert_eq!(
        exists["details"],
        json!({"name": "web", "kind": "services"})
    );
    // An update based on an old version is a Conflict.
    let stale = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"web","resourceVersion":"1"},"spec":{"ports":[{"port":80}]}}"#;
    let (code, body) = request(
        &addr,
        "PUT",
        "/api/v1/namespaces/default/services/web",
        "application/json",
        stale,
    )
    .await;
    let conflict: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((code, conflict["reason"].as_str()), (409, Some("Conflict")));
    assert!(conflict["message"]
        .as_str()
        .unwrap()
        .contains("the object has been modified"));
    let (code, body) = request(
        &addr,
        "POST",
        "/api/v1/namespaces/nowhere/services",
        "application/json",
        svc,
    )
    .await;
    assert_eq!(code, 404, "{body}");
    let (code, _) = get(&addr, "/apis/apps/v1/deployments").await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn watches_stream_recorded_shapes_bookmarks_and_410() {
    let server = ApiServer::start(
        "127.0.0.1:0".parse().unwrap(),
        Options {
            settings: vswitch_apiserver::Settings {
                bookmark_interval: Duration::from_millis(200),
            },
            ..Options::default()
        },
    )
    .await
    .unwrap();
    server.load(&fixture_json("nodes.json")).unwrap();
    server.load(&fixture_json("pods.json")).unwrap();
    let addr = server.addr.to_string();
    let (_, list) = get(&addr, "/api/v1/nodes").await;
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();

    // Changes after the list: a node publishes its VTEP (the recorded MODIFIED), one is
    // deleted.
    let recorded: Vec<Value> = fixture("watch-nodes.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let modified = &recorded[1]["object"];
    let patch = json!({"metadata": {"annotations": modified["metadata"]["annotations"]}});
    let (code, _) = request(
        &addr,
        "PATCH",
        "/api/v1/nodes/node-d",
        "application/merge-patch+json",
        &patch.to_string(),
    )
    .await;
    assert_eq!(code, 200);
    let (code, _) = request(
        &addr,
        "DELETE",
        "/api/v1/nodes/node-h",
        "application/json",
        "",
    )
    .await;
    assert_eq!(code, 200);

    let (code, body) = request(
        &addr,
        "GET",
        &format!("/api/v1/nodes?watch=true&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=1"),
        "application/json",
        "",
    )
    .await;
    assert_eq!(code, 200);
    let events: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(&types[..2], ["MODIFIED", "DELETED"], "{types:?}");
    assert!(types[2..].iter().all(|t| *t == "BOOKMARK"), "{types:?}");
    assert!(types.len() >= 3, "a bookmark within the second: {types:?}");
    // Same shape as the recorded MODIFIED (object with kind and apiVersion) ...
    assert_eq!(keys(&events[0]), keys(&recorded[1]));
    assert_eq!(keys(&events[0]["object"]), keys(modified));
    assert_eq!(content(&events[0]["object"]), content(modified));
    // ... and the recorded BOOKMARK, at the latest version.
    let bookmark = &events[2]["object"];
    assert_eq!(keys(bookmark), keys(&recorded[0]["object"]));
    assert_eq!(bookmark["metadata"]["creationTimestamp"], Value::Null);
    let bm_rv: u64 = bookmark["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let del_rv: u64 = events[1]["object"]["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(bm_rv >= del_rv);

    // A pod that finishes leaves a watch that selects running pods as DELETED.
    let (_, pods) = get(&addr, "/api/v1/pods").await;
    let prv = pods["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let patch = json!({"status": {"phase": "Succeeded"}}).to_string();
    let (code, _) = request(
        &addr,
        "PATCH",
        "/api/v1/namespaces/shop/pods/web-5f7c9d8b4-x2k9p/status",
        "application/merge-patch+json",
        &patch,
    )
    .await;
    assert_eq!(code, 200);
    let (_, body) = request(
        &addr,
        "GET",
        &format!("/api/v1/pods?watch=true&resourceVersion={prv}&timeoutSeconds=1&fieldSelector=status.phase%21%3DSucceeded"),
        "application/json",
        "",
    )
    .await;
    let ev: Value = serde_json::from_str(body.lines().next().unwrap()).unwrap();
    assert_eq!(ev["type"], "DELETED");

    // After a compaction, a watch from before it gets the recorded 410 ERROR (HTTP 200).
    server.store.compact();
    let (code, body) = request(
        &addr,
        "GET",
        &format!("/api/v1/nodes?watch=true&resourceVersion={rv}&timeoutSeconds=1"),
        "application/json",
        "",
    )
    .await;
    assert_eq!(code, 200);
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{body}");
    let want = &recorded[3];
    assert_eq!(lines[0]["type"], "ERROR");
    let mut got = lines[0]["object"].clone();
    let msg = got["message"].as_str().unwrap().to_string();
    assert!(
        msg.starts_with(&format!("too old resource version: {rv} (")),
        "{msg}"
    );
    got["message"] = want["object"]["message"].clone();
    assert_eq!(got, want["object"]);
}

#[tokio::test]
async fn discovery_answers_what_kubectl_reads() {
    let server = loaded().await;
    let addr = server.addr.to_string();
    let (_, api) = get(&addr, "/api").await;
    assert_eq!(api["versions"], json!(["v1"]));
    let (_, apis) = get(&addr, "/apis").await;
    let groups: Vec<&str> = apis["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(groups, ["discovery.k8s.io", "networking.k8s.io"]);
    let (_, v1) = get(&addr, "/api/v1").await;
    let names: Vec<&str> = v1["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    for n in ["nodes", "services", "namespaces", "pods"] {
        assert!(names.contains(&n), "{names:?}");
    }
    let (code, oa) = get(&addr, "/openapi/v3").await;
    assert_eq!(code, 200);
    let url = oa["paths"]["apis/networking.k8s.io/v1"]["serverRelativeURL"]
        .as_str()
        .unwrap();
    let (code, doc) = get(&addr, url).await;
    assert_eq!((code, doc["openapi"].as_str()), (200, Some("3.0.0")));
    // kubectl before 1.27 decodes /openapi/v2 as protobuf: swagger "2.0" first.
    let (code, v2) = request(&addr, "GET", "/openapi/v2", "application/json", "").await;
    assert_eq!(code, 200);
    assert!(v2.as_bytes().starts_with(b"\x0a\x032.0\x12"), "{v2:?}");
    let (_, version) = get(&addr, "/version").await;
    assert_eq!(version["major"], "1");
}
