//! The pipeline service's REST API (Fivetran's shape): fetch the public key
//! the service uses for a destination group, and register our host-key
//! fingerprints for a connection so a new instance needs no approval.
//!
//! HTTPS through reqwest with rustls (the process's one aws-lc-rs provider).
//! 429 and 5xx are retried with backoff (Retry-After honoured up to a cap);
//! 401/403, an error body and a network failure each give a clear message
//! and a `jumpgate_service_api_requests_total{endpoint,result}` count. The
//! API secret never appears in logs or `Debug` output.

use std::fmt;
use std::time::Duration;

use metrics::Counter;
use serde_json::Value;
use tracing::{debug, warn};

use crate::metrics as m;

/// Attempts per request (the first plus retries on 429/5xx/network errors).
const ATTEMPTS: u32 = 4;
/// First retry pause; doubled per retry.
const RETRY_START: Duration = Duration::from_millis(500);
/// Longest Retry-After we wait for.
const RETRY_AFTER_CAP: Duration = Duration::from_secs(10);
/// Whole-request timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// A credential: prints as `MASKED`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MASKED")
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "{endpoint}: the service refused our credentials (HTTP {status}): {message} (check FIVETRAN_API_KEY / FIVETRAN_API_SECRET or api_key_file / api_secret_file)"
    )]
    Unauthorized {
        endpoint: &'static str,
        status: u16,
        message: String,
    },
    #[error("{endpoint}: HTTP {status}: {message}")]
    Http {
        endpoint: &'static str,
        status: u16,
        message: String,
    },
    #[error("{endpoint}: the service answered {code:?}: {message}")]
    Refused {
        endpoint: &'static str,
        code: String,
        message: String,
    },
    #[error("{endpoint}: the answer is not the JSON we expect: {why}")]
    Malformed { endpoint: &'static str, why: String },
    #[error("{endpoint}: cannot reach {url}: {why}")]
    Network {
        endpoint: &'static str,
        url: String,
        why: String,
    },
}

impl ApiError {
    fn label(&self) -> &'static str {
        match self {
            ApiError::Unauthorized { .. } => "unauthorized",
            ApiError::Http { .. } => "http_error",
            ApiError::Refused { .. } => "refused",
            ApiError::Malformed { .. } => "malformed",
            ApiError::Network { .. } => "network",
        }
    }
}

/// The API client.
#[derive(Clone)]
pub struct ServiceClient {
    http: reqwest::Client,
    api_url: String,
    key: Secret,
    secret: Secret,
}

impl fmt::Debug for ServiceClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceClient")
            .field("api_url", &self.api_url)
            .field("key", &self.key)
            .finish()
    }
}

/// Installs aws-lc-rs as the process's rustls provider (once); reqwest and
/// everything else then agree on it.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

impl ServiceClient {
    pub fn new(api_url: &str, key: Secret, secret: Secret) -> Result<ServiceClient, String> {
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("jumpgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(ServiceClient {
            http,
            api_url: api_url.trim_end_matches('/').to_string(),
            key,
            secret,
        })
    }

    /// `GET /v1/groups/{group}/public-key`: the service's public key line for a group.
    pub async fn group_public_key(&self, group: &str) -> Result<String, ApiError> {
        const E: &str = "group_public_key";
        let url = format!("{}/v1/groups/{}/public-key", self.api_url, path_segment(group));
        let body = self.call(E, || self.http.get(&url)).await?;
        body.pointer("/data/public_key")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| ApiError::Malformed {
                endpoint: E,
                why: "no data.public_key in the answer".into(),
            })
    }

    /// `POST /v1/connections/{id}/fingerprints`: approve one host key; the service's message.
    /// Registers one of our host keys with `connection`: its SHA256 hash
    /// (as `ssh-keygen -l` prints it, without the prefix) and the API's answer.
    pub async fn register_host_key(
        &self,
        connection: &str,
        key: &russh::keys::PublicKey,
    ) -> (String, Result<String, ApiError>) {
        let (hash, public_key) = fingerprint_payload(key);
        let registered = self.register_fingerprint(connection, &hash, &public_key).await;
        (hash, registered)
    }

    async fn register_fingerprint(&self, connection: &str, hash: &str, public_key: &str) -> Result<String, ApiError> {
        const E: &str = "register_fingerprint";
        let url = format!(
            "{}/v1/connections/{}/fingerprints",
            self.api_url,
            path_segment(connection)
        );
        let payload = serde_json::json!({ "hash": hash, "public_key": public_key });
        let body = self.call(E, || self.http.post(&url).json(&payload)).await?;
        Ok(body
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("approved")
            .to_string())
    }

    /// One call with retries; Ok is a JSON body whose `code` is "Success".
    async fn call(
        &self,
        endpoint: &'static str,
        request: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<Value, ApiError> {
        let count = |result: &'static str| -> Counter {
            metrics::counter!(m::SERVICE_API_REQUESTS, "endpoint" => endpoint, "result" => result)
        };
        let mut pause = RETRY_START;
        let mut last: Option<ApiError> = None;
        for attempt in 1..=ATTEMPTS {
            if attempt > 1 {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            let sent = request()
                .basic_auth(self.key.expose(), Some(self.secret.expose()))
                .header(reqwest::header::ACCEPT, "application/json")
                .send()
                .await;
            let response = match sent {
                Ok(r) => r,
                Err(e) => {
                    let err = ApiError::Network {
                        endpoint,
                        url: self.api_url.clone(),
                        why: without_url(e),
                    };
                    count(err.label()).increment(1);
                    debug!(endpoint, attempt, error = %err, "service API call failed; retrying");
                    last = Some(err);
                    continue;
                }
            };
            let status = response.status();
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|s| Duration::from_secs(s).min(RETRY_AFTER_CAP));
            let text = response.text().await.unwrap_or_default();
            let json: Option<Value> = serde_json::from_str(&text).ok();
            let message = json
                .as_ref()
                .and_then(|j| j.get("message").and_then(Value::as_str))
                .map(str::to_string)
                .unwrap_or_else(|| text.chars().take(200).collect());
            if status.as_u16() == 429 || status.is_server_error() {
                count("retried").increment(1);
                warn!(
                    endpoint,
                    attempt,
                    status = status.as_u16(),
                    "service API busy or failing; retrying"
                );
                if let Some(wait) = retry_after {
                    pause = wait;
                }
                last = Some(ApiError::Http {
                    endpoint,
                    status: status.as_u16(),
                    message,
                });
                continue;
            }
            let result = if status.as_u16() == 401 || status.as_u16() == 403 {
                Err(ApiError::Unauthorized {
                    endpoint,
                    status: status.as_u16(),
                    message,
                })
            } else if !status.is_success() {
                Err(ApiError::Http {
                    endpoint,
                    status: status.as_u16(),
                    message,
                })
            } else {
                match json {
                    None => Err(ApiError::Malformed {
                        endpoint,
                        why: format!("not JSON: {:?}", text.chars().take(80).collect::<String>()),
                    }),
                    Some(j) => match j.get("code").and_then(Value::as_str) {
                        Some("Success") => Ok(j),
                        Some(code) => Err(ApiError::Refused {
                            endpoint,
                            code: code.to_string(),
                            message,
                        }),
                        None => Err(ApiError::Malformed {
                            endpoint,
                            why: "no \"code\" field".into(),
                        }),
                    },
                }
            };
            match &result {
                Ok(_) => count("ok").increment(1),
                Err(e) => count(e.label()).increment(1),
            }
            return result;
        }
        Err(last.unwrap_or(ApiError::Network {
            endpoint,
            url: self.api_url.clone(),
            why: "no attempt made".into(),
        }))
    }
}

/// IDs go into a URL path: keep them to characters that need no escaping.
fn path_segment(id: &str) -> String {
    id.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        .collect()
}

/// reqwest's error text without the URL (which holds no secret, but is
/// already in the message once).
fn without_url(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut s = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(inner) = source {
        s.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    s
}

/// The body the fingerprint API expects for one host key: the SHA256 hash
/// without its prefix, and the `type base64 comment` line.
fn fingerprint_payload(key: &russh::keys::PublicKey) -> (String, String) {
    let fp = crate::ssh::keys::fingerprint(key);
    let hash = fp.strip_prefix("SHA256:").unwrap_or(&fp).to_string();
    (hash, key.to_openssh().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_in_debug() {
        let c = ServiceClient::new("https://api.example.com/", Secret::new("k3y"), Secret::new("s3cret")).unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("k3y") && !shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("MASKED"));
        assert_eq!(c.api_url, "https://api.example.com");
    }

    #[test]
    fn ids_cannot_escape_the_path() {
        assert_eq!(path_segment("abc_123-x.y"), "abc_123-x.y");
        assert_eq!(path_segment("../../admin?x=1"), "....adminx1");
    }
}
