//! The Redis store (`attack_detection.store = "redis://host:port"`): every replica
//! behind the load balancer reads and writes the same client windows, so an attacker
//! who spreads queries over replicas is still one client.
//!
//! Layout per client (the `{…}` hash tag keeps a client's keys in one cluster slot):
//! - `pandaguard:qa:{client}:d` — a sorted set of the exact-pixel digests of the
//!   window's queries, scored by time, trimmed to the window and to
//!   `max_queries_per_client`;
//! - `pandaguard:qa:{client}:q` — a hash from each of those digests to the query's
//!   fingerprint hashes (decimal, space-separated: Lua numbers cannot hold 64 bits);
//! - `pandaguard:qa:{client}:cool` — present while the client is refused (PX TTL).
//!
//! One query is one round trip: a Lua script drops the queries that left the window,
//! checks the digest, compares the query with every remembered one (counting those
//! that share at least the two thresholds' numbers of hashes, as the memory store
//! does), and remembers it, atomically. Both keys expire a window after the client's
//! last query, so Redis holds at most `max_queries_per_client` queries of each client
//! active within a window (and obeys its own `maxmemory` policy).
//!
//! A Redis that is down, or slower than `redis_timeout_ms`, never fails a request: the
//! query is answered by the in-process store instead, a warning is logged (at most
//! every 10 s) and `pandaguard_detection_store_fallback_total` counts it. Redis is
//! tried again one second after a failure (a fresh connection), so a request never
//! waits on a known-dead Redis more than once a second.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::fingerprint::Fingerprint;
use super::store::{ClientId, FingerprintStore, MemoryStore, Observation, StoreLimits, Thresholds};

/// After a failure, Redis is left alone this long.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// At most one fallback warning in the log per this long.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// Idle connections kept for reuse.
const POOL: usize = 8;

const RECORD: &str = r#"
-- KEYS[1] digests (sorted set by time), KEYS[2] fingerprints (hash digest -> hashes)
-- ARGV: digest, now_ms, window_ms, ttl_ms, max_queries, alike, close, hashes...
local now = tonumber(ARGV[2])
local max_queries = tonumber(ARGV[5])
local left = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
if #left > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
  redis.call('HDEL', KEYS[2], unpack(left))
end
local window = redis.call('ZCARD', KEYS[1])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return {0, 0, 0, window, 1}
end
local mine = {}
for i = 8, #ARGV do mine[ARGV[i]] = true end
local alike_at, close_at = tonumber(ARGV[6]), tonumber(ARGV[7])
local most, alike, close = 0, 0, 0
for _, packed in ipairs(redis.call('HVALS', KEYS[2])) do
  local shared = 0
  for hash in string.gmatch(packed, '%d+') do
    if mine[hash] then shared = shared + 1 end
  end
  if shared > most then most = shared end
  if shared >= alike_at then alike = alike + 1 end
  if shared >= close_at then close = close + 1 end
end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], table.concat(ARGV, ' ', 8))
local stored = redis.call('ZCARD', KEYS[1])
if stored > max_queries then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, stored - max_queries - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, stored - max_queries - 1)
  redis.call('HDEL', KEYS[2], unpack(oldest))
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[4]))
return {most, alike, close, window, 0}
"#;

pub struct RedisStore {
    client: redis::Client,
    limits: StoreLimits,
    timeout: Duration,
    script: redis::Script,
    idle: Mutex<Vec<redis::Connection>>,
    /// Set after a failure: Redis is not tried before then.
    down_until: Mutex<Option<Instant>>,
    last_warning: Mutex<Option<Instant>>,
    local: MemoryStore,
}

impl RedisStore {
    /// Parses the URL only; the first query connects. (A Redis that is down at start-up
    /// is a fallback, not a failed start.)
    pub fn new(url: &str, limits: StoreLimits, timeout: Duration) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| format!("attack_detection.store: {e}"))?;
        Ok(Self {
            client,
            limits,
            timeout,
            script: redis::Script::new(RECORD),
            idle: Mutex::new(Vec::new()),
            down_until: Mutex::new(None),
            last_warning: Mutex::new(None),
            local: MemoryStore::new(limits),
        })
    }

    /// Runs `work` on a pooled connection, or reports why Redis is not usable now.
    fn with_connection<T>(
        &self,
        work: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, String> {
        if lock(&self.down_until).is_some_and(|until| Instant::now() < until) {
            return Err("unreachable at the last attempt".into());
        }
        let pooled = lock(&self.idle).pop();
        let mut connection = match pooled {
            Some(connection) => connection,
            None => self.connect().map_err(|e| self.failed(e))?,
        };
        let result = work(&mut connection).map_err(|e| self.failed(e))?;
        let mut idle = lock(&self.idle);
        if idle.len() < POOL {
            idle.push(connection);
        }
        Ok(result)
    }

    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let connection = self.client.get_connection_with_timeout(self.timeout)?;
        connection.set_read_timeout(Some(self.timeout))?;
        connection.set_write_timeout(Some(self.timeout))?;
        Ok(connection)
    }

    /// After an error: every pooled connection may be as dead as this one.
    fn failed(&self, error: redis::RedisError) -> String {
        lock(&self.idle).clear();
        *lock(&self.down_until) = Some(Instant::now() + RETRY_AFTER);
        error.to_string()
    }

    fn fall_back(&self, operation: &'static str, why: &str) {
        metrics::counter!("pandaguard_detection_store_fallback_total", "operation" => operation).increment(1);
        let now = Instant::now();
        let mut last = lock(&self.last_warning);
        if last.is_none_or(|at| now.duration_since(at) >= WARN_EVERY) {
            *last = Some(now);
            tracing::warn!(
                error = why,
                "attack detection: Redis is unavailable or slower than redis_timeout_ms; using this replica's \
                 memory until it answers again (this warning repeats at most every 10 s)"
            );
        }
    }

    fn key(client: &ClientId, suffix: &str) -> String {
        format!("pandaguard:qa:{{{client}}}:{suffix}")
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl FingerprintStore for RedisStore {
    fn record(&self, client: &ClientId, fingerprint: &Fingerprint, thresholds: Thresholds) -> Observation {
        let window_ms = self.limits.window.as_millis().max(1) as u64;
        let mut invocation = self.script.key(Self::key(client, "d"));
        invocation
            .key(Self::key(client, "q"))
            .arg(fingerprint.digest)
            .arg(now_ms())
            .arg(window_ms)
            .arg(window_ms)
            .arg(self.limits.max_queries_per_client.max(1))
            .arg(thresholds.alike)
            .arg(thresholds.close)
            .arg(&fingerprint.hashes);
        match self.with_connection(|c| invocation.invoke::<(usize, usize, usize, usize, u8)>(c)) {
            Ok((matches, alike, close, window, repeat)) => {
                Observation { matches, alike, close, window, repeat: repeat == 1 }
            }
            Err(why) => {
                self.fall_back("record", &why);
                self.local.record(client, fingerprint, thresholds)
            }
        }
    }

    fn cooldown(&self, client: &ClientId) -> Option<Duration> {
        // A refusal started while Redis was away is only known here.
        if let Some(left) = self.local.cooldown(client) {
            return Some(left);
        }
        let key = Self::key(client, "cool");
        match self.with_connection(|c| redis::cmd("PTTL").arg(&key).query::<i64>(c)) {
            Ok(ms) if ms > 0 => Some(Duration::from_millis(ms as u64)),
            Ok(_) => None,
            Err(why) => {
                self.fall_back("cooldown", &why);
                self.local.cooldown(client)
            }
        }
    }

    fn start_cooldown(&self, client: &ClientId, duration: Duration) {
        // Locally as well: a Redis that dies now must not lift the refusal here.
        self.local.start_cooldown(client, duration);
        let key = Self::key(client, "cool");
        let ms = duration.as_millis().max(1) as u64;
        if let Err(why) = self.with_connection(|c| redis::cmd("SET").arg(&key).arg(1).arg("PX").arg(ms).query::<()>(c))
        {
            self.fall_back("cooldown", &why);
        }
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}
