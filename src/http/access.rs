//! The access log: one line per request, written through Python `logging`
//! by a `Batcher` thread, so I/O threads never wait for the interpreter.

use std::net::SocketAddr;
use std::time::Duration;

use crate::batch::Batcher;

/// Lines waiting for the log thread; beyond this they are counted and dropped.
pub const CAPACITY: usize = 16 * 1024;

pub type AccessLog = Batcher<String>;

/// One request's line: client, request line, status, body bytes and time
/// taken, e.g. `203.0.113.7:51234 - "GET /users/1?x=1 HTTP/1.1" 200 27 0.412ms`.
pub fn line(
    client: Option<SocketAddr>,
    method: &http::Method,
    uri: &http::Uri,
    version: http::Version,
    status: u16,
    bytes: Option<u64>,
    took: Duration,
) -> String {
    let client = client.map_or_else(|| "-".to_string(), |c| c.to_string());
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let bytes = bytes.map_or_else(|| "-".to_string(), |b| b.to_string());
    let ms = took.as_secs_f64() * 1000.0;
    format!("{client} - \"{method} {target} {version:?}\" {status} {bytes} {ms:.3}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_names_client_request_status_size_and_time() {
        let uri: http::Uri = "/users/1?x=1".parse().unwrap();
        let text = line(
            Some("203.0.113.7:51234".parse().unwrap()),
            &http::Method::GET,
            &uri,
            http::Version::HTTP_11,
            200,
            Some(27),
            Duration::from_micros(412),
        );
        assert_eq!(
            text,
            "203.0.113.7:51234 - \"GET /users/1?x=1 HTTP/1.1\" 200 27 0.412ms"
        );
        let text = line(
            None,
            &http::Method::POST,
            &"/".parse().unwrap(),
            http::Version::HTTP_10,
            503,
            None,
            Duration::ZERO,
        );
        assert_eq!(text, "- - \"POST / HTTP/1.0\" 503 - 0.000ms");
    }
}
