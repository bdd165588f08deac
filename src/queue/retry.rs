//! When a failed attempt runs again, and what "now" is for the queue.
//!
//! [`RetryPolicy`] is exponential backoff with jitter (as River's default): the delay before
//! attempt n+1 is `min(base · 2^(n-1), max)` times a jitter drawn from `[jitter_min, 1)`.
//! [`Clock`] is the database's `now()` plus an offset that is zero in production; tests move
//! it forward to expire leases and pass backoffs without sleeping, and every time the queue
//! reads or writes goes through it, so it stays consistent with itself.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    pub base: Duration,
    pub max: Duration,
    /// The smallest jitter factor; 1 makes delays exact.
    pub jitter_min: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_secs(10),
            max: Duration::from_secs(600),
            jitter_min: 0.5,
        }
    }
}

impl RetryPolicy {
    /// The delay before the attempt after `attempt` (1-based), jittered by `factor` in [0, 1).
    pub fn delay_at(&self, attempt: i32, factor: f64) -> Duration {
        let exp = 2f64.powi((attempt - 1).clamp(0, 62));
        let raw = (self.base.as_secs_f64() * exp).min(self.max.as_secs_f64());
        let jitter = self.jitter_min + (1.0 - self.jitter_min) * factor.clamp(0.0, 1.0);
        Duration::from_secs_f64(raw * jitter)
    }

    /// The delay before the attempt after `attempt`, with a random jitter.
    pub fn delay(&self, attempt: i32) -> Duration {
        self.delay_at(attempt, rand::rng().random::<f64>())
    }
}

/// The queue's clock: the database's `now()` shifted by an offset (zero unless a test moves
/// it). Clones share the offset.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    /// Moves the queue's time forward (tests).
    pub fn advance(&self, d: Duration) {
        self.offset_ms
            .fetch_add(d.as_millis() as i64, Ordering::SeqCst);
    }

    /// The offset in seconds, bound as the parameter of [`now_sql`].
    pub fn offset_secs(&self) -> f64 {
        self.offset_ms.load(Ordering::SeqCst) as f64 / 1000.0
    }
}

/// The queue's "now" in SQL, with the clock's offset as parameter `$n`.
pub fn now_sql(n: usize) -> String {
    format!("(now() + make_interval(secs => ${n}))")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_within_its_jitter() {
        let p = RetryPolicy {
            base: Duration::from_secs(10),
            max: Duration::from_secs(60),
            jitter_min: 0.5,
        };
        let secs = |a, f| p.delay_at(a, f).as_secs_f64();
        assert_eq!(secs(1, 1.0), 10.0);
        assert_eq!(secs(2, 1.0), 20.0);
        assert_eq!(secs(3, 1.0), 40.0);
        assert_eq!(secs(4, 1.0), 60.0);
        assert_eq!(secs(40, 1.0), 60.0);
        assert_eq!(secs(1, 0.0), 5.0);
        for _ in 0..100 {
            let d = p.delay(2).as_secs_f64();
            assert!((10.0..20.0).contains(&d), "{d}");
        }
        let exact = RetryPolicy {
            jitter_min: 1.0,
            ..p
        };
        assert_eq!(exact.delay(3), Duration::from_secs(40));
    }

    #[test]
    fn clones_share_the_clock() {
        let c = Clock::default();
        let d = c.clone();
        c.advance(Duration::from_millis(1500));
        assert_eq!(d.offset_secs(), 1.5);
    }
}
