//! idgate: an identity-aware host firewall. Tokens from the organisation's IdP become sessions
//! that XDP/TC programs enforce per packet.
//!
//! The library holds the domain modules; `main.rs` is a thin command line over them.
#![deny(unsafe_code)]

pub mod api;
pub mod config;
pub mod dataplane;
pub mod devidp;
pub mod exit;
pub mod identity;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod runtime;
pub mod session;
pub mod userid;
pub mod wiring;
