//! The session layer: verified logins become data-plane sessions, and the table that names the
//! identities behind them.
//!
//! - [`SessionTable`]: source → identity and per-service grants, id → identity; pure
//!   bookkeeping, returning the kernel changes each operation needs.
//! - [`SessionManager`]: applies those changes to the data plane (removals before writes, fail
//!   closed on errors), sweeps expired sessions and audits everything.
//! - [`journal`]: the owners of pinned sessions, so that a restarted agent adopts them.
//! - [`FailureLimiter`]: the session endpoint's per-source budget of failed attempts.
//! - [`audit`]: the audit records.

pub mod audit;
mod ids;
pub mod journal;
mod limiter;
mod manager;
mod table;
#[cfg(test)]
mod tests;
mod time;

use std::collections::BTreeMap;

use crate::{
    config::Config,
    dataplane::{Protocol, ServiceId},
};

pub use self::{
    ids::IdAllocator,
    limiter::{DEFAULT_CAPACITY as LIMITER_CAPACITY, FailureLimiter},
    manager::{
        Attachment, DataplaneUpdate, LoginOutcome, Reevaluated, Removed, Restored, SessionError,
        SessionManager, SessionStore,
    },
    table::{
        Adopted, Change, EndReason, Ended, Grant, IdentityRecord, Login, NewIdentity, Now,
        ServiceView, SessionTable, SessionView, SourceRecord, TableError, grant_expiry,
    },
    time::rfc3339,
};

/// A protected service as logs and answers name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Data-plane id.
    pub id: ServiceId,
    /// Name from the configuration.
    pub name: String,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Destination port.
    pub port: u16,
}

/// The configured services by id.
#[derive(Clone, Debug, Default)]
pub struct Catalog(BTreeMap<ServiceId, ServiceInfo>);

impl Catalog {
    /// The services of a configuration, ids 1.. in file order (as the policy numbers them).
    pub fn from_config(config: &Config) -> Catalog {
        Catalog(
            config
                .services
                .iter()
                .zip(1u32..)
                .filter_map(|(s, id)| {
                    let id = ServiceId::new(id).ok()?;
                    Some((
                        id,
                        ServiceInfo {
                            id,
                            name: s.name.clone(),
                            protocol: s.protocol,
                            port: s.port,
                        },
                    ))
                })
                .collect(),
        )
    }

    /// A catalog of these services.
    pub fn new(services: impl IntoIterator<Item = ServiceInfo>) -> Catalog {
        Catalog(services.into_iter().map(|s| (s.id, s)).collect())
    }

    /// The service with this id.
    pub fn get(&self, id: ServiceId) -> Option<&ServiceInfo> {
        self.0.get(&id)
    }

    /// The service with this raw id (as events carry it).
    pub fn get_raw(&self, id: u32) -> Option<&ServiceInfo> {
        ServiceId::new(id).ok().and_then(|id| self.0.get(&id))
    }

    /// Every service, by id.
    pub fn iter(&self) -> impl Iterator<Item = &ServiceInfo> {
        self.0.values()
    }
}
