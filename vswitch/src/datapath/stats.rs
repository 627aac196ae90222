//! Per-port counters: relaxed atomics written by the one worker that owns the port and read by
//! the control plane for the admin API and metrics. Every drop has a reason.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use conf::api::PortCounters;

use crate::pipeline::DropReason;

#[derive(Debug, Default)]
pub struct PortStats {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    drops: [AtomicU64; DropReason::COUNT],
}

impl PortStats {
    #[inline]
    pub fn rx(&self, bytes: usize) {
        self.rx_packets.fetch_add(1, Relaxed);
        self.rx_bytes.fetch_add(bytes as u64, Relaxed);
    }

    #[inline]
    pub fn tx(&self, bytes: usize) {
        self.tx_packets.fetch_add(1, Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Relaxed);
    }

    /// `packets` frames of `bytes` in all (a segmented or coalesced batch).
    #[inline]
    pub fn tx_n(&self, packets: usize, bytes: usize) {
        self.tx_packets.fetch_add(packets as u64, Relaxed);
        self.tx_bytes.fetch_add(bytes as u64, Relaxed);
    }

    #[inline]
    pub fn count_drop(&self, reason: DropReason) {
        self.drops[reason as usize].fetch_add(1, Relaxed);
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize].load(Relaxed)
    }

    pub fn snapshot(&self) -> PortCounters {
        let mut drops = BTreeMap::new();
        for &r in DropReason::ALL {
            let n = self.dropped(r);
            if n > 0 {
                drops.insert(r.name().to_string(), n);
            }
        }
        PortCounters {
            rx_packets: self.rx_packets.load(Relaxed),
            rx_bytes: self.rx_bytes.load(Relaxed),
            tx_packets: self.tx_packets.load(Relaxed),
            tx_bytes: self.tx_bytes.load(Relaxed),
            drops,
        }
    }
}
