//! `[tls]` and `[auth] ssl_cert_login_from`: the TLS listeners' certificates and
//! where a certificate login takes its user name from (issue 10 items 2 and 3).
//! The TLS listeners' addresses are in `[listeners]` (`amqps`, `mqtts`, `stomps`,
//! `mqtt_wss`, `stomp_wss`, `management_tls`).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard_transport::{CertLoginFrom, TlsSettings};

use crate::config::{Config, ConfigError};

/// `[tls]`: one certificate for every TLS listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server certificate chain (PEM, leaf first).
    #[serde(default)]
    pub certfile: Option<PathBuf>,
    /// The server's private key (PEM).
    #[serde(default)]
    pub keyfile: Option<PathBuf>,
    /// The CA(s) client certificates are checked against (PEM).
    #[serde(default)]
    pub cacertfile: Option<PathBuf>,
    /// Ask clients for a certificate.
    #[serde(default)]
    pub verify_peer: bool,
    /// With `verify_peer`: refuse clients that present none.
    #[serde(default)]
    pub fail_if_no_peer_cert: bool,
    /// Time from accept to the end of the TLS handshake (RabbitMQ's
    /// `ssl_handshake_timeout`).
    #[serde(default = "default_tls_handshake_timeout_ms")]
    pub handshake_timeout_ms: u64,
    /// How often the certificate files' modification times are checked (a change
    /// reloads them for new connections); 0 = only on SIGHUP.
    #[serde(default = "default_reload_interval_secs")]
    pub reload_interval_secs: u64,
}

fn default_tls_handshake_timeout_ms() -> u64 {
    5000
}

fn default_reload_interval_secs() -> u64 {
    10
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            certfile: None,
            keyfile: None,
            cacertfile: None,
            verify_peer: false,
            fail_if_no_peer_cert: false,
            handshake_timeout_ms: default_tls_handshake_timeout_ms(),
            reload_interval_secs: default_reload_interval_secs(),
        }
    }
}

impl TlsConfig {
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
}

/// `[auth] ssl_cert_login_from`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CertLoginFromConfig {
    #[default]
    DistinguishedName,
    CommonName,
}

impl From<CertLoginFromConfig> for CertLoginFrom {
    fn from(c: CertLoginFromConfig) -> Self {
        match c {
            CertLoginFromConfig::DistinguishedName => CertLoginFrom::DistinguishedName,
            CertLoginFromConfig::CommonName => CertLoginFrom::CommonName,
        }
    }
}

impl Config {
    /// Whether any TLS listener is configured.
    pub fn has_tls_listener(&self) -> bool {
        let l = &self.listeners;
        [
            l.amqps,
            l.mqtts,
            l.stomps,
            l.mqtt_wss,
            l.stomp_wss,
            l.management_tls,
        ]
        .iter()
        .any(Option::is_some)
    }

    /// The transport's TLS settings; `None` when `[tls]` names no certificate.
    pub fn tls_settings(&self) -> Option<TlsSettings> {
        let t = &self.tls;
        Some(TlsSettings {
            certfile: t.certfile.clone()?,
            keyfile: t.keyfile.clone()?,
            cacertfile: t.cacertfile.clone(),
            verify_peer: t.verify_peer,
            fail_if_no_peer_cert: t.fail_if_no_peer_cert,
        })
    }

    /// The `[tls]` rules: a TLS listener needs a certificate and key; checking
    /// clients needs the CA.
    pub(crate) fn validate_tls(&self) -> Result<(), ConfigError> {
        let t = &self.tls;
        let invalid = |message: &str| ConfigError::Invalid {
            origin: self.origin().to_owned(),
            message: message.to_owned(),
        };
        if self.has_tls_listener() && (t.certfile.is_none() || t.keyfile.is_none()) {
            return Err(invalid(
                "a TLS listener (amqps, mqtts, stomps, mqtt_wss, stomp_wss, management_tls) needs tls.certfile and tls.keyfile",
            ));
        }
        if t.verify_peer && t.cacertfile.is_none() {
            return Err(invalid(
                "tls.verify_peer = true needs tls.cacertfile, the CA that signs client certificates",
            ));
        }
        if t.fail_if_no_peer_cert && !t.verify_peer {
            return Err(invalid(
                "tls.fail_if_no_peer_cert = true needs tls.verify_peer = true",
            ));
        }
        if t.handshake_timeout_ms == 0 {
            return Err(invalid(
                "invalid value 0 for key tls.handshake_timeout_ms: must be at least 1",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_keys_parse_and_are_checked() {
        let c = Config::from_str(
            r#"
[listeners]
amqps = "127.0.0.1:5671"
mqtts = "127.0.0.1:8883"
stomps = "127.0.0.1:61614"
mqtt_wss = "127.0.0.1:15676"
stomp_wss = "127.0.0.1:15673"
management_tls = "127.0.0.1:15671"
[tls]
certfile = "certs/server.pem"
keyfile = "certs/server.key"
cacertfile = "certs/ca.pem"
verify_peer = true
fail_if_no_peer_cert = false
[auth]
ssl_cert_login_from = "common_name"
"#,
            "t.toml",
        )
        .unwrap();
        assert!(c.has_tls_listener());
        assert_eq!(c.auth.ssl_cert_login_from, CertLoginFromConfig::CommonName);
        let s = c.tls_settings().unwrap();
        assert!(s.verify_peer && !s.fail_if_no_peer_cert);
        assert_eq!(c.tls.handshake_timeout(), Duration::from_secs(5));

        let err = Config::from_str("[listeners]\namqps = \"127.0.0.1:5671\"\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tls.certfile"), "{err}");
        let err = Config::from_str("[tls]\nverify_peer = true\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cacertfile"), "{err}");
    }

    #[test]
    fn default_is_distinguished_name() {
        let c = Config::from_str("", "t.toml").unwrap();
        assert_eq!(
            c.auth.ssl_cert_login_from,
            CertLoginFromConfig::DistinguishedName
        );
        assert!(!c.has_tls_listener());
    }
}
