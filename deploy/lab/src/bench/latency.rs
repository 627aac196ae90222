//! Latency: ping's average RTT and the 1-byte TCP request/response rate between pods.

use std::net::SocketAddr;
use std::time::Duration;

use super::exec::{run_bounded, run_ok, Server};
use super::testbed::in_pod;
use super::{parse_ping_avg, Durations, PodRef, RrResult, CRR_PORT, GRACE, RR_PORT};
use crate::LabError;

pub(super) fn ping_rtt(from: &PodRef, to: &PodRef, d: &Durations) -> Result<f64, LabError> {
    let c = d.ping_count.to_string();
    let i = format!("{:.3}", d.ping_interval.as_secs_f64());
    let ip = to.ip.to_string();
    let budget = d.ping_interval * d.ping_count + Duration::from_secs(5) + Duration::from_secs(1);
    let f = run_bounded(
        &mut in_pod(from, &["ping", "-c", &c, "-i", &i, "-W", "1", "-q", &ip]),
        budget,
    )?;
    parse_ping_avg(&f.stdout)
}

pub(super) fn tcp_rr(from: &PodRef, to: &PodRef, d: Duration) -> Result<RrResult, LabError> {
    request_response(from, to, d, false)
}

/// New TCP connections per second (a connection per 1-byte transaction, TCP_CRR).
pub(super) fn tcp_crr(from: &PodRef, to: &PodRef, d: Duration) -> Result<RrResult, LabError> {
    request_response(from, to, d, true)
}

fn request_response(
    from: &PodRef,
    to: &PodRef,
    d: Duration,
    each: bool,
) -> Result<RrResult, LabError> {
    let exe = std::env::current_exe().map_err(|e| LabError::io("/proc/self/exe", e))?;
    let exe_s = exe.to_string_lossy().into_owned();
    let program = exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let port = if each { CRR_PORT } else { RR_PORT };
    let bind = SocketAddr::from((to.ip, port)).to_string();
    let mut server = vec![exe_s.as_str(), "rr-server", "--bind", &bind, "--timeout"];
    // The per-connection server stops once idle this long; the one-connection server waits
    // this long for its client.
    let timeout = if each {
        "2".to_string()
    } else {
        (d + GRACE).as_secs().to_string()
    };
    server.push(&timeout);
    let secs = format!("{:.3}", d.as_secs_f64());
    let mut client = vec![
        exe_s.as_str(),
        "rr-client",
        "--connect",
        &bind,
        "--duration",
        &secs,
    ];
    if each {
        server.push("--each");
        client.push("--each");
    }
    let _server = Server::start(to, &server, &program, port)?;
    let out = run_ok(&mut in_pod(from, &client), d + GRACE)?;
    RrResult::from_json(&out)
}
