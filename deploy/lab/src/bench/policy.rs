//! NetworkPolicy in the bench: `n` policies that all select the bench's pods, written into the
//! lab's manifest directory as one List (what a ConfigMap of policies would hold), and a wait
//! until every node has them in force.
//!
//! Every policy selects every pod of the bench's namespace (`podSelector: {}`) for ingress and
//! egress, so each new connection is judged against all of them on both ends. Only the last by
//! name (`bench-zz-allow`) admits the bench's ports; the others each admit a port and a peer
//! label nothing uses, so the judge cannot stop early on them.

use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::testbed::{Bed, Testbed};
use super::{CRR_PORT, IPERF_PORT, RR_PORT};
use crate::{Lab, LabError};

/// The file the bench's policies live in, in the lab's manifest directory.
const FILE: &str = "bench-policies.json";

impl Testbed {
    /// Puts `n` policies in force on every node (0: none), replacing the bench's earlier ones,
    /// and waits until each node's vswitchd reports exactly those.
    pub(super) fn set_policies(&self, n: usize) -> Result<(), LabError> {
        let lab = match &self.bed {
            Some(Bed::Vswitch(lab)) => lab,
            Some(Bed::Script { .. }) => {
                return Err(LabError::Measurement(
                    "the anchor topology enforces no NetworkPolicy".into(),
                ))
            }
            None => return Err(LabError::Measurement("the testbed is down".into())),
        };
        let dir = lab.policy_dir();
        std::fs::create_dir_all(&dir).map_err(|e| LabError::io(&dir, e))?;
        let path = dir.join(FILE);
        if n == 0 {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(LabError::io(&path, e))
                }
                _ => {}
            }
        } else {
            let text = serde_json::to_string(&policy_list(n)).unwrap_or_default();
            crate::files::write_atomic(&path, text.as_bytes())?;
        }
        wait_in_force(lab, n)
    }
}

/// `n` policies as a `List`, the admitting one last by name.
fn policy_list(n: usize) -> Value {
    let ports = json!([
        { "protocol": "TCP", "port": IPERF_PORT },
        { "protocol": "TCP", "port": RR_PORT },
        { "protocol": "TCP", "port": CRR_PORT },
    ]);
    let mut items: Vec<Value> = (1..n)
        .map(|i| {
            let peer =
                json!([{ "podSelector": { "matchLabels": { "bench-peer": format!("p{i}") } } }]);
            let port = json!([{ "protocol": "TCP", "port": 10_000 + i }]);
            policy(
                &format!("bench-{i:04}"),
                json!([{ "from": peer, "ports": port }]),
                json!([{ "to": peer, "ports": port }]),
            )
        })
        .collect();
    let anyone = json!([{ "podSelector": {} }]);
    items.push(policy(
        "bench-zz-allow",
        json!([{ "from": anyone, "ports": ports }]),
        json!([{ "to": anyone, "ports": ports }]),
    ));
    json!({ "apiVersion": "v1", "kind": "List", "items": items })
}

fn policy(name: &str, ingress: Value, egress: Value) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": { "name": name, "namespace": "default" },
        "spec": {
            "podSelector": {},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress,
            "egress": egress,
        }
    })
}

/// Waits until every node of `lab` has exactly `n` policies in force and no problem.
fn wait_in_force(lab: &Lab, n: usize) -> Result<(), LabError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in &lab.nodes {
        loop {
            let got: Result<conf::api::PoliciesResponse, _> = node
                .client()
                .with_timeout(Duration::from_secs(5))
                .get(conf::api::PATH_POLICIES);
            let seen = match &got {
                Ok(r) if r.problems.is_empty() && r.policies.len() == n => break,
                Ok(r) => format!("{} policies, problems {:?}", r.policies.len(), r.problems),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(LabError::Measurement(format!(
                    "{}: {n} policies not in force after 30 s: {seen}",
                    node.name
                )));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bench_policies_are_valid_and_only_the_last_admits_the_bench_ports() {
        let list = policy_list(100);
        let items = list["items"].as_array().unwrap();
        assert_eq!(items.len(), 100);
        let text = serde_json::to_string(&list).unwrap();
        let mut objects = vswitch::policy::manifests::Objects::default();
        objects.add_text(&text, "bench-policies.json");
        assert!(objects.problems.is_empty(), "{:?}", objects.problems);
        assert_eq!(objects.policies.len(), 100);
        let names: Vec<&str> = items
            .iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap())
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(sorted.last(), Some(&"bench-zz-allow"));
        assert_eq!(policy_list(1)["items"].as_array().unwrap().len(), 1);
    }
}
