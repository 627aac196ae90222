//! `vswitchctl capture`: a live pcapng stream from the daemon to stdout or to rotated files.
//!
//! The stream is copied as it arrives (the client de-chunks it incrementally), so
//! `vswitchctl capture | tcpdump -nr -` and `| wireshark -k -i -` show packets at once. Ctrl-C
//! (or the count, or the reader of stdout going away) ends it; the session's counters are then
//! fetched and printed on stderr like tcpdump's summary, including copies the daemon dropped
//! because this reader was too slow.
//!
//! With `-w FILE` the stream is split on pcapng block boundaries into files that each stand
//! alone: every file starts with the section header and all interface blocks seen so far.
//! `-C MB` starts a new file before a packet once the current one is larger than MB million
//! bytes, named FILE, FILE1, FILE2, ...; with `-W N` as well, at most N files are kept,
//! named FILE0..FILE(N-1) (zero-padded) and reused in turn, as tcpdump does.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use conf::api::{self, CaptureQuery, CaptureSessionsResponse};
use conf::client::{Client, ClientError};
use vswitch::capture::pcapng;

#[derive(clap::Args, Debug)]
pub struct CaptureArgs {
    /// Only this pod's port, in and out (NAMESPACE/NAME).
    #[arg(long, conflicts_with_all = ["port", "point"])]
    pub pod: Option<String>,
    /// Only this port's frames, in and out (see `vswitchctl ports`; 0 is the host port).
    #[arg(long, conflicts_with = "point")]
    pub port: Option<u32>,
    /// Capture points, comma-separated: pod, host, nat, nat:before, nat:after, overlay,
    /// overlay:inner, overlay:outer, policy (packets NetworkPolicy denied), policy:ingress,
    /// policy:egress, egress (both sides of egress translation), egress:pod (the pods'
    /// packets to and from the engine), egress:node (the node sockets' traffic as the outside
    /// sees it, synthesised; TCP as stream bytes per read/write), all [default: all].
    #[arg(long)]
    pub point: Option<String>,
    /// in (into the switch or stage), out, or both.
    #[arg(long, default_value = "both")]
    pub direction: String,
    /// Stop after this many packets.
    #[arg(short = 'c')]
    pub count: Option<u64>,
    /// Write to this file instead of stdout.
    #[arg(short = 'w')]
    pub write: Option<PathBuf>,
    /// With -w: start a new file once the current one is larger than this many million bytes.
    #[arg(short = 'C', requires = "write")]
    pub file_size: Option<u64>,
    /// With -C: keep at most this many files, reusing them in turn.
    #[arg(short = 'W', requires = "file_size")]
    pub file_count: Option<u32>,
    /// Bytes kept of each packet: 64..=65535, or 0 for the whole packet [default: 65535].
    #[arg(long, value_parser = parse_snaplen)]
    pub snaplen: Option<usize>,
    /// A filter in tcpdump's syntax (host, net, port, portrange, tcp, udp, icmp, arp, ip,
    /// vxlan, less, greater, and/or/not, parentheses); words are joined by spaces.
    pub filter: Vec<String>,
}

fn parse_snaplen(s: &str) -> Result<usize, String> {
    use vswitch::capture::{MAX_SNAPLEN, MIN_SNAPLEN};
    match s.parse::<usize>() {
        Ok(n) if n == 0 || (MIN_SNAPLEN..=MAX_SNAPLEN).contains(&n) => Ok(n),
        _ => Err(format!(
            "{MIN_SNAPLEN}..={MAX_SNAPLEN}, or 0 for the whole packet"
        )),
    }
}

/// SIGINT and SIGTERM only set the returned flag; reads time out often enough to look at it.
fn catch_signals() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // Without the handler Ctrl-C still ends the capture, only without the summary.
        let _ = signal_hook::flag::register(sig, stop.clone());
    }
    stop
}

/// The request path for these arguments.
pub fn query(a: &CaptureArgs) -> String {
    let filter = a.filter.join(" ");
    CaptureQuery {
        pod: a.pod.clone(),
        port: a.port,
        point: a.point.clone(),
        direction: Some(a.direction.clone()).filter(|d| d != "both"),
        count: a.count,
        snaplen: a.snaplen,
        filter: Some(filter.trim().to_string()),
    }
    .path()
}

/// Where the stream goes.
trait Sink {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()>;
    fn finish(&mut self) -> io::Result<()>;
}

struct Stdout(io::Stdout);

impl Sink for Stdout {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut o = self.0.lock();
        o.write_all(bytes)?;
        o.flush()
    }

    fn finish(&mut self) -> io::Result<()> {
        self.0.lock().flush()
    }
}

/// Files rotated by size and count, split on block boundaries.
pub struct Rotating {
    base: PathBuf,
    limit: Option<u64>,
    count: Option<u32>,
    /// Files opened so far (the current one is number `opened - 1`).
    opened: u64,
    file: Option<BufWriter<File>>,
    size: u64,
    shb: Vec<u8>,
    idbs: Vec<u8>,
    pending: Vec<u8>,
}

impl Rotating {
    pub fn new(base: PathBuf, limit_mb: Option<u64>, count: Option<u32>) -> Rotating {
        Rotating {
            base,
            limit: limit_mb.map(|m| m.max(1) * 1_000_000),
            count: count.filter(|&c| c > 0),
            opened: 0,
            file: None,
            size: 0,
            shb: Vec::new(),
            idbs: Vec::new(),
            pending: Vec::new(),
        }
    }

    /// The name of file number `n` (0-based, in the order opened).
    pub fn name(&self, n: u64) -> PathBuf {
        let mut s = self.base.clone().into_os_string();
        match (self.limit, self.count) {
            (Some(_), Some(c)) => {
                let width = (c - 1).max(1).to_string().len();
                s.push(format!("{:0width$}", n % u64::from(c)));
            }
            (Some(_), None) if n > 0 => s.push(n.to_string()),
            _ => {}
        }
        PathBuf::from(s)
    }

    fn open_next(&mut self) -> io::Result<()> {
        if let Some(mut f) = self.file.take() {
            f.flush()?;
        }
        let path = self.name(self.opened);
        let file = File::create(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let mut w = BufWriter::new(file);
        w.write_all(&self.shb)?;
        w.write_all(&self.idbs)?;
        self.size = (self.shb.len() + self.idbs.len()) as u64;
        self.file = Some(w);
        self.opened += 1;
        Ok(())
    }

    fn write_block(&mut self, ty: u32, block: &[u8]) -> io::Result<()> {
        match ty {
            pcapng::SHB => {
                self.shb = block.to_vec();
                self.idbs.clear();
                return self.open_next();
            }
            pcapng::IDB => self.idbs.extend_from_slice(block),
            pcapng::EPB if self.limit.is_some_and(|l| self.size > l) => self.open_next()?,
            _ => {}
        }
        let Some(f) = self.file.as_mut() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the stream does not start with a section header",
            ));
        };
        f.write_all(block)?;
        self.size += block.len() as u64;
        Ok(())
    }
}

impl Sink for Rotating {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.pending.extend_from_slice(bytes);
        let mut at = 0;
        loop {
            let rest = &self.pending[at..];
            match pcapng::next_block(rest) {
                Ok(Some((ty, len))) => {
                    let block = rest[..len].to_vec();
                    self.write_block(ty, &block)?;
                    at += len;
                }
                Ok(None) => break,
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
        }
        self.pending.drain(..at);
        if let Some(f) = self.file.as_mut() {
            f.flush()?;
        }
        Ok(())
    }

    fn finish(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

/// Refuses what cannot work before anything is asked of the daemon: `-C` without a file, and
/// binary pcapng to a terminal (as tcpdump and dumpcap refuse). `stdout_is_terminal` is
/// `io::stdout().is_terminal()`, passed in for the tests.
pub fn check_usage(a: &CaptureArgs, stdout_is_terminal: bool) -> Result<(), String> {
    let to_stdout = a.write.as_ref().is_none_or(|p| p.as_os_str() == "-");
    if to_stdout && a.file_size.is_some() {
        return Err("-C needs a file name (-w FILE), not standard output".into());
    }
    if to_stdout && stdout_is_terminal {
        return Err(
            "refusing to write pcapng to a terminal: pipe it (| tcpdump -nr -, \
                    | wireshark -k -i -) or give -w FILE"
                .into(),
        );
    }
    Ok(())
}

/// Runs a capture until the count, Ctrl-C, or the output going away. Check the arguments with
/// [`check_usage`] first.
pub fn run(socket: &std::path::Path, a: &CaptureArgs) -> Result<(), ClientError> {
    let stop = catch_signals();
    let client = Client::new(socket).with_timeout(Duration::from_secs(10));
    let mut s = client.stream(&query(a), Some(Duration::from_millis(200)))?;
    if !(200..300).contains(&s.status) {
        return Err(s.into_error());
    }
    let id: Option<u64> = s
        .header(api::CAPTURE_SESSION_HEADER)
        .and_then(|v| v.parse().ok());
    let mut sink: Box<dyn Sink> = match &a.write {
        Some(p) if p.as_os_str() != "-" => {
            Box::new(Rotating::new(p.clone(), a.file_size, a.file_count))
        }
        _ => Box::new(Stdout(io::stdout())),
    };
    let io_err = |source: io::Error| ClientError::Io {
        path: a.write.clone().unwrap_or_else(|| PathBuf::from("stdout")),
        source,
    };
    let mut buf = vec![0u8; 256 * 1024];
    let mut outcome = Ok(());
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Err(e) = sink.put(&buf[..n]) {
                    // The reader of our stdout (tcpdump -c, head) went away: a normal end.
                    if e.kind() != io::ErrorKind::BrokenPipe {
                        outcome = Err(io_err(e));
                    }
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                outcome = Err(ClientError::Io {
                    path: socket.to_owned(),
                    source: e,
                });
                break;
            }
        }
    }
    if let Err(e) = sink.finish() {
        if outcome.is_ok() && e.kind() != io::ErrorKind::BrokenPipe {
            outcome = Err(io_err(e));
        }
    }
    // The session's counters, while it still runs (Ctrl-C) or just after it ended.
    if let Some(id) = id {
        let list = client.get::<CaptureSessionsResponse>(api::PATH_CAPTURE_SESSIONS);
        if let Some(info) = list
            .ok()
            .and_then(|l| l.sessions.into_iter().find(|x| x.id == id))
        {
            eprintln!("{} packets captured", info.written);
            eprintln!("{} packets matched at the switch", info.matched);
            eprintln!(
                "{} packets dropped by the capture queue (the reader was too slow)",
                info.dropped
            );
        }
    }
    drop(s);
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(packets: usize, size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        pcapng::section_header(&mut out, "t");
        pcapng::interface(&mut out, "pod:default/p1:in", "", 65535);
        for i in 0..packets {
            if i == 3 {
                pcapng::interface(&mut out, "nat:before", "", 65535);
            }
            pcapng::packet(
                &mut out,
                0,
                i as u64,
                &vec![7u8; size],
                size as u32,
                pcapng::Direction::Inbound,
            );
        }
        out
    }

    fn blocks(b: &[u8]) -> Vec<u32> {
        let mut v = Vec::new();
        let mut rest = b;
        while let Some((t, len)) = pcapng::next_block(rest).unwrap() {
            v.push(t);
            rest = &rest[len..];
        }
        assert!(rest.is_empty());
        v
    }

    #[test]
    fn names_follow_tcpdump() {
        let r = Rotating::new("/tmp/x.pcapng".into(), Some(1), None);
        assert_eq!(r.name(0), PathBuf::from("/tmp/x.pcapng"));
        assert_eq!(r.name(2), PathBuf::from("/tmp/x.pcapng2"));
        let r = Rotating::new("/tmp/x".into(), Some(1), Some(3));
        assert_eq!(r.name(0), PathBuf::from("/tmp/x0"));
        assert_eq!(r.name(4), PathBuf::from("/tmp/x1"));
        let r = Rotating::new("/tmp/x".into(), Some(1), Some(12));
        assert_eq!(r.name(3), PathBuf::from("/tmp/x03"));
        let r = Rotating::new("/tmp/x".into(), None, None);
        assert_eq!(r.name(0), PathBuf::from("/tmp/x"));
    }

    #[test]
    fn rotates_on_block_boundaries_with_headers_in_every_file() {
        let dir = std::env::temp_dir().join(format!("vswitch-rot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("cap");
        let mut r = Rotating::new(base.clone(), Some(1), None);
        // 10 packets of 300 kB: a new file after every 4th (1 MB passed).
        let s = stream(10, 300_000);
        // Fed in odd pieces, as a socket delivers them.
        for piece in s.chunks(77_777) {
            r.put(piece).unwrap();
        }
        r.finish().unwrap();
        let files: Vec<Vec<u8>> = (0..3).map(|n| std::fs::read(r.name(n)).unwrap()).collect();
        assert!(!r.name(3).exists());
        let b: Vec<Vec<u32>> = files.iter().map(|f| blocks(f)).collect();
        use pcapng::{EPB, IDB, SHB};
        assert_eq!(b[0], [SHB, IDB, EPB, EPB, EPB, IDB, EPB]);
        assert_eq!(b[1], [SHB, IDB, IDB, EPB, EPB, EPB, EPB]);
        assert_eq!(b[2], [SHB, IDB, IDB, EPB, EPB]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn queries_are_encoded() {
        let a = CaptureArgs {
            pod: Some("default/p1".into()),
            port: None,
            point: None,
            direction: "in".into(),
            count: Some(5),
            write: None,
            file_size: None,
            file_count: None,
            snaplen: None,
            filter: vec!["host".into(), "10.0.0.1".into(), "&&".into(), "!tcp".into()],
        };
        assert_eq!(
            query(&a),
            "/v1/capture?pod=default%2Fp1&direction=in&count=5&filter=host%2010.0.0.1%20%26%26%20%21tcp"
        );
    }

    #[test]
    fn pcapng_never_goes_to_a_terminal_and_rotation_needs_a_file() {
        let args = |write: Option<&str>, file_size: Option<u64>| CaptureArgs {
            pod: None,
            port: None,
            point: None,
            direction: "both".into(),
            count: None,
            write: write.map(PathBuf::from),
            file_size,
            file_count: None,
            snaplen: None,
            filter: Vec::new(),
        };
        assert!(check_usage(&args(None, None), false).is_ok());
        assert!(check_usage(&args(Some("x.pcapng"), None), true).is_ok());
        assert!(check_usage(&args(Some("x.pcapng"), Some(10)), true).is_ok());
        let tty = check_usage(&args(None, None), true).unwrap_err();
        assert!(tty.contains("terminal") && tty.contains("-w FILE"), "{tty}");
        assert!(check_usage(&args(Some("-"), None), true).is_err());
        let c = check_usage(&args(Some("-"), Some(10)), false).unwrap_err();
        assert!(c.starts_with("-C needs a file name"), "{c}");
        assert!(check_usage(&args(None, Some(10)), false).is_err());
    }
}
