//! NetworkPolicy (networking.k8s.io/v1), judged at the switch.
//!
//! - [`selector`]: label sets and label selectors.
//! - [`model`]: NetworkPolicy objects compiled (and validated as the API server validates them)
//!   into [`Policy`].
//! - [`manifests`]: Kubernetes objects (API or manifest files) to policies and pod metadata.
//! - [`tables`]: what the datapath reads: the policies, every known pod by address, and each
//!   local pod's selection; [`PolicyTables::judge`] takes the verdict at one switch.
//! - [`engine`]: the [`PolicySet`] and its verdict on a new connection, per direction.
//!
//! Everything here is pure: the same code answers the datapath, `vswitchctl trace` and the
//! tests. The verdict is taken once per connection, when its conntrack entry is made; replies
//! and ICMP errors about an admitted connection follow its entry.

pub mod engine;
pub mod manifests;
pub mod model;
pub mod pods;
pub mod selector;
pub mod tables;

pub use engine::{Judgement, NamedPort, PodMeta, PolicySet, Remote, Selection};
pub use model::{Direction, Policy, Proto};
pub use selector::{Labels, Selector};
pub use tables::{End, PolicyTables, PortPolicy, Verdict};

#[cfg(test)]
mod tests;
