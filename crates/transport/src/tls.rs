//! TLS for every listener: one server configuration built from `[tls]`, shared by
//! all TLS listeners, swapped whole when the certificate files change.
//!
//! - rustls with the ring provider, TLS 1.2 and 1.3 only (1.0 and 1.1 do not
//!   exist in rustls, so a client offering only those fails the handshake).
//! - `verify_peer` asks for a client certificate, checked against `cacertfile`;
//!   `fail_if_no_peer_cert` refuses a client without one (RabbitMQ's options).
//! - [`TlsContext::reload`] rebuilds the configuration from the files; a file that
//!   does not load (missing, bad PEM, key not matching the certificate) keeps the
//!   old configuration and says why. Handshakes already under way and connections
//!   already open keep the configuration they started with.
//! - [`cert_login_name`] turns a client certificate into a user name as
//!   RabbitMQ's `ssl_cert_login_from` does.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::{Mutex, RwLock};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The `[tls]` settings the transport needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// The server's certificate chain, PEM, leaf first.
    pub certfile: PathBuf,
    /// The server's private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub keyfile: PathBuf,
    /// CA certificates that client certificates are checked against, PEM.
    pub cacertfile: Option<PathBuf>,
    /// Ask clients for a certificate (and check it when given).
    pub verify_peer: bool,
    /// With `verify_peer`: refuse a client that presents none.
    pub fail_if_no_peer_cert: bool,
}

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("verify_peer = true needs cacertfile, the CA that signs client certificates")]
    NoCaFile,
    #[error("bad CA certificate in {path}: {error}")]
    BadCa { path: PathBuf, error: rustls::Error },
    #[error("cannot check client certificates: {0}")]
    Verifier(String),
    #[error("certificate {certfile} and key {keyfile} do not make a server identity: {error}")]
    Identity {
        certfile: PathBuf,
        keyfile: PathBuf,
        error: rustls::Error,
    },
}

/// The live TLS configuration of the broker (see the module docs).
pub struct TlsContext {
    settings: TlsSettings,
    current: RwLock<Arc<ServerConfig>>,
    /// The files' modification times when last loaded (or tried).
    stamps: Mutex<Vec<Option<SystemTime>>>,
}

impl std::fmt::Debug for TlsContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsContext")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl TlsContext {
    /// Loads the files; an error here stops the broker from starting.
    pub fn load(settings: TlsSettings) -> Result<Arc<Self>, TlsError> {
        let stamps = stamps(&settings);
        let config = build(&settings)?;
        Ok(Arc::new(TlsContext {
            settings,
            current: RwLock::new(Arc::new(config)),
            stamps: Mutex::new(stamps),
        }))
    }

    /// The settings this context was loaded from.
    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    /// An acceptor with the current configuration, for one new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().clone())
    }

    /// Rebuilds the configuration from the files. On error the old one stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        *self.stamps.lock() = stamps(&self.settings);
        let config = build(&self.settings)?;
        *self.current.write() = Arc::new(config);
        Ok(())
    }

    /// Reloads when a file's modification time changed since the last load;
    /// `None` when nothing changed.
    pub fn reload_if_changed(&self) -> Option<Result<(), TlsError>> {
        if *self.stamps.lock() == stamps(&self.settings) {
            return None;
        }
        Some(self.reload())
    }
}

fn stamps(settings: &TlsSettings) -> Vec<Option<SystemTime>> {
    [
        Some(&settings.certfile),
        Some(&settings.keyfile),
        settings.cacertfile.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
    .collect()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &PathBuf) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |error| TlsError::Read {
        path: path.clone(),
        error,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.clone() });
    }
    Ok(certs)
}

/// Builds a server configuration from the files.
pub fn build(settings: &TlsSettings) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let chain = read_certs(&settings.certfile)?;
    let key = PrivateKeyDer::from_pem_file(&settings.keyfile).map_err(|error| TlsError::Read {
        path: settings.keyfile.clone(),
        error,
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let builder = if settings.verify_peer {
        let ca = settings.cacertfile.as_ref().ok_or(TlsError::NoCaFile)?;
        let mut roots = RootCertStore::empty();
        for cert in read_certs(ca)? {
            roots.add(cert).map_err(|error| TlsError::BadCa {
                path: ca.clone(),
                error,
            })?;
        }
        let mut verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
        if !settings.fail_if_no_peer_cert {
            verifier = verifier.allow_unauthenticated();
        }
        let verifier = verifier
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    // with_single_cert checks that the key matches the certificate.
    builder
        .with_single_cert(chain, key)
        .map_err(|error| TlsError::Identity {
            certfile: settings.certfile.clone(),
            keyfile: settings.keyfile.clone(),
            error,
        })
}

/// The TLS configurations of inter-node (cluster) traffic, from the same
/// `[tls]` files: every node presents the `[tls]` certificate, and a peer must
/// present one signed by `cacertfile` in both directions (mutual TLS: holding a
/// certificate of the cluster's CA is what lets a process talk to a node's
/// cluster port). Host names are not checked: nodes are addressed by IP or
/// by names their certificates need not carry, and the CA is the authority.
pub fn node_configs(
    settings: &TlsSettings,
) -> Result<(ServerConfig, rustls::ClientConfig), TlsError> {
    let ca = settings.cacertfile.as_ref().ok_or(TlsError::NoCaFile)?;
    let strict = TlsSettings {
        verify_peer: true,
        fail_if_no_peer_cert: true,
        ..settings.clone()
    };
    let server = build(&strict)?;
    let provider = provider();
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca)? {
        roots.add(cert).map_err(|error| TlsError::BadCa {
            path: ca.clone(),
            error,
        })?;
    }
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let chain = read_certs(&settings.certfile)?;
    let key = PrivateKeyDer::from_pem_file(&settings.keyfile).map_err(|error| TlsError::Read {
        path: settings.keyfile.clone(),
        error,
    })?;
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Verifier(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(CaOnly { webpki }))
        .with_client_auth_cert(chain, key)
        .map_err(|error| TlsError::Identity {
            certfile: settings.certfile.clone(),
            keyfile: settings.keyfile.clone(),
            error,
        })?;
    Ok((server, client))
}

/// Checks a peer node's certificate chain against the cluster's CA (validity,
/// signatures, usage), but not the name in it (see [`node_configs`]).
#[derive(Debug)]
struct CaOnly {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
}

impl rustls::client::danger::ServerCertVerifier for CaOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                NotValidForName | NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Where a certificate login takes the user name from (`[auth] ssl_cert_login_from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CertLoginFrom {
    /// The subject's distinguished name in RabbitMQ's format, e.g. `O=client,CN=alice`.
    #[default]
    DistinguishedName,
    /// The subject's common name(s), several joined with `,`.
    CommonName,
}

/// The user name a client certificate (DER) logs in as; `None` when the
/// certificate does not parse or has no such name.
pub fn cert_login_name(der: &[u8], from: CertLoginFrom) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let subject = cert.subject();
    match from {
        CertLoginFrom::DistinguishedName => Some(distinguished_name(subject)),
        CertLoginFrom::CommonName => {
            let names = subject
                .iter_common_name()
                .map(|cn| value_string(cn))
                .collect::<Vec<_>>();
            (!names.is_empty()).then(|| names.join(","))
        }
    }
}

/// RabbitMQ's DN string (`rabbit_cert_info:format_rdn_sequence`, as `openssl x509
/// -nameopt RFC2253`): the RDNs in reverse order joined by `,`, the attributes of
/// a multi-valued RDN by `+`, each `TYPE=value` with RFC 4514 escaping.
fn distinguished_name(name: &x509_parser::x509::X509Name<'_>) -> String {
    let rdns = name
        .iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|atv| {
                    let oid = atv.attr_type().to_id_string();
                    match short_name(&oid) {
                        Some(short) => format!("{short}={}", escape(&value_string(atv))),
                        // Unknown types: the dotted OID and the value's DER in hex.
                        None => {
                            let mut hex = String::from("#");
                            for b in atv.as_slice() {
                                let _ = write!(hex, "{b:02X}");
                            }
                            format!("{oid}={hex}")
                        }
                    }
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect::<Vec<_>>();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

fn value_string(atv: &x509_parser::x509::AttributeTypeAndValue<'_>) -> String {
    match atv.as_str() {
        Ok(s) => s.to_owned(),
        Err(_) => String::from_utf8_lossy(atv.as_slice()).into_owned(),
    }
}

fn short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.4" => "SN",
        "2.5.4.5" => "SERIALNUMBER",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "STREET",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.12" => "title",
        "2.5.4.42" => "GN",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        "1.2.840.113549.1.9.1" => "emailAddress",
        _ => return None,
    })
}

/// RFC 4514 escaping of an attribute value.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair};

    fn cert(dn: &[(DnType, &str)]) -> Vec<u8> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in dn {
            params.distinguished_name.push(t.clone(), *v);
        }
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn dn_is_reversed_with_short_names_and_escaped() {
        let der = cert(&[
            (DnType::CommonName, "alice"),
            (DnType::OrganizationName, "client, inc"),
        ]);
        // rcgen writes the RDNs in push order; RabbitMQ prints them reversed.
        assert_eq!(
            cert_login_name(&der, CertLoginFrom::DistinguishedName).unwrap(),
            "O=client\\, inc,CN=alice"
        );
        assert_eq!(
            cert_login_name(&der, CertLoginFrom::CommonName).unwrap(),
            "alice"
        );
    }

    #[test]
    fn no_common_name_is_no_login() {
        let der = cert(&[(DnType::OrganizationName, "x")]);
        assert_eq!(cert_login_name(&der, CertLoginFrom::CommonName), None);
        assert_eq!(cert_login_name(b"junk", CertLoginFrom::CommonName), None);
    }

    #[test]
    fn escaping() {
        assert_eq!(escape("#a b "), "\\#a b\\ ");
        assert_eq!(escape("a+b;c"), "a\\+b\\;c");
    }
}
