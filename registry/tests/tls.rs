//! ociblk-registry against Debian's `docker-registry` serving TLS with a CA
//! the test makes with `openssl`: trust from a certs.d directory, the
//! certificate problems a host can have (unknown CA, wrong name, expired),
//! and mutual TLS with and without a client certificate.

use ociblk_registry::tls::CertDirs;
use ociblk_registry::{Error, Options};
use ociblk_registry_test_support::fixture::{Fixture, REPO_TAG};
use ociblk_registry_test_support::pki::{Issued, TestCa, Validity};
use ociblk_registry_test_support::relay::Relay;
use ociblk_registry_test_support::{Registry, TlsServe};

/// The sample image in a registry serving `server`'s certificate (asking
/// for client certificates from `client_ca` when given).
fn tls_fixture(
    server: &Issued,
    client_ca: Option<&TestCa>,
    push_client: Option<&Issued>,
) -> Fixture {
    let push_cert_dir = push_client.map(|client| {
        // Beside the client's files, in the CA's temp dir.
        let dir = client.cert.with_file_name("push-cert-dir");
        std::fs::create_dir_all(&dir).expect("push cert dir");
        std::fs::copy(&client.cert, dir.join("client.cert")).expect("cert");
        std::fs::copy(&client.key, dir.join("client.key")).expect("key");
        dir
    });
    let registry = Registry::start_tls(TlsServe {
        cert: server.cert.clone(),
        key: server.key.clone(),
        client_ca: client_ca.map(|ca| ca.cert.clone()),
        push_cert_dir,
    });
    Fixture::pushed_to(registry, None)
}

fn options(cert_dirs: CertDirs) -> Options {
    Options {
        cert_dirs,
        ..Options::default()
    }
}

/// Opens [`REPO_TAG`] at `host`, expecting a TLS error; returns its text.
fn tls_error(fx: &Fixture, host: &str, options: &Options) -> String {
    match fx.try_open(host, REPO_TAG, options) {
        Err(e @ Error::Tls { .. }) => e.to_string(),
        Err(other) => panic!("expected a TLS error, got: {other}"),
        Ok(_) => panic!("{host} opened, but a TLS error was expected"),
    }
}

#[test]
fn a_tls_registry_on_loopback_is_trusted_through_a_cert_dir_or_its_certs_d_host_directory() {
    let ca = TestCa::new("test-ca");
    let fx = tls_fixture(&ca.server("server"), None, None);
    let host = fx.registry.host();
    let blob = fx.sample.payload("kernel.efi").clone();

    // --cert-dir: the directory itself.
    let dir = ca.certs_d(&fx.dir.path().join("cert-dir"), None);
    let image = fx.open_with(&host, &options(CertDirs::Fixed(dir)));
    image
        .blobs
        .ensure_chunk(&blob, 0)
        .expect("chunk over HTTPS");
    fx.assert_cached_chunk(&image, &blob, 0);

    // certs.d: HOST:PORT under the root, the first root that has it.
    let roots = [fx.dir.path().join("a"), fx.dir.path().join("b")];
    std::fs::create_dir_all(&roots[0]).expect("empty root");
    ca.certs_d(&roots[1].join(&host), None);
    let image = fx.open_with(&host, &options(CertDirs::PerHost(roots.to_vec())));
    image
        .blobs
        .ensure_chunk(&blob, 1)
        .expect("chunk over HTTPS");
    fx.assert_cached_chunk(&image, &blob, 1);
}

#[test]
fn an_unknown_ca_is_named_with_the_host_once_and_not_retried_nor_tried_over_plain_http() {
    let ca = TestCa::new("test-ca");
    let fx = tls_fixture(&ca.server("server"), None, None);
    // Every connection the client makes goes through the relay.
    let relay = Relay::start(fx.registry.addr);
    let host = relay.host();
    let err = tls_error(&fx, &host, &options(CertDirs::PerHost(vec![])));
    assert!(
        err.contains(&format!(
            "{host}'s certificate is signed by a CA that is not trusted"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("/etc/containers/certs.d/{host}/")),
        "{err}"
    );
    // One cause, said once.
    assert!(
        !err.contains("io:") && !err.contains("UnknownIssuer"),
        "{err}"
    );
    assert_eq!(
        relay.connections(),
        1,
        "one handshake, no retry, no plain HTTP"
    );
}

/// Opens [`REPO_TAG`] from a registry serving the certificate `issue`
/// makes with a new CA, the CA trusted through a cert dir, expecting a TLS
/// error: the registry's host and the error's text.
fn refused_server_certificate(issue: impl FnOnce(&TestCa) -> Issued) -> (String, String) {
    let ca = TestCa::new("test-ca");
    let fx = tls_fixture(&issue(&ca), None, None);
    let host = fx.registry.host();
    let dir = ca.certs_d(&fx.dir.path().join("cert-dir"), None);
    let err = tls_error(&fx, &host, &options(CertDirs::Fixed(dir)));
    (host, err)
}

#[test]
fn a_certificate_for_another_name_is_refused() {
    let (host, err) = refused_server_certificate(|ca| {
        ca.server_for("other", "registry.example", Validity::Current)
    });
    assert!(
        err.contains(&format!(
            "{host}'s certificate is not valid for the name {host}"
        )),
        "{err}"
    );
}

#[test]
fn an_expired_certificate_is_refused() {
    let (host, err) =
        refused_server_certificate(|ca| ca.server_for("expired", "127.0.0.1", Validity::Expired));
    assert!(
        err.contains(&format!("{host}'s certificate has expired")),
        "{err}"
    );
}

#[test]
fn mutual_tls_works_with_the_client_certificate_and_says_what_is_wrong_without_it() {
    let ca = TestCa::new("test-ca");
    let client = ca.client("client", "ociblk-test");
    let fx = tls_fixture(&ca.server("server"), Some(&ca), Some(&client));
    let host = fx.registry.host();
    let blob = fx.sample.payload("kernel.efi").clone();

    let with_client = ca.certs_d(&fx.dir.path().join("with-client"), Some(&client));
    let image = fx.open_with(&host, &options(CertDirs::Fixed(with_client)));
    image
        .blobs
        .ensure_chunk(&blob, 0)
        .expect("chunk over mutual TLS");
    fx.assert_cached_chunk(&image, &blob, 0);

    let relay = Relay::start(fx.registry.addr);
    let relayed = relay.host();
    let without = ca.certs_d(&fx.dir.path().join("without-client"), None);
    let err = tls_error(&fx, &relayed, &options(CertDirs::Fixed(without.clone())));
    assert!(
        err.contains(&format!(
            "{relayed} asks for a client certificate and none is configured"
        )) && err.contains(&without.display().to_string()),
        "{err}"
    );
    assert_eq!(
        relay.connections(),
        1,
        "a refused client certificate is final"
    );

    // A client certificate from a CA the registry does not know.
    let stranger_ca = TestCa::new("stranger-ca");
    let stranger = stranger_ca.client("client", "stranger");
    let wrong = fx.dir.path().join("wrong-client");
    ca.certs_d(&wrong, Some(&stranger));
    let err = tls_error(&fx, &host, &options(CertDirs::Fixed(wrong.clone())));
    assert!(
        err.contains(&format!(
            "{host} refused the client certificate {}",
            wrong.join("client.cert").display()
        )),
        "{err}"
    );
}
