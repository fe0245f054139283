//! Arbitrary text as config.toml: parsing, validation and everything the server
//! derives from a config before it starts (users, permissions, policies, boot
//! definitions, the auth table). Errors are fine, panics are not; the seed
//! (fuzz/seeds/config) is the shipped config.toml.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_server::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::from_str(text, "fuzz") else {
        return;
    };
    if config.validate().is_err() {
        return;
    }
    let _ = config.users();
    let _ = config.permissions();
    let _ = config.vhost_names();
    let _ = config.policies();
    let _ = config.auth();
    let _ = config.loopback_users();
    let _ = config.limits.handshake_timeout();
    let _ = config.boot_definitions();
});
