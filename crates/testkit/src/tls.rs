//! Certificates and TLS clients for the TLS tests: a CA, a server certificate
//! for `localhost`/127.0.0.1 and client certificates made with rcgen, written as
//! PEM files in a temporary directory (the broker reads files), and rustls
//! client configurations that trust the CA.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

pub use rustls;
pub use tokio_rustls;

/// A CA and the files a broker's `[tls]` names.
pub struct TestCerts {
    dir: TempDir,
    issuer: Issuer<'static, KeyPair>,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl TestCerts {
    /// A fresh CA, and a server certificate (CN `switchyard`) signed by it.
    pub fn generate() -> TestCerts {
        let dir = tempfile::tempdir().expect("testkit: temporary directory");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "switchyard test CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::CrlSign,
        ];
        let key = KeyPair::generate().expect("ca key");
        let ca = params.self_signed(&key).expect("ca cert");
        let ca_path = dir.path().join("ca.pem");
        std::fs::write(&ca_path, ca.pem()).expect("write ca.pem");
        let issuer = Issuer::new(params, key);
        let certs = TestCerts {
            server_cert: dir.path().join("server.pem"),
            server_key: dir.path().join("server.key"),
            ca: ca_path,
            issuer,
            dir,
        };
        certs.write_server_cert("switchyard");
        certs
    }

    /// (Re)writes the server certificate and key, with common name `cn`.
    pub fn write_server_cert(&self, cn: &str) {
        self.write_server(cn, vec![ExtendedKeyUsagePurpose::ServerAuth]);
    }

    /// (Re)writes the server certificate as a cluster node's: usable for both
    /// ends of a mutual TLS connection (server and client authentication).
    pub fn write_node_cert(&self, cn: &str) {
        self.write_server(
            cn,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        );
    }

    fn write_server(&self, cn: &str, usages: Vec<ExtendedKeyUsagePurpose>) {
        let (cert, key) = self.leaf(
            &[(DnType::CommonName, cn)],
            vec!["localhost".into(), "127.0.0.1".into()],
            usages,
        );
        std::fs::write(&self.server_cert, cert).expect("write server.pem");
        std::fs::write(&self.server_key, key).expect("write server.key");
    }

    /// A client certificate with subject `dn` (in the order given; RabbitMQ's
    /// DN string lists it reversed), written as `<file>.pem` and `<file>.key`.
    pub fn client_cert(&self, file: &str, dn: &[(DnType, &str)]) -> (PathBuf, PathBuf) {
        let (cert, key) = self.leaf(dn, Vec::new(), vec![ExtendedKeyUsagePurpose::ClientAuth]);
        let c = self.dir.path().join(format!("{file}.pem"));
        let k = self.dir.path().join(format!("{file}.key"));
        std::fs::write(&c, cert).expect("write client cert");
        std::fs::write(&k, key).expect("write client key");
        (c, k)
    }

    fn leaf(
        &self,
        dn: &[(DnType, &str)],
        sans: Vec<String>,
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> (String, String) {
        let mut params = CertificateParams::new(sans).expect("leaf params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in dn {
            params.distinguished_name.push(t.clone(), *v);
        }
        params.extended_key_usages = usages;
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        (cert.pem(), key.serialize_pem())
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The `[tls]` settings for a broker using these files.
    pub fn configure(&self, config: &mut switchyard_server::Config, verify_peer: bool) {
        config.tls.certfile = Some(self.server_cert.clone());
        config.tls.keyfile = Some(self.server_key.clone());
        config.tls.cacertfile = Some(self.ca.clone());
        config.tls.verify_peer = verify_peer;
    }

    /// A client configuration trusting the CA, with a client certificate when
    /// given, speaking only `versions` (all of rustls' when empty).
    pub fn client_config(
        &self,
        client: Option<&(PathBuf, PathBuf)>,
        versions: &[&'static SupportedProtocolVersion],
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&self.ca).expect("read ca") {
            roots.add(c.expect("ca pem")).expect("add ca");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions = if versions.is_empty() {
            rustls::ALL_VERSIONS
        } else {
            versions
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots);
        let config = match client {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .expect("read client cert")
                    .collect::<Result<Vec<_>, _>>()
                    .expect("client cert pem");
                let key = PrivateKeyDer::from_pem_file(key).expect("client key");
                builder
                    .with_client_auth_cert(chain, key)
                    .expect("client auth")
            }
            None => builder.with_no_client_auth(),
        };
        Arc::new(config)
    }
}

/// Connects to `addr` over TLS as `localhost`; the handshake's error is returned.
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("server name");
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}
