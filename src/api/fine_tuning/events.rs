//! A job's events: a cursor list (newest first), or Server-Sent Events (oldest first, ending
//! once the job is final and everything is sent, resumable with `Last-Event-ID` or `after`;
//! woken by the job's notifications, never polling; at most `max_event_streams` per tenant).

use std::collections::VecDeque;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};

use super::job_for;
use crate::api::limits::StreamSlot;
use crate::api::objects::{event_id, EventObject, List};
use crate::api::{AppState, ListParams, Tenant};
use crate::db::job_records::{self as records, EventRow};
use crate::db::listen::JobWatch;
use crate::domain::JobKind;
use crate::error::{ApiError, ApiResult};

fn event_cursor(s: &str, param: &str) -> ApiResult<i64> {
    s.strip_prefix("ev_").unwrap_or(s).parse().map_err(|_| {
        ApiError::invalid(
            format!("not an event id: `{s}`"),
            Some(param),
            "invalid_cursor",
        )
    })
}

pub(super) async fn events(
    Tenant(tenant): Tenant,
    State(st): State<AppState>,
    Path(id): Path<String>,
    ListParams(p): ListParams,
    headers: HeaderMap,
) -> ApiResult<Response> {
    p.only(&[])?;
    job_for(&st, &tenant, &id).await?;
    let wants_stream = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if !wants_stream {
        let page = p.page(100)?;
        let after = page
            .after
            .as_deref()
            .map(|a| event_cursor(a, "after"))
            .transpose()?;
        if let Some(a) = after {
            if !records::has_event(&st.db, &id, a).await? {
                return Err(crate::api::unknown_cursor(
                    page.after.as_deref().unwrap_or_default(),
                ));
            }
        }
        let (rows, more) = records::events(&st.db, &id, after, page.limit, true).await?;
        let data = rows.iter().map(EventObject::from).collect();
        return Ok(axum::Json(List::new(data, more)).into_response());
    }
    // Resume after the last event the client saw (header), or the `after` cursor.
    let after = match headers.get("last-event-id").and_then(|v| v.to_str().ok()) {
        Some(v) => Some(event_cursor(v, "Last-Event-ID")?),
        None => p
            .after
            .as_deref()
            .map(|a| event_cursor(a, "after"))
            .transpose()?,
    };
    let slot = st.gates.stream(&tenant)?;
    Ok(
        Sse::new(event_stream(st, slot, tenant, id, after.unwrap_or(0)))
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response(),
    )
}

/// Events in order as they are written; ends once the job is final and everything is sent.
/// Between queries it waits for the job's notification, not on a timer.
fn event_stream(
    st: AppState,
    slot: StreamSlot,
    tenant: String,
    job_id: String,
    after: i64,
) -> impl futures::Stream<Item = Result<SseEvent, std::convert::Infallible>> {
    struct S {
        _slot: StreamSlot,
        news: JobWatch,
        st: AppState,
        tenant: String,
        job_id: String,
        after: i64,
        buf: VecDeque<EventRow>,
        last_poll_empty_and_final: bool,
    }
    let s = S {
        _slot: slot,
        news: st.signals.watch(&job_id),
        st,
        tenant,
        job_id,
        after,
        buf: Default::default(),
        last_poll_empty_and_final: false,
    };
    futures::stream::unfold(s, |mut s| async move {
        loop {
            if let Some(e) = s.buf.pop_front() {
                let body = serde_json::to_string(&EventObject::from(&e)).unwrap_or_default();
                let ev = SseEvent::default().id(event_id(e.id)).data(body);
                return Some((Ok(ev), s));
            }
            if s.last_poll_empty_and_final {
                return None;
            }
            // Seen before the queries: news arriving while they run wakes the wait below.
            s.news.mark_seen();
            // Status first, then events: a final status seen here means every event the
            // worker wrote before settling is visible to the query that follows.
            let status = match records::get(&s.st.db, &s.tenant, &s.job_id, JobKind::FineTune).await
            {
                Ok(Some(j)) => j.status,
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!("event stream: {e}");
                    return None;
                }
            };
            match records::events(&s.st.db, &s.job_id, Some(s.after), 200, false).await {
                Ok((rows, _)) if !rows.is_empty() => {
                    s.after = rows.last().map(|r| r.id).unwrap_or(s.after);
                    s.buf.extend(rows);
                }
                Ok(_) if status.is_final() => s.last_poll_empty_and_final = true,
                Ok(_) => s.news.changed().await,
                Err(e) => {
                    tracing::warn!("event stream: {e}");
                    return None;
                }
            }
        }
    })
}
