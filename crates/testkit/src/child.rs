//! A broker in a child process, for crash tests: a config file written from the
//! shipped `config.toml` (AMQP only, on a free port, in a given data
//! directory), the process started with `--ready-file`, its AMQP address read
//! from that file, and `kill -9`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a child broker may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Writes `dir/config.toml`: the shipped `config_toml` text with `data_dir` in
/// `dir/data`, AMQP on 127.0.0.1 port 0 and no other listener.
pub fn write_config(dir: &Path, config_toml: &str) -> PathBuf {
    let mut text = String::new();
    for line in config_toml.lines() {
        if line.starts_with("data_dir") {
            text.push_str(&format!("data_dir = {:?}\n", dir.join("data")));
        } else if line.starts_with("amqp =") {
            text.push_str("amqp = \"127.0.0.1:0\"\n");
        } else if line.starts_with("mqtt") || line.starts_with("stomp") {
            continue;
        } else {
            text.push_str(line);
            text.push('\n');
        }
    }
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("testkit: cannot write config: {e}"));
    path
}

/// Waits for a ready file (JSON of listener addresses, as the binary's
/// `--ready-file` writes it) and returns the AMQP address in it.
pub fn wait_ready(ready: &Path, child: &mut Child) -> String {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(text) = std::fs::read_to_string(ready) {
            if let Some(start) = text.find("\"amqp\":\"").map(|i| i + 8) {
                if let Some(len) = text.get(start..).and_then(|t| t.find('"')) {
                    if let Some(addr) = text.get(start..start + len) {
                        return addr.to_owned();
                    }
                }
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

/// A running child process with its AMQP address.
pub struct ChildBroker {
    pub child: Child,
    pub amqp: String,
}

impl ChildBroker {
    /// Runs `program args...` (stderr to `dir/<name>.log`) and waits for the
    /// ready file `ready`, which the program must write.
    pub fn spawn(mut command: Command, dir: &Path, name: &str, ready: &Path) -> ChildBroker {
        let log = std::fs::File::create(dir.join(format!("{name}.log")))
            .unwrap_or_else(|e| panic!("testkit: cannot create the child's log: {e}"));
        let mut child = command
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("testkit: cannot start the child: {e}"));
        let amqp = wait_ready(ready, &mut child);
        ChildBroker { child, amqp }
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

    /// `kill -9`: no shutdown, no flush, no destructor runs.
    pub fn kill9(mut self) {
        // std's `kill` sends SIGKILL on Unix.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildBroker {
    fn drop(&mut self) {
        // A failed test must not leave a broker running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
