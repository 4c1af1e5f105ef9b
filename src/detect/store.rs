//! Where each client's recent fingerprints are remembered: the [`FingerprintStore`]
//! trait and the in-process [`MemoryStore`] (the Redis one is `redis.rs`).
//!
//! The store compares a query with each of the same client's recent queries one by one
//! (Chen, Carlini & Wagner 2020 count near neighbours the same way) and reports how many
//! of them share at least the [`Thresholds`]' numbers of hashes with it; the detector
//! decides from those counts (`detect/mod.rs`), then the query is remembered. Blacklight
//! compares with the union of the window's hashes instead; with that union, one client
//! sending a few edited copies of its own photo (re-encodes, resizes) reached the
//! threshold after four or five of them, so this store counts queries, not hashes. An
//! exact re-send (the same pixel digest as a query still in the window: a retry) is
//! reported as such and neither counted nor stored again, so retries never add up to an
//! attack.
//!
//! Bounds of the memory store (all from `[attack_detection]`):
//! - per client: the queries of the last `window_seconds`, at most
//!   `max_queries_per_client` of them (the oldest go first);
//! - clients: at most `max_clients`; a new client beyond that evicts the one seen
//!   longest ago (with its cooldown);
//! - so at most `max_clients × max_queries_per_client × hashes` hashes of 8 bytes, plus
//!   about 100 bytes per query: with the defaults 1 000 × 100 × (50 × 8 + 100) B ≈ 50 MB
//!   in the worst case.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::fingerprint::Fingerprint;

/// A client, as a keyed digest of its identity (API key or address): what the store
/// keys by and the access log prints. Never the identity itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(String);

impl ClientId {
    /// From an already hashed, printable identity.
    pub fn from_hashed(hex: String) -> Self {
        Self(hex)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Hashes two queries must share to count as alike (`match_threshold`) and as nearly
/// identical (`close_match_threshold`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub alike: usize,
    pub close: usize,
}

/// What the store saw of one query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Observation {
    /// The most hashes the query shares with one earlier query of the client.
    pub matches: usize,
    /// Earlier queries sharing at least `Thresholds::alike` hashes with it.
    pub alike: usize,
    /// Earlier queries sharing at least `Thresholds::close` hashes with it.
    pub close: usize,
    /// How many earlier queries of the client it was compared with.
    pub window: usize,
    /// The exact same pixels as a query in the window: a retry, not counted.
    pub repeat: bool,
}

/// The windows and caps every store applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    pub window: Duration,
    pub max_queries_per_client: usize,
    pub max_clients: usize,
}

/// A store of recent fingerprints per client. Calls block (a network round trip for
/// Redis): the caller runs them on the blocking pool. Never fails: a store that cannot
/// reach its backend answers from a local one (and says so in the log and metrics).
pub trait FingerprintStore: Send + Sync {
    /// Compares the query with each query in the client's window, then remembers it.
    fn record(&self, client: &ClientId, fingerprint: &Fingerprint, thresholds: Thresholds) -> Observation;
    /// The rest of the client's cooldown, if it is in one.
    fn cooldown(&self, client: &ClientId) -> Option<Duration>;
    /// Refuses the client for `duration` from now.
    fn start_cooldown(&self, client: &ClientId, duration: Duration);
    /// For metric labels: "memory" or "redis".
    fn name(&self) -> &'static str;
}

/// The in-process store: one replica's memory.
pub struct MemoryStore {
    limits: StoreLimits,
    clients: Mutex<Clients>,
}

#[derive(Default)]
struct Clients {
    by_id: HashMap<ClientId, ClientWindow>,
    /// (last seen, sequence) → client: the least recently seen is the first key.
    recency: BTreeMap<(Instant, u64), ClientId>,
    sequence: u64,
}

struct ClientWindow {
    queries: VecDeque<Query>,
    /// How many remembered queries have each pixel digest.
    digests: HashMap<u64, u32>,
    cooldown_until: Option<Instant>,
    seen: (Instant, u64),
}

struct Query {
    at: Instant,
    digest: u64,
    /// Sorted (as in [`Fingerprint`]).
    hashes: Box<[u64]>,
}

impl MemoryStore {
    pub fn new(limits: StoreLimits) -> Self {
        Self { limits, clients: Mutex::new(Clients::default()) }
    }

    /// `record` at a given time (tests move the clock).
    pub fn record_at(
        &self,
        client: &ClientId,
        fingerprint: &Fingerprint,
        thresholds: Thresholds,
        now: Instant,
    ) -> Observation {
        let limits = self.limits;
        let mut clients = self.lock();
        let window = clients.touch(client, now, limits.max_clients);
        window.expire(now, limits.window);
        if window.digests.contains_key(&fingerprint.digest) {
            return Observation { window: window.queries.len(), repeat: true, ..Observation::default() };
        }
        let mut observation = Observation { window: window.queries.len(), ..Observation::default() };
        for query in &window.queries {
            let shared = fingerprint.hashes.iter().filter(|h| query.hashes.binary_search(h).is_ok()).count();
            observation.matches = observation.matches.max(shared);
            observation.alike += usize::from(shared >= thresholds.alike);
            observation.close += usize::from(shared >= thresholds.close);
        }
        while window.queries.len() >= limits.max_queries_per_client.max(1) {
            window.forget_oldest();
        }
        *window.digests.entry(fingerprint.digest).or_default() += 1;
        window.queries.push_back(Query {
            at: now,
            digest: fingerprint.digest,
            hashes: fingerprint.hashes.clone().into(),
        });
        observation
    }

    pub fn cooldown_at(&self, client: &ClientId, now: Instant) -> Option<Duration> {
        let clients = self.lock();
        let until = clients.by_id.get(client)?.cooldown_until?;
        (until > now).then(|| until - now)
    }

    pub fn start_cooldown_at(&self, client: &ClientId, duration: Duration, now: Instant) {
        let max_clients = self.limits.max_clients;
        let mut clients = self.lock();
        clients.touch(client, now, max_clients).cooldown_until = Some(now + duration);
    }

    /// Clients remembered and hashes held (for tests of the bounds).
    pub fn size(&self) -> (usize, usize) {
        let clients = self.lock();
        let hashes = clients.by_id.values().map(|w| w.queries.iter().map(|q| q.hashes.len()).sum::<usize>()).sum();
        (clients.by_id.len(), hashes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Clients> {
        // The data stays consistent even if a holder panicked (every update is a few
        // plain insertions), so a poisoned lock is taken over rather than failing
        // every later request.
        self.clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Clients {
    /// The client's window, created if new (evicting the least recently seen client
    /// when full), marked as seen now.
    fn touch(&mut self, client: &ClientId, now: Instant, max_clients: usize) -> &mut ClientWindow {
        self.sequence += 1;
        let stamp = (now, self.sequence);
        if let Some(window) = self.by_id.get_mut(client) {
            self.recency.remove(&window.seen);
        } else {
            while self.by_id.len() >= max_clients.max(1) {
                let Some((_, oldest)) = self.recency.pop_first() else { break };
                self.by_id.remove(&oldest);
            }
        }
        self.recency.insert(stamp, client.clone());
        let window = self.by_id.entry(client.clone()).or_insert_with(|| ClientWindow {
            queries: VecDeque::new(),
            digests: HashMap::new(),
            cooldown_until: None,
            seen: stamp,
        });
        window.seen = stamp;
        window
    }
}

impl ClientWindow {
    fn expire(&mut self, now: Instant, window: Duration) {
        while self.queries.front().is_some_and(|q| now.saturating_duration_since(q.at) > window) {
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        let Some(query) = self.queries.pop_front() else { return };
        decrement(&mut self.digests, query.digest);
    }
}

fn decrement(counts: &mut HashMap<u64, u32>, key: u64) {
    if let Some(count) = counts.get_mut(&key) {
        *count -= 1;
        if *count == 0 {
            counts.remove(&key);
        }
    }
}

impl FingerprintStore for MemoryStore {
    fn record(&self, client: &ClientId, fingerprint: &Fingerprint, thresholds: Thresholds) -> Observation {
        self.record_at(client, fingerprint, thresholds, Instant::now())
    }

    fn cooldown(&self, client: &ClientId) -> Option<Duration> {
        self.cooldown_at(client, Instant::now())
    }

    fn start_cooldown(&self, client: &ClientId, duration: Duration) {
        self.start_cooldown_at(client, duration, Instant::now());
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: Thresholds = Thresholds { alike: 2, close: 3 };

    fn limits() -> StoreLimits {
        StoreLimits { window: Duration::from_secs(60), max_queries_per_client: 4, max_clients: 3 }
    }

    fn print(hashes: &[u64], digest: u64) -> Fingerprint {
        Fingerprint { hashes: hashes.to_vec(), digest }
    }

    fn client(name: &str) -> ClientId {
        ClientId::from_hashed(name.into())
    }

    #[test]
    fn each_earlier_query_of_the_same_client_is_compared_on_its_own() {
        let store = MemoryStore::new(limits());
        let now = Instant::now();
        let a = client("a");
        assert_eq!(store.record_at(&a, &print(&[1, 2, 3, 4], 10), RULE, now), Observation::default());
        let second = store.record_at(&a, &print(&[2, 3, 4, 6], 11), RULE, now);
        assert_eq!(second, Observation { matches: 3, alike: 1, close: 1, window: 1, repeat: false });
        // Shares 2 with the first and 1 with the second: alike to one, close to none. (The
        // union of the window would hold 3 of its hashes.)
        let third = store.record_at(&a, &print(&[1, 4, 7, 8], 12), RULE, now);
        assert_eq!(third, Observation { matches: 2, alike: 1, close: 0, window: 2, repeat: false });
        let fourth = store.record_at(&a, &print(&[2, 3, 4, 9], 13), RULE, now);
        assert_eq!((fourth.matches, fourth.alike, fourth.close), (3, 2, 2));
        assert_eq!(store.record_at(&client("b"), &print(&[1, 2, 3, 4], 10), RULE, now).matches, 0, "per client");
    }

    #[test]
    fn exact_resends_are_repeats_never_counted() {
        let store = MemoryStore::new(limits());
        let now = Instant::now();
        let a = client("a");
        store.record_at(&a, &print(&[1, 2, 3], 10), RULE, now);
        for _ in 0..30 {
            let again = store.record_at(&a, &print(&[1, 2, 3], 10), RULE, now);
            assert_eq!(again, Observation { window: 1, repeat: true, ..Observation::default() });
        }
        assert_eq!(store.size(), (1, 3), "repeats are not stored");
    }

    #[test]
    fn the_window_is_bounded_in_time_and_queries_and_clients_are_evicted_oldest_first() {
        let store = MemoryStore::new(limits());
        let start = Instant::now();
        let a = client("a");
        store.record_at(&a, &print(&[1], 1), RULE, start);
        // Past the time window the old query is gone.
        assert_eq!(store.record_at(&a, &print(&[1], 2), RULE, start + Duration::from_secs(61)).matches, 0);
        // At most 4 queries: the fifth pushes out the first.
        let later = start + Duration::from_secs(62);
        for (i, hash) in [10u64, 11, 12, 13].iter().enumerate() {
            store.record_at(&a, &print(&[*hash], 100 + i as u64), RULE, later);
        }
        assert_eq!(store.size(), (1, 4));
        assert_eq!(store.record_at(&a, &print(&[1], 3), RULE, later).matches, 0, "query [1] was pushed out");
        // Three clients at most: a fourth evicts the least recently seen (b).
        store.record_at(&client("b"), &print(&[1], 1), RULE, later);
        store.record_at(&client("c"), &print(&[1], 1), RULE, later);
        store.record_at(&a, &print(&[99], 5), RULE, later);
        store.record_at(&client("d"), &print(&[1], 1), RULE, later);
        assert_eq!(store.size().0, 3);
        assert_eq!(store.record_at(&client("c"), &print(&[1], 9), RULE, later).matches, 1, "c kept");
        assert_eq!(store.record_at(&client("b"), &print(&[1], 9), RULE, later).matches, 0, "b evicted");
    }

    #[test]
    fn a_flood_of_unique_clients_and_images_stays_within_the_caps() {
        let limits = StoreLimits { window: Duration::from_secs(600), max_queries_per_client: 50, max_clients: 100 };
        let store = MemoryStore::new(limits);
        let now = Instant::now();
        for i in 0..20_000u64 {
            let hashes: Vec<u64> = (0..50).map(|j| i * 1000 + j).collect();
            store.record_at(&client(&format!("c{}", i % 500)), &print(&hashes, i), RULE, now);
        }
        let (clients, hashes) = store.size();
        assert!(clients <= 100 && hashes <= 100 * 50 * 50, "{clients} clients, {hashes} hashes");
    }

    #[test]
    fn cooldowns_run_out() {
        let store = MemoryStore::new(limits());
        let now = Instant::now();
        let a = client("a");
        assert_eq!(store.cooldown_at(&a, now), None);
        store.start_cooldown_at(&a, Duration::from_secs(30), now);
        assert_eq!(store.cooldown_at(&a, now + Duration::from_secs(10)), Some(Duration::from_secs(20)));
        assert_eq!(store.cooldown_at(&a, now + Duration::from_secs(31)), None);
    }
}
