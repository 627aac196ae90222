//! JSON merge patch (RFC 7386) and the part of strategic merge patch kubectl sends.
//!
//! Strategic merge patch needs each list's merge key, which the real server takes from the Go
//! types. The stand-in has no schemas; it reads the key from the patch itself: kubectl's
//! three-way patches carry a `$setElementOrder/<list>` directive for every list with a merge
//! key it touches, whose elements hold just that key (`[{"port": 80}]`). Such a list is merged
//! by key (elements with `"$patch": "delete"` removed, the rest merged, order as the directive
//! says); a list without the directive is replaced, which is what the server does for atomic
//! lists (EndpointSlice endpoints, NetworkPolicy rules). `$deleteFromPrimitiveList/<list>` and
//! `$retainKeys` are honoured; other directives are dropped rather than stored.

use serde_json::{Map, Value};

/// Applies an RFC 7386 merge patch to `target`.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else { return };
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Applies a strategic merge patch to `target` (see the module's note for what is supported).
pub fn strategic(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut p = p.clone();
        p.remove("$patch");
        *target = strip_directives(&Value::Object(p));
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else { return };
    if let Some(Value::Array(keep)) = p.get("$retainKeys") {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        t.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (k, v) in p {
        if let Some(list) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(have)), Value::Array(gone)) = (t.get_mut(list), v) {
                have.retain(|x| !gone.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        let order = p.get(&format!("$setElementOrder/{k}"));
        match (v, order) {
            (Value::Array(items), Some(Value::Array(order))) => {
                let cur = t.entry(k.clone()).or_insert(Value::Array(Vec::new()));
                merge_list(cur, items, order);
            }
            (Value::Object(_), _) => strategic(t.entry(k.clone()).or_insert(Value::Null), v),
            _ => {
                t.insert(k.clone(), strip_directives(v));
            }
        }
    }
    // A list whose only change is its order comes as a bare directive.
    for (k, order) in p {
        if let (Some(list), Value::Array(order)) = (k.strip_prefix("$setElementOrder/"), order) {
            if !p.contains_key(list) {
                if let Some(cur) = t.get_mut(list) {
                    merge_list(cur, &[], order);
                }
            }
        }
    }
}

/// The key every element of a `$setElementOrder` list names (None for primitive lists).
fn merge_key(order: &[Value]) -> Option<String> {
    let first = order.first()?.as_object()?;
    first.keys().next().cloned()
}

fn merge_list(cur: &mut Value, items: &[Value], order: &[Value]) {
    if !cur.is_array() {
        *cur = Value::Array(Vec::new());
    }
    let Value::Array(have) = cur else { return };
    let Some(key) = merge_key(order) else {
        // A primitive list with merge strategy: a set union in the directive's order.
        let mut out: Vec<Value> = order.to_vec();
        for v in have.iter().chain(items) {
            if !out.contains(v) {
                out.push(v.clone());
            }
        }
        *have = out;
        return;
    };
    for item in items {
        let id = &item[&key];
        let pos = have.iter().position(|h| &h[&key] == id);
        if item.get("$patch").and_then(Value::as_str) == Some("delete") {
            if let Some(i) = pos {
                have.remove(i);
            }
            continue;
        }
        match pos {
            Some(i) => strategic(&mut have[i], item),
            None => have.push(strip_directives(item)),
        }
    }
    // Order as the directive says; elements it does not name (the server's own) keep their
    // place after those it does.
    let mut ordered = Vec::with_capacity(have.len());
    for o in order {
        if let Some(i) = have.iter().position(|h| h[&key] == o[&key]) {
            ordered.push(have.remove(i));
        }
    }
    ordered.append(have);
    *have = ordered;
}

/// A copy of `v` without `$` directives (what is stored for a new element).
fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge(&mut t, &json!({"a": "z", "c": {"f": null}, "l": [3]}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}, "l": [3]}));
    }

    #[test]
    fn strategic_lists_merge_by_the_directives_key() {
        let mut svc = json!({"spec": {"ports": [
            {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
            {"name": "dns", "port": 53, "protocol": "UDP"}
        ], "selector": {"app": "web"}}});
        // What kubectl apply sends when port 80's target changes and port 53 is removed.
        let patch = json!({"spec": {
            "$setElementOrder/ports": [{"port": 80}, {"port": 443}],
            "ports": [{"port": 80, "targetPort": 9090}, {"port": 443, "name": "https"},
                      {"$patch": "delete", "port": 53}]
        }});
        strategic(&mut svc, &patch);
        assert_eq!(
            svc["spec"]["ports"],
            json!([
                {"name": "http", "port": 80, "targetPort": 9090, "protocol": "TCP"},
                {"port": 443, "name": "https"}
            ])
        );
        assert_eq!(svc["spec"]["selector"], json!({"app": "web"}));
    }

    #[test]
    fn lists_without_a_directive_are_replaced() {
        let mut s = json!({"endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2"]}],
                           "metadata": {"labels": {"a": "1", "b": "2"}}});
        strategic(
            &mut s,
            &json!({"endpoints": [{"addresses": ["10.0.0.3"]}], "metadata": {"labels": {"a": null}},
                    "$deleteFromPrimitiveList/x": ["y"]}),
        );
        assert_eq!(
            s,
            json!({"endpoints": [{"addresses": ["10.0.0.3"]}], "metadata": {"labels": {"b": "2"}}})
        );
    }
}
