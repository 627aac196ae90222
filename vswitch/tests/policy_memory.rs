//! What a known pod costs the switch for NetworkPolicy, measured: 100,000 pods (as a large
//! cluster has, spread over 1,000 Deployments whose replicas share their labels) through the
//! same tables the datapath reads, with every allocation counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use vswitch::policy::selector::Interner;
use vswitch::policy::{Labels, NamedPort, PodMeta, PolicySet, PolicyTables, Proto};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as it is.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` came from `System.alloc` with this layout (above).
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const PODS: u32 = 100_000;
const DEPLOYMENTS: u32 = 1_000;

#[test]
fn a_known_pod_costs_under_200_bytes() {
    let before = LIVE.load(Ordering::Relaxed);
    let mut labels = Interner::default();
    let ports: Arc<[NamedPort]> = Arc::from(vec![NamedPort {
        name: "http".into(),
        proto: Proto::Tcp,
        port: 8080,
    }]);
    let namespaces: Vec<Arc<str>> = (0..50).map(|n| Arc::from(format!("team-{n}"))).collect();
    let pods = (0..PODS).map(|i| {
        let d = i % DEPLOYMENTS;
        let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        let meta = PodMeta {
            namespace: namespaces[(d % 50) as usize].clone(),
            name: format!("web-{d}-7d9f8c6b5-{i:05x}").into(),
            labels: labels.intern(Labels::new([
                ("app", format!("web-{d}")),
                ("pod-template-hash", "7d9f8c6b5".to_string()),
                ("tier", "front".to_string()),
            ])),
            ports: ports.clone(),
        };
        (ip, Arc::new(meta))
    });
    let tables = PolicyTables::new(Arc::new(PolicySet::default()), pods.collect::<Vec<_>>());
    let used = LIVE.load(Ordering::Relaxed) - before;
    assert_eq!(tables.pods(), PODS as usize);
    assert_eq!(labels.len(), DEPLOYMENTS as usize);
    let per_pod = used / PODS as usize;
    println!(
        "{PODS} pods in {DEPLOYMENTS} label sets: {:.1} MiB, {per_pod} bytes a pod (labels and names included)",
        used as f64 / (1 << 20) as f64
    );
    assert!(per_pod < 200, "{per_pod} bytes a pod");
    drop(tables);
    drop(labels);
}
