//! Authentication and roles on every HTTP port: one middleware, put in front of every route by
//! [`crate::http::service_router`], and [`Routes`], the only way a service adds routes, each
//! with the role it needs.
//!
//! ```text
//! request ─> open path? (/healthz, /readyz, /api/v1/login, /metrics when auth.metrics: open) ──> route
//!         ─> who is asking, first that applies:
//!              cookie nexus_session  (a session from POST /api/v1/login)
//!              Authorization: Basic  (user and password, Identities::login)
//!              Authorization: Bearer (an API token)
//!              anonymous viewer      (when auth.anonymous allows the peer address)
//!            credentials that do not check: 401 + WWW-Authenticate, nexus_http_auth_failures_total
//!            none, and no anonymous access: 401
//!         ─> cookie or Basic (which browsers send by themselves) on POST/PUT/PATCH/DELETE:
//!            an Origin header must name this host, else 403
//!         ─> Caller(identity) in the request's extensions
//!         ─> the route's role (Routes): below it, 403 naming the role; else the handler
//! ```
//!
//! Deny is the default: a request to any path but the open ones needs an identity, so a route
//! (or a 404) is never reachable without one, and a route cannot be added without a role.
//!
//! Sessions are held per port in a bounded map keyed by the SHA-256 of the cookie: at most
//! `auth.max_sessions`, ended after `auth.session_ttl` without use; a login into a full map
//! logs out the session idle the longest, counted in `nexus_http_sessions_evicted_total`.
//! Refused credentials add nothing to any map, so a flood of them costs no memory; argon2
//! checks are queued by [`Identities`].

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::connect_info::{ConnectInfo, MockConnectInfo};
use axum::extract::{FromRequestParts, Request, State};
use axum::handler::Handler;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use axum::{Json, Router};
use prometheus::{IntCounter, IntGauge};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{Identities, Identity, Via};
use crate::bounded::BoundedMap;
use crate::config::{AuthConfig, MetricsAccess, Role};
use crate::http::error;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "nexus_session";
/// `POST` `{"username": .., "password": ..}`: a session cookie.
pub const LOGIN_PATH: &str = "/api/v1/login";
/// `POST`: ends the session of the cookie sent.
pub const LOGOUT_PATH: &str = "/api/v1/logout";
/// `GET`: the caller's name and role.
pub const WHOAMI_PATH: &str = "/api/v1/whoami";
/// Sent with every 401.
pub const CHALLENGE: &str = "Basic realm=\"nexus\"";

/// The longest `Authorization` header read; a longer one is refused unread.
const MAX_AUTHORIZATION: usize = 4096;
/// Lines about refused requests logged per [`LOG_WINDOW`], at most; the others are counted and
/// the count is given with the next line logged.
const LOG_BURST: u32 = 20;
const LOG_WINDOW: Duration = Duration::from_secs(10);

/// The caller of a request, as the middleware found it: handlers take it as an extractor.
/// A route declared with a role only runs with a caller that has it.
#[derive(Debug, Clone)]
pub struct Caller(pub Identity);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| unauthorized("authentication required"))
    }
}

/// The routes of a service, each with the role it needs: the one way to add routes to a
/// service's port ([`crate::service::ShellOptions::routes`]), so none can be added without
/// a role. The role is checked before the handler runs, so a caller without it learns nothing
/// from the handler's validation.
///
/// ```ignore
/// Routes::new()
///     .get("/api/v1/alarms", Role::Viewer, list)
///     .post("/api/v1/alarms/{id}/{op}", Role::Operator, action)
///     .with_state(state)
/// ```
pub struct Routes<S = ()> {
    router: Router<S>,
    policy: Vec<(Method, String, Role)>,
    /// Paths served to anyone (`GET` only): exact, or `<prefix>*` for everything under it.
    public: Vec<String>,
}

impl<S: Clone + Send + Sync + 'static> Default for Routes<S> {
    fn default() -> Self {
        Routes::new()
    }
}

impl<S: Clone + Send + Sync + 'static> Routes<S> {
    pub fn new() -> Routes<S> {
        Routes {
            router: Router::new(),
            policy: Vec::new(),
            public: Vec::new(),
        }
    }

    /// `GET` (and `HEAD`) `path` for anyone, logged in or not: what a browser needs before
    /// it can log in (the control center's page and its assets) and documentation. `path`
    /// may end in `/{*rest}` to serve everything under it. Never for data.
    pub fn public_get<H, T>(mut self, path: &str, handler: H) -> Self
    where
        H: Handler<T, S>,
        T: 'static,
    {
        self.router = self.router.route(path, axum::routing::get(handler));
        self.public.push(match path.split_once("{*") {
            Some((prefix, _)) => format!("{prefix}*"),
            None => path.to_owned(),
        });
        self
    }

    /// `GET` (and `HEAD`) `path` for callers with `role`.
    pub fn get<H, T>(self, path: &str, role: Role, handler: H) -> Self
    where
        H: Handler<T, S>,
        T: 'static,
    {
        self.add(Method::GET, path, role, axum::routing::get(handler))
    }

    /// `POST` `path` for callers with `role`.
    pub fn post<H, T>(self, path: &str, role: Role, handler: H) -> Self
    where
        H: Handler<T, S>,
        T: 'static,
    {
        self.add(Method::POST, path, role, axum::routing::post(handler))
    }

    /// `PUT` `path` for callers with `role`.
    pub fn put<H, T>(self, path: &str, role: Role, handler: H) -> Self
    where
        H: Handler<T, S>,
        T: 'static,
    {
        self.add(Method::PUT, path, role, axum::routing::put(handler))
    }

    /// `DELETE` `path` for callers with `role`.
    pub fn delete<H, T>(self, path: &str, role: Role, handler: H) -> Self
    where
        H: Handler<T, S>,
        T: 'static,
    {
        self.add(Method::DELETE, path, role, axum::routing::delete(handler))
    }

    fn add(mut self, method: Method, path: &str, role: Role, route: MethodRouter<S>) -> Self {
        let route = route.route_layer(middleware::from_fn_with_state(role, require));
        self.router = self.router.route(path, route);
        self.policy.push((method, path.to_owned(), role));
        self
    }

    /// The routes of `other` too.
    pub fn merge(mut self, other: Routes<S>) -> Self {
        self.router = self.router.merge(other.router);
        self.policy.extend(other.policy);
        self.public.extend(other.public);
        self
    }

    /// Give the handlers their state.
    pub fn with_state<S2>(self, state: S) -> Routes<S2> {
        Routes {
            router: self.router.with_state(state),
            policy: self.policy,
            public: self.public,
        }
    }

    /// Method, path and role of every route, in the order they were added.
    pub fn policy(&self) -> &[(Method, String, Role)] {
        &self.policy
    }

    /// The paths of [`Routes::public_get`] (`<prefix>*` for everything under a prefix).
    pub fn public_paths(&self) -> &[String] {
        &self.public
    }
}

impl Routes<()> {
    pub(crate) fn into_router(self) -> Router {
        self.router
    }
}

/// The route layer of [`Routes`]: the caller must have `role`.
async fn require(State(role): State<Role>, req: Request, next: Next) -> Response {
    match req.extensions().get::<Caller>() {
        Some(Caller(id)) if id.may(role) => next.run(req).await,
        Some(Caller(id)) => {
            tracing::info!(user = %id.name, role = %id.role, needed = %role, method = %req.method(), path = %req.uri().path(), "HTTP request refused: role too low; answered 403");
            error(
                StatusCode::FORBIDDEN,
                format!("this needs the {role} role; {} is {}", id.name, id.role),
            )
        }
        // The middleware resolves a caller for every path but the open ones, and no route of
        // `Routes` is open; should one be added under an open path, it is closed, not open.
        None => unauthorized("authentication required"),
    }
}

/// What the auth middleware counts, in the service's registry (see `crate::http::HttpMetrics`).
#[derive(Clone)]
pub struct AuthMetrics {
    /// Requests refused for credentials that do not check.
    pub failures: IntCounter,
    /// Sessions logged out to make room for a new login.
    pub sessions_evicted: IntCounter,
    /// Sessions held now.
    pub sessions: IntGauge,
}

/// The authentication of one HTTP port: identities, sessions and policy.
pub struct HttpAuth {
    ids: Arc<Identities>,
    sessions: Mutex<Sessions>,
    metrics_open: bool,
    metrics: AuthMetrics,
    log: LogLimit,
    /// Mark the session cookie `Secure` (the port serves HTTPS).
    secure_cookies: bool,
    /// [`Routes::public_paths`] of the port.
    public: Vec<String>,
}

impl HttpAuth {
    /// The port's authentication, with an empty session store of `cfg.max_sessions`.
    pub fn new(ids: Arc<Identities>, cfg: &AuthConfig, metrics: AuthMetrics) -> HttpAuth {
        metrics.sessions.set(0);
        HttpAuth {
            ids,
            sessions: Mutex::new(Sessions::new(cfg.max_sessions, cfg.session_ttl)),
            metrics_open: cfg.metrics == MetricsAccess::Open,
            metrics,
            log: LogLimit::default(),
            secure_cookies: false,
            public: Vec::new(),
        }
    }

    /// Serve these paths to anyone (from [`Routes::public_paths`]), for `GET` and `HEAD`.
    pub fn with_public(mut self, paths: &[String]) -> HttpAuth {
        self.public = paths.to_vec();
        self
    }

    /// Mark session cookies `Secure`: for a port that serves HTTPS (`http.tls`).
    pub fn with_secure_cookies(mut self, on: bool) -> HttpAuth {
        self.secure_cookies = on;
        self
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        // A poisoned lock only means a panic elsewhere; the map itself is still consistent.
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Paths served to anyone.
    fn is_open(&self, method: &Method, path: &str) -> bool {
        matches!(path, "/healthz" | "/readyz" | LOGIN_PATH)
            || (path == "/metrics" && self.metrics_open)
            || ((method == Method::GET || method == Method::HEAD)
                && self.public.iter().any(|p| match p.strip_suffix('*') {
                    Some(prefix) => path.starts_with(prefix) && !path.contains("/../"),
                    None => path == p,
                }))
    }

    /// Count and log a refusal of credentials; the 401 to answer.
    fn failed(
        &self,
        how: &'static str,
        user: Option<&str>,
        peer: Option<IpAddr>,
        msg: &str,
    ) -> Response {
        self.metrics.failures.inc();
        if let Some(suppressed) = self.log.admit() {
            // A name that is no user may be a password typed into the wrong field: not logged.
            let user = user.map(|u| {
                if self.ids.user(u).is_some() {
                    u
                } else {
                    "(not a user)"
                }
            });
            tracing::warn!(via = how, user = user.unwrap_or(""), peer = %peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string()), suppressed, "HTTP credentials refused; answered 401");
        }
        unauthorized(msg)
    }

    /// Who is asking, from the headers and the peer address; `Err` is the answer refusing it.
    async fn resolve(
        &self,
        headers: &HeaderMap,
        peer: Option<IpAddr>,
    ) -> Result<Resolved, Response> {
        let cookie = session_cookie(headers);
        if let Some(c) = cookie {
            if let Some((identity, key, refresh)) = self.sessions().touch(c, Instant::now()) {
                return Ok(Resolved {
                    identity,
                    ambient: true,
                    session: Some(key),
                    refresh_cookie: refresh.then(|| c.to_owned()),
                });
            }
        }
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            let identity = match parse_authorization(value.as_bytes()) {
                Ok(Credentials::Basic { user, password }) => {
                    match self.ids.login(&user, &password).await {
                        Some(id) => id,
                        None => {
                            return Err(self.failed(
                                "basic",
                                Some(&user),
                                peer,
                                "the user name or password is wrong",
                            ))
                        }
                    }
                }
                Ok(Credentials::Bearer(token)) => match self.ids.token(token) {
                    Some(id) => id,
                    None => {
                        return Err(self.failed("bearer", None, peer, "the token is not valid"))
                    }
                },
                Err(e) => {
                    return Err(self.failed(
                        "authorization",
                        None,
                        peer,
                        &format!("Authorization: {e}"),
                    ))
                }
            };
            let ambient = identity.via == Via::Password;
            return Ok(Resolved {
                identity,
                ambient,
                session: None,
                refresh_cookie: None,
            });
        }
        if cookie.is_some() {
            let mut r = self.failed(
                "session",
                None,
                peer,
                "the session has ended or is unknown: log in again",
            );
            r.headers_mut()
                .append(header::SET_COOKIE, HeaderValue::from_static(CLEAR_COOKIE));
            return Err(r);
        }
        match self.ids.anonymous(peer) {
            Some(identity) => Ok(Resolved {
                identity,
                ambient: false,
                session: None,
                refresh_cookie: None,
            }),
            None => Err(unauthorized(
                "authentication required: log in (POST /api/v1/login), or send Basic credentials or a bearer token",
            )),
        }
    }
}

struct Resolved {
    identity: Identity,
    /// Credentials a browser sends by itself (a cookie, cached Basic credentials): cross-site
    /// requests could carry them.
    ambient: bool,
    session: Option<SessionKey>,
    /// The cookie, to send again with a fresh Max-Age.
    refresh_cookie: Option<String>,
}

/// The key of the session a request came with (for logout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SessionKey([u8; 32]);

const CLEAR_COOKIE: &str = "nexus_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0";

/// The user a Nexus service acts for: the orchestrator forwards the control center's calls to
/// the other services with its own (service) credentials and these headers, so each service
/// checks and records the user, not the orchestrator.
pub const ON_BEHALF_OF: &str = "x-nexus-on-behalf-of";
/// The role of [`ON_BEHALF_OF`]'s user (never `service`).
pub const ON_BEHALF_ROLE: &str = "x-nexus-on-behalf-role";

/// The identity a request acts as: `Ok(None)` when it names nobody else; an error when it
/// does but may not (only the service role may act for others, and never as a service).
fn on_behalf(headers: &HeaderMap, caller: &Identity) -> Result<Option<Identity>, String> {
    let Some(name) = headers.get(ON_BEHALF_OF) else {
        return Ok(None);
    };
    if caller.role != Role::Service {
        return Err(format!(
            "{} is not a Nexus service and may not act for another user",
            caller.name
        ));
    }
    let name = name
        .to_str()
        .ok()
        .filter(|n| !n.is_empty() && n.len() <= 256)
        .ok_or("X-Nexus-On-Behalf-Of is not a user name")?;
    let role = match headers.get(ON_BEHALF_ROLE).and_then(|r| r.to_str().ok()) {
        Some("viewer") => Role::Viewer,
        Some("publisher") => Role::Publisher,
        Some("operator") => Role::Operator,
        Some("admin") => Role::Admin,
        _ => {
            return Err("X-Nexus-On-Behalf-Role is not viewer, publisher, operator or admin".into())
        }
    };
    Ok(Some(Identity {
        name: name.to_owned(),
        role,
        publish: Arc::from(Vec::new()),
        via: caller.via,
    }))
}

/// A page's own script (`X-Requested-With: XMLHttpRequest`, as the control center sends it)
/// gets its 401s without `WWW-Authenticate`: with it, a browser opens its own login dialog over
/// the page instead of letting the page show its login form.
pub async fn no_challenge_for_scripts(req: Request, next: Next) -> Response {
    let script = req
        .headers()
        .get("x-requested-with")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"XMLHttpRequest"));
    let mut resp = next.run(req).await;
    if script {
        resp.headers_mut().remove(header::WWW_AUTHENTICATE);
    }
    resp
}

fn unauthorized(msg: &str) -> Response {
    let mut r = error(StatusCode::UNAUTHORIZED, msg);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(CHALLENGE),
    );
    r
}

fn peer_ip(req: &Request) -> Option<IpAddr> {
    let ext = req.extensions();
    ext.get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .or_else(|| {
            ext.get::<ConnectInfo<crate::http_tls::TlsPeer>>()
                .map(|c| c.0 .0.ip())
        })
        .or_else(|| ext.get::<MockConnectInfo<SocketAddr>>().map(|c| c.0.ip()))
}

fn is_unsafe(m: &Method) -> bool {
    !matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// The middleware of every port (see the module).
pub async fn authenticate(
    State(a): State<Arc<HttpAuth>>,
    mut req: Request,
    next: Next,
) -> Response {
    if a.is_open(req.method(), req.uri().path()) {
        return next.run(req).await;
    }
    let peer = peer_ip(&req);
    let mut r = match a.resolve(req.headers(), peer).await {
        Ok(r) => r,
        Err(refused) => return refused,
    };
    match on_behalf(req.headers(), &r.identity) {
        Ok(Some(user)) => r.identity = user,
        Ok(None) => {}
        Err(msg) => {
            tracing::warn!(user = %r.identity.name, path = %req.uri().path(), "{msg}; answered 403");
            return error(StatusCode::FORBIDDEN, msg);
        }
    }
    if !r.identity.may(Role::Viewer) {
        return error(StatusCode::FORBIDDEN, "this needs the viewer role");
    }
    if r.ambient && is_unsafe(req.method()) && !same_origin(req.headers()) {
        tracing::warn!(user = %r.identity.name, method = %req.method(), path = %req.uri().path(), "cross-site request refused (Origin is not this host); answered 403");
        return error(
            StatusCode::FORBIDDEN,
            "cross-site request refused: the Origin header does not name this host",
        );
    }
    if let Some(key) = r.session {
        req.extensions_mut().insert(key);
    }
    req.extensions_mut().insert(Caller(r.identity));
    let mut resp = next.run(req).await;
    if let Some(cookie) = r.refresh_cookie {
        let ttl = a.sessions().ttl;
        if let Ok(v) = HeaderValue::from_str(&set_cookie(&cookie, ttl, a.secure_cookies)) {
            if !resp.headers().contains_key(header::SET_COOKIE) {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
        }
    }
    resp
}

/// The login, logout and whoami routes.
pub(crate) fn session_routes(a: Arc<HttpAuth>) -> Router {
    let open = Router::new()
        .route(LOGIN_PATH, axum::routing::post(login))
        .with_state(a.clone());
    let declared = Routes::new()
        .post(LOGOUT_PATH, Role::Viewer, logout)
        .get(WHOAMI_PATH, Role::Viewer, whoami)
        .with_state(a)
        .into_router();
    open.merge(declared)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    username: String,
    password: String,
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

async fn login(State(a): State<Arc<HttpAuth>>, req: Request) -> Response {
    let peer = peer_ip(&req);
    let (parts, body) = req.into_parts();
    // A login form on another site must not log a browser in as someone else.
    if !same_origin(&parts.headers) {
        return error(
            StatusCode::FORBIDDEN,
            "cross-site request refused: the Origin header does not name this host",
        );
    }
    if !is_json(&parts.headers) {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "body: send {\"username\": ..., \"password\": ...} as application/json",
        );
    }
    let body: Bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        // Over the port's body limit (the limit layer answers 413) or a broken connection.
        Err(e) => return error(StatusCode::PAYLOAD_TOO_LARGE, format!("body: {e}")),
    };
    let mut de = serde_json::Deserializer::from_slice(&body);
    let b: LoginBody = match serde_path_to_error::deserialize(&mut de) {
        Ok(b) => b,
        Err(e) => {
            let at = match e.path().to_string().as_str() {
                "." => "body".to_owned(),
                field => field.to_owned(),
            };
            return error(StatusCode::BAD_REQUEST, format!("{at}: {}", e.inner()));
        }
    };
    let Some(identity) = a.ids.login(&b.username, b.password.as_bytes()).await else {
        return a.failed(
            "login",
            Some(&b.username),
            peer,
            "the user name or password is wrong",
        );
    };
    let (cookie, evicted, held) = a.sessions().create(identity.clone(), Instant::now());
    a.metrics.sessions.set(held as i64);
    if evicted > 0 {
        a.metrics.sessions_evicted.inc_by(evicted as u64);
        tracing::warn!(
            evicted,
            sessions = held,
            "HTTP sessions full: the session idle the longest was logged out"
        );
    }
    tracing::info!(user = %identity.name, role = %identity.role, peer = %peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string()), "HTTP login");
    let ttl = a.sessions().ttl;
    let mut r =
        Json(json!({"name": identity.name, "role": identity.role.as_str()})).into_response();
    if let Ok(v) = HeaderValue::from_str(&set_cookie(&cookie, ttl, a.secure_cookies)) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn logout(State(a): State<Arc<HttpAuth>>, Caller(id): Caller, req: Request) -> Response {
    let ended = match req.extensions().get::<SessionKey>() {
        Some(key) => {
            let mut s = a.sessions();
            let ended = s.end(key);
            a.metrics.sessions.set(s.len() as i64);
            ended
        }
        None => false,
    };
    if ended {
        tracing::info!(user = %id.name, "HTTP logout");
    }
    let mut r = Json(json!({"logged_out": ended})).into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, HeaderValue::from_static(CLEAR_COOKIE));
    r
}

async fn whoami(Caller(id): Caller) -> Json<serde_json::Value> {
    let via = match id.via {
        Via::Password => "password",
        Via::Token => "token",
        Via::Session => "session",
        Via::Anonymous => "anonymous",
    };
    Json(json!({"name": id.name, "role": id.role.as_str(), "via": via}))
}

fn set_cookie(value: &str, ttl: Duration, secure: bool) -> String {
    format!(
        "{SESSION_COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
        ttl.as_secs().max(1),
        if secure { "; Secure" } else { "" }
    )
}

/// The value of the first `nexus_session` cookie.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            (name.trim() == SESSION_COOKIE).then(|| value.trim())
        })
}

/// True unless an `Origin` header names another scheme, host or port than the `Host` header
/// (no Origin: not a browser's cross-site request; `Origin: null` never matches).
pub fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let (Ok(origin), Some(Ok(host))) = (
        origin.to_str(),
        headers.get(header::HOST).map(|h| h.to_str()),
    ) else {
        return false;
    };
    origin_matches(origin, host)
}

/// Does `origin` (`scheme://host[:port]`) name the authority `host` (`host[:port]`)?
pub fn origin_matches(origin: &str, host: &str) -> bool {
    let (scheme, authority) = match origin.split_once("://") {
        Some((s, a)) if s.eq_ignore_ascii_case("http") => ("http", a),
        Some((s, a)) if s.eq_ignore_ascii_case("https") => ("https", a),
        _ => return false,
    };
    let default = if scheme == "http" { ":80" } else { ":443" };
    let norm = |a: &str| {
        let a = a.to_ascii_lowercase();
        match a.strip_suffix(default) {
            Some(stripped) => stripped.to_owned(),
            None => a,
        }
    };
    !authority.is_empty()
        && !authority.contains(['/', '?', '#', '@'])
        && norm(authority) == norm(host.trim())
}

/// Credentials of an `Authorization` header.
#[derive(Debug, PartialEq, Eq)]
pub enum Credentials<'a> {
    Basic { user: String, password: Vec<u8> },
    Bearer(&'a str),
}

/// Why an `Authorization` header is not credentials Nexus takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("longer than {MAX_AUTHORIZATION} bytes")]
    TooLong,
    #[error("use Basic or Bearer")]
    Scheme,
    #[error("Basic credentials are not base64 of user:password")]
    Basic,
    #[error("the bearer token is empty or holds characters a token cannot")]
    Bearer,
}

/// Parse an `Authorization` header value. Never panics, whatever the bytes.
pub fn parse_authorization(value: &[u8]) -> Result<Credentials<'_>, Malformed> {
    if value.len() > MAX_AUTHORIZATION {
        return Err(Malformed::TooLong);
    }
    let value = std::str::from_utf8(value).map_err(|_| Malformed::Scheme)?;
    let (scheme, rest) = value.trim().split_once(' ').ok_or(Malformed::Scheme)?;
    let rest = rest.trim_start_matches(' ');
    if scheme.eq_ignore_ascii_case("basic") {
        let raw = base64_decode(rest.trim_end()).ok_or(Malformed::Basic)?;
        let colon = raw
            .iter()
            .position(|b| *b == b':')
            .ok_or(Malformed::Basic)?;
        let user = std::str::from_utf8(&raw[..colon]).map_err(|_| Malformed::Basic)?;
        if user.is_empty() {
            return Err(Malformed::Basic);
        }
        Ok(Credentials::Basic {
            user: user.to_owned(),
            password: raw[colon + 1..].to_vec(),
        })
    } else if scheme.eq_ignore_ascii_case("bearer") {
        let token = rest.trim_end();
        // token68 (RFC 7235).
        let ok = !token.is_empty()
            && token.bytes().all(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/' | b'=')
            });
        if ok {
            Ok(Credentials::Bearer(token))
        } else {
            Err(Malformed::Bearer)
        }
    } else {
        Err(Malformed::Scheme)
    }
}

/// Standard base64 (RFC 4648 section 4), padding optional; `None` for anything else.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn sextet(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let bytes = s.as_bytes();
    let data = match bytes.iter().position(|b| *b == b'=') {
        Some(p) => {
            let pad = &bytes[p..];
            // At most two '=', only at the end, and only to complete a group of four.
            if pad.len() > 2 || pad.iter().any(|b| *b != b'=') || !bytes.len().is_multiple_of(4) {
                return None;
            }
            &bytes[..p]
        }
        None => bytes,
    };
    if data.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() * 3 / 4);
    for chunk in data.chunks(4) {
        let mut acc = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            acc |= sextet(*c)? << (18 - 6 * i);
        }
        let n = chunk.len() - 1;
        // Bits past the last whole byte must be zero (one encoding per byte string).
        let spare = acc & ((1 << (8 * (3 - n))) - 1);
        if spare != 0 {
            return None;
        }
        out.extend_from_slice(&acc.to_be_bytes()[1..1 + n]);
    }
    Some(out)
}

/// One login.
struct Session {
    identity: Identity,
    last_used: Instant,
    /// When the cookie was last sent with its Max-Age.
    cookie_sent: Instant,
}

/// The sessions of one port: at most `max`, least recently used first out, each ended after
/// `ttl` without use. Pure: time is passed in.
struct Sessions {
    map: BoundedMap<[u8; 32], Session>,
    ttl: Duration,
}

fn session_key(cookie: &str) -> [u8; 32] {
    Sha256::digest(cookie.as_bytes()).into()
}

impl Sessions {
    fn new(max: usize, ttl: Duration) -> Sessions {
        Sessions {
            map: BoundedMap::new(max),
            ttl,
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    /// A new session for `identity`: its cookie value, the sessions evicted for it and the
    /// sessions held now.
    fn create(&mut self, identity: Identity, now: Instant) -> (String, usize, usize) {
        use rand::RngCore;
        self.expire(now);
        let mut raw = [0u8; 32];
        rand::rng().fill_bytes(&mut raw);
        let cookie: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let session = Session {
            identity,
            last_used: now,
            cookie_sent: now,
        };
        let evicted = match self.map.insert(session_key(&cookie), session, 1) {
            Ok(stored) => stored.evicted.len(),
            // A weight of 1 in a map of at least 1 always finds room.
            Err(_) => 0,
        };
        (cookie, evicted, self.map.len())
    }

    /// Drop the sessions unused for `ttl`: they are the least recently used, at the old end.
    fn expire(&mut self, now: Instant) {
        let ttl = self.ttl;
        let old: Vec<[u8; 32]> = self
            .map
            .iter()
            .take_while(|(_, s)| now.saturating_duration_since(s.last_used) >= ttl)
            .map(|(k, _)| *k)
            .collect();
        for k in old {
            self.map.remove(&k);
        }
    }

    /// The identity of the session of `cookie`, now used again; its key; and whether the
    /// cookie should be sent again (more than a tenth of `ttl` since it last was).
    fn touch(&mut self, cookie: &str, now: Instant) -> Option<(Identity, SessionKey, bool)> {
        let key = session_key(cookie);
        let ttl = self.ttl;
        let s = self.map.get_mut(&key)?;
        if now.saturating_duration_since(s.last_used) >= ttl {
            self.map.remove(&key);
            return None;
        }
        s.last_used = now;
        let refresh = now.saturating_duration_since(s.cookie_sent) >= ttl / 10;
        if refresh {
            s.cookie_sent = now;
        }
        let mut id = s.identity.clone();
        id.via = Via::Session;
        Some((id, SessionKey(key), refresh))
    }

    fn end(&mut self, key: &SessionKey) -> bool {
        self.map.remove(&key.0).is_some()
    }
}

/// Admits [`LOG_BURST`] lines per [`LOG_WINDOW`]; counts the others.
#[derive(Default)]
struct LogLimit(Mutex<Option<(Instant, u32, u64)>>);

impl LogLimit {
    /// `Some(lines suppressed since the last one logged)` when a line may be logged now.
    fn admit(&self) -> Option<u64> {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let (start, n, suppressed) = g.get_or_insert((now, 0, 0));
        if now.duration_since(*start) >= LOG_WINDOW {
            *start = now;
            *n = 0;
        }
        if *n >= LOG_BURST {
            *suppressed += 1;
            return None;
        }
        *n += 1;
        Some(std::mem::take(suppressed))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn b64(raw: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in raw.chunks(3) {
            let n = u32::from(c[0]) << 16
                | u32::from(*c.get(1).unwrap_or(&0)) << 8
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..4 {
                if i <= c.len() {
                    out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn base64_of_rfc_4648_vectors() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_decode(enc).as_deref(), Some(raw.as_bytes()), "{enc}");
            assert_eq!(b64(raw.as_bytes()), enc);
        }
        // Unpadded is taken; the rest is not base64.
        assert_eq!(base64_decode("Zg").as_deref(), Some(&b"f"[..]));
        for bad in [
            "Z", "Zg=", "Zg===", "Z=g=", "Zh==", "Zm9v!", "Zm 9v", "=", "====",
        ] {
            assert_eq!(base64_decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn authorization_headers() {
        let basic = format!("Basic {}", b64(b"op:op-pw:with:colons"));
        assert_eq!(
            parse_authorization(basic.as_bytes()),
            Ok(Credentials::Basic {
                user: "op".into(),
                password: b"op-pw:with:colons".to_vec()
            })
        );
        let lower = format!("basic   {}  ", b64(b"op:"));
        assert_eq!(
            parse_authorization(lower.as_bytes()),
            Ok(Credentials::Basic {
                user: "op".into(),
                password: Vec::new()
            })
        );
        assert_eq!(
            parse_authorization(b"Bearer nxs_0123abcd"),
            Ok(Credentials::Bearer("nxs_0123abcd"))
        );
        assert_eq!(
            parse_authorization(b"BEARER a.b-c~d+e/f=="),
            Ok(Credentials::Bearer("a.b-c~d+e/f=="))
        );
        for (bad, why) in [
            (&b"Basic"[..], Malformed::Scheme),
            (b"Digest abc", Malformed::Scheme),
            (b"Basic !!!!", Malformed::Basic),
            (b"Basic b3A=", Malformed::Basic), // "op": no colon
            (b"Basic OnB3", Malformed::Basic), // ":pw": no user
            (b"Bearer ", Malformed::Scheme),
            (b"Bearer a b", Malformed::Bearer),
            (b"Bearer \xff", Malformed::Scheme),
        ] {
            assert_eq!(
                parse_authorization(bad),
                Err(why),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!("Bearer {}", "a".repeat(MAX_AUTHORIZATION));
        assert_eq!(
            parse_authorization(long.as_bytes()),
            Err(Malformed::TooLong)
        );
    }

    #[test]
    fn origins() {
        assert!(origin_matches("http://127.0.0.1:6000", "127.0.0.1:6000"));
        assert!(origin_matches("HTTP://Plant.Example", "plant.example:80"));
        assert!(origin_matches("https://plant.example:443", "plant.example"));
        assert!(!origin_matches("https://plant.example", "plant.example:80"));
        assert!(!origin_matches("http://evil.example", "plant.example"));
        assert!(!origin_matches("http://127.0.0.1:6001", "127.0.0.1:6000"));
        assert!(!origin_matches("null", "127.0.0.1:6000"));
        assert!(!origin_matches("http://a@127.0.0.1:6000", "127.0.0.1:6000"));
        assert!(!origin_matches("file://", ""));
        let mut h = HeaderMap::new();
        assert!(
            same_origin(&h),
            "no Origin: not a cross-site browser request"
        );
        h.insert(header::ORIGIN, "http://x:1".parse().unwrap());
        assert!(!same_origin(&h), "an Origin and no Host");
        h.insert(header::HOST, "x:1".parse().unwrap());
        assert!(same_origin(&h));
    }

    #[test]
    fn cookies() {
        let mut h = HeaderMap::new();
        assert_eq!(session_cookie(&h), None);
        h.append(
            header::COOKIE,
            "a=1; nexus_session=abc ; b=2".parse().unwrap(),
        );
        h.append(header::COOKIE, "nexus_session=def".parse().unwrap());
        assert_eq!(session_cookie(&h), Some("abc"));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "nexus_sessionx=1; xnexus_session=2".parse().unwrap(),
        );
        assert_eq!(session_cookie(&h), None);
    }

    fn op() -> Identity {
        Identity {
            name: "op".into(),
            role: Role::Operator,
            publish: Arc::from(Vec::new()),
            via: Via::Password,
        }
    }

    #[test]
    fn sessions_end_after_the_ttl_without_use() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(100);
        let mut s = Sessions::new(10, ttl);
        let (c, evicted, held) = s.create(op(), t0);
        assert_eq!((c.len(), evicted, held), (64, 0, 1));
        let (id, _, refresh) = s.touch(&c, t0 + Duration::from_secs(5)).unwrap();
        assert_eq!(
            (id.name.as_str(), id.via, refresh),
            ("op", Via::Session, false)
        );
        // Used at 99 s, so alive at 198 s: idle time counts, not age.
        assert!(
            s.touch(&c, t0 + Duration::from_secs(99)).unwrap().2,
            "cookie sent again"
        );
        assert!(s.touch(&c, t0 + Duration::from_secs(198)).is_some());
        assert!(s.touch(&c, t0 + Duration::from_secs(298)).is_none());
        assert_eq!(s.len(), 0, "an ended session is gone");
        assert!(s.touch("not-a-session", t0).is_none());
        // An expired session makes room: no live one is evicted for it.
        let mut one = Sessions::new(1, ttl);
        let (a, _, _) = one.create(op(), t0);
        let (b, evicted, held) = one.create(op(), t0 + ttl);
        assert_eq!((evicted, held), (0, 1));
        assert!(one.touch(&a, t0 + ttl).is_none());
        assert!(one.touch(&b, t0 + ttl).is_some());
    }

    #[test]
    fn a_full_store_logs_out_the_session_idle_the_longest() {
        let t0 = Instant::now();
        let mut s = Sessions::new(2, Duration::from_secs(3600));
        let (a, ..) = s.create(op(), t0);
        let (b, ..) = s.create(op(), t0);
        // `a` used again, so `b` is idle the longest.
        assert!(s.touch(&a, t0 + Duration::from_secs(1)).is_some());
        let (c, evicted, held) = s.create(op(), t0 + Duration::from_secs(2));
        assert_eq!((evicted, held), (1, 2));
        assert!(s.touch(&b, t0 + Duration::from_secs(3)).is_none());
        assert!(s.touch(&a, t0 + Duration::from_secs(3)).is_some());
        let (_, key, _) = s.touch(&c, t0 + Duration::from_secs(3)).unwrap();
        assert!(s.end(&key));
        assert!(!s.end(&key));
        assert_ne!(a, b);
    }

    #[test]
    fn refused_lines_are_counted_past_the_burst() {
        let l = LogLimit::default();
        for _ in 0..LOG_BURST {
            assert_eq!(l.admit(), Some(0));
        }
        assert_eq!(l.admit(), None);
        assert_eq!(l.admit(), None);
    }

    proptest! {
        #[test]
        fn any_header_parses_or_is_refused(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_authorization(&bytes);
        }

        #[test]
        fn any_text_after_a_scheme_parses_or_is_refused(
            scheme in "(Basic|basic|Bearer|bearer|Digest|)",
            spaces in " {0,3}",
            rest in any::<String>(),
        ) {
            let v = format!("{scheme}{spaces}{rest}");
            if let Ok(Credentials::Bearer(t)) = parse_authorization(v.as_bytes()) {
                prop_assert!(!t.is_empty() && !t.contains(' '));
            }
        }

        #[test]
        fn basic_round_trips(user in "[^:\\x00]{1,20}", password in proptest::collection::vec(any::<u8>(), 0..40)) {
            let mut raw = user.clone().into_bytes();
            raw.push(b':');
            raw.extend_from_slice(&password);
            let v = format!("Basic {}", b64(&raw));
            prop_assert_eq!(
                parse_authorization(v.as_bytes()),
                Ok(Credentials::Basic { user, password })
            );
        }

        #[test]
        fn base64_round_trips(raw in proptest::collection::vec(any::<u8>(), 0..64)) {
            let enc = b64(&raw);
            prop_assert_eq!(base64_decode(&enc), Some(raw.clone()));
            prop_assert_eq!(base64_decode(enc.trim_end_matches('=')), Some(raw));
        }

        #[test]
        fn any_text_decodes_or_is_refused(s in any::<String>()) {
            let _ = base64_decode(&s);
        }
    }
}
