//! The HTTP layer of the real binary under abuse, with raw sockets: a slow
//! head is cut at `HEADER_TIMEOUT`, a dripped body at `REQUEST_TIMEOUT`, an
//! idle connection at `IDLE_TIMEOUT`; a head over 16 KiB is 431; a request
//! with both `Content-Length` and `Transfer-Encoding` is refused; slow heads
//! and a full set of connections never stop a normal request.

use std::process::Child;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::serve_binary::{listening_port, serve_command, stderr_lines};
use crate::repository_root;

/// Longest any wait of these tests may take on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(30);

/// The binary, killed when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(variables: &[(&str, &str)]) -> Server {
    let mut all = vec![(
        "MCP_PROJECT_DIR",
        repository_root().to_str().unwrap().to_owned(),
    )];
    all.extend(variables.iter().map(|(n, v)| (*n, (*v).to_owned())));
    let pairs: Vec<(&str, &str)> = all.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let mut child = serve_command(&pairs).spawn().unwrap();
    let lines = stderr_lines(&mut child);
    let port = listening_port(&lines, &mut Vec::new(), DEADLINE);
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || while lines.recv().is_ok() {});
    Server { child, port }
}

async fn connect(server: &Server) -> TcpStream {
    TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap()
}

/// Reads until the peer closes the connection (or resets it); how long it
/// took, and what was read.
async fn until_closed(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    let mut read = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match tokio::time::timeout(DEADLINE, stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (started.elapsed(), read),
            Ok(Ok(n)) => read.extend_from_slice(&buffer[..n]),
            Err(_) => panic!("the connection was still open after {DEADLINE:?}"),
        }
    }
}

/// Reads one response whose body has a `content-length`: status, head and
/// body as text.
async fn read_response(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> (u16, String, String) {
    let mut read = Vec::new();
    let mut buffer = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = read.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut buffer))
            .await
            .expect("a response in time")
            .unwrap();
        assert!(
            n > 0,
            "closed before a response: {}",
            String::from_utf8_lossy(&read)
        );
        read.extend_from_slice(&buffer[..n]);
    };
    let head = String::from_utf8_lossy(&read[..head_end]).into_owned();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while read.len() < head_end + length {
        let n = tokio::time::timeout(DEADLINE, stream.read(&mut buffer))
            .await
            .expect("a body in time")
            .unwrap();
        assert!(n > 0);
        read.extend_from_slice(&buffer[..n]);
    }
    let body = String::from_utf8_lossy(&read[head_end..head_end + length]).into_owned();
    (status, head, body)
}

const MENU: &str = r#"{"text":"Can you read me the menu?","user_id":"u-1"}"#;

fn orchestrate_request(body: &str) -> String {
    format!(
        "POST /orchestrate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn a_head_dripped_byte_by_byte_is_cut_at_the_header_timeout() {
    let server = start(&[("HEADER_TIMEOUT", "1s"), ("IDLE_TIMEOUT", "20s")]);
    let mut stream = connect(&server).await;
    let started = Instant::now();
    // One byte every 100 ms, never the end of the head: activity does not
    // keep it open.
    let head = b"POST /orchestrate HTTP/1.1\r\nHost: test\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed_after = None;
    for byte in head {
        if stream.write_all(&[*byte]).await.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        // A zero-length read with a short wait tells whether it closed.
        let mut probe = [0u8; 64];
        if let Ok(Ok(0)) =
            tokio::time::timeout(Duration::from_millis(100), stream.read(&mut probe)).await
        {
            closed_after = Some(started.elapsed());
            break;
        }
    }
    let closed_after = closed_after.expect("the slow head was never cut");
    assert!(
        closed_after >= Duration::from_millis(900),
        "{closed_after:?}"
    );
    assert!(closed_after < Duration::from_secs(20), "{closed_after:?}");
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_at_the_header_timeout() {
    let server = start(&[("HEADER_TIMEOUT", "1s"), ("IDLE_TIMEOUT", "20s")]);
    let mut stream = connect(&server).await;
    let (after, read) = until_closed(&mut stream).await;
    assert!(read.is_empty(), "{}", String::from_utf8_lossy(&read));
    assert!(after >= Duration::from_millis(900), "{after:?}");
    assert!(after < Duration::from_secs(15), "{after:?}");
}

#[tokio::test]
async fn a_dripped_body_is_answered_408_at_the_request_timeout_and_closed() {
    let server = start(&[("REQUEST_TIMEOUT", "1s"), ("HEADER_TIMEOUT", "20s")]);
    let stream = connect(&server).await;
    let (mut reader, mut writer) = stream.into_split();
    writer
        .write_all(b"POST /orchestrate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"text\":")
        .await
        .unwrap();
    let started = Instant::now();
    // A space every 100 ms: the body never completes within a second.
    let dripping = tokio::spawn(async move {
        for _ in 0..200 {
            if writer.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let (status, head, body) = read_response(&mut reader).await;
    let elapsed = started.elapsed();
    assert_eq!(status, 408, "{head}{body}");
    assert!(body.contains("\"request_timeout\""), "{body}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert!(elapsed >= Duration::from_millis(900), "{elapsed:?}");
    let (_, rest) = until_closed(&mut reader).await;
    assert!(rest.is_empty());
    dripping.abort();
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_at_the_idle_timeout_not_before() {
    let server = start(&[("HEADER_TIMEOUT", "1s"), ("IDLE_TIMEOUT", "3s")]);
    let mut stream = connect(&server).await;
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let (status, _, _) = read_response(&mut stream).await;
    assert_eq!(status, 200);
    // Idle: past the head timeout (1 s), the connection still serves.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stream
        .write_all(orchestrate_request(MENU).as_bytes())
        .await
        .unwrap();
    let (status, _, body) = read_response(&mut stream).await;
    assert_eq!(status, 200, "{body}");
    let (after, read) = until_closed(&mut stream).await;
    assert!(read.is_empty());
    assert!(after >= Duration::from_millis(2900), "{after:?}");
    assert!(after < Duration::from_secs(20), "{after:?}");
}

#[tokio::test]
async fn a_head_over_16_kib_is_431() {
    let server = start(&[]);
    let mut stream = connect(&server).await;
    let big = "a".repeat(20 * 1024);
    let request = format!("GET /health HTTP/1.1\r\nHost: test\r\nX-Big: {big}\r\n\r\n");
    // The server may answer and close before it has read everything.
    let _ = stream.write_all(request.as_bytes()).await;
    let (status, _, _) = read_response(&mut stream).await;
    assert_eq!(status, 431);
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused_and_closed() {
    let server = start(&[]);
    for head in [
        "POST /orchestrate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST /orchestrate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\ntransfer-encoding: chunked\r\ncontent-length: 4\r\n\r\n",
    ] {
        let mut stream = connect(&server).await;
        let chunked = format!("{:x}\r\n{MENU}\r\n0\r\n\r\n", MENU.len());
        stream
            .write_all(format!("{head}{chunked}").as_bytes())
            .await
            .unwrap();
        let (status, response_head, body) = read_response(&mut stream).await;
        assert_eq!(status, 400, "{response_head}{body}");
        assert!(body.contains("Transfer-Encoding"), "{body}");
        let (_, rest) = until_closed(&mut stream).await;
        assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    }
    // Each alone is fine.
    let mut stream = connect(&server).await;
    let chunked = format!("{:x}\r\n{MENU}\r\n0\r\n\r\n", MENU.len());
    stream
        .write_all(format!("POST /orchestrate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}").as_bytes())
        .await
        .unwrap();
    let (status, _, body) = read_response(&mut stream).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn two_hundred_slow_heads_do_not_stop_a_normal_request() {
    let server = start(&[("HEADER_TIMEOUT", "60s")]);
    let mut slow = Vec::new();
    for _ in 0..200 {
        let mut stream = connect(&server).await;
        stream
            .write_all(b"POST /orchestrate HTTP/1.1\r\nHost: test\r\n")
            .await
            .unwrap();
        slow.push(stream);
    }
    let started = Instant::now();
    let mut stream = connect(&server).await;
    stream
        .write_all(orchestrate_request(MENU).as_bytes())
        .await
        .unwrap();
    let (status, _, body) = read_response(&mut stream).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"route\":\"menu\""), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    drop(slow);
}

#[tokio::test]
async fn past_max_connections_a_new_one_waits_and_the_open_ones_are_served() {
    let server = start(&[("MAX_CONNECTIONS", "3"), ("IDLE_TIMEOUT", "60s")]);
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut stream = connect(&server).await;
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_response(&mut stream).await.0, 200);
        open.push(stream);
    }
    // The fourth is accepted by the kernel but not served yet.
    let mut waiting = connect(&server).await;
    waiting
        .write_all(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut probe = [0u8; 16];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), waiting.read(&mut probe))
            .await
            .is_err(),
        "a connection over the cap was served"
    );
    // The open ones are served as before.
    for stream in &mut open {
        stream
            .write_all(orchestrate_request(MENU).as_bytes())
            .await
            .unwrap();
        assert_eq!(read_response(stream).await.0, 200);
    }
    // One closes: the waiting one is served.
    drop(open.pop());
    assert_eq!(read_response(&mut waiting).await.0, 200);
}

#[tokio::test]
async fn a_request_running_past_the_head_deadline_still_leaves_an_idle_timeout() {
    let server = start(&[("HEADER_TIMEOUT", "1s"), ("IDLE_TIMEOUT", "2s")]);
    let mut stream = connect(&server).await;
    // The head at once, the body over about two seconds: the request runs
    // past the head deadline of the connection's start.
    let request = orchestrate_request(MENU);
    let (head, body) = request.split_at(request.find("\r\n\r\n").unwrap() + 4);
    stream.write_all(head.as_bytes()).await.unwrap();
    for chunk in body.as_bytes().chunks(body.len() / 4 + 1) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        stream.write_all(chunk).await.unwrap();
    }
    let (status, _, answer) = read_response(&mut stream).await;
    assert_eq!(status, 200, "{answer}");
    let (after, read) = until_closed(&mut stream).await;
    assert!(read.is_empty());
    assert!(after >= Duration::from_millis(1900), "{after:?}");
    assert!(after < Duration::from_secs(20), "{after:?}");
}
