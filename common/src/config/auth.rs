//! `auth`: who may use Nexus. One list of users and API tokens serves the MQTT broker and every
//! HTTP port alike; what each role may do is in docs/security.md.

use std::time::Duration;

use serde::Deserialize;

use super::types::{duration, Secret};
use super::Problems;
use crate::topic::TopicFilter;

/// `auth`: users, API tokens and anonymous access, for MQTT and HTTP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Users with a password and a role.
    pub users: Vec<UserConfig>,
    /// Bearer tokens for HTTP clients (scripts, Grafana), each with a role.
    pub tokens: Vec<TokenConfig>,
    /// Who may connect without credentials, as a read-only viewer: `off`, `loopback` (default:
    /// clients on this machine only) or `any`.
    pub anonymous: Anonymous,
    /// Who may read `/metrics`: `open` (default: Prometheus scrapes without credentials; no
    /// metric carries a secret) or `viewer` (the viewer role: a user, a token, or an anonymous
    /// client where `anonymous` lets one in).
    pub metrics: MetricsAccess,
    /// How long a web login lasts without use (default 8h).
    #[serde(with = "duration")]
    pub session_ttl: Duration,
    /// Most web logins held at once per HTTP port (default 1000); the oldest is logged out
    /// first, counted in `nexus_http_sessions_evicted_total`.
    pub max_sessions: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            users: Vec::new(),
            tokens: Vec::new(),
            anonymous: Anonymous::Loopback,
            metrics: MetricsAccess::Open,
            session_ttl: Duration::from_secs(8 * 3600),
            max_sessions: 1000,
        }
    }
}

/// Access without credentials. Anonymous clients are viewers: they read, never write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Anonymous {
    Off,
    Loopback,
    Any,
}

impl Anonymous {
    /// May a client from `peer` go without credentials?
    pub fn allows(self, peer: Option<std::net::IpAddr>) -> bool {
        match self {
            Anonymous::Off => false,
            Anonymous::Any => true,
            Anonymous::Loopback => peer.is_some_and(|ip| match ip {
                std::net::IpAddr::V4(v4) => v4.is_loopback(),
                std::net::IpAddr::V6(v6) => {
                    v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
                }
            }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricsAccess {
    Open,
    Viewer,
}

/// What a user may do (docs/security.md has the full table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read the namespace and every read API; write nothing.
    Viewer,
    /// A viewer that may also publish UNS data under its `publish` topic filters.
    Publisher,
    /// A viewer that may also write to devices (commands) and act on alarms.
    Operator,
    /// An operator that may also change devices and configuration.
    Admin,
    /// Nexus's own services: everything, and the only role that may publish a configured
    /// device's values, `$nexus` system topics, use `nexus-` client ids and `$share/nexus-*`.
    Service,
}

impl Role {
    /// Does this role include everything `needed` may do?
    pub fn includes(self, needed: Role) -> bool {
        use Role::*;
        matches!(
            (self, needed),
            (Service, _)
                | (Admin, Viewer | Operator | Admin)
                | (Operator, Viewer | Operator)
                | (Publisher, Viewer | Publisher)
                | (Viewer, Viewer)
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Publisher => "publisher",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Service => "service",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One user. The password is an argon2 hash (`nexus auth hash-password` makes one) or comes
/// from an environment variable; a plain password in the file is refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub username: String,
    /// An argon2 hash in PHC form (`$argon2id$v=19$...`).
    #[serde(default)]
    pub password_hash: Option<Secret>,
    /// Name of an environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Refused in a file; present only to say what to do instead.
    #[doc(hidden)]
    #[serde(default, rename = "password")]
    pub plain_password: Option<Secret>,
    /// The password itself, set by code only: the generated service account of `nexus up`,
    /// the demo login and tests. Never read from a file.
    #[serde(skip)]
    pub password: Option<Secret>,
    #[serde(default = "default_role")]
    pub role: Role,
    /// Topic filters a `publisher` may publish to (required for that role, refused for others).
    #[serde(default)]
    pub publish: Vec<String>,
}

impl UserConfig {
    /// A user whose password is set in code (never from a file).
    pub fn with_password(username: &str, password: &str, role: Role) -> UserConfig {
        UserConfig {
            username: username.to_owned(),
            password_hash: None,
            password_env: None,
            plain_password: None,
            password: Some(Secret::new(password)),
            role,
            publish: Vec::new(),
        }
    }
}

fn default_role() -> Role {
    Role::Viewer
}

/// One API token: HTTP clients send it as `Authorization: Bearer <token>`. The file holds its
/// SHA-256 (`nexus auth new-token` makes a token and prints both) or an environment variable
/// holds the token itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who uses it (shown in logs and the audit as `token:<name>`).
    pub name: String,
    /// Hex SHA-256 of the token.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Name of an environment variable holding the token.
    #[serde(default)]
    pub token_env: Option<String>,
    #[serde(default = "default_role")]
    pub role: Role,
}

/// The smallest token length accepted from the environment: a token is a random secret, not a
/// password a person remembers, and is checked with one SHA-256.
pub const MIN_TOKEN_LEN: usize = 32;

impl AuthConfig {
    pub(crate) fn validate(&self, p: &mut Problems) {
        let mut names = std::collections::HashSet::new();
        for (i, u) in self.users.iter().enumerate() {
            let at = format!("auth.users[{i}]");
            if u.username.is_empty() {
                p.push(format!("{at}.username"), "username is empty");
            } else if u.username.chars().any(|c| c.is_control() || c == ':') {
                p.push(
                    format!("{at}.username"),
                    "a username may not hold ':' or control characters",
                );
            } else if u.username == "anonymous" {
                p.push(
                    format!("{at}.username"),
                    "\"anonymous\" names clients without credentials; choose another name",
                );
            }
            if !names.insert(u.username.as_str()) {
                p.push(
                    format!("{at}.username"),
                    format!("user {:?} is listed twice", u.username),
                );
            }
            if u.plain_password.is_some() {
                p.push(
                    format!("{at}.password"),
                    "plain passwords are not accepted in the file: put an argon2 hash in \
                     password_hash (`nexus auth hash-password` prints one) or name an \
                     environment variable in password_env",
                );
            }
            let given = [
                u.password_hash.is_some(),
                u.password_env.is_some(),
                u.password.is_some(),
            ]
            .iter()
            .filter(|g| **g)
            .count();
            if given == 0 && u.plain_password.is_none() {
                p.push(
                    at.clone(),
                    format!("user {:?} needs password_hash or password_env", u.username),
                );
            } else if given > 1 {
                p.push(
                    at.clone(),
                    format!(
                        "user {:?}: give password_hash or password_env, not both",
                        u.username
                    ),
                );
            }
            if let Some(h) = &u.password_hash {
                if let Err(e) = crate::auth::check_hash(h.expose()) {
                    p.push(format!("{at}.password_hash"), e);
                }
            }
            match (u.role, u.publish.is_empty()) {
                (Role::Publisher, true) => p.push(
                    format!("{at}.publish"),
                    "a publisher needs the topic filters it may publish to",
                ),
                (Role::Publisher, false) => {}
                (role, false) => p.push(
                    format!("{at}.publish"),
                    format!("only the publisher role takes publish filters (this user is {role})"),
                ),
                _ => {}
            }
            for (j, f) in u.publish.iter().enumerate() {
                if f.starts_with('$') {
                    p.push(
                        format!("{at}.publish[{j}]"),
                        "a publisher may not publish $ topics",
                    );
                } else if let Err(e) = TopicFilter::parse(f) {
                    p.push(format!("{at}.publish[{j}]"), e.to_string());
                }
            }
        }
        let mut tokens = std::collections::HashSet::new();
        for (i, t) in self.tokens.iter().enumerate() {
            let at = format!("auth.tokens[{i}]");
            if t.name.is_empty() {
                p.push(format!("{at}.name"), "name is empty");
            }
            if !tokens.insert(t.name.as_str()) {
                p.push(
                    format!("{at}.name"),
                    format!("token {:?} is listed twice", t.name),
                );
            }
            match (&t.sha256, &t.token_env) {
                (None, None) => p.push(at.clone(), "give sha256 or token_env"),
                (Some(_), Some(_)) => p.push(at.clone(), "give sha256 or token_env, not both"),
                (Some(h), None) => {
                    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                        p.push(
                            format!("{at}.sha256"),
                            "must be 64 hex digits (`nexus auth new-token` prints it)",
                        );
                    }
                }
                (None, Some(_)) => {}
            }
            if t.role == Role::Service {
                p.push(
                    format!("{at}.role"),
                    "the service role belongs to Nexus's own services, not to tokens",
                );
            }
        }
        if self.max_sessions == 0 {
            p.push("auth.max_sessions", "must be at least 1");
        }
        if self.session_ttl.is_zero() {
            p.push("auth.session_ttl", "must be longer than 0s");
        }
    }
}
