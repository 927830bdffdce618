//! Per-token rate limiting with governor (GCRA), over a key store of bounded size.
//!
//! governor's default keyed store grows with every distinct key until `retain_recent` runs. A
//! gateway facing a million tokens needs a hard bound, so [`BoundedStore`] keeps at most
//! `max_keys` buckets in 16 shards; when a shard is full, the bucket with the earliest
//! theoretical arrival time goes — the idlest token, whose bucket is the closest to full
//! anyway. Forgetting a bucket can only grant that token a fresh burst, never block it wrongly.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::{Quota, RateLimiter};

const SHARDS: usize = 16;

/// A sharded map of GCRA states with a hard cap on entries.
pub struct BoundedStore {
    shards: Vec<Mutex<HashMap<u64, Nanos>>>,
    per_shard: usize,
    hasher: std::collections::hash_map::RandomState,
}

impl BoundedStore {
    pub fn new(max_keys: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: max_keys.div_ceil(SHARDS).max(1),
            hasher: Default::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().expect("lock").len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl StateStore for BoundedStore {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let shard = &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS];
        let mut map = shard.lock().expect("lock");
        let (value, new) = f(map.get(key).copied())?;
        if !map.contains_key(key) && map.len() >= self.per_shard {
            let idlest = map.iter().min_by_key(|(_, tat)| **tat).map(|(k, _)| *k);
            if let Some(idlest) = idlest {
                map.remove(&idlest);
            }
        }
        map.insert(*key, new);
        Ok(value)
    }
}

impl governor::state::keyed::ShrinkableKeyedStateStore<u64> for BoundedStore {
    fn retain_recent(&self, drop_below: Nanos) {
        for shard in &self.shards {
            shard
                .lock()
                .expect("lock")
                .retain(|_, tat| *tat >= drop_below);
        }
    }

    fn shrink_to_fit(&self) {
        for shard in &self.shards {
            shard.lock().expect("lock").shrink_to_fit();
        }
    }

    fn len(&self) -> usize {
        BoundedStore::len(self)
    }

    fn is_empty(&self) -> bool {
        BoundedStore::is_empty(self)
    }
}

/// The outcome of a rate-limit check that failed.
#[derive(Debug, Clone)]
pub enum Limited {
    /// Over the limit: try again after this long.
    RetryAfter(Duration),
    /// The request alone is larger than the burst; it can never pass. Send smaller batches.
    TooLarge { burst: u32 },
}

/// Events per second per token.
pub struct TokenRateLimiter {
    limiter: Option<RateLimiter<u64, BoundedStore, DefaultClock>>,
    clock: DefaultClock,
    pub events_per_sec: u32,
    pub burst: u32,
}

impl TokenRateLimiter {
    /// `events_per_sec == 0` turns limiting off.
    pub fn new(events_per_sec: u32, burst: u32, max_keys: usize) -> Self {
        let clock = DefaultClock::default();
        let limiter = NonZeroU32::new(events_per_sec).map(|rate| {
            let burst = NonZeroU32::new(burst).unwrap_or(rate);
            RateLimiter::new(
                Quota::per_second(rate).allow_burst(burst),
                BoundedStore::new(max_keys),
                clock.clone(),
            )
        });
        Self {
            limiter,
            clock,
            events_per_sec,
            burst,
        }
    }

    pub fn enabled(&self) -> bool {
        self.limiter.is_some()
    }

    /// Takes `events` cells from the token's bucket.
    pub fn check(&self, token_id: &str, events: u32) -> Result<(), Limited> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let Some(n) = NonZeroU32::new(events) else {
            return Ok(());
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        token_id.hash(&mut h);
        match limiter.check_key_n(&h.finish(), n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Limited::RetryAfter(
                not_until.wait_time_from(self.clock.now()),
            )),
            Err(_) => Err(Limited::TooLarge { burst: self.burst }),
        }
    }

    /// Buckets currently held (bounded by `max_keys`).
    pub fn tracked_keys(&self) -> usize {
        self.limiter.as_ref().map_or(0, |l| l.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_token_and_reports_retry_after() {
        let limiter = TokenRateLimiter::new(10, 10, 1000);
        assert!(limiter.check("a", 10).is_ok());
        match limiter.check("a", 1) {
            Err(Limited::RetryAfter(d)) => assert!(
                d > Duration::ZERO && d <= Duration::from_millis(100),
                "{d:?}"
            ),
            other => panic!("expected RetryAfter, got {other:?}"),
        }
        // Another token has its own bucket.
        assert!(limiter.check("b", 10).is_ok());
        assert!(matches!(
            limiter.check("c", 11),
            Err(Limited::TooLarge { burst: 10 })
        ));
        assert!(
            TokenRateLimiter::new(0, 0, 10)
                .check("a", 1_000_000)
                .is_ok()
        );
    }

    #[test]
    fn a_million_tokens_do_not_grow_the_store_past_its_bound() {
        let limiter = TokenRateLimiter::new(100, 100, 1_600);
        for i in 0..1_000_000u32 {
            limiter.check(&format!("tok_{i}"), 1).unwrap();
        }
        let held = limiter.tracked_keys();
        assert!(held <= 1_600, "{held} buckets held");
        assert!(held >= 1_400, "{held} buckets held");
    }
}
