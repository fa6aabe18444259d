//! Free loopback ports.

use std::net::TcpListener;
use std::sync::Mutex;

static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// A loopback port nothing listens on now and this process has not handed out before.
pub fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = listener.local_addr().expect("local addr").port();
        let mut seen = HANDED_OUT.lock().expect("ports lock");
        if !seen.contains(&port) {
            seen.push(port);
            return port;
        }
    }
}
