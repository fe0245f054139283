//! The connection rate limit per source address (`[limits]
//! connection_rate_per_ip`): a token bucket per IP address, refilled at `rate`
//! tokens a second up to `rate` (so a burst of `rate` connections at once is
//! allowed, then `rate` a second). RabbitMQ has no such limit; EMQX's
//! `max_conn_rate` and LavinMQ's proposal (#1776) are the model.
//!
//! Time comes in as `now_ms` (the broker's clock), so the logic is tested
//! without sleeping. The table is bounded: when it is full, addresses whose
//! bucket is full again (idle ones) are dropped, and if none is, the new address
//! is admitted without a bucket rather than evicting a limited one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};

use parking_lot::Mutex;

/// What every refusal by this limit says (adapters pick their error by it).
pub const REFUSAL: &str = "connection rate limit";

/// Addresses tracked at most.
const MAX_ADDRESSES: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens, in thousandths (one connection costs 1000).
    milli_tokens: u64,
    at_ms: u64,
}

/// Per-address token buckets.
#[derive(Debug, Default)]
pub struct ConnectionRate {
    /// Connections a second per address; 0 = no limit.
    rate: AtomicU32,
    /// Held only for one map lookup and update; nothing awaits under it.
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl ConnectionRate {
    pub fn new(rate: u32) -> Self {
        ConnectionRate {
            rate: AtomicU32::new(rate),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Connections a second per address (0: no limit).
    pub fn rate(&self) -> u32 {
        self.rate.load(Ordering::Relaxed)
    }

    pub fn set_rate(&self, rate: u32) {
        self.rate.store(rate, Ordering::Relaxed);
        self.buckets.lock().clear();
    }

    /// Takes a token for a new connection from `ip`; false: over the rate.
    pub fn admit(&self, ip: IpAddr, now_ms: u64) -> bool {
        let rate = u64::from(self.rate());
        if rate == 0 {
            return true;
        }
        let full = rate.saturating_mul(1000);
        let mut buckets = self.buckets.lock();
        if buckets.len() >= MAX_ADDRESSES && !buckets.contains_key(&ip) {
            buckets.retain(|_, b| refill(b, rate, full, now_ms) < full);
            if buckets.len() >= MAX_ADDRESSES {
                return true;
            }
        }
        let b = buckets.entry(ip).or_insert(Bucket {
            milli_tokens: full,
            at_ms: now_ms,
        });
        let tokens = refill(b, rate, full, now_ms);
        if tokens >= 1000 {
            b.milli_tokens = tokens - 1000;
            b.at_ms = now_ms;
            true
        } else {
            false
        }
    }
}

/// The bucket's tokens at `now_ms` (not stored).
fn refill(b: &Bucket, rate: u64, full: u64, now_ms: u64) -> u64 {
    let elapsed = now_ms.saturating_sub(b.at_ms);
    // `rate` tokens a second = `rate` milli-tokens a millisecond.
    b.milli_tokens
        .saturating_add(elapsed.saturating_mul(rate))
        .min(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_rate_then_rate_a_second_per_address() {
        let r = ConnectionRate::new(3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!((0..3).all(|_| r.admit(a, 1000)));
        assert!(!r.admit(a, 1000));
        // Another address has its own bucket.
        assert!(r.admit(b, 1000));
        // A third of a second later one token is back.
        assert!(!r.admit(a, 1300));
        assert!(r.admit(a, 1334));
        assert!(!r.admit(a, 1334));
        // Long idle: full again, never more than the burst.
        assert!((0..3).all(|_| r.admit(a, 60_000)));
        assert!(!r.admit(a, 60_000));
    }

    #[test]
    fn zero_is_no_limit() {
        let r = ConnectionRate::new(0);
        let a: IpAddr = "::1".parse().unwrap();
        assert!((0..10_000).all(|_| r.admit(a, 0)));
    }
}
