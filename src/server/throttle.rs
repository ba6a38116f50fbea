//! Wrong keys are slowed down per client address: a token bucket of
//! [`FREE_FAILURES`] wrong keys, refilled one every [`REFILL`]. While an address's
//! bucket is empty, its requests that carry a key are answered `429 Too Many Requests`
//! with `Retry-After` before the key is even looked at, so guessing keys from one
//! address runs at one guess every two seconds instead of thousands a second.
//!
//! Invariants: an address with no recent wrong key is never slowed down, so correct
//! keys from other addresses never wait; IPv6 addresses count per /64 (one host may
//! hold a whole /64); the table holds at most [`MAX_ADDRESSES`] addresses (full
//! buckets are forgotten first, then the least recently failed), so memory is bounded
//! whatever the number of addresses an attacker holds. While an address has failures
//! on record, each key check in flight holds one of its tokens (given back when the key
//! is right), so opening many connections at once buys no extra guesses.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Wrong keys an address may send before it is slowed down.
pub const FREE_FAILURES: u32 = 10;

/// How long an address waits for each further attempt.
pub const REFILL: Duration = Duration::from_secs(2);

/// Addresses the table remembers at most.
pub const MAX_ADDRESSES: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Attempts left, as of `at` (fractions refill over time).
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refilled(&self, now: Instant) -> f64 {
        let gained = now.saturating_duration_since(self.at).as_secs_f64() / REFILL.as_secs_f64();
        (self.tokens + gained).min(f64::from(FREE_FAILURES))
    }
}

/// What the throttle says about a request that carries a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Check the key; report the outcome with [`KeyThrottle::done`].
    Check(Ticket),
    /// Refuse without checking: too many wrong keys; try again after this long.
    Wait(Duration),
}

/// A key check let through; hand it back with the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    key: Option<IpAddr>,
    /// Whether a token was taken for this check (the address has failures on record).
    reserved: bool,
}

/// The per-address wrong-key table.
#[derive(Debug, Default)]
pub struct KeyThrottle {
    table: Mutex<HashMap<IpAddr, Bucket>>,
}

/// The table key of an address: IPv4 as it is, IPv6 by its /64.
fn table_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

impl KeyThrottle {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Bucket>> {
        // A panic while holding it cannot leave a bucket half-updated.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a key from `peer` may be checked now.
    pub fn admit(&self, peer: Option<IpAddr>, now: Instant) -> Verdict {
        let Some(key) = peer.map(table_key) else {
            return Verdict::Check(Ticket {
                key: None,
                reserved: false,
            });
        };
        let mut table = self.lock();
        let Some(bucket) = table.get_mut(&key) else {
            return Verdict::Check(Ticket {
                key: Some(key),
                reserved: false,
            });
        };
        let tokens = bucket.refilled(now);
        if tokens < 1.0 {
            let wait = REFILL.mul_f64(1.0 - tokens);
            return Verdict::Wait(wait.max(Duration::from_secs(1)));
        }
        *bucket = Bucket {
            tokens: tokens - 1.0,
            at: now,
        };
        Verdict::Check(Ticket {
            key: Some(key),
            reserved: true,
        })
    }

    /// The outcome of a check [`KeyThrottle::admit`] let through: `wrong` when the key
    /// was missing or wrong.
    pub fn done(&self, ticket: Ticket, wrong: bool, now: Instant) {
        let Some(key) = ticket.key else {
            return;
        };
        let mut table = self.lock();
        match (wrong, ticket.reserved) {
            // The token taken at admission pays for it.
            (true, true) => {}
            (true, false) => {
                if !table.contains_key(&key) {
                    make_room(&mut table, now);
                }
                let bucket = table.entry(key).or_insert(Bucket {
                    tokens: f64::from(FREE_FAILURES),
                    at: now,
                });
                *bucket = Bucket {
                    tokens: bucket.refilled(now) - 1.0,
                    at: now,
                };
            }
            (false, true) => {
                if let Some(bucket) = table.get_mut(&key) {
                    *bucket = Bucket {
                        tokens: bucket.refilled(now) + 1.0,
                        at: now,
                    };
                }
            }
            (false, false) => {}
        }
    }

    /// Addresses on record (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Frees a place in a full table: forgets full buckets, then the least recently failed.
fn make_room(table: &mut HashMap<IpAddr, Bucket>, now: Instant) {
    if table.len() < MAX_ADDRESSES {
        return;
    }
    table.retain(|_, b| b.refilled(now) < f64::from(FREE_FAILURES));
    if table.len() >= MAX_ADDRESSES
        && let Some(oldest) = table.iter().min_by_key(|(_, b)| b.at).map(|(k, _)| *k)
    {
        table.remove(&oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().expect("address"))
    }

    fn attempt(t: &KeyThrottle, peer: Option<IpAddr>, wrong: bool, now: Instant) -> bool {
        match t.admit(peer, now) {
            Verdict::Check(ticket) => {
                t.done(ticket, wrong, now);
                true
            }
            Verdict::Wait(_) => false,
        }
    }

    #[test]
    fn free_wrong_keys_then_one_every_refill() {
        let t = KeyThrottle::default();
        let now = Instant::now();
        let answered = (0..100)
            .filter(|_| attempt(&t, ip("10.0.0.1"), true, now))
            .count();
        assert_eq!(answered, FREE_FAILURES as usize);
        let Verdict::Wait(wait) = t.admit(ip("10.0.0.1"), now) else {
            panic!("throttled");
        };
        assert!(wait >= Duration::from_secs(1) && wait <= REFILL, "{wait:?}");
        assert!(attempt(&t, ip("10.0.0.1"), true, now + REFILL));
        assert!(!attempt(&t, ip("10.0.0.1"), true, now + REFILL));
        // Other addresses and right keys elsewhere are not slowed down.
        assert!((0..50).all(|_| attempt(&t, ip("10.0.0.2"), false, now)));
        // After a quiet while the address is forgiven.
        let later = now + REFILL * (FREE_FAILURES + 1);
        assert!((0..20).all(|_| attempt(&t, ip("10.0.0.1"), false, later)));
    }

    #[test]
    fn concurrent_checks_buy_no_extra_guesses() {
        let t = KeyThrottle::default();
        let now = Instant::now();
        assert!(attempt(&t, ip("10.0.0.1"), true, now));
        // One token spent: only the rest may be in flight at once.
        let tickets: Vec<_> = (0..10)
            .filter_map(|_| match t.admit(ip("10.0.0.1"), now) {
                Verdict::Check(ticket) => Some(ticket),
                Verdict::Wait(_) => None,
            })
            .collect();
        assert_eq!(tickets.len(), FREE_FAILURES as usize - 1);
    }

    #[test]
    fn ipv6_counts_per_64_and_the_table_is_capped() {
        let t = KeyThrottle::default();
        let now = Instant::now();
        for i in 0..FREE_FAILURES {
            assert!(attempt(&t, ip(&format!("2001:db8::{i}")), true, now));
        }
        assert!(!attempt(&t, ip("2001:db8::ffff"), true, now));
        assert!(attempt(&t, ip("2001:db8:0:1::1"), true, now));
        for i in 0..(MAX_ADDRESSES as u32 + 100) {
            let a = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            attempt(&t, Some(IpAddr::V4(a)), true, now);
        }
        assert!(t.len() <= MAX_ADDRESSES);
    }
}
