//! When a worker with nothing to do spins, naps or sleeps in epoll.
//!
//! A pure policy over the times of the worker's last batches, so it is tested without threads
//! or clocks. Spinning pays off for request/response traffic, whose answer comes back within a
//! round trip; a bulk transfer gets only a short spin, to bridge the gap to its next
//! super-frame; after bulk traffic between local pods an idle worker naps instead of waiting to
//! be woken (see [`LOCAL_NAP`]).

use std::time::{Duration, Instant};

/// A frame (or GRO-coalesced message) bigger than this marks a batch as bulk transfer, after
/// which the worker busy-polls only for [`BULK_SPIN`].
pub(super) const BULK: usize = 4096;
/// How long a worker keeps polling after a batch of bulk traffic (capped by
/// `datapath.busy_poll_us`). A TCP stream's next super-frame (64 KiB) follows within tens of µs:
/// a worker that is still awake takes it without a sleep and a wake-up (an IPI to an idle
/// core). In the lab this gave 5-10% more stream throughput than no spin, and 20 µs did better
/// than 30 or 60: longer spins take the core from the pods producing the data.
const BULK_SPIN: Duration = Duration::from_micros(20);
/// For this long after a bulk batch, every batch gets only [`BULK_SPIN`]: the ACKs of a
/// transfer come in batches of small frames, which would otherwise get the full request/response
/// spin (cross-node TCP +5% in the lab).
const BULK_HOLD: Duration = Duration::from_millis(2);
/// After a super-frame went from one local pod to another, an idle worker sleeps this long
/// (plus the thread's timer slack, 50 µs by default) and then looks at its ports, instead of
/// waiting to be woken by the next frame: what a NIC's interrupt moderation does. A worker
/// waiting in epoll costs the pod that sends each frame a cross-core wake-up (an IPI; a VM exit
/// on a VM); a napping worker is woken by no one, and finds several super-frames and their ACKs
/// waiting. Same-node TCP in the lab: 12.6 -> 16 Gbit/s; polling without the nap did as well
/// but took 90% of a core instead of 65%. Not for the overlay: there both nodes' workers
/// napping cost cross-node TCP 10-15%, as the ACKs' round trip then includes two naps. Lasts
/// [`BULK_HOLD`] after the last such frame, so request/response traffic never naps.
pub(super) const LOCAL_NAP: Duration = Duration::from_micros(30);

/// What a worker with no ready port does before it looks again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Idle {
    /// Poll again at once (after yielding the core to a runnable thread).
    Spin,
    /// Sleep [`LOCAL_NAP`], then poll without waiting.
    Nap,
    /// Wait in epoll until something is ready.
    Wait,
}

/// What kind of traffic one batch moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Batch {
    /// A frame bigger than [`BULK`].
    pub bulk: bool,
    /// A frame bigger than [`BULK`] from one local pod to another.
    pub local_bulk: bool,
}

#[derive(Debug, Clone)]
pub(super) struct BusyPoll {
    /// How long to keep polling after the last packet (`datapath.busy_poll_us`); zero: never.
    window: Duration,
    /// Pinned to a CPU of its own (`datapath.cpus`): spins its whole window even when bulk.
    pub pinned: bool,
    /// Until when the worker polls without sleeping: set after every batch with packets.
    spin_until: Option<Instant>,
    /// When the worker last moved a frame bigger than [`BULK`].
    last_bulk: Option<Instant>,
    /// When it last did between local pods.
    last_local_bulk: Option<Instant>,
}

impl BusyPoll {
    pub fn new(window: Duration, pinned: bool) -> BusyPoll {
        BusyPoll {
            window,
            pinned,
            spin_until: None,
            last_bulk: None,
            last_local_bulk: None,
        }
    }

    /// What to do at `now` with nothing ready.
    pub fn idle(&self, now: Instant) -> Idle {
        if self.spin_until.is_some_and(|t| now < t) {
            Idle::Spin
        } else if self
            .last_local_bulk
            .is_some_and(|t| now.saturating_duration_since(t) < BULK_HOLD)
        {
            Idle::Nap
        } else {
            Idle::Wait
        }
    }

    /// Takes note of a batch that had work, done at `now`.
    pub fn after_batch(&mut self, now: Instant, batch: Batch) {
        if batch.bulk {
            self.last_bulk = Some(now);
        }
        if batch.local_bulk {
            self.last_local_bulk = Some(now);
        }
        if self.window.is_zero() {
            return;
        }
        // The ACK-only batches of a transfer count as bulk too: a long spin on each would take
        // the core from the pods that move the data.
        let bulk = self
            .last_bulk
            .is_some_and(|t| now.duration_since(t) < BULK_HOLD);
        // A pinned worker's core is the datapath's: it takes nothing from the pods.
        let window = if bulk && !self.pinned {
            self.window.min(BULK_SPIN)
        } else {
            self.window
        };
        self.spin_until = Some(now + window);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);
    const SMALL: Batch = Batch {
        bulk: false,
        local_bulk: false,
    };
    const BULKY: Batch = Batch {
        bulk: true,
        local_bulk: false,
    };
    const LOCAL: Batch = Batch {
        bulk: true,
        local_bulk: true,
    };

    #[test]
    fn without_a_window_an_idle_worker_waits() {
        let t = Instant::now();
        let mut p = BusyPoll::new(Duration::ZERO, false);
        assert_eq!(p.idle(t), Idle::Wait);
        p.after_batch(t, SMALL);
        p.after_batch(t, BULKY);
        assert_eq!(p.idle(t), Idle::Wait);
    }

    #[test]
    fn request_response_traffic_spins_the_whole_window() {
        let t = Instant::now();
        let mut p = BusyPoll::new(100 * US, false);
        p.after_batch(t, SMALL);
        assert_eq!(p.idle(t + 99 * US), Idle::Spin);
        assert_eq!(p.idle(t + 100 * US), Idle::Wait);
    }

    #[test]
    fn bulk_traffic_spins_briefly_for_a_while_unless_pinned() {
        let t = Instant::now();
        let mut p = BusyPoll::new(100 * US, false);
        p.after_batch(t, BULKY);
        assert_eq!(p.idle(t + 19 * US), Idle::Spin);
        assert_eq!(p.idle(t + 20 * US), Idle::Wait);
        // Small batches (the transfer's ACKs) soon after bulk get the short spin too...
        let ack = t + Duration::from_millis(1);
        p.after_batch(ack, SMALL);
        assert_eq!(p.idle(ack + 20 * US), Idle::Wait);
        // ...and the whole window again once the transfer is over.
        let later = t + Duration::from_millis(3);
        p.after_batch(later, SMALL);
        assert_eq!(p.idle(later + 99 * US), Idle::Spin);

        let mut pinned = BusyPoll::new(100 * US, true);
        pinned.after_batch(t, BULKY);
        assert_eq!(pinned.idle(t + 99 * US), Idle::Spin);
    }

    #[test]
    fn bulk_between_local_pods_naps_after_the_spin_for_a_while() {
        let t = Instant::now();
        let mut p = BusyPoll::new(Duration::ZERO, false);
        p.after_batch(t, LOCAL);
        assert_eq!(p.idle(t), Idle::Nap);
        assert_eq!(p.idle(t + Duration::from_millis(2)), Idle::Wait);
        let mut p = BusyPoll::new(100 * US, false);
        p.after_batch(t, LOCAL);
        assert_eq!(p.idle(t + 10 * US), Idle::Spin);
        assert_eq!(p.idle(t + 30 * US), Idle::Nap);
        // Overlay bulk never naps.
        let mut p = BusyPoll::new(100 * US, false);
        p.after_batch(t, BULKY);
        assert_eq!(p.idle(t + 30 * US), Idle::Wait);
    }
}
