//! The control center: a browser UI served by the orchestrator's port (`/ui/`, `/ui/...`;
//! `/` redirects there).
//!
//! Every file of `orchestrator/ui/` is compiled into the binary ([`ASSETS`]), so `cargo build`
//! builds the UI and nothing is read from disk at runtime (docs/adr/0008-control-center-ui.md).
//! The page and its files are public (a browser needs them to show the login form); the data
//! they show comes from the `/api/v1/...` routes, each behind its role.
//!
//! Caching: every answer carries an `ETag` (a hash of the file) and `Cache-Control: no-cache`,
//! so a browser revalidates each file on every load (a `304` without a body) and never runs the
//! modules of two versions together after an upgrade.

use std::collections::HashMap;
use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use nexus_common::auth::http::Routes;

/// The page's policy: no inline scripts or styles, nothing from another origin, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' data:; \
     style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'";

/// One embedded file: its path under `orchestrator/ui/` and its bytes.
macro_rules! asset {
    ($path:literal) => {
        ($path, include_bytes!(concat!("../ui/", $path)) as &[u8])
    };
}

/// Every file of `orchestrator/ui/` (orchestrator/tests/control_center.rs checks that none
/// is left out).
pub const ASSETS: &[(&str, &[u8])] = &[
    asset!("index.html"),
    asset!("app.js"),
    asset!("style.css"),
    asset!("icon.svg"),
    asset!("lib/api.js"),
    asset!("lib/dom.js"),
    asset!("lib/session.js"),
    asset!("lib/live.js"),
    asset!("pages/login.js"),
    asset!("pages/overview.js"),
    asset!("pages/devices.js"),
    asset!("pages/device.js"),
    asset!("pages/namespace.js"),
    asset!("pages/tag.js"),
    asset!("pages/alarms.js"),
    // uPlot 1.6.32 (MIT), loaded only by the tag view.
    asset!("vendor/uplot/uPlot.esm.js"),
    asset!("vendor/uplot/uPlot.min.css"),
    asset!("vendor/uplot/LICENSE"),
];

struct Asset {
    body: &'static [u8],
    content_type: &'static str,
    etag: HeaderValue,
}

fn assets() -> &'static HashMap<&'static str, Asset> {
    static MAP: OnceLock<HashMap<&'static str, Asset>> = OnceLock::new();
    MAP.get_or_init(|| {
        ASSETS
            .iter()
            .map(|&(path, body)| {
                let etag = HeaderValue::from_str(&format!("\"{:016x}\"", fnv1a(body)))
                    .unwrap_or_else(|_| HeaderValue::from_static("\"0\""));
                (
                    path,
                    Asset {
                        body,
                        content_type: content_type(path),
                        etag,
                    },
                )
            })
            .collect()
    })
}

/// FNV-1a, 64 bits: an ETag only has to change when the file does.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("json" | "map") => "application/json",
        _ => "text/plain; charset=utf-8",
    }
}

/// Does `If-None-Match` name `etag` (or `*`)?
fn not_modified(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let Some(Ok(inm)) = headers.get(header::IF_NONE_MATCH).map(|v| v.to_str()) else {
        return false;
    };
    let Ok(etag) = etag.to_str() else {
        return false;
    };
    inm.split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag)
}

fn serve(path: &str, headers: &HeaderMap) -> Response {
    let Some(a) = assets().get(path) else {
        return nexus_common::http::error(StatusCode::NOT_FOUND, format!("no file /ui/{path}"));
    };
    let mut r = if not_modified(headers, &a.etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut r = a.body.into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(a.content_type),
        );
        r
    };
    let h = r.headers_mut();
    h.insert(header::ETAG, a.etag.clone());
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if a.content_type.starts_with("text/html") {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        );
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    r
}

async fn index(headers: HeaderMap) -> Response {
    serve("index.html", &headers)
}

async fn file(Path(file): Path<String>, headers: HeaderMap) -> Response {
    serve(&file, &headers)
}

/// `GET /` sends a browser to the page.
async fn to_page() -> Redirect {
    Redirect::to(PAGE)
}

/// Where the page is served.
pub const PAGE: &str = "/ui/";

/// `GET /ui/` (the page) and `GET /ui/{file}` (its modules, style and images), open to
/// anyone: the page must load before anyone has logged in. `GET /` redirects to the page.
/// Nothing here is data; every API call of the page needs a caller.
pub fn routes() -> Routes {
    Routes::new()
        .public_get(PAGE, index)
        .public_get("/ui/{*file}", file)
        .public_get("/", to_page)
}
