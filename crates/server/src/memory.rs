//! Measuring memory for the memory alarm (switchyard_core::memory): the
//! process's resident set from `/proc/self/status`, and the memory the relative
//! watermark is a fraction of (the machine's, or the cgroup's limit when lower).
//!
//! Linux only, like `/proc`; elsewhere nothing is measured and the alarm runs on
//! the queues' estimate alone (a warning says so at start).

use std::path::Path;
use std::sync::Arc;

use switchyard_core::memory::MEASURE_INTERVAL;
use switchyard_core::Broker;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::allocator;

/// The process's resident memory (VmRSS) in bytes.
pub fn resident_bytes() -> Option<usize> {
    status_kb(
        &std::fs::read_to_string("/proc/self/status").ok()?,
        "VmRSS:",
    )
    .map(|kb| kb.saturating_mul(1024))
}

/// `key` (e.g. `VmRSS:`) of a `/proc/*/status` or `/proc/meminfo` text, in kB.
fn status_kb(text: &str, key: &str) -> Option<usize> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    line.get(key.len()..)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The memory available to this process: the machine's (`MemTotal`), or the
/// cgroup's limit when one is set and lower (cgroup v2 `memory.max`, v1
/// `memory.limit_in_bytes`), as RabbitMQ's vm_memory_monitor does.
pub fn total_memory() -> Option<usize> {
    let machine = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| status_kb(&t, "MemTotal:"))
        .map(|kb| kb.saturating_mul(1024));
    let cgroup = cgroup_limit(Path::new("/"));
    match (machine, cgroup) {
        (Some(m), Some(c)) => Some(m.min(c)),
        (m, c) => m.or(c),
    }
}

/// The memory limit of the cgroup this process is in, under `root` (`/` but in
/// tests): v2's `memory.max` ("max": none), else v1's `memory.limit_in_bytes`
/// (a huge number: none).
fn cgroup_limit(root: &Path) -> Option<usize> {
    let own = std::fs::read_to_string(root.join("proc/self/cgroup")).ok();
    let mut candidates = Vec::new();
    if let Some(own) = &own {
        for line in own.lines() {
            // v2: "0::/path"; v1: "N:memory:/path" (or a list with memory).
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
            let path = path.unwrap_or("/").trim_start_matches('/');
            match controllers {
                Some("") => {
                    candidates.push(root.join("sys/fs/cgroup").join(path).join("memory.max"))
                }
                Some(c) if c.split(',').any(|c| c == "memory") => candidates.push(
                    root.join("sys/fs/cgroup/memory")
                        .join(path)
                        .join("memory.limit_in_bytes"),
                ),
                _ => {}
            }
        }
    }
    // Inside a container the cgroup path is often not visible under its own
    // name: the root of the mounted hierarchy is the container's.
    candidates.push(root.join("sys/fs/cgroup/memory.max"));
    candidates.push(root.join("sys/fs/cgroup/memory/memory.limit_in_bytes"));
    candidates.iter().find_map(|file| {
        let text = std::fs::read_to_string(file).ok()?;
        let value: u64 = text.trim().parse().ok()?; // "max": no limit
                                                    // cgroup v1 says "no limit" with a number near i64::MAX.
        (value < (1 << 62))
            .then(|| usize::try_from(value).ok())
            .flatten()
    })
}

/// The watermark in bytes from the configuration: the absolute value when set,
/// else `relative` of the memory available (0: off). `None` when relative was
/// asked for but the memory cannot be read.
pub fn watermark(absolute: usize, relative: f64) -> Option<usize> {
    if absolute > 0 {
        return Some(absolute);
    }
    if relative <= 0.0 {
        return Some(0);
    }
    let total = total_memory()?;
    // Truncation is fine: a fraction of a byte does not matter.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Some((total as f64 * relative) as usize)
}

/// Samples resident memory into the broker's memory monitor every
/// [`MEASURE_INTERVAL`] until shutdown.
pub async fn watch(broker: Arc<Broker>, shutdown: CancellationToken) {
    if resident_bytes().is_none() {
        warn!("cannot read /proc/self/status: the memory alarm uses the queues' estimate only");
        return;
    }
    info!(
        high_watermark = broker.memory.high_watermark(),
        "memory alarm measures resident memory"
    );
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + MEASURE_INTERVAL,
        MEASURE_INTERVAL,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut trimmer = allocator::Trimmer::default();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(rss) = resident_bytes() else {
            continue;
        };
        broker.memory.measured(rss);
        let (retained, unexplained) = (broker.memory.retained(), broker.memory.unexplained());
        let now = std::time::Instant::now();
        if trimmer.due(now, retained, unexplained) {
            // The next sample sees what came back, and `retained` falls with it.
            let returned = tokio::task::spawn_blocking(allocator::give_back)
                .await
                .unwrap_or(false);
            let after = resident_bytes().unwrap_or(rss);
            trimmer.trimmed(rss, after);
            debug!(
                retained,
                unexplained,
                before = rss,
                after,
                returned,
                took_us = now.elapsed().as_micros(),
                "gave freed memory back"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kb_fields() {
        let t = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(status_kb(t, "VmRSS:"), Some(1024));
        assert_eq!(status_kb(t, "Nope:"), None);
        assert!(resident_bytes().is_some_and(|b| b > 0));
    }

    #[test]
    fn the_cgroup_limit_is_honoured_v2_and_v1() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("proc/self")).unwrap();
        std::fs::create_dir_all(root.join("sys/fs/cgroup/app")).unwrap();
        std::fs::write(root.join("proc/self/cgroup"), "0::/app\n").unwrap();
        std::fs::write(root.join("sys/fs/cgroup/app/memory.max"), "max\n").unwrap();
        assert_eq!(cgroup_limit(root), None, "max: no limit");
        std::fs::write(root.join("sys/fs/cgroup/app/memory.max"), "536870912\n").unwrap();
        assert_eq!(cgroup_limit(root), Some(536_870_912));

        let v1 = tempfile::tempdir().unwrap();
        let root = v1.path();
        std::fs::create_dir_all(root.join("proc/self")).unwrap();
        std::fs::create_dir_all(root.join("sys/fs/cgroup/memory/docker/x")).unwrap();
        std::fs::write(root.join("proc/self/cgroup"), "4:memory:/docker/x\n").unwrap();
        let file = root.join("sys/fs/cgroup/memory/docker/x/memory.limit_in_bytes");
        std::fs::write(&file, "9223372036854771712\n").unwrap();
        assert_eq!(cgroup_limit(root), None, "v1's huge number: no limit");
        std::fs::write(&file, "268435456\n").unwrap();
        assert_eq!(cgroup_limit(root), Some(268_435_456));
    }

    #[test]
    fn absolute_wins_relative_is_a_fraction_both_zero_is_off() {
        assert_eq!(watermark(123, 0.4), Some(123));
        assert_eq!(watermark(0, 0.0), Some(0));
        let total = total_memory().unwrap();
        let w = watermark(0, 0.4).unwrap();
        assert!(w > 0 && w <= total / 2, "{w} of {total}");
    }
}
