//! Certificates: the gateway's agent CA, agent certificates issued from CSRs, the gateway's
//! TLS server certificate, and CA pins.
//!
//! One CA signs both sides, separated by extended key usage: agent certificates are valid
//! for client authentication only and name the agent in their subject CN; the gateway's
//! certificate is valid for server authentication only and for [`GATEWAY_SERVER_NAME`].

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

/// The DNS name in every gateway certificate and in the agent's TLS SNI. A fixed name means
/// agents can reach the gateway by any address (IP, load balancer, NAT) without re-issuing
/// certificates; trust comes from the pinned CA, not from the address.
pub const GATEWAY_SERVER_NAME: &str = "postern-gateway";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("malformed certificate: {0}")]
    BadCertificate(String),
    #[error("certificate signing request rejected: {0}")]
    BadCsr(String),
}

/// The gateway's agent certificate authority.
pub struct CertAuthority {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    key_pem: String,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is a secret: only the public pin is shown.
        f.debug_struct("CertAuthority").field("pin", &self.pin()).finish_non_exhaustive()
    }
}

fn serial() -> SerialNumber {
    let mut b = [0u8; 16];
    b.iter_mut().for_each(|x| *x = fastrand::u8(..));
    // Positive and non-zero leading byte keeps the DER integer exactly 16 bytes.
    if let Some(first) = b.first_mut() {
        *first = (*first & 0x7f) | 0x01;
    }
    SerialNumber::from_slice(&b)
}

/// Backdate `not_before` a little so small clock differences between gateway and agent do
/// not make a fresh certificate "not yet valid"; never by more than a quarter of the lifetime,
/// so the renewal point (two thirds of the way through) stays after issuance.
fn validity(ttl: Duration) -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    let skew = (ttl / 4).min(Duration::from_secs(300));
    (now - skew, now + ttl)
}

impl CertAuthority {
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "Postern");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let (nb, na) = validity(Duration::from_secs(20 * 365 * 24 * 3600));
        params.not_before = nb;
        params.not_after = na;
        params.serial_number = Some(serial());
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Self::from_pem(&cert_pem, &key_pem)
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert_der = pem_to_der(cert_pem)?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Self { cert_der, cert_pem: cert_pem.to_owned(), issuer, key_pem: key_pem.to_owned() })
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
    /// PEM of the CA private key, for saving to a 0600 file. Never log it.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }
    /// `sha256:<hex>` of the CA certificate, given to agents at enrollment.
    pub fn pin(&self) -> String {
        ca_pin(&self.cert_der)
    }

    /// Issue an agent certificate for the public key in `csr_der`. The CSR's subject and
    /// extensions are ignored: the identity is `agent_id`, decided by the gateway.
    pub fn issue_agent_cert(
        &self,
        csr_der: &[u8],
        agent_id: &str,
        ttl: Duration,
    ) -> Result<CertificateDer<'static>, PkiError> {
        let csr = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, agent_id);
        dn.push(DnType::OrganizationName, "Postern agent");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let (nb, na) = validity(ttl);
        params.not_before = nb;
        params.not_after = na;
        params.serial_number = Some(serial());
        Ok(params.signed_by(&csr.public_key, &self.issuer)?.der().clone())
    }

    /// Check a CSR's form and signature (proof of possession) without issuing anything.
    pub fn check_csr(csr_der: &[u8]) -> Result<(), PkiError> {
        CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
            .map(|_| ())
            .map_err(|e| PkiError::BadCsr(e.to_string()))
    }

    /// Issue the gateway's own TLS server certificate for `key`.
    /// The gateway's tunnel certificate. Agents check it for [`GATEWAY_SERVER_NAME`]; in a
    /// cluster it also names the gateway (`<id>.postern-gateway`, and its common name), and it
    /// serves as the gateway's client certificate towards other gateways.
    pub fn issue_server_cert(
        &self,
        key: &KeyPair,
        ttl: Duration,
        gateway_id: Option<&str>,
    ) -> Result<CertificateDer<'static>, PkiError> {
        let mut names = vec![GATEWAY_SERVER_NAME.to_owned()];
        let mut dn = DistinguishedName::new();
        match gateway_id {
            Some(id) => {
                names.push(gateway_cert_name(id));
                dn.push(DnType::CommonName, format!("postern gateway {id}"));
            }
            None => dn.push(DnType::CommonName, GATEWAY_SERVER_NAME),
        }
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = if gateway_id.is_some() {
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            vec![ExtendedKeyUsagePurpose::ServerAuth]
        };
        let (nb, na) = validity(ttl);
        params.not_before = nb;
        params.not_after = na;
        params.serial_number = Some(serial());
        Ok(params.signed_by(key, &self.issuer)?.der().clone())
    }
}

impl CertAuthority {
    /// A TLS server certificate for `key` naming `names` (DNS names or IP addresses): the
    /// web console's, when no certificate files are configured.
    pub fn issue_web_cert(
        &self,
        key: &KeyPair,
        names: &[String],
        ttl: Duration,
    ) -> Result<CertificateDer<'static>, PkiError> {
        let mut params = CertificateParams::new(names.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names.first().cloned().unwrap_or_else(|| "postern web".to_owned()));
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let (nb, na) = validity(ttl);
        params.not_before = nb;
        params.not_after = na;
        params.serial_number = Some(serial());
        Ok(params.signed_by(key, &self.issuer)?.der().clone())
    }
}

/// The DNS name a cluster gateway's certificate carries for gateway `id`.
pub fn gateway_cert_name(id: &str) -> String {
    format!("{id}.{GATEWAY_SERVER_NAME}")
}

/// `sha256:<64 hex digits>` of a DER certificate.
pub fn ca_pin(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    format!("sha256:{}", hex(digest.as_ref()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Normalise a user-supplied pin (`sha256:HEX`, case-insensitive) or explain what is wrong.
pub fn parse_pin(pin: &str) -> Result<String, String> {
    let hexpart = pin
        .trim()
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("CA pin must look like sha256:<64 hex digits>, got {pin:?}"))?;
    if hexpart.len() != 64 || !hexpart.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!("CA pin must look like sha256:<64 hex digits>, got {pin:?}"));
    }
    Ok(format!("sha256:{}", hexpart.to_ascii_lowercase()))
}

pub fn pem_to_der(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::BadCertificate(e.to_string()))
}

pub fn der_to_pem(der: &[u8]) -> String {
    let b64 = base64_encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let sym = |i: u32| char::from(ALPHABET.get((i & 63) as usize).copied().unwrap_or(b'A'));
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk.first().copied(), chunk.get(1).copied(), chunk.get(2).copied()];
        let n =
            (u32::from(b[0].unwrap_or(0)) << 16) | (u32::from(b[1].unwrap_or(0)) << 8) | u32::from(b[2].unwrap_or(0));
        out.push(sym(n >> 18));
        out.push(sym(n >> 12));
        out.push(if b[1].is_some() { sym(n >> 6) } else { '=' });
        out.push(if b[2].is_some() { sym(n) } else { '=' });
    }
    out
}

/// A private key PEM as rustls wants it.
pub fn private_key_der(key: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))
}

/// A fresh agent key and a CSR for it. The CSR subject carries nothing the gateway trusts.
pub fn new_key_and_csr() -> Result<(KeyPair, Vec<u8>), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "postern-agent");
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

/// What the gateway reads from an agent's verified certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub common_name: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial_hex: String,
}

pub fn cert_info(der: &[u8]) -> Result<CertInfo, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or_else(|| PkiError::BadCertificate("no subject common name".into()))?
        .to_owned();
    let to_system = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    Ok(CertInfo {
        common_name,
        not_before: to_system(cert.validity().not_before),
        not_after: to_system(cert.validity().not_after),
        serial_hex: hex(cert.raw_serial()),
    })
}

/// When to renew a certificate: two thirds of the way through its validity.
pub fn renewal_time(info: &CertInfo) -> SystemTime {
    let life = info.not_after.duration_since(info.not_before).unwrap_or_default();
    info.not_before + life * 2 / 3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_cert_names_the_agent_not_the_csr() {
        let ca = CertAuthority::generate("test CA").unwrap();
        let (_key, csr) = new_key_and_csr().unwrap();
        let cert = ca.issue_agent_cert(&csr, "ag-123", Duration::from_secs(3600)).unwrap();
        let info = cert_info(&cert).unwrap();
        assert_eq!(info.common_name, "ag-123");
        assert!(info.not_after > SystemTime::now());
        assert!(renewal_time(&info) > SystemTime::now());
        let reloaded = CertAuthority::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        assert_eq!(reloaded.pin(), ca.pin());
    }

    #[test]
    fn a_cluster_gateway_certificate_names_the_gateway() {
        let ca = CertAuthority::generate("test").unwrap();
        let key = KeyPair::generate().unwrap();
        let single = ca.issue_server_cert(&key, Duration::from_secs(60), None).unwrap();
        assert_eq!(cert_info(&single).unwrap().common_name, GATEWAY_SERVER_NAME);
        let member = ca.issue_server_cert(&key, Duration::from_secs(60), Some("gw-b")).unwrap();
        assert_eq!(cert_info(&member).unwrap().common_name, "postern gateway gw-b");
        let (_, parsed) = x509_parser::parse_x509_certificate(&member).unwrap();
        let san = parsed.subject_alternative_name().unwrap().unwrap().value.general_names.clone();
        let names: Vec<String> = san.iter().map(|n| format!("{n}")).collect();
        assert_eq!(names, ["DNSName(postern-gateway)", "DNSName(gw-b.postern-gateway)"]);
    }

    #[test]
    fn garbage_csr_is_an_error() {
        let ca = CertAuthority::generate("test CA").unwrap();
        assert!(matches!(ca.issue_agent_cert(b"nope", "x", Duration::from_secs(60)), Err(PkiError::BadCsr(_))));
    }

    #[test]
    fn pins() {
        assert!(parse_pin("sha256:abc").is_err());
        assert!(parse_pin(&format!("md5:{}", "a".repeat(64))).is_err());
        assert_eq!(parse_pin(&format!("sha256:{}", "A".repeat(64))).unwrap(), format!("sha256:{}", "a".repeat(64)));
    }

    #[test]
    fn pem_roundtrip() {
        let ca = CertAuthority::generate("t").unwrap();
        let pem = der_to_pem(ca.cert_der());
        assert_eq!(pem_to_der(&pem).unwrap(), *ca.cert_der());
    }
}
