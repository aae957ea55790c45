//! The gateway's own log under a flood: a line that repeats per connection is rate-limited
//! by call site (postern_tunnel::log_limit), so a flood writes the burst and one summary,
//! not a line per connection (docs/operations.md, "Logs").
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use postern_e2e::*;

const REFUSED_LINE: &str = "rdp connection refused";
const FLOOD: usize = 200;
/// postern_tunnel::log_limit::BURST.
const BURST: usize = postern_tunnel::log_limit::BURST as usize;

#[test]
fn a_flood_of_refused_connections_writes_the_burst_and_one_summary() {
    let rdp_port = free_tcp_port();
    let mut gw = Gateway::start(&format!("[rdp]\nenabled = true\nlisten = \"127.0.0.1:{rdp_port}\"\n"));
    // 200 connections that send junk instead of a preconnection blob: each is refused
    // ("rdp connection refused", once a line per connection).
    for _ in 0..FLOOD {
        let mut c = TcpStream::connect(("127.0.0.1", rdp_port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(&[0xff; 64]).unwrap();
        // The gateway logs the refusal, then closes: read to the end (or a reset), bounded.
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
    }
    let log = gw.proc.as_ref().unwrap().log.clone();
    let refused = |text: &str| text.lines().filter(|l| l.contains(REFUSED_LINE)).count();
    let during = std::fs::read_to_string(&log).unwrap();
    assert_eq!(refused(&during), BURST, "the burst, then silence:\n{during}");
    // At stop, the count left out is written as one summary line naming the site.
    gw.stop();
    let after = std::fs::read_to_string(&log).unwrap();
    let summaries: Vec<&str> = after.lines().filter(|l| l.contains("more suppressed in the last")).collect();
    let ours: Vec<&&str> = summaries.iter().filter(|l| l.contains("postern_gateway::rdp")).collect();
    assert_eq!(ours.len(), 1, "one summary for the rdp site:\n{after}");
    assert!(
        ours[0].contains(&format!("{} more suppressed in the last", FLOOD - BURST)),
        "the summary counts the rest: {}",
        ours[0]
    );
    assert_eq!(refused(&after), BURST, "no more refusal lines at stop:\n{after}");
    assert!(after.lines().count() < 60, "the whole log stays short:\n{after}");
}
