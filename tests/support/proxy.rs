//! A TCP proxy between a client and PostgreSQL that injects CockroachDB's failure modes at
//! COMMIT. It parses just enough of the wire protocol to find message boundaries and the simple
//! query `COMMIT` (Diesel commits with a simple query). Clients must connect with
//! `sslmode=disable`; an SSL or GSS request is answered "no" by the proxy itself.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

/// What to do to one COMMIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Roll the transaction back on the server, answer CockroachDB's 40001 retry error.
    Retry40001,
    /// Forward COMMIT, wait until the server committed, then cut the client off before the reply.
    CutAfterCommit,
    /// Cut the connection before COMMIT reaches the server (the server aborts the transaction).
    CutBeforeCommit,
    /// Forward COMMIT, then answer CockroachDB's 40003 "result is ambiguous" instead of the reply.
    Ambiguous40003,
}

pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    armed: Mutex<VecDeque<Fault>>,
    commits: AtomicU64,
    injected: AtomicU64,
}

/// What the server-to-client side does with the reply to a COMMIT the client side tampered with.
#[derive(Debug, Clone)]
enum OnReply {
    Forward,
    /// Drop the server's messages up to ReadyForQuery, then send these bytes instead.
    Replace(Vec<u8>),
    /// Drop the server's messages up to ReadyForQuery, then close both connections.
    Cut,
}

impl Proxy {
    /// Listens on an ephemeral port of 127.0.0.1 and forwards to `upstream`.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared::default());
        let accept_shared = Arc::clone(&shared);
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let shared = Arc::clone(&accept_shared);
                thread::spawn(move || {
                    if let Ok(server) = TcpStream::connect(upstream) {
                        let _ = relay(client, server, shared);
                    }
                });
            }
        });
        Proxy { port, shared }
    }

    /// The next COMMIT through the proxy, on any connection, gets `fault`.
    pub fn arm(&self, fault: Fault) {
        self.shared.armed.lock().expect("lock").push_back(fault);
    }

    /// COMMITs seen so far.
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::SeqCst)
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.shared.injected.load(Ordering::SeqCst)
    }

    /// `url` (a postgres:// URL) pointed at the proxy, without TLS.
    pub fn url_for(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").expect("URL has a scheme");
        let (auth_host, path) = rest.split_once('/').unwrap_or((rest, ""));
        let user = auth_host
            .rsplit_once('@')
            .map(|(u, _)| format!("{u}@"))
            .unwrap_or_default();
        let sep = if path.contains('?') { '&' } else { '?' };
        format!(
            "{scheme}://{user}127.0.0.1:{}/{path}{sep}sslmode=disable",
            self.port
        )
    }
}

/// The host:port of a postgres:// URL.
pub fn upstream_of(url: &str) -> SocketAddr {
    let rest = url.split_once("://").expect("scheme").1;
    let host_port = rest.split(['/', '?']).next().expect("authority");
    let host_port = host_port.rsplit_once('@').map_or(host_port, |(_, h)| h);
    let host_port = host_port.replace("localhost", "127.0.0.1");
    host_port
        .parse()
        .expect("the test server's URL must name IP:port")
}

fn relay(mut client: TcpStream, mut server: TcpStream, shared: Arc<Shared>) -> io::Result<()> {
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    // Startup: untyped messages. Refuse SSL/GSS encryption ourselves, forward the rest.
    loop {
        let msg = read_untyped(&mut client)?;
        let code = msg
            .get(4..8)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        if matches!(code, Some(80_877_103) | Some(80_877_104)) {
            client.write_all(b"N")?;
            continue;
        }
        server.write_all(&msg)?;
        break;
    }
    let on_reply = Arc::new(Mutex::new(OnReply::Forward));
    let back = {
        let (server, client) = (server.try_clone()?, client.try_clone()?);
        let on_reply = Arc::clone(&on_reply);
        thread::spawn(move || server_to_client(server, client, on_reply))
    };
    let result = client_to_server(&mut client, &mut server, &shared, &on_reply);
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
    let _ = back.join();
    result
}

fn client_to_server(
    client: &mut TcpStream,
    server: &mut TcpStream,
    shared: &Shared,
    on_reply: &Mutex<OnReply>,
) -> io::Result<()> {
    loop {
        let msg = read_typed(client)?;
        if !is_commit(&msg) {
            server.write_all(&msg)?;
            continue;
        }
        shared.commits.fetch_add(1, Ordering::SeqCst);
        let fault = shared.armed.lock().expect("lock").pop_front();
        let Some(fault) = fault else {
            server.write_all(&msg)?;
            continue;
        };
        shared.injected.fetch_add(1, Ordering::SeqCst);
        // Set what happens to the reply before the server can send it.
        match fault {
            Fault::Retry40001 => {
                *on_reply.lock().expect("lock") = OnReply::Replace(error_then_idle(
                    "40001",
                    "restart transaction: TransactionRetryWithProtoRefreshError: \
                     ReadWithinUncertaintyIntervalError: injected by the test proxy",
                ));
                server.write_all(&query("ROLLBACK"))?;
            }
            Fault::Ambiguous40003 => {
                *on_reply.lock().expect("lock") = OnReply::Replace(error_then_idle(
                    "40003",
                    "result is ambiguous: error=rpc error: connection reset (injected by the test proxy)",
                ));
                server.write_all(&msg)?;
            }
            Fault::CutAfterCommit => {
                *on_reply.lock().expect("lock") = OnReply::Cut;
                server.write_all(&msg)?;
            }
            Fault::CutBeforeCommit => return Ok(()),
        }
    }
}

fn server_to_client(
    mut server: TcpStream,
    mut client: TcpStream,
    on_reply: Arc<Mutex<OnReply>>,
) -> io::Result<()> {
    loop {
        let msg = read_typed(&mut server)?;
        let action = on_reply.lock().expect("lock").clone();
        match action {
            OnReply::Forward => client.write_all(&msg)?,
            OnReply::Replace(bytes) => {
                if msg[0] == b'Z' {
                    *on_reply.lock().expect("lock") = OnReply::Forward;
                    client.write_all(&bytes)?;
                }
            }
            OnReply::Cut => {
                if msg[0] == b'Z' {
                    let _ = client.shutdown(Shutdown::Both);
                    let _ = server.shutdown(Shutdown::Both);
                    return Ok(());
                }
            }
        }
    }
}

fn is_commit(msg: &[u8]) -> bool {
    msg[0] == b'Q'
        && std::str::from_utf8(&msg[5..])
            .map(|q| {
                q.trim_end_matches('\0')
                    .trim()
                    .trim_end_matches(';')
                    .eq_ignore_ascii_case("COMMIT")
            })
            .unwrap_or(false)
}

/// A startup-phase message: length (including itself), then the body.
fn read_untyped(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let n = u32::from_be_bytes(len) as usize;
    let mut msg = len.to_vec();
    msg.resize(n.max(4), 0);
    s.read_exact(&mut msg[4..])?;
    Ok(msg)
}

/// A regular message: type byte, length (including itself), body.
fn read_typed(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head)?;
    let n = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut msg = head.to_vec();
    msg.resize(1 + n.max(4), 0);
    s.read_exact(&mut msg[5..])?;
    Ok(msg)
}

fn query(sql: &str) -> Vec<u8> {
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    typed(b'Q', &body)
}

/// ErrorResponse with this SQLSTATE and message, then ReadyForQuery (idle).
fn error_then_idle(code: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', "ERROR"),
        (b'V', "ERROR"),
        (b'C', code),
        (b'M', message),
    ] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = typed(b'E', &body);
    out.extend(typed(b'Z', b"I"));
    out
}

fn typed(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}
