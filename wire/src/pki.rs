//! The cluster's certificates: a CA made with rcgen, and the credentials it issues.
//!
//! `molt init` calls [`ClusterCa::generate`] once per cluster. The CA's private key
//! is needed only to issue certificates ([`ClusterCa::issue`]); every running party
//! holds only its own [`Credentials`]: its certificate, its private key, and the CA
//! certificate it trusts. Private keys are written with mode 0600.
//!
//! Certificates use ECDSA P-256. The CA is valid for [`CA_VALIDITY_DAYS`] days and
//! may sign only leaves (path length 0); a leaf is valid for [`LEAF_VALIDITY_DAYS`]
//! days, names its [`Identity`] (see [`crate::identity`]), may authenticate as a
//! TLS client, and — for the parties that serve — as a TLS server under its DNS name.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::identity::{Identity, IdentityError};

/// How long a cluster CA is valid.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// How long an issued certificate is valid.
pub const LEAF_VALIDITY_DAYS: i64 = 825;

/// Why certificates cannot be made, read or written.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused to build or sign a certificate.
    #[error("cannot build certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM file holds no certificate or key, or a malformed one.
    #[error("`{path}`: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Reading or writing a file failed.
    #[error("`{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The certificate does not name a molt identity.
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// The cluster's certificate authority: its certificate and its signing key.
pub struct ClusterCa {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    // An hour of slack for clocks that are slightly behind.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
}

impl ClusterCa {
    /// A new CA for a cluster; `cluster` goes into its common name.
    pub fn generate(cluster: &str) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("molt cluster CA ({cluster})"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params, CA_VALIDITY_DAYS);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Ok(Self {
            cert_pem,
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA from its certificate and key, as written by [`ClusterCa::write`].
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
        })
    }

    /// Reads `ca.crt` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let cert = read(&dir.join(CA_CERT_FILE))?;
        let key = read(&dir.join(CA_KEY_FILE))?;
        Self::from_pem(&cert, &key)
    }

    /// Writes `ca.crt` (0644) and `ca.key` (0600) into `dir`, refusing to overwrite.
    pub fn write(&self, dir: &Path) -> Result<(), PkiError> {
        fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            path: dir.to_owned(),
            source,
        })?;
        write_new(&dir.join(CA_CERT_FILE), &self.cert_pem, 0o644)?;
        write_new(&dir.join(CA_KEY_FILE), &self.key_pem, 0o600)
    }

    /// The CA certificate, PEM: what every party trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate naming `identity`.
    pub fn issue(&self, identity: &Identity) -> Result<Credentials, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.to_string());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(identity.to_uri().try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if let Some(name) = identity.server_name() {
            params
                .subject_alt_names
                .push(SanType::DnsName(name.try_into()?));
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, LEAF_VALIDITY_DAYS);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Credentials {
            identity: identity.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert_pem.clone(),
        })
    }
}

/// The serial number of a DER certificate, as its big-endian bytes: what a
/// revocation names.
pub fn serial_of(der: &[u8]) -> Result<Vec<u8>, crate::IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| crate::IdentityError::BadCertificate(e.to_string()))?;
    Ok(cert.tbs_certificate.raw_serial().to_vec())
}

/// File name of the CA certificate.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key.
pub const CA_KEY_FILE: &str = "ca.key";

/// What one party needs to connect: its identity, certificate, key and trusted CA.
#[derive(Clone)]
pub struct Credentials {
    /// Who the certificate says this party is.
    pub identity: Identity,
    /// The party's certificate, PEM.
    pub cert_pem: String,
    /// The party's private key, PEM.
    pub key_pem: String,
    /// The cluster CA certificate, PEM.
    pub ca_pem: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// Where [`Credentials::write`] put the files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialFiles {
    /// The certificate (0644).
    pub cert: PathBuf,
    /// The private key (0600).
    pub key: PathBuf,
    /// The CA certificate (0644).
    pub ca: PathBuf,
}

impl Credentials {
    /// Writes `<stem>.crt`, `<stem>.key` (mode 0600) and, if absent, `ca.crt` into
    /// `dir`. Existing certificate or key files are not overwritten.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<CredentialFiles, PkiError> {
        fs::create_dir_all(dir).map_err(|source| PkiError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let files = CredentialFiles {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
            ca: dir.join(CA_CERT_FILE),
        };
        write_new(&files.cert, &self.cert_pem, 0o644)?;
        write_new(&files.key, &self.key_pem, 0o600)?;
        if !files.ca.exists() {
            write_new(&files.ca, &self.ca_pem, 0o644)?;
        }
        Ok(files)
    }

    /// Reads credentials from files; the identity comes from the certificate.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Self, PkiError> {
        let cert_pem = read(cert)?;
        let key_pem = read(key)?;
        let ca_pem = read(ca)?;
        let der = first_pem_der(cert, &cert_pem, "CERTIFICATE")?;
        let identity = Identity::from_certificate(&der)?;
        first_pem_der(key, &key_pem, "PRIVATE KEY")?;
        first_pem_der(ca, &ca_pem, "CERTIFICATE")?;
        Ok(Self {
            identity,
            cert_pem,
            key_pem,
            ca_pem,
        })
    }
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Creates `path` with `mode`, failing if it exists (never silently replaces a key).
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// The DER bytes of the first PEM block whose label ends with `label`.
pub(crate) fn first_pem_der(path: &Path, pem: &str, label: &str) -> Result<Vec<u8>, PkiError> {
    use rustls::pki_types::pem::{PemObject, SectionKind};
    for item in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem.as_bytes()) {
        let (kind, der) = item.map_err(|e| PkiError::Pem {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let matches = match kind {
            SectionKind::Certificate => label == "CERTIFICATE",
            SectionKind::PrivateKey | SectionKind::EcPrivateKey | SectionKind::RsaPrivateKey => {
                label == "PRIVATE KEY"
            }
            _ => false,
        };
        if matches {
            return Ok(der);
        }
    }
    Err(PkiError::Pem {
        path: path.to_owned(),
        message: format!("no {label} block found"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn issued_certificates_name_their_identity() {
        let ca = ClusterCa::generate("test").unwrap();
        for id in ["repo-server", "portal", "shell/dev-1", "user/ada/developer"] {
            let id: Identity = id.parse().unwrap();
            let creds = ca.issue(&id).unwrap();
            let der = first_pem_der(Path::new("mem"), &creds.cert_pem, "CERTIFICATE").unwrap();
            assert_eq!(Identity::from_certificate(&der).unwrap(), id);
        }
    }

    #[test]
    fn files_round_trip_with_private_keys_0600() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::generate("test").unwrap();
        ca.write(dir.path()).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join(CA_KEY_FILE)), 0o600);
        assert!(matches!(ca.write(dir.path()), Err(PkiError::Io { .. })));

        // A CA loaded back from disk issues certificates that chain to the same root.
        let again = ClusterCa::load(dir.path()).unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        let id: Identity = "shell/qa-2".parse().unwrap();
        let files = again.issue(&id).unwrap().write(dir.path(), "qa-2").unwrap();
        assert_eq!(mode(&files.key), 0o600);
        assert_eq!(mode(&files.cert), 0o644);
        let loaded = Credentials::load(&files.cert, &files.key, &files.ca).unwrap();
        assert_eq!(loaded.identity, id);
    }

    #[test]
    fn loading_garbage_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.crt");
        fs::write(&junk, "not a certificate").unwrap();
        let err = Credentials::load(&junk, &junk, &junk).unwrap_err();
        assert!(err.to_string().contains("junk.crt"), "{err}");
        let missing = dir.path().join("missing.crt");
        assert!(matches!(
            Credentials::load(&missing, &junk, &junk),
            Err(PkiError::Io { .. })
        ));
    }
}
