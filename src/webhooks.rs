//! Webhook delivery: Standard Webhooks signatures, the guard that keeps deliveries off the
//! service's own network, and [`deliver_due`], which `server::webhook_loop` runs to send what
//! the `jobs_terminal_webhooks` trigger queued (claimed with `SKIP LOCKED`, retried with
//! backoff, at least once).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::db::webhooks::{self as store, Outcome};

/// The event types an endpoint may subscribe to (OpenAI's for fine-tuning).
pub const EVENTS: [&str; 3] = [
    "fine_tuning.job.succeeded",
    "fine_tuning.job.failed",
    "fine_tuning.job.cancelled",
];

/// How deliveries are made.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// Hosts (names or IP literals) deliveries may reach although they are not public, and
    /// over plain http: a test receiver, an internal relay the operator trusts.
    pub allow_hosts: Vec<String>,
    pub max_attempts: i32,
    /// The first retry's delay; doubling per attempt up to an hour.
    pub retry_base: Duration,
    pub timeout: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            allow_hosts: Vec::new(),
            max_attempts: 8,
            retry_base: Duration::from_secs(10),
            timeout: Duration::from_secs(10),
        }
    }
}

impl WebhookConfig {
    fn allowed(&self, host: &str) -> bool {
        let h = host.trim_start_matches('[').trim_end_matches(']');
        self.allow_hosts.iter().any(|a| a.eq_ignore_ascii_case(h))
    }

    /// The retry delay after `attempts` failed ones, `None` once they are used up.
    pub fn retry_after(&self, attempts: i32) -> Option<f64> {
        if attempts >= self.max_attempts {
            return None;
        }
        let exp = 2f64.powi((attempts - 1).clamp(0, 20));
        Some((self.retry_base.as_secs_f64() * exp).min(3600.0))
    }
}

/// A new signing secret: `whsec_` + base64 of 24 random bytes.
pub fn new_secret() -> String {
    let mut key = [0u8; 24];
    rand::Rng::fill(&mut rand::rng(), &mut key[..]);
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// The `webhook-signature` value: `v1,` + base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")).
pub fn sign(secret: &str, msg_id: &str, timestamp: i64, body: &[u8]) -> Result<String, String> {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .map_err(|e| format!("secret: {e}"))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|e| e.to_string())?;
    mac.update(format!("{msg_id}.{timestamp}.").as_bytes());
    mac.update(body);
    Ok(format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    ))
}

/// Why a URL is refused.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused(pub String);

/// Checks an endpoint URL's form: https (http only for an allowed host), a host, no
/// credentials, at most 2,048 characters.
pub fn check_url(raw: &str, cfg: &WebhookConfig) -> Result<reqwest::Url, Refused> {
    let r = |m: &str| Refused(m.to_string());
    if raw.len() > 2048 {
        return Err(r("at most 2,048 characters"));
    }
    let url = reqwest::Url::parse(raw).map_err(|e| Refused(format!("not a URL: {e}")))?;
    let host = url.host_str().ok_or_else(|| r("has no host"))?.to_string();
    if !url.username().is_empty() || url.password().is_some() {
        return Err(r("must not carry credentials"));
    }
    match url.scheme() {
        "https" => {}
        "http" if cfg.allowed(&host) => {}
        _ => {
            return Err(r(
                "must be https:// (plain http only to a host the operator allows)",
            ))
        }
    }
    Ok(url)
}

/// Whether an address is on the public internet: not loopback, private, link-local, shared
/// (CGNAT), documentation, benchmarking, multicast, broadcast, unspecified or reserved, and
/// not an IPv4 one of those inside IPv6.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => {
            let o = v.octets();
            !(v.is_loopback()
                || v.is_private()
                || v.is_link_local()
                || v.is_unspecified()
                || v.is_multicast()
                || v.is_broadcast()
                || v.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 198 && (o[1] == 18 || o[1] == 19))
                || o[0] >= 240
                || (o[0] == 192 && o[1] == 0 && o[2] == 0))
        }
        IpAddr::V6(v) => {
            if let Some(v4) = v.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v.segments();
            !(v.is_loopback()
                || v.is_unspecified()
                || v.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || (s[0] == 0x64 && s[1] == 0xff9b))
        }
    }
}

/// Resolves the URL's host and checks every address (a name that resolves to one private
/// address among public ones is refused too): the addresses to connect to.
pub async fn resolve(url: &reqwest::Url, cfg: &WebhookConfig) -> Result<Vec<SocketAddr>, Refused> {
    let host = url.host_str().unwrap_or_default().to_string();
    let port = url.port_or_known_default().unwrap_or(443);
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::lookup_host((bare.as_str(), port)),
        )
        .await
        .map_err(|_| Refused(format!("resolving `{host}` timed out")))?
        .map_err(|e| Refused(format!("`{host}` does not resolve: {e}")))?
        .collect(),
    };
    if addrs.is_empty() {
        return Err(Refused(format!("`{host}` has no address")));
    }
    if !cfg.allowed(&host) {
        if let Some(a) = addrs.iter().find(|a| !is_public(a.ip())) {
            return Err(Refused(format!(
                "`{host}` resolves to {}, which is not a public address",
                a.ip()
            )));
        }
    }
    Ok(addrs)
}

/// Sends one claimed delivery: resolved and checked first, then posted to that address only
/// (no redirects followed), signed.
async fn attempt(d: &store::Due, cfg: &WebhookConfig) -> (Option<i32>, Option<String>) {
    let url = match check_url(&d.url, cfg) {
        Ok(u) => u,
        Err(Refused(m)) => return (None, Some(format!("url {m}"))),
    };
    let addrs = match resolve(&url, cfg).await {
        Ok(a) => a,
        Err(Refused(m)) => return (None, Some(m)),
    };
    let host = url.host_str().unwrap_or_default().to_string();
    // Pinned to the checked addresses, so a second lookup cannot be steered elsewhere.
    let client = match reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(cfg.timeout)
        .resolve_to_addrs(&host, &addrs)
        .build()
    {
        Ok(c) => c,
        Err(e) => return (None, Some(format!("client: {e}"))),
    };
    let body = d.payload.to_string().into_bytes();
    let ts = chrono::Utc::now().timestamp();
    let sig = match sign(&d.secret, &d.id, ts, &body) {
        Ok(s) => s,
        Err(e) => return (None, Some(e)),
    };
    let resp = client
        .post(url)
        .header("content-type", "application/json")
        .header("user-agent", "sparsegrad-service-webhooks")
        .header("webhook-id", &d.id)
        .header("webhook-timestamp", ts.to_string())
        .header("webhook-signature", sig)
        .body(body)
        .send()
        .await;
    match resp {
        Ok(r) => {
            let code = r.status().as_u16() as i32;
            if r.status().is_success() {
                (Some(code), None)
            } else {
                (Some(code), Some(format!("answered {}", r.status())))
            }
        }
        // No server path or internals: reqwest's message names the URL the tenant gave.
        Err(e) if e.is_timeout() => (None, Some(format!("timed out after {:?}", cfg.timeout))),
        Err(e) if e.is_connect() => (None, Some("could not connect".into())),
        Err(_) => (None, Some("the request failed".into())),
    }
}

/// Deliveries in flight at once per process: one slow receiver does not hold up the others.
const CONCURRENT: usize = 8;

async fn deliver_one(db: sqlx::PgPool, cfg: WebhookConfig, d: store::Due) -> sqlx::Result<()> {
    let started = Instant::now();
    let (code, error) = attempt(&d, &cfg).await;
    let retry_in = if error.is_none() {
        None
    } else {
        Some(cfg.retry_after(d.attempts))
    };
    let o = Outcome {
        status_code: code,
        error: error.as_deref(),
        duration_ms: started.elapsed().as_millis().min(i32::MAX as u128) as i32,
        retry_in,
    };
    store::finish_attempt(&db, &d.id, d.attempts, &o).await
}

/// Sends every delivery due now (and retries that fall due meanwhile), up to [`CONCURRENT`]
/// at once; how many attempts were made.
pub async fn deliver_due(db: &sqlx::PgPool, cfg: &WebhookConfig) -> sqlx::Result<usize> {
    let lease = cfg.timeout.as_secs_f64() * 3.0 + 10.0;
    let mut running = tokio::task::JoinSet::new();
    let mut n = 0;
    loop {
        while running.len() < CONCURRENT {
            match store::claim_due(db, lease).await? {
                Some(d) => {
                    running.spawn(deliver_one(db.clone(), cfg.clone(), d));
                }
                None => break,
            }
        }
        match running.join_next().await {
            None => return Ok(n),
            Some(r) => {
                n += 1;
                match r {
                    Ok(r) => r?,
                    // A panicked attempt's lease runs out and the delivery is retried.
                    Err(e) => tracing::warn!("webhook delivery task: {e}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_pass() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "198.18.0.1",
            "192.0.0.8",
        ] {
            assert!(!is_public(a.parse().unwrap()), "{a}");
        }
        for a in ["1.1.1.1", "93.184.216.34", "2606:4700:4700::1111"] {
            assert!(is_public(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn urls_must_be_https_unless_allowed() {
        let cfg = WebhookConfig::default();
        assert!(check_url("https://example.com/hook", &cfg).is_ok());
        for bad in [
            "http://example.com/hook",
            "ftp://example.com/",
            "https://user:pw@example.com/",
            "not a url",
            "file:///etc/passwd",
        ] {
            assert!(check_url(bad, &cfg).is_err(), "{bad}");
        }
        let allowed = WebhookConfig {
            allow_hosts: vec!["127.0.0.1".into()],
            ..cfg
        };
        assert!(check_url("http://127.0.0.1:9/hook", &allowed).is_ok());
    }

    #[test]
    fn retries_back_off_and_stop() {
        let cfg = WebhookConfig {
            max_attempts: 4,
            retry_base: Duration::from_secs(2),
            ..Default::default()
        };
        assert_eq!(cfg.retry_after(1), Some(2.0));
        assert_eq!(cfg.retry_after(2), Some(4.0));
        assert_eq!(cfg.retry_after(3), Some(8.0));
        assert_eq!(cfg.retry_after(4), None);
    }
}
