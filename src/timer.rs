//! Optional timers as futures: an absent deadline or interval never completes, which turns a
//! `select!` arm off without a second code path.

use tokio::time::{Instant, Interval};

/// Completes at `deadline`; never, without one.
pub async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Completes at the interval's next tick; never, without one.
pub async fn tick(interval: &mut Option<Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}
