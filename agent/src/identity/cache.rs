//! One issuer's key cache: the current key set, periodic refresh, and refetching on unknown key
//! ids without letting a flood of made-up ids hammer the IdP.

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use reqwest::Url;

use super::{discovery::Fetcher, error::FetchError, jwks::KeySet, settings::IssuerSettings};

/// First retry delay after a failed background refresh; it doubles up to the refresh interval.
const RETRY_BASE: Duration = Duration::from_secs(1);

/// Counters of one issuer's key cache, for logs and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IssuerStats {
    /// The issuer.
    pub issuer: String,
    /// Key set fetches that succeeded (periodic, initial or on an unknown key id).
    pub refreshes_ok: u64,
    /// Key set fetches that failed; the last good keys stayed in use.
    pub refreshes_failed: u64,
    /// Fetches triggered by a token with an unknown key id.
    pub unknown_kid_refetches: u64,
    /// Unknown key ids that did not trigger a fetch because one had just been made.
    pub refetches_suppressed: u64,
    /// Usable keys in the current set.
    pub keys: usize,
    /// When the key set was last fetched successfully.
    pub last_refresh_ok: Option<SystemTime>,
}

#[derive(Default)]
struct Counters {
    refreshes_ok: AtomicU64,
    refreshes_failed: AtomicU64,
    unknown_kid_refetches: AtomicU64,
    refetches_suppressed: AtomicU64,
    /// Milliseconds since the epoch; 0 means never.
    last_ok_ms: AtomicU64,
}

/// What only the task holding the refresh lock touches.
struct RefreshState {
    discovered_jwks_uri: Option<Url>,
    last_on_demand: Option<Instant>,
}

/// An issuer's keys and the machinery that keeps them current.
pub(crate) struct KeyCache {
    issuer: String,
    fetcher: Fetcher,
    refresh_interval: Duration,
    min_refetch_interval: Duration,
    /// Readers clone the `Arc` and drop the lock at once, so a refresh never waits on a verify.
    current: RwLock<Arc<KeySet>>,
    /// Held across a fetch: concurrent refetches queue here and then find the fresh set.
    refresh: tokio::sync::Mutex<RefreshState>,
    counters: Counters,
}

impl KeyCache {
    /// An empty cache; nothing is fetched until asked.
    pub(crate) fn new(settings: &IssuerSettings, fetcher: Fetcher) -> Self {
        Self {
            issuer: settings.issuer.clone(),
            fetcher,
            refresh_interval: settings.jwks_refresh_interval,
            min_refetch_interval: settings.jwks_min_refetch_interval,
            current: RwLock::new(Arc::new(KeySet::default())),
            refresh: tokio::sync::Mutex::new(RefreshState {
                discovered_jwks_uri: None,
                last_on_demand: None,
            }),
            counters: Counters::default(),
        }
    }

    /// The key set in use now.
    pub(crate) fn current(&self) -> Arc<KeySet> {
        // A poisoned lock still holds a complete `Arc`: the writer only swaps it.
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Fetches the key set now (periodic or initial refresh); returns the number of usable keys.
    pub(crate) async fn refresh(&self) -> Result<usize, FetchError> {
        let mut state = self.refresh.lock().await;
        self.fetch_locked(&mut state, "refresh").await
    }

    /// Called when a token names a key id that `seen_generation` does not have: refetches at most
    /// once per `jwks_min_refetch_interval`, and concurrent callers share one fetch.
    pub(crate) async fn refetch_for_unknown_kid(&self, seen_generation: u64) -> Arc<KeySet> {
        let mut state = self.refresh.lock().await;
        let current = self.current();
        if current.generation != seen_generation {
            // Someone fetched while this caller waited for the lock.
            return current;
        }
        if state
            .last_on_demand
            .is_some_and(|t| t.elapsed() < self.min_refetch_interval)
        {
            self.counters
                .refetches_suppressed
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(issuer = %self.issuer, "unknown key id; refetch suppressed by rate limit");
            return current;
        }
        state.last_on_demand = Some(Instant::now());
        self.counters
            .unknown_kid_refetches
            .fetch_add(1, Ordering::Relaxed);
        // Failure is logged and counted inside; the caller goes on with what is there.
        let _ = self.fetch_locked(&mut state, "unknown key id").await;
        self.current()
    }

    async fn fetch_locked(
        &self,
        state: &mut RefreshState,
        cause: &'static str,
    ) -> Result<usize, FetchError> {
        let result = self.fetch_once(state).await;
        match &result {
            Ok(keys) => {
                self.counters.refreshes_ok.fetch_add(1, Ordering::Relaxed);
                let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| {
                    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
                });
                self.counters.last_ok_ms.store(now_ms, Ordering::Relaxed);
                tracing::debug!(issuer = %self.issuer, keys, cause, "key set fetched");
            }
            Err(error) => {
                self.counters
                    .refreshes_failed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    issuer = %self.issuer, %error, cause,
                    "key set fetch failed; the last good keys stay in use"
                );
            }
        }
        result
    }

    async fn fetch_once(&self, state: &mut RefreshState) -> Result<usize, FetchError> {
        let jwks_uri = match (
            self.fetcher.configured_jwks_uri(),
            &state.discovered_jwks_uri,
        ) {
            (Some(configured), _) => configured.clone(),
            (None, Some(discovered)) => discovered.clone(),
            (None, None) => {
                let discovered = self.fetcher.discover().await?;
                state.discovered_jwks_uri = Some(discovered.clone());
                discovered
            }
        };
        let result = self.fetch_set(&jwks_uri).await;
        if result.is_err() {
            // The IdP may have moved its keys: discover again next time.
            state.discovered_jwks_uri = None;
        }
        result
    }

    async fn fetch_set(&self, jwks_uri: &Url) -> Result<usize, FetchError> {
        let body = self.fetcher.get(jwks_uri).await?;
        let generation = self.current().generation + 1;
        let set = KeySet::parse(&body, generation).map_err(|source| FetchError::Json {
            url: jwks_uri.to_string(),
            source,
        })?;
        if set.len() == 0 {
            // An IdP with no signing key cannot have issued anything; more likely a broken proxy
            // or a half-done migration, so the old keys are the better bet.
            return Err(FetchError::NoUsableKeys {
                url: jwks_uri.to_string(),
            });
        }
        let keys = set.len();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        Ok(keys)
    }

    /// Refreshes every `jwks_refresh_interval` for ever; after a failure it retries sooner, with
    /// a doubling delay capped at the interval.
    pub(crate) async fn run_refresh_loop(self: Arc<Self>) {
        let mut delay = if self.current().generation == 0 {
            Duration::ZERO
        } else {
            self.refresh_interval
        };
        let mut failures = 0u32;
        loop {
            tokio::time::sleep(delay).await;
            delay = match self.refresh().await {
                Ok(_) => {
                    failures = 0;
                    self.refresh_interval
                }
                Err(_) => {
                    let backoff = RETRY_BASE.saturating_mul(1u32 << failures.min(16));
                    failures = failures.saturating_add(1);
                    backoff.min(self.refresh_interval)
                }
            };
        }
    }

    /// A snapshot of the counters.
    pub(crate) fn stats(&self) -> IssuerStats {
        let c = &self.counters;
        let last_ok_ms = c.last_ok_ms.load(Ordering::Relaxed);
        IssuerStats {
            issuer: self.issuer.clone(),
            refreshes_ok: c.refreshes_ok.load(Ordering::Relaxed),
            refreshes_failed: c.refreshes_failed.load(Ordering::Relaxed),
            unknown_kid_refetches: c.unknown_kid_refetches.load(Ordering::Relaxed),
            refetches_suppressed: c.refetches_suppressed.load(Ordering::Relaxed),
            keys: self.current().len(),
            last_refresh_ok: (last_ok_ms != 0)
                .then(|| UNIX_EPOCH + Duration::from_millis(last_ok_ms)),
        }
    }
}
