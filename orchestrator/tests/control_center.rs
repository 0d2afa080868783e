//! The control center in a real browser: `nexus up` with a Modbus simulator, a devices file
//! (plc-1 on the simulator, plc-off on a port where nothing answers, so its tags are bad), an
//! alarm rule the simulated temperature always breaks (on device oven, the same simulator
//! polled every 2 s: the alert service starts evaluating after 500 ms without a message on
//! its rules' topics, alert-service/src/service.rs), and a historian (a PostgreSQL started
//! here), driven by `tests/browser/control_center.py` (Playwright for Python, Debian's
//! chromium). The script logs in as an admin, watches the overview, browses the live namespace
//! (a device's topics with their values changing, bad quality marked, collapse, expand, search)
//! and a tag's view (its live value, its stored history drawn; zoom, aggregates and the
//! history's refusals shown), writes a setpoint from the tag view (read back, seen live and in
//! the simulator's register; a value above the tag's `max` refused by the command handler),
//! adds a device through the form (a bad port first, shown next to its field), sees it online,
//! logs out; as an operator switches a pump on (a bool toggle, read back, the coil read over
//! Modbus), acknowledges the alarm, shelves and unshelves it, takes it out of service and back,
//! and finds it in the journal; and checks that a
//! viewer is offered no change, no write and no alarm action, and is refused them by the API. It saves a screenshot of
//! every page under `target/ui-screenshots/` and checks the first load's size (300 KB at most,
//! docs/adr/0008-control-center-ui.md). Before the browser, plain HTTP checks what is served:
//! every embedded file with its type, ETag and `304`, the page's security headers, `404`s.
//!
//! Needs PostgreSQL's server binaries (as the other historian tests), `/usr/bin/chromium`
//! (scripts/deps.sh) and `playwright` in target/test-venv (scripts/test.sh). Without the
//! last two the browser part is skipped with a message, unless `NEXUS_REQUIRE_BROWSER` is set
//! (scripts/test.sh sets it), when it fails.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nexus_common::testing::{free_port, test_python, PgServer};
use nexus_orchestrator::ui;

const NEXUS: &str = env!("CARGO_BIN_EXE_nexus");
const CHROMIUM: &str = "/usr/bin/chromium";

/// A child process killed when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Why the browser cannot run here, if it cannot.
fn browser_missing(python: &str) -> Option<String> {
    if !Path::new(CHROMIUM).exists() {
        return Some(format!(
            "{CHROMIUM} is missing (scripts/deps.sh installs chromium)"
        ));
    }
    let ok = Command::new(python)
        .args(["-c", "import playwright.sync_api"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!ok).then(|| format!("playwright is not installed for {python} (scripts/test.sh installs it)"))
}

/// `GET path` on 127.0.0.1:`port` with `headers` (lines): status, head (lowercase) and body;
/// status 0 when nothing answers.
fn get(port: u16, path: &str, headers: &str) -> (u16, String, Vec<u8>) {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new(), Vec::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n{headers}\r\n").is_err() {
        return (0, String::new(), Vec::new());
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(out.len());
    let head = String::from_utf8_lossy(&out[..split]).to_ascii_lowercase();
    let body = out.get(split + 4..).unwrap_or_default().to_vec();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head, body)
}

/// The value of header `name` (lowercase) in `head`.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == name).then(|| v.trim())
    })
}

/// What the orchestrator's port serves of the UI, without a browser: types, caching, the
/// page's policy, and nothing but the embedded files.
fn check_serving(port: u16) {
    let (status, head, body) = get(port, "/ui/", "");
    assert_eq!(status, 200, "{head}");
    assert_eq!(
        header(&head, "content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(header(&head, "cache-control"), Some("no-cache"));
    assert_eq!(
        header(&head, "content-security-policy"),
        Some(ui::CONTENT_SECURITY_POLICY.to_ascii_lowercase().as_str())
    );
    assert_eq!(header(&head, "x-content-type-options"), Some("nosniff"));
    assert_eq!(header(&head, "referrer-policy"), Some("no-referrer"));
    let page = String::from_utf8(body).unwrap();
    assert!(page.contains("/ui/app.js"), "{page}");
    assert!(
        !page.contains("<style") && !page.contains(" style="),
        "the policy allows no inline style"
    );

    for (path, bytes) in ui::ASSETS {
        let (status, head, body) = get(port, &format!("/ui/{path}"), "");
        assert_eq!(status, 200, "/ui/{path}: {head}");
        assert_eq!(body.as_slice(), *bytes, "/ui/{path}");
        let want = match path.rsplit_once('.').map(|(_, e)| e) {
            Some("js") => "text/javascript; charset=utf-8",
            Some("css") => "text/css; charset=utf-8",
            Some("html") => "text/html; charset=utf-8",
            Some("svg") => "image/svg+xml",
            None if path.ends_with("/LICENSE") => "text/plain; charset=utf-8",
            other => panic!("a file type the test does not know: {other:?}"),
        };
        assert_eq!(header(&head, "content-type"), Some(want), "/ui/{path}");
        assert_eq!(header(&head, "x-content-type-options"), Some("nosniff"));
        // Revalidated on every load; unchanged, it costs a 304 without a body.
        assert_eq!(header(&head, "cache-control"), Some("no-cache"));
        let etag = header(&head, "etag").unwrap().to_owned();
        let (status, head, body) = get(
            port,
            &format!("/ui/{path}"),
            &format!("If-None-Match: {etag}\r\n"),
        );
        assert_eq!(status, 304, "/ui/{path}: {head}");
        assert!(body.is_empty());
        let (status, ..) = get(port, &format!("/ui/{path}"), "If-None-Match: \"0\"\r\n");
        assert_eq!(status, 200);
    }
    for missing in [
        "/ui/nope.js",
        "/ui/pages",
        "/ui/pages/",
        "/ui/..%2fCargo.toml",
    ] {
        let (status, head, _) = get(port, missing, "");
        assert_eq!(status, 404, "{missing}: {head}");
    }
    // The page is open, the data is not (auth.anonymous is off).
    let (status, ..) = get(port, "/api/v1/status", "");
    assert_eq!(status, 401, "the API stays closed");
}

/// Every file under `orchestrator/ui/` is embedded (`ui::ASSETS`), and nothing else.
#[test]
fn every_ui_file_is_embedded() {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, root, out);
            } else {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy();
                out.push(rel.replace('\\', "/"));
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("ui");
    let mut on_disk = Vec::new();
    walk(&root, &root, &mut on_disk);
    on_disk.sort();
    let mut embedded: Vec<String> = ui::ASSETS.iter().map(|(p, _)| (*p).to_owned()).collect();
    embedded.sort();
    assert_eq!(on_disk, embedded, "orchestrator/ui/ and ui::ASSETS differ");
}

#[test]
fn the_control_center_in_a_browser() {
    // The simulated PLC, a process of its own as a real one would be.
    let sim = free_port();
    let _sim = Killed(
        Command::new(NEXUS)
            .args(["simulate", "modbus", "--port", &sim.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let dir = tempfile::tempdir().unwrap();
    // An OPC UA server to browse from the device form; the orchestrator trusts its certificate
    // (the commissioning setting, gateway.opcua.trust_server_certs).
    let ua = free_port();
    let _ua = Killed(
        Command::new(NEXUS)
            .args(["simulate", "opcua", "--port", &ua.to_string(), "--pki-dir"])
            .arg(dir.path().join("server-pki"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (admin_pw, operator_pw, viewer_pw) = ("admin-pw-1", "operator-pw-1", "viewer-pw-1");
    let http = free_port();
    let hash = nexus_common::auth::hash_password;
    std::fs::write(
        dir.path().join("nexus.yaml"),
        format!(
            "broker: {{ port: {mqtt}, ws_port: null }}\n\
             telemetry: {{ instance: ui-test }}\n\
             orchestrator: {{ http_listen: \"127.0.0.1:{http}\" }}\n\
             gateway: {{ http_listen: \"127.0.0.1:{gw}\", \
             opcua: {{ trust_server_certs: true, pki_dir: \"{client_pki}\" }} }}\n\
             commands: {{ http_listen: \"127.0.0.1:{cmd}\" }}\n\
             alerts:\n  http_listen: \"127.0.0.1:{alerts}\"\n  rules:\n\
             \x20   - {{ id: hot, topic: test/plant/packaging/line-5/oven/temperature, \
             condition: {{ type: high, limit: 10, deadband: 1 }}, severity: high, \
             message: \"{{topic}} is {{value}} above {{limit}}\" }}\n\
             auth:\n  anonymous: \"off\"\n  users:\n\
             \x20   - {{ username: admin, password_hash: \"{admin}\", role: admin }}\n\
             \x20   - {{ username: oscar, password_hash: \"{operator}\", role: operator }}\n\
             \x20   - {{ username: olivia, password_hash: \"{viewer}\", role: viewer }}\n\
             devices_file: devices.yaml\n",
            mqtt = free_port(),
            gw = free_port(),
            client_pki = dir.path().join("client-pki").display(),
            cmd = free_port(),
            alerts = free_port(),
            admin = hash(admin_pw),
            operator = hash(operator_pw),
            viewer = hash(viewer_pw),
        ),
    )
    .unwrap();
    // Nothing listens here: a device that does not answer.
    let off = free_port();
    std::fs::write(
        dir.path().join("devices.yaml"),
        format!(
            "devices:\n  - id: plc-1\n    protocol: modbus\n    uns_prefix: test/plant/packaging/line-1\n\
             \x20   poll_interval: 200ms\n\
             \x20   connection: {{ host: 127.0.0.1, port: {sim}, unit_id: 1, timeout: 1s }}\n\
             \x20   tags:\n\
             \x20     - {{ id: temperature, address: \"HR:0\", data_type: float32, unit: degC }}\n\
             \x20     - {{ id: setpoint, address: \"HR:10\", data_type: int16, scale: 0.1, unit: degC, access: readwrite, min: 0, max: 100 }}\n\
             \x20     - {{ id: running, address: \"CO:0\", data_type: bool }}\n\
             \x20 - id: oven\n    protocol: modbus\n    uns_prefix: test/plant/packaging/line-5\n\
             \x20   poll_interval: 2s\n\
             \x20   connection: {{ host: 127.0.0.1, port: {sim}, unit_id: 1, timeout: 1s }}\n\
             \x20   tags:\n\
             \x20     - {{ id: temperature, address: \"HR:0\", data_type: float32, unit: degC }}\n\
             \x20     - {{ id: pump, address: \"CO:1\", data_type: bool, access: readwrite }}\n\
             \x20 - id: plc-off\n    protocol: modbus\n    uns_prefix: test/plant/packaging/line-9\n\
             \x20   poll_interval: 500ms\n\
             \x20   connection: {{ host: 127.0.0.1, port: {off}, unit_id: 1, timeout: 300ms }}\n\
             \x20   tags:\n\
             \x20     - {{ id: level, address: \"HR:0\", data_type: uint16, unit: mm }}\n",
        ),
    )
    .unwrap();

    // A historian, so the tag view's chart draws stored points through the orchestrator.
    let pg = PgServer::start();
    let db = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(pg.create_database("ui"));
    let mut up = Killed(
        Command::new(NEXUS)
            .args(["up", "--config", "nexus.yaml"])
            .env("NEXUS_DATABASE_URL", &db)
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Keep the log for a failure's message.
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    for pipe in [
        Box::new(up.0.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(up.0.stderr.take().unwrap()),
    ] {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
    }
    let start = Instant::now();
    while get(http, "/readyz", "").0 != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "nexus up is not ready:\n{}",
            log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    check_serving(http);

    let python = test_python();
    if let Some(why) = browser_missing(&python) {
        assert!(
            std::env::var_os("NEXUS_REQUIRE_BROWSER").is_none(),
            "NEXUS_REQUIRE_BROWSER is set and the browser test cannot run: {why}"
        );
        eprintln!("SKIPPED the browser part of the_control_center_in_a_browser: {why}; set NEXUS_REQUIRE_BROWSER=1 to make this a failure");
        return;
    }
    let shots = repo("target/ui-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let out = Command::new(&python)
        .arg(repo("orchestrator/tests/browser/control_center.py"))
        .args(["--url", &format!("http://127.0.0.1:{http}")])
        .args(["--sim-port", &sim.to_string()])
        .args(["--off-port", &off.to_string()])
        .args(["--opcua-port", &ua.to_string()])
        .arg("--screenshots")
        .arg(&shots)
        .arg("--chromium")
        .arg(CHROMIUM)
        .env("NEXUS_UI_ADMIN", format!("admin:{admin_pw}"))
        .env("NEXUS_UI_OPERATOR", format!("oscar:{operator_pw}"))
        .env("NEXUS_UI_VIEWER", format!("olivia:{viewer_pw}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the browser script failed:\n{stdout}\n{stderr}\n--- nexus up ---\n{}",
        log.lock().unwrap()
    );
}
