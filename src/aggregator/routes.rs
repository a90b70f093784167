//! The aggregator's routes: `/metrics`, health, readiness and the status page.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::StatusCode;

use super::Shared;
use crate::clock;
use crate::http::{self, Handler};

/// Every route answers from memory: nothing here waits for the disk or a target.
pub(super) fn handler(shared: Arc<Shared>) -> Handler {
    http::handler(move |path: String| {
        let shared = shared.clone();
        async move { routes(&shared, &path) }
    })
}

fn routes(shared: &Shared, path: &str) -> Option<http::Reply> {
    match path {
        "/metrics" => Some(http::metrics(&shared.metrics.registry)),
        "/-/healthy" => Some(http::text(StatusCode::OK, "text/plain", "OK\n")),
        "/-/ready" => Some(match shared.unready() {
            None => http::text(StatusCode::OK, "text/plain", "OK\n"),
            Some(why) => http::text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", why),
        }),
        "/" => Some(http::text(
            StatusCode::OK,
            "text/html; charset=utf-8",
            shared.status_page.read().expect("status page lock").clone(),
        )),
        _ => None,
    }
}

impl Shared {
    /// Why the aggregator is not ready, if it is not: before the first round, while the
    /// ledger cannot be written, or while a write hangs.
    fn unready(&self) -> Option<String> {
        if !self.first_round.load(Ordering::Relaxed) {
            return Some("first scrape round not finished\n".into());
        }
        let books = self.books.lock().expect("books lock");
        if books.failing() {
            return Some(
                "the ledger cannot be written (see the log); sealed minutes are kept in memory\n"
                    .into(),
            );
        }
        match books.write_in_flight_for(clock::monotonic_now()) {
            Some(for_) if for_ > self.write_deadline => Some(format!(
                "a ledger write has not finished for {} s (is the disk hung?)\n",
                for_.as_secs()
            )),
            _ => None,
        }
    }
}
