//! Certificate renewal on an agent's control stream, gated so that an enrolled agent cannot
//! mint certificates at will: a renewal is granted only once the agent's current certificate
//! (the one it connected with, or the last one issued on this connection) is at least half
//! way through its lifetime (agents renew at two thirds), and at most once per agent per
//! [`RenewalGate::min_interval`] across connections. Every renewal granted is reported to
//! the directory (`AgentDirectory::renewed`, an audit event on the gateway).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use postern_proto::{ErrorCode, ErrorMsg, Message, RenewResponse};
use tracing::{debug, info};

use crate::pki::{CertAuthority, CertInfo, cert_info};

/// Entries kept before old ones are pruned from the per-agent map.
const PRUNE_ABOVE: usize = 4096;

/// When each agent was last renewed, shared by all connections of the listener.
#[derive(Debug)]
pub struct RenewalGate {
    last: Mutex<HashMap<String, Instant>>,
    min_interval: Duration,
}

/// The validity of the certificate an agent holds now, as far as this connection knows.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl From<&CertInfo> for Validity {
    fn from(info: &CertInfo) -> Self {
        Self { not_before: info.not_before, not_after: info.not_after }
    }
}

impl Validity {
    /// Half way through: the earliest a renewal is granted.
    pub fn due(&self) -> SystemTime {
        let life = self.not_after.duration_since(self.not_before).unwrap_or_default();
        self.not_before + life / 2
    }
}

/// A renewal granted: the certificate to send and what to report.
#[derive(Debug)]
pub struct Renewed {
    pub reply: Message,
    pub info: CertInfo,
}

impl RenewalGate {
    /// At most one renewal per agent per minute, or per half certificate lifetime when
    /// that is shorter (short lifetimes in tests).
    pub fn new(cert_ttl: Duration) -> Self {
        Self { last: Mutex::new(HashMap::new()), min_interval: (cert_ttl / 2).min(Duration::from_secs(60)) }
    }

    pub fn min_interval(&self) -> Duration {
        self.min_interval
    }

    /// Answer one `RenewRequest`: a certificate, or the error to send, saying why not and when.
    /// `current` is updated to the new certificate when one is issued.
    pub fn answer(
        &self,
        ca: &CertAuthority,
        agent_id: &str,
        current: &mut Validity,
        csr_der: &[u8],
        ttl: Duration,
    ) -> Result<Renewed, ErrorMsg> {
        let refuse = |code: ErrorCode, message: String| {
            debug!(%message, "renewal refused");
            ErrorMsg { code, message }
        };
        let due = current.due();
        if let Ok(wait) = due.duration_since(SystemTime::now())
            && !wait.is_zero()
        {
            return Err(refuse(
                ErrorCode::Unavailable,
                format!(
                    "renewal refused: the certificate is not due for renewal for another {} s \
                     (renewals are granted from half of its lifetime)",
                    wait.as_secs().max(1)
                ),
            ));
        }
        // Reserve the agent's slot before signing, so concurrent connections of one agent
        // cannot both pass.
        {
            let Ok(mut last) = self.last.lock() else {
                return Err(refuse(ErrorCode::Internal, "renewal refused: internal error".into()));
            };
            let now = Instant::now();
            if let Some(at) = last.get(agent_id) {
                let since = now.saturating_duration_since(*at);
                if since < self.min_interval {
                    return Err(refuse(
                        ErrorCode::Unavailable,
                        format!(
                            "renewal refused: this agent was renewed {} s ago; at most one renewal per {} s",
                            since.as_secs(),
                            self.min_interval.as_secs().max(1)
                        ),
                    ));
                }
            }
            if last.len() > PRUNE_ABOVE {
                let keep = self.min_interval;
                last.retain(|_, at| now.saturating_duration_since(*at) < keep);
            }
            last.insert(agent_id.to_owned(), now);
        }
        let issued = ca.issue_agent_cert(csr_der, agent_id, ttl).and_then(|der| Ok((cert_info(der.as_ref())?, der)));
        match issued {
            Ok((info, der)) => {
                info!(serial = %info.serial_hex, "agent certificate renewed");
                *current = Validity::from(&info);
                Ok(Renewed { reply: Message::RenewResponse(RenewResponse { cert_der: der.to_vec() }), info })
            }
            Err(e) => {
                // Nothing was issued: give the slot back.
                if let Ok(mut last) = self.last.lock() {
                    last.remove(agent_id);
                }
                Err(refuse(ErrorCode::BadRequest, e.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_is_half_way() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let v = Validity { not_before: t0, not_after: t0 + Duration::from_secs(100) };
        assert_eq!(v.due(), t0 + Duration::from_secs(50));
    }

    #[test]
    fn interval_is_a_minute_or_half_the_lifetime() {
        assert_eq!(RenewalGate::new(Duration::from_secs(30 * 86400)).min_interval(), Duration::from_secs(60));
        assert_eq!(RenewalGate::new(Duration::from_secs(6)).min_interval(), Duration::from_secs(3));
    }
}
