//! The service shell restarted on the same telemetry, as a supervisor restarts a component:
//! its metrics are registered once and the restart succeeds.

#![allow(clippy::unwrap_used)]

use nexus_common::config::Config;
use nexus_common::service::{Shell, ShellOptions};
use nexus_common::telemetry::Telemetry;
use nexus_common::testing;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_restarts_on_the_same_telemetry() {
    let broker = testing::service_broker();
    let cfg = Config {
        mqtt: testing::service_mqtt_config(broker.ports.tcp().port()),
        ..Config::default()
    };
    let telemetry = Telemetry::new("restarts");
    for round in 0..3 {
        let mut opts = ShellOptions::new(
            "restarts",
            format!("127.0.0.1:{}", testing::free_port())
                .parse()
                .unwrap(),
        );
        opts.telemetry = Some(telemetry.clone());
        let token = CancellationToken::new();
        let shell = Shell::start(&cfg, opts, token.clone())
            .await
            .unwrap_or_else(|e| panic!("start {round}: {e}"));
        shell
            .mqtt
            .wait_connected(std::time::Duration::from_secs(5))
            .await
            .unwrap();
        token.cancel();
        shell.stop().await;
    }
    // One set of MQTT series, still served.
    let text = telemetry.render();
    assert_eq!(
        text.matches("# TYPE nexus_mqtt_connected ").count(),
        1,
        "{text}"
    );
}
