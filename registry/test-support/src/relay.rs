//! A loopback TCP relay: passes bytes both ways between each client and an
//! upstream address, untouched (TLS goes through it), and counts the
//! connections made through it.

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::loopback::LoopbackServer;

const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The relay; stops accepting on drop.
#[derive(Debug)]
pub struct Relay {
    server: LoopbackServer,
    connections: Arc<AtomicUsize>,
}

impl Relay {
    /// Starts a relay on a free loopback port in front of `upstream`.
    pub fn start(upstream: SocketAddr) -> Relay {
        let connections = Arc::new(AtomicUsize::new(0));
        let server = {
            let connections = connections.clone();
            LoopbackServer::start(move |client, _| {
                connections.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let _ = relay(client, upstream);
                });
            })
        };
        Relay {
            server,
            connections,
        }
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        self.server.addr.to_string()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

fn relay(client: TcpStream, upstream: SocketAddr) -> std::io::Result<()> {
    let up = TcpStream::connect_timeout(&upstream, IO_TIMEOUT)?;
    for s in [&client, &up] {
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
    }
    let (c2, u2) = (client.try_clone()?, up.try_clone()?);
    let back = std::thread::spawn(move || pipe(u2, c2));
    let _ = pipe(client, up);
    let _ = back.join();
    Ok(())
}

/// Copies `from` to `to` until `from` ends, then ends `to`'s sending side.
fn pipe(mut from: TcpStream, mut to: TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    Ok(())
}
