//! The shutdown flag every long-running task watches: a `watch` channel that turns true once
//! (SIGTERM / ctrl-c in `server::run`; tests set it themselves).

use tokio::sync::watch;

/// Resolves once the flag is true; never, if its sender is gone without setting it (whoever
/// dropped it will not ask to stop).
pub async fn until_true(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}
