//! Prometheus metrics, health and readiness over HTTP on a TCP address (for the DaemonSet's
//! probes and scrapers, which cannot reach a unix socket).
//!
//! The counters live in the datapath as relaxed atomics; a scrape reads a snapshot of them
//! through the same path as the admin API (`Daemon::ports`), so the two never disagree and
//! nothing is counted twice. The collector encodes the snapshot with prometheus-client's
//! const metrics.

use std::fmt;
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::k8s::K8sStatsHandle;
use super::Daemon;
use crate::datapath::CtGauge;

struct SwitchCollector(Arc<Daemon>);

impl fmt::Debug for SwitchCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SwitchCollector")
    }
}

type Labels = Vec<(&'static str, String)>;

fn counters<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl Iterator<Item = (Labels, u64)> + 'a,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> fmt::Result {
    let m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(v).encode(m)
}

/// One counter without labels.
fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    counters(enc, name, help, std::iter::once((Vec::new(), v)))
}

impl Collector for SwitchCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let d = &self.0;
        let ports = d.ports();
        encode_ports(&mut enc, &ports.ports)?;
        if let Some(u) = &ports.underlay {
            encode_underlay(&mut enc, u)?;
        }
        gauge(
            &mut enc,
            "vswitch_ports",
            "Pod ports attached.",
            ports.ports.len() as i64,
        )?;
        encode_node_warnings(&mut enc, &d.node_warnings())?;
        gauge(
            &mut enc,
            "vswitch_peers",
            "Peer nodes in the overlay.",
            d.peers().peers.len() as i64,
        )?;
        counters(
            &mut enc,
            "vswitch_worker_frames",
            "Frames and VXLAN datagrams read, by datapath worker.",
            d.worker_frames()
                .into_iter()
                .enumerate()
                .map(|(i, n)| (vec![("worker", i.to_string())], n)),
        )?;
        encode_conntrack(&mut enc, &d.ct_stats())?;
        if let Some(e) = d.egress_stats() {
            gauge(
                &mut enc,
                "vswitch_egress_connections",
                "Egress translation's flows open now (TCP, UDP, ICMP echo).",
                e.active() as i64,
            )?;
            counters(
                &mut enc,
                "vswitch_egress_events",
                "Egress translation: flows opened and refused, limits hit (limit_pod, \
                 limit_node), bytes each way, packets it could not use.",
                e.snapshot()
                    .into_iter()
                    .map(|(k, v)| (vec![("event", k.to_string())], v)),
            )?;
        }
        if let Some(k) = d.k8s_stats.get() {
            encode_k8s(&mut enc, k)?;
        }
        let (policies, problems) = d.policy_counts();
        gauge(
            &mut enc,
            "vswitch_policies",
            "NetworkPolicies in force.",
            policies as i64,
        )?;
        gauge(
            &mut enc,
            "vswitch_policy_problems",
            "NetworkPolicy inputs left out (refused policies, unreadable manifests); \
             `vswitchctl policies` lists them.",
            problems as i64,
        )?;
        gauge(
            &mut enc,
            "vswitch_table_version",
            "Version of the published forwarding tables.",
            d.table_version() as i64,
        )?;
        let (copied, dropped) = d.capture().totals();
        counter(
            &mut enc,
            "vswitch_capture_packets",
            "Packet copies queued for capture sessions.",
            copied,
        )?;
        counter(
            &mut enc,
            "vswitch_capture_drops",
            "Packet copies dropped because a capture session's queue was full.",
            dropped,
        )
    }
}

/// Each pod port's packet, byte and drop counters.
fn encode_ports(enc: &mut DescriptorEncoder, ports: &[conf::api::PortInfo]) -> fmt::Result {
    let port_labels = |p: &conf::api::PortInfo| -> Labels {
        vec![
            ("port", p.id.to_string()),
            ("pod", p.pod.clone().unwrap_or_default()),
            ("ifname", p.ifname.clone()),
        ]
    };
    type Pick = fn(&conf::api::PortCounters) -> u64;
    let per_port: [(&str, &str, Pick); 4] = [
        (
            "vswitch_port_rx_packets",
            "Frames received from the pod.",
            |c| c.rx_packets,
        ),
        (
            "vswitch_port_rx_bytes",
            "Bytes received from the pod.",
            |c| c.rx_bytes,
        ),
        ("vswitch_port_tx_packets", "Frames sent to the pod.", |c| {
            c.tx_packets
        }),
        ("vswitch_port_tx_bytes", "Bytes sent to the pod.", |c| {
            c.tx_bytes
        }),
    ];
    for (name, help, pick) in per_port {
        let rows = ports.iter().map(|p| (port_labels(p), pick(&p.counters)));
        counters(enc, name, help, rows)?;
    }
    counters(
        enc,
        "vswitch_port_drops",
        "Frames from the pod dropped, by reason.",
        ports.iter().flat_map(|p| {
            p.counters.drops.iter().map(move |(reason, n)| {
                let mut l = port_labels(p);
                l.push(("reason", reason.clone()));
                (l, *n)
            })
        }),
    )
}

/// The VXLAN socket's counters.
fn encode_underlay(enc: &mut DescriptorEncoder, u: &conf::api::PortCounters) -> fmt::Result {
    let rows: [(&str, &str, u64); 4] = [
        (
            "vswitch_underlay_rx_packets",
            "VXLAN datagrams received.",
            u.rx_packets,
        ),
        (
            "vswitch_underlay_rx_bytes",
            "VXLAN bytes received.",
            u.rx_bytes,
        ),
        (
            "vswitch_underlay_tx_packets",
            "VXLAN datagrams sent.",
            u.tx_packets,
        ),
        ("vswitch_underlay_tx_bytes", "VXLAN bytes sent.", u.tx_bytes),
    ];
    for (name, help, v) in rows {
        counter(enc, name, help, v)?;
    }
    counters(
        enc,
        "vswitch_underlay_drops",
        "VXLAN datagrams dropped, by reason.",
        u.drops
            .iter()
            .map(|(r, n)| (vec![("reason", r.clone())], *n)),
    )
}

/// How many node settings are wrong, and each of them.
fn encode_node_warnings(
    enc: &mut DescriptorEncoder,
    warnings: &[conf::sysctl::NodeWarning],
) -> fmt::Result {
    gauge(
        enc,
        "vswitch_node_warnings",
        "Node settings a path through the switch needs that are wrong now (vswitchctl \
         status names them and what they break).",
        warnings.len() as i64,
    )?;
    let mut m = enc.encode_descriptor(
        "vswitch_node_setting_wrong",
        "1 for each node setting that is wrong now, with its value and the one needed.",
        None,
        MetricType::Gauge,
    )?;
    for w in warnings {
        let labels: Labels = vec![
            ("setting", w.setting.clone()),
            ("value", w.value.clone()),
            ("want", w.want.clone()),
        ];
        ConstGauge::new(1i64).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn encode_conntrack(enc: &mut DescriptorEncoder, ct: &CtGauge) -> fmt::Result {
    use std::sync::atomic::Ordering::Relaxed;
    gauge(
        enc,
        "vswitch_conntrack_entries",
        "Connections tracked for Service translation.",
        ct.entries.load(Relaxed) as i64,
    )?;
    let rows: [(&str, &str, u64); 4] = [
        (
            "vswitch_conntrack_created",
            "Connections tracked.",
            ct.created.load(Relaxed),
        ),
        (
            "vswitch_conntrack_expired",
            "Connections expired.",
            ct.expired.load(Relaxed),
        ),
        (
            "vswitch_conntrack_evicted",
            "Connections evicted from a full table.",
            ct.evicted.load(Relaxed),
        ),
        (
            "vswitch_conntrack_flushed",
            "UDP connections flushed when their endpoint went.",
            ct.flushed.load(Relaxed),
        ),
    ];
    for (name, help, v) in rows {
        counter(enc, name, help, v)?;
    }
    Ok(())
}

fn encode_k8s(enc: &mut DescriptorEncoder, k: &K8sStatsHandle) -> fmt::Result {
    let k = k.get();
    let rows: [(&str, &str, u64); 3] = [
        (
            "vswitch_k8s_watch_errors",
            "Errors of the Kubernetes watches.",
            k.watch_errors,
        ),
        (
            "vswitch_k8s_relists",
            "Relists of the Kubernetes watches.",
            k.relists,
        ),
        (
            "vswitch_k8s_applies",
            "Tables applied from the Kubernetes API.",
            k.applies,
        ),
    ];
    for (name, help, v) in rows {
        counter(enc, name, help, v)?;
    }
    gauge(
        enc,
        "vswitch_k8s_unsupported",
        "Uses of Service features vswitch does not support (SCTP ports, \
         loadBalancerSourceRanges, IPv6 addresses), each logged once.",
        k.unsupported as i64,
    )
}

/// `/metrics`, `/healthz` and `/readyz`.
pub fn router(d: Arc<Daemon>) -> Router {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SwitchCollector(d.clone())));
    let registry = Arc::new(registry);
    let health = d.clone();
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    // Reading the ports' kernel counters is netlink I/O: off the runtime.
                    let encoded = tokio::task::spawn_blocking(move || {
                        let mut out = String::new();
                        prometheus_client::encoding::text::encode(&mut out, &registry).map(|()| out)
                    })
                    .await;
                    match encoded {
                        Ok(Ok(out)) => (
                            StatusCode::OK,
                            [(
                                header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            out,
                        )
                            .into_response(),
                        _ => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
                    }
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let d = health.clone();
                async move {
                    if d.datapath_alive() {
                        (StatusCode::OK, "ok\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "datapath worker stopped\n")
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let d = d.clone();
                async move {
                    // Wrong node settings break some paths, not the switch: ready, with the
                    // warnings in the detail (a probe reads only the code).
                    let status = d.status();
                    let (code, mut body) = if d.datapath_alive() && status.ready {
                        (StatusCode::OK, String::from("ready\n"))
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, String::from("not ready\n"))
                    };
                    for w in &status.warnings {
                        body.push_str(&format!("warning: {w}\n"));
                    }
                    (code, body)
                }
            }),
        )
}
