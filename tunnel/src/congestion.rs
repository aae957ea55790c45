//! The tunnel's QUIC congestion control: CUBIC on a short path, BBR on a long one, chosen
//! by the first RTT sample of the connection (docs/benchmarks.md "Over a WAN link" and
//! "Many sessions at once").
//!
//! - Over a WAN link with random loss, CUBIC (quinn's default, loss-based) cuts its window at
//!   every loss: 1 % loss at 50 ms held a tunnel stream under 1 MiB/s. quinn's BBR paces at
//!   the rate it measures and kept 26 MiB/s there.
//! - On a short path (a data centre, loopback) loss means congestion, which is what CUBIC
//!   reacts to, while BBR's window is twice the measured bandwidth times a sub-millisecond
//!   RTT: busy hosts that stretch the real RTT far beyond that leave the connection
//!   window-limited. Measured, neither choice changed the many-sessions benchmark (1,000
//!   shells and 100 transfers on one 2-core machine), and CUBIC on loopback was as fast as
//!   BBR; CUBIC stays where it has served so far.
//! - On a short path, whichever controller runs, the window is bounded by what the
//!   receiver's UDP socket holds ([`SHORT_PATH_MAX_WINDOW`]).

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn_proto::RttEstimator;
use quinn_proto::congestion::{BbrConfig, Controller, ControllerFactory, ControllerMetrics, CubicConfig};

/// From this first RTT on, the path is long and gets BBR.
pub const LONG_PATH_RTT: Duration = Duration::from_millis(5);

/// The most the window may reach while the smallest RTT seen is under [`LONG_PATH_RTT`],
/// whichever controller runs: what the receiving side's UDP socket is asked to buffer
/// ([`crate::tls::UDP_BUFFER`]). On loopback the window grew past 100 MB while nothing was
/// lost, so the sender outran a busy receiver, whose socket then dropped bursts of a
/// thousand packets and more; with this bound, none (docs/benchmarks.md "Many sessions at
/// once"). 4 MiB in flight is still 800 MB/s at 5 ms.
pub const SHORT_PATH_MAX_WINDOW: u64 = crate::tls::UDP_BUFFER as u64;

/// Builds [`ByPath`] controllers (`TransportConfig::congestion_controller_factory`).
#[derive(Debug, Default)]
pub struct ByPathConfig {
    cubic: Arc<CubicConfig>,
    bbr: Arc<BbrConfig>,
}

impl ControllerFactory for ByPathConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        let active = self.cubic.clone().build(now, current_mtu);
        Box::new(ByPath { config: self, mtu: current_mtu, active, min_rtt: None })
    }
}

/// CUBIC until the first RTT sample; then CUBIC for good on a short path, BBR on a long one.
pub struct ByPath {
    config: Arc<ByPathConfig>,
    mtu: u16,
    active: Box<dyn Controller>,
    /// The smallest RTT seen so far; `None` until the first sample, which chooses.
    min_rtt: Option<Duration>,
}

impl Controller for ByPath {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.active.on_sent(now, bytes, last_packet_number);
    }

    fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool, rtt: &RttEstimator) {
        if self.min_rtt.is_none() && rtt.min() >= LONG_PATH_RTT {
            self.active = self.config.bbr.clone().build(now, self.mtu);
        }
        self.min_rtt = Some(rtt.min());
        self.active.on_ack(now, sent, bytes, app_limited, rtt);
    }

    fn on_end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool, largest_packet_num_acked: Option<u64>) {
        self.active.on_end_acks(now, in_flight, app_limited, largest_packet_num_acked);
    }

    fn on_congestion_event(&mut self, now: Instant, sent: Instant, is_persistent_congestion: bool, lost_bytes: u64) {
        self.active.on_congestion_event(now, sent, is_persistent_congestion, lost_bytes);
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = new_mtu;
        self.active.on_mtu_update(new_mtu);
    }

    fn window(&self) -> u64 {
        let window = self.active.window();
        match self.min_rtt {
            Some(rtt) if rtt < LONG_PATH_RTT => window.min(SHORT_PATH_MAX_WINDOW),
            _ => window,
        }
    }

    fn metrics(&self) -> ControllerMetrics {
        self.active.metrics()
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(ByPath {
            config: self.config.clone(),
            mtu: self.mtu,
            active: self.active.clone_box(),
            min_rtt: self.min_rtt,
        })
    }

    fn initial_window(&self) -> u64 {
        self.active.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}
