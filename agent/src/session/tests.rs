//! Session table and manager: replacement, id reuse, expiry, fail-closed behaviour, against a
//! fake data plane (no root needed).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use super::*;
use crate::{
    dataplane::{DataplaneError, Expiry, Protocol, ServiceId, Session},
    policy::{Action, MatchedRule, ServiceDecision},
};

const HOUR: Duration = Duration::from_secs(3600);

fn sid(n: u32) -> ServiceId {
    ServiceId::new(n).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn now() -> Now {
    Now {
        wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        mono: Expiry::from_ns(1_000_000_000_000),
    }
}

fn later(n: Now, d: Duration) -> Now {
    Now {
        wall: n.wall + d,
        mono: Expiry::from_ns(n.mono.as_ns() + d.as_nanos() as u64),
    }
}

fn who(user: &str, groups: &[&str]) -> NewIdentity {
    NewIdentity {
        issuer: "https://idp.example".into(),
        subject: format!("sub-{user}"),
        user: user.into(),
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
    }
}

fn allow(service: u32, rule: u32, lifetime: Option<Duration>) -> ServiceDecision {
    ServiceDecision {
        service_id: sid(service),
        service: format!("svc{service}"),
        action: Action::Allow,
        rule: Some(MatchedRule {
            id: rule,
            name: format!("rule{rule}"),
        }),
        needs_session: true,
        max_session_lifetime: lifetime,
        idle_timeout: None,
        log: true,
    }
}

fn deny(service: u32) -> ServiceDecision {
    ServiceDecision {
        service_id: sid(service),
        service: format!("svc{service}"),
        action: Action::Drop,
        rule: None,
        needs_session: false,
        max_session_lifetime: None,
        idle_timeout: None,
        log: true,
    }
}

#[test]
fn expiry_is_the_earliest_of_token_rule_and_global() {
    let n = now();
    let at = |token: u64, rule: u64, global: u64| {
        grant_expiry(
            n,
            n.wall + Duration::from_secs(token),
            Duration::from_secs(rule),
            Duration::from_secs(global),
        )
        .map(|(mono, wall)| {
            let left = wall.duration_since(n.wall).unwrap();
            assert_eq!(mono.as_ns() - n.mono.as_ns(), left.as_nanos() as u64);
            left.as_secs()
        })
    };
    assert_eq!(at(300, 3600, 7200), Some(300), "token first");
    assert_eq!(at(7200, 600, 3600), Some(600), "rule first");
    assert_eq!(at(7200, 3600, 900), Some(900), "global first");
    assert_eq!(
        grant_expiry(n, n.wall - Duration::from_secs(1), HOUR, HOUR),
        None,
        "a token already past exp opens nothing"
    );
    assert_eq!(grant_expiry(n, n.wall, HOUR, HOUR), None);
}

#[test]
fn login_grants_only_session_allows_with_ids() {
    let mut t = SessionTable::new(100, 12 * HOUR);
    let n = now();
    let token_exp = n.wall + HOUR;
    let mut static_allow = allow(3, 1, None);
    static_allow.needs_session = false;
    let login = t
        .login(
            ip("192.0.2.7"),
            who("alice", &["admins"]),
            token_exp,
            &[
                allow(1, 4, Some(600 * Duration::from_secs(1))),
                deny(2),
                static_allow,
            ],
            n,
        )
        .unwrap();
    assert_eq!(login.identity.id, 1);
    assert!(login.replaced.is_none());
    assert!(login.change.remove.is_empty());
    assert_eq!(login.change.upsert.len(), 1);
    let s = login.change.upsert[0];
    assert_eq!(
        (s.source, s.service, s.identity_id, s.rule_id),
        (ip("192.0.2.7"), sid(1), 1, 4)
    );
    assert_eq!(s.expires.as_ns() - n.mono.as_ns(), 600_000_000_000);
    assert_eq!(t.entries(), 1);
    let view = t
        .view(ip("::ffff:192.0.2.7"))
        .expect("IPv4-mapped finds the IPv4 source");
    assert_eq!(view.user, "alice");
    assert_eq!(view.groups, ["admins"]);
    assert_eq!(view.services.len(), 1);
    assert_eq!(view.services[0].rule.name, "rule4");
}

#[test]
fn another_user_replaces_the_source_and_ids_are_reused() {
    let mut t = SessionTable::new(100, 12 * HOUR);
    let n = now();
    let exp = n.wall + HOUR;
    let src = ip("192.0.2.7");
    let a = t
        .login(
            src,
            who("alice", &[]),
            exp,
            &[allow(1, 1, None), allow(2, 1, None)],
            n,
        )
        .unwrap();
    assert_eq!(a.identity.id, 1);
    // bob elsewhere gets id 2.
    let b = t
        .login(
            ip("192.0.2.8"),
            who("bob", &[]),
            exp,
            &[allow(1, 1, None)],
            n,
        )
        .unwrap();
    assert_eq!(b.identity.id, 2);

    // carol takes alice's address; she may reach service 1 only.
    let c = t
        .login(
            src,
            who("carol", &[]),
            exp,
            &[allow(1, 2, None), deny(2)],
            n,
        )
        .unwrap();
    assert_eq!(c.replaced.as_ref().map(|r| r.user.as_str()), Some("alice"));
    // carol's id is taken before alice's is freed, so that flow events still in flight with
    // alice's id at this source are not pinned on carol; the next newcomer gets id 1.
    assert_eq!(c.identity.id, 3);
    assert_eq!(
        c.change.remove,
        [(src, sid(2))],
        "only what carol may not reach is removed"
    );
    assert_eq!(c.change.upsert.len(), 1);
    assert_eq!(c.change.upsert[0].identity_id, 3);
    assert_eq!(c.change.upsert[0].rule_id, 2);
    let ended: Vec<_> = c
        .change
        .ended
        .iter()
        .map(|e| (e.identity.user.as_str(), e.grant.service, e.reason))
        .collect();
    assert_eq!(
        ended,
        [
            ("alice", sid(1), EndReason::Replaced),
            ("alice", sid(2), EndReason::Replaced)
        ]
    );
    assert_eq!(t.entries(), 2);
    assert_eq!(t.identities(), 2);
    assert_eq!(t.get(src).unwrap().identity.user, "carol");
    let d = t
        .login(
            ip("192.0.2.9"),
            who("dave", &[]),
            exp,
            &[allow(1, 1, None)],
            n,
        )
        .unwrap();
    assert_eq!(d.identity.id, 1, "alice's id is reused");
}

#[test]
fn the_same_user_refreshes_and_keeps_the_id() {
    let mut t = SessionTable::new(100, 12 * HOUR);
    let n = now();
    let src = ip("2001:db8::7");
    t.login(
        src,
        who("alice", &["a"]),
        n.wall + Duration::from_secs(60),
        &[allow(1, 1, None), allow(2, 1, None)],
        n,
    )
    .unwrap();
    let n2 = later(n, Duration::from_secs(30));
    let r = t
        .login(
            src,
            who("alice", &["a"]),
            n2.wall + HOUR,
            &[allow(1, 1, None), deny(2)],
            n2,
        )
        .unwrap();
    assert!(r.replaced.is_none());
    assert_eq!(r.identity.id, 1);
    assert_eq!(r.change.remove, [(src, sid(2))]);
    assert_eq!(r.change.ended.len(), 1);
    assert_eq!(r.change.ended[0].reason, EndReason::Refreshed);
    assert_eq!(
        r.change.upsert[0].expires,
        later(n2, HOUR).mono,
        "the new token's exp"
    );
    let rec = t.get(src).unwrap();
    assert_eq!(rec.since, n.wall, "still the same login");
    assert_eq!(t.identities(), 1);

    // New groups: same subject, so not "replaced", but a new identity record (and id).
    let g = t
        .login(
            src,
            who("alice", &["a", "b"]),
            n2.wall + HOUR,
            &[allow(1, 1, None)],
            n2,
        )
        .unwrap();
    assert!(g.replaced.is_none());
    assert!(g.change.ended.is_empty());
    assert_eq!(g.identity.groups, ["a", "b"]);
    assert_eq!(t.identities(), 1, "the old record was released");
}

#[test]
fn a_login_that_allows_nothing_clears_the_source() {
    let mut t = SessionTable::new(100, 12 * HOUR);
    let n = now();
    let src = ip("192.0.2.7");
    t.login(
        src,
        who("alice", &[]),
        n.wall + HOUR,
        &[allow(1, 1, None)],
        n,
    )
    .unwrap();
    let r = t
        .login(src, who("mallory", &[]), n.wall + HOUR, &[deny(1)], n)
        .unwrap();
    assert_eq!(r.change.remove, [(src, sid(1))]);
    assert!(r.change.upsert.is_empty());
    assert!(r.granted.is_empty());
    assert_eq!(r.change.sources_ended, 1);
    assert!(t.is_empty());
    assert_eq!(t.identities(), 0);
    assert_eq!(t.entries(), 0);
}

#[test]
fn expiry_by_monotonic_clock_and_by_wall_clock() {
    let mut t = SessionTable::new(100, 12 * HOUR);
    let n = now();
    let a = ip("192.0.2.1");
    let b = ip("192.0.2.2");
    t.login(
        a,
        who("alice", &[]),
        n.wall + HOUR,
        &[
            allow(1, 1, Some(Duration::from_secs(10))),
            allow(2, 1, None),
        ],
        n,
    )
    .unwrap();
    t.login(b, who("bob", &[]), n.wall + HOUR, &[allow(1, 1, None)], n)
        .unwrap();

    assert!(t.expire(later(n, Duration::from_secs(9))).ended.is_empty());
    let c = t.expire(later(n, Duration::from_secs(10)));
    assert_eq!(c.remove, [(a, sid(1))], "the 10 s rule lifetime");
    assert_eq!(c.ended[0].reason, EndReason::Expired);
    assert_eq!(c.sources_ended, 0);

    // The wall clock steps past the tokens' exp while the monotonic clock barely moves.
    let jumped = Now {
        wall: n.wall + 2 * HOUR,
        mono: later(n, Duration::from_secs(11)).mono,
    };
    let c = t.expire(jumped);
    let mut removed = c.remove.clone();
    removed.sort();
    assert_eq!(removed, [(a, sid(2)), (b, sid(1))]);
    assert_eq!(c.sources_ended, 2);
    assert!(t.is_empty());
    assert_eq!(t.identities(), 0);

    // Both ids are free again: the next login gets id 1.
    let r = t
        .login(
            b,
            who("carol", &[]),
            jumped.wall + HOUR,
            &[allow(1, 1, None)],
            jumped,
        )
        .unwrap();
    assert_eq!(r.identity.id, 1);
}

#[test]
fn end_user_matches_user_or_subject_everywhere() {
    let mut t = SessionTable::new(100, 12 * HOUR);
    let n = now();
    for (src, user) in [
        ("192.0.2.1", "alice"),
        ("192.0.2.2", "alice"),
        ("192.0.2.3", "bob"),
    ] {
        t.login(
            ip(src),
            who(user, &[]),
            n.wall + HOUR,
            &[allow(1, 1, None)],
            n,
        )
        .unwrap();
    }
    assert_eq!(t.identities(), 2, "alice's two sources share one identity");
    let c = t.end_user("alice", EndReason::Revoked);
    assert_eq!(c.sources_ended, 2);
    assert_eq!(t.len(), 1);
    let c = t.end_user("sub-bob", EndReason::Revoked);
    assert_eq!(c.sources_ended, 1);
    assert!(t.is_empty());
    assert_eq!(t.end_user("nobody", EndReason::Revoked).sources_ended, 0);
}

#[test]
fn a_full_map_refuses_and_changes_nothing() {
    let mut t = SessionTable::new(2, 12 * HOUR);
    let n = now();
    t.login(
        ip("192.0.2.1"),
        who("alice", &[]),
        n.wall + HOUR,
        &[allow(1, 1, None), allow(2, 1, None)],
        n,
    )
    .unwrap();
    let err = t
        .login(
            ip("192.0.2.2"),
            who("bob", &[]),
            n.wall + HOUR,
            &[allow(1, 1, None)],
            n,
        )
        .unwrap_err();
    assert_eq!(err, TableError::Full { capacity: 2 });
    assert_eq!(t.len(), 1);
    assert_eq!(t.identities(), 1);
    // Replacing the same source's entries fits.
    t.login(
        ip("192.0.2.1"),
        who("bob", &[]),
        n.wall + HOUR,
        &[allow(1, 1, None), allow(2, 1, None)],
        n,
    )
    .unwrap();
}

#[test]
fn events_name_the_identity_at_the_source() {
    let mut t = SessionTable::new(100, 12 * HOUR);
    let n = now();
    t.login(
        ip("192.0.2.1"),
        who("alice", &[]),
        n.wall + HOUR,
        &[allow(1, 1, None)],
        n,
    )
    .unwrap();
    assert_eq!(t.identity_for(ip("192.0.2.1"), 1).unwrap().user, "alice");
    assert_eq!(t.identity_for(ip("192.0.2.9"), 1).unwrap().user, "alice");
    assert!(t.identity_for(ip("192.0.2.1"), 0).is_none());
    assert!(t.identity_for(ip("192.0.2.1"), 7).is_none());
}

/// A fake data plane: a map, and switches to make it fail.
#[derive(Clone, Default)]
struct FakeStore {
    map: Arc<Mutex<BTreeMap<(IpAddr, ServiceId), Session>>>,
    fail_upsert: Arc<Mutex<bool>>,
}

impl FakeStore {
    fn keys(&self) -> Vec<(IpAddr, ServiceId)> {
        self.map.lock().unwrap().keys().copied().collect()
    }
}

impl SessionStore for FakeStore {
    fn upsert_sessions(&mut self, sessions: &[Session]) -> Result<(), DataplaneError> {
        let mut map = self.map.lock().unwrap();
        for (i, s) in sessions.iter().enumerate() {
            // Fails part-way, as a full kernel map would.
            if *self.fail_upsert.lock().unwrap() && i == 1 {
                return Err(DataplaneError::Invalid("full".into()));
            }
            map.insert((s.source, s.service), *s);
        }
        Ok(())
    }
    fn remove_sessions(&mut self, keys: &[(IpAddr, ServiceId)]) -> Result<usize, DataplaneError> {
        let mut map = self.map.lock().unwrap();
        Ok(keys.iter().filter(|k| map.remove(k).is_some()).count())
    }
    fn sessions(&self) -> Result<Vec<Session>, DataplaneError> {
        Ok(self.map.lock().unwrap().values().copied().collect())
    }
}

fn catalog() -> Arc<Catalog> {
    Arc::new(Catalog::new((1..=3).map(|i| ServiceInfo {
        id: sid(i),
        name: format!("svc{i}"),
        protocol: Protocol::Tcp,
        port: 8000 + i as u16,
    })))
}

#[test]
fn manager_removes_before_writing_and_sweeps() {
    let store = FakeStore::default();
    let mut m = SessionManager::new(Box::new(store.clone()), catalog(), 100, 12 * HOUR);
    let n = now();
    let src = ip("192.0.2.7");
    m.login_at(
        src,
        who("alice", &[]),
        n.wall + HOUR,
        &[allow(1, 1, None), allow(2, 1, Some(Duration::from_secs(5)))],
        n,
    )
    .unwrap();
    assert_eq!(store.keys(), [(src, sid(1)), (src, sid(2))]);
    let out = m
        .login_at(
            src,
            who("bob", &[]),
            n.wall + HOUR,
            &[allow(1, 1, None), deny(2)],
            n,
        )
        .unwrap();
    assert_eq!(out.replaced.unwrap().user, "alice");
    assert_eq!(store.keys(), [(src, sid(1))]);
    assert_eq!(
        store.map.lock().unwrap()[&(src, sid(1))].identity_id,
        out.identity.id
    );

    assert_eq!(m.sweep_at(later(n, HOUR)), 1);
    assert!(store.keys().is_empty());
    assert!(m.table().is_empty());

    m.login_at(src, who("bob", &[]), n.wall + HOUR, &[allow(1, 1, None)], n)
        .unwrap();
    assert_eq!(
        m.logout(src).unwrap(),
        Removed {
            sources: 1,
            sessions: 1
        }
    );
    assert!(store.keys().is_empty());
    assert_eq!(m.logout(src).unwrap(), Removed::default());
}

#[test]
fn manager_fails_closed_and_reconciles() {
    let store = FakeStore::default();
    let mut m = SessionManager::new(Box::new(store.clone()), catalog(), 100, 12 * HOUR);
    let n = now();
    let src = ip("192.0.2.7");
    m.login_at(
        src,
        who("alice", &[]),
        n.wall + HOUR,
        &[allow(3, 1, None)],
        n,
    )
    .unwrap();
    *store.fail_upsert.lock().unwrap() = true;
    let err = m
        .login_at(
            src,
            who("alice", &[]),
            n.wall + HOUR,
            &[allow(1, 1, None), allow(2, 1, None), allow(3, 1, None)],
            n,
        )
        .unwrap_err();
    assert!(matches!(err, SessionError::Dataplane(_)));
    assert!(
        store.keys().is_empty(),
        "nothing is left open for the source"
    );
    assert!(m.table().is_empty());
    *store.fail_upsert.lock().unwrap() = false;

    // An entry the table does not know (as a failed removal would leave) goes at the next sweep.
    store.map.lock().unwrap().insert(
        (ip("192.0.2.99"), sid(1)),
        Session {
            source: ip("192.0.2.99"),
            service: sid(1),
            expires: later(n, HOUR).mono,
            identity_id: 42,
            rule_id: 1,
        },
    );
    m.sweep_at(n);
    assert!(store.keys().is_empty());
    // Clean again: the next sweep does not scan the kernel map.
    store.map.lock().unwrap().insert(
        (ip("192.0.2.98"), sid(1)),
        Session {
            source: ip("192.0.2.98"),
            service: sid(1),
            expires: later(n, HOUR).mono,
            identity_id: 42,
            rule_id: 1,
        },
    );
    m.sweep_at(n);
    assert_eq!(store.keys().len(), 1);
}

#[test]
fn revoke_by_user_and_source() {
    let store = FakeStore::default();
    let mut m = SessionManager::new(Box::new(store.clone()), catalog(), 100, 12 * HOUR);
    let n = now();
    for (src, user) in [
        ("192.0.2.1", "alice"),
        ("192.0.2.2", "alice"),
        ("192.0.2.3", "bob"),
    ] {
        m.login_at(
            ip(src),
            who(user, &[]),
            n.wall + HOUR,
            &[allow(1, 1, None), allow(2, 1, None)],
            n,
        )
        .unwrap();
    }
    assert_eq!(
        m.revoke_user("alice").unwrap(),
        Removed {
            sources: 2,
            sessions: 4
        }
    );
    assert_eq!(store.keys().len(), 2);
    assert_eq!(
        m.revoke_source(ip("192.0.2.3")).unwrap(),
        Removed {
            sources: 1,
            sessions: 2
        }
    );
    assert!(store.keys().is_empty());
}
