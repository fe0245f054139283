//! A broker in a child process, for crash tests: a config file written from the
//! shipped `config.toml` (every listener on a free port, in a given data
//! directory), the process started with `--ready-file`, its listeners' addresses
//! read from that file, and `kill -9`. The one helper every crash test uses;
//! when a test fails, the child's log is printed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a child broker may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Writes `dir/config.toml`: the shipped config with `data_dir` in `dir/data`
/// and every listener on 127.0.0.1 port 0 ([`crate::child_config_toml`]), so
/// the child never needs a default port another process may hold.
pub fn write_config(dir: &Path) -> PathBuf {
    let text = crate::child_config_toml(&dir.join("data"), &[]);
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("testkit: cannot write config: {e}"));
    path
}

/// The address of `listener` in a ready file's JSON (`{"amqp":"127.0.0.1:5672",...}`).
fn listener_in(ready: &str, listener: &str) -> Option<String> {
    let key = format!("\"{listener}\":\"");
    let start = ready.find(&key)? + key.len();
    let len = ready.get(start..)?.find('"')?;
    ready.get(start..start + len).map(str::to_owned)
}

/// Waits for a ready file (JSON of listener addresses, as the binary's
/// `--ready-file` writes it, atomically) and returns its text.
pub fn wait_ready(ready: &Path, child: &mut Child) -> String {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(text) = std::fs::read_to_string(ready) {
            if listener_in(&text, "amqp").is_some() {
                return text;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("testkit: the child broker exited before it was ready: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "testkit: the child broker did not start; see {}",
            ready.display()
        );
        // Polling a file another process writes: there is nothing to await.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running child process with its listeners' addresses.
pub struct ChildBroker {
    pub child: Child,
    /// The AMQP listener's address.
    pub amqp: String,
    /// The ready file's text: every listener's address.
    ready: String,
    /// Where its stderr goes, printed if the test fails.
    log: PathBuf,
}

impl ChildBroker {
    /// Runs `program args...` (stderr to `dir/<name>.log`) and waits for the
    /// ready file `ready`, which the program must write.
    pub fn spawn(mut command: Command, dir: &Path, name: &str, ready: &Path) -> ChildBroker {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("testkit: cannot create the child's log: {e}"));
        let mut child = command
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("testkit: cannot start the child: {e}"));
        let ready = wait_ready(ready, &mut child);
        let amqp = listener_in(&ready, "amqp").unwrap_or_default();
        ChildBroker {
            child,
            amqp,
            ready,
            log,
        }
    }

    /// Starts the broker binary `exe` on `dir` (data in `dir/data`, config
    /// `dir/config.toml`: the shipped one with every listener on a free port and
    /// the shipped keys named in `overrides` replaced), as run number `run`.
    pub fn start_in(exe: &Path, dir: &Path, run: usize, overrides: &[(&str, &str)]) -> ChildBroker {
        let text = crate::child_config_toml(&dir.join("data"), overrides);
        let config = dir.join("config.toml");
        std::fs::write(&config, text)
            .unwrap_or_else(|e| panic!("testkit: cannot write config: {e}"));
        Self::start(exe, &config, dir, run)
    }

    /// The address of a listener (`"amqp"`, `"mqtt"`, `"stomp"`, ...).
    pub fn addr(&self, listener: &str) -> SocketAddr {
        listener_in(&self.ready, listener)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("testkit: no {listener} listener in {}", self.ready))
    }

    /// An AMQP URL for guest on the default vhost.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.amqp)
    }

    /// Starts the broker binary `exe` with `config`, writing `dir/ready-<run>.json`.
    pub fn start(exe: &Path, config: &Path, dir: &Path, run: usize) -> ChildBroker {
        let ready = dir.join(format!("ready-{run}.json"));
        let mut command = Command::new(exe);
        command
            .arg("--config")
            .arg(config)
            .arg("--ready-file")
            .arg(&ready);
        Self::spawn(command, dir, &format!("broker-{run}"), &ready)
    }

    /// A memory figure of the child from `/proc/<pid>/status` (Linux), in
    /// bytes: `"VmRSS"` (resident now) or `"VmHWM"` (peak resident).
    pub fn memory_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_else(|e| panic!("testkit: cannot read the child's status: {e}"));
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("testkit: no {field} in the child's status"));
        kb * 1024
    }

    /// `kill -9`: no shutdown, no flush, no destructor runs.
    pub fn kill9(mut self) {
        // std's `kill` sends SIGKILL on Unix.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildBroker {
    fn drop(&mut self) {
        // A failed test must not leave a broker running, and shows what the
        // broker said.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(200).collect();
            eprintln!(
                "--- the child broker's log ({}), last lines:",
                self.log.display()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}
