//! The HTTP/1.1 connections: accepted up to a limit (more get a 503 and are closed), each with a
//! deadline for its request headers (slow or half-open clients, idle keep-alive ones included)
//! and a bound on its requests; requests with a deadline of their own (`limits.request`, which
//! covers reading the body); on shutdown, in-flight requests get `limits.shutdown` to finish,
//! then every connection is dropped.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Per-connection and per-request bounds.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Open connections at once.
    pub connections: usize,
    /// To receive a request's headers, and between requests on a kept-alive connection.
    pub headers: Duration,
    /// A request from its headers to its response's headers (the body read included).
    pub request: Duration,
    /// For in-flight requests once shutdown begins.
    pub shutdown: Duration,
}

/// The answer to a connection past [`Limits::connections`].
fn busy() -> String {
    let body = r#"{"error":{"message":"too many open connections; retry shortly","type":"server_error","param":null,"code":"busy"}}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Serves `app` on `listener` until `shutdown` completes, then drains (see the module doc).
pub async fn serve(listener: TcpListener, app: Router, limits: Limits, shutdown: impl Future<Output = ()>) {
    let slots = Arc::new(Semaphore::new(limits.connections.max(1)));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors (or a connection reset before accept): wait, retry.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // A few hundred bytes into a fresh socket's buffer: one write, never waiting on the client.
            let _ = stream.try_write(busy().as_bytes());
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.headers)
            .max_buf_size(64 * 1024)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener); // no new connections while draining
    if tokio::time::timeout(limits.shutdown, graceful.shutdown()).await.is_err() {
        eprintln!(
            "lowrank serve: requests still running after the {} s shutdown deadline are cancelled",
            limits.shutdown.as_secs()
        );
    }
}

/// `limits.request` on every request: past it, 408 (OpenAI's error shape) and the request is
/// dropped (a generation it started is cancelled with it).
pub async fn deadline(
    axum::extract::State(limit): axum::extract::State<Duration>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => super::api::ApiError {
            status: axum::http::StatusCode::REQUEST_TIMEOUT,
            message: format!("the request took longer than the server's {} s limit", limit.as_secs()),
            kind: "invalid_request_error",
            code: Some("timeout"),
        }
        .into_response(),
    }
}
