//! `keel probe`: asks a broker's HTTP port whether it is ready (or alive), for container health
//! checks. The image has no shell and no curl, so the probe is part of `keel` itself.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// The broker's metrics/health address (its --metrics-listen).
    #[arg(default_value = "127.0.0.1:9392")]
    pub address: SocketAddr,
    /// `/readyz` (serving clients) or `/healthz` (process alive).
    #[arg(long, default_value = "/readyz", value_parser = ["/readyz", "/healthz"])]
    pub path: String,
    /// Give up after this many milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
}

/// Exit 0 when the endpoint answers 200, 1 (with the status or the error) otherwise.
pub fn run(a: &ProbeArgs) -> Result<()> {
    let timeout = Duration::from_millis(a.timeout_ms.max(1));
    let mut s = TcpStream::connect_timeout(&a.address, timeout)
        .with_context(|| format!("connecting to {}", a.address))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {} HTTP/1.0\r\nHost: {}\r\nConnection: close\r\n\r\n",
        a.path, a.address
    )?;
    let mut head = [0u8; 64];
    let n = s.read(&mut head).context("reading the answer")?;
    let line = String::from_utf8_lossy(&head[..n]);
    let status = line.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        bail!(
            "{}{} answered {:?}",
            a.address,
            a.path,
            line.lines().next().unwrap_or("")
        );
    }
    Ok(())
}
