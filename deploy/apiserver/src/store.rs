//! The objects, one global resourceVersion, the event log watches resume from, and compaction.
//!
//! Like etcd behind a real API server, every write takes the next number of one counter for all
//! kinds, so a resourceVersion orders every change. The log keeps the last `window` events (all
//! kinds); a watch that resumes from a version older than the oldest one kept gets 410 Gone
//! (`Expired`), as after an etcd compaction. Writes are published on a broadcast channel under
//! the store's lock, so a watch that takes its backlog and subscribes under that lock sees every
//! event once, in order.
//!
//! Server-side behaviour the clients depend on is done here too: uid, creationTimestamp,
//! generation, the defaults vswitchd and kubectl read (a Service's type, ClusterIP and
//! NodePort allocation, port protocol and targetPort; a NetworkPolicy's policyTypes; a
//! Namespace's `kubernetes.io/metadata.name` label and phase; a Pod's phase).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::resources::{Resource, RESOURCES};
use crate::status::ApiError;

/// `(resource index, namespace ("" for cluster-scoped), name)`.
pub type Key = (usize, String, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as the watches see it.
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub resource: usize,
    pub typ: EventType,
    /// The object before the change (None for a creation); selectors that matched it but not
    /// the new one turn a MODIFIED into a DELETED.
    pub old: Option<Arc<Value>>,
    /// The object after the change; for a deletion, the last state with the deletion's version.
    pub object: Arc<Value>,
}

/// What a watch or the control endpoints see of the store's messages.
#[derive(Debug, Clone)]
pub enum Message {
    Event(Arc<Event>),
    /// Every open watch ends (a restart, or a test cutting streams).
    Cut,
}

struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Arc<Value>>,
    log: VecDeque<Arc<Event>>,
    /// Watches from a version older than this get 410 Gone.
    oldest: u64,
    window: usize,
    uid: u64,
    service_ips: BTreeSet<Ipv4Addr>,
    node_ports: BTreeSet<u16>,
}

/// The stand-in's storage. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Mutex<Inner>>,
    tx: broadcast::Sender<Message>,
    service_cidr: (Ipv4Addr, u8),
}

/// First resourceVersion handed out (anything > 0 works; a real cluster is never at 1).
const FIRST_RV: u64 = 1000;

fn now_rfc3339() -> String {
    rfc3339(SystemTime::now(), false)
}

/// `t` as RFC 3339 in UTC, with microseconds when `micros`.
pub fn rfc3339(t: SystemTime, micros: bool) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let frac = if micros {
        format!(".{:06}", since.subsec_micros())
    } else {
        String::new()
    };
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}{frac}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl Store {
    /// An empty store holding the namespaces every cluster has. `window`: events kept for
    /// watches to resume from; `service_cidr`: where ClusterIPs are allocated.
    pub fn new(window: usize, service_cidr: (Ipv4Addr, u8)) -> Store {
        let store = Store {
            inner: Arc::new(Mutex::new(Inner {
                rv: FIRST_RV,
                objects: BTreeMap::new(),
                log: VecDeque::new(),
                oldest: 0,
                window: window.max(1),
                uid: 0,
                service_ips: BTreeSet::new(),
                node_ports: BTreeSet::new(),
            })),
            tx: broadcast::channel(8192).0,
            service_cidr,
        };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            let _ = store.create(0, None, obj);
        }
        store
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current resourceVersion.
    pub fn rv(&self) -> u64 {
        self.lock().rv
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Message> {
        self.tx.subscribe()
    }

    /// Ends every open watch.
    pub fn cut_watches(&self) {
        let _ = self.tx.send(Message::Cut);
    }

    /// Forgets the event log: a watch from any version before now gets 410 Gone. The counter
    /// moves on by one (as writes to other keys would in etcd) so that even a client that saw
    /// the last event must relist.
    pub fn compact(&self) -> u64 {
        let mut g = self.lock();
        g.rv += 1;
        g.log.clear();
        g.oldest = g.rv;
        g.rv
    }

    /// The objects of `resource` (in `namespace`, or all), sorted by namespace and name, and
    /// the version they are current at.
    pub fn list(&self, resource: usize, namespace: Option<&str>) -> (Vec<Arc<Value>>, u64) {
        let g = self.lock();
        let items = g
            .objects
            .range((resource, String::new(), String::new())..)
            .take_while(|((r, _, _), _)| *r == resource)
            .filter(|((_, ns, _), _)| namespace.is_none_or(|n| n == ns))
            .map(|(_, v)| v.clone())
            .collect();
        (items, g.rv)
    }

    /// One page of a list: up to `limit` (0: no limit) objects of `resource` (in `namespace`)
    /// that `keep` takes, in key order from after `after` (namespace, name), and how many more
    /// there are: all of them counted when `count_rest`, else 1 when there is one. Only the
    /// page is read, as a real server's watch cache does, not the whole kind.
    pub fn list_page(
        &self,
        resource: usize,
        namespace: Option<&str>,
        after: Option<(&str, &str)>,
        limit: usize,
        count_rest: bool,
        keep: impl Fn(&Value) -> bool,
    ) -> (Vec<Arc<Value>>, usize, u64) {
        use std::ops::Bound;
        let g = self.lock();
        let start = match after {
            Some((ns, n)) => Bound::Excluded((resource, ns.to_string(), n.to_string())),
            None => Bound::Included((resource, String::new(), String::new())),
        };
        let (mut page, mut rest) = (Vec::new(), 0);
        for ((r, ns, _), v) in g.objects.range((start, Bound::Unbounded)) {
            if *r != resource {
                break;
            }
            if namespace.is_some_and(|n| n != ns) || !keep(v) {
                continue;
            }
            if limit == 0 || page.len() < limit {
                page.push(v.clone());
                continue;
            }
            rest += 1;
            if !count_rest {
                break;
            }
        }
        (page, rest, g.rv)
    }

    pub fn get(&self, key: &Key) -> Option<Arc<Value>> {
        self.lock().objects.get(key).cloned()
    }

    /// For a watch from `from`: the logged events of `resource` after it and a receiver of the
    /// later ones, or Gone when the log no longer reaches back that far. `from == None`: no
    /// backlog, the current objects instead (a watch without a version starts with them).
    #[allow(clippy::type_complexity)]
    pub fn watch_from(
        &self,
        resource: usize,
        from: Option<u64>,
    ) -> Result<
        (
            Vec<Arc<Event>>,
            Vec<Arc<Value>>,
            u64,
            broadcast::Receiver<Message>,
        ),
        ApiError,
    > {
        let g = self.lock();
        let rx = self.tx.subscribe();
        match from {
            Some(v) if v < g.oldest => Err(ApiError::gone(v, g.oldest)),
            Some(v) => {
                let backlog = g
                    .log
                    .iter()
                    .filter(|e| e.rv > v && e.resource == resource)
                    .cloned()
                    .collect();
                Ok((backlog, Vec::new(), g.rv, rx))
            }
            None => {
                let current = g
                    .objects
                    .iter()
                    .filter(|((r, _, _), _)| *r == resource)
                    .map(|(_, v)| v.clone())
                    .collect();
                Ok((Vec::new(), current, g.rv, rx))
            }
        }
    }

    /// Whether a list continuation taken at `rv` can still be served.
    pub fn continuable(&self, rv: u64) -> Result<(), ApiError> {
        let g = self.lock();
        if rv < g.oldest {
            return Err(ApiError::continue_expired());
        }
        Ok(())
    }

    fn commit(&self, g: &mut Inner, ev: Event) {
        let ev = Arc::new(ev);
        g.log.push_back(ev.clone());
        while g.log.len() > g.window {
            if let Some(old) = g.log.pop_front() {
                g.oldest = old.rv;
            }
        }
        let _ = self.tx.send(Message::Event(ev));
    }

    /// Creates `obj` (POST). `namespace`: from the request path.
    pub fn create(
        &self,
        resource: usize,
        namespace: Option<&str>,
        mut obj: Value,
    ) -> Result<Arc<Value>, ApiError> {
        let r = &RESOURCES[resource];
        check_kind(r, &mut obj)?;
        let ns = object_namespace(r, namespace, &mut obj)?;
        let mut g = self.lock();
        if let Some(n) = &ns {
            if !g.objects.contains_key(&(0, String::new(), n.clone())) {
                return Err(ApiError::namespace_not_found(n));
            }
        }
        let name = match obj["metadata"]["name"].as_str() {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => match obj["metadata"]["generateName"].as_str() {
                Some(p) if !p.is_empty() => format!("{p}{:05x}", g.uid + 1),
                _ => return Err(ApiError::invalid(r, "", "metadata.name: Required value")),
            },
        };
        if let Err(e) = valid_name(&name) {
            return Err(ApiError::invalid(r, &name, &format!("metadata.name: {e}")));
        }
        let key = (resource, ns.clone().unwrap_or_default(), name.clone());
        if g.objects.contains_key(&key) {
            return Err(ApiError::already_exists(r, &name));
        }
        g.uid += 1;
        g.rv += 1;
        let (uid, rv) = (g.uid, g.rv);
        let m = &mut obj["metadata"];
        m["name"] = json!(name);
        m["uid"] = json!(format!("5a17d000-0000-4000-8000-{uid:012x}"));
        m["resourceVersion"] = json!(rv.to_string());
        m["creationTimestamp"] = json!(now_rfc3339());
        if r.kind == "NetworkPolicy" {
            // Of these kinds only NetworkPolicy has a generation on a v1.35 server (the
            // recorded objects in vswitch/tests/fixtures/k8s/ show which).
            m["generation"] = json!(1);
        }
        self.defaults(&mut g, r, None, &mut obj)?;
        let obj = Arc::new(obj);
        g.objects.insert(key, obj.clone());
        self.commit(
            &mut g,
            Event {
                rv,
                resource,
                typ: EventType::Added,
                old: None,
                object: obj.clone(),
            },
        );
        Ok(obj)
    }

    /// Replaces the object at `key` with what `change` makes of it (PUT, PATCH). `expect_rv`:
    /// the resourceVersion the client based its change on (PUT's metadata.resourceVersion),
    /// a mismatch is 409 Conflict.
    pub fn update(
        &self,
        key: &Key,
        change: impl FnOnce(&Value) -> Result<Value, ApiError>,
    ) -> Result<Arc<Value>, ApiError> {
        let r = &RESOURCES[key.0];
        let mut g = self.lock();
        let Some(old) = g.objects.get(key).cloned() else {
            return Err(ApiError::not_found(r, &key.2));
        };
        let mut obj = change(&old)?;
        check_kind(r, &mut obj)?;
        let ns = (!key.1.is_empty()).then_some(key.1.as_str());
        object_namespace(r, ns, &mut obj)?;
        if obj["metadata"]["name"].as_str() != Some(key.2.as_str()) {
            return Err(ApiError::bad_request(
                "the name of the object does not match the name on the URL",
            ));
        }
        if let Some(want) = obj["metadata"]["resourceVersion"].as_str() {
            if want != old["metadata"]["resourceVersion"].as_str().unwrap_or("") {
                return Err(ApiError::conflict(r, &key.2));
            }
        }
        // Fields the server owns.
        for f in ["uid", "creationTimestamp", "generation"] {
            let v = old["metadata"][f].clone();
            if !v.is_null() {
                obj["metadata"][f] = v;
            }
        }
        self.defaults(&mut g, r, Some(&old), &mut obj)?;
        if strip_meta(&obj) == strip_meta(&old) {
            // No change: no new version, no event (as the real server does).
            return Ok(old);
        }
        if obj["spec"] != old["spec"] && r.kind == "NetworkPolicy" {
            let gen = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            obj["metadata"]["generation"] = json!(gen);
        }
        g.rv += 1;
        let rv = g.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let obj = Arc::new(obj);
        g.objects.insert(key.clone(), obj.clone());
        self.commit(
            &mut g,
            Event {
                rv,
                resource: key.0,
                typ: EventType::Modified,
                old: Some(old),
                object: obj.clone(),
            },
        );
        Ok(obj)
    }

    /// Deletes the object at `key`, and a Namespace's objects with it.
    pub fn delete(&self, key: &Key) -> Result<Arc<Value>, ApiError> {
        let r = &RESOURCES[key.0];
        let mut g = self.lock();
        if !g.objects.contains_key(key) {
            return Err(ApiError::not_found(r, &key.2));
        }
        if r.kind == "Namespace" {
            let inside: Vec<Key> = g
                .objects
                .keys()
                .filter(|(res, ns, _)| RESOURCES[*res].namespaced && *ns == key.2)
                .cloned()
                .collect();
            for k in inside {
                self.remove(&mut g, &k);
            }
        }
        Ok(self
            .remove(&mut g, key)
            .unwrap_or_else(|| Arc::new(Value::Null)))
    }

    fn remove(&self, g: &mut Inner, key: &Key) -> Option<Arc<Value>> {
        let old = g.objects.remove(key)?;
        g.rv += 1;
        let rv = g.rv;
        let mut last = (*old).clone();
        last["metadata"]["resourceVersion"] = json!(rv.to_string());
        if RESOURCES[key.0].kind == "Service" {
            release_service(g, &old);
        }
        let last = Arc::new(last);
        self.commit(
            g,
            Event {
                rv,
                resource: key.0,
                typ: EventType::Deleted,
                old: Some(old),
                object: last.clone(),
            },
        );
        Some(last)
    }

    /// What the API server fills in. `old`: the stored object on an update.
    fn defaults(
        &self,
        g: &mut Inner,
        r: &Resource,
        old: Option<&Value>,
        obj: &mut Value,
    ) -> Result<(), ApiError> {
        let name = obj["metadata"]["name"].as_str().unwrap_or("").to_string();
        match r.kind {
            "Namespace" => {
                obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
                if obj["spec"]["finalizers"].is_null() {
                    obj["spec"]["finalizers"] = json!(["kubernetes"]);
                }
                obj["status"]["phase"] = json!("Active");
            }
            "Pod" if obj["status"]["phase"].is_null() => {
                obj["status"]["phase"] = json!("Pending");
            }
            "NetworkPolicy" if obj["spec"]["policyTypes"].is_null() && obj["spec"].is_object() => {
                let mut t = vec!["Ingress"];
                if !obj["spec"]["egress"].is_null() {
                    t.push("Egress");
                }
                obj["spec"]["policyTypes"] = json!(t);
            }
            "Service" => self.service_defaults(g, r, &name, old, obj)?,
            _ => {}
        }
        Ok(())
    }

    fn service_defaults(
        &self,
        g: &mut Inner,
        r: &Resource,
        name: &str,
        old: Option<&Value>,
        obj: &mut Value,
    ) -> Result<(), ApiError> {
        if !obj["spec"].is_object() {
            obj["spec"] = json!({});
        }
        let spec = &mut obj["spec"];
        if spec["type"].is_null() {
            spec["type"] = json!("ClusterIP");
        }
        let typ = spec["type"].as_str().unwrap_or("ClusterIP").to_string();
        if spec["sessionAffinity"].is_null() {
            spec["sessionAffinity"] = json!("None");
        }
        if typ != "ExternalName" {
            if spec["internalTrafficPolicy"].is_null() {
                spec["internalTrafficPolicy"] = json!("Cluster");
            }
            let old_ip = old.and_then(|o| o["spec"]["clusterIP"].as_str());
            let ip = match (spec["clusterIP"].as_str(), old_ip) {
                (None | Some(""), Some(o)) => o.to_string(),
                (Some(want), Some(o)) if want != o => {
                    return Err(ApiError::invalid(
                        r,
                        name,
                        "spec.clusterIPs[0]: Invalid value: field is immutable",
                    ))
                }
                (Some("None"), None) => "None".into(),
                (Some(want), None) if !want.is_empty() => {
                    let a: Ipv4Addr = want.parse().map_err(|_| {
                        ApiError::invalid(r, name, "spec.clusterIP: must be a valid IP address")
                    })?;
                    if !g.service_ips.insert(a) {
                        return Err(ApiError::invalid(
                            r,
                            name,
                            &format!(
                                "spec.clusterIPs: Invalid value: []string{{\"{a}\"}}: failed \
                                 to allocate IP {a}: provided IP is already allocated"
                            ),
                        ));
                    }
                    want.to_string()
                }
                (Some(o), Some(_)) => o.to_string(),
                _ => self.allocate_ip(g).ok_or_else(|| {
                    ApiError::invalid(r, name, "spec.clusterIP: no ClusterIP left to allocate")
                })?,
            };
            spec["clusterIP"] = json!(ip);
            // A dual-stack Service's second address is kept as given (the stand-in allocates
            // IPv4 only).
            if spec["clusterIPs"][0].as_str() != Some(ip.as_str()) {
                spec["clusterIPs"] = json!([ip]);
            }
            if ip != "None" {
                if spec["ipFamilies"].is_null() {
                    spec["ipFamilies"] = json!(["IPv4"]);
                }
                if spec["ipFamilyPolicy"].is_null() {
                    spec["ipFamilyPolicy"] = json!("SingleStack");
                }
            }
            let external = typ == "NodePort" || typ == "LoadBalancer";
            if external && spec["externalTrafficPolicy"].is_null() {
                spec["externalTrafficPolicy"] = json!("Cluster");
            }
            let old_ports = old
                .and_then(|o| o["spec"]["ports"].as_array())
                .cloned()
                .unwrap_or_default();
            if let Some(ports) = spec["ports"].as_array_mut() {
                for p in ports {
                    if p["protocol"].is_null() {
                        p["protocol"] = json!("TCP");
                    }
                    if p["targetPort"].is_null() {
                        p["targetPort"] = p["port"].clone();
                    }
                    if external && p["nodePort"].is_null() {
                        let kept = old_ports
                            .iter()
                            .find(|o| o["port"] == p["port"] && o["protocol"] == p["protocol"])
                            .and_then(|o| o["nodePort"].as_u64());
                        let np = match kept {
                            Some(n) => n as u16,
                            None => (30000..=32767)
                                .find(|n| !g.node_ports.contains(n))
                                .unwrap_or(30000),
                        };
                        g.node_ports.insert(np);
                        p["nodePort"] = json!(np);
                    } else if let Some(n) = p["nodePort"].as_u64() {
                        g.node_ports.insert(n as u16);
                    }
                }
            }
        }
        if obj["status"].is_null() {
            obj["status"] = json!({"loadBalancer": {}});
        }
        Ok(())
    }

    fn allocate_ip(&self, g: &mut Inner) -> Option<String> {
        let (base, len) = self.service_cidr;
        let base = u32::from(base);
        let size = 1u32.checked_shl(32 - u32::from(len)).unwrap_or(0);
        // .1 is the `kubernetes` Service's and .10 the cluster DNS's; start above them.
        (11..size.saturating_sub(1))
            .map(|i| Ipv4Addr::from(base + i))
            .find(|a| !g.service_ips.contains(a))
            .inspect(|a| {
                g.service_ips.insert(*a);
            })
            .map(|a| a.to_string())
    }
}

fn release_service(g: &mut Inner, old: &Value) {
    if let Some(a) = old["spec"]["clusterIP"]
        .as_str()
        .and_then(|s| s.parse().ok())
    {
        g.service_ips.remove(&a);
    }
    for p in old["spec"]["ports"].as_array().into_iter().flatten() {
        if let Some(n) = p["nodePort"].as_u64() {
            g.node_ports.remove(&(n as u16));
        }
    }
}

/// The object without the fields every write changes, to tell a no-op.
fn strip_meta(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v["metadata"].as_object_mut() {
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    v
}

/// Fills in or checks `kind` and `apiVersion`.
fn check_kind(r: &Resource, obj: &mut Value) -> Result<(), ApiError> {
    if !obj.is_object() {
        return Err(ApiError::bad_request("the body is not a JSON object"));
    }
    let av = r.api_version();
    match (obj["apiVersion"].as_str(), obj["kind"].as_str()) {
        (None, None) => {}
        (Some(a), Some(k)) if a == av && k == r.kind => {}
        (a, k) => {
            return Err(ApiError::bad_request(&format!(
                "the API version in the data ({}) does not match the expected API version ({av}) \
                 or the kind ({}) is not {}",
                a.unwrap_or(""),
                k.unwrap_or(""),
                r.kind
            )))
        }
    }
    obj["apiVersion"] = json!(av);
    obj["kind"] = json!(r.kind);
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    Ok(())
}

/// The object's namespace, checked against the path's (and filled in from it).
fn object_namespace(
    r: &Resource,
    path_ns: Option<&str>,
    obj: &mut Value,
) -> Result<Option<String>, ApiError> {
    if !r.namespaced {
        if let Some(o) = obj["metadata"].as_object_mut() {
            o.remove("namespace");
        }
        return Ok(None);
    }
    let body_ns = obj["metadata"]["namespace"].as_str().map(str::to_string);
    let ns =
        match (path_ns, body_ns) {
            (Some(p), Some(b)) if p != b => return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the \
                 request",
            )),
            (Some(p), _) => p.to_string(),
            (None, Some(b)) => b,
            (None, None) => "default".to_string(),
        };
    obj["metadata"]["namespace"] = json!(ns);
    Ok(Some(ns))
}

/// A DNS-1123 subdomain, as names of these kinds must be.
fn valid_name(name: &str) -> Result<(), String> {
    let ok = name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case \
             alphanumeric characters, '-' or '.', and must start and end with an alphanumeric \
             character"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::find;

    fn store() -> Store {
        Store::new(100, ("10.96.0.0".parse().unwrap(), 12))
    }

    #[test]
    fn one_counter_orders_every_kind() {
        let s = store();
        let svc = find("", "v1", "services").unwrap();
        let node = find("", "v1", "nodes").unwrap();
        let rv0 = s.rv();
        let a = s
            .create(
                svc,
                Some("default"),
                json!({"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}}),
            )
            .unwrap();
        let b = s
            .create(node, None, json!({"metadata": {"name": "n1"}}))
            .unwrap();
        assert_eq!(
            a["metadata"]["resourceVersion"],
            json!((rv0 + 1).to_string())
        );
        assert_eq!(
            b["metadata"]["resourceVersion"],
            json!((rv0 + 2).to_string())
        );
        assert_eq!(a["spec"]["clusterIP"], json!("10.96.0.11"));
        assert_eq!(a["spec"]["ports"][0]["targetPort"], json!(80));
        assert_eq!(a["spec"]["ports"][0]["protocol"], json!("TCP"));
        let again = s.create(node, None, json!({"metadata": {"name": "n1"}}));
        assert_eq!(again.unwrap_err().code, 409);
    }

    #[test]
    fn namespaced_objects_need_their_namespace() {
        let s = store();
        let svc = find("", "v1", "services").unwrap();
        let e = s
            .create(svc, Some("shop"), json!({"metadata": {"name": "web"}}))
            .unwrap_err();
        assert_eq!(e.code, 404);
        assert!(
            e.message.contains("namespaces \"shop\" not found"),
            "{}",
            e.message
        );
    }

    #[test]
    fn compaction_makes_old_versions_gone() {
        let s = store();
        let node = find("", "v1", "nodes").unwrap();
        let rv = s.rv();
        s.create(node, None, json!({"metadata": {"name": "n1"}}))
            .unwrap();
        assert_eq!(s.watch_from(node, Some(rv)).unwrap().0.len(), 1);
        s.compact();
        let e = s.watch_from(node, Some(rv + 1)).unwrap_err();
        assert_eq!(e.code, 410);
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }
}
