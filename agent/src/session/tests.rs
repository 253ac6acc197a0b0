//! Session table and manager: replacement, id reuse, expiry, fail-closed behaviour, against a
//! fake data plane (no root needed).

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use super::{audit::AuditLog, *};
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
    /// Last activity per entry, as the kernel would keep it.
    seen: Arc<Mutex<BTreeMap<(IpAddr, ServiceId), Expiry>>>,
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
    fn last_seen(
        &self,
        keys: &[(IpAddr, ServiceId)],
    ) -> Result<Vec<Option<Expiry>>, DataplaneError> {
        let map = self.map.lock().unwrap();
        let seen = self.seen.lock().unwrap();
        Ok(keys
            .iter()
            .map(|k| map.get(k).and(seen.get(k).copied()))
            .collect())
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
            idle: None,
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
            idle: None,
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

/// A directory of its own under the system's temporary directory, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("idgate-session-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn owner(source: &str, id: u32, user: &str, grants: &[(u32, u32)]) -> journal::OwnerRecord {
    journal::OwnerRecord {
        source: ip(source),
        identity_id: id,
        issuer: "https://idp.example".into(),
        subject: format!("sub-{user}"),
        user: user.into(),
        groups: vec!["web".into()],
        since_ms: 1_700_000_000_000,
        token_expires_ms: 1_700_003_600_000,
        grants: grants
            .iter()
            .map(|&(service, rule)| journal::GrantRecord {
                service_id: service,
                service: format!("svc{service}"),
                rule_id: rule,
                rule: format!("rule{rule}"),
                log: true,
                started_ns: now().mono.as_ns(),
            })
            .collect(),
        policy_identity: None,
    }
}

fn kernel(source: &str, service: u32, id: u32, rule: u32, expires: Expiry) -> Session {
    Session {
        source: ip(source),
        service: sid(service),
        expires,
        identity_id: id,
        rule_id: rule,
        idle: None,
    }
}

#[test]
fn journal_replays_the_last_state_of_each_source_and_skips_torn_lines() {
    let dir = TempDir::new("replay");
    let path = dir.0.join("state/sessions.jsonl");
    let (mut j, replayed) = journal::SessionJournal::open(&path).unwrap();
    assert!(replayed.records.is_empty() && j.is_empty());
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "it holds identities and claims");
    let mut alice = owner("192.0.2.1", 1, "alice", &[(1, 1)]);
    alice.policy_identity = Some(crate::policy::Identity {
        issuer: "https://idp.example".into(),
        user: "alice".into(),
        groups: vec!["web".into()],
        scopes: vec!["api".into()],
        claims: serde_json::json!({"sub": "sub-alice", "dept": "ops"}),
    });
    j.put(&owner("192.0.2.1", 1, "alice", &[(1, 1), (2, 1)]))
        .unwrap();
    j.put(&owner("192.0.2.2", 2, "bob", &[(1, 1)])).unwrap();
    j.put(&alice).unwrap();
    j.del(ip("192.0.2.2")).unwrap();
    drop(j);
    // A line torn by a crash, and one of another format version.
    let mut tail = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(
        &mut tail,
        b"{\"v\":1,\"put\":{\"source\":\"192.0.2.3\",\"iden",
    )
    .unwrap();
    std::io::Write::write_all(&mut tail, b"\n{\"v\":99,\"del\":\"192.0.2.1\"}\n").unwrap();
    drop(tail);

    let (mut j, replayed) = journal::SessionJournal::open(&path).unwrap();
    assert_eq!(replayed.skipped, 2);
    assert_eq!(
        replayed.records,
        [alice.clone()],
        "bob was deleted; alice's last put wins"
    );
    // A rewrite keeps exactly the records given.
    let before = j.len();
    j.rewrite([&alice]).unwrap();
    assert!(j.len() < before);
    assert!(!dir.0.join("state/sessions.jsonl.new").exists());
    let (_, replayed) = journal::SessionJournal::open(&path).unwrap();
    assert_eq!((replayed.records, replayed.skipped), (vec![alice], 0));
}

#[test]
fn adoption_keeps_named_sessions_with_their_ids_and_drops_the_rest() {
    let n = now();
    let hour = later(n, HOUR).mono;
    let owners = vec![
        owner("192.0.2.1", 3, "alice", &[(1, 1), (2, 4)]),
        owner("192.0.2.2", 1, "bob", &[(1, 1)]),
        // A record without kernel entries: its sessions ended while no agent ran.
        owner("192.0.2.9", 2, "carol", &[(1, 1)]),
        // Claims id 3 too, for another identity: contradicts alice's record.
        owner("192.0.2.5", 3, "mallory", &[(1, 1)]),
    ];
    let kernel = [
        kernel("192.0.2.1", 1, 3, 1, hour),
        kernel("192.0.2.1", 2, 4, 4, hour), // another identity id than the record's
        kernel("192.0.2.2", 1, 1, 1, hour),
        kernel("192.0.2.2", 2, 1, 1, hour), // a service the record does not grant
        kernel("192.0.2.3", 1, 5, 1, hour), // no record at all
        kernel("192.0.2.4", 1, 6, 1, n.mono), // expired
        kernel("192.0.2.5", 1, 3, 1, hour),
    ];
    let mut t = SessionTable::new(100, 12 * HOUR);
    let (change, adopted) = t.adopt(owners, &kernel, n);
    assert_eq!(
        adopted,
        Adopted {
            sources: 2,
            sessions: 2,
            unowned: 4,
            expired: 1
        }
    );
    let mut removed = change.remove.clone();
    removed.sort();
    assert_eq!(
        removed,
        [
            (ip("192.0.2.1"), sid(2)),
            (ip("192.0.2.2"), sid(2)),
            (ip("192.0.2.3"), sid(1)),
            (ip("192.0.2.4"), sid(1)),
            (ip("192.0.2.5"), sid(1)),
        ]
    );
    assert!(change.upsert.is_empty() && change.ended.is_empty());
    let alice = t.view(ip("192.0.2.1")).unwrap();
    assert_eq!((alice.user.as_str(), alice.identity_id), ("alice", 3));
    assert_eq!(alice.services.len(), 1);
    assert_eq!(alice.services[0].rule.name, "rule1");
    assert_eq!(
        alice.since,
        rfc3339(journal::from_unix_ms(1_700_000_000_000))
    );
    assert_eq!(t.view(ip("192.0.2.2")).unwrap().identity_id, 1);
    assert_eq!(t.entries(), 2);
    assert!(t.holds(ip("192.0.2.1"), sid(1), 3));
    // The kernel's expiry is kept, on both clocks.
    let grant = &t.get(ip("192.0.2.1")).unwrap().grants[&sid(1)];
    assert_eq!(grant.expires, hour);
    assert_eq!(grant.expires_at, n.wall + HOUR);
    // New logins get ids the adopted identities do not hold.
    let dave = t
        .login(
            ip("192.0.2.7"),
            who("dave", &[]),
            n.wall + HOUR,
            &[allow(1, 1, None)],
            n,
        )
        .unwrap();
    assert_eq!(dave.identity.id, 2);
    let erin = t
        .login(
            ip("192.0.2.8"),
            who("erin", &[]),
            n.wall + HOUR,
            &[allow(1, 1, None)],
            n,
        )
        .unwrap();
    assert_eq!(erin.identity.id, 4);
}

#[test]
fn a_restarted_manager_adopts_journaled_sessions_under_the_new_policy() {
    let dir = TempDir::new("restart");
    let path = dir.0.join("sessions.jsonl");
    let audit_path = dir.0.join("audit.jsonl");
    let store = FakeStore::default();
    let n = Now::current();
    let (alice, bob) = (ip("192.0.2.1"), ip("192.0.2.2"));

    // First run.
    let (journal, replayed) = journal::SessionJournal::open(&path).unwrap();
    let restored = SessionManager::restore(
        &mut store.clone(),
        replayed.records,
        100,
        12 * HOUR,
        n,
        |_, _| unreachable!("nothing to re-evaluate"),
    )
    .unwrap();
    let mut m = SessionManager::resume(
        Box::new(store.clone()),
        catalog(),
        restored,
        Some(journal),
        AuditLog::default(),
    );
    m.login_at(
        alice,
        who("alice", &["web"]),
        n.wall + HOUR,
        &[allow(1, 1, None), allow(2, 2, None)],
        n,
    )
    .unwrap();
    m.set_policy_identity(
        alice,
        Arc::new(crate::policy::Identity {
            issuer: "https://idp.example".into(),
            user: "alice".into(),
            groups: vec!["web".into()],
            scopes: vec!["api".into()],
            claims: serde_json::json!({"dept": "ops"}),
        }),
    );
    m.login_at(bob, who("bob", &[]), n.wall + HOUR, &[allow(1, 1, None)], n)
        .unwrap();
    m.logout(bob).unwrap();
    m.login_at(
        ip("192.0.2.3"),
        who("carol", &[]),
        n.wall + HOUR,
        &[allow(1, 1, None)],
        n,
    )
    .unwrap();
    let alice_id = m.table().view(alice).unwrap().identity_id;
    // The agent dies; the kernel keeps its entries. One more appears that no run recorded.
    drop(m);
    store.map.lock().unwrap().insert(
        (ip("192.0.2.66"), sid(1)),
        kernel("192.0.2.66", 1, 9, 1, later(n, HOUR).mono),
    );

    // Second run: the new policy no longer lets alice reach service 2, and nobody else anything
    // (carol's session ends with policy-changed).
    let (journal, replayed) = journal::SessionJournal::open(&path).unwrap();
    assert_eq!(replayed.records.len(), 2, "alice and carol");
    let mut seen = Vec::new();
    let restored = SessionManager::restore(
        &mut store.clone(),
        replayed.records,
        100,
        12 * HOUR,
        n,
        |source, record| {
            seen.push((source, record.policy_identity.clone()));
            if record.identity.user == "alice" {
                vec![allow(1, 7, None), deny(2)]
            } else {
                vec![deny(1)]
            }
        },
    )
    .unwrap();
    assert_eq!(restored.adopted.sessions, 3);
    assert_eq!(restored.adopted.unowned, 1);
    assert_eq!(
        restored.reevaluated,
        Reevaluated {
            revoked: 2,
            sources_ended: 1,
            updated: 1
        }
    );
    let claims = seen
        .iter()
        .find(|(s, _)| *s == alice)
        .and_then(|(_, i)| i.clone())
        .expect("alice re-evaluated with the identity she logged in with");
    assert_eq!(claims.scopes, ["api"]);
    assert_eq!(claims.claims["dept"], "ops");
    let audit = AuditLog::open(&crate::config::AuditConfig::File(audit_path.clone())).unwrap();
    let mut m = SessionManager::resume(
        Box::new(store.clone()),
        catalog(),
        restored,
        Some(journal),
        audit,
    );
    assert_eq!(store.keys(), [(alice, sid(1))]);
    assert_eq!(store.map.lock().unwrap()[&(alice, sid(1))].rule_id, 7);
    let view = m.table().view(alice).unwrap();
    assert_eq!((view.user.as_str(), view.identity_id), ("alice", alice_id));
    assert_eq!(view.services[0].rule.name, "rule7");
    let lines = std::fs::read_to_string(&audit_path).unwrap();
    let ended: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ended.len(), 2, "{lines}");
    assert!(
        ended
            .iter()
            .all(|e| e["session_end_reason"] == "policy-changed"),
        "{lines}"
    );

    // The adopted session can be revoked, and the journal forgets it.
    assert_eq!(m.revoke_source(alice).unwrap().sessions, 1);
    assert!(store.keys().is_empty());
    drop(m);
    let (_, replayed) = journal::SessionJournal::open(&path).unwrap();
    assert!(replayed.records.is_empty());
}

#[test]
fn idle_sessions_age_out_once_the_kernel_saw_nothing_for_their_timeout() {
    let store = FakeStore::default();
    let mut m = SessionManager::new(Box::new(store.clone()), catalog(), 100, 12 * HOUR);
    let n = now();
    let src = ip("192.0.2.7");
    let minute = Duration::from_secs(60);
    let mut idle = allow(1, 1, None);
    idle.idle_timeout = Some(minute);
    m.login_at(
        src,
        who("alice", &[]),
        n.wall + HOUR,
        &[idle, allow(2, 2, None)],
        n,
    )
    .unwrap();
    assert_eq!(
        store.map.lock().unwrap()[&(src, sid(1))].idle,
        Some(minute),
        "the kernel entry carries the timeout"
    );
    assert_eq!(store.map.lock().unwrap()[&(src, sid(2))].idle, None);
    assert_eq!(
        m.table().view(src).unwrap().services[0].idle_timeout_s,
        Some(60)
    );
    // Traffic 40 s in: at 61 s the session is not idle, and is looked at again at 100 s.
    store
        .seen
        .lock()
        .unwrap()
        .insert((src, sid(1)), later(n, Duration::from_secs(40)).mono);
    assert_eq!(m.sweep_at(later(n, Duration::from_secs(61))), 0);
    assert!(
        m.table()
            .idle_due(later(n, Duration::from_secs(99)))
            .is_empty()
    );
    assert_eq!(
        m.table().idle_due(later(n, Duration::from_secs(100))),
        [(src, sid(1))]
    );
    // Nothing since: at 101 s it has aged out; service 2 (no idle timeout) stays.
    assert_eq!(m.sweep_at(later(n, Duration::from_secs(101))), 1);
    assert_eq!(store.keys(), [(src, sid(2))]);
    let view = m.table().view(src).unwrap();
    assert_eq!(view.services.len(), 1);
    assert_eq!(view.services[0].service, "svc2");
    // A session the kernel no longer holds (removed behind the agent's back) ends too.
    let mut idle = allow(1, 1, None);
    idle.idle_timeout = Some(minute);
    let other = ip("192.0.2.8");
    m.login_at(other, who("bob", &[]), n.wall + HOUR, &[idle], n)
        .unwrap();
    store.map.lock().unwrap().remove(&(other, sid(1)));
    assert_eq!(m.sweep_at(later(n, Duration::from_secs(61))), 1);
    assert!(m.table().view(other).is_none());
}
