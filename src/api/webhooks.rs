//! `/v1/webhooks`: a tenant's endpoints (register, list, get, delete) and each endpoint's
//! deliveries with every attempt. The URL is checked when it is registered (https, a public
//! address unless the operator allows the host) and again at every delivery.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;

use super::objects::{Deleted, List, WebhookDeliveryObject, WebhookEndpointObject};
use super::{unknown_cursor, AppState, Json, ListParams, Tenant};
use crate::db::webhooks::{self as store, EndpointRow};
use crate::error::{ApiError, ApiResult};
use crate::webhooks::{check_url, new_secret, resolve, Refused, EVENTS};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/webhooks", get(list).post(create))
        .route("/webhooks/{id}", get(get_one).delete(delete))
        .route("/webhooks/{id}/deliveries", get(deliveries))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateEndpoint {
    url: String,
    /// Event types (default: all of [`EVENTS`]).
    #[serde(default)]
    events: Option<Vec<String>>,
}

async fn create(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Json(req): Json<CreateEndpoint>,
) -> ApiResult<axum::Json<WebhookEndpointObject>> {
    let cfg = st.cfg.webhooks();
    let bad_url = |Refused(m)| ApiError::invalid(m, Some("url"), "invalid_webhook_url");
    let url = check_url(&req.url, &cfg).map_err(bad_url)?;
    resolve(&url, &cfg).await.map_err(bad_url)?;
    let events = match req.events {
        None => EVENTS.iter().map(|e| e.to_string()).collect(),
        Some(ev) => {
            if ev.is_empty() || ev.len() > EVENTS.len() {
                return Err(ApiError::invalid(
                    format!("1 to {} of {}", EVENTS.len(), EVENTS.join(", ")),
                    Some("events"),
                    "invalid_value",
                ));
            }
            for (i, e) in ev.iter().enumerate() {
                if !EVENTS.contains(&e.as_str()) {
                    return Err(ApiError::invalid(
                        format!("one of {}", EVENTS.join(", ")),
                        Some(&format!("events[{i}]")),
                        "invalid_value",
                    ));
                }
            }
            let mut ev = ev;
            ev.sort();
            ev.dedup();
            ev
        }
    };
    let row = EndpointRow {
        id: crate::db::new_id("whep"),
        tenant_id: tenant,
        url: url.to_string(),
        secret: new_secret(),
        events,
        created_at: chrono::Utc::now(),
    };
    let max = st.cfg.max_webhook_endpoints;
    match store::insert_endpoint(&st.db, &row, max).await? {
        Some(r) => Ok(axum::Json(WebhookEndpointObject::new(&r, true))),
        None => Err(ApiError::conflict(
            format!("at most {max} webhook endpoints per tenant; delete one first"),
            "too_many_webhook_endpoints",
        )),
    }
}

async fn list(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    ListParams(p): ListParams,
) -> ApiResult<axum::Json<List<WebhookEndpointObject>>> {
    p.only(&[])?;
    let page = p.page(100)?;
    let (rows, more) = store::endpoints(&st.db, &tenant, &page)
        .await?
        .ok_or_else(|| unknown_cursor(page.after.as_deref().unwrap_or_default()))?;
    let data = rows
        .iter()
        .map(|r| WebhookEndpointObject::new(r, false))
        .collect();
    Ok(axum::Json(List::new(data, more)))
}

async fn endpoint_for(st: &AppState, tenant: &str, id: &str) -> ApiResult<EndpointRow> {
    store::endpoint(&st.db, tenant, id)
        .await?
        .ok_or_else(|| ApiError::not_found("webhook endpoint", id))
}

async fn get_one(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<WebhookEndpointObject>> {
    let r = endpoint_for(&st, &tenant, &id).await?;
    Ok(axum::Json(WebhookEndpointObject::new(&r, false)))
}

async fn delete(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<Deleted>> {
    if !store::delete_endpoint(&st.db, &tenant, &id).await? {
        return Err(ApiError::not_found("webhook endpoint", &id));
    }
    Ok(axum::Json(Deleted {
        id,
        object: "webhook_endpoint",
        deleted: true,
    }))
}

async fn deliveries(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path(id): Path<String>,
    ListParams(p): ListParams,
) -> ApiResult<axum::Json<List<WebhookDeliveryObject>>> {
    p.only(&[])?;
    endpoint_for(&st, &tenant, &id).await?;
    let page = p.page(100)?;
    let (rows, more) = store::deliveries(&st.db, &tenant, &id, &page)
        .await?
        .ok_or_else(|| unknown_cursor(page.after.as_deref().unwrap_or_default()))?;
    let data = rows
        .iter()
        .map(|(d, a)| WebhookDeliveryObject::new(d, a))
        .collect();
    Ok(axum::Json(List::new(data, more)))
}
