//! TLS end to end: a TLS-only embedded broker (plain listener off) with a certificate from a
//! test CA, MQTT over TLS and over secure WebSocket, and the MQTT helper (rustls) trusting that
//! CA, for MQTT 3.1.1 and 5; an untrusted CA is refused. PostgreSQL over verified TLS.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::sync::Arc;
use std::time::Duration;

use nexus_common::auth::Identities;
use nexus_common::broker::{Acl, EmbeddedBroker};
use nexus_common::config::{BrokerConfig, BrokerTls, MqttConfig, MqttTls, MqttVersion, Secret};
use nexus_common::mqtt::{self, ClientSettings, QoS};
use nexus_common::pg::Database;
use nexus_common::testing;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio_util::sync::CancellationToken;

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&server_key, &ca)
            .unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("server.pem"), server.pem()).unwrap();
        std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).unwrap();
        // A CA that signed nothing here.
        let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
        other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let other = CertifiedIssuer::self_signed(other, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.path().join("other-ca.pem"), other.pem()).unwrap();
        Pki { dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

/// A TLS connection to 127.0.0.1:`port` as `localhost`, trusting the test CA.
async fn tls_connect(
    pki: &Pki,
    port: u16,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    nexus_common::install_tls_provider();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(pki.path("ca.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// MQTT over secure WebSocket, byte by byte: a TLS handshake that trusts the test CA, the
/// WebSocket upgrade on `/mqtt`, an MQTT 3.1.1 CONNECT in a masked binary frame, and the
/// broker's CONNACK (accepted: an anonymous viewer from this machine).
async fn wss_connack(pki: &Pki, port: u16) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tls_connect(pki, port).await;
    s.write_all(
        b"GET /mqtt HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Protocol: mqtt\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // CONNECT: protocol MQTT level 4, clean session, keep-alive 30 s, client id "wss-1".
    let connect: &[u8] = &[
        0x10, 17, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30, 0, 5, b'w', b's', b's', b'-', b'1',
    ];
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut frame = vec![0x82, 0x80 | connect.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(connect.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&frame).await.unwrap();
    let mut reply = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    // A binary frame holding CONNACK, session present 0, return code 0 (accepted).
    assert_eq!(reply, [0x82, 4, 0x20, 2, 0, 0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_only_broker_and_client() {
    let pki = Pki::new();
    let cfg = BrokerConfig {
        bind: "127.0.0.1".parse().unwrap(),
        port: None,
        ws_port: None,
        tls: Some(BrokerTls {
            port: 0,
            ws_port: Some(0),
            cert_file: pki.path("server.pem"),
            key_file: pki.path("server.key"),
            client_ca_file: None,
        }),
        state_dir: None,
        ..BrokerConfig::default()
    };
    let ids = Identities::new(&testing::test_auth()).unwrap();
    let acl = Acl::new(Arc::new(ids), &cfg, &[]);
    let broker = EmbeddedBroker::start(&cfg, acl, &prometheus::Registry::new()).unwrap();
    assert!(
        broker.ports.tcp.is_none(),
        "broker.port: null binds no plain listener"
    );
    let tls_port = broker.ports.tls.expect("TLS listener").port();
    let wss_port = broker.ports.wss.expect("secure WebSocket listener").port();
    wss_connack(&pki, wss_port).await;
    let token = CancellationToken::new();

    for version in [MqttVersion::V311, MqttVersion::V5] {
        let mut c = testing::mqtt_config(tls_port);
        c.host = "localhost".into();
        c.version = version;
        c.tls = Some(MqttTls {
            ca_file: pki.path("ca.pem"),
            cert_file: None,
            key_file: None,
        });
        let topic = testing::unique("tls/topic");
        let mut s = ClientSettings::new(testing::unique("tls-sub"));
        s.subscriptions = vec![(topic.clone(), QoS::AtLeastOnce)];
        let (_sub, mut rx) = mqtt::connect(&c, s, None, token.clone()).unwrap();
        let publisher_cfg = MqttConfig {
            username: Some(testing::PUBLISHER_USER.0.into()),
            password: Some(Secret::new(testing::PUBLISHER_USER.1)),
            ..c.clone()
        };
        let (publisher, _) = mqtt::connect(
            &publisher_cfg,
            ClientSettings::new(testing::unique("tls-pub")),
            None,
            token.clone(),
        )
        .unwrap();
        publisher
            .wait_connected(Duration::from_secs(10))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        publisher
            .publish(&topic, "secret-value", QoS::AtLeastOnce, false)
            .await
            .unwrap();
        let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.payload().as_ref(), b"secret-value", "{version:?}");

        // A client that trusts another CA never connects.
        let mut bad = c.clone();
        bad.tls = Some(MqttTls {
            ca_file: pki.path("other-ca.pem"),
            cert_file: None,
            key_file: None,
        });
        let (h, _) = mqtt::connect(
            &bad,
            ClientSettings::new(testing::unique("tls-bad")),
            None,
            token.clone(),
        )
        .unwrap();
        assert!(
            h.wait_connected(Duration::from_secs(2)).await.is_err(),
            "{version:?}: untrusted server accepted"
        );
    }
    // A missing CA file is a clear error before any connection.
    let mut c = testing::mqtt_config(tls_port);
    c.tls = Some(MqttTls {
        ca_file: pki.path("nope.pem"),
        cert_file: None,
        key_file: None,
    });
    let e = mqtt::connect(&c, ClientSettings::new("x"), None, token.clone())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("cannot read TLS file") && e.contains("nope.pem"),
        "{e}"
    );
    token.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_with_verified_certificates() {
    let pki = Pki::new();
    let cert = std::fs::read_to_string(pki.path("server.pem")).unwrap();
    let key = std::fs::read_to_string(pki.path("server.key")).unwrap();
    let pg = testing::PgServer::start_with_tls(&cert, &key);
    let url = format!(
        "postgres://nexus@localhost:{}/postgres?sslmode=require",
        pg.port
    );
    let (db, _task) =
        nexus_common::pg::connect(&Database::at(&url).with_ca_file(&pki.path("ca.pem")))
            .await
            .unwrap();
    let ssl: bool = db
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the connection is encrypted");
    // A certificate from a CA the client does not trust is refused.
    let e = nexus_common::pg::connect(&Database::at(&url).with_ca_file(&pki.path("other-ca.pem")))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("cannot connect to the database"), "{e}");
    // Without TLS asked for, the same server still serves plain connections.
    let plain = format!(
        "postgres://nexus@127.0.0.1:{}/postgres?sslmode=disable",
        pg.port
    );
    assert!(nexus_common::pg::connect(&Database::at(&plain))
        .await
        .is_ok());
}

/// `database.require_tls`: a URL's `sslmode=prefer` (the default) is made `require`, so a
/// server without TLS is refused instead of answering in plain text; `sslmode=disable` is
/// an error naming the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tls_can_be_required() {
    let pki = Pki::new();
    let cert = std::fs::read_to_string(pki.path("server.pem")).unwrap();
    let key = std::fs::read_to_string(pki.path("server.key")).unwrap();
    let tls_pg = testing::PgServer::start_with_tls(&cert, &key);
    let required = |url: String| {
        let mut db = Database::at(&url).with_ca_file(&pki.path("ca.pem"));
        db.require_tls = true;
        db
    };
    let prefer = format!(
        "postgres://nexus@localhost:{}/postgres?sslmode=prefer",
        tls_pg.port
    );
    let (db, _task) = nexus_common::pg::connect(&required(prefer)).await.unwrap();
    let ssl: bool = db
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl);
    let disable = format!(
        "postgres://nexus@localhost:{}/postgres?sslmode=disable",
        tls_pg.port
    );
    let e = nexus_common::pg::connect(&required(disable))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("database.require_tls"), "{e}");
    // A server that offers no TLS: `prefer` would have fallen back to plain text.
    let plain_pg = testing::PgServer::start();
    let url = format!("postgres://nexus@localhost:{}/postgres", plain_pg.port);
    assert!(nexus_common::pg::connect(&Database::at(&url)).await.is_ok());
    assert!(nexus_common::pg::connect(&required(url)).await.is_err());
}

/// `http.tls`: a service's HTTP port answers HTTPS with the configured certificate (a client
/// trusting the test CA gets `/healthz`), and a plain-HTTP request gets no HTTP answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_on_a_service_port() {
    use nexus_common::config::HttpTls;
    use nexus_common::service::{Shell, ShellOptions};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new();
    let broker = testing::service_broker();
    let mut cfg = nexus_common::config::Config {
        mqtt: testing::service_mqtt_config(broker.ports.tcp().port()),
        ..Default::default()
    };
    cfg.http.tls = Some(HttpTls {
        cert_file: pki.path("server.pem"),
        key_file: pki.path("server.key"),
    });
    let port = testing::free_port();
    let token = CancellationToken::new();
    let opts = ShellOptions::new("https", format!("127.0.0.1:{port}").parse().unwrap());
    let shell = Shell::start(&cfg, opts, token.clone()).await.unwrap();

    let mut s = tls_connect(&pki, port).await;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");

    // Plain HTTP on the same port: the TLS server never answers it as HTTP.
    let (status, _) =
        tokio::task::spawn_blocking(move || testing::http(port, "GET", "/healthz", ""))
            .await
            .unwrap();
    assert_eq!(status, 0, "plain HTTP was answered on an HTTPS port");
    token.cancel();
    shell.stop().await;
}
