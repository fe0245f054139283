//! The `switchyard` binary as a user runs it: config file, ready file, SIGTERM,
//! exit codes, error messages and `hash-password`.

// clippy.toml exempts `#[test]` functions only; the helpers below are test code too.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");
const DEADLINE: Duration = Duration::from_secs(20);

/// Waits for `child` to exit, killing it (and failing) after `DEADLINE`.
fn wait_with_deadline(child: &mut Child) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("switchyard did not exit within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls for the ready file (it appears atomically, so once it exists it is whole).
fn wait_for_ready_file(path: &Path, child: &mut Child) -> String {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return text;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("switchyard exited with {status} before it was ready: {err}");
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("no ready file within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The address of `key` in the ready file's flat JSON object.
fn address_in(json: &str, key: &str) -> SocketAddr {
    let json = json.trim();
    assert!(json.starts_with('{') && json.ends_with('}'), "{json}");
    let needle = format!("\"{key}\":\"");
    let start = json
        .find(&needle)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        + needle.len();
    let end = start + json[start..].find('"').unwrap();
    json[start..end].parse().unwrap()
}

fn write_config(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("switchyard.toml");
    std::fs::write(&path, body).unwrap();
    path
}

#[test]
fn runs_announces_its_port_and_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("state");
    let config = write_config(
        dir.path(),
        &format!(
            "data_dir = {:?}\n[listeners]\namqp = \"127.0.0.1:0\"\n",
            data.to_str().unwrap()
        ),
    );
    let ready = dir.path().join("ready.json");
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("--ready-file")
        .arg(&ready)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let json = wait_for_ready_file(&ready, &mut child);
    let addr = address_in(&json, "amqp");
    assert!(addr.ip().is_loopback());
    assert_ne!(addr.port(), 0);
    assert!(!dir.path().join("ready.json.tmp").exists());
    assert!(data.is_dir(), "data_dir is created at startup");
    TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("the port accepts TCP");

    let killed = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(killed.success());
    let status = wait_with_deadline(&mut child);
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(0), "stderr: {err}");
    assert!(err.contains("listening"), "stderr: {err}");
    assert!(err.contains(&addr.to_string()), "stderr: {err}");
}

fn run_with_config(body: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), body);
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn an_unknown_key_exits_1_naming_the_key() {
    let (code, err) = run_with_config("[limits]\nframe_max = 8192\nheartbeat = 5\n");
    assert_eq!(code, Some(1), "stderr: {err}");
    assert!(err.starts_with("switchyard: "), "stderr: {err}");
    assert!(err.contains("switchyard.toml"), "stderr: {err}");
    assert!(
        err.contains("unknown field `heartbeat` in [limits]"),
        "stderr: {err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
}

#[test]
fn an_invalid_value_exits_1_naming_the_key() {
    let (code, err) = run_with_config("[limits]\nframe_max = 100\n");
    assert_eq!(code, Some(1), "stderr: {err}");
    assert!(err.contains("limits.frame_max"), "stderr: {err}");
}

#[test]
fn a_missing_config_file_exits_1() {
    let out = Command::new(BIN)
        .args(["--config", "/nonexistent/switchyard.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("/nonexistent/switchyard.toml"), "{err}");
}

#[test]
fn hash_password_output_verifies() {
    let out = Command::new(BIN)
        .args(["hash-password", "s3cret"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap();
    let mut auth = switchyard_core::auth::Auth::new();
    auth.add_user("app", hash.trim(), vec![], false).unwrap();
    assert!(auth.login("app", b"s3cret", None).is_ok());
    assert!(auth.login("app", b"other", None).is_err());

    // A random salt: the same password hashes differently each time.
    let again = Command::new(BIN)
        .args(["hash-password", "s3cret"])
        .output()
        .unwrap();
    assert_ne!(hash, String::from_utf8(again.stdout).unwrap());
}
