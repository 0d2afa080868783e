//! Who may connect to the embedded broker and what each client may publish and subscribe to,
//! as plain logic (no I/O) so every rule is unit-tested. The rmqtt hooks in [`super`] call into
//! it. docs/security.md has the same rules as a table.
//!
//! Connecting: a user name and password from `auth.users`, or no user name from where
//! `auth.anonymous` allows it (a read-only viewer). A client id starting with `nexus-` and a
//! last will to a topic the client may not publish are refused at CONNECT.
//!
//! Publishing and subscribing, in this order:
//! 1. the service role may do everything;
//! 2. reserved for the service role, whatever `broker.acl` says: publishing under a configured
//!    device's UNS prefix, publishing `$nexus/...` other than the operator's topics, joining a
//!    `$share/nexus-*` group;
//! 3. the `broker.acl` rules, first match wins;
//! 4. each role's defaults: everyone may subscribe to anything; operators and admins may
//!    publish write commands, alarm acknowledgements, and Sparkplug B commands and host state
//!    (NCMD, DCMD, STATE); a publisher may publish under its `publish` filters; nothing else
//!    may be published.

use std::net::IpAddr;
use std::sync::Arc;

use crate::auth::{Identities, Identity};
use crate::config::{AclAction, AclPermission, AclRule, BrokerConfig, DeviceConfig, Role};
use crate::topic::{filter_matches, sys};

/// Client ids that only Nexus's services may use.
pub const RESERVED_CLIENT_ID_PREFIX: &str = "nexus-";
/// Shared-subscription groups that only Nexus's services may join (`$share/nexus-ingest/...`).
pub const RESERVED_SHARE_PREFIX: &str = "$share/nexus-";

/// Result of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthDecision {
    Allow(Identity),
    /// Unknown user or wrong password.
    BadCredentials,
    /// No credentials where they are required, or a reserved client id, or a will the client
    /// may not publish; the reason is logged, never sent.
    NotAuthorized(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Publish,
    Subscribe,
}

/// What a CONNECT carries that the broker checks.
#[derive(Debug, Clone, Copy)]
pub struct Connect<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    pub peer: Option<IpAddr>,
    pub will_topic: Option<&'a str>,
}

/// `<uns_prefix>/<device id>/#` of every configured device: kept current when the device
/// list is reloaded ([`DeviceNamespaces::set`]), so a device added at runtime is reserved
/// for the gateway at once.
#[derive(Clone, Default)]
pub struct DeviceNamespaces(Arc<std::sync::RwLock<Arc<Vec<String>>>>);

impl DeviceNamespaces {
    pub fn set(&self, devices: &[DeviceConfig]) {
        let filters: Vec<String> = devices
            .iter()
            .map(|d| format!("{}/{}/#", d.uns_prefix, d.id))
            .collect();
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(filters);
    }

    fn get(&self) -> Arc<Vec<String>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Identities, rules and the UNS prefixes of the configured devices.
pub struct Acl {
    ids: Arc<Identities>,
    rules: Vec<AclRule>,
    device_filters: DeviceNamespaces,
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

/// `$share/<group>/<filter>` -> (`Some(group)`, filter); a plain filter -> (None, filter).
fn split_share(filter: &str) -> (Option<&str>, &str) {
    match filter.strip_prefix("$share/") {
        Some(rest) => match rest.split_once('/') {
            Some((group, f)) => (Some(group), f),
            None => (Some(rest), ""),
        },
        None => (None, filter),
    }
}

impl Acl {
    pub fn new(ids: Arc<Identities>, cfg: &BrokerConfig, devices: &[DeviceConfig]) -> Acl {
        let device_filters = DeviceNamespaces::default();
        device_filters.set(devices);
        Acl {
            ids,
            rules: cfg.acl.clone(),
            device_filters,
        }
    }

    /// The device namespaces this ACL reserves, to update when the device list changes.
    pub fn device_namespaces(&self) -> DeviceNamespaces {
        self.device_filters.clone()
    }

    pub fn identities(&self) -> &Arc<Identities> {
        &self.ids
    }

    /// The identity of a client from the user name it authenticated with. A name this
    /// configuration does not list (a service reading another's stamp) is a viewer by that
    /// name, so rules naming it still apply.
    pub fn identity(&self, username: Option<&str>) -> Identity {
        match username {
            None | Some("anonymous") => Identity::anonymous(),
            Some(n) => self.ids.user(n).unwrap_or_else(|| Identity {
                name: n.to_owned(),
                via: crate::auth::Via::Password,
                ..Identity::anonymous()
            }),
        }
    }

    pub async fn authenticate(&self, c: Connect<'_>) -> AuthDecision {
        let who = match c.username {
            Some(name) => match self.ids.login(name, c.password.unwrap_or_default()).await {
                Some(id) => id,
                None => return AuthDecision::BadCredentials,
            },
            None => match self.ids.anonymous(c.peer) {
                Some(id) => id,
                None => {
                    return AuthDecision::NotAuthorized(format!(
                        "anonymous access is {} (auth.anonymous)",
                        match self.ids.anonymous_policy() {
                            crate::config::Anonymous::Off => "off",
                            _ => "only from this machine",
                        }
                    ))
                }
            },
        };
        if c.client_id.starts_with(RESERVED_CLIENT_ID_PREFIX) && who.role != Role::Service {
            return AuthDecision::NotAuthorized(format!(
                "client ids starting with {RESERVED_CLIENT_ID_PREFIX} are reserved for Nexus's services"
            ));
        }
        if let Some(will) = c.will_topic {
            if let Err(reason) = self.check(&who, Action::Publish, will) {
                return AuthDecision::NotAuthorized(format!("last will to {will}: {reason}"));
            }
        }
        AuthDecision::Allow(who)
    }

    /// May `who` publish to / subscribe to `topic`? `Err` carries the reason.
    pub fn check(&self, who: &Identity, action: Action, topic: &str) -> Result<(), String> {
        if who.role == Role::Service {
            return Ok(());
        }
        let (group, filter) = match action {
            Action::Subscribe => split_share(topic),
            Action::Publish => (None, topic),
        };
        if let Some(group) = group {
            if topic.starts_with(RESERVED_SHARE_PREFIX) {
                return Err(format!(
                    "shared group {group} is reserved for Nexus's services"
                ));
            }
            if filter.is_empty() {
                return Err("a shared subscription needs a filter after its group".into());
            }
        }
        if action == Action::Publish {
            if let Some(dev) = self
                .device_filters
                .get()
                .iter()
                .find(|f| filter_matches(f, filter))
            {
                return Err(format!(
                    "{topic} is under a configured device ({}); only the gateway publishes there",
                    dev.trim_end_matches("/#")
                ));
            }
            let operator_topic = sys::OPERATOR_PUBLISH
                .iter()
                .any(|f| filter_matches(f, filter));
            if filter.starts_with('$') && !operator_topic {
                return Err(format!(
                    "{topic} is a system topic; only Nexus services may publish it"
                ));
            }
        }
        for (i, r) in self.rules.iter().enumerate() {
            let applies_to_client = (r.users.is_empty() && r.roles.is_empty())
                || r.users.contains(&who.name)
                || r.roles.contains(&who.role);
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
                (Action::Publish, _) | (Action::Subscribe, AclPermission::Allow) => {
                    filter_matches(&r.topic, filter)
                }
                (Action::Subscribe, AclPermission::Deny) => filters_intersect(&r.topic, filter),
            };
            if hit {
                return match r.permission {
                    AclPermission::Allow => Ok(()),
                    AclPermission::Deny => Err(format!("denied by broker.acl[{i}] ({})", r.topic)),
                };
            }
        }
        match action {
            Action::Subscribe => Ok(()),
            Action::Publish => {
                if filter.starts_with('$') {
                    return if who.role.includes(Role::Operator) {
                        Ok(())
                    } else {
                        Err(format!("publishing {topic} needs the operator role"))
                    };
                }
                if who.role.includes(Role::Operator)
                    && sys::OPERATOR_SPARKPLUG
                        .iter()
                        .any(|f| filter_matches(f, filter))
                {
                    return Ok(());
                }
                if who.role == Role::Publisher
                    && who.publish.iter().any(|f| filter_matches(f, filter))
                {
                    return Ok(());
                }
                Err(match who.role {
                    Role::Publisher => format!("{topic} is outside this publisher's topics"),
                    role => format!(
                        "{role}s may not publish data; grant the publisher role with topics (auth.users[].publish)"
                    ),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AuthConfig, UserConfig};

    fn device(id: &str, prefix: &str) -> DeviceConfig {
        let yaml = format!(
            "devices:\n  - id: {id}\n    protocol: modbus\n    uns_prefix: {prefix}\n    connection: {{ host: 127.0.0.1 }}\n    tags:\n      - {{ id: t, address: \"HR:1\", data_type: int16 }}\n"
        );
        let mut cfg = crate::config::Config::from_str_with_env(&yaml, None, &[]).expect("device");
        cfg.devices.remove(0)
    }

    fn acl(rules: Vec<AclRule>) -> Acl {
        let user = UserConfig::with_password;
        let auth = AuthConfig {
            users: vec![
                user("op", "op-pass", Role::Operator),
                user("view", "view-pass", Role::Viewer),
                user("admin", "admin-pass", Role::Admin),
                user("svc", "svc-pass", Role::Service),
                UserConfig {
                    publish: vec!["acme/erp/#".into(), "acme/plant/#".into()],
                    ..user("bridge", "bridge-pass", Role::Publisher)
                },
            ],
            ..AuthConfig::default()
        };
        let ids = Arc::new(Identities::with_env(&auth, |_| None).expect("identities"));
        let broker = BrokerConfig {
            acl: rules,
            ..BrokerConfig::default()
        };
        Acl::new(
            ids,
            &broker,
            &[device("plc-1", "acme/plant/packaging/line-1")],
        )
    }

    fn connect<'a>(user: Option<&'a str>, pass: &'a [u8], peer: &str) -> Connect<'a> {
        Connect {
            client_id: "client-1",
            username: user,
            password: Some(pass),
            peer: peer.parse().ok(),
            will_topic: None,
        }
    }

    #[tokio::test]
    async fn connecting() {
        let acl = acl(vec![]);
        assert!(matches!(
            acl.authenticate(connect(Some("op"), b"op-pass", "10.0.0.9"))
                .await,
            AuthDecision::Allow(Identity {
                role: Role::Operator,
                ..
            })
        ));
        assert_eq!(
            acl.authenticate(connect(Some("op"), b"wrong", "127.0.0.1"))
                .await,
            AuthDecision::BadCredentials
        );
        assert!(matches!(
            acl.authenticate(connect(None, b"", "127.0.0.1")).await,
            AuthDecision::Allow(Identity {
                role: Role::Viewer,
                ..
            })
        ));
        let AuthDecision::NotAuthorized(why) =
            acl.authenticate(connect(None, b"", "10.0.0.9")).await
        else {
            panic!("anonymous from the network must be refused by default")
        };
        assert!(why.contains("only from this machine"), "{why}");
        let reserved = Connect {
            client_id: "nexus-ingestion-local",
            ..connect(Some("op"), b"op-pass", "127.0.0.1")
        };
        let AuthDecision::NotAuthorized(why) = acl.authenticate(reserved).await else {
            panic!("a reserved client id must be refused")
        };
        assert!(why.contains("reserved"), "{why}");
        let svc = Connect {
            client_id: "nexus-ingestion-local",
            ..connect(Some("svc"), b"svc-pass", "127.0.0.1")
        };
        assert!(matches!(
            acl.authenticate(svc).await,
            AuthDecision::Allow(_)
        ));
        let will = Connect {
            will_topic: Some("acme/plant/packaging/line-1/plc-1/temperature"),
            ..connect(None, b"", "127.0.0.1")
        };
        let AuthDecision::NotAuthorized(why) = acl.authenticate(will).await else {
            panic!("a will to a device topic must be refused")
        };
        assert!(why.contains("configured device"), "{why}");
    }

    fn who(acl: &Acl, name: Option<&str>) -> Identity {
        acl.identity(name)
    }

    #[test]
    fn publishing() {
        let acl = acl(vec![]);
        let (op, view, admin, svc, bridge, anon) = (
            who(&acl, Some("op")),
            who(&acl, Some("view")),
            who(&acl, Some("admin")),
            who(&acl, Some("svc")),
            who(&acl, Some("bridge")),
            who(&acl, None),
        );
        let pubs = |w: &Identity, t: &str| acl.check(w, Action::Publish, t);
        let cmd = "$nexus/cmd/plc-1/write";
        assert!(pubs(&op, cmd).is_ok());
        assert!(pubs(&op, "$nexus/cmd/plc-1/setpoint/set").is_ok());
        assert!(pubs(&op, "$nexus/alarms/ack").is_ok());
        // Sparkplug host application: commands and state, not data.
        for t in [
            "spBv1.0/g/NCMD/edge",
            "spBv1.0/g/DCMD/edge/plc-1",
            "spBv1.0/STATE/scada",
        ] {
            assert!(pubs(&op, t).is_ok(), "{t}");
            assert!(pubs(&admin, t).is_ok(), "{t}");
            assert!(pubs(&view, t).is_err(), "{t}");
            assert!(pubs(&anon, t).is_err(), "{t}");
        }
        assert!(pubs(&op, "spBv1.0/g/DDATA/edge/plc-1").is_err());
        assert!(pubs(&op, "spBv1.0/g/NBIRTH/edge").is_err());
        assert!(
            pubs(&op, "spBv1.0/g/DCMD/edge").is_err(),
            "a DCMD names a device"
        );
        assert!(pubs(&admin, cmd).is_ok());
        assert!(pubs(&view, cmd)
            .unwrap_err()
            .contains("needs the operator role"));
        assert!(pubs(&anon, cmd).is_err());
        assert!(pubs(&op, "$nexus/status/device/x")
            .unwrap_err()
            .contains("only Nexus services"));
        assert!(pubs(&op, "$nexus/cmd/response/plc-1/t").is_err());
        // Data: only publishers, only under their filters, never a device's values.
        let device_topic = "acme/plant/packaging/line-1/plc-1/temperature";
        for w in [&anon, &view, &op, &admin] {
            assert!(pubs(w, "acme/erp/orders").is_err(), "{}", w.name);
            assert!(pubs(w, device_topic).is_err(), "{}", w.name);
        }
        assert!(pubs(&bridge, "acme/erp/orders").is_ok());
        assert!(pubs(&bridge, "acme/plant/packaging/line-1/scale/weight").is_ok());
        assert!(pubs(&bridge, device_topic)
            .unwrap_err()
            .contains("only the gateway publishes there"));
        assert!(pubs(&bridge, "other/x")
            .unwrap_err()
            .contains("outside this publisher's topics"));
        assert!(pubs(&svc, device_topic).is_ok());
        assert!(pubs(&svc, "$nexus/status/device/x").is_ok());

        // A device added at runtime (the control center, a reloaded devices file) is
        // reserved at once; one removed is released.
        let added = "acme/plant/packaging/line-1/scale/weight";
        acl.device_namespaces().set(&[
            device("plc-1", "acme/plant/packaging/line-1"),
            device("scale", "acme/plant/packaging/line-1"),
        ]);
        assert!(pubs(&bridge, added)
            .unwrap_err()
            .contains("only the gateway publishes there"));
        acl.device_namespaces()
            .set(&[device("scale", "acme/plant/packaging/line-1")]);
        assert!(pubs(&bridge, device_topic).is_ok());
    }

    #[test]
    fn subscribing() {
        let acl = acl(vec![]);
        let view = who(&acl, Some("view"));
        let anon = who(&acl, None);
        let svc = who(&acl, Some("svc"));
        let subs = |w: &Identity, t: &str| acl.check(w, Action::Subscribe, t);
        assert!(subs(&anon, "#").is_ok());
        assert!(subs(&anon, "$nexus/#").is_ok());
        assert!(subs(&view, "$share/dashboards/acme/#").is_ok());
        assert!(subs(&anon, "$share/nexus-ingest/#")
            .unwrap_err()
            .contains("reserved"));
        assert!(subs(&view, "$share/nexus-x/a").is_err());
        assert!(subs(&view, "$share/lonely").is_err());
        assert!(subs(&svc, "$share/nexus-ingest/#").is_ok());
    }

    #[test]
    fn configured_rules_come_after_the_reserved_ones() {
        let rule = |permission, action, topic: &str, users: &[&str], roles: Vec<Role>| AclRule {
            permission,
            action,
            topic: topic.into(),
            users: users.iter().map(|u| (*u).to_owned()).collect(),
            roles,
        };
        use AclAction::*;
        use AclPermission::*;
        let acl = acl(vec![
            rule(Deny, Subscribe, "secret/#", &[], vec![Role::Viewer]),
            rule(Allow, Publish, "$nexus/cmd/#", &["view"], vec![]),
            rule(
                Deny,
                Publish,
                "$nexus/cmd/reactor/#",
                &[],
                vec![Role::Operator],
            ),
            rule(Allow, Publish, "#", &["view"], vec![]),
        ]);
        let view = who(&acl, Some("view"));
        let op = who(&acl, Some("op"));
        assert!(acl.check(&view, Action::Subscribe, "secret/a").is_err());
        assert!(
            acl.check(&view, Action::Subscribe, "#")
                .unwrap_err()
                .contains("broker.acl[0]"),
            "# reaches into secret/#"
        );
        assert!(acl
            .check(&view, Action::Subscribe, "$share/g/secret/x")
            .is_err());
        assert!(acl.check(&view, Action::Subscribe, "public/#").is_ok());
        assert!(acl
            .check(&view, Action::Publish, "$nexus/cmd/plc/write")
            .is_ok());
        assert!(acl
            .check(&op, Action::Publish, "$nexus/cmd/reactor/write")
            .is_err());
        assert!(acl
            .check(&op, Action::Publish, "$nexus/cmd/pump/write")
            .is_ok());
        // An allow-all rule opens data topics, but never a device's or Nexus's own.
        assert!(acl.check(&view, Action::Publish, "lab/x").is_ok());
        assert!(acl
            .check(
                &view,
                Action::Publish,
                "acme/plant/packaging/line-1/plc-1/temperature"
            )
            .is_err());
        assert!(acl
            .check(&view, Action::Publish, "$nexus/status/service/x/y")
            .is_err());
    }

    #[test]
    fn intersection() {
        assert!(filters_intersect("#", "secret/x"));
        assert!(filters_intersect("+/x", "secret/+"));
        assert!(!filters_intersect("public/#", "secret/#"));
        assert!(!filters_intersect("a/b", "a/b/c"));
    }
}
