//! Serves the API router — REST and gRPC on one port, HTTP/1.1 and HTTP/2 — with the
//! gateway's connection settings, and shuts down gracefully: on the signal it stops
//! accepting, asks every connection to finish (HTTP/2 GOAWAY; HTTP/1.1 closes after the
//! request in progress) and returns once they have. Also the middleware that closes an
//! HTTP/1.1 connection whose request body was left unread ([`close_if_body_unread`]).
//!
//! Why not `axum::serve`: it offers no HTTP/2 settings, and hyper's defaults (a 1 MiB receive
//! window per connection, 16 KiB frames) cap a gRPC client that streams ~0.5 MiB batches over
//! one connection — the usual gRPC setup — at what one window per round trip carries: the
//! ingest benchmark's four `PublishStream`s over one connection did 158–162k events/s, and
//! the same streams over four connections 219–261k (docs/benchmarks.md). Larger windows let
//! one connection carry what the gateway can take; the bytes a client may send ahead are still
//! bounded (per stream and per connection, below: 2 and 8 MiB kept the gateway's peak RSS
//! under the gRPC load ~60 MiB lower than 4 and 16 MiB, at the same rates), and requests are
//! admitted against the ingest byte budget as before.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// Bytes a client may send on one HTTP/2 stream before the gateway has read them.
pub const H2_STREAM_WINDOW: u32 = 2 << 20;
/// Bytes a client may send on one HTTP/2 connection (all its streams) before the gateway has
/// read them.
pub const H2_CONNECTION_WINDOW: u32 = 8 << 20;
/// Largest HTTP/2 frame the gateway accepts (fewer frames, and wake-ups, per large message).
pub const H2_MAX_FRAME: u32 = 256 << 10;

/// Middleware: an HTTP/1.x response to a request whose body the handler did not read to the
/// end (refused before reading: a wrong token, a bad plugin name; or larger than the cap up
/// to which oversized bodies are drained) says `Connection: close`. hyper closes such a
/// connection after the response rather than read the rest; without the header a client puts
/// the connection back in its pool, and its next request on it fails with a broken pipe (seen
/// in the e2e suite after a plugin upload refused for its name).
pub async fn close_if_body_unread(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use hyper::body::Body as _;
    if !matches!(
        req.version(),
        axum::http::Version::HTTP_10 | axum::http::Version::HTTP_11
    ) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let read = Arc::new(AtomicBool::new(body.is_end_stream()));
    let body = axum::body::Body::new(ReadToEnd {
        inner: body,
        read: read.clone(),
    });
    let mut response = next
        .run(axum::extract::Request::from_parts(parts, body))
        .await;
    if !read.load(Ordering::Acquire) {
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    response
}

/// A request body that notes when it has been read to its end.
struct ReadToEnd {
    inner: axum::body::Body,
    read: Arc<AtomicBool>,
}

impl hyper::body::Body for ReadToEnd {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None)) || self.inner.is_end_stream() {
            self.read.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

fn builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_frame_size(H2_MAX_FRAME)
        .enable_connect_protocol();
    builder
}

/// Serves `app` on `listener` until `shutdown` completes, then drains the connections.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let builder = builder();
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(error = %e, "cannot accept a connection; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Small responses (acks) go out at once.
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::post;
    use http_body_util::{BodyExt, StreamBody};
    use std::sync::Arc;
    use tokio::sync::Notify;

    /// A client may send up to the advertised windows before the gateway reads anything: a
    /// 1.75 MiB request body (more than hyper's default 1 MiB windows, less than the 2 MiB
    /// stream window) is sent in full while the handler has not started reading it. With the
    /// defaults the sender stalls after ~1 MiB and the test times out. Then shutdown drains
    /// the connection and stops accepting.
    #[tokio::test]
    async fn http2_windows_let_a_client_send_ahead_and_shutdown_is_graceful() {
        const BODY: usize = 1792 << 10;
        const CHUNK: usize = 64 << 10;
        let all_sent = Arc::new(Notify::new());
        let app = Router::new().route(
            "/len",
            post({
                let all_sent = all_sent.clone();
                move |body: axum::body::Body| async move {
                    // Read nothing until the client has handed over the whole body.
                    all_sent.notified().await;
                    let bytes = body.collect().await.unwrap().to_bytes();
                    bytes.len().to_string()
                }
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app, async {
            let _ = stop_rx.await;
        }));

        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        let conn_task = tokio::spawn(conn);
        // The body comes from a channel of one chunk: each send returns only once the
        // connection has taken the previous chunk, which flow control allows only within the
        // server's windows.
        let (tx, rx) = tokio::sync::mpsc::channel::<
            Result<hyper::body::Frame<axum::body::Bytes>, std::convert::Infallible>,
        >(1);
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let req = hyper::Request::post(format!("http://{addr}/len"))
            .body(body)
            .unwrap();
        send.ready().await.unwrap();
        let response = tokio::spawn(send.send_request(req));
        let chunk = axum::body::Bytes::from(vec![b'x'; CHUNK]);
        tokio::time::timeout(Duration::from_secs(10), async {
            for _ in 0..BODY / CHUNK {
                tx.send(Ok(hyper::body::Frame::data(chunk.clone())))
                    .await
                    .unwrap();
            }
        })
        .await
        .expect("the whole body is sent before the server reads any of it");
        drop(tx);
        all_sent.notify_one();
        let resp = response.await.unwrap().unwrap();
        assert_eq!(resp.status(), 200);
        let text = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(text, BODY.to_string().as_bytes());

        // Shutdown: the server stops accepting and returns once this connection is closed.
        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server drains its connections and returns")
            .unwrap();
        let _ = conn_task.await;
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "no longer accepting"
        );
    }
}
