//! Pacing (governor): a replay's own `rate_per_sec`, the team's replay quota shared by all
//! of a team's replays (so one team's replays cannot starve another's), and the per-team
//! limit on replay API requests.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

/// A direct limiter with the burst it was built with.
pub struct Limiter {
    inner: DefaultDirectRateLimiter,
    burst: u32,
}

impl Limiter {
    /// `per_sec` events a second (fractions allowed), in bursts of at most `burst`.
    pub fn new(per_sec: f64, burst: u32) -> Self {
        let per_sec = per_sec.max(0.001);
        let period = Duration::from_secs_f64(1.0 / per_sec).max(Duration::from_nanos(1));
        let burst = burst.max(1);
        let quota = Quota::with_period(period)
            .expect("a positive period")
            .allow_burst(NonZeroU32::new(burst).expect("burst is at least 1"));
        Self {
            inner: RateLimiter::direct(quota),
            burst,
        }
    }

    /// Waits until `n` events may go (in pieces no larger than the burst).
    pub async fn acquire(&self, mut n: u32) {
        while n > 0 {
            let k = n.min(self.burst);
            let _ = self
                .inner
                .until_n_ready(NonZeroU32::new(k).expect("k is at least 1"))
                .await;
            n -= k;
        }
    }
}

/// Each team's replay quota: one limiter per team, shared by its replays.
pub struct TeamQuotas {
    rate: Option<u32>,
    teams: Mutex<HashMap<String, Arc<Limiter>>>,
}

impl TeamQuotas {
    pub fn new(rate: Option<u32>) -> Self {
        Self {
            rate,
            teams: Mutex::default(),
        }
    }

    /// The team's limiter; `None` when there is no quota.
    pub fn of(&self, team_id: &str) -> Option<Arc<Limiter>> {
        let rate = self.rate?;
        let mut teams = self.teams.lock().expect("lock");
        if teams.len() > 10_000 {
            // Bound memory: limiters are cheap to make again (a team gets a fresh burst).
            teams.retain(|_, l| Arc::strong_count(l) > 1);
        }
        Some(
            teams
                .entry(team_id.to_string())
                .or_insert_with(|| Arc::new(Limiter::new(rate as f64, (rate / 10).max(1))))
                .clone(),
        )
    }
}

/// Requests per second per team on the replay API.
pub struct ApiLimiter {
    inner: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
    checks: std::sync::atomic::AtomicU64,
}

impl ApiLimiter {
    pub fn new(per_sec: u32) -> Self {
        let per_sec = NonZeroU32::new(per_sec.max(1)).expect("at least 1");
        let burst = NonZeroU32::new(per_sec.get().saturating_mul(2)).expect("at least 2");
        Self {
            inner: RateLimiter::keyed(Quota::per_second(per_sec).allow_burst(burst)),
            clock: DefaultClock::default(),
            checks: Default::default(),
        }
    }

    /// `Err(wait)` when the team is over its rate.
    pub fn check(&self, team_id: &str) -> Result<(), Duration> {
        // Bound the key store: forget teams whose state is back to full every so often.
        if self
            .checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(4096)
        {
            self.inner.retain_recent();
            self.inner.shrink_to_fit();
        }
        self.inner
            .check_key(&team_id.to_string())
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_limiter_paces_to_its_rate() {
        let l = Limiter::new(200.0, 20);
        let started = std::time::Instant::now();
        // The first burst passes at once; 100 more take about half a second.
        l.acquire(120).await;
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(450), "{took:?}");
        assert!(took < Duration::from_millis(900), "{took:?}");
    }

    #[test]
    fn the_api_limiter_limits_each_team_alone() {
        let l = ApiLimiter::new(1);
        assert!(l.check("a").is_ok());
        assert!(l.check("a").is_ok());
        let wait = l.check("a").unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert!(l.check("b").is_ok());
    }

    #[test]
    fn teams_share_one_quota_each() {
        let q = TeamQuotas::new(Some(100));
        assert!(Arc::ptr_eq(&q.of("a").unwrap(), &q.of("a").unwrap()));
        assert!(!Arc::ptr_eq(&q.of("a").unwrap(), &q.of("b").unwrap()));
        assert!(TeamQuotas::new(None).of("a").is_none());
    }
}
