//! Label sets and label selectors (metav1.LabelSelector), as the API server validates and
//! evaluates them.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;

/// A pod's or namespace's labels, sorted by key. Pods with the same labels share one copy (see
/// [`super::Identities`]), which keeps a remote pod's cost to an address and a pointer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels(Box<[(Box<str>, Box<str>)]>);

impl Labels {
    pub fn new<K: AsRef<str>, V: AsRef<str>>(pairs: impl IntoIterator<Item = (K, V)>) -> Labels {
        let map: BTreeMap<Box<str>, Box<str>> = pairs
            .into_iter()
            .map(|(k, v)| (k.as_ref().into(), v.as_ref().into()))
            .collect();
        Labels(map.into_iter().collect())
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &*self.0[i].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The same labels with `key` set to `value` (a namespace's automatic
    /// `kubernetes.io/metadata.name`).
    pub fn with(&self, key: &str, value: &str) -> Labels {
        Labels::new(
            self.iter()
                .filter(|(k, _)| *k != key)
                .chain(std::iter::once((key, value))),
        )
    }

    /// Bytes this label set holds on the heap (for the memory estimate per pod).
    pub fn heap_bytes(&self) -> usize {
        self.0.len() * std::mem::size_of::<(Box<str>, Box<str>)>()
            + self.0.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
    }
}

impl std::fmt::Display for Labels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (k, v)) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

/// One `matchExpressions` requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    In(Box<str>, Box<[Box<str>]>),
    NotIn(Box<str>, Box<[Box<str>]>),
    Exists(Box<str>),
    DoesNotExist(Box<str>),
}

impl Requirement {
    fn matches(&self, labels: &Labels) -> bool {
        match self {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.iter().any(|x| **x == *v)),
            // NotIn also matches a missing key, as in apimachinery's labels.Selector.
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| vs.iter().all(|x| **x != *v)),
            Requirement::Exists(k) => labels.get(k).is_some(),
            Requirement::DoesNotExist(k) => labels.get(k).is_none(),
        }
    }
}

/// A compiled label selector: every `matchLabels` pair and every requirement must hold; the
/// empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    labels: Box<[(Box<str>, Box<str>)]>,
    reqs: Box<[Requirement]>,
}

impl Selector {
    /// The selector that matches everything (`{}`).
    pub fn everything() -> Selector {
        Selector::default()
    }

    pub fn is_everything(&self) -> bool {
        self.labels.is_empty() && self.reqs.is_empty()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(&**v))
            && self.reqs.iter().all(|r| r.matches(labels))
    }

    /// Compiles `sel`, validated as the API server does; `field` names it in the error.
    pub fn from_k8s(sel: &meta::LabelSelector, field: &str) -> Result<Selector, String> {
        let mut labels = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            check_key(k).map_err(|e| format!("{field}.matchLabels: {e}"))?;
            check_value(v).map_err(|e| format!("{field}.matchLabels[{k}]: {e}"))?;
            labels.push((k.as_str().into(), v.as_str().into()));
        }
        let mut reqs = Vec::new();
        for (i, r) in sel.match_expressions.iter().flatten().enumerate() {
            let at = format!("{field}.matchExpressions[{i}]");
            check_key(&r.key).map_err(|e| format!("{at}.key: {e}"))?;
            let values = r.values.as_deref().unwrap_or_default();
            let key: Box<str> = r.key.as_str().into();
            let set = || -> Result<Box<[Box<str>]>, String> {
                if values.is_empty() {
                    return Err(format!(
                        "{at}.values: must be specified when `operator` is 'In' or 'NotIn'"
                    ));
                }
                for v in values {
                    check_value(v).map_err(|e| format!("{at}.values: {e}"))?;
                }
                Ok(values.iter().map(|v| v.as_str().into()).collect())
            };
            let none = || {
                if values.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "{at}.values: may not be specified when `operator` is 'Exists' or 'DoesNotExist'"
                    ))
                }
            };
            reqs.push(match r.operator.as_str() {
                "In" => Requirement::In(key, set()?),
                "NotIn" => Requirement::NotIn(key, set()?),
                "Exists" => none().map(|_| Requirement::Exists(key))?,
                "DoesNotExist" => none().map(|_| Requirement::DoesNotExist(key))?,
                other => {
                    return Err(format!(
                        "{at}.operator: {other:?} is not a valid selector operator (In, NotIn, Exists, DoesNotExist)"
                    ))
                }
            });
        }
        Ok(Selector {
            labels: labels.into(),
            reqs: reqs.into(),
        })
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_everything() {
            return f.write_str("{}");
        }
        let mut parts: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in self.reqs.iter() {
            parts.push(match r {
                Requirement::In(k, vs) => format!("{k} in ({})", vs.join(",")),
                Requirement::NotIn(k, vs) => format!("{k} notin ({})", vs.join(",")),
                Requirement::Exists(k) => k.to_string(),
                Requirement::DoesNotExist(k) => format!("!{k}"),
            });
        }
        f.write_str(&parts.join(","))
    }
}

/// A qualified label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// characters of alphanumerics, `-`, `_` and `.`, starting and ending alphanumeric.
fn check_key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        let ok = !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !ok {
            return Err(format!(
                "{k:?}: prefix part must be a lowercase DNS subdomain"
            ));
        }
    }
    if name.is_empty() || name.len() > 63 || !label_chars(name) {
        return Err(format!(
            "{k:?}: name part must be 1 to 63 characters of alphanumerics, '-', '_' or '.', starting and ending alphanumeric"
        ));
    }
    Ok(())
}

/// A label value: empty, or at most 63 characters shaped as a key's name part.
fn check_value(v: &str) -> Result<(), String> {
    if v.is_empty() || (v.len() <= 63 && label_chars(v)) {
        Ok(())
    } else {
        Err(format!(
            "{v:?}: a label value must be at most 63 characters of alphanumerics, '-', '_' or '.', starting and ending alphanumeric"
        ))
    }
}

fn label_chars(s: &str) -> bool {
    let b = s.as_bytes();
    b.iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

/// Label sets shared between pods: each distinct set is stored once.
#[derive(Debug, Default)]
pub struct Interner(hashbrown::HashSet<Arc<Labels>, foldhash::fast::RandomState>);

impl Interner {
    pub fn intern(&mut self, labels: Labels) -> Arc<Labels> {
        if let Some(l) = self.0.get(&labels) {
            return l.clone();
        }
        let l = Arc::new(labels);
        self.0.insert(l.clone());
        l
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Forgets the label sets no one else holds any more.
    pub fn prune(&mut self) {
        self.0.retain(|l| Arc::strong_count(l) > 1);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(json: &str) -> Result<Selector, String> {
        let s: meta::LabelSelector = serde_json::from_str(json).unwrap();
        Selector::from_k8s(&s, "spec.podSelector")
    }

    #[test]
    fn labels_are_sorted_and_looked_up() {
        let l = Labels::new([("b", "2"), ("a", "1")]);
        assert_eq!(l.get("a"), Some("1"));
        assert_eq!(l.get("b"), Some("2"));
        assert_eq!(l.get("c"), None);
        assert_eq!(l.to_string(), "a=1,b=2");
        assert_eq!(l.with("a", "9").to_string(), "a=9,b=2");
    }

    #[test]
    fn the_empty_selector_matches_everything() {
        let s = sel("{}").unwrap();
        assert!(s.is_everything());
        assert!(s.matches(&Labels::default()));
        assert!(s.matches(&Labels::new([("pod", "a")])));
    }

    #[test]
    fn match_labels_and_expressions_all_hold() {
        let s = sel(r#"{"matchLabels":{"app":"web"},"matchExpressions":[
                {"key":"tier","operator":"In","values":["front","edge"]},
                {"key":"canary","operator":"DoesNotExist"},
                {"key":"zone","operator":"NotIn","values":["b"]},
                {"key":"team","operator":"Exists"}]}"#)
        .unwrap();
        let ok = Labels::new([("app", "web"), ("tier", "edge"), ("team", "x")]);
        assert!(s.matches(&ok));
        assert!(s.matches(&ok.with("zone", "a")));
        assert!(!s.matches(&ok.with("zone", "b")));
        assert!(!s.matches(&ok.with("canary", "")));
        assert!(!s.matches(&ok.with("tier", "back")));
        assert!(!s.matches(&ok.with("app", "db")));
        assert!(!s.matches(&Labels::new([("app", "web"), ("tier", "edge")])));
        assert_eq!(
            s.to_string(),
            "app=web,tier in (front,edge),!canary,zone notin (b),team"
        );
    }

    #[test]
    fn invalid_selectors_name_the_field() {
        let e = sel(r#"{"matchExpressions":[{"key":"a","operator":"In"}]}"#).unwrap_err();
        assert!(
            e.starts_with("spec.podSelector.matchExpressions[0].values"),
            "{e}"
        );
        let e = sel(r#"{"matchExpressions":[{"key":"a","operator":"Exists","values":["x"]}]}"#)
            .unwrap_err();
        assert!(e.contains("may not be specified"), "{e}");
        let e = sel(r#"{"matchExpressions":[{"key":"a","operator":"Gt","values":["1"]}]}"#)
            .unwrap_err();
        assert!(e.contains("operator"), "{e}");
        let e = sel(r#"{"matchLabels":{"-bad":"x"}}"#).unwrap_err();
        assert!(e.contains("matchLabels"), "{e}");
        let e = sel(r#"{"matchLabels":{"ok":"bad value"}}"#).unwrap_err();
        assert!(e.contains("label value"), "{e}");
        assert!(sel(r#"{"matchLabels":{"kubernetes.io/metadata.name":"x","a_b.c":""}}"#).is_ok());
    }

    #[test]
    fn interned_label_sets_are_shared() {
        let mut i = Interner::default();
        let a = i.intern(Labels::new([("app", "web")]));
        let b = i.intern(Labels::new([("app", "web")]));
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(i.len(), 1);
    }
}
