//! The HTTP listener, with the limits a public server needs and `axum::serve` does not set:
//! a cap on open connections (past it, new ones wait in the listen backlog, and the process
//! never runs out of file descriptors), a deadline for each request's headers — which also
//! closes kept-alive connections left idle and connections that never send anything — and a
//! deadline for request bodies that stop sending. Responses go out over HTTP/1.1, as the
//! SDKs speak it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

use crate::shutdown::until_true;

#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub body_idle_timeout: Duration,
    /// How long shutdown waits for requests in flight (event streams never end by themselves).
    pub drain: Duration,
}

/// File descriptors kept for everything but client connections: Postgres, storage, model
/// files, the runtime.
const RESERVED_FDS: u64 = 256;

/// Raises the soft open-files limit to the hard one and returns the connection cap that fits
/// under it (the configured cap, lowered with a warning if the limit is too small).
pub fn fit_connections(wanted: usize) -> usize {
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024);
    let fits = limit.saturating_sub(RESERVED_FDS).max(16) as usize;
    if wanted > fits {
        tracing::warn!(
            "the open-files limit is {limit}: serving at most {fits} connections, not {wanted} \
             (raise LimitNOFILE / ulimit -n)"
        );
        fits
    } else {
        wanted
    }
}

/// Serves `app` on `listener` until `stop` turns true, then lets requests in flight finish
/// for up to `limits.drain`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (closing_tx, closing_rx) = watch::channel(false);
    loop {
        // A slot first: at the cap, connections queue in the kernel's backlog instead of
        // taking file descriptors.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("never closed"),
            _ = until_true(&mut stop) => break,
        };
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept error: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = until_true(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let idle = limits.body_idle_timeout;
        let svc =
            app.clone()
                .map_request(move |req: axum::http::Request<hyper::body::Incoming>| {
                    req.map(|b| Body::new(IdleTimeout::new(b, idle)))
                });
        let mut closing = closing_rx.clone();
        let header_timeout = limits.header_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = until_true(&mut closing) => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    // Every connection holds a slot until it ends: all slots back means all are done.
    let all = u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX);
    if tokio::time::timeout(limits.drain, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::info!(
            "connections still open after {:?}: closing them",
            limits.drain
        );
    }
    Ok(())
}

/// A request body that fails once no frame has arrived for `idle` while the handler waits
/// for one (time the handler spends elsewhere does not count).
struct IdleTimeout<B> {
    inner: B,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    waiting: bool,
}

impl<B> IdleTimeout<B> {
    fn new(inner: B, idle: Duration) -> Self {
        IdleTimeout {
            inner,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
            waiting: false,
        }
    }
}

impl<B> HttpBody for IdleTimeout<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if !this.waiting {
            this.waiting = true;
            let at = Instant::now() + this.idle;
            this.deadline.as_mut().reset(at);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(f) => {
                this.waiting = false;
                Poll::Ready(f.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                    "no request body bytes arrived for {} s",
                    this.idle.as_secs()
                )
                .into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
