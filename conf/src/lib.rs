//! Typed configuration for vswitch and the types spoken between the daemon, the CNI plugin,
//! `vswitchctl` and the lab.
//!
//! Everything a user writes (the daemon's TOML config, the CNI netconf) is parsed here with
//! unknown fields rejected, then validated; every error names the field it is about so that a
//! user can fix it without reading code. The admin API types live here too, so that the daemon
//! and its clients can never disagree on the wire format, and a minimal blocking HTTP client for
//! the admin unix socket keeps the CNI plugin free of an async runtime.

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod netconf;
pub mod sysctl;

pub use config::{Config, ConfigError};
