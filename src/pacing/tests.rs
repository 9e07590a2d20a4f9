//! One tenant's budgets together: reporting inside the whole, refusals
//! that take nothing, waiters that leave.

use std::time::Duration;

use super::*;

fn limits(overall: &str, reporting: Option<&str>, max_wait_ms: u64) -> Limits {
    Limits {
        overall: Some(Rate::parse(overall).unwrap()),
        reporting: reporting.map(|r| {
            let globs = Globs::new(&["/*/statistics/report".to_owned()]).unwrap();
            (Rate::parse(r).unwrap(), globs)
        }),
        max_wait: Duration::from_millis(max_wait_ms),
    }
}

const REPORT: &str = "/v/statistics/report";

#[tokio::test(start_paused = true)]
async fn a_refused_reporting_request_takes_nothing_from_the_tenants_budget() {
    // A burst of two in the tenant's budget: the report takes one.
    let p = Pacing::new(limits("20/sec", Some("1/min"), 500)).unwrap();
    assert_eq!(p.admit(REPORT).await.unwrap(), None);
    // The reporting budget is spent for a minute: refused, at once...
    let refused = p.admit(REPORT).await.unwrap_err();
    assert!(refused.retry_after > Duration::from_secs(50));
    // ...and the tenant's budget still has its next turn free.
    assert_eq!(p.admit("/v/advertisers/me").await.unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_that_leaves_gives_its_turn_back() {
    let p = Pacing::new(limits("1/sec", None, 5000)).unwrap();
    assert_eq!(p.admit("/a").await.unwrap(), None);
    {
        let waiting = std::pin::pin!(p.admit("/a"));
        // Polled once: it reserved its turn and sleeps.
        assert!(futures_poll_once(waiting).await);
        assert_eq!(p.waiting(), 1);
    }
    assert_eq!(p.waiting(), 0);
    // The next request gets the same turn, not one after it.
    let waited = p.admit("/a").await.unwrap().unwrap();
    assert!(waited <= Duration::from_millis(1100), "{waited:?}");
}

/// Polls `fut` once; true if it is still pending.
async fn futures_poll_once<F: Future>(mut fut: std::pin::Pin<&mut F>) -> bool {
    std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx).is_pending())).await
}

#[tokio::test(start_paused = true)]
async fn a_reporting_request_waits_for_both_budgets() {
    let p = Pacing::new(limits("1/sec", Some("10/sec"), 5000)).unwrap();
    assert_eq!(p.admit(REPORT).await.unwrap(), None);
    // The reporting budget has room; the tenant's does not for a second.
    let waited = p.admit(REPORT).await.unwrap().unwrap();
    assert!(waited >= Duration::from_secs(1), "{waited:?}");
}
