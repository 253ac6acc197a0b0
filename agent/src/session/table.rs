//! The userspace session table: who is behind each source address, and what each source may
//! reach until when. It mirrors the kernel's sessions map and names the identities the kernel
//! only knows by id.
//!
//! The table is pure bookkeeping: every change returns the kernel entries to remove and to write,
//! and the sessions that ended, for the [`super::SessionManager`] to apply and audit.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::Serialize;

use super::{
    ids::IdAllocator,
    journal::{OwnerRecord, from_unix_ms},
    time::rfc3339,
};
use crate::{
    dataplane::{Expiry, ServiceId, Session},
    policy::{Action, Identity, MatchedRule, ServiceDecision},
};

/// One instant on both clocks: the wall clock for token `exp`, the kernel's monotonic clock for
/// session expiry.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    /// Wall clock.
    pub wall: SystemTime,
    /// The kernel's (coarse) monotonic clock.
    pub mono: Expiry,
}

impl Now {
    /// The current instant.
    pub fn current() -> Now {
        Now {
            wall: SystemTime::now(),
            mono: Expiry::after(Duration::ZERO),
        }
    }
}

/// Who presented a token, as the table keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NewIdentity {
    /// The token's issuer.
    pub issuer: String,
    /// The token's `sub`.
    pub subject: String,
    /// The user (the issuer's user claim).
    pub user: String,
    /// The groups the token carried.
    pub groups: Vec<String>,
}

/// An identity with its id, shared by every source it is logged in from.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct IdentityRecord {
    /// The id the kernel's session entries carry.
    pub id: u32,
    /// The token's issuer.
    pub issuer: String,
    /// The token's `sub`.
    pub subject: String,
    /// The user (the issuer's user claim).
    pub user: String,
    /// The groups the token carried.
    pub groups: Vec<String>,
}

/// One service a source may reach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The service.
    pub service: ServiceId,
    /// The service's name.
    pub service_name: String,
    /// The rule that allowed it.
    pub rule: MatchedRule,
    /// When it was granted (its lifetime counts from here).
    pub started: Expiry,
    /// When the kernel stops letting it through.
    pub expires: Expiry,
    /// The same instant on the wall clock, for people.
    pub expires_at: SystemTime,
    /// Whether the rule asks for logging.
    pub log: bool,
    /// The rule's idle timeout, which the kernel enforces.
    pub idle: Option<Duration>,
    /// With an idle timeout: when to next ask the kernel whether the session went idle (its
    /// last known activity plus the timeout).
    pub idle_check: Expiry,
}

/// What the table knows about one source address.
#[derive(Clone, Debug)]
pub struct SourceRecord {
    /// The identity logged in from it (one per source, as PAN-OS User-ID maps an address to one
    /// user).
    pub identity: Arc<IdentityRecord>,
    /// When that identity first logged in from here.
    pub since: SystemTime,
    /// The latest token's `exp`.
    pub token_expires_at: SystemTime,
    /// The services it may reach.
    pub grants: BTreeMap<ServiceId, Grant>,
    /// The identity as the policy saw it at login (scopes and claims included), so that a
    /// configuration reload can evaluate the new policy for it.
    pub policy_identity: Option<Arc<Identity>>,
}

/// Why a session ended (PAN-OS `session_end_reason` style).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndReason {
    /// Its expiry passed (token `exp`, rule or global lifetime).
    Expired,
    /// The client logged out.
    Logout,
    /// An administrator revoked it.
    Revoked,
    /// Another identity logged in from the same source.
    Replaced,
    /// The same identity presented a new token that no longer allows the service.
    Refreshed,
    /// The data plane refused a change; the source was cleared to fail closed.
    Error,
    /// A configuration reload: the new policy no longer allows it.
    PolicyChanged,
    /// It carried no packet for its rule's idle timeout (PAN-OS: `aged-out`).
    AgedOut,
}

impl EndReason {
    /// The reason as written in audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Expired => "expired",
            EndReason::Logout => "logout",
            EndReason::Revoked => "revoked",
            EndReason::Replaced => "replaced",
            EndReason::Refreshed => "refreshed",
            EndReason::Error => "error",
            EndReason::PolicyChanged => "policy-changed",
            EndReason::AgedOut => "aged-out",
        }
    }
}

/// A session (one source, one service) that ended.
#[derive(Clone, Debug)]
pub struct Ended {
    /// The source.
    pub source: IpAddr,
    /// Who it belonged to.
    pub identity: Arc<IdentityRecord>,
    /// What it allowed.
    pub grant: Grant,
    /// Why it ended.
    pub reason: EndReason,
}

/// What a table change requires of the kernel, and what it ended.
#[derive(Debug, Default)]
pub struct Change {
    /// Entries to remove first (so that no moment allows more than either state).
    pub remove: Vec<(IpAddr, ServiceId)>,
    /// Entries to write next.
    pub upsert: Vec<Session>,
    /// Sessions that ended.
    pub ended: Vec<Ended>,
    /// Sources that no longer have any session.
    pub sources_ended: usize,
}

/// The result of a login in the table.
#[derive(Debug)]
pub struct Login {
    /// The kernel changes and ended sessions.
    pub change: Change,
    /// The identity now behind the source.
    pub identity: Arc<IdentityRecord>,
    /// The identity it replaced, if another one (issuer and subject) held the source.
    pub replaced: Option<Arc<IdentityRecord>>,
    /// The services granted, with their expiry.
    pub granted: Vec<Grant>,
}

/// Why the table refused a change (nothing was changed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The kernel's sessions map would overflow.
    #[error("the sessions map is full ({capacity} entries)")]
    Full {
        /// The map's capacity.
        capacity: usize,
    },
    /// No identity id is free.
    #[error("no identity id is free")]
    IdsExhausted,
}

/// What adopting an earlier run's sessions found (see [`SessionTable::adopt`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Adopted {
    /// Sources adopted with their identity.
    pub sources: usize,
    /// Kernel entries adopted.
    pub sessions: usize,
    /// Kernel entries no record names consistently (identity id, service and rule); removed.
    pub unowned: usize,
    /// Kernel entries already expired; removed.
    pub expired: usize,
}

/// When a session opened now ends: at the token's `exp`, the rule's lifetime or the global
/// lifetime, whichever comes first. `None` if that is not in the future.
pub fn grant_expiry(
    now: Now,
    token_expires_at: SystemTime,
    rule_lifetime: Duration,
    global_lifetime: Duration,
) -> Option<(Expiry, SystemTime)> {
    let left = token_expires_at.duration_since(now.wall).ok()?;
    let left = left.min(rule_lifetime).min(global_lifetime);
    if left.is_zero() {
        return None;
    }
    let ns = u64::try_from(left.as_nanos()).unwrap_or(u64::MAX);
    Some((
        Expiry::from_ns(now.mono.as_ns().saturating_add(ns)),
        now.wall + left,
    ))
}

/// Ends `record`'s grant for `service` (if it has one) into `change`; whether it had one.
fn end_grant(
    record: &mut SourceRecord,
    source: IpAddr,
    service: ServiceId,
    reason: EndReason,
    change: &mut Change,
) -> bool {
    let Some(grant) = record.grants.remove(&service) else {
        return false;
    };
    change.remove.push((source, service));
    change.ended.push(Ended {
        source,
        identity: record.identity.clone(),
        grant,
        reason,
    });
    true
}

/// When to first ask the kernel whether a grant written at `at` with `idle` went idle.
fn idle_check(at: Expiry, idle: Option<Duration>) -> Expiry {
    let ns = idle.map_or(u64::MAX, |d| {
        u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
    });
    Expiry::from_ns(at.as_ns().saturating_add(ns))
}

/// The session table.
#[derive(Debug)]
pub struct SessionTable {
    ids: IdAllocator,
    /// id → identity and the number of sources it is logged in from.
    identities: HashMap<u32, (Arc<IdentityRecord>, usize)>,
    interned: HashMap<NewIdentity, u32>,
    sources: HashMap<IpAddr, SourceRecord>,
    /// Kernel entries the table accounts for (sum of grants).
    entries: usize,
    capacity: usize,
    max_lifetime: Duration,
}

impl SessionTable {
    /// An empty table for a sessions map of `capacity` entries and a global lifetime bound.
    pub fn new(capacity: usize, max_lifetime: Duration) -> Self {
        Self {
            ids: IdAllocator::default(),
            identities: HashMap::new(),
            interned: HashMap::new(),
            sources: HashMap::new(),
            entries: 0,
            capacity,
            max_lifetime,
        }
    }

    /// A login: `who`, holding a token that expires at `token_expires_at`, at `source`, with the
    /// policy's decisions. Replaces whatever the source had. Refused whole (nothing changes) if
    /// the kernel map would overflow.
    pub fn login(
        &mut self,
        source: IpAddr,
        who: NewIdentity,
        token_expires_at: SystemTime,
        decisions: &[ServiceDecision],
        now: Now,
    ) -> Result<Login, TableError> {
        let source = source.to_canonical();
        let mut grants = BTreeMap::new();
        for d in decisions {
            if d.action != Action::Allow || !d.needs_session {
                continue;
            }
            let Some(rule) = d.rule.clone() else {
                continue;
            };
            let lifetime = d.max_session_lifetime.unwrap_or(self.max_lifetime);
            let Some((expires, expires_at)) =
                grant_expiry(now, token_expires_at, lifetime, self.max_lifetime)
            else {
                continue;
            };
            grants.insert(
                d.service_id,
                Grant {
                    service: d.service_id,
                    service_name: d.service.clone(),
                    rule,
                    started: now.mono,
                    expires,
                    expires_at,
                    log: d.log,
                    idle: d.idle_timeout,
                    idle_check: idle_check(now.mono, d.idle_timeout),
                },
            );
        }

        let old_entries = self.sources.get(&source).map_or(0, |r| r.grants.len());
        if self.entries - old_entries + grants.len() > self.capacity {
            return Err(TableError::Full {
                capacity: self.capacity,
            });
        }
        let same_subject = self
            .sources
            .get(&source)
            .is_some_and(|r| r.identity.issuer == who.issuer && r.identity.subject == who.subject);
        let identity = self.intern(who)?;
        let mut change = Change::default();
        let mut replaced = None;
        let mut since = now.wall;
        if let Some(old) = self.sources.remove(&source) {
            let same = same_subject;
            let reason = if same {
                since = old.since;
                EndReason::Refreshed
            } else {
                replaced = Some(old.identity.clone());
                EndReason::Replaced
            };
            for (service, grant) in old.grants {
                let granted_again = grants.contains_key(&service);
                if !granted_again {
                    change.remove.push((source, service));
                }
                // Another identity's session ends even where the newcomer gets the same
                // service; the same identity's just continues with the new expiry.
                if !(same && granted_again) {
                    change.ended.push(Ended {
                        source,
                        identity: old.identity.clone(),
                        grant,
                        reason,
                    });
                }
            }
            self.entries -= old_entries;
            self.release(old.identity.id);
            if grants.is_empty() {
                change.sources_ended = 1;
            }
        }
        let granted: Vec<Grant> = grants.values().cloned().collect();
        if grants.is_empty() {
            self.release(identity.id);
        } else {
            change.upsert = grants
                .values()
                .map(|g| Session {
                    source,
                    service: g.service,
                    expires: g.expires,
                    identity_id: identity.id,
                    rule_id: g.rule.id,
                    idle: g.idle,
                })
                .collect();
            self.entries += grants.len();
            self.sources.insert(
                source,
                SourceRecord {
                    identity: identity.clone(),
                    since,
                    token_expires_at,
                    grants,
                    policy_identity: None,
                },
            );
        }
        Ok(Login {
            change,
            identity,
            replaced,
            granted,
        })
    }

    /// Adopts the sessions an earlier run left in the kernel (`kernel`), named by that run's
    /// owner records. A kernel entry is adopted only if the record of its source carries its
    /// identity id, its service and its rule; it keeps its kernel expiry. Every other entry, and
    /// every expired one, is to be removed (the returned change's `remove`; nothing is audited
    /// for them, as nothing names them). Records without kernel entries are dropped. Meant for an
    /// empty table, at start.
    pub fn adopt(
        &mut self,
        owners: Vec<OwnerRecord>,
        kernel: &[Session],
        now: Now,
    ) -> (Change, Adopted) {
        let mut owners: HashMap<IpAddr, OwnerRecord> = owners
            .into_iter()
            .map(|o| (o.source.to_canonical(), o))
            .collect();
        let mut by_source: BTreeMap<IpAddr, Vec<&Session>> = BTreeMap::new();
        for k in kernel {
            by_source
                .entry(k.source.to_canonical())
                .or_default()
                .push(k);
        }
        let mut change = Change::default();
        let mut adopted = Adopted::default();
        for (source, entries) in by_source {
            let owner = owners.remove(&source);
            let mut grants = BTreeMap::new();
            for k in entries {
                let record = owner.as_ref().and_then(|o| {
                    let g = o.grants.iter().find(|g| g.service_id == k.service.get())?;
                    (o.identity_id == k.identity_id && g.rule_id == k.rule_id).then_some(g)
                });
                match record {
                    _ if k.expires <= now.mono => {
                        adopted.expired += 1;
                        change.remove.push((source, k.service));
                    }
                    None => {
                        adopted.unowned += 1;
                        change.remove.push((source, k.service));
                    }
                    Some(g) => {
                        let left = Duration::from_nanos(
                            k.expires.as_ns().saturating_sub(now.mono.as_ns()),
                        );
                        grants.insert(
                            k.service,
                            Grant {
                                service: k.service,
                                service_name: g.service.clone(),
                                rule: MatchedRule {
                                    id: g.rule_id,
                                    name: g.rule.clone(),
                                },
                                started: Expiry::from_ns(g.started_ns),
                                expires: k.expires,
                                expires_at: now.wall + left,
                                log: g.log,
                                idle: k.idle,
                                idle_check: idle_check(now.mono, k.idle),
                            },
                        );
                    }
                }
            }
            let Some(owner) = owner.filter(|_| !grants.is_empty()) else {
                continue;
            };
            let who = NewIdentity {
                issuer: owner.issuer.clone(),
                subject: owner.subject.clone(),
                user: owner.user.clone(),
                groups: owner.groups.clone(),
            };
            let Some(identity) = self.intern_as(who, owner.identity_id) else {
                // Another identity holds the id: the records contradict each other.
                adopted.unowned += grants.len();
                change
                    .remove
                    .extend(grants.keys().map(|service| (source, *service)));
                continue;
            };
            adopted.sources += 1;
            adopted.sessions += grants.len();
            self.entries += grants.len();
            self.sources.insert(
                source,
                SourceRecord {
                    identity,
                    since: from_unix_ms(owner.since_ms),
                    token_expires_at: from_unix_ms(owner.token_expires_ms),
                    grants,
                    policy_identity: owner.policy_identity(),
                },
            );
        }
        (change, adopted)
    }

    /// Ends every session of `source`.
    pub fn end_source(&mut self, source: IpAddr, reason: EndReason) -> Change {
        let mut change = Change::default();
        self.end_into(source.to_canonical(), reason, &mut change);
        change
    }

    /// Ends every session of the identities whose user or subject is `name` (from any issuer).
    pub fn end_user(&mut self, name: &str, reason: EndReason) -> Change {
        let sources: Vec<IpAddr> = self
            .sources
            .iter()
            .filter(|(_, r)| r.identity.user == name || r.identity.subject == name)
            .map(|(s, _)| *s)
            .collect();
        let mut change = Change::default();
        for s in sources {
            self.end_into(s, reason, &mut change);
        }
        change
    }

    fn end_into(&mut self, source: IpAddr, reason: EndReason, change: &mut Change) {
        let Some(old) = self.sources.remove(&source) else {
            return;
        };
        self.entries -= old.grants.len();
        self.release(old.identity.id);
        change.sources_ended += 1;
        for (service, grant) in old.grants {
            change.remove.push((source, service));
            change.ended.push(Ended {
                source,
                identity: old.identity.clone(),
                grant,
                reason,
            });
        }
    }

    /// Ends what has expired by `now`: grants whose kernel expiry passed, and every grant of a
    /// source whose token `exp` passed on the wall clock (which the monotonic expiry would miss
    /// if the wall clock was stepped forward).
    pub fn expire(&mut self, now: Now) -> Change {
        let mut change = Change::default();
        let mut emptied = Vec::new();
        for (source, record) in &mut self.sources {
            let token_over = record.token_expires_at <= now.wall;
            let over: Vec<ServiceId> = record
                .grants
                .values()
                .filter(|g| token_over || g.expires <= now.mono)
                .map(|g| g.service)
                .collect();
            for service in over {
                if end_grant(record, *source, service, EndReason::Expired, &mut change) {
                    self.entries -= 1;
                }
            }
            if record.grants.is_empty() {
                emptied.push(*source);
            }
        }
        self.drop_emptied(emptied, &mut change);
        change
    }

    /// Grants with an idle timeout due for a look at the kernel: their last known activity plus
    /// the timeout has passed by `now`.
    pub fn idle_due(&self, now: Now) -> Vec<(IpAddr, ServiceId)> {
        let mut due: Vec<_> = self
            .sources
            .iter()
            .flat_map(|(s, r)| {
                r.grants
                    .values()
                    .filter(|g| g.idle.is_some() && g.idle_check <= now.mono)
                    .map(|g| (*s, g.service))
            })
            .collect();
        due.sort();
        due
    }

    /// What the kernel says of the grants [`idle_due`](Self::idle_due) named: each one's last
    /// activity (`None`: the kernel no longer holds it). Grants idle past their timeout by `now`
    /// end ([`EndReason::AgedOut`]); the others are looked at again once their timeout has
    /// passed since that activity.
    pub fn idle_seen(
        &mut self,
        seen: &[((IpAddr, ServiceId), Option<Expiry>)],
        now: Now,
    ) -> Change {
        let mut change = Change::default();
        for &((source, service), last) in seen {
            let Some(record) = self.sources.get_mut(&source) else {
                continue;
            };
            let Some(grant) = record.grants.get_mut(&service) else {
                continue;
            };
            let Some(idle) = grant.idle else {
                continue;
            };
            let next = last.map(|l| idle_check(l, Some(idle)));
            match next {
                Some(next) if next > now.mono => grant.idle_check = next,
                _ => {
                    if end_grant(record, source, service, EndReason::AgedOut, &mut change) {
                        self.entries -= 1;
                    }
                }
            }
        }
        let emptied: Vec<IpAddr> = change
            .ended
            .iter()
            .map(|e| e.source)
            .filter(|s| self.sources.get(s).is_some_and(|r| r.grants.is_empty()))
            .collect();
        self.drop_emptied(emptied, &mut change);
        change
    }

    /// Remembers how the policy saw the identity logged in at `source` (for reloads).
    pub fn set_policy_identity(&mut self, source: IpAddr, identity: Arc<Identity>) {
        if let Some(r) = self.sources.get_mut(&source.to_canonical()) {
            r.policy_identity = Some(identity);
        }
    }

    /// The global lifetime bound.
    pub fn max_lifetime(&self) -> Duration {
        self.max_lifetime
    }

    /// A configuration reload: `decide` gives the new policy's decisions for each source. A
    /// grant the new decisions do not allow with a session (or that now names another service:
    /// ids follow the file order) ends with [`EndReason::PolicyChanged`]; a grant still allowed
    /// keeps its expiry, capped by the new rule and global lifetimes counted from when it was
    /// granted, and takes the new rule's id, name and logging. `max_lifetime` bounds later
    /// logins too.
    pub fn reevaluate(
        &mut self,
        now: Now,
        max_lifetime: Duration,
        mut decide: impl FnMut(IpAddr, &SourceRecord) -> Vec<ServiceDecision>,
    ) -> Change {
        self.max_lifetime = max_lifetime;
        let mut change = Change::default();
        let mut emptied = Vec::new();
        let mut sources: Vec<IpAddr> = self.sources.keys().copied().collect();
        sources.sort();
        for source in sources {
            let Some(record) = self.sources.get_mut(&source) else {
                continue;
            };
            let decisions = decide(source, record);
            let services: Vec<ServiceId> = record.grants.keys().copied().collect();
            for service in services {
                let Some(grant) = record.grants.get_mut(&service) else {
                    continue;
                };
                let kept = decisions
                    .iter()
                    .find(|d| d.service_id == service && d.service == grant.service_name)
                    .filter(|d| d.action == Action::Allow && d.needs_session)
                    .and_then(|d| {
                        let rule = d.rule.clone()?;
                        let lifetime = d
                            .max_session_lifetime
                            .unwrap_or(max_lifetime)
                            .min(max_lifetime);
                        let ns = u64::try_from(lifetime.as_nanos()).unwrap_or(u64::MAX);
                        let cap = Expiry::from_ns(grant.started.as_ns().saturating_add(ns));
                        let expires = grant.expires.min(cap);
                        (expires > now.mono).then_some((rule, expires, d.log, d.idle_timeout))
                    });
                match kept {
                    Some((rule, expires, log, idle)) => {
                        if expires == grant.expires
                            && rule == grant.rule
                            && log == grant.log
                            && idle == grant.idle
                        {
                            continue;
                        }
                        let shortened = grant.expires.as_ns().saturating_sub(expires.as_ns());
                        grant.expires_at -= Duration::from_nanos(shortened);
                        grant.expires = expires;
                        grant.rule = rule;
                        grant.log = log;
                        if idle != grant.idle {
                            // Rewriting the entry counts as activity in the kernel.
                            grant.idle = idle;
                            grant.idle_check = idle_check(now.mono, idle);
                        }
                        change.upsert.push(Session {
                            source,
                            service,
                            expires,
                            identity_id: record.identity.id,
                            rule_id: grant.rule.id,
                            idle: grant.idle,
                        });
                    }
                    None => {
                        if end_grant(
                            record,
                            source,
                            service,
                            EndReason::PolicyChanged,
                            &mut change,
                        ) {
                            self.entries -= 1;
                        }
                    }
                }
            }
            if record.grants.is_empty() {
                emptied.push(source);
            }
        }
        self.drop_emptied(emptied, &mut change);
        change
    }

    /// The record of `source`.
    pub fn get(&self, source: IpAddr) -> Option<&SourceRecord> {
        self.sources.get(&source.to_canonical())
    }

    /// Every source with its record.
    pub fn iter(&self) -> impl Iterator<Item = (&IpAddr, &SourceRecord)> {
        self.sources.iter()
    }

    /// Whether the kernel entry (source, service) with `identity_id` is one the table holds.
    pub fn holds(&self, source: IpAddr, service: ServiceId, identity_id: u32) -> bool {
        self.get(source)
            .is_some_and(|r| r.identity.id == identity_id && r.grants.contains_key(&service))
    }

    /// The identity a data-plane event names: the one logged in at `source` if it has that id
    /// (ids are reused, so the source disambiguates), else whoever has the id now.
    pub fn identity_for(&self, source: IpAddr, identity_id: u32) -> Option<Arc<IdentityRecord>> {
        if identity_id == 0 {
            return None;
        }
        match self.get(source) {
            Some(r) if r.identity.id == identity_id => Some(r.identity.clone()),
            _ => self.identities.get(&identity_id).map(|(i, _)| i.clone()),
        }
    }

    /// Sources with sessions.
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    /// Whether no source has a session.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// Kernel entries the table accounts for.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Identities with at least one source.
    pub fn identities(&self) -> usize {
        self.identities.len()
    }

    /// The view of one source, for whois.
    pub fn view(&self, source: IpAddr) -> Option<SessionView> {
        let source = source.to_canonical();
        self.sources
            .get(&source)
            .map(|r| SessionView::of(source, r))
    }

    /// Views of every source, ordered by address.
    pub fn views(&self) -> Vec<SessionView> {
        let mut out: Vec<_> = self
            .sources
            .iter()
            .map(|(s, r)| SessionView::of(*s, r))
            .collect();
        out.sort_by_key(|v| v.source);
        out
    }

    fn intern(&mut self, who: NewIdentity) -> Result<Arc<IdentityRecord>, TableError> {
        if let Some(id) = self.interned.get(&who)
            && let Some((record, refs)) = self.identities.get_mut(id)
        {
            *refs += 1;
            return Ok(record.clone());
        }
        let id = self.ids.allocate().ok_or(TableError::IdsExhausted)?;
        Ok(self.insert_identity(who, id))
    }

    /// Forgets the `emptied` sources (left without grants), releasing their identities.
    fn drop_emptied(&mut self, emptied: impl IntoIterator<Item = IpAddr>, change: &mut Change) {
        for source in emptied {
            if let Some(old) = self.sources.remove(&source) {
                self.release(old.identity.id);
                change.sources_ended += 1;
            }
        }
    }

    /// Records `who` under `id` (handed out already), with one source.
    fn insert_identity(&mut self, who: NewIdentity, id: u32) -> Arc<IdentityRecord> {
        let record = Arc::new(IdentityRecord {
            id,
            issuer: who.issuer.clone(),
            subject: who.subject.clone(),
            user: who.user.clone(),
            groups: who.groups.clone(),
        });
        self.interned.insert(who, id);
        self.identities.insert(id, (record.clone(), 1));
        record
    }

    /// Interns `who` under the id an earlier run gave it; `None` if that id is taken by another
    /// identity (or `who` already has another id).
    fn intern_as(&mut self, who: NewIdentity, id: u32) -> Option<Arc<IdentityRecord>> {
        if let Some(&have) = self.interned.get(&who) {
            let (record, refs) = self.identities.get_mut(&have)?;
            if have != id {
                return None;
            }
            *refs += 1;
            return Some(record.clone());
        }
        if self.identities.contains_key(&id) || !self.ids.reserve(id) {
            return None;
        }
        Some(self.insert_identity(who, id))
    }

    fn release(&mut self, id: u32) {
        let Some((record, refs)) = self.identities.get_mut(&id) else {
            return;
        };
        *refs -= 1;
        if *refs > 0 {
            return;
        }
        let key = NewIdentity {
            issuer: record.issuer.clone(),
            subject: record.subject.clone(),
            user: record.user.clone(),
            groups: record.groups.clone(),
        };
        self.interned.remove(&key);
        self.identities.remove(&id);
        self.ids.release(id);
    }
}

/// One source's sessions, as the admin API shows them.
#[derive(Clone, Debug, Serialize)]
pub struct SessionView {
    /// The source address.
    pub source: IpAddr,
    /// The identity id the kernel entries carry.
    pub identity_id: u32,
    /// The user.
    pub user: String,
    /// The token's `sub`.
    pub subject: String,
    /// The token's issuer.
    pub issuer: String,
    /// The token's groups.
    pub groups: Vec<String>,
    /// When this identity logged in from this source (RFC 3339).
    pub since: String,
    /// The latest token's `exp` (RFC 3339).
    pub token_expires_at: String,
    /// The latest expiry of any of its services (RFC 3339).
    pub expires_at: String,
    /// Per service: the rule that allowed it and its expiry.
    pub services: Vec<ServiceView>,
}

/// One service of a [`SessionView`].
#[derive(Clone, Debug, Serialize)]
pub struct ServiceView {
    /// The service's name.
    pub service: String,
    /// The service's id.
    pub service_id: u32,
    /// The rule that allowed it.
    pub rule: MatchedRule,
    /// When it expires (RFC 3339).
    pub expires_at: String,
    /// Its idle timeout in seconds, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<u64>,
}

impl SessionView {
    fn of(source: IpAddr, r: &SourceRecord) -> SessionView {
        let latest = r
            .grants
            .values()
            .map(|g| g.expires_at)
            .max()
            .unwrap_or(r.token_expires_at);
        SessionView {
            source,
            identity_id: r.identity.id,
            user: r.identity.user.clone(),
            subject: r.identity.subject.clone(),
            issuer: r.identity.issuer.clone(),
            groups: r.identity.groups.clone(),
            since: rfc3339(r.since),
            token_expires_at: rfc3339(r.token_expires_at),
            expires_at: rfc3339(latest),
            services: r
                .grants
                .values()
                .map(|g| ServiceView {
                    service: g.service_name.clone(),
                    service_id: g.service.get(),
                    rule: g.rule.clone(),
                    expires_at: rfc3339(g.expires_at),
                    idle_timeout_s: g.idle.map(|d| d.as_secs()),
                })
                .collect(),
        }
    }
}
