//! Bare quinn bulk transfer, to tell quinn's behaviour on a link (benches/wan.sh's emulator)
//! apart from Postern's relay. `server --listen ADDR` accepts connections and reads each
//! bidirectional stream to its end, then answers one byte; `client --connect ADDR --mib N`
//! sends N MiB on one stream and prints the rate and, every second, quinn's path statistics
//! (congestion window, RTT, lost packets, congestion events, MTU). The transport options
//! mirror tunnel/src/tls.rs `transport()`; flags try alternatives.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    role: Role,
    /// Congestion controller: cubic, newreno or bbr.
    #[arg(long, default_value = "cubic", global = true)]
    cc: String,
    /// Turn MTU discovery off (datagrams stay at --initial-mtu).
    #[arg(long, global = true)]
    no_mtud: bool,
    #[arg(long, default_value_t = 1200, global = true)]
    initial_mtu: u16,
    /// Turn UDP segmentation offload off.
    #[arg(long, global = true)]
    no_gso: bool,
}

#[derive(clap::Subcommand)]
enum Role {
    Server {
        #[arg(long)]
        listen: SocketAddr,
    },
    Client {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 16)]
        mib: u64,
        /// Seconds the connection idles (keep-alives every 5 s) before the transfer, as a
        /// tunnel does between sessions.
        #[arg(long, default_value_t = 0)]
        idle: u64,
    },
}

fn transport(a: &Args) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.stream_receive_window((16u32 << 20).into());
    t.receive_window((32u32 << 20).into());
    t.send_window(32 << 20);
    t.initial_rtt(Duration::from_millis(100));
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.initial_mtu(a.initial_mtu);
    if a.no_mtud {
        t.mtu_discovery_config(None);
    }
    t.enable_segmentation_offload(!a.no_gso);
    match a.cc.as_str() {
        "newreno" => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()));
        }
        "bbr" => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
        _ => {}
    }
    t
}

fn report(c: &quinn::Connection, start: Instant) {
    let s = c.stats();
    let p = s.path;
    println!(
        "{:6.1}s cwnd {:>9} rtt {:>4}ms sent {:>8} lost {:>6} ({:.2}%) cong {:>5} mtu {} probes {}/{} blackholes {}",
        start.elapsed().as_secs_f64(),
        p.cwnd,
        p.rtt.as_millis(),
        p.sent_packets,
        p.lost_packets,
        100.0 * p.lost_packets as f64 / p.sent_packets.max(1) as f64,
        p.congestion_events,
        p.current_mtu,
        p.lost_plpmtud_probes,
        p.sent_plpmtud_probes,
        p.black_holes_detected,
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let transport = Arc::new(transport(&args));
    match args.role {
        Role::Server { listen } => {
            let cert = rcgen::generate_simple_self_signed(vec!["quicperf".into()])?;
            let cert_der = cert.cert.der().clone();
            let key = rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
            let mut config = quinn::ServerConfig::with_single_cert(vec![cert_der], key)?;
            config.transport_config(transport);
            let endpoint = quinn::Endpoint::server(config, listen)?;
            println!("listening");
            while let Some(incoming) = endpoint.accept().await {
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let mut n = 0u64;
                        while let Ok(Some(chunk)) = recv.read_chunk(1 << 20, true).await {
                            n += chunk.bytes.len() as u64;
                        }
                        let _ = send.write_all(&[1]).await;
                        let _ = send.finish();
                        let start = Instant::now();
                        report(&conn, start);
                        println!("received {n} bytes");
                    }
                });
            }
        }
        Role::Client { connect, mib, idle } => {
            // The server's certificate is made fresh in its own process: the client accepts
            // any (a benchmark on a private link, nothing secret).
            let tls = quinn::rustls::ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCert(quinn::rustls::crypto::ring::default_provider())))
                .with_no_client_auth();
            let mut config =
                quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls)?));
            config.transport_config(transport);
            let mut endpoint = quinn::Endpoint::client("0.0.0.0:0".parse()?)?;
            endpoint.set_default_client_config(config);
            let conn = endpoint.connect(connect, "quicperf")?.await.context("connect")?;
            tokio::time::sleep(Duration::from_secs(idle)).await;
            let (mut send, mut recv) = conn.open_bi().await?;
            let start = Instant::now();
            let ticker = tokio::spawn({
                let conn = conn.clone();
                async move {
                    loop {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        report(&conn, start);
                    }
                }
            });
            let buf = vec![0u8; 1 << 20];
            for _ in 0..mib {
                send.write_all(&buf).await?;
            }
            send.finish()?;
            let mut done = [0u8; 1];
            recv.read_exact(&mut done).await?;
            let secs = start.elapsed().as_secs_f64();
            ticker.abort();
            report(&conn, start);
            println!("{mib} MiB in {secs:.2} s: {:.1} MiB/s", mib as f64 / secs);
            conn.close(0u32.into(), b"done");
            endpoint.wait_idle().await;
        }
    }
    Ok(())
}

#[derive(Debug)]
struct AnyCert(quinn::rustls::crypto::CryptoProvider);

impl quinn::rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<quinn::rustls::client::danger::ServerCertVerified, quinn::rustls::Error> {
        Ok(quinn::rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls_pki_types::CertificateDer<'_>,
        d: &quinn::rustls::DigitallySignedStruct,
    ) -> Result<quinn::rustls::client::danger::HandshakeSignatureValid, quinn::rustls::Error> {
        quinn::rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls_pki_types::CertificateDer<'_>,
        d: &quinn::rustls::DigitallySignedStruct,
    ) -> Result<quinn::rustls::client::danger::HandshakeSignatureValid, quinn::rustls::Error> {
        quinn::rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<quinn::rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
