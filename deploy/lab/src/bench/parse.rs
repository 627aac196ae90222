//! Parsers of what the measuring tools print, and the arithmetic of the report (no root needed).

use serde_json::Value;

use crate::LabError;

/// A TCP test as iperf3's receiver saw it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TcpResult {
    pub bits_per_second: f64,
    pub bytes: u64,
    pub seconds: f64,
}

/// A UDP test: what the client sent and what the server reported lost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UdpResult {
    pub packets: u64,
    pub lost: u64,
    pub seconds: f64,
}

impl UdpResult {
    /// Packets per second the client sent (handed to its socket).
    pub fn sent_pps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.packets as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// Packets per second that arrived.
    pub fn delivered_pps(&self) -> f64 {
        if self.seconds > 0.0 {
            self.packets.saturating_sub(self.lost) as f64 / self.seconds
        } else {
            0.0
        }
    }

    pub fn loss_percent(&self) -> f64 {
        if self.packets > 0 {
            100.0 * self.lost as f64 / self.packets as f64
        } else {
            100.0
        }
    }
}

pub(super) fn iperf_doc(text: &str) -> Result<Value, LabError> {
    let v: Value = serde_json::from_str(text).map_err(|e| {
        let head: String = text.trim().chars().take(200).collect();
        LabError::BadOutput(format!("iperf3 printed no JSON ({e}): {head:?}"))
    })?;
    if let Some(err) = v.get("error").and_then(Value::as_str) {
        return Err(LabError::BadOutput(format!("iperf3: {err}")));
    }
    Ok(v)
}

pub(super) fn num(v: &Value, what: &str) -> Result<f64, LabError> {
    v.as_f64()
        .ok_or_else(|| LabError::BadOutput(format!("iperf3 JSON has no number at {what}")))
}

/// Parses `iperf3 -c ... -J` of a TCP test (any `-P`): the receiver's sum.
pub fn parse_iperf_tcp(text: &str) -> Result<TcpResult, LabError> {
    let v = iperf_doc(text)?;
    let s = &v["end"]["sum_received"];
    Ok(TcpResult {
        bits_per_second: num(&s["bits_per_second"], "end.sum_received.bits_per_second")?,
        bytes: num(&s["bytes"], "end.sum_received.bytes")? as u64,
        seconds: num(&s["seconds"], "end.sum_received.seconds")?,
    })
}

/// Parses `iperf3 -u -c ... -J`: packets sent and lost (the server's count) from `end.sum`.
pub fn parse_iperf_udp(text: &str) -> Result<UdpResult, LabError> {
    let v = iperf_doc(text)?;
    let s = &v["end"]["sum"];
    Ok(UdpResult {
        packets: num(&s["packets"], "end.sum.packets")? as u64,
        lost: num(&s["lost_packets"], "end.sum.lost_packets")?.max(0.0) as u64,
        seconds: num(&s["seconds"], "end.sum.seconds")?,
    })
}

/// The `Udp: RcvbufErrors` counter from a `/proc/net/snmp`: datagrams the kernel dropped
/// because the receiving socket's buffer was full.
pub fn parse_udp_rcvbuf_errors(snmp: &str) -> Result<u64, LabError> {
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return Err(LabError::BadOutput(
            "/proc/net/snmp has no Udp lines".into(),
        ));
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .ok_or_else(|| {
            LabError::BadOutput(format!(
                "/proc/net/snmp has no Udp RcvbufErrors: {values:?}"
            ))
        })
}

/// The average RTT in ms from ping's summary, or why there is none.
pub fn parse_ping_avg(text: &str) -> Result<f64, LabError> {
    let received = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| {
            l.split(',')
                .find(|p| p.contains("received"))?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        });
    if received == Some(0) {
        return Err(LabError::BadOutput("ping: no replies".into()));
    }
    let line = text
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .ok_or_else(|| {
            LabError::BadOutput(format!("ping printed no RTT summary: {:?}", text.trim()))
        })?;
    let values = line
        .split('=')
        .nth(1)
        .ok_or_else(|| LabError::BadOutput(format!("unexpected ping summary {line:?}")))?;
    values
        .trim()
        .split('/')
        .nth(1)
        .and_then(|a| a.trim().parse::<f64>().ok())
        .ok_or_else(|| LabError::BadOutput(format!("unexpected ping summary {line:?}")))
}

/// Whether a /proc/PID/net/tcp{,6} table has a socket listening on `port`.
pub fn tcp_table_listens(table: &str, port: u16) -> bool {
    let want = format!("{port:04X}");
    table.lines().skip(1).any(|l| {
        let mut f = l.split_whitespace();
        let local = f.nth(1).unwrap_or("");
        let state = f.nth(1).unwrap_or("");
        state == "0A" && local.rsplit_once(':').is_some_and(|(_, p)| p == want)
    })
}

/// The median (mean of the middle two for an even count); None when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time.
pub fn utc_timestamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const IPERF_TCP: &str = r#"{
        "start": {"connected": []},
        "intervals": [],
        "end": {
            "streams": [],
            "sum_sent": {"start": 0, "end": 2.0, "seconds": 2.0, "bytes": 540000000,
                         "bits_per_second": 2160000000.0, "retransmits": 3, "sender": true},
            "sum_received": {"start": 0, "end": 2.011616, "seconds": 2.011616,
                             "bytes": 536204278, "bits_per_second": 2132431947.25037,
                             "sender": true},
            "cpu_utilization_percent": {}
        }
    }"#;

    const IPERF_UDP: &str = r#"{
        "start": {}, "intervals": [],
        "end": {
            "streams": [],
            "sum": {"start": 0, "end": 2.004994, "seconds": 2.004994, "bytes": 73169920,
                    "bits_per_second": 292302901.55988926, "jitter_ms": 0.0017,
                    "lost_packets": 982200, "packets": 1143280,
                    "lost_percent": 85.9107130361766, "sender": true},
            "sum_sent": {}, "sum_received": {}
        }
    }"#;

    #[test]
    fn iperf_tcp_json_gives_the_receivers_rate_and_bytes() {
        let t = parse_iperf_tcp(IPERF_TCP).unwrap();
        assert!((t.bits_per_second - 2.132_431_947e9).abs() < 1.0);
        assert_eq!(t.bytes, 536_204_278);
        assert!((t.seconds - 2.011_616).abs() < 1e-9);
    }

    #[test]
    fn iperf_udp_json_gives_delivered_packets_and_loss() {
        let u = parse_iperf_udp(IPERF_UDP).unwrap();
        assert_eq!((u.packets, u.lost), (1_143_280, 982_200));
        assert!((u.delivered_pps() - 161_080.0 / 2.004_994).abs() < 1e-6);
        assert!((u.loss_percent() - 85.910_713).abs() < 1e-4);
        assert!((u.sent_pps() - 1_143_280.0 / 2.004_994).abs() < 1e-6);
    }

    #[test]
    fn snmp_gives_the_udp_receive_buffer_drops() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
            Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors\n\
            Udp: 640897 0 1354026 12 1354026 0 0 0 0\n\
            UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors\n\
            UdpLite: 0 0 0 0 7 0 0 0 0\n";
        assert_eq!(parse_udp_rcvbuf_errors(snmp).unwrap(), 1_354_026);
        let e = parse_udp_rcvbuf_errors("Ip: Forwarding\nIp: 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no Udp"), "{e}");
        let e = parse_udp_rcvbuf_errors("Udp: InDatagrams\nUdp: 5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("RcvbufErrors"), "{e}");
    }

    #[test]
    fn iperf_errors_are_reported_not_parsed() {
        let e = parse_iperf_tcp(r#"{"start":{}, "intervals":[], "end":{}, "error":"unable to connect to server: Connection refused"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Connection refused"), "{e}");
        let e = parse_iperf_tcp("iperf3: error - unable to connect")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no JSON") && e.contains("unable to connect"),
            "{e}"
        );
        let e = parse_iperf_udp(r#"{"end":{"sum":{"packets":1}}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("lost_packets"), "{e}");
    }

    #[test]
    fn ping_summary_gives_the_average() {
        let out = "PING 10.244.2.2 (10.244.2.2) 56(84) bytes of data.\n\n\
                   --- 10.244.2.2 ping statistics ---\n\
                   20 packets transmitted, 20 received, 0% packet loss, time 968ms\n\
                   rtt min/avg/max/mdev = 0.061/0.108/0.215/0.032 ms\n";
        assert_eq!(parse_ping_avg(out).unwrap(), 0.108);
        let lost = "--- 10.244.2.2 ping statistics ---\n\
                    20 packets transmitted, 0 received, 100% packet loss, time 1000ms\n";
        assert_eq!(
            parse_ping_avg(lost).unwrap_err().to_string(),
            "ping: no replies"
        );
        assert!(parse_ping_avg("").is_err());
        // busybox spells it "round-trip".
        let bb = "20 packets transmitted, 20 packets received, 0% packet loss\n\
                  round-trip min/avg/max = 0.050/0.070/0.100 ms\n";
        assert_eq!(parse_ping_avg(bb).unwrap(), 0.070);
    }

    #[test]
    fn listening_sockets_are_found_by_port() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n\
                 \x20  0: 0202F40A:1451 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0\n\
                 \x20  1: 0202F40A:14B5 0302F40A:C350 01 00000000:00000000 00:00000000 00000000 0\n";
        assert!(tcp_table_listens(t, 5201));
        // 0x14B5 = 5301 is only an established connection here.
        assert!(!tcp_table_listens(t, 5301));
        assert!(!tcp_table_listens("", 5201));
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[7.5]), Some(7.5));
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[f64::NAN, 1.0]), Some(1.0));
    }

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_timestamp(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
