//! Every pod policy knows, by address and as a sorted list, in shards that tables share.
//!
//! A cluster of 100,000 pods changes a pod at a time. The watch keeps these up to date pod by
//! pod, and every policy table published meanwhile holds them too, so a change must not copy
//! them whole (at 100,000 pods that copy, and dropping the previous one, took 11 ms a pod).
//! Each is split into [`SHARDS`] shards by a hash of the address, each shard behind its own
//! `Arc`: a change copies the one shard it touches (about 1,600 pods of 100,000) when a table
//! still shares it, and two readings compare shard by shard, the shards they share at once.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Arc;

use super::engine::PodMeta;

/// How many shards: a change copies one of them at most.
pub const SHARDS: usize = 64;

fn shard_of(ip: &IpAddr) -> usize {
    (foldhash::fast::FixedState::with_seed(0x706f_6473).hash_one(ip) % SHARDS as u64) as usize
}

type Map = HashMap<IpAddr, Arc<PodMeta>, foldhash::fast::RandomState>;

/// [`SHARDS`] shards by address, each behind its own `Arc`: what [`PodIndex`] and [`PodList`]
/// are made of.
#[derive(Debug, Clone)]
struct Shards<S>(Vec<Arc<S>>);

impl<S: Default> Default for Shards<S> {
    fn default() -> Self {
        Shards((0..SHARDS).map(|_| Arc::default()).collect())
    }
}

impl<S> Shards<S> {
    /// The shard of `ip`.
    fn of(&self, ip: &IpAddr) -> Option<&Arc<S>> {
        self.0.get(shard_of(ip))
    }

    fn of_mut(&mut self, ip: &IpAddr) -> Option<&mut Arc<S>> {
        self.0.get_mut(shard_of(ip))
    }

    fn iter(&self) -> impl Iterator<Item = &S> {
        self.0.iter().map(|s| &**s)
    }

    /// `items` split by the address `ip` gives each, each shard then finished by `finish`.
    fn split<T>(
        items: impl IntoIterator<Item = T>,
        ip: impl Fn(&T) -> IpAddr,
        finish: impl Fn(&mut S),
    ) -> Self
    where
        S: Default + Extend<T>,
    {
        let mut shards: Vec<S> = (0..SHARDS).map(|_| S::default()).collect();
        for item in items {
            if let Some(s) = shards.get_mut(shard_of(&ip(&item))) {
                s.extend([item]);
            }
        }
        Shards(
            shards
                .into_iter()
                .map(|mut s| {
                    finish(&mut s);
                    Arc::new(s)
                })
                .collect(),
        )
    }
}

/// Two readings compare shard by shard, those they share at once.
impl<S: PartialEq> PartialEq for Shards<S> {
    fn eq(&self, other: &Self) -> bool {
        self.0
            .iter()
            .zip(&other.0)
            .all(|(a, b)| Arc::ptr_eq(a, b) || a == b)
    }
}

/// Pods by address (for a shared address, the last in [`PodList`]'s order).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodIndex {
    shards: Shards<Map>,
}

impl PodIndex {
    #[inline]
    pub fn get(&self, ip: &IpAddr) -> Option<&Arc<PodMeta>> {
        self.shards.of(ip).and_then(|s| s.get(ip))
    }

    pub fn contains_key(&self, ip: &IpAddr) -> bool {
        self.get(ip).is_some()
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| s.is_empty())
    }

    /// Sets the pod at `ip`, copying its shard first if a table shares it.
    pub fn insert(&mut self, ip: IpAddr, pod: Arc<PodMeta>) {
        if let Some(s) = self.shards.of_mut(&ip).map(Arc::make_mut) {
            s.insert(ip, pod);
        }
    }

    pub fn remove(&mut self, ip: &IpAddr) {
        // Found first, so that a shard a table shares is not copied for nothing.
        if let Some(shard) = self.shards.of_mut(ip) {
            if shard.contains_key(ip) {
                Arc::make_mut(shard).remove(ip);
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&IpAddr, &Arc<PodMeta>)> {
        self.shards.iter().flat_map(|s| s.iter())
    }
}

impl FromIterator<(IpAddr, Arc<PodMeta>)> for PodIndex {
    /// Later entries for an address win.
    fn from_iter<I: IntoIterator<Item = (IpAddr, Arc<PodMeta>)>>(iter: I) -> Self {
        PodIndex {
            shards: Shards::split(iter, |e| e.0, |_| {}),
        }
    }
}

/// One pod address: the address and its pod.
pub type PodAddr = (IpAddr, Arc<PodMeta>);

/// The order of a [`PodList`]: address, namespace, name.
fn order(e: &PodAddr) -> (IpAddr, &str, &str) {
    (e.0, &e.1.namespace, &e.1.name)
}

/// Every pod address, each shard in (address, namespace, name) order: two readings of the same
/// pods are equal however they were listed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PodList {
    shards: Shards<Vec<PodAddr>>,
}

impl PodList {
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| s.is_empty())
    }

    /// Shard by shard; within one address, in order.
    pub fn iter(&self) -> impl Iterator<Item = &PodAddr> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    /// Every entry in (address, namespace, name) order, across the shards.
    pub fn sorted(&self) -> Vec<&PodAddr> {
        let mut v: Vec<&PodAddr> = self.iter().collect();
        v.sort_unstable_by(|a, b| order(a).cmp(&order(b)));
        v
    }

    /// The index of these pods: for a shared address, the last in order.
    pub fn index(&self) -> PodIndex {
        self.iter().cloned().collect()
    }

    /// Takes `e` in (replacing the entry of the same address and pod).
    pub fn insert(&mut self, e: PodAddr) {
        let Some(s) = self.shards.of_mut(&e.0).map(Arc::make_mut) else {
            return;
        };
        match s.binary_search_by(|x| order(x).cmp(&order(&e))) {
            Ok(i) => s[i] = e,
            Err(i) => s.insert(i, e),
        }
    }

    /// Takes out the entry of `e`'s address and pod.
    pub fn remove(&mut self, e: &PodAddr) {
        // Found first, so that a shard a table shares is not copied for nothing.
        let Some(shard) = self.shards.of_mut(&e.0) else {
            return;
        };
        if let Ok(i) = shard.binary_search_by(|x| order(x).cmp(&order(e))) {
            Arc::make_mut(shard).remove(i);
        }
    }

    /// The last pod in order at `ip`: the one the index has there.
    pub fn last_at(&self, ip: &IpAddr) -> Option<&Arc<PodMeta>> {
        let s = self.shards.of(ip)?;
        let to = s.partition_point(|x| x.0 <= *ip);
        s.get(..to)?.last().filter(|e| e.0 == *ip).map(|e| &e.1)
    }
}

impl FromIterator<PodAddr> for PodList {
    fn from_iter<I: IntoIterator<Item = PodAddr>>(iter: I) -> Self {
        PodList {
            shards: Shards::split(
                iter,
                |e| e.0,
                |s: &mut Vec<PodAddr>| s.sort_unstable_by(|a, b| order(a).cmp(&order(b))),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str) -> Arc<PodMeta> {
        Arc::new(PodMeta {
            namespace: ns.into(),
            name: name.into(),
            labels: Arc::default(),
            ports: Arc::from(Vec::new()),
        })
    }

    fn ip(i: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0x0a40_0000 + i))
    }

    #[test]
    fn a_change_copies_one_shard_and_leaves_the_others_shared() {
        let list: PodList = (0..10_000)
            .map(|i| (ip(i), pod("ns", &format!("p{i}"))))
            .collect();
        let index = list.index();
        assert_eq!((list.len(), index.len()), (10_000, 10_000));
        let (mut l2, mut i2) = (list.clone(), index.clone());
        let moved = (ip(7), pod("ns", "p7"));
        l2.remove(&moved);
        i2.remove(&moved.0);
        let came = (ip(20_000), pod("ns", "p7"));
        l2.insert(came.clone());
        i2.insert(came.0, came.1.clone());
        let shared = |a: &PodList, b: &PodList| {
            a.shards
                .0
                .iter()
                .zip(&b.shards.0)
                .filter(|(x, y)| Arc::ptr_eq(x, y))
                .count()
        };
        assert!(shared(&list, &l2) >= SHARDS - 2, "{}", shared(&list, &l2));
        assert_ne!(list, l2);
        assert_eq!(l2.len(), 10_000);
        assert_eq!(i2, l2.index());
        assert_eq!(i2.get(&ip(7)), None);
        assert_eq!(i2.get(&ip(20_000)).map(|p| &*p.name), Some("p7"));
        // The original is as it was.
        assert_eq!(index.get(&ip(7)).map(|p| &*p.name), Some("p7"));
        assert_eq!(
            list,
            (0..10_000)
                .map(|i| (ip(i), pod("ns", &format!("p{i}"))))
                .collect()
        );
    }

    #[test]
    fn a_shared_address_is_the_last_pod_in_order() {
        let list: PodList = [(ip(1), pod("b", "x")), (ip(1), pod("a", "y"))]
            .into_iter()
            .collect();
        assert_eq!(list.last_at(&ip(1)).map(|p| &*p.name), Some("x"));
        assert_eq!(list.index().get(&ip(1)).map(|p| &*p.name), Some("x"));
        assert_eq!(list.last_at(&ip(2)), None);
    }
}
