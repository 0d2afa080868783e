//! Opening a session: the client with its certificates (created in the PKI directory at
//! first start), the identity, and the endpoint chosen among those the server offers.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use nexus_common::config::OpcUaAuth;
use opcua::client::{Client, ClientBuilder, IdentityToken, SessionPollResult};
use opcua::crypto::SecurityPolicy;
use opcua::types::{EndpointDescription, MessageSecurityMode, UserTokenType, VariableId};

use super::{OpcUaDriver, DEFAULT_CHUNK};
use crate::driver::TransportError;

/// Why a session cannot be opened on our side (client, identity) or no endpoint the server
/// offers suits the configuration. It becomes a connect error's reason: the transport error is
/// the driver contract's message.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SetupError {
    #[error("PKI directory {}: {source}", .dir.display())]
    Pki { dir: PathBuf, source: io::Error },
    /// The library refused the client configuration (every problem it found).
    #[error("{}", .problems.join("; "))]
    Client { problems: Vec<String> },
    #[error("user certificate {}: {source}", .cert.display())]
    UserCertificate {
        cert: PathBuf,
        source: opcua::types::Error,
    },
    /// `Auto`: no endpoint takes the identity. `offered`: policy/mode of each endpoint.
    #[error("no usable endpoint for {token:?} authentication among: {}", .offered.join(", "))]
    NoUsableEndpoint {
        token: UserTokenType,
        offered: Vec<String>,
    },
    #[error(
        "the server offers no {policy}/{mode} endpoint for {token:?} authentication (it offers: {})",
        .offered.join(", ")
    )]
    NoMatchingEndpoint {
        policy: String,
        mode: String,
        token: UserTokenType,
        offered: Vec<String>,
    },
}

fn policy_of(name: &str) -> SecurityPolicy {
    match name {
        "Basic256Sha256" => SecurityPolicy::Basic256Sha256,
        "Aes128_Sha256_RsaOaep" => SecurityPolicy::Aes128Sha256RsaOaep,
        "Aes256_Sha256_RsaPss" => SecurityPolicy::Aes256Sha256RsaPss,
        _ => SecurityPolicy::None,
    }
}

fn mode_of(name: &str) -> MessageSecurityMode {
    match name {
        "Sign" => MessageSecurityMode::Sign,
        "SignAndEncrypt" => MessageSecurityMode::SignAndEncrypt,
        _ => MessageSecurityMode::None,
    }
}

impl OpcUaDriver {
    /// Open a new session (dropping any old one).
    pub(super) async fn open(&mut self) -> Result<(), TransportError> {
        self.drop_session();
        let url = self.url.clone();
        let err = |reason: String| TransportError::Connect {
            endpoint: url.clone(),
            reason,
        };
        let setup_err = |e: SetupError| err(e.to_string());
        let mut client = self.client().map_err(setup_err)?;
        let (identity, token) = self.identity().map_err(setup_err)?;
        let offered = tokio::time::timeout(
            self.timeout,
            client.get_server_endpoints_from_url(url.as_str()),
        )
        .await
        .map_err(|_| err(format!("no answer within {:?}", self.timeout)))?
        .map_err(|e| err(format!("GetEndpoints: {e}")))?;
        let endpoint = self.choose(&client, offered, token).map_err(setup_err)?;
        let chosen = format!(
            "{}/{:?}",
            SecurityPolicy::from_uri(endpoint.security_policy_uri.as_ref()),
            endpoint.security_mode
        );
        let (session, event_loop) = client
            .connect_to_endpoint_directly(endpoint, identity)
            .map_err(|e| err(e.to_string()))?;
        let alive = Arc::new(AtomicBool::new(true));
        let ended = Arc::new(Mutex::new(None::<String>));
        let (a, e) = (alive.clone(), ended.clone());
        let (dead_tx, mut dead_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let stream = event_loop.enter();
            futures::pin_mut!(stream);
            let why = loop {
                match stream.next().await {
                    None => break "the session was closed".to_owned(),
                    Some(Err(code)) => break format!("the connection failed: {code}"),
                    Some(Ok(SessionPollResult::ConnectionLost(code))) => {
                        break format!("the connection was lost: {code}")
                    }
                    Some(Ok(SessionPollResult::ReconnectFailed(code))) => {
                        break format!("the connection failed: {code}")
                    }
                    Some(Ok(_)) => {}
                }
            };
            a.store(false, Ordering::SeqCst);
            *e.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
            let _ = dead_tx.send(true);
        });
        let connected = tokio::time::timeout(self.timeout * 3, async {
            tokio::select! {
                ok = session.wait_for_connection() => ok,
                _ = dead_rx.wait_for(|d| *d) => false,
            }
        })
        .await;
        let fail = |why: String| {
            session.disable_reconnects();
            let s = session.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), s.disconnect()).await;
            });
            err(why)
        };
        match connected {
            Err(_) => return Err(fail(format!("no session within {:?}", self.timeout * 3))),
            Ok(false) => {
                let why = ended
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .unwrap_or_else(|| "the session could not be activated".into());
                let hint = if why.contains("Certificate") || why.contains("Security") {
                    format!(
                        " (is the server's certificate in {}/trusted? unknown ones are saved in rejected/)",
                        self.settings.pki_dir.display()
                    )
                } else {
                    String::new()
                };
                return Err(fail(format!("{chosen}: {why}{hint}")));
            }
            Ok(true) => {}
        }
        self.namespaces = match session.read_namespace_array().await {
            Ok(map) => {
                let mut v: Vec<(u16, String)> = map
                    .known_namespaces()
                    .iter()
                    .map(|(k, i)| (*i, k.clone()))
                    .collect();
                v.sort();
                v.into_iter().map(|(_, s)| s).collect()
            }
            Err(e) => return Err(fail(format!("reading the namespace array: {e}"))),
        };
        let limit = |n: Option<u32>| match n {
            Some(0) | None => DEFAULT_CHUNK,
            Some(n) => n as usize,
        };
        self.max_read = limit(
            self.read_u32(
                &session,
                VariableId::Server_ServerCapabilities_OperationLimits_MaxNodesPerRead,
            )
            .await,
        );
        self.max_items = limit(
            self.read_u32(
                &session,
                VariableId::Server_ServerCapabilities_OperationLimits_MaxMonitoredItemsPerCall,
            )
            .await,
        );
        tracing::info!(endpoint = %self.url, security = %chosen, max_nodes_per_read = self.max_read, max_monitored_items_per_call = self.max_items, "opc ua session open");
        self.alive = alive;
        self.ended = ended;
        self.session = Some(session);
        self.devices.clear();
        Ok(())
    }

    fn client(&self) -> Result<Client, SetupError> {
        // Sessions opening at once must not each create the client certificate at first start.
        static PKI: Mutex<()> = Mutex::new(());
        let _pki = PKI.lock().unwrap_or_else(|e| e.into_inner());
        let pki = &self.settings.pki_dir;
        let pki_error = |source: io::Error| SetupError::Pki {
            dir: pki.clone(),
            source,
        };
        super::pki::prepare(pki).map_err(pki_error)?;
        let client = ClientBuilder::new()
            .application_name("Nexus gateway")
            .application_uri(self.settings.application_uri.clone())
            .product_uri("urn:nexus")
            .pki_dir(self.settings.pki_dir.clone())
            .create_sample_keypair(true)
            .trust_server_certs(self.settings.trust_server_certs)
            .session_retry_limit(0)
            .session_retry_initial(Duration::from_millis(100))
            .request_timeout(self.timeout.max(Duration::from_millis(500)))
            .keep_alive_interval(Duration::from_secs(2).max(self.timeout))
            .max_failed_keep_alive_count(2)
            .session_timeout(60_000)
            // A publish response of a large subscription carries thousands of values: the
            // library's default decoding limits (1000 array elements) would drop the session.
            .max_array_length(1_000_000)
            .max_message_size(64 * 1024 * 1024)
            .max_chunk_count(4096)
            .client()
            .map_err(|problems| SetupError::Client { problems })?;
        super::pki::protect(pki).map_err(pki_error)?;
        Ok(client)
    }

    fn identity(&self) -> Result<(IdentityToken, UserTokenType), SetupError> {
        Ok(match &self.auth {
            None => (IdentityToken::Anonymous, UserTokenType::Anonymous),
            Some(OpcUaAuth::Named(_)) => (IdentityToken::Anonymous, UserTokenType::Anonymous),
            Some(OpcUaAuth::User { username, password }) => (
                IdentityToken::UserName(username.clone(), password.expose().to_owned().into()),
                UserTokenType::UserName,
            ),
            Some(OpcUaAuth::Cert { cert, key }) => (
                IdentityToken::new_x509_path(cert, key).map_err(|source| {
                    SetupError::UserCertificate {
                        cert: cert.clone(),
                        source,
                    }
                })?,
                UserTokenType::Certificate,
            ),
        })
    }

    /// The endpoint to use among those the server offers.
    fn choose(
        &self,
        client: &Client,
        offered: Vec<EndpointDescription>,
        token: UserTokenType,
    ) -> Result<EndpointDescription, SetupError> {
        let takes_token = |e: &EndpointDescription| {
            e.user_identity_tokens
                .as_ref()
                .is_some_and(|ts| ts.iter().any(|t| t.token_type == token))
        };
        let list = |v: &[EndpointDescription]| {
            v.iter()
                .map(|e| {
                    format!(
                        "{}/{:?}",
                        SecurityPolicy::from_uri(e.security_policy_uri.as_ref()),
                        e.security_mode
                    )
                })
                .collect::<Vec<_>>()
        };
        let mut candidates: Vec<EndpointDescription> = offered
            .iter()
            .filter(|e| client.is_supported_endpoint(e) && takes_token(e))
            .cloned()
            .collect();
        if self.policy == "Auto" {
            candidates.sort_by_key(|e| e.security_level);
            return candidates
                .pop()
                .ok_or_else(|| SetupError::NoUsableEndpoint {
                    token,
                    offered: list(&offered),
                });
        }
        let (policy, mode) = (policy_of(&self.policy), mode_of(&self.mode));
        candidates
            .into_iter()
            .find(|e| {
                SecurityPolicy::from_uri(e.security_policy_uri.as_ref()) == policy
                    && e.security_mode == mode
            })
            .ok_or_else(|| SetupError::NoMatchingEndpoint {
                policy: self.policy.clone(),
                mode: self.mode.clone(),
                token,
                offered: list(&offered),
            })
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn setup_errors_read_as_before_and_keep_their_cause() {
        let e = SetupError::Pki {
            dir: PathBuf::from("/var/pki"),
            source: io::Error::new(io::ErrorKind::PermissionDenied, "denied"),
        };
        assert_eq!(e.to_string(), "PKI directory /var/pki: denied");
        assert!(e.source().is_some_and(|s| s.is::<io::Error>()));
        let e = SetupError::Client {
            problems: vec!["a".into(), "b".into()],
        };
        assert_eq!(e.to_string(), "a; b");
        let offered = vec!["None/None".to_owned(), "Basic256Sha256/Sign".to_owned()];
        let e = SetupError::NoMatchingEndpoint {
            policy: "Basic256Sha256".into(),
            mode: "SignAndEncrypt".into(),
            token: UserTokenType::UserName,
            offered: offered.clone(),
        };
        assert_eq!(
            e.to_string(),
            "the server offers no Basic256Sha256/SignAndEncrypt endpoint for UserName \
             authentication (it offers: None/None, Basic256Sha256/Sign)"
        );
        let e = SetupError::NoUsableEndpoint {
            token: UserTokenType::Certificate,
            offered,
        };
        assert_eq!(
            e.to_string(),
            "no usable endpoint for Certificate authentication among: None/None, \
             Basic256Sha256/Sign"
        );
    }
}
