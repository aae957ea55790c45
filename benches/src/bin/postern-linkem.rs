//! Userspace WAN link emulator for benchmarks on kernels without netem.
//!
//! Two TUN interfaces form one point-to-point IP link: side A is moved into a network
//! namespace (the agent's), side B stays in the namespace the emulator runs in (the
//! gateway's). Every IP packet one side's kernel routes onto the link is read by this process
//! and written into the other side's kernel after the emulated wire has had its way with it:
//! random loss, a drop-tail queue in front of a rate-limited serialiser, then propagation
//! delay with jitter. Each direction is emulated on its own (one reader and one writer thread
//! each), so TCP and QUIC see real loss, queueing and delay in their congestion control.
//!
//! The interfaces disappear when the process exits (they are not persistent), taking their
//! addresses and routes with them. Prints `ready` on stdout once the link carries packets.
//! See benches/wan.sh.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Emulate a WAN link (delay, jitter, loss, rate, queue) between two namespaces")]
struct Args {
    /// Network namespace for side A (`ip netns` name); side B stays in the current one.
    #[arg(long)]
    ns_a: String,
    /// Side A's address (inside --ns-a).
    #[arg(long)]
    addr_a: Ipv4Addr,
    /// Side B's address (in the current namespace).
    #[arg(long)]
    addr_b: Ipv4Addr,
    /// Interface names are PREFIX-a and PREFIX-b (at most 13 characters).
    #[arg(long, default_value = "plem")]
    ifname: String,
    #[command(flatten)]
    wire: WireArgs,
    /// Interface MTU.
    #[arg(long, default_value_t = 1500)]
    mtu: u16,
    /// Seed for the loss and jitter draws (a fixed seed repeats a run's pattern).
    #[arg(long)]
    seed: Option<u64>,
}

/// The link's conditions; also accepted, in the same syntax, one set per line on standard
/// input to change them while the link runs (omitted options return to their defaults).
#[derive(clap::Args, Debug, Clone)]
struct WireArgs {
    /// One-way propagation delay, each direction (so the round trip is twice this).
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    delay: Duration,
    /// Uniform jitter added to each packet's delay, within ± this (packets are never
    /// reordered: a packet leaves no earlier than the one before it).
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    jitter: Duration,
    /// Random loss, percent of packets, each direction.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Bottleneck rate, each direction: e.g. 1gbit, 100mbit, 512kbit; 0 for unlimited.
    #[arg(long, default_value = "1gbit", value_parser = parse_rate)]
    rate: u64,
    /// Drop-tail queue in front of the bottleneck, bytes (e.g. 4MiB, 256KiB, 100000).
    #[arg(long, default_value = "4MiB", value_parser = parse_bytes)]
    queue: u64,
}

#[derive(Parser)]
#[command(name = "linkem-control", no_binary_name = true)]
struct Control {
    #[command(flatten)]
    wire: WireArgs,
}

/// One direction of the emulated wire, without I/O: decides for each packet whether it is
/// dropped and, if not, when it arrives at the far end.
#[derive(Debug)]
struct Wire {
    delay: Duration,
    jitter: Duration,
    /// Probability in [0, 1].
    loss: f64,
    /// Bits per second; 0 means no serialisation delay.
    rate: u64,
    queue: u64,
    /// When the serialiser finishes the last packet accepted (the queue drains until then).
    busy_until: Option<Instant>,
    /// Arrival time of the last packet sent, so jitter never reorders.
    last_arrival: Option<Instant>,
}

#[derive(Debug, PartialEq, Eq)]
enum Fate {
    Lost,
    QueueFull,
    Arrives(Instant),
}

impl Wire {
    fn from_args(a: &WireArgs) -> Self {
        Self::new(a.delay, a.jitter, a.loss, a.rate, a.queue)
    }

    /// New conditions: the packets already on the wire keep their times.
    fn reconfigure(&mut self, a: &WireArgs) {
        *self = Self { busy_until: self.busy_until, last_arrival: self.last_arrival, ..Self::from_args(a) };
    }

    fn new(delay: Duration, jitter: Duration, loss_percent: f64, rate: u64, queue: u64) -> Self {
        let loss = (loss_percent / 100.0).clamp(0.0, 1.0);
        Self { delay, jitter, loss, rate, queue, busy_until: None, last_arrival: None }
    }

    fn serialisation(&self, bytes: usize) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos((bytes as u64).saturating_mul(8_000_000_000) / self.rate)
    }

    /// Bytes still waiting for the serialiser at `now`.
    fn backlog(&self, now: Instant) -> u64 {
        match self.busy_until {
            Some(t) if t > now && self.rate > 0 => {
                let ns = (t - now).as_nanos().min(u128::from(u64::MAX)) as u64;
                ns.saturating_mul(self.rate) / 8_000_000_000
            }
            _ => 0,
        }
    }

    /// The fate of a packet of `bytes` offered at `now`. `loss_draw` and `jitter_draw` are
    /// uniform in [0, 1) (the caller's random numbers, so this stays deterministic).
    fn offer(&mut self, now: Instant, bytes: usize, loss_draw: f64, jitter_draw: f64) -> Fate {
        if loss_draw < self.loss {
            return Fate::Lost;
        }
        if self.backlog(now) + bytes as u64 > self.queue {
            return Fate::QueueFull;
        }
        let start = self.busy_until.filter(|t| *t > now).unwrap_or(now);
        let done = start + self.serialisation(bytes);
        self.busy_until = Some(done);
        // Delay ± jitter, never below zero.
        let spread = self.jitter.as_secs_f64() * (2.0 * jitter_draw - 1.0);
        let delay = Duration::from_secs_f64((self.delay.as_secs_f64() + spread).max(0.0));
        let arrival = (done + delay).max(self.last_arrival.unwrap_or(done));
        self.last_arrival = Some(arrival);
        Fate::Arrives(arrival)
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len()));
    let n: f64 = num.parse().map_err(|_| format!("{s:?}: expected a number and a unit (25ms, 1.5s, 500us)"))?;
    let secs = match unit {
        "" if n == 0.0 => 0.0,
        "s" => n,
        "ms" => n / 1e3,
        "us" => n / 1e6,
        _ => return Err(format!("{s:?}: unit must be s, ms or us")),
    };
    if !(0.0..=60.0).contains(&secs) {
        return Err(format!("{s:?}: must be between 0 and 60 s"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_rate(s: &str) -> Result<u64, String> {
    let lower = s.trim().to_ascii_lowercase();
    let (num, unit) = lower.split_at(lower.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(lower.len()));
    let n: f64 = num.parse().map_err(|_| format!("{s:?}: expected e.g. 1gbit, 100mbit, 0"))?;
    let scale = match unit {
        "" | "bit" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        _ => return Err(format!("{s:?}: unit must be bit, kbit, mbit or gbit")),
    };
    Ok((n * scale) as u64)
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num.parse().map_err(|_| format!("{s:?}: expected e.g. 4MiB, 256KiB, 100000"))?;
    let scale = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        _ => return Err(format!("{s:?}: unit must be B, KiB or MiB")),
    };
    Ok(n * scale)
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("run ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn open_tun(name: &str, mtu: u16) -> anyhow::Result<tun::Device> {
    let mut config = tun::Configuration::default();
    config.tun_name(name).mtu(mtu).layer(tun::Layer::L3);
    tun::create(&config).with_context(|| format!("create TUN {name} (needs root and /dev/net/tun)"))
}

/// Packets in flight per direction (propagation delay included); beyond this the emulator
/// itself drops, which at 1500-byte packets is about 100 MB on the wire.
const IN_FLIGHT_PACKETS: usize = 65_536;

type Timed = (Instant, Vec<u8>);

fn reader(
    mut from: impl Read,
    mut wire: Wire,
    control: Receiver<WireArgs>,
    to: SyncSender<Timed>,
    mtu: u16,
    seed: u64,
) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut buf = vec![0u8; usize::from(mtu) + 64];
    loop {
        let n = match from.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("postern-linkem: read: {e}");
                std::process::exit(1);
            }
        };
        let Some(packet) = buf.get(..n) else { continue };
        while let Ok(a) = control.try_recv() {
            wire.reconfigure(&a);
        }
        if let Fate::Arrives(at) = wire.offer(Instant::now(), n, rng.f64(), rng.f64()) {
            match to.try_send((at, packet.to_vec())) {
                Ok(()) | Err(TrySendError::Full(_)) => {}
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
    }
}

fn writer(mut to: impl Write, from: Receiver<Timed>) {
    // Arrival times only grow, so the channel is already in delivery order.
    let mut due: VecDeque<Timed> = VecDeque::new();
    loop {
        if due.is_empty() {
            match from.recv() {
                Ok(p) => due.push_back(p),
                Err(_) => return,
            }
        }
        while let Ok(p) = from.try_recv() {
            due.push_back(p);
        }
        let Some((at, _)) = due.front() else { continue };
        let now = Instant::now();
        if *at > now {
            // Sleep until the head is due, but wake for new packets (nothing to do with them
            // before then: they arrive later still).
            std::thread::sleep(*at - now);
            continue;
        }
        while let Some((at, packet)) = due.pop_front() {
            if at > Instant::now() {
                due.push_front((at, packet));
                break;
            }
            // A full TUN queue on the far side drops, as a NIC would.
            let _ = to.write(&packet);
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.ifname.len() > 13 {
        bail!("--ifname {:?}: at most 13 characters (Linux names are 15 with -a/-b)", args.ifname);
    }
    let (name_a, name_b) = (format!("{}-a", args.ifname), format!("{}-b", args.ifname));
    let (addr_a, addr_b) = (args.addr_a.to_string(), args.addr_b.to_string());
    let tun_a = open_tun(&name_a, args.mtu)?;
    let tun_b = open_tun(&name_b, args.mtu)?;
    ip(&["link", "set", &name_a, "netns", &args.ns_a])?;
    ip(&["-n", &args.ns_a, "link", "set", "lo", "up"])?;
    ip(&["-n", &args.ns_a, "addr", "add", &addr_a, "peer", &addr_b, "dev", &name_a])?;
    ip(&["-n", &args.ns_a, "link", "set", &name_a, "up"])?;
    ip(&["addr", "add", &addr_b, "peer", &addr_a, "dev", &name_b])?;
    ip(&["link", "set", &name_b, "up"])?;

    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let (control_a, control_a_rx) = std::sync::mpsc::channel();
    let (control_b, control_b_rx) = std::sync::mpsc::channel();
    let (read_a, write_a) = tun_a.split();
    let (read_b, write_b) = tun_b.split();
    let (a_to_b, a_to_b_rx) = sync_channel(IN_FLIGHT_PACKETS);
    let (b_to_a, b_to_a_rx) = sync_channel(IN_FLIGHT_PACKETS);
    let mtu = args.mtu;
    let threads = [
        std::thread::spawn({
            let w = Wire::from_args(&args.wire);
            move || reader(read_a, w, control_a_rx, a_to_b, mtu, seed)
        }),
        std::thread::spawn({
            let w = Wire::from_args(&args.wire);
            move || reader(read_b, w, control_b_rx, b_to_a, mtu, seed ^ 0x9e37_79b9_7f4a_7c15)
        }),
        std::thread::spawn(move || writer(write_b, a_to_b_rx)),
        std::thread::spawn(move || writer(write_a, b_to_a_rx)),
    ];
    println!("ready");
    // Standard input: new conditions, one line each, until end of input (then the link
    // keeps its last conditions until the process is killed).
    for line in std::io::stdin().lines() {
        let line = line.context("read standard input")?;
        match Control::try_parse_from(line.split_whitespace()) {
            Ok(c) => {
                let _ = control_a.send(c.wire.clone());
                let _ = control_b.send(c.wire.clone());
                println!("set {line}");
            }
            Err(e) => eprintln!("postern-linkem: ignored {line:?}: {e}"),
        }
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delay_without_rate_or_jitter_is_exact() {
        let mut w = Wire::new(25 * MS, Duration::ZERO, 0.0, 0, 1 << 20);
        let t = Instant::now();
        assert_eq!(w.offer(t, 1500, 0.5, 0.5), Fate::Arrives(t + 25 * MS));
    }

    #[test]
    fn loss_is_the_given_fraction_of_draws() {
        let mut w = Wire::new(Duration::ZERO, Duration::ZERO, 1.0, 0, 1 << 20);
        let t = Instant::now();
        assert_eq!(w.offer(t, 100, 0.0099, 0.5), Fate::Lost);
        assert!(matches!(w.offer(t, 100, 0.0101, 0.5), Fate::Arrives(_)));
    }

    #[test]
    fn rate_serialises_back_to_back_packets_and_the_queue_drops_the_tail() {
        // 8 Mbit/s: 1000 bytes take 1 ms. A 2500-byte queue holds two waiting packets.
        let mut w = Wire::new(10 * MS, Duration::ZERO, 0.0, 8_000_000, 2500);
        let t = Instant::now();
        assert_eq!(w.offer(t, 1000, 0.5, 0.5), Fate::Arrives(t + 11 * MS));
        assert_eq!(w.offer(t, 1000, 0.5, 0.5), Fate::Arrives(t + 12 * MS));
        assert_eq!(w.offer(t, 1000, 0.5, 0.5), Fate::QueueFull, "2000 bytes queued + 1000 > 2500");
        // Once the serialiser has caught up the queue accepts again.
        assert_eq!(w.offer(t + 2 * MS, 1000, 0.5, 0.5), Fate::Arrives(t + 13 * MS));
    }

    #[test]
    fn jitter_stays_within_bounds_and_never_reorders() {
        let mut w = Wire::new(20 * MS, 5 * MS, 0.0, 0, 1 << 20);
        let t = Instant::now();
        assert_eq!(w.offer(t, 100, 0.5, 1.0), Fate::Arrives(t + 25 * MS));
        // A draw for -5 ms would overtake the packet before: it waits for it instead.
        assert_eq!(w.offer(t, 100, 0.5, 0.0), Fate::Arrives(t + 25 * MS));
        assert_eq!(w.offer(t + 10 * MS, 100, 0.5, 0.0), Fate::Arrives(t + 25 * MS));
        assert_eq!(w.offer(t + 20 * MS, 100, 0.5, 0.5), Fate::Arrives(t + 40 * MS));
    }

    #[test]
    fn units_parse() {
        assert_eq!(parse_duration("25ms").unwrap(), 25 * MS);
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("25").is_err());
        assert_eq!(parse_rate("1gbit").unwrap(), 1_000_000_000);
        assert_eq!(parse_rate("0").unwrap(), 0);
        assert_eq!(parse_bytes("4MiB").unwrap(), 4 << 20);
        assert!(parse_bytes("4mb").is_err());
    }
}
