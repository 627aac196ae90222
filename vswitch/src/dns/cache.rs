//! The forwarder's answer cache.
//!
//! Entries are whole upstream responses, stored with the offset of every record's TTL so a
//! cache hit is a copy plus a few four-byte writes: the client sees TTLs counting down, as
//! from any caching resolver, and an entry is never served past the smallest TTL it holds.
//! The key carries everything that changes what the upstream would have said: the name (case
//! folded), type, class, whether the query had EDNS0 (an OPT in the reply is only allowed
//! when the query had one) and the DO bit (DNSSEC records).
//!
//! The size bound is a hard entry count. When full, expired entries are swept first, and if
//! none were, one of a few sampled entries closest to expiry goes: cheaper than an LRU list
//! and, for DNS's short TTLs, nearly as good.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// (offset, TTL) of each record's TTL field in a response.
pub(crate) type TtlFields = Box<[(u16, u32)]>;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct CacheKey {
    pub name: Box<[u8]>,
    pub qtype: u16,
    pub qclass: u16,
    pub edns: bool,
    pub dnssec_ok: bool,
}

#[derive(Debug)]
struct Entry {
    /// The response; its ID is rewritten on every hit.
    msg: Box<[u8]>,
    /// (offset, TTL as received) of every record but OPT.
    ttls: TtlFields,
    stored: Instant,
    expires: Instant,
}

#[derive(Debug)]
pub(crate) struct Cache {
    map: HashMap<CacheKey, Entry>,
    capacity: usize,
}

/// Entries compared when one must be evicted.
const EVICTION_SAMPLE: usize = 8;

impl Cache {
    pub(crate) fn new(capacity: usize) -> Cache {
        Cache {
            map: HashMap::new(),
            capacity,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// The cached response with TTLs aged to `now`, or `None` (an expired entry is removed).
    pub(crate) fn get(&mut self, key: &CacheKey, now: Instant) -> Option<Vec<u8>> {
        let e = self.map.get(key)?;
        if now >= e.expires {
            self.map.remove(key);
            return None;
        }
        let age = now.saturating_duration_since(e.stored).as_secs();
        let age = u32::try_from(age).unwrap_or(u32::MAX);
        let mut msg = e.msg.to_vec();
        for &(at, ttl) in e.ttls.iter() {
            let at = usize::from(at);
            if let Some(field) = msg.get_mut(at..at + 4) {
                field.copy_from_slice(&ttl.saturating_sub(age).to_be_bytes());
            }
        }
        Some(msg)
    }

    pub(crate) fn insert(
        &mut self,
        key: CacheKey,
        msg: &[u8],
        ttls: TtlFields,
        ttl: Duration,
        now: Instant,
    ) {
        if self.capacity == 0 || ttl.is_zero() {
            return;
        }
        if self.map.len() >= self.capacity && !self.map.contains_key(&key) {
            self.map.retain(|_, e| e.expires > now);
            if self.map.len() >= self.capacity {
                let victim = self
                    .map
                    .iter()
                    .take(EVICTION_SAMPLE)
                    .min_by_key(|(_, e)| e.expires)
                    .map(|(k, _)| k.clone());
                if let Some(v) = victim {
                    self.map.remove(&v);
                }
            }
        }
        self.map.insert(
            key,
            Entry {
                msg: msg.into(),
                ttls,
                stored: now,
                expires: now + ttl,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> CacheKey {
        CacheKey {
            name: vec![1, n, 0].into(),
            qtype: 1,
            qclass: 1,
            edns: false,
            dnssec_ok: false,
        }
    }

    #[test]
    fn ttls_age_and_entries_expire() {
        let mut c = Cache::new(4);
        let t0 = Instant::now();
        let msg = [0u8, 0, 0, 0, 0, 0, 1, 44];
        c.insert(
            key(1),
            &msg,
            vec![(4, 300)].into(),
            Duration::from_secs(300),
            t0,
        );
        let aged = c.get(&key(1), t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(&aged[4..8], &290u32.to_be_bytes());
        assert!(c.get(&key(1), t0 + Duration::from_secs(300)).is_none());
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn size_is_bounded() {
        let mut c = Cache::new(3);
        let t0 = Instant::now();
        for n in 0..10 {
            let ttl = Duration::from_secs(100 + u64::from(n));
            c.insert(key(n), b"x", Box::new([]), ttl, t0);
            assert!(c.len() <= 3);
        }
        // Expired entries go before live ones.
        let mut c = Cache::new(2);
        c.insert(key(1), b"x", Box::new([]), Duration::from_secs(1), t0);
        c.insert(key(2), b"x", Box::new([]), Duration::from_secs(100), t0);
        let later = t0 + Duration::from_secs(5);
        c.insert(key(3), b"x", Box::new([]), Duration::from_secs(100), later);
        assert!(c.get(&key(2), later).is_some());
        assert!(c.get(&key(3), later).is_some());
    }
}
