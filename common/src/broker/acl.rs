//! Authentication and access control of the embedded broker, as plain logic (no I/O) so every
//! rule is unit-tested. The rmqtt hooks in [`super`] call into it.
//!
//! Order of rules: the configured `broker.acl` rules first (first match wins), then the
//! built-in ones:
//! 1. operators may publish `$nexus/cmd/+/write`, `$nexus/cmd/+/+/set` and `$nexus/alarms/ack`;
//! 2. nobody else (but service and admin users, who bypass the ACL) may publish any other
//!    `$nexus/...` topic, commands included;
//! 3. everything else is allowed.

use std::collections::HashMap;

use crate::config::{AclAction, AclPermission, AclRule, BrokerConfig, Role};
use crate::topic::filter_matches;

/// Result of a CONNECT's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthDecision {
    Allow { superuser: bool },
    BadCredentials,
    NotAuthorized,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Publish,
    Subscribe,
}

struct User {
    password: String,
    role: Role,
}

/// Users and rules, resolved at start (passwords from `password_env` read then).
pub struct Acl {
    users: HashMap<String, User>,
    rules: Vec<AclRule>,
    allow_anonymous: bool,
    anonymous_role: Role,
}

#[derive(Debug, thiserror::Error)]
#[error("broker user {user}: environment variable {var} is not set")]
pub struct MissingPassword {
    pub user: String,
    pub var: String,
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Do the filters `a` and `b` have a topic in common?
fn filters_intersect(a: &str, b: &str) -> bool {
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some(l), Some(r)) if l == "+" || r == "+" || l == r => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl Acl {
    pub fn new(cfg: &BrokerConfig) -> Result<Acl, MissingPassword> {
        Self::with_env(cfg, |k| std::env::var(k).ok())
    }

    pub fn with_env(
        cfg: &BrokerConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Acl, MissingPassword> {
        let mut users = HashMap::new();
        for u in &cfg.users {
            let password = match (&u.password, &u.password_env) {
                (Some(p), _) => p.expose().to_owned(),
                (None, Some(var)) => env(var).ok_or_else(|| MissingPassword {
                    user: u.username.clone(),
                    var: var.clone(),
                })?,
                (None, None) => String::new(),
            };
            users.insert(
                u.username.clone(),
                User {
                    password,
                    role: u.role,
                },
            );
        }
        Ok(Acl {
            users,
            rules: cfg.acl.clone(),
            allow_anonymous: cfg.allow_anonymous,
            anonymous_role: cfg.anonymous_role,
        })
    }

    /// Add a user at start (the internal service account of `nexus up`).
    pub fn add_user(&mut self, username: &str, password: &str, role: Role) {
        self.users.insert(
            username.to_owned(),
            User {
                password: password.to_owned(),
                role,
            },
        );
    }

    pub fn authenticate(&self, username: Option<&str>, password: Option<&[u8]>) -> AuthDecision {
        let Some(name) = username else {
            return if self.allow_anonymous {
                AuthDecision::Allow { superuser: false }
            } else {
                AuthDecision::NotAuthorized
            };
        };
        match self.users.get(name) {
            Some(u) if constant_time_eq(u.password.as_bytes(), password.unwrap_or_default()) => {
                AuthDecision::Allow {
                    superuser: matches!(u.role, Role::Service | Role::Admin),
                }
            }
            _ => AuthDecision::BadCredentials,
        }
    }

    pub fn role_of(&self, username: Option<&str>) -> Role {
        username
            .and_then(|n| self.users.get(n))
            .map_or(self.anonymous_role, |u| u.role)
    }

    /// May this client publish to / subscribe to `topic`? `Err` carries the reason.
    pub fn check(&self, username: Option<&str>, action: Action, topic: &str) -> Result<(), String> {
        let role = self.role_of(username);
        if matches!(role, Role::Service | Role::Admin) {
            return Ok(());
        }
        for (i, r) in self.rules.iter().enumerate() {
            let applies_to_client = (r.users.is_empty() && r.roles.is_empty())
                || username.is_some_and(|n| r.users.iter().any(|u| u == n))
                || r.roles.contains(&role);
            let applies_to_action = matches!(
                (r.action, action),
                (AclAction::All, _)
                    | (AclAction::Publish, Action::Publish)
                    | (AclAction::Subscribe, Action::Subscribe)
            );
            if !applies_to_client || !applies_to_action {
                continue;
            }
            // Publish: the topic falls under the rule. Subscribe: an allow rule must cover the
            // whole filter; a deny rule applies as soon as the filter reaches into it.
            let hit = match (action, r.permission) {
                (Action::Publish, _) => filter_matches(&r.topic, topic),
                (Action::Subscribe, AclPermission::Allow) => filter_matches(&r.topic, topic),
                (Action::Subscribe, AclPermission::Deny) => filters_intersect(&r.topic, topic),
            };
            if hit {
                return match r.permission {
                    AclPermission::Allow => Ok(()),
                    AclPermission::Deny => Err(format!("denied by broker.acl[{i}] ({})", r.topic)),
                };
            }
        }
        if action == Action::Publish && topic.starts_with('$') {
            let operator_topic = crate::topic::sys::OPERATOR_PUBLISH
                .iter()
                .any(|f| filter_matches(f, topic));
            if operator_topic && role == Role::Operator {
                return Ok(());
            }
            return Err(if operator_topic {
                format!("publishing {topic} needs the operator role")
            } else {
                format!("{topic} is a system topic; only Nexus services may publish it")
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BrokerUser, Secret};

    fn cfg() -> BrokerConfig {
        let user = |n: &str, p: &str, role| BrokerUser {
            username: n.into(),
            password: Some(Secret::new(p)),
            password_env: None,
            role,
        };
        BrokerConfig {
            users: vec![
                user("op", "op-pass", Role::Operator),
                user("view", "view-pass", Role::Viewer),
                user("svc", "svc-pass", Role::Service),
                BrokerUser {
                    username: "env".into(),
                    password: None,
                    password_env: Some("OP_PW".into()),
                    role: Role::Operator,
                },
            ],
            ..BrokerConfig::default()
        }
    }

    #[test]
    fn authentication() {
        let acl = Acl::with_env(&cfg(), |k| (k == "OP_PW").then(|| "from-env".to_owned())).unwrap();
        assert_eq!(
            acl.authenticate(Some("op"), Some(b"op-pass")),
            AuthDecision::Allow { superuser: false }
        );
        assert_eq!(
            acl.authenticate(Some("svc"), Some(b"svc-pass")),
            AuthDecision::Allow { superuser: true }
        );
        assert_eq!(
            acl.authenticate(Some("op"), Some(b"wrong")),
            AuthDecision::BadCredentials
        );
        assert_eq!(
            acl.authenticate(Some("op"), None),
            AuthDecision::BadCredentials
        );
        assert_eq!(
            acl.authenticate(Some("ghost"), Some(b"x")),
            AuthDecision::BadCredentials
        );
        assert_eq!(
            acl.authenticate(Some("env"), Some(b"from-env")),
            AuthDecision::Allow { superuser: false }
        );
        assert_eq!(
            acl.authenticate(None, None),
            AuthDecision::Allow { superuser: false }
        );
        let closed = Acl::new(&BrokerConfig {
            allow_anonymous: false,
            ..cfg()
        });
        assert!(closed.is_err(), "OP_PW is not set in the test environment");
        let e = closed.err().unwrap().to_string();
        assert!(
            e.contains("broker user env: environment variable OP_PW is not set"),
            "{e}"
        );
    }

    #[test]
    fn only_operators_command() {
        let acl = Acl::with_env(&cfg(), |_| Some("x".into())).unwrap();
        let cmd = "$nexus/cmd/plc-1/write";
        assert!(acl.check(Some("op"), Action::Publish, cmd).is_ok());
        assert!(acl
            .check(Some("op"), Action::Publish, "$nexus/cmd/plc-1/setpoint/set")
            .is_ok());
        assert!(acl
            .check(Some("op"), Action::Publish, "$nexus/alarms/ack")
            .is_ok());
        assert!(acl
            .check(Some("view"), Action::Publish, cmd)
            .unwrap_err()
            .contains("needs the operator role"));
        assert!(
            acl.check(None, Action::Publish, cmd).is_err(),
            "anonymous is a viewer"
        );
        assert!(acl.check(Some("svc"), Action::Publish, cmd).is_ok());
        assert!(acl
            .check(Some("op"), Action::Publish, "$nexus/status/device/x")
            .unwrap_err()
            .contains("only Nexus services"));
        assert!(acl
            .check(Some("op"), Action::Publish, "$nexus/cmd/response/plc-1/t")
            .is_err());
        assert!(acl
            .check(None, Action::Publish, "acme/site/line/dev/tag")
            .is_ok());
        assert!(acl.check(None, Action::Subscribe, "#").is_ok());
        assert!(acl.check(None, Action::Subscribe, "$nexus/#").is_ok());
    }

    #[test]
    fn configured_rules_come_first() {
        let mut c = cfg();
        c.acl = vec![
            AclRule {
                permission: AclPermission::Deny,
                action: AclAction::Subscribe,
                topic: "secret/#".into(),
                users: vec![],
                roles: vec![Role::Viewer],
            },
            AclRule {
                permission: AclPermission::Allow,
                action: AclAction::Publish,
                topic: "$nexus/cmd/#".into(),
                users: vec!["view".into()],
                roles: vec![],
            },
            AclRule {
                permission: AclPermission::Deny,
                action: AclAction::Publish,
                topic: "$nexus/cmd/reactor/#".into(),
                users: vec![],
                roles: vec![Role::Operator],
            },
        ];
        let acl = Acl::with_env(&c, |_| Some("x".into())).unwrap();
        assert!(acl
            .check(Some("view"), Action::Subscribe, "secret/a")
            .is_err());
        assert!(
            acl.check(Some("view"), Action::Subscribe, "#")
                .unwrap_err()
                .contains("broker.acl[0]"),
            "# reaches into secret/#"
        );
        assert!(acl
            .check(Some("view"), Action::Subscribe, "public/#")
            .is_ok());
        assert!(
            acl.check(Some("view"), Action::Publish, "$nexus/cmd/plc/write")
                .is_ok(),
            "allowed by rule 1"
        );
        assert!(acl
            .check(Some("op"), Action::Publish, "$nexus/cmd/reactor/write")
            .is_err());
        assert!(acl
            .check(Some("op"), Action::Publish, "$nexus/cmd/pump/write")
            .is_ok());
    }

    #[test]
    fn intersection() {
        assert!(filters_intersect("#", "secret/x"));
        assert!(filters_intersect("+/x", "secret/+"));
        assert!(!filters_intersect("public/#", "secret/#"));
        assert!(!filters_intersect("a/b", "a/b/c"));
    }
}
