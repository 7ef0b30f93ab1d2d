//! TLS for `amqps://` and Rasa's client-certificate variables: rustls with the ring provider,
//! the server always verified (against the given CA, else the system's trust store).

use std::path::Path;
use std::sync::Arc;

use amqprs::tls::TlsAdaptor;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::config::{AmqpTarget, NAME};
use broker_core::Error;

fn tls_error(reason: String) -> Error {
    Error::Unavailable { backend: NAME, reason, cause: None }
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| tls_error(format!("cannot read the {what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(tls_error(format!("the {what} {} holds no PEM certificate", path.display())));
    }
    Ok(certs)
}

/// The TLS settings of `target`, files read now (at connect), so a missing or bad file is an
/// error that names it.
pub(crate) fn adaptor(target: &AmqpTarget) -> Result<TlsAdaptor, Error> {
    let mut roots = RootCertStore::empty();
    match &target.ca_file {
        Some(ca) => {
            for cert in read_certs(ca, "CA file")? {
                roots.add(cert).map_err(|e| {
                    tls_error(format!("the CA file {} holds an unusable certificate: {e}", ca.display()))
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(tls_error(
                    "no CA to verify RabbitMQ with: the system trust store is empty; give one as `cacertfile` in the amqps:// URI or as `cafile`".into(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(format!("TLS setup: {e}")))?
        .with_root_certificates(roots);
    let config = match &target.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = read_certs(cert, "client certificate")?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| tls_error(format!("cannot read the client key {}: {e}", key.display())))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                tls_error(format!("the client certificate {} and its key do not work: {e}", cert.display()))
            })?
        }
    };
    let domain = target.server_name.clone().unwrap_or_else(|| target.host.clone());
    ServerName::try_from(domain.clone())
        .map_err(|_| tls_error(format!("{domain:?} is not a valid server name for TLS verification")))?;
    Ok(TlsAdaptor::new(tokio_rustls::TlsConnector::from(Arc::new(config)), domain))
}
