//! Giving freed memory back to the system.
//!
//! glibc's allocator keeps what the program frees on its arenas' free lists
//! and returns pages to the system only from the top of a heap. After a
//! backlog of a million small messages drains, the broker's resident memory
//! stays at its peak (about 175 MB of the 220 MB a million 16-byte messages
//! took, measured in bench/notes.md); after 100 stream consumers replayed a
//! stream, 320 MB. The memory alarm measures resident memory, so it can only
//! count such memory as retained, and operators see a broker that never
//! shrinks. `malloc_trim` walks every arena and hands the free pages back
//! (`madvise`), so the resident set falls to what is live.
//!
//! The memory watch asks a [`Trimmer`] after every sample whether to trim;
//! the trim runs on a blocking thread: it locks each arena in turn while it
//! walks it (tens of milliseconds on a heap of a few hundred MB), so a worker
//! that allocates meanwhile waits.

use std::time::{Duration, Instant};

/// Memory worth a trim: retained by queues, or unexplained (see [`Trimmer`]).
pub const TRIM_AT: usize = 32 << 20;

/// At most one trim this often: a queue that is filled and drained in turns
/// must not make the broker walk its heap on every sample.
pub const MIN_INTERVAL: Duration = Duration::from_secs(5);

/// The longest wait between two trims for unexplained memory.
pub const MAX_INTERVAL: Duration = Duration::from_secs(320);

/// When to trim. Two signals:
/// - memory the queues released and that is still resident (the monitor's
///   `retained`): a drained backlog, almost surely free inside the
///   allocator. Trimmed at most every [`MIN_INTERVAL`].
/// - resident memory nothing explains (the monitor's `unexplained`: above
///   the idle broker and the queues' estimate): freed stream readers' and
///   connections' buffers, or live connections. A trim tells which: when it
///   gives back less than a quarter of [`TRIM_AT`], the memory is live and the
///   wait before the next such trim doubles, up to [`MAX_INTERVAL`]; when it
///   gives back more, the wait is back to [`MIN_INTERVAL`]. So 100,000 idle
///   connections cost one useless walk every few minutes, not every 5 s.
#[derive(Debug)]
pub struct Trimmer {
    /// When the last trim started (`None`: never trimmed).
    last: Option<Instant>,
    /// The wait before trimming for unexplained memory.
    backoff: Duration,
}

impl Default for Trimmer {
    fn default() -> Self {
        Trimmer {
            last: None,
            backoff: MIN_INTERVAL,
        }
    }
}

impl Trimmer {
    /// Whether to trim `now`, with what the monitor counts as retained and
    /// unexplained; if so, `now` is taken as the trim's start.
    pub fn due(&mut self, now: Instant, retained: usize, unexplained: usize) -> bool {
        let waited = |wait: Duration| {
            self.last
                .is_none_or(|last| now.saturating_duration_since(last) >= wait)
        };
        let due = (retained >= TRIM_AT && waited(MIN_INTERVAL))
            || (unexplained >= TRIM_AT && waited(self.backoff));
        if due {
            self.last = Some(now);
        }
        due
    }

    /// What the trim [`Self::due`] asked for did: resident bytes before and
    /// after it.
    pub fn trimmed(&mut self, before: usize, after: usize) {
        self.backoff = if before.saturating_sub(after) < TRIM_AT / 4 {
            self.backoff.saturating_mul(2).min(MAX_INTERVAL)
        } else {
            MIN_INTERVAL
        };
    }
}

/// Returns the allocator's free pages to the system. Returns whether
/// anything was returned.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn give_back() -> bool {
    // SAFETY: malloc_trim takes no pointer and touches only the allocator's
    // own state, under the allocator's own locks; any thread may call it at
    // any time.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other allocators (musl's, the system's elsewhere) have no such call.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn give_back() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(100);

    /// A trimmer on a simulated clock that advances one sample interval per
    /// question.
    struct Clock {
        t: Trimmer,
        now: Instant,
    }

    impl Clock {
        fn new() -> Self {
            Clock {
                t: Trimmer::default(),
                now: Instant::now(),
            }
        }

        fn due(&mut self, retained: usize, unexplained: usize) -> bool {
            self.now += TICK;
            self.t.due(self.now, retained, unexplained)
        }

        /// Ticks until the trimmer says trim; how many ticks that took (or
        /// `None` within `limit`).
        fn ticks_until_due(
            &mut self,
            retained: usize,
            unexplained: usize,
            limit: u32,
        ) -> Option<u32> {
            (1..=limit).find(|_| self.due(retained, unexplained))
        }
    }

    #[test]
    fn memory_released_by_queues_is_trimmed_at_most_every_min_interval() {
        let mut c = Clock::new();
        assert!(!c.due(TRIM_AT - 1, 0), "too little to bother");
        assert!(c.due(TRIM_AT, 0), "the first time at once");
        c.t.trimmed(100 << 20, 10 << 20);
        assert_eq!(
            c.ticks_until_due(TRIM_AT, 0, 1000),
            Some(50),
            "then every 5 s"
        );
    }

    #[test]
    fn live_unexplained_memory_backs_off_and_freed_memory_resets_it() {
        let mut c = Clock::new();
        assert!(c.due(0, TRIM_AT));
        // Nothing came back: the memory is live; each useless trim doubles the wait.
        for wait in [10u32, 20, 40, 80, 160, 320, 320] {
            c.t.trimmed(200 << 20, 199 << 20);
            assert_eq!(c.ticks_until_due(0, TRIM_AT, 10_000), Some(wait * 10));
        }
        // A queue drains meanwhile: its memory is trimmed on the short interval.
        c.t.trimmed(200 << 20, 199 << 20);
        assert_eq!(c.ticks_until_due(TRIM_AT, TRIM_AT, 10_000), Some(50));
        // A trim that gave back a lot brings the short interval back for unexplained memory.
        c.t.trimmed(300 << 20, 20 << 20);
        assert_eq!(c.ticks_until_due(0, TRIM_AT, 10_000), Some(50));
    }

    #[test]
    fn giving_back_is_safe_to_call_any_time() {
        let kept: Vec<Vec<u8>> = (0..1000).map(|i| vec![1; 100 + i]).collect();
        drop(kept);
        give_back();
        give_back();
    }
}
