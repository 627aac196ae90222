//! Label and field selectors, as the API server parses them from `labelSelector` and
//! `fieldSelector`.
//!
//! Both are comma-separated requirements that must all hold. Labels take `k=v`, `k==v`, `k!=v`,
//! `k`, `!k`, `k in (a,b)` and `k notin (a,b)`; fields take `=`, `==` and `!=` on a dotted path
//! of the object, where a missing field reads as the empty string (what the server's field sets
//! hold for an unset field) and booleans as `true`/`false`.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Eq(String),
    Ne(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Requirement {
    key: String,
    op: Op,
}

impl Requirement {
    fn holds(&self, value: Option<&str>) -> bool {
        match &self.op {
            Op::Eq(v) => value == Some(v.as_str()),
            Op::Ne(v) => value != Some(v.as_str()),
            Op::In(vs) => value.is_some_and(|x| vs.iter().any(|v| v == x)),
            Op::NotIn(vs) => !value.is_some_and(|x| vs.iter().any(|v| v == x)),
            Op::Exists => value.is_some(),
            Op::NotExists => value.is_none(),
        }
    }
}

/// A parsed label selector; the empty selector selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

/// A parsed field selector; the empty selector selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<Requirement>);

/// Splits at commas outside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

fn set_values(s: &str) -> Option<Vec<String>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(
        inner
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect(),
    )
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<LabelSelector, String> {
        let mut reqs = Vec::new();
        for part in split_top(s) {
            let req = if let Some(k) = part.strip_prefix('!') {
                Requirement {
                    key: k.trim().into(),
                    op: Op::NotExists,
                }
            } else if let Some((k, v)) = part.split_once("!=") {
                Requirement {
                    key: k.trim().into(),
                    op: Op::Ne(v.trim().into()),
                }
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement {
                    key: k.trim().into(),
                    op: Op::Eq(v.trim().into()),
                }
            } else if let Some((k, v)) = part.split_once(" notin ") {
                let vs = set_values(v).ok_or_else(|| format!("{part:?}: expected (a,b)"))?;
                Requirement {
                    key: k.trim().into(),
                    op: Op::NotIn(vs),
                }
            } else if let Some((k, v)) = part.split_once(" in ") {
                let vs = set_values(v).ok_or_else(|| format!("{part:?}: expected (a,b)"))?;
                Requirement {
                    key: k.trim().into(),
                    op: Op::In(vs),
                }
            } else {
                Requirement {
                    key: part.into(),
                    op: Op::Exists,
                }
            };
            if !valid_key(&req.key) {
                return Err(format!("unable to parse requirement: {part:?}"));
            }
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        self.0.iter().all(|r| r.holds(labels[&r.key].as_str()))
    }
}

impl FieldSelector {
    /// Parses `s`, accepting only `allowed` fields besides metadata.name and
    /// metadata.namespace (the server's answer to others: `field label not supported`).
    pub fn parse(s: &str, allowed: &[&str]) -> Result<FieldSelector, String> {
        let mut reqs = Vec::new();
        for part in split_top(s) {
            let (key, op) = if let Some((k, v)) = part.split_once("!=") {
                (k, Op::Ne(v.trim().into()))
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (k, Op::Eq(v.trim().into()))
            } else {
                return Err(format!(
                    "invalid selector: '{s}'; can't understand '{part}'"
                ));
            };
            let key = key.trim();
            if !matches!(key, "metadata.name" | "metadata.namespace") && !allowed.contains(&key) {
                return Err(format!("field label not supported: {key}"));
            }
            reqs.push(Requirement {
                key: key.into(),
                op,
            });
        }
        Ok(FieldSelector(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|r| {
            let v = field(obj, &r.key);
            r.holds(Some(&v))
        })
    }
}

/// The value of a dotted field path as the server's field set has it.
fn field(obj: &Value, path: &str) -> String {
    let mut v = obj;
    for part in path.split('.') {
        v = &v[part];
    }
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Null => match path {
            "spec.hostNetwork" | "spec.unschedulable" => "false".into(),
            _ => String::new(),
        },
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn labels() {
        let o = json!({"metadata": {"labels": {"app": "web", "tier": "fe"}}});
        let ok = |s: &str| LabelSelector::parse(s).unwrap().matches(&o);
        assert!(ok(""));
        assert!(ok("app=web"));
        assert!(ok("app==web,tier"));
        assert!(!ok("app!=web"));
        assert!(ok("app in (web, api),!canary"));
        assert!(!ok("app notin (web)"));
        assert!(ok("canary notin (true)"));
        assert!(!ok("canary"));
        assert!(LabelSelector::parse("a b").is_err());
    }

    #[test]
    fn fields() {
        let pod = json!({"metadata": {"name": "p"}, "status": {"phase": "Running"}});
        let allowed = &["status.phase", "spec.hostNetwork"];
        let ok = |s: &str| FieldSelector::parse(s, allowed).unwrap().matches(&pod);
        assert!(ok("status.phase!=Succeeded,status.phase!=Failed"));
        assert!(!ok("status.phase=Failed"));
        assert!(ok("metadata.name=p,spec.hostNetwork=false"));
        assert_eq!(
            FieldSelector::parse("spec.x=1", allowed).unwrap_err(),
            "field label not supported: spec.x"
        );
    }
}
