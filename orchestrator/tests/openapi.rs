//! The OpenAPI document of the orchestrator's port, checked by a property-based API tester
//! (schemathesis, from PyPI, in the test venv) against a running `nexus up --demo`: every
//! operation fuzzed with valid and invalid inputs, logged in as the demo admin; no 5xx, every
//! answer matches the document, and anonymous callers are refused.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nexus_common::testing;

mod support;

fn schemathesis(url: &str, args: &[&str], reports: &Path) -> (bool, String) {
    let python = testing::test_python();
    let bin = Path::new(&python).with_file_name("schemathesis");
    let out = Command::new(&bin)
        .args(["run", url, "--auth", "admin:nexus-demo", "--checks", "all"])
        .args(["--max-examples", "25", "--seed", "7", "--workers", "1"])
        .args(["--request-timeout", "35"])
        .arg("--report-dir")
        .arg(reports)
        .args(args)
        .env("NO_COLOR", "1")
        // Its example database and caches go there, not into the source tree.
        .current_dir(reports.parent().unwrap_or(reports))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{} does not run ({e}): scripts/test.sh installs schemathesis in the test venv",
                bin.display()
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The run's size, for the log: "N generated, ...".
    if let Some(l) = text.lines().find(|l| l.contains(" generated")) {
        eprintln!("schemathesis {args:?}: {}", l.trim());
    }
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_answer_outside_the_document() {
    // A historian too, so the history routes answer from a database, not 503.
    let pg = testing::PgServer::start();
    let db = pg.create_database("openapi").await;
    let up = support::DemoUp::start(
        "openapi",
        &[
            ("NEXUS_AUTH__ANONYMOUS", "off"),
            ("NEXUS_DATABASE_URL", &db),
        ],
    );
    let (http, dir) = (up.http, &up.dir);
    let start = Instant::now();
    while testing::http(http, "GET", "/readyz", "").0 != 200 {
        assert!(start.elapsed() < Duration::from_secs(20), "not ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    let url = format!("http://127.0.0.1:{http}/api/openapi.json");
    let origin = format!("Origin: http://127.0.0.1:{http}");
    let reports = dir.path().join("reports");

    // Everything but the devices and the live namespace, with every check.
    let (ok, text) = schemathesis(
        &url,
        &[
            "--header",
            &origin,
            "--exclude-path-regex",
            "^/api/v1/(devices|namespace|history|latest|alarms|commands|browse|test-connection|status/stream)",
        ],
        &reports,
    );
    assert!(ok, "schemathesis:\n{text}");
    // Writes: the device and tag are the command handler's to know (an unknown one is its
    // answer, `success: false`, not an HTTP error), so neither acceptance check applies; no
    // server error, documented statuses and bodies still do. No device of the demo has a tag
    // named as the fuzzer names them, so nothing is written to the simulator.
    let (ok, text) = schemathesis(
        &url,
        &[
            "--header",
            &origin,
            "--include-path-regex",
            "^/api/v1/commands",
            "--exclude-checks",
            "positive_data_acceptance,negative_data_rejection",
        ],
        &reports,
    );
    assert!(ok, "schemathesis:\n{text}");
    // The devices (with their connection test and OPC UA browse), the namespace snapshot,
    // the history and the alarms: a schema cannot say every rule a device must follow (an address for its protocol, a unique id), nor what
    // makes a topic filter or a time expression valid, so an input the schema allows may
    // still be refused, with 400 or 422 naming the problem; every other check holds. The namespace stream never ends by design; it is
    // read in tests/control_api.rs.
    let (ok, text) = schemathesis(
        &url,
        &[
            "--header",
            &origin,
            "--include-path-regex",
            "^/api/v1/(devices|namespace$|history|latest|alarms|browse|test-connection)",
            "--exclude-checks",
            "positive_data_acceptance",
        ],
        &reports,
    );
    assert!(ok, "schemathesis:\n{text}");
    // Whatever the fuzzing added, changed or removed, the devices file is still one the
    // platform loads.
    let text = format!(
        "devices_file: {}\n",
        dir.path().join("nexus-data/devices.yaml").display()
    );
    if let Err(e) = nexus_common::config::Config::from_str_with_env(&text, None, &[]) {
        panic!("the devices file no longer loads: {e}");
    }
}
