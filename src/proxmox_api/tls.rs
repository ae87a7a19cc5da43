//! How the Proxmox client trusts the server's certificate (endpoints.md §0.4):
//! a CA file (PVE's `pve-root-ca.pem`; works when the URL names the node as
//! its certificate does), a pinned SHA-256 fingerprint of the leaf
//! certificate (works through NAT and other names; PVE shows it as
//! `ssl_fingerprint` in `GET /nodes`), or, only when asked for, nothing.
//! The crypto is rustls with its `ring` provider (no cmake, builds static).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::Sha256Fingerprint;

/// What the client trusts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// The certificates in this PEM file (and only those).
    CaFile(std::path::PathBuf),
    /// The leaf certificate whose DER has this SHA-256, whatever its name or chain.
    Pinned(Sha256Fingerprint),
    /// Anything (`proxmox_tls_insecure: true`).
    Insecure,
    /// The public web PKI (webpki-roots).
    WebPki,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// SHA-256 of a certificate's DER.
pub fn fingerprint_of(der: &[u8]) -> Sha256Fingerprint {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    Sha256Fingerprint(out)
}

/// The rustls configuration for `trust`.
pub fn client_config(trust: &Trust) -> Result<Arc<ClientConfig>, String> {
    let p = provider();
    let builder = ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let algs = p.signature_verification_algorithms;
    let cfg = match trust {
        Trust::CaFile(path) => builder
            .with_root_certificates(roots_from(path)?)
            .with_no_client_auth(),
        Trust::WebPki => {
            let mut roots = RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Pinned(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Leaf {
                pin: Some(*pin),
                seen: Mutex::new(None),
                algs,
            }))
            .with_no_client_auth(),
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Leaf {
                pin: None,
                seen: Mutex::new(None),
                algs,
            }))
            .with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

fn roots_from(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("proxmox_tls_ca_path {}: {e}", path.display()))?;
    for c in certs {
        let c = c.map_err(|e| format!("proxmox_tls_ca_path {}: {e}", path.display()))?;
        roots
            .add(c)
            .map_err(|e| format!("proxmox_tls_ca_path {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "proxmox_tls_ca_path {}: no certificate in the file",
            path.display()
        ));
    }
    Ok(roots)
}

/// Accepts the leaf whose fingerprint is `pin` (any leaf when `None`) and
/// remembers the last one seen. Handshake signatures are still checked, so
/// the peer must hold the certificate's key.
#[derive(Debug)]
struct Leaf {
    pin: Option<Sha256Fingerprint>,
    seen: Mutex<Option<Sha256Fingerprint>>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Leaf {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = fingerprint_of(end_entity.as_ref());
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(got);
        match self.pin {
            Some(pin) if pin != got => Err(rustls::Error::General(format!(
                "the server's certificate has fingerprint {got}, not the pinned \
                 proxmox_tls_fingerprint {pin}"
            ))),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Connects to `host:port`, completes a TLS handshake trusting anything,
/// and returns the SHA-256 fingerprint of the certificate the server showed
/// (for `agentlab proxmox fingerprint`; the user compares it out of band).
pub fn fetch_fingerprint(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<Sha256Fingerprint, String> {
    let p = provider();
    let leaf = Arc::new(Leaf {
        pin: None,
        seen: Mutex::new(None),
        algs: p.signature_verification_algorithms,
    });
    let cfg = ClientConfig::builder_with_provider(p)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(leaf.clone())
        .with_no_client_auth();
    let name = ServerName::try_from(host.trim_matches(['[', ']']).to_string())
        .map_err(|e| format!("{host}: {e}"))?;
    let addr = (host.trim_matches(['[', ']']), port)
        .to_socket_addrs()
        .map_err(|e| format!("{host}:{port}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}:{port}: no address"))?;
    let mut tcp = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    tcp.set_read_timeout(Some(timeout)).ok();
    tcp.set_write_timeout(Some(timeout)).ok();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name)
        .map_err(|e| format!("TLS setup: {e}"))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)
            .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
    }
    // Say goodbye politely; the answer does not matter.
    conn.send_close_notify();
    let _ = conn.complete_io(&mut tcp);
    let _ = tcp.flush();
    let _ = tcp.read(&mut [0u8; 1]);
    let seen = *leaf.seen.lock().unwrap_or_else(|e| e.into_inner());
    seen.ok_or_else(|| format!("{addr}: the server showed no certificate"))
}
