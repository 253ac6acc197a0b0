//! Applies session-table changes to the data plane and audits them.
//!
//! Kernel changes always remove before they write, so no moment allows more than either the old
//! or the new state. When the data plane refuses a change, the source is cleared (fail closed)
//! and, if even that fails, the next sweep reconciles the kernel map with the table.

use std::{
    borrow::Cow,
    collections::BTreeSet,
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use thiserror::Error;

use super::{
    Catalog, ServiceInfo,
    audit::{AuditEvent, AuditLog},
    journal::{OwnerRecord, SessionJournal},
    table::{
        Adopted, Change, EndReason, Ended, Grant, IdentityRecord, NewIdentity, Now, SessionTable,
        SourceRecord,
    },
};
use crate::{
    dataplane::{
        Attached, CidrRule, Dataplane, DataplaneError, EventStats, Expiry, Protocol, Service,
        ServiceCounters, ServiceId, Session,
    },
    policy::{Action, Identity, ServiceDecision},
};

/// The data plane as the session layer uses it (a fake in unit tests).
pub trait SessionStore: Send {
    /// Writes sessions (batched).
    fn upsert_sessions(&mut self, sessions: &[Session]) -> Result<(), DataplaneError>;
    /// Removes sessions (batched); missing ones are skipped. Returns how many were removed.
    fn remove_sessions(&mut self, keys: &[(IpAddr, ServiceId)]) -> Result<usize, DataplaneError>;
    /// Every session in the kernel map.
    fn sessions(&self) -> Result<Vec<Session>, DataplaneError>;
    /// When each of `keys` last let a packet through, on the kernel's clock (`None`: not held).
    fn last_seen(
        &self,
        keys: &[(IpAddr, ServiceId)],
    ) -> Result<Vec<Option<Expiry>>, DataplaneError> {
        Ok(vec![None; keys.len()])
    }
    /// Events the kernel suppressed or lost.
    fn event_stats(&self) -> Result<EventStats, DataplaneError> {
        Ok(EventStats::default())
    }
    /// Packet and byte counters per service (for metrics).
    fn counters(&self) -> Result<Vec<ServiceCounters>, DataplaneError> {
        Ok(Vec::new())
    }
    /// Replaces the protected services (a configuration reload).
    fn set_services(&mut self, _services: &[Service]) -> Result<(), DataplaneError> {
        Ok(())
    }
    /// Where enforcement is attached (for the status): interface, how, and the program's id.
    fn attachments(&self) -> Vec<Attachment> {
        Vec::new()
    }
    /// Capacity of the kernel's sessions map, if there is one.
    fn capacity(&self) -> Option<u32> {
        None
    }
    /// Replaces the CIDR rules (a configuration reload).
    fn set_cidr_rules(&mut self, _rules: &[CidrRule]) -> Result<(), DataplaneError> {
        Ok(())
    }
}

impl SessionStore for Dataplane {
    fn upsert_sessions(&mut self, sessions: &[Session]) -> Result<(), DataplaneError> {
        Dataplane::upsert_sessions(self, sessions)
    }
    fn remove_sessions(&mut self, keys: &[(IpAddr, ServiceId)]) -> Result<usize, DataplaneError> {
        Dataplane::remove_sessions(self, keys)
    }
    fn sessions(&self) -> Result<Vec<Session>, DataplaneError> {
        Dataplane::sessions(self)
    }
    fn last_seen(
        &self,
        keys: &[(IpAddr, ServiceId)],
    ) -> Result<Vec<Option<Expiry>>, DataplaneError> {
        Dataplane::last_seen(self, keys)
    }
    fn event_stats(&self) -> Result<EventStats, DataplaneError> {
        Dataplane::event_stats(self)
    }
    fn counters(&self) -> Result<Vec<ServiceCounters>, DataplaneError> {
        Dataplane::counters(self)
    }
    fn set_services(&mut self, services: &[Service]) -> Result<(), DataplaneError> {
        Dataplane::set_services(self, services)
    }
    fn set_cidr_rules(&mut self, rules: &[CidrRule]) -> Result<(), DataplaneError> {
        Dataplane::set_cidr_rules(self, rules)
    }
    fn attachments(&self) -> Vec<Attachment> {
        let xdp = self
            .xdp_program()
            .ok()
            .and_then(|p| p.info().ok())
            .map(|i| i.id());
        let tc = self
            .tc_program()
            .ok()
            .and_then(|p| p.info().ok())
            .map(|i| i.id());
        let mut out: Vec<Attachment> = Dataplane::attachments(self)
            .into_iter()
            .map(|(interface, mode)| Attachment {
                interface,
                mode,
                program_id: match mode {
                    Attached::Tc => tc,
                    Attached::XdpNative | Attached::XdpGeneric => xdp,
                }
                .unwrap_or(0),
            })
            .collect();
        out.sort_by(|a, b| a.interface.cmp(&b.interface));
        out
    }
    fn capacity(&self) -> Option<u32> {
        Some(self.max_sessions())
    }
}

/// One interface enforcement is attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// The interface's name.
    pub interface: String,
    /// How the program is attached.
    pub mode: Attached,
    /// The attached program's kernel id (0 if it could not be read).
    pub program_id: u32,
}

/// The store of a closed manager: refuses every change.
struct Closed;

impl SessionStore for Closed {
    fn upsert_sessions(&mut self, _: &[Session]) -> Result<(), DataplaneError> {
        Err(DataplaneError::Invalid("idgate is shutting down".into()))
    }
    fn remove_sessions(&mut self, _: &[(IpAddr, ServiceId)]) -> Result<usize, DataplaneError> {
        Err(DataplaneError::Invalid("idgate is shutting down".into()))
    }
    fn sessions(&self) -> Result<Vec<Session>, DataplaneError> {
        Ok(Vec::new())
    }
}

/// Why a session change failed.
#[derive(Debug, Error)]
pub enum SessionError {
    /// The table refused it; nothing changed.
    #[error(transparent)]
    Table(#[from] super::TableError),
    /// The data plane failed; the source was cleared (fail closed).
    #[error("the data plane failed: {0}")]
    Dataplane(#[from] DataplaneError),
}

/// What a login did.
#[derive(Debug)]
pub struct LoginOutcome {
    /// The identity now behind the source.
    pub identity: Arc<IdentityRecord>,
    /// The different identity it replaced, if any.
    pub replaced: Option<Arc<IdentityRecord>>,
    /// The sessions installed, with their expiry.
    pub granted: Vec<Grant>,
}

/// What a logout or revocation removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Removed {
    /// Sources that lost their sessions.
    pub sources: usize,
    /// Sessions (source, service) that ended.
    pub sessions: usize,
}

/// What a configuration reload did to the sessions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Reevaluated {
    /// Sessions (source, service) the new policy no longer allows; ended.
    pub revoked: usize,
    /// Sources left without any session.
    pub sources_ended: usize,
    /// Sessions still allowed whose rule or expiry changed.
    pub updated: usize,
}

/// The data-plane side of a configuration reload.
#[derive(Debug)]
pub struct DataplaneUpdate<'a> {
    /// The new protected services.
    pub services: &'a [Service],
    /// The new CIDR rules.
    pub cidr_rules: &'a [CidrRule],
    /// The services in force, restored if the new ones cannot be applied.
    pub old_services: &'a [Service],
    /// The CIDR rules in force, restored if the new ones cannot be applied.
    pub old_cidr_rules: &'a [CidrRule],
}

/// What a start found of the sessions an earlier run left pinned (see
/// [`SessionManager::restore`]).
#[derive(Debug)]
pub struct Restored {
    table: SessionTable,
    ended: Vec<Ended>,
    /// What was adopted, and what was removed for lack of an owner or as expired.
    pub adopted: Adopted,
    /// What the policy this run starts with did to the adopted sessions.
    pub reevaluated: Reevaluated,
}

/// The session table and the data plane it drives.
pub struct SessionManager {
    table: SessionTable,
    store: Box<dyn SessionStore>,
    catalog: Arc<Catalog>,
    /// A kernel change failed: the map may hold entries the table does not.
    dirty: bool,
    /// Where logins and session ends are recorded.
    audit: AuditLog,
    /// Where the owners of pinned sessions are kept for the next run, if anywhere.
    journal: Option<SessionJournal>,
    /// The journal failed to take a change (logged once until it works again).
    journal_failing: bool,
}

impl std::fmt::Debug for SessionManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionManager")
            .field("table", &self.table)
            .field("dirty", &self.dirty)
            .finish_non_exhaustive()
    }
}

impl SessionManager {
    /// A manager over `store`, whose sessions map holds `capacity` entries; no session lasts
    /// longer than `max_lifetime`.
    pub fn new(
        store: Box<dyn SessionStore>,
        catalog: Arc<Catalog>,
        capacity: usize,
        max_lifetime: Duration,
    ) -> Self {
        Self {
            table: SessionTable::new(capacity, max_lifetime),
            store,
            catalog,
            dirty: false,
            audit: AuditLog::default(),
            journal: None,
            journal_failing: false,
        }
    }

    /// Adopts the sessions an earlier run left in `store` (its pinned kernel map), named by that
    /// run's `owners` (from its [`SessionJournal`]), as of `now`, then re-evaluates them with
    /// `decide` (the policy this run starts with) as a reload would. Removes from the kernel
    /// every entry not adopted (no consistent owner, or expired) or no longer allowed, then
    /// rewrites those whose rule, expiry or idle timeout changed.
    ///
    /// Call it before the new services and CIDR rules are written: service ids follow the file
    /// order, so a surviving entry must be gone before its id can name another service. On an
    /// error the kernel may still hold entries; the caller must not start (fail closed).
    pub fn restore(
        store: &mut dyn SessionStore,
        owners: Vec<OwnerRecord>,
        capacity: usize,
        max_lifetime: Duration,
        now: Now,
        decide: impl FnMut(IpAddr, &SourceRecord) -> Vec<ServiceDecision>,
    ) -> Result<Restored, DataplaneError> {
        let kernel = store.sessions()?;
        let mut table = SessionTable::new(capacity, max_lifetime);
        let (mut change, adopted) = table.adopt(owners, &kernel, now);
        let policy = table.reevaluate(now, max_lifetime, decide);
        let reevaluated = Reevaluated {
            revoked: policy.ended.len(),
            sources_ended: policy.sources_ended,
            updated: policy.upsert.len(),
        };
        change.remove.extend(policy.remove);
        if !change.remove.is_empty() {
            store.remove_sessions(&change.remove)?;
        }
        if !policy.upsert.is_empty() {
            store.upsert_sessions(&policy.upsert)?;
        }
        Ok(Restored {
            table,
            ended: policy.ended,
            adopted,
            reevaluated,
        })
    }

    /// A manager over `store` that carries on from `restored`: audits the sessions the new
    /// policy ended (`policy-changed`) and rewrites `journal` with what was adopted.
    pub fn resume(
        store: Box<dyn SessionStore>,
        catalog: Arc<Catalog>,
        restored: Restored,
        journal: Option<SessionJournal>,
        audit: AuditLog,
    ) -> Self {
        let mut manager = Self {
            table: restored.table,
            store,
            catalog,
            dirty: false,
            audit,
            journal,
            journal_failing: false,
        };
        manager.audit_ended(&restored.ended);
        manager.rewrite_journal();
        manager
    }

    /// Records to `audit` from now on (the default records to `tracing` only).
    pub fn set_audit(&mut self, audit: AuditLog) {
        self.audit = audit;
    }

    /// The audit trail this manager records to.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// Drops the data plane (detaching its programs); later changes fail. For shutdown, so that
    /// detaching does not wait for the last holder of the manager to go.
    pub fn close(&mut self) {
        self.store = Box::new(Closed);
    }

    /// The table, read-only.
    pub fn table(&self) -> &SessionTable {
        &self.table
    }

    /// The data plane, read-only.
    pub fn store(&self) -> &dyn SessionStore {
        &*self.store
    }

    /// A verified login at `source`: replaces what the source had with what the decisions allow,
    /// in the kernel and the table, and audits it.
    pub fn login(
        &mut self,
        source: IpAddr,
        who: NewIdentity,
        token_expires_at: SystemTime,
        decisions: &[ServiceDecision],
    ) -> Result<LoginOutcome, SessionError> {
        self.login_at(source, who, token_expires_at, decisions, Now::current())
    }

    /// [`login`](Self::login) as of `now`.
    pub fn login_at(
        &mut self,
        source: IpAddr,
        who: NewIdentity,
        token_expires_at: SystemTime,
        decisions: &[ServiceDecision],
        now: Now,
    ) -> Result<LoginOutcome, SessionError> {
        let source = source.to_canonical();
        let login = self
            .table
            .login(source, who, token_expires_at, decisions, now)?;
        if let Some(old) = &login.replaced {
            self.audit.record(&AuditEvent::Replaced {
                src: source,
                old,
                new: &login.identity,
            });
        }
        let applied = self.apply(&login.change);
        self.audit_ended(&login.change.ended);
        if let Err(e) = applied {
            self.fail_closed(source);
            return Err(e.into());
        }
        self.persist([source]);
        // Every decision reaches the audit observer (User-ID must learn of a session the policy
        // asked not to log); only those of logging rules are written.
        for d in decisions {
            let expires_at = login
                .granted
                .iter()
                .find(|g| g.service == d.service_id)
                .map(|g| g.expires_at);
            let action = if d.action == Action::Allow && d.needs_session && expires_at.is_none() {
                // Allowed, but the token expires before a session could start.
                "drop"
            } else {
                action_name(d.action)
            };
            let service = self.service(d.service_id, &d.service);
            let event = AuditEvent::Login {
                src: source,
                identity: &login.identity,
                service: &service,
                action,
                rule: d.rule.as_ref().map(|r| (r.name.as_str(), r.id)),
                expires_at,
            };
            if d.log {
                self.audit.record(&event);
            } else {
                self.audit.notify(&event);
            }
        }
        Ok(LoginOutcome {
            identity: login.identity,
            replaced: login.replaced,
            granted: login.granted,
        })
    }

    /// Remembers how the policy saw the identity just logged in at `source` (scopes and claims
    /// included), for reloads to evaluate the new policy against.
    pub fn set_policy_identity(&mut self, source: IpAddr, identity: Arc<Identity>) {
        self.table.set_policy_identity(source, identity);
        self.persist([source]);
    }

    /// A configuration reload: re-evaluates every session with `decide` (see
    /// [`SessionTable::reevaluate`](super::SessionTable::reevaluate)), removes from the kernel
    /// what is no longer allowed, then writes the new services and CIDR rules, then the sessions
    /// whose rule or expiry changed; audits the ended sessions (`policy-changed`) and names
    /// services from `catalog` from then on.
    ///
    /// Removing first means no moment allows more than either policy. If the data plane refuses
    /// the new services or CIDR rules, the old ones are written back and the error returned; the
    /// sessions already ended stay ended (fail closed) and the caller keeps the old policy.
    pub fn reload(
        &mut self,
        catalog: Arc<Catalog>,
        max_lifetime: Duration,
        dataplane: DataplaneUpdate<'_>,
        decide: impl FnMut(IpAddr, &super::SourceRecord) -> Vec<ServiceDecision>,
    ) -> Result<Reevaluated, DataplaneError> {
        let now = Now::current();
        let change = self.table.reevaluate(now, max_lifetime, decide);
        let outcome = Reevaluated {
            revoked: change.ended.len(),
            sources_ended: change.sources_ended,
            updated: change.upsert.len(),
        };
        if !change.remove.is_empty()
            && let Err(e) = self.store.remove_sessions(&change.remove)
        {
            tracing::error!(error = %e, "removing sessions the new policy refuses failed; will reconcile");
            self.dirty = true;
        }
        self.audit_ended(&change.ended);
        self.persist(touched(&change));
        let applied = self
            .store
            .set_services(dataplane.services)
            .and_then(|()| self.store.set_cidr_rules(dataplane.cidr_rules));
        if let Err(e) = applied {
            let restored = self
                .store
                .set_services(dataplane.old_services)
                .and_then(|()| self.store.set_cidr_rules(dataplane.old_cidr_rules));
            if let Err(r) = restored {
                tracing::error!(error = %r, "restoring the previous services and CIDR rules failed");
            }
            self.dirty = true;
            return Err(e);
        }
        if !change.upsert.is_empty()
            && let Err(e) = self.store.upsert_sessions(&change.upsert)
        {
            tracing::error!(error = %e, "updating sessions after a reload failed; will reconcile");
            self.dirty = true;
        }
        self.catalog = catalog;
        Ok(outcome)
    }

    /// Ends the sessions of `source` (the client logged out).
    pub fn logout(&mut self, source: IpAddr) -> Result<Removed, SessionError> {
        let change = self.table.end_source(source, EndReason::Logout);
        self.finish(change)
    }

    /// Ends the sessions of `source` (an administrator revoked them).
    pub fn revoke_source(&mut self, source: IpAddr) -> Result<Removed, SessionError> {
        let change = self.table.end_source(source, EndReason::Revoked);
        self.finish(change)
    }

    /// Ends the sessions of every source where `name` (user or subject) is logged in.
    pub fn revoke_user(&mut self, name: &str) -> Result<Removed, SessionError> {
        let change = self.table.end_user(name, EndReason::Revoked);
        self.finish(change)
    }

    /// Removes what has expired, from the kernel and the table, and audits it; reconciles the
    /// kernel map with the table if an earlier change failed. Returns how many sessions ended.
    pub fn sweep(&mut self) -> usize {
        self.sweep_at(Now::current())
    }

    /// [`sweep`](Self::sweep) as of `now`.
    pub fn sweep_at(&mut self, now: Now) -> usize {
        let change = self.table.expire(now);
        if let Err(e) = self.apply(&change) {
            tracing::error!(error = %e, "removing expired sessions failed; will reconcile");
        }
        self.audit_ended(&change.ended);
        self.persist(touched(&change));
        let ended = change.ended.len() + self.sweep_idle(now);
        if self.dirty {
            self.reconcile(now);
        }
        ended
    }

    /// Ends the sessions the kernel found idle past their rule's timeout (it already lets them
    /// carry nothing): asks the kernel only about grants whose last known activity plus the
    /// timeout has passed. Returns how many ended.
    fn sweep_idle(&mut self, now: Now) -> usize {
        let due = self.table.idle_due(now);
        if due.is_empty() {
            return 0;
        }
        let seen = match self.store.last_seen(&due) {
            Ok(seen) => seen,
            Err(e) => {
                tracing::error!(error = %e, "reading session activity failed; idle sessions stay closed in the kernel and are ended later");
                return 0;
            }
        };
        let seen: Vec<_> = due.into_iter().zip(seen).collect();
        let change = self.table.idle_seen(&seen, now);
        if let Err(e) = self.apply(&change) {
            tracing::error!(error = %e, "removing idle sessions failed; will reconcile");
        }
        self.audit_ended(&change.ended);
        self.persist(touched(&change));
        change.ended.len()
    }

    /// Applies a change that only removes, audits it and counts it.
    fn finish(&mut self, change: Change) -> Result<Removed, SessionError> {
        let applied = self.apply(&change);
        self.audit_ended(&change.ended);
        self.persist(touched(&change));
        applied?;
        Ok(Removed {
            sources: change.sources_ended,
            sessions: change.ended.len(),
        })
    }

    fn apply(&mut self, change: &Change) -> Result<(), DataplaneError> {
        let result = (|| {
            if !change.remove.is_empty() {
                self.store.remove_sessions(&change.remove)?;
            }
            if !change.upsert.is_empty() {
                self.store.upsert_sessions(&change.upsert)?;
            }
            Ok(())
        })();
        if result.is_err() {
            self.dirty = true;
        }
        result
    }

    /// After a failed login change: nothing at all for `source`, in the table and the kernel.
    fn fail_closed(&mut self, source: IpAddr) {
        let change = self.table.end_source(source, EndReason::Error);
        self.audit_ended(&change.ended);
        self.persist([source]);
        let keys: Vec<_> = self.catalog.iter().map(|s| (source, s.id)).collect();
        if let Err(e) = self.store.remove_sessions(&keys) {
            tracing::error!(%source, error = %e, "clearing a source after a failure failed; will reconcile");
            self.dirty = true;
        }
    }

    /// Removes kernel entries the table does not hold (left by failed changes) or that expired.
    fn reconcile(&mut self, now: Now) {
        let kernel = match self.store.sessions() {
            Ok(k) => k,
            Err(e) => {
                tracing::error!(error = %e, "listing kernel sessions to reconcile failed");
                return;
            }
        };
        let stale: Vec<_> = kernel
            .iter()
            .filter(|s| {
                s.expires <= now.mono || !self.table.holds(s.source, s.service, s.identity_id)
            })
            .map(|s| (s.source, s.service))
            .collect();
        match self.store.remove_sessions(&stale) {
            Ok(n) => {
                if n > 0 {
                    tracing::warn!(
                        removed = n,
                        "reconciled: removed kernel sessions the table did not hold"
                    );
                }
                self.dirty = false;
            }
            Err(e) => tracing::error!(error = %e, "reconciling kernel sessions failed"),
        }
    }

    /// Records the current state of `sources` in the journal (their record, or that they have
    /// none), and rewrites it when it has grown enough. A journal that fails costs the next run
    /// the names of these sessions (it then removes them), never enforcement now: logged, not
    /// returned.
    fn persist(&mut self, sources: impl IntoIterator<Item = IpAddr>) {
        let Some(journal) = &mut self.journal else {
            return;
        };
        let mut result = Ok(());
        for source in sources {
            let source = source.to_canonical();
            result = match self.table.get(source) {
                Some(r) => journal.put(&OwnerRecord::of(source, r)),
                None => journal.del(source),
            }
            .and(result);
        }
        if result.is_ok() && journal.wants_rewrite() {
            return self.rewrite_journal();
        }
        self.journal_result(result);
    }

    /// Rewrites the journal with the whole table.
    fn rewrite_journal(&mut self) {
        let Some(journal) = &mut self.journal else {
            return;
        };
        let records: Vec<OwnerRecord> = self
            .table
            .iter()
            .map(|(s, r)| OwnerRecord::of(*s, r))
            .collect();
        let result = journal.rewrite(&records);
        self.journal_result(result);
    }

    fn journal_result(&mut self, result: Result<(), super::journal::JournalError>) {
        match result {
            Ok(()) if self.journal_failing => {
                tracing::info!("the session journal works again");
                self.journal_failing = false;
            }
            Ok(()) => {}
            Err(e) if !self.journal_failing => {
                tracing::error!(
                    error = %e,
                    "the session journal failed: sessions changed from now on are enforced, but \
                     a restart cannot name them and will remove them"
                );
                self.journal_failing = true;
            }
            Err(_) => {}
        }
    }

    fn audit_ended(&self, ended: &[Ended]) {
        for e in ended {
            let service = self.service(e.grant.service, &e.grant.service_name);
            self.audit.record(&AuditEvent::SessionEnd {
                src: e.source,
                identity: &e.identity,
                service: &service,
                rule: (&e.grant.rule.name, e.grant.rule.id),
                reason: e.reason.as_str(),
            });
        }
    }

    fn service<'a>(&'a self, id: ServiceId, name: &str) -> Cow<'a, ServiceInfo> {
        match self.catalog.get(id) {
            Some(s) => Cow::Borrowed(s),
            None => Cow::Owned(ServiceInfo {
                id,
                name: name.to_owned(),
                protocol: Protocol::Tcp,
                port: 0,
            }),
        }
    }
}

/// The sources a change touched.
fn touched(change: &Change) -> BTreeSet<IpAddr> {
    change
        .remove
        .iter()
        .map(|(s, _)| *s)
        .chain(change.upsert.iter().map(|s| s.source))
        .chain(change.ended.iter().map(|e| e.source))
        .collect()
}

fn action_name(a: Action) -> &'static str {
    match a {
        Action::Allow => "allow",
        Action::Drop => "drop",
        Action::Reset => "reset",
    }
}
