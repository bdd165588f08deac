//! Webhooks end to end on real Postgres and real HTTP: endpoints registered through the API,
//! terminal states queued by the database trigger, delivered by `deliver_due` to local
//! receivers, signatures verified with the `standardwebhooks` crate (crates.io, not ours).

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use sparsegrad_service::queue::{self, NewJob, QueueConfig};
use sparsegrad_service::webhooks::deliver_due;
use sqlx::PgPool;

use common::api::{assert_envelope, get, post_json, state_with, tenant_key};

type Hits = Arc<Mutex<Vec<(HeaderMap, Bytes)>>>;

/// A local receiver on `/hook` that answers 500 to the first `fail_first` requests of each
/// message (`webhook-id`), then 204.
async fn receiver(fail_first: usize) -> (SocketAddr, Hits) {
    let hits: Hits = Default::default();
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let h = h.clone();
            async move {
                let mut v = h.lock().unwrap();
                let id = headers.get("webhook-id").cloned();
                v.push((headers, body));
                let seen = v
                    .iter()
                    .filter(|(h, _)| h.get("webhook-id") == id.as_ref())
                    .count();
                if seen <= fail_first {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (addr, hits)
}

async fn finish_job(db: &PgPool, tenant: &str, id: &str) {
    queue::enqueue(db, &NewJob::fine_tune(id, tenant, json!({})))
        .await
        .unwrap();
    let (_, lease) = queue::claim(db, "w-test", &QueueConfig::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.job_id, id);
    queue::complete(db, &lease, &json!({})).await.unwrap();
}

fn verify(secret: &str, hit: &(HeaderMap, Bytes)) -> Value {
    standardwebhooks::Webhook::new(secret)
        .unwrap()
        .verify(&hit.1, &hit.0)
        .expect("a valid Standard Webhooks signature");
    serde_json::from_slice(&hit.1).unwrap()
}

#[sqlx::test(migrations = "./migrations")]
async fn terminal_states_arrive_signed_once_per_endpoint_and_failures_are_retried(db: PgPool) {
    let st = state_with(
        db.clone(),
        &[
            "--webhook-allow-hosts",
            "127.0.0.1",
            "--webhook-retry-base-secs",
            "0",
        ],
        None,
    );
    let (tenant, key) = tenant_key(&st, "acme").await;
    let (a, hits_a) = receiver(2).await;
    let (b, hits_b) = receiver(0).await;
    let (s, ep_a) = post_json(
        &st,
        "/v1/webhooks",
        Some(&key),
        json!({"url": format!("http://127.0.0.1:{}/hook", a.port())}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{ep_a}");
    let secret_a = ep_a["secret"].as_str().unwrap().to_string();
    assert!(secret_a.starts_with("whsec_"));
    let (s, ep_b) = post_json(
        &st,
        "/v1/webhooks",
        Some(&key),
        json!({"url": format!("http://127.0.0.1:{}/hook", b.port()),
               "events": ["fine_tuning.job.succeeded"]}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{ep_b}");
    let secret_b = ep_b["secret"].as_str().unwrap().to_string();
    // The secret is shown once.
    let (_, again) = get(
        &st,
        &format!("/v1/webhooks/{}", ep_a["id"].as_str().unwrap()),
        &key,
    )
    .await;
    assert!(again.get("secret").is_none(), "{again}");
    finish_job(&db, &tenant, "job_ok").await;
    queue::enqueue(&db, &NewJob::fine_tune("job_x", &tenant, json!({})))
        .await
        .unwrap();
    queue::cancel(&db, &tenant, "job_x").await.unwrap();

    let cfg = st.cfg.webhooks();
    for _ in 0..100 {
        deliver_due(&db, &cfg).await.unwrap();
        if hits_a.lock().unwrap().len() >= 6 && !hits_b.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Nothing more once delivered: at least once, and here exactly once per success.
    for _ in 0..3 {
        deliver_due(&db, &cfg).await.unwrap();
    }
    let hits_a = hits_a.lock().unwrap().clone();
    let hits_b = hits_b.lock().unwrap().clone();
    assert_eq!(hits_b.len(), 1, "B subscribes to successes only");
    let ev = verify(&secret_b, &hits_b[0]);
    assert_eq!(
        (
            ev["object"].as_str(),
            ev["type"].as_str(),
            ev["data"]["id"].as_str()
        ),
        (
            Some("event"),
            Some("fine_tuning.job.succeeded"),
            Some("job_ok")
        )
    );
    // A: each event three times (500, 500, then delivered) under one message id.
    assert_eq!(
        hits_a.len(),
        6,
        "{:?}",
        hits_a.iter().map(|h| h.1.clone()).collect::<Vec<_>>()
    );
    let events: Vec<Value> = hits_a.iter().map(|h| verify(&secret_a, h)).collect();
    let id_of = |h: &(HeaderMap, Bytes)| h.0["webhook-id"].to_str().unwrap().to_string();
    let ok: Vec<usize> = (0..6)
        .filter(|&i| events[i]["type"] == "fine_tuning.job.succeeded")
        .collect();
    assert_eq!(ok.len(), 3);
    assert!(ok
        .iter()
        .all(|&i| id_of(&hits_a[i]) == id_of(&hits_a[ok[0]])));
    assert!(ok.iter().all(|&i| events[i]["id"] == events[ok[0]]["id"]));
    let cancelled: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "fine_tuning.job.cancelled")
        .collect();
    assert_eq!(cancelled.len(), 3);
    assert_eq!(cancelled[0]["data"]["id"], "job_x");
    // A tampered body does not verify (the check can fail).
    let mut forged = hits_a[0].clone();
    forged.1 = Bytes::from(forged.1.iter().copied().rev().collect::<Vec<u8>>());
    assert!(standardwebhooks::Webhook::new(&secret_a)
        .unwrap()
        .verify(&forged.1, &forged.0)
        .is_err());
    // The attempts are visible through the API.
    let (s, d) = get(
        &st,
        &format!("/v1/webhooks/{}/deliveries", ep_a["id"].as_str().unwrap()),
        &key,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{d}");
    let data = d["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let succ = data
        .iter()
        .find(|x| x["type"] == "fine_tuning.job.succeeded")
        .unwrap();
    assert_eq!(succ["status"], "succeeded");
    let codes: Vec<Value> = succ["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status_code"].clone())
        .collect();
    assert_eq!(codes, [json!(500), json!(500), json!(204)]);
    assert_eq!(succ["id"].as_str().unwrap(), id_of(&hits_a[ok[0]]));
}

#[sqlx::test(migrations = "./migrations")]
async fn private_and_loopback_urls_are_refused_unless_the_operator_allows_them(db: PgPool) {
    let st = state_with(db.clone(), &["--max-webhook-endpoints", "1"], None);
    let (tenant, key) = tenant_key(&st, "acme").await;
    let (_, other) = tenant_key(&st, "rival").await;
    let (port, hits) = receiver(0).await;
    for (body, param) in [
        (
            json!({"url": format!("http://127.0.0.1:{}/hook", port.port())}),
            "url",
        ),
        (json!({"url": "https://127.0.0.1/hook"}), "url"),
        (json!({"url": "https://10.0.0.7/hook"}), "url"),
        (
            json!({"url": "https://169.254.169.254/latest/meta-data"}),
            "url",
        ),
        (json!({"url": "https://[::1]/hook"}), "url"),
        (json!({"url": "https://[::ffff:127.0.0.1]/hook"}), "url"),
        (json!({"url": "https://localhost/hook"}), "url"),
        (json!({"url": "ftp://93.184.216.34/"}), "url"),
        (json!({"url": "https://u:p@93.184.216.34/"}), "url"),
        (
            json!({"url": format!("https://93.184.216.34/{}", "a".repeat(3000))}),
            "url",
        ),
        (
            json!({"url": "https://93.184.216.34/", "events": ["fine_tuning.job.created"]}),
            "events[0]",
        ),
        (
            json!({"url": "https://93.184.216.34/", "events": []}),
            "events",
        ),
    ] {
        let (s, v) = post_json(&st, "/v1/webhooks", Some(&key), body.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_envelope(&v, "invalid_request_error");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
    }
    let (s, v) = post_json(
        &st,
        "/v1/webhooks",
        Some(&key),
        json!({"url": "https://93.184.216.34/", "secret": "mine"}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    // A public address registers; past the tenant's cap is a 409.
    let (s, ep) = post_json(
        &st,
        "/v1/webhooks",
        Some(&key),
        json!({"url": "https://93.184.216.34/hook"}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{ep}");
    let (s, v) = post_json(
        &st,
        "/v1/webhooks",
        Some(&key),
        json!({"url": "https://93.184.216.35/hook"}),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("too_many_webhook_endpoints"))
    );
    // Another tenant sees none of it.
    let id = ep["id"].as_str().unwrap();
    for uri in [
        format!("/v1/webhooks/{id}"),
        format!("/v1/webhooks/{id}/deliveries"),
    ] {
        let (s, _) = get(&st, &uri, &other).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{uri}");
    }
    let (_, l) = get(&st, "/v1/webhooks", &other).await;
    assert_eq!(l["data"].as_array().unwrap().len(), 0);

    // Deleted, it is gone (and not tried below: nothing on this machine reaches the internet).
    let r = common::api::delete(&st, &format!("/v1/webhooks/{id}"), &key).await;
    assert_eq!(r.status, StatusCode::OK);
    let (s, _) = get(&st, &format!("/v1/webhooks/{id}"), &key).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // The guard holds at delivery too: an endpoint whose address is loopback (written past
    // the API, as a name that later resolves there would be) is never contacted.
    sqlx::query(
        "insert into webhook_endpoints (id, tenant_id, url, secret, events)
         values ('whep_sneaky', $1, $2, 'whsec_c2VjcmV0c2VjcmV0c2VjcmV0', $3)",
    )
    .bind(&tenant)
    .bind(format!("https://127.0.0.1:{}/hook", port.port()))
    .bind(vec!["fine_tuning.job.succeeded".to_string()])
    .execute(&db)
    .await
    .unwrap();
    finish_job(&db, &tenant, "job_ok").await;
    let cfg = sparsegrad_service::webhooks::WebhookConfig {
        max_attempts: 2,
        retry_base: std::time::Duration::ZERO,
        ..st.cfg.webhooks()
    };
    deliver_due(&db, &cfg).await.unwrap();
    assert!(
        hits.lock().unwrap().is_empty(),
        "a loopback receiver was contacted"
    );
    let (status, errors): (String, Vec<Option<String>>) = sqlx::query_as(
        "select d.status, array_agg(a.error order by a.attempt) from webhook_deliveries d
           join webhook_attempts a on a.delivery_id = d.id
          where d.endpoint_id = 'whep_sneaky' group by d.status",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(status, "failed");
    assert!(
        errors.iter().all(|e| e
            .as_deref()
            .unwrap_or_default()
            .contains("not a public address")),
        "{errors:?}"
    );
}
