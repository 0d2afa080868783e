//! Who is asking: one identity store for the MQTT broker and every HTTP port.
//!
//! Passwords are argon2 hashes from the file or plain text from the environment; API tokens are
//! stored as their SHA-256. An argon2 check costs tens of milliseconds on purpose, so:
//! - at most [`VERIFY_SLOTS`] checks run at once, on blocking threads (a flood of wrong
//!   passwords queues instead of taking every core);
//! - a password that passed once is remembered per user as a keyed digest, so a client that
//!   sends Basic credentials with every request pays for argon2 once. The memory holds one entry
//!   per configured user, never more.
//!
//! Comparisons of secrets are constant-time. Nothing here logs a secret.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::config::{Anonymous, AuthConfig, Role, UserConfig, MIN_TOKEN_LEN};

pub mod http;

/// Argon2 checks that may run at once.
pub const VERIFY_SLOTS: usize = 2;

/// How a client proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Password,
    Token,
    Session,
    Anonymous,
}

/// An authenticated (or anonymous) client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user name; `token:<name>` for an API token; `anonymous`.
    pub name: String,
    pub role: Role,
    /// Topic filters a publisher may publish to.
    pub publish: Arc<[String]>,
    pub via: Via,
}

impl Identity {
    pub fn anonymous() -> Identity {
        Identity {
            name: "anonymous".into(),
            role: Role::Viewer,
            publish: Arc::from(Vec::new()),
            via: Via::Anonymous,
        }
    }

    pub fn may(&self, needed: Role) -> bool {
        self.role.includes(needed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("auth.users: user {user}: environment variable {var} is not set")]
    MissingPassword { user: String, var: String },
    #[error("auth.tokens: token {token}: environment variable {var} is not set")]
    MissingToken { token: String, var: String },
    #[error(
        "auth.tokens: token {token}: the token in {var} is shorter than {MIN_TOKEN_LEN} characters"
    )]
    ShortToken { token: String, var: String },
    #[error("auth.users: user {user}: {reason}")]
    BadHash { user: String, reason: String },
}

enum Credential {
    /// An argon2 hash in PHC form.
    Hash(String),
    /// The keyed digest of a password given in plain (environment, code).
    Digest([u8; 32]),
}

struct StoredUser {
    credential: Credential,
    role: Role,
    publish: Arc<[String]>,
}

/// Users, tokens and the anonymous policy, resolved at start.
pub struct Identities {
    users: HashMap<String, StoredUser>,
    tokens: Vec<(String, [u8; 32], Role)>,
    anonymous: Anonymous,
    /// Random per process: keys the digests held in memory.
    key: [u8; 32],
    /// User -> keyed digest of the password that last passed its argon2 check.
    verified: Mutex<HashMap<String, [u8; 32]>>,
    slots: Semaphore,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identities")
            .field("users", &self.users.len())
            .field("tokens", &self.tokens.len())
            .field("anonymous", &self.anonymous)
            .finish()
    }
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Is `s` an argon2 hash Nexus can check? `Err` says what is wrong (never echoing `s`).
pub fn check_hash(s: &str) -> Result<(), String> {
    let h = PasswordHash::new(s)
        .map_err(|e| format!("not a password hash in PHC form ($argon2id$v=19$...): {e}"))?;
    match h.algorithm.as_str() {
        "argon2id" | "argon2i" | "argon2d" => Ok(()),
        other => Err(format!(
            "hash algorithm {other} is not argon2 (`nexus auth hash-password` makes one)"
        )),
    }
}

/// An argon2id hash of `password` in PHC form, with a random salt and the default cost.
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        // Hashing with the default parameters and a generated salt cannot fail; should the
        // library ever refuse, the caller gets a hash that matches no password.
        .unwrap_or_else(|e| format!("$argon2id$invalid${e}"))
}

/// A new random API token and the hex SHA-256 that goes into `auth.tokens[].sha256`.
pub fn new_token() -> (String, String) {
    use rand::RngCore;
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let token = format!("nxs_{}", hex(&raw));
    let digest = hex(&sha256(&[token.as_bytes()]));
    (token, digest)
}

/// The hex SHA-256 of a token, as `auth.tokens[].sha256` holds it.
pub fn token_sha256(token: &str) -> String {
    hex(&sha256(&[token.as_bytes()]))
}

impl Identities {
    /// From `cfg`, reading `password_env` and `token_env` from the process environment.
    pub fn new(cfg: &AuthConfig) -> Result<Identities, AuthSetupError> {
        Self::with_env(cfg, |k| std::env::var(k).ok())
    }

    pub fn with_env(
        cfg: &AuthConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Identities, AuthSetupError> {
        use rand::RngCore;
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        let mut ids = Identities {
            users: HashMap::new(),
            tokens: Vec::new(),
            anonymous: cfg.anonymous,
            key,
            verified: Mutex::new(HashMap::new()),
            slots: Semaphore::new(VERIFY_SLOTS),
        };
        for u in &cfg.users {
            ids.add_user(u, &env)?;
        }
        for t in &cfg.tokens {
            let digest = match (&t.sha256, &t.token_env) {
                (Some(h), _) => unhex(&h.to_ascii_lowercase()).unwrap_or([0; 32]),
                (None, Some(var)) => {
                    let token = env(var).ok_or_else(|| AuthSetupError::MissingToken {
                        token: t.name.clone(),
                        var: var.clone(),
                    })?;
                    if token.len() < MIN_TOKEN_LEN {
                        return Err(AuthSetupError::ShortToken {
                            token: t.name.clone(),
                            var: var.clone(),
                        });
                    }
                    sha256(&[token.as_bytes()])
                }
                // Refused by validation; an unreachable digest if it ever got here.
                (None, None) => continue,
            };
            ids.tokens.push((t.name.clone(), digest, t.role));
        }
        Ok(ids)
    }

    /// The users' roles and publish filters, without their credentials (nobody can log in):
    /// what a service needs to decide what a user the broker authenticated may do, without
    /// the passwords' environment variables.
    pub fn roles_only(cfg: &AuthConfig) -> Identities {
        let mut ids = Identities {
            users: HashMap::new(),
            tokens: Vec::new(),
            anonymous: cfg.anonymous,
            key: [0; 32],
            verified: Mutex::new(HashMap::new()),
            slots: Semaphore::new(VERIFY_SLOTS),
        };
        for u in &cfg.users {
            ids.users.insert(
                u.username.clone(),
                StoredUser {
                    credential: Credential::Hash(String::new()),
                    role: u.role,
                    publish: Arc::from(u.publish.clone()),
                },
            );
        }
        ids
    }

    /// Add (or replace) a user: the generated service account of `nexus up`, the demo login.
    pub fn add_user(
        &mut self,
        u: &UserConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(), AuthSetupError> {
        let credential = match (&u.password, &u.password_hash, &u.password_env) {
            (Some(p), _, _) => Credential::Digest(self.digest(p.expose().as_bytes())),
            (None, Some(h), _) => {
                check_hash(h.expose()).map_err(|reason| AuthSetupError::BadHash {
                    user: u.username.clone(),
                    reason,
                })?;
                Credential::Hash(h.expose().to_owned())
            }
            (None, None, Some(var)) => {
                let p = env(var).ok_or_else(|| AuthSetupError::MissingPassword {
                    user: u.username.clone(),
                    var: var.clone(),
                })?;
                Credential::Digest(self.digest(p.as_bytes()))
            }
            // Refused by validation: a user nobody can log in as.
            (None, None, None) => Credential::Hash(String::new()),
        };
        self.users.insert(
            u.username.clone(),
            StoredUser {
                credential,
                role: u.role,
                publish: Arc::from(u.publish.clone()),
            },
        );
        Ok(())
    }

    fn digest(&self, password: &[u8]) -> [u8; 32] {
        sha256(&[&self.key, password])
    }

    fn identity(&self, name: &str, u: &StoredUser, via: Via) -> Identity {
        Identity {
            name: name.to_owned(),
            role: u.role,
            publish: u.publish.clone(),
            via,
        }
    }

    /// The role and publish filters of a configured user (for the broker's ACL, which sees
    /// only the name of a connected client).
    pub fn user(&self, name: &str) -> Option<Identity> {
        self.users
            .get(name)
            .map(|u| self.identity(name, u, Via::Password))
    }

    /// Check a user name and password; `None` when either is wrong.
    pub async fn login(&self, username: &str, password: &[u8]) -> Option<Identity> {
        let Some(u) = self.users.get(username) else {
            // As long as for a user who exists: the time must not tell which names do.
            self.check_slowly(dummy_hash().to_owned(), password).await;
            return None;
        };
        let given = self.digest(password);
        match &u.credential {
            Credential::Digest(d) => {
                if constant_time_eq(d, &given) {
                    return Some(self.identity(username, u, Via::Password));
                }
                // A wrong password takes an argon2 check's time whatever the user's kind.
                self.check_slowly(dummy_hash().to_owned(), password).await;
                None
            }
            Credential::Hash(hash) => {
                if self.remembered(username, &given) {
                    return Some(self.identity(username, u, Via::Password));
                }
                if !self.check_slowly(hash.clone(), password).await {
                    return None;
                }
                self.lock_verified().insert(username.to_owned(), given);
                Some(self.identity(username, u, Via::Password))
            }
        }
    }

    /// An argon2 check in a blocking thread, at most [`VERIFY_SLOTS`] at once.
    async fn check_slowly(&self, hash: String, password: &[u8]) -> bool {
        let Ok(_slot) = self.slots.acquire().await else {
            return false;
        };
        let password = password.to_vec();
        tokio::task::spawn_blocking(move || verify(&hash, &password))
            .await
            .unwrap_or(false)
    }

    fn lock_verified(&self) -> std::sync::MutexGuard<'_, HashMap<String, [u8; 32]>> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remembered(&self, username: &str, given: &[u8; 32]) -> bool {
        self.lock_verified()
            .get(username)
            .is_some_and(|d| constant_time_eq(d, given))
    }

    /// Check an API token; `None` when it matches none.
    pub fn token(&self, token: &str) -> Option<Identity> {
        let given = sha256(&[token.as_bytes()]);
        // Every entry is compared, so the time does not tell which one matched.
        let mut found = None;
        for (name, digest, role) in &self.tokens {
            if constant_time_eq(digest, &given) {
                found = Some((name, *role));
            }
        }
        found.map(|(name, role)| Identity {
            name: format!("token:{name}"),
            role,
            publish: Arc::from(Vec::new()),
            via: Via::Token,
        })
    }

    /// The anonymous viewer, when a client from `peer` may go without credentials.
    pub fn anonymous(&self, peer: Option<IpAddr>) -> Option<Identity> {
        self.anonymous.allows(peer).then(Identity::anonymous)
    }

    pub fn anonymous_policy(&self) -> Anonymous {
        self.anonymous
    }
}

/// A hash of a random password, with the default cost: what an unknown user's password is
/// checked against.
fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| {
        use rand::RngCore;
        let mut raw = [0u8; 16];
        rand::rng().fill_bytes(&mut raw);
        hash_password(&hex(&raw))
    })
}

fn verify(hash: &str, password: &[u8]) -> bool {
    match PasswordHash::new(hash) {
        Ok(h) => Argon2::default().verify_password(password, &h).is_ok(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Secret, TokenConfig};

    fn cfg() -> AuthConfig {
        let hashed = UserConfig {
            password_hash: Some(Secret::new(hash_password("hashed-pass"))),
            password: None,
            ..UserConfig::with_password("alice", "", Role::Operator)
        };
        let from_env = UserConfig {
            password_env: Some("BOB_PW".into()),
            password: None,
            ..UserConfig::with_password("bob", "", Role::Viewer)
        };
        let publisher = UserConfig {
            publish: vec!["acme/site2/#".into()],
            ..UserConfig::with_password("bridge", "bridge-pass", Role::Publisher)
        };
        AuthConfig {
            users: vec![hashed, from_env, publisher],
            tokens: vec![TokenConfig {
                name: "grafana".into(),
                sha256: Some(token_sha256(
                    "nxs_0123456789abcdef0123456789abcdef0123456789abcdef",
                )),
                token_env: None,
                role: Role::Viewer,
            }],
            ..AuthConfig::default()
        }
    }

    fn ids() -> Identities {
        Identities::with_env(&cfg(), |k| (k == "BOB_PW").then(|| "env-pass".to_owned()))
            .expect("identities")
    }

    #[tokio::test]
    async fn passwords_hashed_env_and_code() {
        let ids = ids();
        let alice = ids.login("alice", b"hashed-pass").await.expect("alice");
        assert_eq!((alice.role, alice.via), (Role::Operator, Via::Password));
        // The second time comes from the remembered digest; still the same answer.
        assert!(ids.login("alice", b"hashed-pass").await.is_some());
        assert!(ids.login("alice", b"hashed-pass ").await.is_none());
        assert!(ids.login("alice", b"").await.is_none());
        assert_eq!(
            ids.login("bob", b"env-pass").await.map(|i| i.role),
            Some(Role::Viewer)
        );
        assert!(ids.login("bob", b"env-pas").await.is_none());
        let bridge = ids.login("bridge", b"bridge-pass").await.expect("bridge");
        assert_eq!(&*bridge.publish, ["acme/site2/#".to_owned()]);
        assert!(ids.login("nobody", b"x").await.is_none());
    }

    #[test]
    fn a_missing_environment_variable_is_named() {
        let e = Identities::with_env(&cfg(), |_| None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "auth.users: user bob: environment variable BOB_PW is not set"
        );
    }

    #[test]
    fn tokens() {
        let ids = ids();
        let t = ids
            .token("nxs_0123456789abcdef0123456789abcdef0123456789abcdef")
            .expect("token");
        assert_eq!(
            (t.name.as_str(), t.role, t.via),
            ("token:grafana", Role::Viewer, Via::Token)
        );
        assert!(ids
            .token("nxs_0123456789abcdef0123456789abcdef0123456789abcdeF")
            .is_none());
        assert!(ids.token("").is_none());
        let (token, digest) = new_token();
        assert!(token.len() >= MIN_TOKEN_LEN);
        assert_eq!(token_sha256(&token), digest);
        let short = AuthConfig {
            tokens: vec![TokenConfig {
                name: "ci".into(),
                sha256: None,
                token_env: Some("CI_TOKEN".into()),
                role: Role::Viewer,
            }],
            ..AuthConfig::default()
        };
        let e = Identities::with_env(&short, |_| Some("short".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("shorter than 32"), "{e}");
    }

    #[test]
    fn anonymous_policy() {
        let lo: IpAddr = "127.0.0.1".parse().expect("ip");
        let lo6: IpAddr = "::1".parse().expect("ip");
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().expect("ip");
        let lan: IpAddr = "10.1.2.3".parse().expect("ip");
        let ids = ids();
        assert_eq!(ids.anonymous_policy(), Anonymous::Loopback);
        for ip in [lo, lo6, mapped] {
            assert_eq!(ids.anonymous(Some(ip)).map(|i| i.role), Some(Role::Viewer));
        }
        assert!(ids.anonymous(Some(lan)).is_none());
        assert!(ids.anonymous(None).is_none());
        assert!(Anonymous::Any.allows(Some(lan)));
        assert!(!Anonymous::Off.allows(Some(lo)));
    }

    #[test]
    fn role_order() {
        use Role::*;
        assert!(Admin.includes(Operator) && Operator.includes(Viewer));
        assert!(!Operator.includes(Admin) && !Viewer.includes(Operator));
        assert!(Publisher.includes(Viewer) && !Publisher.includes(Operator));
        assert!(!Admin.includes(Publisher) && !Admin.includes(Service));
        assert!(Service.includes(Admin));
    }

    #[test]
    fn hashes_are_checked() {
        assert!(check_hash(&hash_password("x")).is_ok());
        assert!(check_hash("plain").unwrap_err().contains("PHC"));
        assert!(
            check_hash("$scrypt$ln=16,r=8,p=1$aM15713r3Xsvxbi31lqr1Q$nFNh2CVHVjNldFVKDHDlm4CbdRSCdEBsjjJxD+iCs5E")
                .unwrap_err()
                .contains("not argon2"),
        );
    }
}
