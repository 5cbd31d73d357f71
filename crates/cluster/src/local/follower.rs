//! The background follower of a `local` handle: polls the shared membership at a fixed
//! interval, removes dead members (so a `kill -9` shows up within about one interval)
//! and publishes what it sees on the handle's watch.
//!
//! It holds only a weak reference to the handle, so dropping the handle (a simulated
//! crash) releases the node's liveness at once and ends the follower at its next tick.

use super::{run_blocking, Inner};
use crate::ClusterError;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::time::MissedTickBehavior;

/// Shortest poll interval accepted, so a misconfiguration cannot spin on the disk.
const POLL_INTERVAL_MIN_MS: u64 = 10;

/// Starts the follower of `inner` on the current tokio runtime; fails outside one.
pub(super) fn start(inner: &Arc<Inner>) -> Result<(), String> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|e| e.to_string())?;
    let interval_ms = inner.options.poll_interval_ms.max(POLL_INTERVAL_MIN_MS);
    let reap = inner.options.reap_in_follower;
    let store = inner.store.clone();
    let weak = Arc::downgrade(inner);
    runtime.spawn(follow(
        weak,
        store,
        Duration::from_millis(interval_ms),
        reap,
    ));
    Ok(())
}

async fn follow(inner: Weak<Inner>, store: Arc<super::Store>, interval: Duration, reap: bool) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    loop {
        ticker.tick().await;
        if inner.strong_count() == 0 {
            return;
        }
        let result = run_blocking(store.clone(), move |store| {
            if reap {
                store.reap_dead()?;
            }
            store.membership()
        })
        .await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        match result {
            Ok(membership) => {
                inner.publish(&membership);
                last_error = None;
            }
            Err(e) => report(&mut last_error, &e),
        }
    }
}

/// Logs a follower error once, not on every tick while it lasts.
fn report(last_error: &mut Option<String>, error: &ClusterError) {
    let text = error.to_string();
    if last_error.as_deref() != Some(text.as_str()) {
        tracing::warn!("cluster follower: {text}");
        *last_error = Some(text);
    }
}
