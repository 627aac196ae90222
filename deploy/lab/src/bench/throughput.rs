//! Throughput: iperf3 TCP (any number of streams, any congestion control) and 64-byte UDP
//! between pods, each against a one-shot server in the receiving pod.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use super::exec::{in_netns, run_bounded, Server};
use super::testbed::in_pod;
use super::{
    parse_iperf_tcp, parse_iperf_udp, parse_udp_rcvbuf_errors, PodRef, TcpResult, UdpResult, GRACE,
    IPERF_PORT,
};
use crate::LabError;

/// A one-shot iperf3 server on `to`, listening on its pod address.
pub(super) fn iperf_server(to: &PodRef) -> Result<Server, LabError> {
    let argv = format!(
        "iperf3 -s -1 -B {} -p {IPERF_PORT} --idle-timeout 30",
        to.ip
    );
    Server::start(to, &words(&argv), "iperf3", IPERF_PORT)
}

pub(super) fn words(s: &str) -> Vec<&str> {
    s.split_whitespace().collect()
}

/// TCP from `from` to `to`'s server, addressed as `target` (its pod IP or a ClusterIP).
pub(super) fn iperf_tcp(
    from: &PodRef,
    to: &PodRef,
    target: Ipv4Addr,
    streams: u32,
    t: Duration,
    cc: Option<&str>,
) -> Result<TcpResult, LabError> {
    let _server = iperf_server(to)?;
    let mut argv = format!(
        "iperf3 -c {target} -p {IPERF_PORT} -t {} -P {streams} -J --connect-timeout 3000",
        t.as_secs().max(1)
    );
    if let Some(cc) = cc {
        argv.push_str(&format!(" -C {cc}"));
    }
    let out = iperf_client(&mut in_pod(from, &words(&argv)), t + GRACE)?;
    parse_iperf_tcp(&out)
}

/// Runs an iperf3 client and returns its stdout. With -J iperf3 prints even its errors as JSON
/// on stdout (which the parsers report); stderr is added when there is no JSON at all.
pub(super) fn iperf_client(cmd: &mut Command, timeout: Duration) -> Result<String, LabError> {
    let f = run_bounded(cmd, timeout)?;
    if !f.status.success() && !f.stdout.trim_start().starts_with('{') {
        return Err(LabError::Measurement(format!(
            "iperf3 {}: {}",
            f.status,
            f.stderr.trim()
        )));
    }
    Ok(f.stdout)
}

/// What `pod`'s kernel dropped because a UDP socket's buffer was full, so far.
pub(super) fn udp_rcvbuf_errors(pod: &PodRef) -> Result<u64, LabError> {
    let f = run_bounded(
        &mut in_netns(&pod.netns, &["cat", "/proc/net/snmp"]),
        Duration::from_secs(5),
    )?;
    parse_udp_rcvbuf_errors(&f.stdout)
}

/// 64-byte UDP datagrams as fast as iperf3 can send them.
pub(super) fn iperf_udp64(from: &PodRef, to: &PodRef, t: Duration) -> Result<UdpResult, LabError> {
    let _server = iperf_server(to)?;
    let argv = format!(
        "iperf3 -u -b 0 -l 64 -c {} -p {IPERF_PORT} -t {} -J --connect-timeout 3000",
        to.ip,
        t.as_secs().max(1)
    );
    let out = iperf_client(&mut in_pod(from, &words(&argv)), t + GRACE)?;
    parse_iperf_udp(&out)
}
