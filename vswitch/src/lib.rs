//! vswitch: a userspace virtual switch for Kubernetes pod networking.
//!
//! Data flows one way through the modules: `datapath` reads batches of frames from TAP ports,
//! `pipeline` (pure, sans-IO) decides what happens to each one using the immutable table snapshot
//! published by `control`, and `datapath` carries the decision out. `wire` holds the zero-copy
//! packet views everything else is written against.

pub mod capture;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod dns;
pub mod egress;
pub mod pipeline;
pub mod policy;
#[doc(hidden)]
pub mod testutil;
pub mod wire;
