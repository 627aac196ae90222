//! The HTTP side: paths as the real server lays them out, list and watch, writes, discovery,
//! and a few control endpoints for tests under `/_standin/` (no Kubernetes path starts so).
//!
//! One fallback handler parses the path itself: the REST layout (`/api/v1/namespaces/{ns}/
//! services/{name}/status`, `/apis/{group}/{version}/...`) is easier to read as one match over
//! segments than as a dozen axum routes, and unknown paths get the server's own 404 Status.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::patch;
use crate::resources::{self, RESOURCES};
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::{self, ApiError};
use crate::store::{Event, EventType, Key, Message, Store};

/// Settings of the HTTP side.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How often a watch that asked for them gets a BOOKMARK.
    pub bookmark_interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            bookmark_interval: Duration::from_secs(5),
        }
    }
}

/// Faults a test injects, and what the server counted, per resource (index in RESOURCES).
#[derive(Debug)]
pub struct Faults {
    /// Lists (and watches) answered 403 Forbidden, as for a ClusterRole without the kind.
    pub forbidden: Vec<bool>,
    /// Lists still to answer 500 before answering properly (etcd timing out).
    pub fail_lists: Vec<usize>,
    /// Lists and watches served (or refused), per resource.
    pub lists: Vec<usize>,
    pub watches: Vec<usize>,
}

impl Faults {
    pub(crate) fn new() -> Faults {
        let n = RESOURCES.len();
        Faults {
            forbidden: vec![false; n],
            fail_lists: vec![0; n],
            lists: vec![0; n],
            watches: vec![0; n],
        }
    }
}

/// The fault an injected setting makes of a list or watch of `resource`, counting it.
fn injected(app: &App, resource: usize, watch: bool) -> Option<ApiError> {
    let mut f = app.faults.lock().unwrap_or_else(|p| p.into_inner());
    if watch {
        f.watches[resource] += 1;
    } else {
        f.lists[resource] += 1;
    }
    if f.forbidden[resource] {
        return Some(ApiError::forbidden(&RESOURCES[resource]));
    }
    if !watch && f.fail_lists[resource] > 0 {
        f.fail_lists[resource] -= 1;
        return Some(ApiError::internal("etcdserver: request timed out"));
    }
    None
}

#[derive(Clone)]
pub(crate) struct App {
    pub store: Store,
    pub faults: Arc<std::sync::Mutex<Faults>>,
    pub settings: Settings,
    /// Until when (ms since `epoch`) every request gets 503, after a `restart`.
    pub down_until_ms: Arc<AtomicU64>,
    pub epoch: Instant,
    pub server: String,
}

pub(crate) fn router(app: App) -> Router {
    Router::new().fallback(handle).with_state(app)
}

fn json_response(code: u16, v: &Value) -> Response {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn error(e: ApiError) -> Response {
    json_response(e.code, &e.status())
}

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Collection {
        resource: usize,
        namespace: Option<String>,
    },
    Object {
        resource: usize,
        namespace: Option<String>,
        name: String,
    },
    Doc(Value),
}

fn route(path: &str, server: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api"] => return Some(Target::Doc(resources::api_versions(server))),
        ["apis"] => return Some(Target::Doc(resources::api_group_list())),
        ["version"] => return Some(Target::Doc(resources::version())),
        ["openapi", "v3"] => return Some(Target::Doc(resources::openapi_v3_index())),
        ["openapi", "v3", rest @ ..] => {
            return resources::openapi_v3_group(&rest.join("/")).map(Target::Doc)
        }
        ["api", "v1"] => return resources::api_resource_list("", "v1").map(Target::Doc),
        ["apis", g] => return resources::api_group(g).map(Target::Doc),
        ["apis", g, v] => return resources::api_resource_list(g, v).map(Target::Doc),
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let res = |plural: &str| resources::find(group, version, plural);
    // A trailing `/status` names the same object: the stand-in keeps no separate status.
    let rest = match rest {
        [head @ .., "status"] if head.len() == 2 || head.len() == 4 => head,
        r => r,
    };
    match rest {
        [plural] => Some(Target::Collection {
            resource: res(plural)?,
            namespace: None,
        }),
        ["namespaces", ns, plural] => {
            let r = res(plural)?;
            RESOURCES[r].namespaced.then(|| Target::Collection {
                resource: r,
                namespace: Some(ns.to_string()),
            })
        }
        [plural, name] => {
            let r = res(plural)?;
            (!RESOURCES[r].namespaced).then(|| Target::Object {
                resource: r,
                namespace: None,
                name: name.to_string(),
            })
        }
        ["namespaces", ns, plural, name] => {
            let r = res(plural)?;
            RESOURCES[r].namespaced.then(|| Target::Object {
                resource: r,
                namespace: Some(ns.to_string()),
                name: name.to_string(),
            })
        }
        _ => None,
    }
}

async fn handle(
    State(app): State<App>,
    method: Method,
    uri: Uri,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return error(ApiError::bad_request(&format!("the query: {e}"))),
    };
    let path = uri.path();
    if let Some(ctl) = path.strip_prefix("/_standin/") {
        if ctl == "churn" && method == Method::POST {
            return churn(&app, &q).await;
        }
        return control(&app, &method, ctl, &q);
    }
    if matches!(path, "/healthz" | "/livez" | "/readyz") {
        return "ok".into_response();
    }
    if path == "/openapi/v2" && method == Method::GET {
        let ct = "application/octet-stream";
        return (
            [(header::CONTENT_TYPE, ct)],
            resources::openapi_v2_protobuf(),
        )
            .into_response();
    }
    let now_ms = app.epoch.elapsed().as_millis() as u64;
    if now_ms < app.down_until_ms.load(Ordering::SeqCst) {
        return error(ApiError::unavailable());
    }
    let Some(target) = route(path, &app.server) else {
        return error(ApiError::path_not_found());
    };
    if q.get("dryRun").is_some_and(|d| !d.is_empty()) {
        return error(ApiError::bad_request(
            "dryRun is not supported by the vswitch API server stand-in",
        ));
    }
    let result = match (target, &method) {
        (Target::Doc(d), &Method::GET) => Ok(json_response(200, &d)),
        (
            Target::Collection {
                resource,
                namespace,
            },
            &Method::GET,
        ) => {
            let is_watch = q.get("watch").is_some_and(|w| w == "true" || w == "1");
            if let Some(e) = injected(&app, resource, is_watch) {
                Err(e)
            } else if is_watch {
                watch(&app, resource, namespace, &q)
            } else {
                list(&app, resource, namespace.as_deref(), &q)
            }
        }
        (
            Target::Collection {
                resource,
                namespace,
            },
            &Method::POST,
        ) => {
            if RESOURCES[resource].namespaced && namespace.is_none() {
                Err(ApiError::method_not_allowed())
            } else {
                parse_body(&body).and_then(|obj| {
                    app.store
                        .create(resource, namespace.as_deref(), obj)
                        .map(|o| json_response(201, &o))
                })
            }
        }
        (
            Target::Object {
                resource,
                namespace,
                name,
            },
            m,
        ) => {
            let key: Key = (resource, namespace.clone().unwrap_or_default(), name);
            object(&app, key, m, &headers, &body)
        }
        _ => Err(ApiError::method_not_allowed()),
    };
    result.unwrap_or_else(error)
}

fn control(app: &App, method: &Method, what: &str, q: &HashMap<String, String>) -> Response {
    if method != Method::POST && what != "healthz" {
        return error(ApiError::method_not_allowed());
    }
    match what {
        "healthz" => "ok".into_response(),
        "compact" => {
            let rv = app.store.compact();
            json_response(200, &json!({"compactedBefore": rv.to_string()}))
        }
        "cut-watches" => {
            app.store.cut_watches();
            json_response(200, &json!({"cut": true}))
        }
        "forbid" | "fail-lists" => {
            let Some(r) = q
                .get("resource")
                .and_then(|p| RESOURCES.iter().position(|r| r.plural == p))
            else {
                return error(ApiError::bad_request(
                    "resource: a plural the stand-in serves",
                ));
            };
            let n: usize = q.get("count").and_then(|c| c.parse().ok()).unwrap_or(1);
            let mut f = app.faults.lock().unwrap_or_else(|p| p.into_inner());
            if what == "forbid" {
                f.forbidden[r] = q.get("on").is_none_or(|o| o != "false");
            } else {
                f.fail_lists[r] = n;
            }
            json_response(200, &json!({"resource": RESOURCES[r].plural}))
        }
        "restart" => {
            let down: u64 = q.get("down_ms").and_then(|d| d.parse().ok()).unwrap_or(500);
            let until = app.epoch.elapsed().as_millis() as u64 + down;
            app.down_until_ms.store(until, Ordering::SeqCst);
            app.store.cut_watches();
            json_response(200, &json!({"downMs": down}))
        }
        _ => error(ApiError::path_not_found()),
    }
}

/// The annotation the EndpointSlice controller stamps with the time of the change behind an
/// update; kube-proxy (and vswitchd) measure network programming latency from it.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// `POST /_standin/churn?rate=R&count=N`: N EndpointSlice updates at R a second, as the
/// EndpointSlice controller makes them when pods turn ready and unready. Each flips one
/// endpoint's `conditions.ready` (round robin over the slices in name order, and over each
/// slice's endpoints) and stamps [`TRIGGER_TIME_ANNOTATION`] with the time of the write in
/// microseconds. With `kind=pods`, N Pod updates instead: each sets one pod's label `churn`
/// to the round's number (round robin over the pods in name order), as a rollout or an
/// operator relabelling pods would. Answered when done: `{"changes", "seconds", "behind"}`
/// (`behind`: writes that started more than one interval late).
async fn churn(app: &App, q: &HashMap<String, String>) -> Response {
    let num = |k: &str, default: f64| -> Result<f64, ApiError> {
        match q.get(k) {
            None => Ok(default),
            Some(v) => v
                .parse::<f64>()
                .ok()
                .filter(|v| *v > 0.0 && v.is_finite())
                .ok_or_else(|| ApiError::bad_request(&format!("{k}: a positive number"))),
        }
    };
    let (rate, count) = match (num("rate", 10.0), num("count", 100.0)) {
        (Ok(r), Ok(c)) => (r.min(100_000.0), c as u64),
        (Err(e), _) | (_, Err(e)) => return error(e),
    };
    let pods = match q.get("kind").map(String::as_str) {
        None | Some("endpointslices") => false,
        Some("pods") => true,
        Some(_) => {
            return error(ApiError::bad_request(
                "kind: endpointslices (the default) or pods",
            ))
        }
    };
    let plural = if pods { "pods" } else { "endpointslices" };
    let Some(res) = RESOURCES.iter().position(|r| r.plural == plural) else {
        return error(ApiError::path_not_found());
    };
    let (mut objects, _) = app.store.list(res, None);
    if !pods {
        objects.retain(|s| s["endpoints"].as_array().is_some_and(|e| !e.is_empty()));
    }
    if objects.is_empty() {
        return error(ApiError::bad_request(if pods {
            "there are no Pods"
        } else {
            "there are no EndpointSlices with endpoints"
        }));
    }
    let keys: Vec<Key> = objects
        .iter()
        .map(|s| {
            let m = &s["metadata"];
            let ns = m["namespace"].as_str().unwrap_or_default().to_string();
            (res, ns, m["name"].as_str().unwrap_or_default().to_string())
        })
        .collect();
    let interval = std::time::Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now();
    let mut behind = 0u64;
    for i in 0..count {
        let due = start + interval.mul_f64(i as f64);
        let now = tokio::time::Instant::now();
        if now > due + interval {
            behind += 1;
        } else {
            tokio::time::sleep_until(due).await;
        }
        let n = i as usize;
        let key = &keys[n % keys.len()];
        let round = n / keys.len();
        let flip = |old: &Value| -> Result<Value, ApiError> {
            let mut obj = old.clone();
            if pods {
                obj["metadata"]["labels"]["churn"] = Value::String(round.to_string());
            } else {
                if let Some(eps) = obj["endpoints"].as_array_mut() {
                    let k = round % eps.len();
                    let ready = eps[k]["conditions"]["ready"].as_bool().unwrap_or(true);
                    eps[k]["conditions"]["ready"] = Value::Bool(!ready);
                }
                let stamp = crate::store::rfc3339(std::time::SystemTime::now(), true);
                obj["metadata"]["annotations"][TRIGGER_TIME_ANNOTATION] = Value::String(stamp);
            }
            if let Some(m) = obj["metadata"].as_object_mut() {
                m.remove("resourceVersion");
            }
            Ok(obj)
        };
        // An object deleted meanwhile is skipped.
        let _ = app.store.update(key, flip);
    }
    let seconds = start.elapsed().as_secs_f64();
    json_response(
        200,
        &json!({"changes": count, "seconds": seconds, "behind": behind}),
    )
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        return Ok(v);
    }
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("the body is neither JSON nor UTF-8 YAML"))?;
    serde_saphyr::from_str::<Value>(text)
        .map_err(|e| ApiError::bad_request(&format!("the body is neither JSON nor YAML: {e}")))
}

/// One object: GET, PUT, PATCH (merge, strategic merge, apply), DELETE.
fn object(
    app: &App,
    key: Key,
    method: &Method,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let r = &RESOURCES[key.0];
    let ns = (!key.1.is_empty()).then_some(key.1.as_str());
    match *method {
        Method::GET => {
            let o = app
                .store
                .get(&key)
                .ok_or_else(|| ApiError::not_found(r, &key.2))?;
            Ok(json_response(200, &o))
        }
        Method::PUT => {
            let obj = parse_body(body)?;
            let o = app.store.update(&key, |_| Ok(obj))?;
            Ok(json_response(200, &o))
        }
        Method::PATCH => {
            let ct = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            if !matches!(
                ct.as_str(),
                "application/merge-patch+json"
                    | "application/apply-patch+yaml"
                    | "application/strategic-merge-patch+json"
            ) {
                return Err(ApiError::unsupported_media(&ct));
            }
            let p = parse_body(body)?;
            if !p.is_object() {
                return Err(ApiError::bad_request("the patch is not a JSON object"));
            }
            let apply = |old: &Value, p: &Value| -> Result<Value, ApiError> {
                let mut new = old.clone();
                match ct.as_str() {
                    "application/merge-patch+json" | "application/apply-patch+yaml" => {
                        patch::merge(&mut new, p)
                    }
                    "application/strategic-merge-patch+json" => patch::strategic(&mut new, p),
                    other => return Err(ApiError::unsupported_media(other)),
                }
                Ok(new)
            };
            if ct == "application/apply-patch+yaml" && app.store.get(&key).is_none() {
                let mut obj = p;
                obj["metadata"]["name"] = json!(key.2);
                let o = app.store.create(key.0, ns, obj)?;
                return Ok(json_response(201, &o));
            }
            let o = app.store.update(&key, |old| apply(old, &p))?;
            Ok(json_response(200, &o))
        }
        Method::DELETE => {
            let o = app.store.delete(&key)?;
            if o.is_null() {
                return Ok(json_response(200, &status::success()));
            }
            Ok(json_response(200, &o))
        }
        _ => Err(ApiError::method_not_allowed()),
    }
}

/// Which objects a list or watch selects.
struct Filter {
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn new(
        resource: usize,
        namespace: Option<String>,
        q: &HashMap<String, String>,
    ) -> Result<Filter, ApiError> {
        let empty = String::new();
        let labels = LabelSelector::parse(q.get("labelSelector").unwrap_or(&empty))
            .map_err(|e| ApiError::bad_request(&format!("labelSelector: {e}")))?;
        let fields = FieldSelector::parse(
            q.get("fieldSelector").unwrap_or(&empty),
            RESOURCES[resource].fields,
        )
        .map_err(|e| ApiError::bad_request(&e))?;
        Ok(Filter {
            namespace,
            labels,
            fields,
        })
    }

    fn matches(&self, obj: &Value) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|n| obj["metadata"]["namespace"].as_str() == Some(n))
            && self.labels.matches(obj)
            && self.fields.matches(obj)
    }

    /// The event a watch with this filter sees for `e`, if any: an object that stops matching
    /// is DELETED for it, one that starts matching ADDED.
    fn event(&self, e: &Event) -> Option<(EventType, Arc<Value>)> {
        let was = e.old.as_deref().is_some_and(|o| self.matches(o));
        let is = self.matches(&e.object);
        let typ = match (e.typ, was, is) {
            (EventType::Deleted, true, _) => EventType::Deleted,
            (EventType::Deleted, false, _) => return None,
            (_, false, true) => EventType::Added,
            (_, true, true) => EventType::Modified,
            (_, true, false) => EventType::Deleted,
            (_, false, false) => return None,
        };
        Some((typ, e.object.clone()))
    }
}

/// Continue tokens: the version of the first page and the last key sent, hex-encoded so that
/// they need no escaping.
fn encode_continue(rv: u64, ns: &str, name: &str) -> String {
    format!("{rv}\0{ns}\0{name}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_continue(t: &str) -> Option<(u64, String, String)> {
    if !t.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..t.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(t.get(i..i + 2)?, 16).ok())
        .collect();
    let s = String::from_utf8(bytes?).ok()?;
    let mut it = s.split('\0');
    let rv = it.next()?.parse().ok()?;
    Some((rv, it.next()?.to_string(), it.next()?.to_string()))
}

fn list(
    app: &App,
    resource: usize,
    namespace: Option<&str>,
    q: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let r = &RESOURCES[resource];
    let filter = Filter::new(resource, namespace.map(str::to_string), q)?;
    let limit: usize = match q.get("limit").map(|l| l.parse::<i64>()) {
        None => 0,
        Some(Ok(n)) if n >= 0 => n as usize,
        _ => {
            return Err(ApiError::bad_request(
                "limit: must be a non-negative integer",
            ))
        }
    };
    let after = match q.get("continue").filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => {
            let t = decode_continue(c)
                .ok_or_else(|| ApiError::bad_request("continue key is not valid"))?;
            app.store.continuable(t.0)?;
            Some(t)
        }
    };
    let selectors = q.contains_key("labelSelector") || q.contains_key("fieldSelector");
    let (selected, rest, rv) = app.store.list_page(
        resource,
        namespace,
        after.as_ref().map(|(_, ns, n)| (ns.as_str(), n.as_str())),
        limit,
        !selectors,
        |o| filter.matches(o),
    );
    let list_rv = after.as_ref().map(|t| t.0).unwrap_or(rv);
    let mut meta = json!({"resourceVersion": list_rv.to_string()});
    if rest > 0 {
        if let Some(last) = selected.last() {
            let m = &last["metadata"];
            meta["continue"] = json!(encode_continue(
                list_rv,
                m["namespace"].as_str().unwrap_or(""),
                m["name"].as_str().unwrap_or("")
            ));
            if !selectors {
                meta["remainingItemCount"] = json!(rest);
            }
        }
    }
    let items: Vec<Value> = selected.iter().map(|o| list_item(o)).collect();
    let body = json!({
        "kind": r.list_kind(),
        "apiVersion": r.api_version(),
        "metadata": meta,
        "items": items,
    });
    Ok(json_response(200, &body))
}

/// A list's items carry no kind or apiVersion (the list says them once).
fn list_item(o: &Value) -> Value {
    let mut o = o.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("kind");
        m.remove("apiVersion");
    }
    o
}

fn line(typ: &str, object: &Value) -> Bytes {
    let mut s = json!({"type": typ, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

struct Watch {
    resource: usize,
    filter: Filter,
    pending: VecDeque<Bytes>,
    rx: broadcast::Receiver<Message>,
    store: Store,
    /// Highest version this watch has accounted for (sent, or filtered out).
    seen: u64,
    bookmarks: Option<tokio::time::Interval>,
    deadline: tokio::time::Instant,
    done: bool,
}

impl Watch {
    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let r = &RESOURCES[self.resource];
        let mut meta = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        line(
            "BOOKMARK",
            &json!({"kind": r.kind, "apiVersion": r.api_version(), "metadata": meta}),
        )
    }

    /// Turns a message into lines; false when the watch must end.
    fn take(&mut self, m: Message) -> bool {
        match m {
            Message::Cut => false,
            Message::Event(e) => {
                self.seen = self.seen.max(e.rv);
                if e.resource == self.resource {
                    if let Some((typ, obj)) = self.filter.event(&e) {
                        self.pending.push_back(line(typ.as_str(), &obj));
                    }
                }
                true
            }
        }
    }

    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(l) = self.pending.pop_front() {
                return Some(l);
            }
            if self.done {
                return None;
            }
            let tick = async {
                match self.bookmarks.as_mut() {
                    Some(i) => {
                        i.tick().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                m = self.rx.recv() => match m {
                    Ok(m) => {
                        if !self.take(m) {
                            return None;
                        }
                    }
                    // Too slow a reader: the server closes the watch, the client resumes from
                    // the last version it saw and the log replays the rest.
                    Err(_) => return None,
                },
                _ = tick => {
                    // Every event up to `now` is already queued to us: account for it, then
                    // promise it.
                    let now = self.store.rv();
                    loop {
                        match self.rx.try_recv() {
                            Ok(m) => {
                                if !self.take(m) {
                                    self.done = true;
                                    break;
                                }
                            }
                            Err(broadcast::error::TryRecvError::Empty) => break,
                            Err(_) => {
                                self.done = true;
                                break;
                            }
                        }
                    }
                    if !self.done {
                        let rv = now.max(self.seen);
                        self.seen = rv;
                        let b = self.bookmark(rv, false);
                        self.pending.push_back(b);
                    }
                }
                _ = tokio::time::sleep_until(self.deadline) => return None,
            }
        }
    }
}

fn watch(
    app: &App,
    resource: usize,
    namespace: Option<String>,
    q: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let filter = Filter::new(resource, namespace, q)?;
    let from = match q.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(v) => Some(v.parse::<u64>().map_err(|_| {
            ApiError::bad_request(&format!("resourceVersion: invalid value {v:?}"))
        })?),
    };
    let initial = q.get("sendInitialEvents").is_some_and(|s| s == "true");
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|t| *t > 0)
        .unwrap_or(1800);
    let (backlog, current, rv, rx) = match app.store.watch_from(resource, from) {
        Ok(w) => w,
        // A watch that starts too late is answered 200 with an ERROR event, as the server does.
        Err(e) => {
            let l = line("ERROR", &e.status());
            return Ok(
                ([(header::CONTENT_TYPE, "application/json")], Body::from(l)).into_response(),
            );
        }
    };
    let mut w = Watch {
        resource,
        filter,
        pending: VecDeque::new(),
        rx,
        store: app.store.clone(),
        seen: rv,
        bookmarks: bookmarks.then(|| {
            let every = app.settings.bookmark_interval;
            let mut i = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        }),
        deadline: tokio::time::Instant::now() + Duration::from_secs(timeout),
        done: false,
    };
    for o in current.iter().filter(|o| w.filter.matches(o)) {
        w.pending.push_back(line("ADDED", o));
    }
    if initial && from.is_none() && bookmarks {
        let b = w.bookmark(rv, true);
        w.pending.push_back(b);
    }
    for e in backlog {
        if let Some((typ, obj)) = w.filter.event(&e) {
            w.pending.push_back(line(typ.as_str(), &obj));
        }
    }
    let stream = futures::stream::unfold(w, |mut w| async move {
        let l = w.next().await?;
        Some((Ok::<_, Infallible>(l), w))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_route_as_on_a_real_server() {
        let svc = resources::find("", "v1", "services").unwrap();
        let node = resources::find("", "v1", "nodes").unwrap();
        let ns = resources::find("", "v1", "namespaces").unwrap();
        let eps = resources::find("discovery.k8s.io", "v1", "endpointslices").unwrap();
        let s = "x";
        assert_eq!(
            route("/api/v1/services", s),
            Some(Target::Collection {
                resource: svc,
                namespace: None
            })
        );
        assert_eq!(
            route("/api/v1/namespaces/shop/services/web/status", s),
            Some(Target::Object {
                resource: svc,
                namespace: Some("shop".into()),
                name: "web".into()
            })
        );
        assert_eq!(
            route("/api/v1/nodes/n1", s),
            Some(Target::Object {
                resource: node,
                namespace: None,
                name: "n1".into()
            })
        );
        assert_eq!(
            route("/api/v1/namespaces/shop", s),
            Some(Target::Object {
                resource: ns,
                namespace: None,
                name: "shop".into()
            })
        );
        assert_eq!(
            route("/apis/discovery.k8s.io/v1/namespaces/a/endpointslices", s),
            Some(Target::Collection {
                resource: eps,
                namespace: Some("a".into())
            })
        );
        assert_eq!(route("/api/v1/services/web", s), None);
        assert_eq!(route("/api/v1/secrets", s), None);
        assert_eq!(route("/apis/apps/v1/deployments", s), None);
    }

    #[test]
    fn continue_tokens_round_trip() {
        let t = encode_continue(1234, "shop", "web-1");
        assert_eq!(
            decode_continue(&t),
            Some((1234, "shop".into(), "web-1".into()))
        );
        assert_eq!(decode_continue("zz"), None);
        assert_eq!(decode_continue("abc"), None);
    }
}
