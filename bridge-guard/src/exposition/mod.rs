//! Exposition: the accounting as Prometheus text, served on `/metrics` by [`server`] (on its
//! own thread, so a scrape never waits for a repair nor a repair for a scrape) and optionally
//! written to a node_exporter textfile.

pub mod render;
pub mod server;

use std::{net::SocketAddr, path::Path};

pub use render::{BuildInfo, render};

use crate::{accounting::Accounting, sys::clock::monotonic_ns};

/// The port `--metrics` serves on when given no address. Prometheus' list of exporter ports
/// (9100-9999) is full and 9469 is script_exporter's; this one sits outside that list and
/// below Linux's ephemeral range (32768-60999), so no well-known exporter and no outgoing
/// connection takes it.
pub const DEFAULT_PORT: u16 = 19469;
/// `--metrics` with no value: loopback only, as the endpoint is unauthenticated.
pub const DEFAULT_ADDR: &str = "127.0.0.1:19469";

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot listen for metrics on {addr}: {source}; give an address of this host and a free \
     port, e.g. --metrics 127.0.0.1:{DEFAULT_PORT}"
)]
pub struct ListenError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Parses `--metrics`: `PORT` (on 127.0.0.1) or `ADDR:PORT`.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse().map_err(|_| {
        format!(
            "'{s}' is not PORT or ADDRESS:PORT (e.g. {DEFAULT_PORT}, 127.0.0.1:{DEFAULT_PORT}, \
             [::1]:{DEFAULT_PORT})"
        )
    })
}

/// Binds the metrics listener; errors here are start-up errors. The socket is handed to the
/// server's own thread by [`server::spawn`].
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, ListenError> {
    let err = |source| ListenError { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    Ok(listener)
}

/// Writes the metrics for node_exporter's textfile collector (atomically: it may read anytime).
/// Without `process_*`: node_exporter has its own, and the same names twice break its scrape.
pub fn write_textfile(path: &Path, acc: &Accounting) -> std::io::Result<()> {
    let text = render(acc, monotonic_ns(), &BuildInfo::current(), None);
    crate::sys::fs::write_atomically(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_addresses() {
        assert_eq!(
            parse_addr("9558"),
            Ok(SocketAddr::from(([127, 0, 0, 1], 9558)))
        );
        assert_eq!(
            parse_addr("0.0.0.0:1"),
            Ok(SocketAddr::from(([0, 0, 0, 0], 1)))
        );
        assert_eq!(
            parse_addr(DEFAULT_ADDR),
            Ok(SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)))
        );
        assert!(
            parse_addr("localhost:x")
                .expect_err("bad")
                .contains("not PORT or ADDRESS:PORT")
        );
    }
}
