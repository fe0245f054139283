//! CPU time and memory of a process, from /proc (Linux).
//!
//! `/proc/<pid>/stat` fields 14 and 15 are user and system time in clock ticks of
//! all the process's threads; `/proc/<pid>/status` has VmRSS (resident now) and
//! VmHWM (the peak resident set).

use anyhow::{Context, Result};

/// Clock ticks per second of /proc/<pid>/stat: USER_HZ, 100 on every Linux
/// architecture we run on (`getconf CLK_TCK`).
const TICKS_PER_SEC: f64 = 100.0;

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Sample {
    pub cpu_secs: f64,
    pub rss_kb: u64,
    pub hwm_kb: u64,
    /// Bytes the process read through read-like system calls (page cache
    /// included) and bytes it made the block layer fetch from disk
    /// (`/proc/<pid>/io` rchar and read_bytes; 0 where it is not readable).
    pub rchar: u64,
    pub read_bytes: u64,
}

pub fn sample(pid: u32) -> Result<Sample> {
    read(&format!("/proc/{pid}"))
}

/// Resets the process's VmHWM to its current resident set (`clear_refs` 5),
/// so that the peak a run reports is that run's own, not the largest since the
/// broker started (one broker serves many cases in a row). Best effort: where
/// it cannot be written (another user's process) the peak stays cumulative.
pub fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

pub fn sample_self() -> Result<Sample> {
    read("/proc/self")
}

fn read(dir: &str) -> Result<Sample> {
    let stat = std::fs::read_to_string(format!("{dir}/stat"))
        .with_context(|| format!("reading {dir}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: split after it.
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3, so utime (14) and stime (15) are at 11 and 12.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let cpu_secs = (ticks(11) + ticks(12)) as f64 / TICKS_PER_SEC;
    let status = std::fs::read_to_string(format!("{dir}/status"))
        .with_context(|| format!("reading {dir}/status"))?;
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let io = std::fs::read_to_string(format!("{dir}/io")).unwrap_or_default();
    let io_field = |key: &str| {
        io.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(Sample {
        cpu_secs,
        rss_kb: kb("VmRSS:"),
        hwm_kb: kb("VmHWM:"),
        rchar: io_field("rchar:"),
        read_bytes: io_field("read_bytes:"),
    })
}

/// CPU seconds the whole machine has spent busy (all cores, all processes) since
/// boot, from the first line of /proc/stat: user, nice, system, irq, softirq and
/// steal (guest time is already inside user). Subtracting the broker's and this
/// tool's CPU from the difference over a run gives what *other* processes used:
/// the noise on a shared machine.
pub fn machine_busy_secs() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat.lines().next().unwrap_or("");
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    Ok(busy as f64 / TICKS_PER_SEC)
}
