//! A raw TCP client, for what an HTTP client library will not do: stay
//! silent, send half a request, stall mid-body, or send `CONNECT`.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a test waits for the server to close a connection: generous,
/// far above the small timeouts the tests configure.
pub const CLOSE_WITHIN: Duration = Duration::from_secs(10);

/// Connects to `url` (`http://host:port`).
pub async fn connect(url: &str) -> TcpStream {
    TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .unwrap()
}

/// Connects and sends `bytes`.
pub async fn send(url: &str, bytes: &[u8]) -> TcpStream {
    let mut s = connect(url).await;
    s.write_all(bytes).await.unwrap();
    s
}

/// Reads until the server closes the connection (end of stream or reset),
/// and returns what it sent before. Panics if it is still open after
/// [`CLOSE_WITHIN`].
pub async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(CLOSE_WITHIN, read)
        .await
        .expect("the server closes the connection");
    got
}

/// Reads one HTTP/1.1 response head (status line and headers).
pub async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let read = async {
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut byte).await.unwrap() == 0 {
                panic!(
                    "closed before a response head: {:?}",
                    String::from_utf8_lossy(&head)
                );
            }
            head.push(byte[0]);
        }
    };
    tokio::time::timeout(CLOSE_WITHIN, read)
        .await
        .expect("a response head arrives");
    String::from_utf8(head).unwrap()
}

/// Reads one HTTP/1.1 response with a `content-length`: its head
/// (lowercased) and body.
pub async fn read_response(s: &mut TcpStream) -> (String, Vec<u8>) {
    let head = read_head(s).await.to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    tokio::time::timeout(CLOSE_WITHIN, s.read_exact(&mut body))
        .await
        .expect("the response body arrives")
        .unwrap();
    (head, body)
}

/// Whether the server closes the connection cleanly (end of stream, not a
/// reset) and sends nothing more first. Panics if it stays open past
/// [`CLOSE_WITHIN`].
pub async fn closes_cleanly(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(CLOSE_WITHIN, s.read(&mut buf))
        .await
        .expect("the server closes the connection");
    matches!(read, Ok(0))
}
