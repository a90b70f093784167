//! The layers every request passes through between the connection (auth already checked)
//! and the route table: header size, method, body limit, request timeout. They wrap the
//! handler once, in [`stack`], so no route can forget one.
//!
//! Written here rather than taken from tower-http (`TimeoutLayer`,
//! `RequestBodyLimitLayer`), after weighing both: each of ours is a few lines over a
//! request's head, where tower-http's would bring tower's `Service` and poll-ready
//! machinery, and their body wrappers, into a server that has three routes, no request
//! bodies (GET and HEAD only) and its own connection tracking. tower-http's timeout also
//! answers `408 Request Timeout`, which tells the client *it* was slow; a route that does
//! not answer in time is ours to own, so ours answers `503`. axum would have meant
//! replacing the server, not layering it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{ALLOW, CONNECTION, CONTENT_LENGTH};
use hyper::{Method, Request, Response, StatusCode};

use super::{refusal, text};

/// A response, whole: every answer here is built in memory.
pub type Reply = Response<Full<Bytes>>;

/// A route's answer on its way: `None` is "no such route" (404).
pub type Answer = Pin<Box<dyn Future<Output = Option<Reply>> + Send>>;

/// The route table of a server: a GET or HEAD request's path in, its answer out. Async,
/// so that a route that must wait (a lock, a blocking thread) waits without holding a
/// runtime thread, and within [`REQUEST_TIMEOUT`].
pub type Handler = Arc<dyn Fn(String) -> Answer + Send + Sync>;

/// A [`Handler`] from an async function of the path.
pub fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Option<Reply>> + Send + 'static,
{
    Arc::new(move |path| Box::pin(f(path)))
}

/// An answer on its way out of a layer.
pub(crate) type Pending = Pin<Box<dyn Future<Output = Reply> + Send>>;

/// A request's head (its body is never read: GET and HEAD only) through the layers to
/// its answer.
pub(crate) type Service = Arc<dyn Fn(Request<()>) -> Pending + Send + Sync>;

/// Scrapers and browsers send a few hundred bytes of headers; anything far larger is
/// refused before it reaches a handler.
pub(crate) const MAX_HEADER_BYTES: usize = 16 * 1024;

/// GET and HEAD carry no body worth reading; a client that announces a larger one than
/// this is refused (413) and its connection closed rather than drained.
pub(crate) const MAX_BODY_BYTES: u64 = 64 * 1024;

/// How long a route may take to answer. Every route answers from memory, so this is a
/// backstop: a route stuck on a lock or a thread answers 503 instead of holding the
/// connection (and the client) for ever.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The handler inside every layer, outermost first: header size, method, body limit,
/// timeout.
pub(crate) fn stack(handler: Handler) -> Service {
    header_limit(
        MAX_HEADER_BYTES,
        get_or_head(body_limit(
            MAX_BODY_BYTES,
            timeout(REQUEST_TIMEOUT, route(handler)),
        )),
    )
}

/// A layer's own answer, without going further in.
fn answered(r: Reply) -> Pending {
    Box::pin(async move { r })
}

/// The innermost service: the route table, 404 where it has no route.
fn route(handler: Handler) -> Service {
    Arc::new(move |req: Request<()>| {
        let answer = handler(req.uri().path().to_string());
        Box::pin(async move {
            answer
                .await
                .unwrap_or_else(|| text(StatusCode::NOT_FOUND, "text/plain", "not found\n"))
        })
    })
}

/// Refuses requests whose headers (and target) exceed `max` bytes: 431, connection closed.
fn header_limit(max: usize, inner: Service) -> Service {
    Arc::new(move |req: Request<()>| {
        let bytes: usize = req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>()
            + req.uri().to_string().len();
        if bytes > max {
            return answered(refusal(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request headers too large\n",
                CONNECTION,
                "close",
            ));
        }
        inner(req)
    })
}

/// Only GET and HEAD reach the routes; anything else gets 405 with `Allow`.
fn get_or_head(inner: Service) -> Service {
    Arc::new(move |req: Request<()>| {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return answered(refusal(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n",
                ALLOW,
                "GET, HEAD",
            ));
        }
        inner(req)
    })
}

/// Refuses a request that announces a body over `max` bytes (`Content-Length`): 413,
/// connection closed, the body never read. No route reads a body, so a chunked one is
/// never read either: hyper keeps at most its read buffer of it and closes a connection
/// whose body was left unread.
fn body_limit(max: u64, inner: Service) -> Service {
    Arc::new(move |req: Request<()>| {
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > max) {
            return answered(refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body too large (at most {max} bytes)\n"),
                CONNECTION,
                "close",
            ));
        }
        inner(req)
    })
}

/// Answers 503 when `inner` has not answered within `limit`.
fn timeout(limit: Duration, inner: Service) -> Service {
    Arc::new(move |req: Request<()>| {
        let answer = inner(req);
        Box::pin(async move {
            match tokio::time::timeout(limit, answer).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(
                        timeout_s = limit.as_secs_f64(),
                        "a request was not answered in time"
                    );
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        format!("no answer within {} s\n", limit.as_secs()),
                    )
                }
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> Handler {
        handler(|path: String| async move {
            match path.as_str() {
                "/" => Some(text(StatusCode::OK, "text/plain", "home\n")),
                "/slow" => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Some(text(StatusCode::OK, "text/plain", "late\n"))
                }
                _ => None,
            }
        })
    }

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    async fn body(r: Reply) -> String {
        use http_body_util::BodyExt;
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn routes_answer_and_unknown_paths_are_404() {
        let s = stack(routes());
        let r = s(get("/")).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(body(r).await, "home\n");
        let r = s(Request::head("/").body(()).unwrap()).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(s(get("/nope")).await.status(), StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn other_methods_get_405_with_allow() {
        let s = stack(routes());
        for m in [Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS] {
            let r = s(Request::builder().method(m).uri("/").body(()).unwrap()).await;
            assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
            assert_eq!(r.headers()[ALLOW], "GET, HEAD");
        }
    }

    #[tokio::test]
    async fn oversized_headers_get_431_and_close() {
        let s = stack(routes());
        let big = "x".repeat(MAX_HEADER_BYTES);
        let r = s(Request::get("/").header("x-big", big).body(()).unwrap()).await;
        assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        assert_eq!(r.headers()[CONNECTION], "close");
        // Just under the limit passes.
        let fits = "x".repeat(MAX_HEADER_BYTES - 100);
        let r = s(Request::get("/").header("x-big", fits).body(()).unwrap()).await;
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_body_over_the_limit_gets_413_and_close() {
        let s = stack(routes());
        let with_length = |n: u64| {
            Request::get("/")
                .header(CONTENT_LENGTH, n.to_string())
                .body(())
                .unwrap()
        };
        let r = s(with_length(MAX_BODY_BYTES + 1)).await;
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(r.headers()[CONNECTION], "close");
        // A small body (ignored) and none at all reach the route.
        assert_eq!(s(with_length(10)).await.status(), StatusCode::OK);
        assert_eq!(
            s(with_length(MAX_BODY_BYTES)).await.status(),
            StatusCode::OK
        );
        // The method is checked before the body: a POST with a large body is a 405.
        let post = Request::post("/")
            .header(CONTENT_LENGTH, "999999999")
            .body(())
            .unwrap();
        assert_eq!(s(post).await.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn a_route_that_does_not_answer_in_time_gets_503() {
        let s = timeout(Duration::from_millis(50), route(routes()));
        let started = crate::clock::monotonic_now();
        let r = s(get("/slow")).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(crate::clock::elapsed(started) < Duration::from_secs(10));
        // A prompt route is untouched by the timeout.
        assert_eq!(s(get("/")).await.status(), StatusCode::OK);
    }
}
