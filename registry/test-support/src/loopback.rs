//! The loopback HTTP servers the registry tests run beside the registry
//! (the counting proxy, the token issuer): one thread accepting on a free
//! port, stopped on drop, and the reading of a request's head.

use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

/// The first byte of a TLS record carrying a handshake (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

/// A listener on a free loopback port whose accepting thread stops on drop.
#[derive(Debug)]
pub struct LoopbackServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LoopbackServer {
    /// Binds a free loopback port and hands each accepted connection to
    /// `serve`, together with the server's own address.
    pub fn start(mut serve: impl FnMut(TcpStream, SocketAddr) + Send + 'static) -> LoopbackServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().expect("loopback address");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        serve(conn, addr);
                    }
                }
            })
        };
        LoopbackServer {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for LoopbackServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The request line of the request on `conn` and its header lines, each
/// as sent (with its CRLF), up to the blank line that ends the head.
///
/// A TLS handshake (a client trying HTTPS first, as it does on a loopback
/// registry) is refused at once, as a plain HTTP server does, so that the
/// client falls back to plain HTTP without waiting for a timeout.
pub fn read_request_head(conn: &TcpStream) -> std::io::Result<(String, Vec<String>)> {
    let mut first = [0u8; 1];
    if conn.peek(&mut first)? == 1 && first[0] == TLS_HANDSHAKE {
        let _ = conn.shutdown(std::net::Shutdown::Both);
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "a TLS handshake on a plain HTTP server",
        ));
    }
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        headers.push(line);
    }
    Ok((request_line, headers))
}
