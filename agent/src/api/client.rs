//! A client of the admin API, for the `idgate sessions` and `idgate whois` commands.

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::{Method, Request, client::conn::http1};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use super::ApiError;

/// Sends one request to the admin socket at `socket`; returns the status and the JSON body.
pub async fn request(
    socket: &Path,
    method: Method,
    path_and_query: &str,
) -> Result<(u16, serde_json::Value), ApiError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| ApiError::Socket {
            path: socket.to_owned(),
            reason: format!("connecting: {e} (is idgate running, and may you use its socket?)"),
        })?;
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ApiError::Client(e.to_string()))?;
    let driver = tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path_and_query)
        // HTTP/1.1 requires a Host; the socket has none.
        .header(hyper::header::HOST, "idgate")
        .body(Empty::<Bytes>::new())
        .map_err(|e| ApiError::Client(e.to_string()))?;
    let response = sender
        .send_request(req)
        .await
        .map_err(|e| ApiError::Client(e.to_string()))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| ApiError::Client(e.to_string()))?
        .to_bytes();
    driver.abort();
    let value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::Client(format!("the answer is not JSON: {e}")))?;
    Ok((status, value))
}

/// `s` escaped for a URL path segment or query value (IPv6 colons and user names alike).
pub fn escape(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}
