//! The Service table from the API, kept up to date one Service at a time.
//!
//! At 10,000 Services and 100,000 endpoints, converting every Service for each endpoint change
//! is what made kube-proxy's iptables mode take seconds per change. The watch tells us which
//! Services and EndpointSlices changed ([`ServiceChanges`]); only the Services they belong to
//! are converted again, and the others keep their converted spec. A list (the first, or a
//! relist after a 410 Gone) converts them all, since objects may have gone while the watch was
//! away.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use hashbrown::{HashMap, HashSet};

use conf::config::ServiceSpec;
use k8s_openapi::api::core::v1::Service;
use kube::runtime::reflector::{ObjectRef, Store};

use super::{convert, ObjKey, ServiceChanges};

/// One Service as converted, with what its conversion had to say.
#[derive(Debug, Clone, PartialEq)]
struct Converted {
    spec: Option<Arc<ServiceSpec>>,
    problems: Vec<String>,
}

/// The converted Services, by (namespace, name).
#[derive(Debug, Default)]
pub(crate) struct ServiceConverter {
    by_key: BTreeMap<ObjKey, Converted>,
    /// Each EndpointSlice's Service as last converted, so that a slice that moves to another
    /// Service (its label changed) or goes converts its old Service again too.
    slice_owner: HashMap<ObjKey, ObjKey>,
    /// Each Service's EndpointSlices: a change reads these from the store, not all slices.
    owner_slices: HashMap<ObjKey, BTreeSet<ObjKey>>,
}

fn object_ref<K: kube::Resource<DynamicType = ()>>(key: &ObjKey) -> ObjectRef<K> {
    ObjectRef::new(&key.1).within(&key.0)
}

impl ServiceConverter {
    /// Applies `changes` from the stores; true when a Service's spec changed.
    pub fn update(
        &mut self,
        changes: &ServiceChanges,
        services: &Store<Service>,
        slices: &Store<convert::SliceLite>,
    ) -> bool {
        let dirty: HashSet<ObjKey> = if changes.all {
            self.slice_owner.clear();
            self.owner_slices.clear();
            for s in slices.state() {
                if let Some(owner) = convert::slice_service(&s) {
                    self.index(super::obj_key(&*s), owner);
                }
            }
            let listed = services.state().into_iter().map(|s| super::obj_key(&*s));
            listed.chain(self.by_key.keys().cloned()).collect()
        } else {
            let mut dirty = changes.services.clone();
            for s in &changes.slices {
                if let Some(old) = self.slice_owner.remove(s) {
                    if let Some(set) = self.owner_slices.get_mut(&old) {
                        set.remove(s);
                    }
                    dirty.insert(old);
                }
                let current = slices.get(&object_ref(s));
                if let Some(owner) = current.as_deref().and_then(convert::slice_service) {
                    self.index(s.clone(), owner.clone());
                    dirty.insert(owner);
                }
            }
            dirty
        };
        let mut changed = false;
        for key in dirty {
            let svc = services.get(&object_ref(&key));
            let owned: Vec<Arc<convert::SliceLite>> = self
                .owner_slices
                .get(&key)
                .into_iter()
                .flatten()
                .filter_map(|s| slices.get(&object_ref(s)))
                .collect();
            if self.owner_slices.get(&key).is_some_and(BTreeSet::is_empty) {
                self.owner_slices.remove(&key);
            }
            let new = svc.map(|svc| convert_one(&svc, &owned));
            changed |= match new {
                // An unchanged conversion keeps the old `Arc`: the sink sees no change.
                Some(c) => match self.by_key.get_mut(&key) {
                    Some(old) if *old == c => false,
                    Some(old) => {
                        *old = c;
                        true
                    }
                    None => {
                        self.by_key.insert(key, c);
                        true
                    }
                },
                None => self.by_key.remove(&key).is_some(),
            };
        }
        changed
    }

    /// Notes `slice` as one of `owner`'s.
    fn index(&mut self, slice: ObjKey, owner: ObjKey) {
        self.slice_owner.insert(slice.clone(), owner.clone());
        self.owner_slices.entry(owner).or_default().insert(slice);
    }

    /// Every Service's spec, in (namespace, name) order: the same `Arc` as last time for a
    /// Service that did not change.
    pub fn specs(&self) -> Vec<Arc<ServiceSpec>> {
        self.by_key
            .values()
            .filter_map(|c| c.spec.clone())
            .collect()
    }

    /// What the conversions had to say.
    pub fn problems(&self) -> Vec<String> {
        self.by_key
            .values()
            .flat_map(|c| c.problems.iter().cloned())
            .collect()
    }
}

fn convert_one(svc: &Service, slices: &[Arc<convert::SliceLite>]) -> Converted {
    let mut refs: Vec<&convert::SliceLite> = slices.iter().map(|s| &**s).collect();
    let mut problems = Vec::new();
    let spec = convert::service_from_api(svc, &mut refs, &mut problems).map(Arc::new);
    Converted { spec, problems }
}
